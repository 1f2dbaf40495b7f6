"""The TOML configuration: exports, listeners and limits, validated with clear errors.

Every error names the file, the key and the reason, in one line. Example::

    [server]
    listen = ["127.0.0.1:10809", "[::1]:10809"]
    unix = ["/run/nbdtrack/nbd.sock"]
    handshake-timeout = 10
    max-connections = 256
    shutdown-timeout = 30                   # SIGTERM: longest wait for in-flight requests
    state-dir = "/var/lib/nbdtrack"         # bitmaps and journals
    control = "/run/nbdtrack/control.sock"  # QMP; default: STATE-DIR/control.sock
    control-group = "backup"                # socket 0660 for this group (default 0600)
    tls = "require"                         # off | on | require (STARTTLS)
    tls-cert = "server-cert.pem"
    tls-key = "server-key.pem"
    tls-ca = "ca-cert.pem"                  # require client certificates it signed
    tls-allow = ["backup1", "CN=backup2,O=Example"]
    max-connections-per-export = 16
    idle-timeout = 600                      # seconds; 0 = never
    max-bytes-in-flight = 67108864          # per connection
    event-loop = "uvloop"                   # asyncio (default) | uvloop (nbdtrack[fast])
    poll-max-ns = 65536                     # asyncio: poll this long before sleeping; 0 = off

    [[export]]
    name = "disk"
    path = "/var/lib/images/disk.img"
    description = "system disk"
    read-only = false
    bitmaps = ["daily", "fine:4K"]          # created at start when missing
    tls-only = true                         # with tls = "on": only over TLS
    max-connections = 4
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from nbdtrack.server.limits import ServerLimits
from nbdtrack.storage.faults import FaultPlan
from nbdtrack.tracking.bitmap import check_granularity, check_name
from nbdtrack.tracking.errors import BitmapError

DEFAULT_PORT = 10809
# QEMU's IOThread poll-max-ns is 32768; a client's turn-around here (its own wake-up among
# it) is 40-60 µs, so polling shorter than that never caught the next request in bench/.
POLL_MAX_NS = 65_536
POLL_MAX_NS_LIMIT = 10_000_000  # 10 ms: more is busy-waiting, not polling


def check_bitmap(name: str, granularity: int | None) -> None:
    check_name(name)
    if granularity is not None:
        check_granularity(granularity)


class ConfigError(Exception):
    """A configuration problem; the message is one line naming file, key and reason."""


@dataclass
class ExportConfig:
    name: str
    path: str
    description: str = ""
    read_only: bool = False
    bitmaps: list[tuple[str, int | None]] = field(default_factory=list)
    tls_only: bool = False
    max_connections: int = 0  # 0: the server's per-export default
    faults: FaultPlan | None = field(default=None, compare=False)  # injected faults (tests)
    # For errors: "FILE: key 'export[0].path'", or the command line's IMAGE.
    where: str = field(default="", compare=False)


@dataclass
class ServerConfig:
    listen: list[tuple[str, int]] = field(default_factory=list)
    unix: list[str] = field(default_factory=list)
    handshake_timeout: float = 10.0
    max_connections: int = 256
    state_dir: str = ""
    control: str = ""
    exports: list[ExportConfig] = field(default_factory=list)
    shutdown_timeout: float = 30.0
    # TLS, access and limits (nbdtrack.cli_security turns them into server settings).
    tls: str = "off"
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_allow: list[str] = field(default_factory=list)
    control_owner: str = ""
    control_group: str = ""
    limits: ServerLimits = field(default_factory=ServerLimits)
    faults: str = ""  # a fault-injection rules file (tests)
    event_loop: str = "asyncio"  # or "uvloop" (the ``fast`` extra); fixed at start
    poll_max_ns: int = POLL_MAX_NS  # asyncio's loop: adaptive polling (server/polling.py)
    # Where "listen" and "unix" came from: the config file's path, or "--listen"/"--unix".
    sources: dict[str, str] = field(default_factory=dict)


def describe_listener(config: ServerConfig, kind: str, index: int, text: str) -> str:
    """Names a listener in an error: the file and key, the flag, or the default."""
    source = config.sources.get(kind, "")
    if source.startswith("--"):
        return f"{source} {text}"
    if source:
        return f"{source}: key 'server.{kind}[{index}]'"
    return f"default listener {text}"


def default_state_dir() -> str:
    """systemd's StateDirectory, else /var/lib/nbdtrack for root, else XDG state home."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    if os.geteuid() == 0:
        return "/var/lib/nbdtrack"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "nbdtrack")


def default_control_path(state_dir: str) -> str:
    """The control socket when neither ``--control`` nor ``server.control`` names one."""
    return os.path.join(state_dir, "control.sock")


def parse_bitmap_spec(text: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:GRANULARITY`` (bytes, or with a K/M suffix) → (name, granularity)."""
    name, sep, gran = text.rpartition(":")
    if not sep or not gran or not (gran[:-1] if gran[-1] in "kKmM" else gran).isdigit():
        return text, None
    scale = {"k": 1024, "m": 1024 * 1024}.get(gran[-1].lower(), 1)
    digits = gran[:-1] if scale > 1 else gran
    return name, int(digits) * scale


def parse_listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT`` → (host, port)."""
    host, port_text = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"'{text}': missing ']'")
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"'{text}': expected ':PORT' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not port_text:
        return host or "127.0.0.1", DEFAULT_PORT
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"'{text}': bad port '{port_text}'")
    return host or "127.0.0.1", int(port_text)


EVENT_LOOPS = ("asyncio", "uvloop")

_SERVER_KEYS = {
    "listen": list,
    "unix": list,
    "handshake-timeout": (int, float),
    "max-connections": int,
    "shutdown-timeout": (int, float),
    "state-dir": str,
    "control": str,
    "tls": str,
    "tls-cert": str,
    "tls-key": str,
    "tls-ca": str,
    "tls-allow": list,
    "control-owner": (str, int),
    "control-group": (str, int),
    "max-connections-per-export": int,
    "idle-timeout": (int, float),
    "max-bytes-in-flight": int,
    "max-option-length": int,
    "max-name-length": int,
    "max-extents": int,
    "faults": str,
    "event-loop": str,
    "poll-max-ns": int,
}
_EXPORT_KEYS = {
    "name": str,
    "path": str,
    "description": str,
    "read-only": bool,
    "bitmaps": list,
    "tls-only": bool,
    "max-connections": int,
}


def _check_type(path: str, key: str, value: Any, expected: Any) -> None:
    if isinstance(value, bool) and expected is not bool and bool not in _as_tuple(expected):
        ok = False
    else:
        ok = isinstance(value, expected)
    if not ok:
        names = " or ".join(t.__name__ for t in _as_tuple(expected))
        raise ConfigError(f"{path}: key '{key}': expected {names}, got {type(value).__name__}")


def _as_tuple(expected: Any) -> tuple:
    return expected if isinstance(expected, tuple) else (expected,)


def load_config(path: str) -> ServerConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    config = ServerConfig()
    for key in data:
        if key not in ("server", "export"):
            raise ConfigError(f"{path}: key '{key}': unknown key")
    server = data.get("server", {})
    _check_type(path, "server", server, dict)
    for key, value in server.items():
        if key not in _SERVER_KEYS:
            raise ConfigError(f"{path}: key 'server.{key}': unknown key")
        _check_type(path, f"server.{key}", value, _SERVER_KEYS[key])
    for i, text in enumerate(server.get("listen", [])):
        _check_type(path, f"server.listen[{i}]", text, str)
        try:
            config.listen.append(parse_listen_address(text))
        except ValueError as err:
            raise ConfigError(f"{path}: key 'server.listen[{i}]': {err}") from None
    for i, sock_path in enumerate(server.get("unix", [])):
        _check_type(path, f"server.unix[{i}]", sock_path, str)
        config.unix.append(sock_path)
    for kind in ("listen", "unix"):
        if kind in server:
            config.sources[kind] = path
    config.handshake_timeout = float(server.get("handshake-timeout", config.handshake_timeout))
    if config.handshake_timeout <= 0:
        raise ConfigError(f"{path}: key 'server.handshake-timeout': must be more than 0")
    config.max_connections = server.get("max-connections", config.max_connections)
    base = os.path.dirname(os.path.abspath(path))
    if "state-dir" in server:
        config.state_dir = os.path.join(base, server["state-dir"])
    if "control" in server:
        config.control = os.path.join(base, server["control"])
    if config.max_connections < 1:
        raise ConfigError(f"{path}: key 'server.max-connections': must be at least 1")
    config.shutdown_timeout = float(server.get("shutdown-timeout", config.shutdown_timeout))
    config.event_loop = server.get("event-loop", config.event_loop)
    if config.event_loop not in EVENT_LOOPS:
        raise ConfigError(
            f"{path}: key 'server.event-loop': '{config.event_loop}' is not one of "
            + ", ".join(EVENT_LOOPS)
        )
    if config.shutdown_timeout <= 0:
        raise ConfigError(f"{path}: key 'server.shutdown-timeout': must be more than 0")
    config.poll_max_ns = server.get("poll-max-ns", config.poll_max_ns)
    if not 0 <= config.poll_max_ns <= POLL_MAX_NS_LIMIT:
        raise ConfigError(
            f"{path}: key 'server.poll-max-ns': must be from 0 to {POLL_MAX_NS_LIMIT}"
        )
    _load_security(path, server, config)
    exports = data.get("export", [])
    _check_type(path, "export", exports, list)
    seen: set[str] = set()
    for i, entry in enumerate(exports):
        where = f"export[{i}]"
        _check_type(path, where, entry, dict)
        for key, value in entry.items():
            if key not in _EXPORT_KEYS:
                raise ConfigError(f"{path}: key '{where}.{key}': unknown key")
            _check_type(path, f"{where}.{key}", value, _EXPORT_KEYS[key])
        if "path" not in entry:
            raise ConfigError(f"{path}: key '{where}.path': missing")
        image = os.path.join(os.path.dirname(os.path.abspath(path)), entry["path"])
        if not os.path.exists(image):
            raise ConfigError(f"{path}: key '{where}.path': image '{entry['path']}' does not exist")
        name = entry.get("name", export_name_for(image))
        if name in seen:
            raise ConfigError(f"{path}: key '{where}.name': duplicate export name '{name}'")
        seen.add(name)
        bitmaps = []
        for k, spec in enumerate(entry.get("bitmaps", [])):
            _check_type(path, f"{where}.bitmaps[{k}]", spec, str)
            bitmap = parse_bitmap_spec(spec)
            try:
                check_bitmap(*bitmap)
            except BitmapError as err:
                raise ConfigError(f"{path}: key '{where}.bitmaps[{k}]': {err}") from None
            bitmaps.append(bitmap)
        config.exports.append(
            ExportConfig(
                name=name,
                path=image,
                description=entry.get("description", ""),
                read_only=entry.get("read-only", False),
                bitmaps=bitmaps,
                where=f"{path}: key '{where}.path'",
                tls_only=entry.get("tls-only", False),
                max_connections=entry.get("max-connections", 0),
            )
        )
        if config.exports[-1].max_connections < 0:
            raise ConfigError(f"{path}: key '{where}.max-connections': must be 0 or more")
    return config


_LIMIT_KEYS = {
    "max-connections-per-export": "max_connections_per_export",
    "idle-timeout": "idle_timeout",
    "max-bytes-in-flight": "max_bytes_in_flight",
    "max-option-length": "max_option_length",
    "max-name-length": "max_name_length",
    "max-extents": "max_extents",
}


def _load_security(path: str, server: dict, config: ServerConfig) -> None:
    """The [server] keys of TLS, the control socket's owner, limits and fault rules."""
    base = os.path.dirname(os.path.abspath(path))
    config.tls = server.get("tls", config.tls)
    if config.tls not in ("off", "on", "require"):
        raise ConfigError(f"{path}: key 'server.tls': must be \"off\", \"on\" or \"require\"")
    for key in ("tls-cert", "tls-key", "tls-ca", "faults"):
        if key in server:
            setattr(config, key.replace("-", "_"), os.path.join(base, server[key]))
    for i, subject in enumerate(server.get("tls-allow", [])):
        _check_type(path, f"server.tls-allow[{i}]", subject, str)
        config.tls_allow.append(subject)
    for key in ("control-owner", "control-group"):
        if key in server:
            setattr(config, key.replace("-", "_"), str(server[key]))
    values = {attr: server[key] for key, attr in _LIMIT_KEYS.items() if key in server}
    try:
        config.limits = ServerLimits(**{**config.limits.__dict__, **values})
        config.limits.check()
    except ValueError as err:
        key = str(err).split(" ", 1)[0]
        raise ConfigError(f"{path}: key 'server.{key}': {str(err).split(' ', 1)[1]}") from None


def export_name_for(image: str) -> str:
    """The default export name of an image: its file name without the extension."""
    base = os.path.basename(image.rstrip("/"))
    stem, _ext = os.path.splitext(base)
    return stem or base
