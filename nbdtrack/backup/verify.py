"""Prove a repository intact without the source, and optionally compare it with one.

A backup nobody can restore is worse than none, and bit rot is silent, so every byte of
every image is accounted for, either by the manifest's cluster hashes or by a structural
check as strict as ``qemu-img check`` and stricter: the images are nbdtrack's own, so
whatever nbdtrack never writes (a stray header bit, a non-zero pad byte, an entry past
the end of the disk) is a problem too. A single flipped byte anywhere in an image is
found:

- in a data cluster: its hash differs from the manifest's;
- in an L1/L2 entry: the cluster set or the contents change, or the refcounts no longer
  match the references, or a COPIED flag contradicts its refcount;
- in a refcount table or block: the stored refcounts differ from the recomputed ones;
- in the header, the header extensions or the backing file name: the field differs from
  the manifest (size, cluster size, backing file) or from what nbdtrack writes;
- in padding (header cluster, L1 table tail, last data cluster past the disk end): it
  must be zero.

Clusters whose refcount is zero (freed by the writer, referenced by nothing) hold no
information and are not read.
"""

from __future__ import annotations

import asyncio
import os
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from nbdtrack.backup.hashing import ZERO_HASH, ClusterHashes
from nbdtrack.backup.merge import JOURNAL
from nbdtrack.backup.progress import Progress
from nbdtrack.backup.qcow2 import (
    BDRV_SECTOR_SIZE,
    L1E_OFFSET_MASK,
    L1E_SIZE,
    L2E_OFFSET_MASK,
    QCOW2_EXT_HEADER,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_END,
    QCOW2_HEADER_LENGTH,
    QCOW2_HEADER_V2,
    QCOW2_HEADER_V3_MIN_LENGTH,
    QCOW2_VERSION_3,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    REFT_OFFSET_MASK,
    ClusterState,
    Qcow2Error,
    Qcow2Reader,
)
from nbdtrack.backup.repository import (
    MANIFEST,
    BackupRecord,
    Chain,
    Repository,
    RepositoryError,
)
from nbdtrack.backup.restore import (
    CHUNK,
    ChainView,
    RestoreError,
    round_up,
    select_chain,
    tables_misfit,
)
from nbdtrack.client import connect, parse_uri

MAX_PROBLEMS_PER_IMAGE = 50
MAX_SOURCE_DIFFERENCES = 10


@dataclass(frozen=True)
class Problem:
    image: str  # the image file (or the manifest) the problem is in
    where: str  # "cluster 12 (offset 786432)", "header", "host offset 0x30000", ...
    what: str

    def __str__(self) -> str:
        return f"{self.image}: {self.where}: {self.what}"

    def as_dict(self) -> dict:
        return {"image": self.image, "where": self.where, "what": self.what}


@dataclass
class VerifyReport:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chains: int = 0
    images: int = 0
    clusters: int = 0  # clusters whose hash was checked
    compared: int = 0  # bytes compared with the source

    @property
    def ok(self) -> bool:
        return not self.problems


class _Collector:
    """Problems of one image, at most MAX_PROBLEMS_PER_IMAGE of them spelled out."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.problems: list[Problem] = []
        self.dropped = 0

    def add(self, where: str, what: str) -> None:
        if len(self.problems) < MAX_PROBLEMS_PER_IMAGE:
            self.problems.append(Problem(self.image, where, what))
        else:
            self.dropped += 1

    def finish(self) -> list[Problem]:
        if self.dropped:
            self.problems.append(
                Problem(self.image, "...", f"{self.dropped} more problems not shown")
            )
        return self.problems


def _where(index: int, cs: int) -> str:
    return f"cluster {index} (offset {index * cs})"


# --- the manifest ------------------------------------------------------------------------
def check_manifest(chain: Chain) -> list[Problem]:
    """Ids unique, parents known, modes consistent, one file per backup."""
    manifest = os.path.join(chain.path, MANIFEST)
    problems = []
    ids: set[str] = set()
    files: set[str] = set()
    for record in chain.backups:
        where = f"backup {record.id}"
        if record.id in ids:
            problems.append(Problem(manifest, where, "listed twice"))
        if record.file in files or os.path.basename(record.file) != record.file:
            problems.append(Problem(manifest, where, f"bad or shared file name {record.file!r}"))
        ids.add(record.id)
        files.add(record.file)
        if record.mode == "full" and record.parent is not None:
            problems.append(Problem(manifest, where, "a full backup with a parent"))
        elif record.mode != "full" and record.parent is None:
            problems.append(Problem(manifest, where, f"{record.mode} backup without a parent"))
        if record.parent is not None and record.parent not in {b.id for b in chain.backups}:
            problems.append(
                Problem(manifest, where, f"parent '{record.parent}' is not in the manifest")
            )
    if os.path.exists(os.path.join(chain.path, JOURNAL)):
        problems.append(
            Problem(
                manifest,
                "merge",
                "a merge was interrupted; run 'nbdtrack merge' on this repository to finish it",
            )
        )
    return problems


def stray_files(chain: Chain) -> list[str]:
    """Images in the chain directory that the manifest does not list."""
    listed = {b.file for b in chain.backups}
    try:
        names = sorted(os.listdir(chain.path))
    except OSError:
        return []
    return [os.path.join(chain.path, n) for n in names if n.endswith(".qcow2") and n not in listed]


# --- one image ---------------------------------------------------------------------------
def check_image(
    chain: Chain, record: BackupRecord, progress: Progress | None = None
) -> tuple[list[Problem], int]:
    """Every check of one image; returns (problems, clusters hashed)."""
    path = chain.image_path(record)
    out = _Collector(path)
    try:
        misfit = tables_misfit(path)
        if misfit:
            out.add("header", misfit)
            return out.finish(), 0
        reader = Qcow2Reader.open(path)
    except FileNotFoundError:
        out.add("file", "missing")
        return out.finish(), 0
    except (Qcow2Error, OSError) as err:
        out.add("structure", f"does not open as qcow2: {err}")
        return out.finish(), 0
    hashed = 0
    with reader:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check_header(reader, fd, record, chain, out)
            if reader.cluster_size == record.cluster_size:
                _check_structure(reader, fd, out)
                try:
                    hashes = chain.hashes(record)
                except RepositoryError as err:
                    out.add("hashes", str(err))
                else:
                    hashed = _check_contents(reader, fd, hashes, out, progress)
        except (Qcow2Error, OSError, ValueError) as err:
            out.add("structure", f"cannot be read: {err}")
        finally:
            os.close(fd)
    return out.finish(), hashed


def _check_header(
    reader: Qcow2Reader, fd: int, record: BackupRecord, chain: Chain, out: _Collector
) -> None:
    cs = reader.cluster_size
    if reader.version != QCOW2_VERSION_3:
        out.add("header", f"qcow2 version {reader.version}, nbdtrack writes 3")
    if reader.header_length != QCOW2_HEADER_LENGTH:
        out.add(
            "header", f"header length {reader.header_length}, nbdtrack writes {QCOW2_HEADER_LENGTH}"
        )
    if cs != record.cluster_size:
        out.add("header", f"cluster size {cs}, the manifest says {record.cluster_size}")
    expected_size = round_up(record.export_size, BDRV_SECTOR_SIZE)
    if reader.virtual_size != expected_size:
        out.add(
            "header",
            f"virtual size {reader.virtual_size}, expected {expected_size} "
            f"(export size {record.export_size})",
        )
    for name in ("incompatible_features", "compatible_features", "autoclear_features"):
        value = getattr(reader, name)
        if value:
            out.add("header", f"{name.replace('_', ' ')} {value:#x}, nbdtrack writes 0")
    guest_clusters = -(-reader.virtual_size // cs)
    needed_l1 = -(-guest_clusters // (cs // L1E_SIZE))
    if reader.l1_size != needed_l1:
        out.add("header", f"L1 table of {reader.l1_size} entries, nbdtrack writes {needed_l1}")
    raw = os.pread(fd, cs, 0)
    fields = QCOW2_HEADER_V2.unpack(raw[: QCOW2_HEADER_V2.size])
    nb_snapshots, snapshots_offset = fields[11], fields[12]
    if nb_snapshots or snapshots_offset:
        out.add(
            "header",
            f"{nb_snapshots} internal snapshots at {snapshots_offset:#x}, nbdtrack writes none",
        )
    # Which bytes of cluster 0 mean something; every other byte must be zero.
    length = reader.header_length
    used = bytearray(raw)
    used[:QCOW2_HEADER_V3_MIN_LENGTH] = bytes(QCOW2_HEADER_V3_MIN_LENGTH)
    backing_offset, backing_size = fields[2], fields[3]
    if backing_size and not backing_offset:
        out.add("header", f"backing file name length {backing_size} without a backing file")
    limit = min(backing_offset or cs, cs)
    offset = length
    while True:
        if offset + QCOW2_EXT_HEADER.size > limit:
            out.add("header", f"no end marker of the header extensions before {limit}")
            break
        ext_type, ext_length = QCOW2_EXT_HEADER.unpack_from(raw, offset)
        if ext_type == QCOW2_EXT_MAGIC_END:
            if ext_length:
                out.add("header", f"end-of-extensions marker with length {ext_length}")
            used[offset : offset + QCOW2_EXT_HEADER.size] = bytes(QCOW2_EXT_HEADER.size)
            break
        if ext_type != QCOW2_EXT_MAGIC_BACKING_FORMAT:
            out.add("header", f"header extension {ext_type:#x} at {offset}, nbdtrack writes none")
        end = offset + QCOW2_EXT_HEADER.size + ext_length
        if end > limit:
            break  # the reader refused this already
        used[offset:end] = bytes(end - offset)
        offset = end + (-ext_length % 8)
    if backing_offset and backing_offset + backing_size <= cs:
        used[backing_offset : backing_offset + backing_size] = bytes(backing_size)
    if used.count(0) != cs:
        first = next(i for i, b in enumerate(used) if b)
        out.add("header", f"non-zero byte {used[first]:#04x} at offset {first} in unused space")

    parent = None
    if record.parent is not None:
        try:
            parent = chain.get(record.parent)
        except RepositoryError:
            return  # check_manifest reports the unknown parent
    if parent is None and reader.backing_file is not None:
        out.add("backing file", f"names {reader.backing_file!r}, but a full has none")
    elif parent is not None:
        if reader.backing_file != parent.file:
            out.add(
                "backing file",
                f"names {reader.backing_file!r}, the manifest's parent '{parent.id}' is "
                f"{parent.file!r}",
            )
        if reader.backing_format != "qcow2":
            out.add("backing file", f"format {reader.backing_format!r}, expected 'qcow2'")


def _decode_refcounts(raw: bytes, order: int) -> array:
    bits = 1 << order
    if bits >= 8:
        typecode = {1: "B", 2: "H", 4: "I", 8: "Q"}[bits // 8]
        table = array(typecode, raw)
        if sys.byteorder == "little" and bits > 8:
            table.byteswap()
        return array("Q", table)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return array("Q", (byte >> (i * bits) & mask for byte in raw for i in range(per_byte)))


def _check_structure(reader: Qcow2Reader, fd: int, out: _Collector) -> None:
    """Recount every reference to every host cluster and compare with the refcounts;
    check COPIED flags and that table space past the disk end is zero."""
    cs = reader.cluster_size
    file_size = os.fstat(fd).st_size
    nclusters = -(-file_size // cs)
    expected = array("Q", bytes(8 * nclusters))
    flagged: list[tuple[int, bool, str]] = []  # host offset, COPIED, where

    def ref(offset: int, where: str) -> bool:
        if offset % cs:
            out.add(where, f"host offset {offset:#x} is not cluster aligned")
            return False
        if offset // cs >= nclusters:
            out.add(where, f"host offset {offset:#x} is past the end of the file ({file_size})")
            return False
        expected[offset // cs] += 1
        return True

    def read_clusters(offset: int, count: int) -> bytes:
        data = os.pread(fd, count * cs, offset)
        return data + bytes(count * cs - len(data))

    ref(0, "header")
    l2_entries = cs // 8
    guest_clusters = -(-reader.virtual_size // cs)
    needed_l1 = -(-guest_clusters // l2_entries)
    l1_clusters = -(-reader.l1_size * L1E_SIZE // cs)
    l1_ok = True
    for i in range(l1_clusters):
        l1_ok = ref(reader.l1_table_offset + i * cs, "L1 table") and l1_ok
    if l1_clusters and l1_ok:
        raw = read_clusters(reader.l1_table_offset, l1_clusters)
        l1 = array("Q", raw[: reader.l1_size * L1E_SIZE])
        if sys.byteorder == "little":
            l1.byteswap()
        tail = raw[reader.l1_size * L1E_SIZE :]
        if tail.count(0) != len(tail):
            out.add("L1 table", "non-zero bytes after its last entry")
        for l1_index, entry in enumerate(l1):
            where = f"L1 entry {l1_index}"
            if l1_index >= needed_l1:
                if entry:
                    out.add(where, f"{entry:#x} past the end of the disk, expected 0")
                continue
            l2_offset = entry & L1E_OFFSET_MASK
            if not l2_offset:
                if entry:
                    out.add(where, f"{entry:#x} has flags but no L2 table")
                continue
            if not ref(l2_offset, where):
                continue
            flagged.append((l2_offset, bool(entry & QCOW_OFLAG_COPIED), where))
            l2 = array("Q", read_clusters(l2_offset, 1))
            if sys.byteorder == "little":
                l2.byteswap()
            base = l1_index * l2_entries
            for l2_index, l2_entry in enumerate(l2):
                if not l2_entry:
                    continue
                index = base + l2_index
                where = f"L2 entry of {_where(index, cs)}"
                if index >= guest_clusters:
                    out.add(where, f"{l2_entry:#x} past the end of the disk, expected 0")
                    continue
                host = l2_entry & L2E_OFFSET_MASK
                if host:
                    if ref(host, where):
                        flagged.append((host, bool(l2_entry & QCOW_OFLAG_COPIED), where))
                elif l2_entry & ~QCOW_OFLAG_ZERO:
                    out.add(where, f"{l2_entry:#x} has flags but no host cluster")

    reftable_ok = True
    for i in range(reader.refcount_table_clusters):
        reftable_ok = ref(reader.refcount_table_offset + i * cs, "refcount table") and reftable_ok
    stored = array("Q", bytes(8 * nclusters))
    order = reader.refcount_order
    per_block = cs * 8 >> order
    if reftable_ok and reader.refcount_table_clusters:
        reftable = array(
            "Q", read_clusters(reader.refcount_table_offset, reader.refcount_table_clusters)
        )
        if sys.byteorder == "little":
            reftable.byteswap()
        for block_index, entry in enumerate(reftable):
            if not entry:
                continue
            where = f"refcount table entry {block_index}"
            if entry & ~REFT_OFFSET_MASK:
                out.add(where, f"{entry:#x} has reserved bits set")
            block = entry & REFT_OFFSET_MASK
            if not block or not ref(block, where):
                continue
            counts = _decode_refcounts(read_clusters(block, 1), order)
            first = block_index * per_block
            inside = max(0, min(per_block, nclusters - first))
            stored[first : first + inside] = counts[:inside]
            beyond = counts[inside:]
            if inside < per_block and beyond.count(0) != len(beyond):
                out.add(
                    f"refcount block {block_index}",
                    "refcounts for clusters past the end of the file",
                )
    if stored != expected:
        for index in range(nclusters):
            if stored[index] != expected[index]:
                out.add(
                    f"host cluster {index} (host offset {index * cs:#x})",
                    f"refcount {stored[index]}, but referenced {expected[index]} times",
                )
    for host, copied, where in flagged:
        refcount = stored[host // cs]
        if copied != (refcount == 1):
            out.add(
                where,
                f"COPIED flag {'set' if copied else 'clear'} but the refcount is {refcount}",
            )


def _check_contents(
    reader: Qcow2Reader,
    fd: int,
    hashes: ClusterHashes,
    out: _Collector,
    progress: Progress | None,
) -> int:
    """Hash every cluster the image holds against its recorded hashes, both ways."""
    cs = reader.cluster_size
    seen: set[str] = set()
    hashed = 0
    for extent in reader.map():
        if extent.state is ClusterState.UNALLOCATED:
            continue
        first = extent.start // cs
        count = -(-(extent.start + extent.length) // cs) - first
        if extent.state is ClusterState.ZERO:
            for index in range(first, first + count):
                key = str(index)
                seen.add(key)
                expected = hashes.get(key)
                if expected is None:
                    out.add(_where(index, cs), "a zero cluster the manifest does not list")
                elif expected != ZERO_HASH:
                    out.add(_where(index, cs), "a zero cluster, the manifest lists data")
            continue
        step = max(1, CHUNK // cs)
        for chunk_first in range(first, first + count, step):
            chunk_count = min(step, first + count - chunk_first)
            offset = chunk_first * cs
            length = min(chunk_count * cs, reader.virtual_size - offset)
            data = memoryview(reader.read(offset, length))
            for i in range(chunk_count):
                index = chunk_first + i
                key = str(index)
                seen.add(key)
                piece = data[i * cs : (i + 1) * cs]
                expected = hashes.get(key)
                hashed += 1
                if expected is None:
                    out.add(_where(index, cs), "holds data the manifest does not list")
                elif expected == ZERO_HASH:
                    out.add(_where(index, cs), "holds data, the manifest lists a zero cluster")
                elif hashes.of(piece) != expected:
                    out.add(_where(index, cs), "data does not match the manifest's hash")
            if progress is not None:
                progress.advance(length)
    # The host bytes of the last cluster past the disk end: written as zeros.
    last = (reader.virtual_size - 1) // cs if reader.virtual_size else -1
    if last >= 0 and reader.virtual_size % cs:
        cluster = reader.cluster(last)
        if cluster.state is ClusterState.DATA and cluster.host_offset is not None:
            within = reader.virtual_size - last * cs
            tail = os.pread(fd, cs - within, cluster.host_offset + within)
            if tail.count(0) != len(tail):
                out.add(_where(last, cs), "non-zero bytes past the end of the disk")
    guest_clusters = -(-reader.virtual_size // cs)
    for key in sorted(set(hashes) - seen, key=lambda k: (len(k), k)):
        if not key.isdigit() or int(key) >= guest_clusters:
            out.add(f"cluster {key}", "the manifest lists a cluster outside the disk")
        else:
            what = "zero cluster" if hashes[key] == ZERO_HASH else "data"
            out.add(
                _where(int(key), cs),
                f"missing: the manifest lists {what}, the image does not hold it",
            )
    return hashed


# --- against the source ------------------------------------------------------------------
async def compare_with_source(
    view: ChainView, uri: str, label: str, progress: Progress | None = None
) -> tuple[list[Problem], int]:
    """Byte-for-byte comparison of a restore point with an export; returns the first
    differing ranges (runs of differing clusters, each with its first differing byte)
    and the number of bytes compared."""
    client = await connect(uri)
    problems: list[Problem] = []
    ranges: list[list[int]] = []  # [first differing byte, first cluster, last cluster]
    try:
        if client.size != view.size:
            problems.append(
                Problem(label, "size", f"{view.size} bytes, the source has {client.size}")
            )
        size = min(client.size, view.size)
        cs = view.cluster_size
        window = 4
        if progress is not None:
            progress.start("compare", size)
        for base in range(0, size, CHUNK * window):
            spans = [
                (pos, min(CHUNK, size - pos))
                for pos in range(base, min(size, base + CHUNK * window), CHUNK)
            ]
            sources = await asyncio.gather(*(client.pread(n, pos) for pos, n in spans))
            for (pos, n), theirs in zip(spans, sources, strict=True):
                ours = view.read(pos, n)
                if ours == theirs:
                    continue
                for start in range(0, n, cs):
                    a, b = ours[start : start + cs], theirs[start : start + cs]
                    if a == b:
                        continue
                    index = (pos + start) // cs
                    if ranges and ranges[-1][2] == index - 1:
                        ranges[-1][2] = index
                    else:
                        first = next(i for i in range(len(a)) if a[i] != b[i])
                        ranges.append([pos + start + first, index, index])
            if progress is not None:
                progress.advance(sum(n for _, n in spans))
        if progress is not None:
            progress.finish()
    finally:
        await client.close()
    for offset, first, last in ranges[:MAX_SOURCE_DIFFERENCES]:
        clusters = f"cluster {first}" if first == last else f"clusters {first}-{last}"
        problems.append(Problem(label, f"offset {offset}", f"differs from the source ({clusters})"))
    if len(ranges) > MAX_SOURCE_DIFFERENCES:
        more = len(ranges) - MAX_SOURCE_DIFFERENCES
        problems.append(Problem(label, "...", f"{more} more differing ranges not shown"))
    return problems, size


def _chain_for_source(chains: list[Chain], export: str | None, uri: str) -> Chain:
    if export is not None or len(chains) == 1:
        return chains[0]
    name = parse_uri(uri).export
    for candidate in (name, name.split("@", 1)[0]):  # disk@ckpt-7 is a snapshot of disk
        for chain in chains:
            if chain.export == candidate:
                return chain
    raise RepositoryError(
        f"the repository holds several exports and none is named like the source "
        f"'{name}': choose one with --export"
    )


# --- everything --------------------------------------------------------------------------
def _data_bytes(chain: Chain, record: BackupRecord) -> int:
    """What verifying an image hashes (0 if its hashes cannot be read: check_image says)."""
    try:
        hashes = chain.hashes(record)
    except RepositoryError:
        return 0
    return sum(1 for h in hashes.values() if h != ZERO_HASH) * record.cluster_size


def verify(
    root: str,
    *,
    export: str | None = None,
    source: str | None = None,
    progress: Progress | None = None,
    on_problem: Callable[[Problem], None] | None = None,
) -> VerifyReport:
    """Check every image of every chain (or of ``export``'s); with ``source``, compare
    the newest restore point with it too."""
    progress = progress or Progress()
    report = VerifyReport()
    if export is not None:
        chains = [select_chain(root, export)]
    else:
        try:
            chains = Repository(root).chains()
        except ValueError as err:  # a manifest that is not JSON
            raise RepositoryError(f"{root}: cannot read a manifest: {err}") from None
        if not chains:
            raise RepositoryError(f"{root}: the repository holds no backup")
    if source is not None:
        parse_uri(source)

    def found(problems: list[Problem]) -> None:
        report.problems.extend(problems)
        if on_problem is not None:
            for problem in problems:
                on_problem(problem)

    total = sum(_data_bytes(chain, b) for chain in chains for b in chain.backups)
    progress.start("verify", total)
    try:
        for chain in chains:
            report.chains += 1
            found(check_manifest(chain))
            for path in stray_files(chain):
                report.notes.append(f"{path}: not in the manifest (left by an interrupted job?)")
            for record in chain.backups:
                problems, hashed = check_image(chain, record, progress)
                report.images += 1
                report.clusters += hashed
                found(problems)
    finally:
        progress.finish()
    if source is not None:
        chain = _chain_for_source(chains, export, source)
        if not chain.backups:
            raise RepositoryError(f"the chain of '{chain.export}' has no backup")
        newest = chain.backups[-1]
        try:
            with ChainView(chain, chain.lineage(newest.id)) as view:
                label = f"{chain.export}@{newest.id}"
                problems, compared = asyncio.run(compare_with_source(view, source, label, progress))
                report.compared = compared
                found(problems)
        except (RestoreError, Qcow2Error, RepositoryError) as err:
            found([Problem(chain.path, f"backup {newest.id}", f"cannot be read: {err}")])
    return report
