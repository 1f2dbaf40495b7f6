"""``serve`` options for TLS, access and limits: flags, their merge over the config
file, and their translation into what ``NBDServer`` takes.

Kept apart from ``cli_serve.py`` so the serve command stays readable; every mistake still
ends as one ``ConfigError`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import pwd
from dataclasses import dataclass

from nbdtrack.config import ConfigError, ServerConfig
from nbdtrack.protocol.handshake import TLSMode
from nbdtrack.server.limits import ServerLimits
from nbdtrack.server.tls import TLSSettings, TLSSetupError, make_settings
from nbdtrack.storage.faults import FaultConfigError, load_rules

# flag attribute -> ServerLimits field
_LIMIT_FLAGS = {
    "max_connections_per_export": int,
    "idle_timeout": float,
    "max_bytes_in_flight": int,
    "max_option_length": int,
    "max_name_length": int,
    "max_extents": int,
}


@dataclass
class Security:
    """Everything of TLS, access and limits the server is started with."""

    tls: TLSSettings
    limits: ServerLimits
    control_owner: int | None
    control_group: int | None


def add_arguments(serve: argparse.ArgumentParser) -> None:
    tls = serve.add_argument_group("TLS and access")
    tls.add_argument(
        "--tls",
        choices=[m.value for m in TLSMode],
        help="off: no TLS; on: offered (tls-only exports need it); require: nothing without it",
    )
    tls.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM)")
    tls.add_argument("--tls-key", metavar="FILE", help="server private key (PEM, unencrypted)")
    tls.add_argument(
        "--tls-ca", metavar="FILE", help="require client certificates signed by this CA (PEM)"
    )
    tls.add_argument(
        "--tls-allow",
        action="append",
        metavar="SUBJECT",
        help="allowed client certificate: a common name, or a DN 'CN=..,O=..' (repeatable)",
    )
    tls.add_argument("--control-owner", metavar="USER", help="owner of the control socket")
    tls.add_argument(
        "--control-group", metavar="GROUP", help="group of the control socket (mode 0660)"
    )
    limits = serve.add_argument_group("limits")
    limits.add_argument(
        "--max-connections-per-export", type=int, metavar="N", help="0: no per-export limit"
    )
    limits.add_argument(
        "--idle-timeout", type=float, metavar="SECONDS", help="close idle clients (0: never)"
    )
    limits.add_argument(
        "--max-bytes-in-flight", type=int, metavar="BYTES", help="per connection (default 64 MiB)"
    )
    limits.add_argument(
        "--max-option-length", type=int, metavar="BYTES", help="longest handshake option buffered"
    )
    limits.add_argument(
        "--max-name-length", type=int, metavar="BYTES", help="longest export name (≤ 4096)"
    )
    limits.add_argument(
        "--max-extents", type=int, metavar="N", help="extents per BLOCK_STATUS reply chunk"
    )
    limits.add_argument(
        "--faults", metavar="FILE", help="fault-injection rules, JSON or TOML (for tests)"
    )


def apply_flags(args: argparse.Namespace, config: ServerConfig) -> None:
    """Command-line flags over the config file's values: flags win."""
    for name in ("tls", "tls_cert", "tls_key", "tls_ca", "control_owner", "control_group"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, value)
    if getattr(args, "tls_allow", None):
        config.tls_allow = list(args.tls_allow)
    if getattr(args, "faults", None):
        config.faults = args.faults
    if config.faults:
        try:
            plan = load_rules(config.faults)
        except FaultConfigError as err:
            raise ConfigError(str(err)) from None
        for export in config.exports:
            export.faults = plan
    values = {
        name: kind(getattr(args, name))
        for name, kind in _LIMIT_FLAGS.items()
        if getattr(args, name, None) is not None
    }
    try:
        config.limits = dataclasses.replace(config.limits, **values)
        config.limits.check()
    except ValueError as err:
        raise ConfigError(f"--{err}") from None


def _user(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ConfigError(f"control socket owner: no user '{text}'") from None


def _group(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"control socket group: no group '{text}'") from None


def build(config: ServerConfig) -> Security:
    """Check the merged configuration and load what it names (certificates, rules)."""
    mode = TLSMode(config.tls)
    tls_only = [e.name for e in config.exports if e.tls_only]
    if tls_only and mode is TLSMode.OFF:
        raise ConfigError(f"export '{tls_only[0]}' is tls-only, which needs --tls=on or require")
    try:
        tls = make_settings(
            mode,
            config.tls_cert or None,
            config.tls_key or None,
            config.tls_ca or None,
            config.tls_allow,
        )
    except TLSSetupError as err:
        raise ConfigError(str(err)) from None
    return Security(
        tls=tls,
        limits=config.limits,
        control_owner=_user(config.control_owner) if config.control_owner else None,
        control_group=_group(config.control_group) if config.control_group else None,
    )
