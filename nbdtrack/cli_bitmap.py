"""``nbdtrack bitmap``: manage the dirty bitmaps of a running server.

A thin client of the control socket: each subcommand sends one QMP command, named as
QEMU names it, and shows the answer as a table or (``--json``) as the server's JSON.
Nothing here reads or writes bitmap files: the server owns them. Errors end in one line
on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from nbdtrack.client.qmp import (
    DEFAULT_TIMEOUT,
    QMPClientError,
    QMPCommandError,
    QMPControlClient,
)
from nbdtrack.config import default_control_path, default_state_dir

_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]


def parse_size(text: str) -> int:
    """``65536``, ``64K``, ``64KiB``, ``1M`` → bytes (binary units, as QEMU reads them)."""
    match = _SIZE.fullmatch(text.strip())
    if not match or (match.group(3) and not match.group(2) and match.group(3).lower() != "b"):
        raise argparse.ArgumentTypeError(f"invalid size '{text}' (examples: 65536, 64K, 1M)")
    scale = 1024 ** " kmgt".index(match.group(2).lower() or " ")
    return int(match.group(1)) * scale


def format_size(n: int) -> str:
    value = float(n)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{n} B" if unit == "B" else f"{value:.4g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def add_parser(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    """The ``bitmap`` command and its subcommands, under the top-level parser's ``sub``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--control",
        metavar="PATH",
        help="the server's control socket (default: STATE_DIR/control.sock, "
        f"here {default_control_path(default_state_dir())})",
    )
    common.add_argument(
        "--json",
        action="store_true",
        help="print JSON: the exports for list, else the export after the change",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="give up on a server that does not answer (default: %(default)g)",
    )

    bitmap = sub.add_parser(name, help=help)
    actions = bitmap.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = actions.add_parser("add", parents=[common], help="add a bitmap; it records at once")
    add.add_argument("export", metavar="EXPORT")
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--granularity",
        type=parse_size,
        metavar="SIZE",
        help="bytes per bit, a power of two >= 512 (default 64K)",
    )
    add.add_argument("--disabled", action="store_true", help="add it without recording")
    add.add_argument("--transient", action="store_true", help="forget it when the server stops")
    for action, text in (
        ("remove", "remove a bitmap"),
        ("clear", "mark every granule clean"),
        ("enable", "start recording writes"),
        ("disable", "stop recording writes"),
    ):
        p = actions.add_parser(action, parents=[common], help=text)
        p.add_argument("export", metavar="EXPORT")
        p.add_argument("name", metavar="NAME")
    merge = actions.add_parser(
        "merge", parents=[common], help="OR the sources into the target (same granularity)"
    )
    merge.add_argument("export", metavar="EXPORT")
    merge.add_argument("target", metavar="TARGET")
    merge.add_argument("sources", nargs="+", metavar="SOURCE")
    listing = actions.add_parser("list", parents=[common], help="show the bitmaps")
    listing.add_argument("export", nargs="?", metavar="EXPORT", help="only this export")


def _request(args: argparse.Namespace) -> tuple[str, dict]:
    """The QMP command and arguments for a subcommand that changes bitmaps."""
    if args.action == "add":
        arguments: dict[str, Any] = {"node": args.export, "name": args.name}
        if args.granularity is not None:
            arguments["granularity"] = args.granularity
        if args.disabled:
            arguments["disabled"] = True
        if args.transient:
            arguments["persistent"] = False
        return "block-dirty-bitmap-add", arguments
    if args.action == "merge":
        arguments = {"node": args.export, "target": args.target, "bitmaps": args.sources}
        return "block-dirty-bitmap-merge", arguments
    return f"block-dirty-bitmap-{args.action}", {"node": args.export, "name": args.name}


def _done_message(args: argparse.Namespace) -> str:
    where = f"export '{args.export}'"
    if args.action == "add":
        return f"added bitmap '{args.name}' to {where}"
    if args.action == "merge":
        sources = ", ".join(f"'{s}'" for s in args.sources)
        return f"merged {sources} into bitmap '{args.target}' of {where}"
    verb = {"remove": "removed", "clear": "cleared", "enable": "enabled", "disable": "disabled"}
    return f"{verb[args.action]} bitmap '{args.name}' of {where}"


def _state(bitmap: dict) -> str:
    words = ["recording" if bitmap["recording"] else "disabled"]
    if not bitmap["persistent"]:
        words.append("transient")
    if bitmap["busy"]:
        words.append("busy")
    if bitmap["inconsistent"]:
        words.append("inconsistent")
    return ", ".join(words)


def format_table(exports: list[dict]) -> str:
    rows = [("EXPORT", "BITMAP", "GRANULARITY", "DIRTY", "STATE")]
    for export in exports:
        if not export["bitmaps"]:
            rows.append((export["name"], "-", "", "", "no bitmaps"))
        for b in export["bitmaps"]:
            rows.append(
                (
                    export["name"],
                    b["name"],
                    format_size(b["granularity"]),
                    format_size(b["count"]),
                    _state(b),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _explain(err: QMPCommandError, args: argparse.Namespace) -> str:
    if err.desc.startswith("Cannot find device=") or err.desc == f"Node '{args.export}' not found":
        return f"no export named '{args.export}' on this server"
    return err.desc


def run(args: argparse.Namespace) -> int:
    """Send the subcommand's QMP command and show the answer; status 1 on any error."""
    path = args.control or default_control_path(default_state_dir())
    try:
        with QMPControlClient(path, timeout=args.timeout) as qmp:
            if args.action == "list":
                arguments = {"name": args.export} if args.export is not None else {}
                exports = qmp.execute("nbdtrack-query-exports", arguments)
                print(json.dumps(exports, indent=2) if args.json else format_table(exports))
                return 0
            qmp.execute(*_request(args))
            if args.json:
                [export] = qmp.execute("nbdtrack-query-exports", {"name": args.export})
                print(json.dumps(export, indent=2))
            else:
                print(_done_message(args))
            return 0
    except QMPCommandError as err:
        print(f"nbdtrack: error: {_explain(err, args)}", file=sys.stderr)
    except QMPClientError as err:
        print(f"nbdtrack: error: {err}", file=sys.stderr)
    return 1
