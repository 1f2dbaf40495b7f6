"""``nbdtrack backup``, ``restore``, ``verify`` and ``merge``: the backup side of the CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING

from nbdtrack import heap
from nbdtrack.backup.job import BACKUP_MODES, BackupError, BackupRequest, run_backup
from nbdtrack.backup.progress import PROGRESS_MODES, JSONProgress, Progress, make_progress
from nbdtrack.backup.qcow2 import Qcow2Error
from nbdtrack.backup.repository import RepositoryError
from nbdtrack.client import ClientError, URIError
from nbdtrack.client.qmp import QMPClientError

if TYPE_CHECKING:
    from nbdtrack.backup.verify import Problem


def add_parser(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    """One of ``backup``, ``restore``, ``verify`` and ``merge``, under the top-level
    parser's ``sub``."""
    _PARSERS[name](sub.add_parser(name, help=help, description=_DESCRIPTIONS[name]))


_DESCRIPTIONS = {
    "backup": "Copy one consistent point in time of an export: a full backup, or "
    "only what its dirty bitmap says changed since the chain's last backup.",
    "restore": "Write one restore point (the newest, or --until ID) of a chain to a "
    "file (sparse raw, or standalone qcow2) or onto an NBD export (ranges the backup "
    "says are zero are zeroed there).",
    "verify": "Check every image of every chain: qcow2 structure and refcounts, "
    "every cluster against the manifest's hash, backing files and sizes. One line per "
    "problem; the exit status is 1 if there is any.",
    "merge": "Fold the full and the oldest backups after it into one full backup "
    "(a synthetic full), so that at most --keep backups remain after it. Every "
    "remaining restore point restores as before.",
}


def _backup_arguments(backup: argparse.ArgumentParser) -> None:
    backup.add_argument("source", metavar="SOURCE_URI", help="nbd://HOST:PORT/EXPORT")
    backup.add_argument("repository", metavar="REPO", help="repository directory")
    backup.add_argument("--bitmap", metavar="NAME", help="the dirty bitmap to read")
    backup.add_argument(
        "--mode",
        choices=BACKUP_MODES,
        default="auto",
        help="auto: incremental when the chain can continue, else full (and say why)",
    )
    backup.add_argument(
        "--control",
        metavar="SOCKET",
        help="nbdtrack's control socket: back up a checkpoint (consistent point in time)",
    )
    backup.add_argument(
        "--connections", type=int, default=4, metavar="N", help="NBD connections (multi-conn)"
    )
    backup.add_argument(
        "--resumable",
        action="store_true",
        help="sync mode 'always': if this backup fails, the next one resumes it, copying "
        "again only what was not yet saved or has changed since",
    )
    _progress_argument(backup)


def _restore_arguments(restore_parser: argparse.ArgumentParser) -> None:
    from nbdtrack.backup.restore import FORMATS

    restore_parser.add_argument("repository", metavar="REPO", help="repository directory")
    restore_parser.add_argument(
        "target",
        metavar="TARGET",
        help="a file, or nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH",
    )
    _export_argument(restore_parser)
    restore_parser.add_argument(
        "--until", metavar="ID", help="the backup to restore (default: the newest)"
    )
    restore_parser.add_argument(
        "--format",
        choices=FORMATS,
        help="file format (default: qcow2 for a name ending in .qcow2, else raw)",
    )
    restore_parser.add_argument(
        "--force", action="store_true", help="replace an existing target file"
    )
    _progress_argument(restore_parser)


def _verify_arguments(verify_parser: argparse.ArgumentParser) -> None:
    verify_parser.add_argument("repository", metavar="REPO", help="repository directory")
    _export_argument(verify_parser)
    verify_parser.add_argument(
        "--source",
        metavar="URI",
        help="also compare the newest restore point byte for byte with this export",
    )
    _progress_argument(verify_parser)


def _merge_arguments(merge_parser: argparse.ArgumentParser) -> None:
    merge_parser.add_argument("repository", metavar="REPO", help="repository directory")
    _export_argument(merge_parser)
    merge_parser.add_argument(
        "--keep",
        type=int,
        default=0,
        metavar="N",
        help="backups to keep after the full (default 0: fold everything into one full)",
    )
    merge_parser.add_argument(
        "--dry-run", action="store_true", help="say what would be merged, change nothing"
    )
    _progress_argument(merge_parser)


_PARSERS = {
    "backup": _backup_arguments,
    "restore": _restore_arguments,
    "verify": _verify_arguments,
    "merge": _merge_arguments,
}


def _export_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--export", metavar="NAME", help="the export's chain (needed if the repository has several)"
    )


def _progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress", choices=PROGRESS_MODES, default="auto", help="progress bar or JSON lines"
    )


def run(args: argparse.Namespace) -> int:
    """Run the command; what a user can cause ends in one error line and status 1."""
    heap.keep_freed_memory()  # bulk copies: received buffers reused, not faulted in anew
    progress = make_progress(args.progress)
    try:
        if args.command == "backup":
            request = BackupRequest(
                source=args.source,
                repository=args.repository,
                bitmap=args.bitmap,
                mode=args.mode,
                control=args.control,
                connections=max(1, args.connections),
                resumable=args.resumable,
            )
            record = asyncio.run(run_backup(request, progress))
            progress.result(
                {
                    "id": record.id,
                    "mode": record.mode,
                    "file": record.file,
                    "parent": record.parent,
                    "bytes_read": record.bytes_read,
                    "bytes_written": record.bytes_written,
                    "generation": record.generation,
                }
            )
            if args.progress != "json":
                print(
                    f"{record.id}: {record.mode} backup, {record.bytes_read} bytes read, "
                    f"{record.bytes_written} written"
                )
            return 0
        if args.command == "restore":
            return _restore(args, progress)
        if args.command == "verify":
            return _verify(args, progress)
        if args.command == "merge":
            return _merge(args, progress)
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"nbdtrack: error: {err}", file=sys.stderr)
        return 1
    return 2


def _user_errors() -> tuple[type[Exception], ...]:
    """What a user can cause, said in one line. restore, merge and verify are imported by
    their commands only (a backup starts faster), so their error classes are looked up
    here."""
    from nbdtrack.backup.merge import MergeError
    from nbdtrack.backup.restore import RestoreError

    return (
        BackupError,
        RestoreError,
        MergeError,
        RepositoryError,
        Qcow2Error,
        URIError,
        QMPClientError,
        ClientError,
        OSError,
    )


def _restore(args: argparse.Namespace, progress: Progress) -> int:
    from nbdtrack.backup.restore import describe, restore

    result = restore(
        args.repository,
        args.target,
        export=args.export,
        until=args.until,
        fmt=args.format,
        force=args.force,
        progress=progress,
    )
    progress.result(result.as_dict())
    if not isinstance(progress, JSONProgress):
        print(describe(result))
    return 0


def _verify(args: argparse.Namespace, progress: Progress) -> int:
    from nbdtrack.backup.verify import verify

    as_json = isinstance(progress, JSONProgress)

    def show(problem: Problem) -> None:
        if as_json:
            assert isinstance(progress, JSONProgress)
            line = json.dumps({"event": "problem", **problem.as_dict()})
            print(line, file=progress.out, flush=True)
        else:
            print(problem, flush=True)

    report = verify(
        args.repository,
        export=args.export,
        source=args.source,
        progress=progress,
        on_problem=show,
    )
    for note in report.notes:
        progress.message(note)
    summary = (
        f"{report.images} images in {report.chains} chains, {report.clusters} clusters "
        f"checked"
        + (f", {report.compared} bytes compared with the source" if args.source else "")
        + f": {len(report.problems) or 'no'} problem{'' if len(report.problems) == 1 else 's'}"
    )
    progress.result(
        {
            "ok": report.ok,
            "problems": len(report.problems),
            "chains": report.chains,
            "images": report.images,
            "clusters": report.clusters,
            "compared": report.compared,
        }
    )
    if not as_json:
        print(summary, file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def _merge(args: argparse.Namespace, progress: Progress) -> int:
    from nbdtrack.backup.merge import merge

    steps = merge(
        args.repository,
        export=args.export,
        keep=args.keep,
        progress=progress,
        dry_run=args.dry_run,
    )
    progress.result(
        {
            "dry_run": args.dry_run,
            "steps": [
                {"full": s.full, "target": s.target, "folded": s.folded, "rebased": s.rebased}
                for s in steps
            ],
        }
    )
    if not isinstance(progress, JSONProgress):
        if not steps:
            print(f"nothing to merge: at most {args.keep} backups follow each full")
        for step in steps:
            print(("dry run, would have " if args.dry_run else "") + step.describe())
    return 0
