"""Restore a restore point of a chain to a raw or qcow2 file, or onto an NBD export.

The manifest, not the backing-file names inside the images, says which images make up a
restore point (``Chain.lineage``). Each image is read alone and, cluster by cluster, the
newest image that holds a cluster (as data or as a zero cluster) decides its content.
Reading this way keeps a restore correct at every instant of a merge, whose merged image
holds every cluster of the images it replaces, and leaves checking the backing-file
names to ``verify``.

File targets are written to a temporary file beside the target, synced, then put in place
in one step (``link`` when the target must not exist, ``rename`` with ``--force``): a
failed or interrupted restore never leaves something that looks like a finished one. An
NBD target may hold anything, so every range the restore point says is zero is zeroed
there (WRITE_ZEROES), not skipped.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from nbdtrack.backup.progress import Progress
from nbdtrack.backup.qcow2 import (
    BDRV_SECTOR_SIZE,
    L1E_SIZE,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    QCOW2_HEADER_V2,
    ClusterState,
    InvalidImage,
    Qcow2Reader,
    Qcow2Writer,
)
from nbdtrack.backup.repository import (
    BackupRecord,
    Chain,
    Repository,
    RepositoryError,
    fsync_directory,
)
from nbdtrack.backup.zeros import is_zero
from nbdtrack.client import NBDClient, connect, parse_uri

MiB = 1024 * 1024
CHUNK = 4 * MiB  # one read from the images, one NBD request at most
ZERO_CHUNK = 1 << 30  # one WRITE_ZEROES at most (compact requests carry 32-bit lengths)
MAX_IN_FLIGHT = 8
FORMATS = ("raw", "qcow2")

# ChainView.owner values below 0; 0..n-1 name the image in ``records`` holding data.
UNALLOCATED = -1  # no image of the restore point holds the cluster: it reads as zeros
ZERO = -2  # the newest image holding the cluster holds it as a zero cluster


class RestoreError(Exception):
    """The restore cannot be done; the message says why, in one line."""


def round_up(n: int, d: int) -> int:
    return -(-n // d) * d


def select_chain(root: str, export: str | None) -> Chain:
    """The chain of ``export``; without a name, the repository's only chain."""
    try:
        chains = Repository(root).chains()
    except ValueError as err:  # a manifest that is not JSON
        raise RepositoryError(f"{root}: cannot read a manifest: {err}") from None
    names = ", ".join(c.export or "''" for c in chains)
    if export is not None:
        for chain in chains:
            if chain.export == export:
                return chain
        if not chains:
            raise RepositoryError(f"{root}: the repository holds no backup")
        raise RepositoryError(f"{root}: no backups of export '{export}' (it holds: {names})")
    if not chains:
        raise RepositoryError(f"{root}: the repository holds no backup")
    if len(chains) > 1:
        raise RepositoryError(
            f"{root}: the repository holds several exports ({names}): choose one with --export"
        )
    return chains[0]


def tables_misfit(path: str) -> str | None:
    """Why the L1 or refcount table the header points to cannot be inside the file, if
    so: a flipped high bit in a table size must be one error line, not an attempt to
    read gigabytes (Qcow2Reader reads the L1 table before checking its size)."""
    with open(path, "rb") as f:
        raw = f.read(QCOW2_HEADER_V2.size)
        file_size = os.fstat(f.fileno()).st_size
    if len(raw) < QCOW2_HEADER_V2.size:
        return None  # the reader says what is wrong
    fields = QCOW2_HEADER_V2.unpack(raw)
    cluster_bits, l1_size, l1_offset = fields[4], fields[7], fields[8]
    reftable_offset, reftable_clusters = fields[9], fields[10]
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        return None
    if l1_offset + l1_size * L1E_SIZE > file_size:
        return f"L1 table of {l1_size} entries at {l1_offset:#x} ends past the file"
    if reftable_offset + (reftable_clusters << cluster_bits) > file_size:
        return (
            f"refcount table of {reftable_clusters} clusters at {reftable_offset:#x} ends "
            f"past the file"
        )
    return None


def open_image(path: str) -> Qcow2Reader:
    """Qcow2Reader.open, after checking that the header's tables fit in the file."""
    misfit = tables_misfit(path)
    if misfit:
        raise InvalidImage(f"{path}: {misfit}")
    return Qcow2Reader.open(path)


class ChainView:
    """One restore point: which image holds each cluster, and its bytes.

    ``owner[i]`` is the index in ``records`` of the image whose data cluster ``i`` is,
    or ZERO / UNALLOCATED. Images are opened read-only and read alone (never through
    their backing file).
    """

    def __init__(self, chain: Chain, records: list[BackupRecord]) -> None:
        self.chain = chain
        self.records = records
        self.readers: list[Qcow2Reader] = []
        try:
            for record in records:
                path = chain.image_path(record)
                try:
                    self.readers.append(open_image(path))
                except FileNotFoundError:
                    raise RestoreError(
                        f"{path}: the image of backup '{record.id}' is missing"
                    ) from None
            top = self.readers[-1]
            self.cluster_size = top.cluster_size
            self.virtual_size = top.virtual_size
            self.size = records[-1].export_size
            if self.size > self.virtual_size:
                raise RestoreError(
                    f"{top.path}: virtual size {self.virtual_size} is smaller than the "
                    f"export size {self.size} the manifest records"
                )
            clusters = -(-self.virtual_size // self.cluster_size)
            self.owner = array("i", [UNALLOCATED]) * clusters
            for index, reader in enumerate(self.readers):
                if (reader.cluster_size, reader.virtual_size) != (
                    self.cluster_size,
                    self.virtual_size,
                ):
                    raise RestoreError(
                        f"{reader.path}: cluster size {reader.cluster_size} and virtual size "
                        f"{reader.virtual_size} differ from the restore point's "
                        f"({self.cluster_size}, {self.virtual_size})"
                    )
                for cluster in reader.allocation():
                    self.owner[cluster.index] = (
                        index if cluster.state is ClusterState.DATA else ZERO
                    )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.readers = []

    def __enter__(self) -> ChainView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def runs(self, limit: int | None = None) -> Iterator[tuple[int, int, int]]:
        """(offset, length, owner) runs of one owner covering [0, limit), in order;
        ``limit`` defaults to the export size."""
        limit = self.size if limit is None else limit
        cs = self.cluster_size
        owner = self.owner
        count = -(-limit // cs)
        index = 0
        while index < count:
            current = owner[index]
            end = index + 1
            while end < count and owner[end] == current:
                end += 1
            offset = index * cs
            yield offset, min(end * cs, limit) - offset, current
            index = end

    def data_bytes(self, limit: int | None = None) -> int:
        return sum(n for _, n, who in self.runs(limit) if who >= 0)

    def read(self, offset: int, length: int) -> bytes:
        """The restore point's bytes (within the virtual size)."""
        if offset < 0 or offset + length > self.virtual_size:
            raise ValueError(f"read {offset}+{length} outside {self.virtual_size}")
        cs = self.cluster_size
        parts = []
        pos, end = offset, offset + length
        while pos < end:
            index = pos // cs
            who = self.owner[index]
            stop = index + 1
            last = (end - 1) // cs
            while stop <= last and self.owner[stop] == who:
                stop += 1
            n = min(stop * cs, end) - pos
            parts.append(self.readers[who].read(pos, n) if who >= 0 else bytes(n))
            pos += n
        return b"".join(parts)

    def chunks(self, limit: int | None = None) -> Iterator[tuple[int, int, int]]:
        """``runs`` cut into pieces of at most CHUNK bytes (cluster aligned)."""
        for offset, length, who in self.runs(limit):
            step = CHUNK if who >= 0 else ZERO_CHUNK
            for start in range(offset, offset + length, step):
                yield start, min(step, offset + length - start), who


def open_view(chain: Chain, until: str | None = None) -> ChainView:
    """The restore point ``until`` (default: the newest backup) of ``chain``."""
    return ChainView(chain, chain.lineage(until))


def nonzero_pieces(data: bytes, offset: int, cs: int) -> Iterator[tuple[int, memoryview]]:
    """Runs of clusters of ``data`` (at ``offset``, cluster aligned) that are not all
    zeros: what a sparse target needs written."""
    view = memoryview(data)
    start = None
    for pos in range(0, len(data), cs):
        piece = view[pos : pos + cs]
        if is_zero(piece):
            if start is not None:
                yield offset + start, view[start:pos]
                start = None
        elif start is None:
            start = pos
    if start is not None:
        yield offset + start, view[start:]


@dataclass
class RestoreResult:
    id: str
    target: str
    format: str  # raw | qcow2 | nbd
    size: int
    bytes_written: int = 0
    bytes_zeroed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def target_format(target: str, requested: str | None) -> str:
    """``--format`` if given, else qcow2 for a name ending in .qcow2, else raw."""
    if "://" in target:
        if requested is not None:
            raise RestoreError("--format applies to file targets, not to an NBD export")
        parse_uri(target)  # URIError: not a URI this client can use
        return "nbd"
    if requested is not None:
        if requested not in FORMATS:
            raise RestoreError(f"unknown format '{requested}': expected raw or qcow2")
        return requested
    return "qcow2" if target.endswith(".qcow2") else "raw"


def restore(
    root: str,
    target: str,
    *,
    export: str | None = None,
    until: str | None = None,
    fmt: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> RestoreResult:
    """Restore the newest restore point (or ``until``) of a chain to ``target``."""
    progress = progress or Progress()
    kind = target_format(target, fmt)
    chain = select_chain(root, export)
    if kind != "nbd":
        check_file_target(target, force)
    with open_view(chain, until) as view:
        result = RestoreResult(view.records[-1].id, target, kind, view.size)
        progress.start("restore", view.data_bytes())
        try:
            if kind == "nbd":
                asyncio.run(restore_to_nbd(view, target, result, progress))
            else:
                restore_to_file(view, target, kind, force, result, progress)
        finally:
            progress.finish()
    return result


def check_file_target(target: str, force: bool) -> None:
    """Refuse early what the final link/rename would refuse late."""
    if os.path.isdir(target):
        raise RestoreError(f"{target}: is a directory")
    if os.path.lexists(target):
        if not os.path.isfile(target):
            raise RestoreError(
                f"{target}: not a regular file; to restore onto a device, serve it with "
                f"'nbdtrack serve' and restore to its NBD URI"
            )
        if not force:
            raise RestoreError(f"{target}: exists; use --force to replace it")
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise RestoreError(f"{target}: no such directory {directory}")


def restore_to_file(
    view: ChainView,
    target: str,
    kind: str,
    force: bool,
    result: RestoreResult,
    progress: Progress,
) -> None:
    """Write a sparse raw file or a standalone qcow2 image next to ``target``, then
    put it in place."""
    directory = os.path.dirname(os.path.abspath(target))
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{secrets.token_hex(4)}.part")
    cs = view.cluster_size
    try:
        if kind == "qcow2":
            writer = Qcow2Writer.create(tmp, round_up(view.size, BDRV_SECTOR_SIZE), cluster_size=cs)
            try:
                for offset, length, who in view.chunks():
                    if who < 0:
                        continue  # a standalone image reads zeros where nothing is
                    for pos, piece in nonzero_pieces(
                        view.readers[who].read(offset, length), offset, cs
                    ):
                        writer.write(pos, piece)
                        result.bytes_written += len(piece)
                    progress.advance(length)
            except BaseException:
                writer.abort()
                raise
            writer.close()  # syncs
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                for offset, length, who in view.chunks():
                    if who < 0:
                        continue  # a hole
                    for pos, piece in nonzero_pieces(
                        view.readers[who].read(offset, length), offset, cs
                    ):
                        while piece:
                            n = os.pwrite(fd, piece, pos)
                            piece, pos = piece[n:], pos + n
                            result.bytes_written += n
                    progress.advance(length)
                os.ftruncate(fd, view.size)
                os.fsync(fd)
            finally:
                os.close(fd)
        place(tmp, target, force)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def place(tmp: str, target: str, force: bool) -> None:
    """Move the finished file to ``target``: never over an existing file unless forced."""
    if force:
        os.replace(tmp, target)
    else:
        try:
            os.link(tmp, target)  # fails if the target appeared meanwhile
        except FileExistsError:
            raise RestoreError(f"{target}: exists; use --force to replace it") from None
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            if os.path.lexists(target):  # no hard links here: check, then rename
                raise RestoreError(f"{target}: exists; use --force to replace it") from None
            os.rename(tmp, target)
        else:
            os.unlink(tmp)
    fsync_directory(os.path.dirname(os.path.abspath(target)))


async def restore_to_nbd(
    view: ChainView, uri: str, result: RestoreResult, progress: Progress
) -> None:
    """Write the data and zero everything else: the export may hold anything."""
    client = await connect(uri)
    try:
        if client.read_only:
            raise RestoreError(f"{uri}: the export is read-only")
        if client.size < view.size:
            raise RestoreError(
                f"{uri}: the export has {client.size} bytes, the backup needs {view.size}"
            )
        if client.size > view.size:
            progress.message(
                f"the target export is larger ({client.size} bytes): the bytes past "
                f"{view.size} are left as they are"
            )
        await _write_nbd(client, view, result, progress)
        if client.can_flush:
            await client.flush()
        await client.disconnect()
    finally:
        if not client.closed:
            await client.close()


async def _write_nbd(
    client: NBDClient, view: ChainView, result: RestoreResult, progress: Progress
) -> None:
    semaphore = asyncio.Semaphore(MAX_IN_FLIGHT)
    tasks: set[asyncio.Task] = set()
    failures: list[BaseException] = []
    max_write = max(client.block_size.maximum, 4096)

    async def request(offset: int, length: int, data: bytes | None) -> None:
        try:
            if data is not None:
                for pos in range(0, length, max_write):
                    await client.pwrite(memoryview(data)[pos : pos + max_write], offset + pos)
                result.bytes_written += length
                progress.advance(length)
            elif client.can_zero:
                await client.zero(offset, length)
                result.bytes_zeroed += length
            else:
                for pos in range(0, length, CHUNK):
                    n = min(CHUNK, length - pos)
                    await client.pwrite(bytes(n), offset + pos)
                result.bytes_zeroed += length
        except BaseException as err:
            failures.append(err)
        finally:
            semaphore.release()

    for offset, length, who in view.chunks():
        if failures:
            break
        data = view.readers[who].read(offset, length) if who >= 0 else None
        await semaphore.acquire()
        task = asyncio.create_task(request(offset, length, data))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    if failures:
        raise failures[0]


def describe(result: RestoreResult) -> str:
    """The line the CLI prints after a restore."""
    return (
        f"restored {result.id} to {result.target} ({result.format}, {result.size} bytes): "
        f"{result.bytes_written} bytes written, {result.bytes_zeroed} zeroed"
    )
