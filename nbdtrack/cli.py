"""The ``nbdtrack`` command line.

Each command lives in its own module, loaded only when that command runs: a backup does
not import the server, the config file's parser or TLS. Errors a user can cause (a
missing image, a bad flag, a bad config) end in one line on stderr and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from nbdtrack import __version__

# command -> (the module implementing it, its line in ``nbdtrack --help``). A command's
# module, and all that it imports, is loaded only when that command runs; each has
# ``add_parser(sub, name, help)`` and ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("nbdtrack.cli_serve", "serve disk images over NBD"),
    "check-config": ("nbdtrack.service", "validate a configuration file without serving"),
    "bitmap": ("nbdtrack.cli_bitmap", "manage the dirty bitmaps of a running server"),
    "backup": ("nbdtrack.cli_backup", "back up an NBD export into a repository of qcow2 chains"),
    "restore": (
        "nbdtrack.cli_backup",
        "restore a backup to a raw or qcow2 file, or onto an NBD export",
    ),
    "verify": ("nbdtrack.cli_backup", "check every image of a repository against its manifest"),
    "merge": ("nbdtrack.cli_backup", "fold the oldest backups of a chain into its full"),
}


def _command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option (the top-level
    options, -h/--help and --version, take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """A parser for ``argv``: the command it names in full, the others as a name and a help
    line, which is all ``nbdtrack --help`` shows of them (and all an unknown command's
    error needs)."""
    parser = argparse.ArgumentParser(prog="nbdtrack", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nbdtrack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = _command(argv)
    for name, (module, text) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).add_parser(sub, name, text)
        else:
            sub.add_parser(name, help=text)
    return parser


def entry() -> NoReturn:
    """The ``nbdtrack`` command. A one-shot command (all but ``serve``) has closed and
    synced everything it wrote when ``run`` returns; it then leaves with ``os._exit``
    after flushing its output, instead of tearing the interpreter down object by object:
    ~10 ms, a twentieth of an incremental backup."""
    argv = sys.argv[1:]
    args = build_parser(argv).parse_args(argv)
    code = run(args)
    if args.command == "serve":
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command as a library call (the interpreter goes on); the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(build_parser(argv).parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Set up logging and run the parsed command; its exit status (130 on Ctrl-C)."""
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if os.environ.get("JOURNAL_STREAM"):  # else stderr is not the journal: nothing to set up
        from nbdtrack.server.journal import use_journal

        use_journal()
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except KeyboardInterrupt:
        return 130
