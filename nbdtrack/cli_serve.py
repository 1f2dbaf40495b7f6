"""``nbdtrack serve``: serve disk images over NBD, set up by flags over a TOML config file.

Only the ``serve`` command loads this module (see ``nbdtrack.cli.COMMANDS``): with it the
config file's parser, TLS and limits; the server stack itself (exports, ``NBDServer``)
only once the configuration holds.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from nbdtrack import cli_security, heap, service
from nbdtrack.config import (
    EVENT_LOOPS,
    POLL_MAX_NS,
    POLL_MAX_NS_LIMIT,
    ConfigError,
    ExportConfig,
    ServerConfig,
    check_bitmap,
    default_control_path,
    default_state_dir,
    describe_listener,
    export_name_for,
    load_config,
    parse_bitmap_spec,
    parse_listen_address,
)
from nbdtrack.server import polling
from nbdtrack.tracking.errors import BitmapError, StateError

if TYPE_CHECKING:  # imported when the server starts, not to parse the flags
    from nbdtrack.exports import Export, ExportRegistry

log = logging.getLogger("nbdtrack")


def _listen_arg(text: str) -> tuple[str, int]:
    try:
        return parse_listen_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _bitmap_arg(text: str) -> tuple[str, int | None]:
    bitmap = parse_bitmap_spec(text)
    try:
        check_bitmap(*bitmap)
    except BitmapError as err:
        raise argparse.ArgumentTypeError(f"'{text}': {err}") from None
    return bitmap


def _poll_arg(text: str) -> int:
    if not text.isdigit() or int(text) > POLL_MAX_NS_LIMIT:
        raise argparse.ArgumentTypeError(
            f"'{text}': not a number of nanoseconds from 0 to {POLL_MAX_NS_LIMIT}"
        )
    return int(text)


def add_parser(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    """The ``serve`` command and its flags, under the top-level parser's ``sub``."""
    serve = sub.add_parser(name, help=help)
    serve.add_argument("image", nargs="?", help="raw image file or block device")
    serve.add_argument("--name", help="export name (default: the image file's stem)")
    serve.add_argument("--description", default="", help="export description")
    serve.add_argument("--read-only", action="store_true", help="refuse writes")
    serve.add_argument(
        "--listen",
        action="append",
        type=_listen_arg,
        metavar="HOST:PORT",
        help="TCP address to listen on (repeatable; default 127.0.0.1:10809)",
    )
    serve.add_argument(
        "--unix", action="append", metavar="PATH", help="unix socket to listen on (repeatable)"
    )
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve.add_argument(
        "--handshake-timeout", type=float, metavar="SECONDS", help="drop clients slower than this"
    )
    serve.add_argument("--max-connections", type=int, metavar="N", help="connection limit")
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="SECONDS",
        help="at SIGTERM, longest wait for in-flight requests (default 30)",
    )
    serve.add_argument(
        "--state-dir", metavar="DIR", help="where bitmaps and journals live (default: %(default)s)"
    )
    serve.add_argument(
        "--bitmap",
        action="append",
        type=_bitmap_arg,
        default=[],
        metavar="NAME[:GRANULARITY]",
        help="create this bitmap on every export if missing (repeatable; default 64K granules)",
    )
    serve.add_argument(
        "--control",
        metavar="PATH",
        help="QMP control socket, mode 0600 (default: STATE_DIR/control.sock)",
    )
    serve.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        help="asyncio (default) or uvloop (pip install 'nbdtrack[fast]')",
    )
    serve.add_argument(
        "--poll-max-ns",
        type=_poll_arg,
        metavar="NS",
        help=f"asyncio loop: poll up to NS before sleeping, as QEMU's poll-max-ns "
        f"(default {POLL_MAX_NS}; 0 = never)",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    cli_security.add_arguments(serve)


def _serve_config(args: argparse.Namespace) -> ServerConfig:
    """The config file (if any) with command-line flags on top: flags win."""
    config = load_config(args.config) if args.config else ServerConfig()
    if args.image:
        name = args.name if args.name is not None else export_name_for(args.image)
        if any(e.name == name for e in config.exports):
            raise ConfigError(f"export name '{name}' is given twice")
        config.exports.insert(0, ExportConfig(name, args.image, args.description, args.read_only))
    elif args.name or args.read_only or args.description:
        raise ConfigError("--name, --description and --read-only need an IMAGE")
    if not config.exports:
        raise ConfigError("nothing to serve: give an IMAGE or a --config with exports")
    if args.listen:
        config.listen = list(args.listen)
        config.sources["listen"] = "--listen"
    if args.unix:
        config.unix = list(args.unix)
        config.sources["unix"] = "--unix"
    if not config.listen and not config.unix:
        config.listen = [("127.0.0.1", 10809)]
    if args.handshake_timeout is not None:
        config.handshake_timeout = args.handshake_timeout
    if args.max_connections is not None:
        config.max_connections = args.max_connections
    if args.shutdown_timeout is not None:
        config.shutdown_timeout = args.shutdown_timeout
    if args.state_dir:
        config.state_dir = args.state_dir
    config.state_dir = config.state_dir or default_state_dir()
    if args.event_loop:
        config.event_loop = args.event_loop
    if args.poll_max_ns is not None:
        config.poll_max_ns = args.poll_max_ns
    if args.control:
        config.control = args.control
    config.control = config.control or default_control_path(config.state_dir)
    for export in config.exports:
        known = {name for name, _ in export.bitmaps}
        export.bitmaps += [b for b in args.bitmap if b[0] not in known]
    cli_security.apply_flags(args, config)
    return config


def _open_export(ec: ExportConfig, state_dir: str) -> Export:
    """One configured export, opened; also what a reload (SIGHUP) uses."""
    from nbdtrack.exports import open_export

    try:
        export = open_export(
            ec.name,
            ec.path,
            description=ec.description,
            read_only=ec.read_only,
            state_dir=state_dir,
            bitmaps=ec.bitmaps,
            faults=ec.faults,
        )
    except OSError as err:
        where = f"'{err.filename}'" if err.filename else f"for export '{ec.name}'"
        prefix = f"{ec.where}: " if ec.where else ""
        raise ConfigError(f"{prefix}cannot open {where}: {err.strerror or err}") from None
    except (StateError, BitmapError) as err:
        raise ConfigError(f"export '{ec.name}': {err}") from None
    export.tls_only, export.max_connections = ec.tls_only, ec.max_connections
    return export


def _open_exports(config: ServerConfig) -> ExportRegistry:
    from nbdtrack.exports import ExportRegistry

    registry = ExportRegistry()
    try:
        for ec in config.exports:
            registry.add(_open_export(ec, config.state_dir))
    except ConfigError:
        for export in registry:
            export.close()
        raise
    return registry


async def _serve(
    config: ServerConfig,
    registry: ExportRegistry,
    reload_config: Callable[[], ServerConfig] | None = None,
    security: cli_security.Security | None = None,
) -> None:
    from nbdtrack.server.activation import ActivationError
    from nbdtrack.server.server import NBDServer

    security = security or cli_security.build(config)
    server = NBDServer(
        registry,
        handshake_timeout=config.handshake_timeout,
        max_connections=config.max_connections,
        shutdown_timeout=config.shutdown_timeout,
        limits=security.limits,
        tls=security.tls,
    )
    server.catch_signals()  # a stop from now on waits for the start, then shuts down
    try:
        # Before the NBD listeners: whoever sees the server listening can manage it.
        await server.listen_control(
            config.control, security.control_owner, security.control_group
        )
    except OSError as err:
        await server.shutdown()
        reason = err.strerror or str(err)
        raise ConfigError(f"cannot make control socket {config.control}: {reason}") from None
    try:
        # Socket activation: the socket unit's listeners replace the configured ones.
        inherited = await server.listen_inherited()
    except (ActivationError, OSError) as err:
        await server.shutdown()
        raise ConfigError(str(err)) from None
    listeners: list[tuple[str, int, str, Callable[[], Awaitable[object]]]] = []
    if not inherited:
        for i, (host, port) in enumerate(config.listen):
            text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            listeners.append(("listen", i, text, functools.partial(server.listen_tcp, host, port)))
        for i, path in enumerate(config.unix):
            listeners.append(("unix", i, path, functools.partial(server.listen_unix, path)))
    for kind, i, text, start in listeners:
        try:
            await start()
        except OSError as err:
            await server.shutdown()
            where = describe_listener(config, kind, i, text)
            reason = os.strerror(err.errno) if err.errno else str(err)  # asyncio's is long
            raise ConfigError(f"{where}: cannot listen on {text}: {reason}") from None
    for export in registry:
        log.info(
            "export '%s': %d bytes%s",
            export.name,
            export.size,
            " read-only" if export.read_only else "",
        )
    reload = None
    if reload_config is not None:
        reload = service.Reloader(server, config, reload_config, _open_export)
    await server.serve_until_stopped(reload)


def _loop_factory(config: ServerConfig) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``serve`` runs on: asyncio's own (polling adaptively unless
    ``poll_max_ns`` is 0), or uvloop's when asked (which has no such polling)."""
    if config.event_loop != "uvloop":
        if not config.poll_max_ns:
            return None
        return polling.polling_loop_factory(config.poll_max_ns)
    try:
        import uvloop
    except ImportError:
        raise ConfigError(
            "event loop 'uvloop': uvloop is not installed (pip install 'nbdtrack[fast]')"
        ) from None
    return uvloop.new_event_loop


def run(args: argparse.Namespace) -> int:
    """Serve until stopped. A configuration that cannot be served (a bad file or flag, an
    image that does not open, a busy port) ends in one error line and status 1."""
    try:
        config = _serve_config(args)
        loop_factory = _loop_factory(config)
        security = cli_security.build(config)  # certificates and rules, before any export opens
        registry = _open_exports(config)
        log.info(
            "event loop: %s%s",
            config.event_loop,
            f", polling up to {config.poll_max_ns} ns"
            if config.poll_max_ns and config.event_loop == "asyncio"
            else "",
        )
        heap.keep_freed_memory()
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(config, registry, functools.partial(_serve_config, args), security))
    except ConfigError as err:
        print(f"nbdtrack: error: {err}", file=sys.stderr)
        return 1
    return 0
