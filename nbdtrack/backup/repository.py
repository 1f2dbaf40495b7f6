"""The backup repository: one chain of qcow2 images per export, and its manifest.

Layout::

    REPO/
      EXPORT/                    one chain per export (the name %-quoted)
        manifest.json            every backup, oldest first
        20261126T034100Z-full.qcow2
        20261126T034100Z-full.qcow2.hashes.json     its cluster hashes (for verify)
        20261126T050000Z-incremental.qcow2   (backing file: the previous image)
        20261126T050000Z-incremental.qcow2.hashes.json

A full is a standalone image; an incremental's backing file is the previous backup and
it holds only what changed; a differential's backing file is the full it continues. The
manifest is rewritten atomically (temp file, fsync, rename, fsync of the directory), so
a crash leaves the old or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from urllib.parse import quote

from nbdtrack.backup.hashing import LEGACY_ALGORITHM, ClusterHashes, UnknownHashAlgorithm

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 1 held the cluster hashes in the manifest; read, and moved out on save
HASHES_SUFFIX = ".hashes.json"
MODES = ("full", "incremental", "differential")


class RepositoryError(Exception):
    """The repository is missing, damaged, or cannot do what was asked."""


@dataclass
class BackupRecord:
    id: str
    time: str  # ISO 8601, UTC
    mode: str  # full | incremental | differential
    file: str  # image file name, relative to the chain directory
    parent: str | None  # id of the backing backup
    export_size: int
    cluster_size: int
    bitmap: str | None = None
    generation: str | None = None  # the bitmap's generation this backup continues from
    checkpoint: str | None = None
    source: str = ""
    bytes_read: int = 0
    bytes_written: int = 0
    # The hash of every cluster this image holds: lets verify prove the images intact
    # without the source. Kept beside the image (FILE.hashes.json), not in the manifest,
    # which every backup reads: a full's grow with the disk. None until ``Chain.hashes``
    # loads them.
    hashes: ClusterHashes | None = field(default=None, repr=False, compare=False)


class Chain:
    """The backups of one export, oldest first."""

    def __init__(self, path: str, export: str) -> None:
        self.path = path
        self.export = export
        self.backups: list[BackupRecord] = []

    @classmethod
    def load(cls, path: str, export: str) -> Chain:
        chain = cls(path, export)
        manifest = os.path.join(path, MANIFEST)
        try:
            with open(manifest, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return chain
        except (OSError, ValueError) as err:
            raise RepositoryError(f"{manifest}: cannot read the manifest: {err}") from None
        if data.get("version") not in (1, FORMAT_VERSION):
            raise RepositoryError(f"{manifest}: unknown manifest version {data.get('version')}")
        try:
            chain.backups = [BackupRecord(**entry) for entry in data["backups"]]
        except (KeyError, TypeError) as err:
            raise RepositoryError(f"{manifest}: malformed manifest: {err}") from None
        for record in chain.backups:  # version 1: hashes inside, from before they had a name
            if isinstance(record.hashes, dict):
                record.hashes = ClusterHashes(LEGACY_ALGORITHM, record.hashes)
        return chain

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the chain for one writer (a backup or a merge) at a time."""
        os.makedirs(self.path, exist_ok=True)
        fd = os.open(os.path.join(self.path, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise RepositoryError(
                    f"the chain of '{self.export}' is busy: another backup or merge "
                    f"(pid {holder}) is writing it"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def save(self) -> None:
        """Write the manifest; the hashes of a backup are on disk before it names it."""
        os.makedirs(self.path, exist_ok=True)
        for b in self.backups:
            if b.hashes is not None and not os.path.exists(self.hashes_path(b.file)):
                write_hashes(self.hashes_path(b.file), b.hashes)
        data = {
            "version": FORMAT_VERSION,
            "export": self.export,
            "backups": [
                {f.name: getattr(b, f.name) for f in fields(b) if f.name != "hashes"}
                for b in self.backups
            ],
        }
        path = os.path.join(self.path, MANIFEST)
        write_atomically(path, json.dumps(data, indent=1).encode())

    def hashes_path(self, image_file: str) -> str:
        return os.path.join(self.path, image_file + HASHES_SUFFIX)

    def hashes(self, record: BackupRecord) -> ClusterHashes:
        """The cluster hashes of a backup, read from beside its image once."""
        if record.hashes is None:
            record.hashes = read_hashes(self.hashes_path(record.file), record.id)
        return record.hashes

    @property
    def last(self) -> BackupRecord | None:
        return self.backups[-1] if self.backups else None

    def get(self, backup_id: str) -> BackupRecord:
        for backup in self.backups:
            if backup.id == backup_id:
                return backup
        raise RepositoryError(f"no backup '{backup_id}' in the chain of '{self.export}'")

    def lineage(self, backup_id: str | None = None) -> list[BackupRecord]:
        """The images a restore to ``backup_id`` (default: the newest) reads, full first."""
        if not self.backups:
            raise RepositoryError(f"the chain of '{self.export}' has no backup")
        record = self.get(backup_id) if backup_id else self.backups[-1]
        out = [record]
        while out[-1].parent is not None:
            out.append(self.get(out[-1].parent))
        return out[::-1]

    def last_full(self) -> BackupRecord | None:
        for backup in reversed(self.backups):
            if backup.mode == "full":
                return backup
        return None

    def image_path(self, record: BackupRecord) -> str:
        return os.path.join(self.path, record.file)

    def new_id(self, mode: str) -> str:
        base = time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()) + mode
        taken = {b.id for b in self.backups}
        backup_id, n = base, 1
        while (
            backup_id in taken
            or os.path.exists(os.path.join(self.path, backup_id + ".qcow2"))
            or os.path.exists(os.path.join(self.path, f".{backup_id}.qcow2.partial"))
        ):
            n += 1
            backup_id = f"{base}-{n}"
        return backup_id


class Repository:
    def __init__(self, root: str) -> None:
        self.root = root

    def chain_path(self, export: str) -> str:
        return os.path.join(self.root, quote(export, safe="") or "%")

    def chain(self, export: str) -> Chain:
        return Chain.load(self.chain_path(export), export)

    def chains(self) -> list[Chain]:
        """Every chain in the repository."""
        if not os.path.isdir(self.root):
            raise RepositoryError(f"{self.root}: no such repository")
        out = []
        for entry in sorted(os.listdir(self.root)):
            manifest = os.path.join(self.root, entry, MANIFEST)
            if os.path.isfile(manifest):
                with open(manifest, encoding="utf-8") as f:
                    export = json.load(f).get("export", entry)
                out.append(Chain.load(os.path.join(self.root, entry), export))
        return out


def write_atomically(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_directory(os.path.dirname(path) or ".")


def write_hashes(path: str, hashes: ClusterHashes) -> None:
    """Cluster hashes and their algorithm, compact: json's C encoder (no ``indent``)
    keeps a 4 GiB full's 65,536 entries to milliseconds."""
    data = {"algorithm": hashes.algorithm, "clusters": hashes}
    write_atomically(path, json.dumps(data, separators=(",", ":")).encode())


def read_hashes(path: str, backup_id: str) -> ClusterHashes:
    """What ``write_hashes`` wrote; a bare object of hashes is the first format's."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise RepositoryError(
            f"{path}: missing: the cluster hashes of backup {backup_id}"
        ) from None
    except (OSError, ValueError) as err:
        raise RepositoryError(f"{path}: cannot read the cluster hashes: {err}") from None
    if not isinstance(data, dict):
        raise RepositoryError(f"{path}: the cluster hashes are not a JSON object")
    if "algorithm" not in data:
        return ClusterHashes(LEGACY_ALGORITHM, data)
    clusters = data.get("clusters")
    if not isinstance(clusters, dict):
        raise RepositoryError(f"{path}: the cluster hashes are not a JSON object")
    try:
        return ClusterHashes(data["algorithm"], clusters)
    except UnknownHashAlgorithm as err:
        raise RepositoryError(f"{path}: {err}") from None


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def utc_now() -> str:
    """The time as ISO 8601 in UTC, to the second (``time``: ``datetime`` takes 1 ms to
    import, a hundredth of an incremental backup)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
