"""qcow2 images for the backup repository: a streaming writer and a reader.

This module owns the qcow2 on-disk format (QEMU's docs/interop/qcow2.txt) and nothing
else: it knows no NBD, no manifest and no policy about which clusters to copy. The backup
job feeds a ``Qcow2Writer`` with the extents it read; restore, verify and merge read
images, ours or qemu-img's, through a ``Qcow2Reader``.

Theory of operation of the writer. A backup image is written once, front to back:

- host cluster 0 is reserved for the header and left as a hole until ``close()``;
- data clusters are appended in the order the job writes them (host clusters 1, 2, ...);
- L2 tables live in memory, one per L1 entry that is touched (lazily: a 1 TiB image at
  64 KiB clusters needs at most 128 MiB of them, an incremental a handful);
- data appended at the end goes through an ``Appender`` (``appender.py``): gathered in
  reused buffers, written by a thread with ``O_DIRECT``, so a backup neither fills the
  page cache nor waits for the disk at ``close()``; anything else is written in place;
- ``close()`` appends the L2 tables, the L1 table, the refcount table and the refcount
  blocks, syncs, then writes the header and syncs again. Until the header is on disk the
  file has no magic, so a job that dies half way leaves a file no tool mistakes for an
  image, and a header on disk implies everything it points to is on disk too.

Every cluster the image references has refcount 1 (no snapshots, no sharing), so L1 and
data L2 entries carry QCOW_OFLAG_COPIED, which ``qemu-img check`` verifies.

Partial clusters. A cluster the writer has not allocated yet reads from the backing file,
whose content this module never reads. So a write or zero request that covers only part
of such a cluster is refused with ``PartialClusterError`` when the image has a backing
file; the caller must pass the whole cluster (read the rest from its source). Without a
backing file the rest of the cluster is zeros. Parts of clusters already written in this
image are updated in place. The last cluster of an image whose size is not a multiple of
the cluster size is "whole" once everything up to the virtual size is covered.

The reader supports what QEMU writes by default (versions 2 and 3, any refcount width, a
raw or qcow2 backing file) and refuses with ``UnsupportedImage`` what it does not
implement: compressed clusters, encryption, external data files, extended L2 entries and
unknown incompatible features.
"""

from __future__ import annotations

import enum
import heapq
import os
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from nbdtrack.backup.appender import Appender, pwrite_all

# --- Header (docs/interop/qcow2.txt "Header") ------------------------------------------
QCOW_MAGIC = b"QFI\xfb"
QCOW2_VERSION_2 = 2
QCOW2_VERSION_3 = 3
# magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
# crypt_method, l1_size, l1_table_offset, refcount_table_offset,
# refcount_table_clusters, nb_snapshots, snapshots_offset
QCOW2_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
# incompatible_features, compatible_features, autoclear_features, refcount_order,
# header_length
QCOW2_HEADER_V3 = struct.Struct(">QQQII")
QCOW2_HEADER_V2_LENGTH = QCOW2_HEADER_V2.size  # 72
QCOW2_HEADER_V3_MIN_LENGTH = QCOW2_HEADER_V2.size + QCOW2_HEADER_V3.size  # 104
# What we write: 104 plus the compression_type byte (0 = zlib) padded to 8, as QEMU does.
QCOW2_HEADER_LENGTH = 112
QCOW2_MAX_BACKING_FILE_NAME = 1023
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU's implementation limit (2 MiB)
QCOW_MAX_L1_SIZE = 32 * 1024 * 1024  # QEMU's limit on the L1 table, in bytes
BDRV_SECTOR_SIZE = 512  # QEMU truncates virtual sizes to a multiple of this on open

# crypt_method
QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_CRYPT_LUKS = 2

# incompatible_features bits
QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_NAMES = {
    QCOW2_INCOMPAT_DIRTY: "dirty",
    QCOW2_INCOMPAT_CORRUPT: "corrupt",
    QCOW2_INCOMPAT_DATA_FILE: "external data file",
    QCOW2_INCOMPAT_COMPRESSION: "compression type",
    QCOW2_INCOMPAT_EXTL2: "extended L2 entries",
}
# The dirty bit only says refcounts may be stale; reading never looks at refcounts.
READER_INCOMPAT_OK = QCOW2_INCOMPAT_DIRTY

# refcount_order: 16-bit refcounts, the only width we write (and v2's implied width).
REFCOUNT_ORDER = 4

# --- Header extensions ("Header extensions") -------------------------------------------
QCOW2_EXT_MAGIC_END = 0x00000000
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441
QCOW2_EXT_HEADER = struct.Struct(">II")  # type, length

# --- Table entries ("Host cluster management", "Cluster mapping") ----------------------
QCOW_OFLAG_COPIED = 1 << 63  # refcount is exactly one (L1 and L2 entries)
QCOW_OFLAG_COMPRESSED = 1 << 62  # L2 entry describes a compressed cluster
QCOW_OFLAG_ZERO = 1 << 0  # standard cluster descriptor: reads as zeros (v3)
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00  # bits 9-63
L1E_RESERVED_MASK = 0x7F000000000001FF  # bits 0-8 and 56-62
L2E_STD_RESERVED_MASK = 0x3F000000000001FE  # bits 1-8 and 56-61
L1E_SIZE = L2E_SIZE = REFTABLE_ENTRY_SIZE = 8

_BIG_ENDIAN_HOST = sys.byteorder == "big"


# --- Errors ----------------------------------------------------------------------------
class Qcow2Error(Exception):
    """Base of every error this module raises about an image."""


class InvalidImage(Qcow2Error):
    """The file is not a qcow2 image, or its metadata contradicts the format."""


class UnsupportedImage(Qcow2Error):
    """A valid qcow2 image that uses a feature this module does not implement."""


class PartialClusterError(Qcow2Error, ValueError):
    """A request covers part of a cluster whose other part lives in the backing file."""


# --- Shared types ----------------------------------------------------------------------
class ClusterState(enum.Enum):
    """What a guest cluster is in one image, before looking at the backing file."""

    DATA = "data"  # stored in this image at a host offset
    ZERO = "zero"  # reads as zeros; the backing file is not consulted
    UNALLOCATED = "unallocated"  # reads from the backing file (zeros without one)


class Cluster(NamedTuple):
    """One guest cluster: its index, its state and (DATA only) its host offset."""

    index: int
    state: ClusterState
    host_offset: int | None


class Extent(NamedTuple):
    """A run of guest bytes with one state; DATA runs are contiguous in the file too."""

    start: int
    length: int
    state: ClusterState
    host_offset: int | None


def _div_round_up(n: int, d: int) -> int:
    return -(-n // d)


def _to_big_endian(table: array) -> bytes:
    """Tables are kept as native arrays for speed and stored big-endian, as qcow2 wants."""
    if _BIG_ENDIAN_HOST:
        return table.tobytes()
    swapped = array(table.typecode, table)
    swapped.byteswap()
    return swapped.tobytes()


def _from_big_endian(typecode: str, raw: bytes) -> array:
    table = array(typecode, raw)
    if not _BIG_ENDIAN_HOST:
        table.byteswap()
    return table


def _check_cluster_size(cluster_size: int) -> int:
    """Return cluster_bits, or raise: qcow2 clusters are powers of two, 512 B to 2 MiB."""
    bits = cluster_size.bit_length() - 1
    if cluster_size <= 0 or 1 << bits != cluster_size:
        raise ValueError(f"cluster size {cluster_size} is not a power of two")
    if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise ValueError(
            f"cluster size {cluster_size} outside {1 << MIN_CLUSTER_BITS}..{1 << MAX_CLUSTER_BITS}"
        )
    return bits


def _pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    chunks = []
    while length:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            raise InvalidImage(f"{what}: file ends at {offset}, {length} bytes short")
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# --- Writer ----------------------------------------------------------------------------
class Qcow2Writer:
    """Writes a new qcow2 v3 image in one pass; the image is valid only after close()."""

    def __init__(
        self,
        fd: int,
        path: str,
        virtual_size: int,
        cluster_size: int,
        backing_file: str | None,
        backing_format: str | None,
    ) -> None:
        self._fd = fd
        self.path = path
        self.virtual_size = virtual_size
        self.cluster_size = cluster_size
        self.backing_file = backing_file
        self.backing_format = backing_format
        self._cluster_bits = cluster_size.bit_length() - 1
        self._l2_entries = cluster_size // L2E_SIZE
        self._clusters = _div_round_up(virtual_size, cluster_size)
        self.l1_size = _div_round_up(self._clusters, self._l2_entries)
        self._l2: dict[int, array] = {}  # l1 index -> L2 table (native 'Q' array)
        self._next_cluster = 1  # host cluster 0 is the header
        self._free: list[int] = []  # heap of host offsets released by write_zeroes
        self._changed: set[int] = set()  # guest clusters whose L2 entry changed: see sync()
        self._closed = False
        self._build_header_cluster(0, 0, 0)  # raises if the backing name does not fit
        self._appender = Appender(fd, path, self._next_cluster * cluster_size)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        virtual_size: int,
        *,
        cluster_size: int = 65536,
        backing_file: str | None = None,
        backing_format: str = "qcow2",
    ) -> Qcow2Writer:
        """Create a new image file; refuses to replace an existing file (a repository
        never rewrites a backup in place). ``backing_file`` is stored as given, so a
        relative name resolves against the image's directory, as QEMU does."""
        _check_cluster_size(cluster_size)
        if virtual_size < 0 or virtual_size % BDRV_SECTOR_SIZE:
            # QEMU truncates such a size on open; round the export size up instead.
            raise ValueError(f"virtual size {virtual_size} is not a multiple of {BDRV_SECTOR_SIZE}")
        clusters = _div_round_up(virtual_size, cluster_size)
        l1_size = _div_round_up(clusters, cluster_size // L2E_SIZE)
        if l1_size * L1E_SIZE > QCOW_MAX_L1_SIZE:
            raise ValueError(
                f"virtual size {virtual_size} needs an L1 table larger than QEMU's "
                f"{QCOW_MAX_L1_SIZE} bytes; use a larger cluster size"
            )
        if backing_file is not None:
            name = backing_file.encode()
            if not name or len(name) > QCOW2_MAX_BACKING_FILE_NAME:
                raise ValueError(
                    f"backing file name must be 1..{QCOW2_MAX_BACKING_FILE_NAME} bytes"
                )
            if ":" in backing_file.split("/", 1)[0]:
                # QEMU would take "proto:..." for a protocol, not a file name.
                raise ValueError(f"backing file name {backing_file!r} has a colon before '/'")
            if not backing_format or not backing_format.isascii():
                raise ValueError(f"bad backing format {backing_format!r}")
        path = os.fspath(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            # Building the header now rejects a backing name that does not fit cluster 0.
            return cls(
                fd,
                path,
                virtual_size,
                cluster_size,
                backing_file,
                backing_format if backing_file is not None else None,
            )
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise

    # -- requests

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store guest data at ``offset``; see the module docstring for partial clusters."""
        view = memoryview(data).cast("B")
        length = len(view)
        self._check_request(offset, length)
        if not length:
            return
        self._check_partial(offset, length)
        cs = self.cluster_size
        pending_host = pending_pos = pending_len = 0  # one pwrite per contiguous run
        pos = 0
        while pos < length:
            guest = offset + pos
            index = guest // cs
            within = guest - index * cs
            cluster_len = min(cs, self.virtual_size - index * cs)
            n = min(cluster_len - within, length - pos)
            entry = self._entry(index)
            host = entry & L2E_OFFSET_MASK
            if host and not entry & QCOW_OFLAG_ZERO:
                target = host + within
                chunk: memoryview | bytearray = view[pos : pos + n]
            else:
                host = self._allocate()
                self._set_entry(index, host | QCOW_OFLAG_COPIED)
                target = host
                if n == cs:
                    chunk = view[pos : pos + n]
                else:
                    # A new cluster is written in full: its rest reads as zeros (no backing,
                    # a zero cluster, or past the virtual size), and a reused host cluster
                    # must not show what it held before.
                    chunk = bytearray(cs)
                    chunk[within : within + n] = view[pos : pos + n]
            if (
                pending_len
                and isinstance(chunk, memoryview)
                and pending_host + pending_len == target
                and pending_pos + pending_len == pos
            ):
                pending_len += n
            else:
                if pending_len:
                    self._store(pending_host, view[pending_pos : pending_pos + pending_len])
                    pending_len = 0
                if isinstance(chunk, memoryview):
                    pending_host, pending_pos, pending_len = target, pos, n
                else:
                    self._store(target, chunk)
            pos += n
        if pending_len:
            self._store(pending_host, view[pending_pos : pending_pos + pending_len])

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeros: whole clusters become zero clusters (no data, the
        backing file hidden); parts of clusters written here are zeroed in place."""
        self._check_request(offset, length)
        if not length:
            return
        self._check_partial(offset, length)
        cs = self.cluster_size
        end = offset + length
        first = offset // cs
        last = (end - 1) // cs
        if offset % cs:
            self._zero_partial(first, offset - first * cs, min(end, (first + 1) * cs) - offset)
            first += 1
        if first <= last and end < min((last + 1) * cs, self.virtual_size):
            self._zero_partial(last, 0, end - last * cs)
            last -= 1
        index = first
        while index <= last:
            l1_index, l2_index = divmod(index, self._l2_entries)
            stop = min(last + 1 - l1_index * self._l2_entries, self._l2_entries)
            table = self._l2.get(l1_index)
            if table is None:
                table = self._l2[l1_index] = array("Q", bytes(cs))
            else:
                for i in range(l2_index, stop):
                    entry = table[i]
                    if entry & L2E_OFFSET_MASK and not entry & QCOW_OFLAG_ZERO:
                        heapq.heappush(self._free, entry & L2E_OFFSET_MASK)
            table[l2_index:stop] = array("Q", [QCOW_OFLAG_ZERO]) * (stop - l2_index)
            self._changed.update(range(index, l1_index * self._l2_entries + stop))
            index = l1_index * self._l2_entries + stop

    def _zero_partial(self, index: int, within: int, n: int) -> None:
        entry = self._entry(index)
        if entry & L2E_OFFSET_MASK and not entry & QCOW_OFLAG_ZERO:
            self._store((entry & L2E_OFFSET_MASK) + within, bytes(n))
        # Zero and (no backing file) unallocated clusters already read as zeros.

    def _check_request(self, offset: int, length: int) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError(
                f"{self.path}: request {offset}+{length} outside virtual size {self.virtual_size}"
            )

    def _check_partial(self, offset: int, length: int) -> None:
        """Refuse before changing anything: only the first and last cluster can be partial."""
        if self.backing_file is None:
            return
        cs = self.cluster_size
        end = offset + length
        for index in {offset // cs, (end - 1) // cs}:
            start = index * cs
            whole = offset <= start and end >= min(start + cs, self.virtual_size)
            if not whole and not self._entry(index):
                raise PartialClusterError(
                    f"{self.path}: request {offset}+{length} covers part of cluster {index} "
                    f"({start}+{cs}), which is not in this image and reads from the backing "
                    f"file; pass the whole cluster"
                )

    # -- tables

    def _entry(self, index: int) -> int:
        l1_index, l2_index = divmod(index, self._l2_entries)
        table = self._l2.get(l1_index)
        return table[l2_index] if table is not None else 0

    def _set_entry(self, index: int, entry: int) -> None:
        l1_index, l2_index = divmod(index, self._l2_entries)
        table = self._l2.get(l1_index)
        if table is None:
            table = self._l2[l1_index] = array("Q", bytes(self.cluster_size))
        table[l2_index] = entry
        self._changed.add(index)

    def _allocate(self) -> int:
        """A host cluster for data: a released one first, else the next at the end."""
        if self._free:
            return heapq.heappop(self._free)
        host = self._next_cluster * self.cluster_size
        self._next_cluster += 1
        return host

    def _store(self, host: int, data: bytes | bytearray | memoryview) -> None:
        """Write at a host offset: appended behind the caller at the end, else in place."""
        if host == self._appender.end:
            self._appender.append(data)
        else:
            self._appender.flush()  # what is in place must not be overtaken by older data
            pwrite_all(self._fd, data, host)

    # -- resuming an unfinished image

    def sync(self) -> list[tuple[int, int]]:
        """Make the data written so far durable; returns the (guest cluster, L2 entry)
        pairs set since the last call. A caller that stores them durably can ``resume``
        this image after a crash: the image itself has no metadata until close()."""
        self._appender.flush()
        os.fdatasync(self._fd)
        changed = sorted(self._changed)
        self._changed.clear()
        return [(index, self._entry(index)) for index in changed]

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike[str],
        virtual_size: int,
        entries: Iterable[tuple[int, int]],
        *,
        cluster_size: int = 65536,
        backing_file: str | None = None,
        backing_format: str = "qcow2",
    ) -> Qcow2Writer:
        """Reopen an unfinished image with the entries ``sync`` returned before.

        Host clusters no entry refers to (written after the last sync) are reused.
        """
        path = os.fspath(path)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            writer = cls(
                fd,
                path,
                virtual_size,
                cluster_size,
                backing_file,
                backing_format if backing_file is not None else None,
            )
            used = set()
            for index, entry in entries:
                if not 0 <= index < writer._clusters:
                    raise InvalidImage(f"{path}: resumed entry for cluster {index} out of range")
                writer._set_entry(index, entry)
                if entry & L2E_OFFSET_MASK and not entry & QCOW_OFLAG_ZERO:
                    used.add(entry & L2E_OFFSET_MASK)
            end = _div_round_up(os.fstat(fd).st_size, cluster_size)
            end = max(end, 1 + max(used, default=0) // cluster_size)
            writer._next_cluster = max(1, end)
            writer._appender.end = writer._next_cluster * cluster_size
            writer._free = [
                h * cluster_size for h in range(1, end) if h * cluster_size not in used
            ]
            heapq.heapify(writer._free)
            writer._changed.clear()
            return writer
        except BaseException:
            os.close(fd)
            raise

    def read_cluster(self, index: int) -> bytes | None:
        """The data this image holds for a guest cluster, None for zero or unallocated."""
        entry = self._entry(index)
        if not entry & L2E_OFFSET_MASK or entry & QCOW_OFLAG_ZERO:
            return None
        length = min(self.cluster_size, self.virtual_size - index * self.cluster_size)
        self._appender.flush()
        return os.pread(self._fd, length, entry & L2E_OFFSET_MASK)

    def state(self, index: int) -> ClusterState:
        entry = self._entry(index)
        if entry & QCOW_OFLAG_ZERO:
            return ClusterState.ZERO
        return ClusterState.DATA if entry & L2E_OFFSET_MASK else ClusterState.UNALLOCATED

    # -- finishing

    def close(self) -> None:
        """Write the metadata and the header, sync, close. The image is valid after this."""
        if self._closed:
            return
        self._closed = True
        try:
            self._appender.flush()
            self._write_metadata()
        finally:
            self._appender.close()
            os.close(self._fd)

    def abort(self) -> None:
        """Give up: close and remove the file, which never got a header."""
        if not self._closed:
            self._closed = True
            self._appender.close()
            os.close(self._fd)
            os.unlink(self.path)

    def __enter__(self) -> Qcow2Writer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # A job that failed half way must not leave something that looks like a backup.
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _write_metadata(self) -> None:
        cs = self.cluster_size
        next_cluster = self._next_cluster
        l1_indexes = sorted(self._l2)
        l2_offsets = {i: (next_cluster + n) * cs for n, i in enumerate(l1_indexes)}
        next_cluster += len(l1_indexes)
        l1_clusters = _div_round_up(self.l1_size * L1E_SIZE, cs)
        l1_table_offset = next_cluster * cs if self.l1_size else 0
        next_cluster += l1_clusters

        # The refcount structures count themselves: grow them until they cover the file.
        refcount_block_entries = cs * 8 // (1 << REFCOUNT_ORDER)
        reftable_entries_per_cluster = cs // REFTABLE_ENTRY_SIZE
        blocks = reftable_clusters = 0
        while True:
            total = next_cluster + reftable_clusters + blocks
            need_blocks = _div_round_up(total, refcount_block_entries)
            need_reftable = _div_round_up(need_blocks, reftable_entries_per_cluster)
            if (need_blocks, need_reftable) == (blocks, reftable_clusters):
                break
            blocks, reftable_clusters = need_blocks, need_reftable
        refcount_table_offset = next_cluster * cs
        first_block = next_cluster + reftable_clusters

        for l1_index in l1_indexes:
            pwrite_all(self._fd, _to_big_endian(self._l2[l1_index]), l2_offsets[l1_index])

        if self.l1_size:
            l1 = array("Q", bytes(l1_clusters * cs))
            for l1_index in l1_indexes:
                l1[l1_index] = l2_offsets[l1_index] | QCOW_OFLAG_COPIED
            pwrite_all(self._fd, _to_big_endian(l1), l1_table_offset)

        reftable = array("Q", bytes(reftable_clusters * cs))
        for n in range(blocks):
            reftable[n] = (first_block + n) * cs
        pwrite_all(self._fd, _to_big_endian(reftable), refcount_table_offset)

        # Every cluster up to the end is referenced once, except data clusters that
        # write_zeroes released and no later write reused: those stay free (refcount 0).
        refcounts = array("H", [1]) * total + array(
            "H", bytes(2 * (blocks * refcount_block_entries - total))
        )
        for host in self._free:
            refcounts[host // cs] = 0
        pwrite_all(self._fd, _to_big_endian(refcounts), first_block * cs)

        os.fsync(self._fd)
        header = self._build_header_cluster(
            l1_table_offset, refcount_table_offset, reftable_clusters
        )
        pwrite_all(self._fd, header, 0)
        os.fsync(self._fd)

    def _build_header_cluster(
        self, l1_table_offset: int, refcount_table_offset: int, refcount_table_clusters: int
    ) -> bytes:
        """Header, header extensions, then the backing file name, all in cluster 0."""
        extensions = b""
        name = b""
        if self.backing_file is not None:
            fmt = self.backing_format.encode() if self.backing_format else b""
            extensions += QCOW2_EXT_HEADER.pack(QCOW2_EXT_MAGIC_BACKING_FORMAT, len(fmt))
            extensions += fmt + bytes(-len(fmt) % 8)
            name = self.backing_file.encode()
        extensions += QCOW2_EXT_HEADER.pack(QCOW2_EXT_MAGIC_END, 0)
        backing_file_offset = QCOW2_HEADER_LENGTH + len(extensions) if name else 0
        header = QCOW2_HEADER_V2.pack(
            QCOW_MAGIC,
            QCOW2_VERSION_3,
            backing_file_offset,
            len(name),
            self._cluster_bits,
            self.virtual_size,
            QCOW_CRYPT_NONE,
            self.l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            0,  # nb_snapshots
            0,  # snapshots_offset
        ) + QCOW2_HEADER_V3.pack(0, 0, 0, REFCOUNT_ORDER, QCOW2_HEADER_LENGTH)
        header += bytes(QCOW2_HEADER_LENGTH - len(header))  # compression_type 0 + padding
        cluster = header + extensions + name
        if len(cluster) > self.cluster_size:
            raise ValueError(
                f"backing file name {self.backing_file!r} does not fit in the first "
                f"cluster of {self.cluster_size} bytes"
            )
        return cluster + bytes(self.cluster_size - len(cluster))


# --- Reader ----------------------------------------------------------------------------
class Qcow2Reader:
    """Reads one qcow2 image (its active L1 table), and its backing chain on request.

    L1 and L2 tables are loaded and validated at open, so an image with compressed
    clusters or broken table entries is refused up front, not half way through a restore.
    """

    def __init__(self, fd: int, path: str, _seen: frozenset[str] = frozenset()) -> None:
        self._fd = fd
        self.path = path
        self._seen = _seen | {os.path.realpath(path)}
        self._backing: Qcow2Reader | RawImage | None = None
        self._file_size = os.fstat(fd).st_size
        self._parse_header()
        self._load_tables()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Qcow2Reader:
        """Open an image read-only; raises InvalidImage or UnsupportedImage."""
        return cls._open(os.fspath(path), frozenset())

    @classmethod
    def _open(cls, path: str, seen: frozenset[str]) -> Qcow2Reader:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return cls(fd, path, seen)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Close this image and any backing image it opened."""
        if self._backing is not None:
            self._backing.close()
            self._backing = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Qcow2Reader:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    # -- parsing

    def _parse_header(self) -> None:
        raw = os.pread(self._fd, QCOW2_HEADER_V2_LENGTH, 0)
        if len(raw) < QCOW2_HEADER_V2_LENGTH or raw[:4] != QCOW_MAGIC:
            raise InvalidImage(f"{self.path}: not a qcow2 image (no QFI\\xfb magic)")
        (
            _,
            self.version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            self.virtual_size,
            crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            _,
        ) = QCOW2_HEADER_V2.unpack(raw)
        if self.version not in (QCOW2_VERSION_2, QCOW2_VERSION_3):
            raise UnsupportedImage(f"{self.path}: qcow2 version {self.version}")
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise InvalidImage(f"{self.path}: cluster_bits {cluster_bits} out of range")
        self.cluster_size = 1 << cluster_bits
        if crypt_method != QCOW_CRYPT_NONE:
            raise UnsupportedImage(f"{self.path}: encrypted image (crypt_method {crypt_method})")
        self.incompatible_features = self.compatible_features = self.autoclear_features = 0
        self.refcount_order = REFCOUNT_ORDER
        self.header_length = QCOW2_HEADER_V2_LENGTH
        if self.version >= QCOW2_VERSION_3:
            raw = _pread_exact(
                self._fd, QCOW2_HEADER_V3.size, QCOW2_HEADER_V2_LENGTH, f"{self.path}: header"
            )
            (
                self.incompatible_features,
                self.compatible_features,
                self.autoclear_features,
                self.refcount_order,
                self.header_length,
            ) = QCOW2_HEADER_V3.unpack(raw)
            if (
                self.header_length < QCOW2_HEADER_V3_MIN_LENGTH
                or self.header_length % 8
                or self.header_length > self.cluster_size
            ):
                raise InvalidImage(f"{self.path}: bad header_length {self.header_length}")
        unsupported = self.incompatible_features & ~READER_INCOMPAT_OK
        if unsupported:
            names = [
                INCOMPAT_NAMES.get(1 << bit, f"unknown bit {bit}")
                for bit in range(64)
                if unsupported >> bit & 1
            ]
            raise UnsupportedImage(
                f"{self.path}: incompatible features not supported: {', '.join(names)}"
            )
        if self.refcount_order > 6:
            raise InvalidImage(f"{self.path}: refcount_order {self.refcount_order} > 6")

        self.backing_format: str | None = None
        self._parse_extensions(backing_file_offset or self.cluster_size)
        self.backing_file: str | None = None
        if backing_file_offset:
            if backing_file_size > QCOW2_MAX_BACKING_FILE_NAME:
                raise InvalidImage(f"{self.path}: backing file name of {backing_file_size} bytes")
            name = _pread_exact(
                self._fd, backing_file_size, backing_file_offset, f"{self.path}: backing file name"
            )
            self.backing_file = name.decode(errors="surrogateescape")

        self._l2_entries = self.cluster_size // L2E_SIZE
        self._clusters = _div_round_up(self.virtual_size, self.cluster_size)
        if self.l1_size < _div_round_up(self._clusters, self._l2_entries):
            raise InvalidImage(
                f"{self.path}: L1 table of {self.l1_size} entries too small for "
                f"{self.virtual_size} bytes"
            )
        if self.l1_table_offset % self.cluster_size:
            raise InvalidImage(f"{self.path}: L1 table offset {self.l1_table_offset:#x} unaligned")
        if self.l1_size * L1E_SIZE > QCOW_MAX_L1_SIZE:
            raise InvalidImage(f"{self.path}: L1 table of {self.l1_size} entries is too large")
        if self.l1_table_offset + self.l1_size * L1E_SIZE > self._file_size:
            raise InvalidImage(f"{self.path}: L1 table ends past the end of the file")

    def _parse_extensions(self, limit: int) -> None:
        """Extensions end at the end marker, or where the backing file name starts."""
        offset = self.header_length
        limit = min(limit, self.cluster_size)
        while offset + QCOW2_EXT_HEADER.size <= limit:
            raw = _pread_exact(
                self._fd, QCOW2_EXT_HEADER.size, offset, f"{self.path}: header extension"
            )
            ext_type, ext_length = QCOW2_EXT_HEADER.unpack(raw)
            if ext_type == QCOW2_EXT_MAGIC_END:
                return
            offset += QCOW2_EXT_HEADER.size
            if offset + ext_length > limit:
                raise InvalidImage(
                    f"{self.path}: header extension {ext_type:#x} overruns the first cluster"
                )
            data = _pread_exact(self._fd, ext_length, offset, f"{self.path}: header extension")
            if ext_type == QCOW2_EXT_MAGIC_BACKING_FORMAT:
                self.backing_format = data.decode(errors="replace")
            elif ext_type == QCOW2_EXT_MAGIC_DATA_FILE:
                raise UnsupportedImage(f"{self.path}: external data file")
            offset += ext_length + (-ext_length % 8)

    def _load_tables(self) -> None:
        cs = self.cluster_size
        bad = QCOW_OFLAG_COMPRESSED | L2E_STD_RESERVED_MASK | ((cs - 1) & ~QCOW_OFLAG_ZERO)
        if self.version < QCOW2_VERSION_3:
            bad |= QCOW_OFLAG_ZERO  # version 2 has no zero clusters: bit 0 is reserved
        self._l2_bad_bits = bad
        # Per byte of a big-endian entry: the byte values to drop because they are fine.
        self._l2_scan = []
        for byte in range(L2E_SIZE):
            mask = bad >> (8 * (L2E_SIZE - 1 - byte)) & 0xFF
            if mask:
                self._l2_scan.append((byte, bytes(b for b in range(256) if not b & mask)))
        raw = _pread_exact(
            self._fd, self.l1_size * L1E_SIZE, self.l1_table_offset, f"{self.path}: L1 table"
        )
        l1 = _from_big_endian("Q", raw)
        self._l2: dict[int, array] = {}
        needed = _div_round_up(self._clusters, self._l2_entries)
        for l1_index in range(min(len(l1), needed)):
            entry = l1[l1_index]
            if entry & L1E_RESERVED_MASK or (entry & L1E_OFFSET_MASK) % cs:
                raise InvalidImage(
                    f"{self.path}: L1 entry {l1_index} ({entry:#x}) has reserved bits set "
                    f"or an unaligned offset"
                )
            l2_offset = entry & L1E_OFFSET_MASK
            if l2_offset:
                raw = _pread_exact(self._fd, cs, l2_offset, f"{self.path}: L2 table {l1_index}")
                self._check_l2(l1_index, raw)
                self._l2[l1_index] = _from_big_endian("Q", raw)

    def _check_l2(self, l1_index: int, raw: bytes) -> None:
        """Refuse compressed clusters and broken entries, one C-speed scan per entry byte."""
        bad = self._l2_bad_bits
        if not any(raw[byte::L2E_SIZE].translate(None, ok) for byte, ok in self._l2_scan):
            return
        for l2_index, entry in enumerate(_from_big_endian("Q", raw)):
            if not entry & bad:
                continue
            guest = (l1_index * self._l2_entries + l2_index) * self.cluster_size
            if entry & QCOW_OFLAG_COMPRESSED:
                raise UnsupportedImage(
                    f"{self.path}: compressed cluster at guest offset {guest} "
                    f"(compressed images are not supported; convert without -c)"
                )
            raise InvalidImage(
                f"{self.path}: L2 entry for guest offset {guest} ({entry:#x}) has reserved "
                f"bits set or an unaligned offset"
            )

    # -- mapping

    def cluster(self, index: int) -> Cluster:
        """The state of guest cluster ``index`` in this image alone."""
        if not 0 <= index < self._clusters:
            raise ValueError(f"{self.path}: cluster {index} outside the image")
        l1_index, l2_index = divmod(index, self._l2_entries)
        table = self._l2.get(l1_index)
        return self._decode(index, table[l2_index] if table is not None else 0)

    @staticmethod
    def _decode(index: int, entry: int) -> Cluster:
        if entry & QCOW_OFLAG_ZERO:
            return Cluster(index, ClusterState.ZERO, None)
        host = entry & L2E_OFFSET_MASK
        if host:
            return Cluster(index, ClusterState.DATA, host)
        return Cluster(index, ClusterState.UNALLOCATED, None)

    def allocation(self) -> Iterator[Cluster]:
        """The clusters this image holds (DATA or ZERO), in guest order; what an
        incremental contributes to the chain."""
        for l1_index in sorted(self._l2):
            table = self._l2[l1_index]
            base = l1_index * self._l2_entries
            for l2_index in range(min(self._l2_entries, self._clusters - base)):
                entry = table[l2_index]
                if entry:
                    cluster = self._decode(base + l2_index, entry)
                    if cluster.state is not ClusterState.UNALLOCATED:
                        yield cluster

    def map(self) -> list[Extent]:
        """The whole guest disk as runs of one state, like ``qemu-img map`` for one image."""
        return list(self._extents(0, self.virtual_size))

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Runs covering exactly [offset, offset + length); DATA runs are host-contiguous."""
        if not length:
            return
        cs = self.cluster_size
        end = offset + length
        run: list = []  # [start, end, state, host]
        index = offset // cs
        last = (end - 1) // cs
        while index <= last:
            l1_index, l2_index = divmod(index, self._l2_entries)
            table = self._l2.get(l1_index)
            if table is None:
                count = min(self._l2_entries - l2_index, last + 1 - index)
                state, host = ClusterState.UNALLOCATED, None
            else:
                count = 1
                _, state, host = self._decode(index, table[l2_index])
            start = max(index * cs, offset)
            stop = min((index + count) * cs, end)
            if (
                run
                and run[2] is state
                and run[1] == start
                and (host is None or run[3] + (start - run[0]) == host + start - index * cs)
            ):
                run[1] = stop
            else:
                if run:
                    yield Extent(run[0], run[1] - run[0], run[2], run[3])
                run = [start, stop, state, None if host is None else host + start - index * cs]
            index += count
        yield Extent(run[0], run[1] - run[0], run[2], run[3])

    # -- reading

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes from this image alone: unallocated clusters read as zeros."""
        return self._read(offset, length, through=False)

    def read_chain(self, offset: int, length: int) -> bytes:
        """Guest bytes as a VM sees them: unallocated clusters come from the backing chain."""
        return self._read(offset, length, through=True)

    def _read(self, offset: int, length: int, through: bool) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError(
                f"{self.path}: read {offset}+{length} outside virtual size {self.virtual_size}"
            )
        parts = []
        for extent in self._extents(offset, length):
            if extent.state is ClusterState.DATA:
                assert extent.host_offset is not None
                what = f"{self.path}: data at guest offset {extent.start}"
                parts.append(_pread_exact(self._fd, extent.length, extent.host_offset, what))
            elif extent.state is ClusterState.UNALLOCATED and through and self.backing_file:
                parts.append(self._read_backing(extent.start, extent.length))
            else:
                parts.append(bytes(extent.length))
        return b"".join(parts)

    def _read_backing(self, offset: int, length: int) -> bytes:
        backing = self.open_backing()
        assert backing is not None
        # A backing file smaller than this image reads as zeros past its end.
        n = max(0, min(length, backing.virtual_size - offset))
        data = backing.read_chain(offset, n) if n else b""
        return data + bytes(length - n)

    def backing_path(self) -> str | None:
        """Where the backing file is: a relative name resolves against this image's
        directory, as QEMU resolves it."""
        if self.backing_file is None:
            return None
        if ":" in self.backing_file.split("/", 1)[0]:
            raise UnsupportedImage(
                f"{self.path}: backing file {self.backing_file!r} is not a plain file name"
            )
        return os.path.join(os.path.dirname(self.path), self.backing_file)

    def open_backing(self) -> Qcow2Reader | RawImage | None:
        """The backing image, opened once and closed with this one."""
        if self._backing is None and self.backing_file is not None:
            path = self.backing_path()
            assert path is not None
            if os.path.realpath(path) in self._seen:
                raise InvalidImage(f"{self.path}: backing chain loops back to {path}")
            fmt = self.backing_format
            if fmt is None:  # no format extension: probe, as QEMU does
                with open(path, "rb") as f:
                    fmt = "qcow2" if f.read(4) == QCOW_MAGIC else "raw"
            if fmt == "qcow2":
                self._backing = Qcow2Reader._open(path, self._seen)
            elif fmt == "raw":
                self._backing = RawImage.open(path)
            else:
                raise UnsupportedImage(f"{self.path}: backing format {fmt!r}")
        return self._backing


class RawImage:
    """A raw backing file, read with the same calls as a qcow2 one."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self.path = path
        self.virtual_size = os.fstat(fd).st_size

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RawImage:
        """Open a raw file read-only."""
        path = os.fspath(path)
        return cls(os.open(path, os.O_RDONLY | os.O_CLOEXEC), path)

    def read_chain(self, offset: int, length: int) -> bytes:
        """The file's bytes; a raw file is the end of every chain."""
        return _pread_exact(self._fd, length, offset, self.path)

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
