"""``nbdtrack backup``, ``restore``, ``verify`` and ``merge``: the backup side of the CLI."""

from __future__ import annotations

import argparse
import asyncio
import sys

from nbdtrack.backup.job import BACKUP_MODES, BackupError, BackupRequest, run_backup
from nbdtrack.backup.progress import PROGRESS_MODES, make_progress
from nbdtrack.backup.qcow2 import Qcow2Error
from nbdtrack.backup.repository import RepositoryError
from nbdtrack.client import ClientError, URIError
from nbdtrack.client.qmp import QMPClientError

COMMANDS = ("backup",)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    backup = sub.add_parser(
        "backup",
        help="back up an NBD export into a repository of qcow2 chains",
        description="Copy one consistent point in time of an export: a full backup, or "
        "only what its dirty bitmap says changed since the chain's last backup.",
    )
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
    backup.add_argument(
        "--progress", choices=PROGRESS_MODES, default="auto", help="progress bar or JSON lines"
    )


def run(args: argparse.Namespace) -> int:
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
    except (BackupError, RepositoryError, Qcow2Error, URIError, QMPClientError) as err:
        print(f"nbdtrack: error: {err}", file=sys.stderr)
        return 1
    except (ClientError, OSError) as err:
        print(f"nbdtrack: error: {err}", file=sys.stderr)
        return 1
    return 2
