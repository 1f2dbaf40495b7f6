"""Running as a service: reloading the configuration (SIGHUP) and ``nbdtrack check-config``.

A reload re-reads the file (with the command line's flags on top, as at start), opens
the exports that are new, closes the ones that are gone, and reopens the ones whose
image or mode changed; every other connection goes on untouched. A bad file changes
nothing: the error is logged in one line and the running configuration stays.
Listeners, the state directory and the control socket are fixed at start (systemd's
socket unit owns the listeners anyway); changing them needs a restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from nbdtrack.config import (
    ConfigError,
    ExportConfig,
    ServerConfig,
    describe_listener,
    load_config,
)
from nbdtrack.server.activation import probe_tcp, probe_unix

if TYPE_CHECKING:
    from nbdtrack.exports import Export
    from nbdtrack.server.server import NBDServer

log = logging.getLogger("nbdtrack.service")

OpenExport = Callable[[ExportConfig, str], "Export"]


def _needs_reopen(old: ExportConfig, new: ExportConfig) -> bool:
    """A changed image, mode or anything else but the description and bitmaps."""
    return dataclasses.replace(old, description=new.description, bitmaps=new.bitmaps) != new


class Reloader:
    """Applies a re-read configuration to a running server (one reload at a time)."""

    def __init__(
        self,
        server: NBDServer,
        config: ServerConfig,
        load: Callable[[], ServerConfig],
        open_export: OpenExport,
    ) -> None:
        self.server = server
        self.config = config
        self.load = load
        self.open_export = open_export

    async def __call__(self) -> None:
        try:
            new = self.load()
        except ConfigError as err:
            log.error("reload failed, the running configuration stays: %s", err)
            return
        old = self.config
        for attr, what in (
            ("listen", "listeners"),
            ("unix", "unix listeners"),
            ("state_dir", "the state directory"),
            ("control", "the control socket"),
            ("event_loop", "the event loop"),
            ("poll_max_ns", "poll-max-ns"),
        ):
            if getattr(new, attr) != getattr(old, attr):
                log.warning("reload: a change of %s takes effect at the next restart", what)
                setattr(new, attr, getattr(old, attr))
        server = self.server
        server.handshake_timeout = new.handshake_timeout
        server.max_connections = new.max_connections
        server.shutdown_timeout = new.shutdown_timeout

        before = {e.name: e for e in old.exports}
        after = {e.name: e for e in new.exports}
        changed = [n for n in after if n in before and _needs_reopen(before[n], after[n])]
        added = [n for n in after if n not in before]
        removed = [n for n in before if n not in after]

        # New exports first: if one cannot open, nothing has changed yet.
        opened: list[Export] = []
        try:
            for name in added:
                export = await server.run_blocking(self.open_export, after[name], old.state_dir)
                opened.append(export)
        except ConfigError as err:
            for export in opened:
                await server.run_blocking(export.close)
            log.error("reload failed, the running configuration stays: %s", err)
            return
        for export in opened:
            try:
                server.add_export(export)
            except ValueError as err:  # a checkpoint's snapshot export has that name
                await server.run_blocking(export.close)
                log.error("reload: export '%s' not added: %s", export.name, err)
                added.remove(export.name)
                continue
            log.info("reload: export '%s' added (%s)", export.name, after[export.name].path)
        for name in removed:
            await server.remove_export(name)
            log.info("reload: export '%s' removed", name)
        kept = [after[n] for n in before if n in after]
        for name in changed:
            await server.remove_export(name)
            try:
                export = await server.run_blocking(self.open_export, after[name], old.state_dir)
            except ConfigError as err:
                log.error("reload: export '%s' could not be reopened, it is gone: %s", name, err)
                kept = [e for e in kept if e.name != name]
                continue
            server.add_export(export)
            log.info("reload: export '%s' reopened (%s)", name, after[name].path)
        for ec in after.values():
            if ec.name in before and ec.name not in changed:
                await server.run_blocking(self._update_in_place, ec)
        new.exports = kept + [after[n] for n in added]
        self.config = new
        log.info("reload done: %s", server.status_text())

    def _update_in_place(self, ec: ExportConfig) -> None:
        """Description and newly listed bitmaps apply without touching connections."""
        export = self.server.registry.lookup(ec.name)
        if export is None or export.name != ec.name:
            return
        export.description = ec.description
        tracker = export.tracker
        if tracker is None:
            return
        for name, granularity in ec.bitmaps:
            if name not in tracker.bitmaps:
                try:
                    tracker.add(name, granularity)
                    log.info("reload: bitmap '%s' added to export '%s'", name, ec.name)
                except Exception as err:  # one bad bitmap must not stop the reload
                    log.error("reload: bitmap '%s' of export '%s': %s", name, ec.name, err)


# --- nbdtrack check-config --------------------------------------------------------------


def check_config(path: str, *, bind: bool = True) -> str:
    """Validate a file as ``serve --config`` would, without serving; returns a summary.

    Besides the file itself this opens every image the way the server will (read-write
    unless read-only) and, with ``bind``, tries every listener, so a restart cannot fail
    on a busy port. Raises ConfigError naming the file, the key and the reason.
    """
    config = load_config(path)
    if not config.exports:
        raise ConfigError(f"{path}: key 'export': nothing to serve (no [[export]] tables)")
    for ec in config.exports:
        flags = os.O_RDONLY if ec.read_only else os.O_RDWR
        try:
            os.close(os.open(ec.path, flags | os.O_CLOEXEC))
        except OSError as err:
            mode = "read-only" if ec.read_only else "read-write"
            raise ConfigError(
                f"{ec.where}: cannot open '{ec.path}' {mode}: {err.strerror or err}"
            ) from None
    if bind:
        for i, (host, port) in enumerate(config.listen):
            text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            try:
                probe_tcp(host, port)
            except OSError as err:
                where = describe_listener(config, "listen", i, text)
                raise ConfigError(
                    f"{where}: cannot listen on {text}: {err.strerror or err}"
                ) from None
        for i, sock_path in enumerate(config.unix):
            try:
                probe_unix(sock_path)
            except OSError as err:
                where = describe_listener(config, "unix", i, sock_path)
                raise ConfigError(
                    f"{where}: cannot listen on {sock_path}: {err.strerror or err}"
                ) from None
    names = ", ".join(e.name for e in config.exports)
    n = len(config.exports)
    return f"{path}: OK: {n} export{'s' if n != 1 else ''} ({names})"


def add_parser(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    """The ``check-config`` command, under the top-level parser's ``sub``."""
    check = sub.add_parser(
        name,
        help=help,
        description="Validate a configuration file as 'serve --config' would, without "
        "serving: every error names the file, the key and the reason.",
    )
    check.add_argument("file", metavar="FILE", help="TOML configuration file")
    check.add_argument(
        "--no-bind",
        action="store_true",
        help="do not test the listeners (for the file of a server that is running)",
    )


def run(args: argparse.Namespace) -> int:
    """``nbdtrack check-config``: the summary on stdout, or one error line and status 1."""
    try:
        print(check_config(args.file, bind=not args.no_bind))
    except ConfigError as err:
        print(f"nbdtrack: error: {err}", file=sys.stderr)
        return 1
    return 0
