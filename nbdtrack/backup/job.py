"""The backup job: copy one consistent point in time, reading only what changed.

Against nbdtrack (``control`` given) the job opens a checkpoint through the control
socket: the bitmap is frozen, writes go on into a successor, and a snapshot export
shows the image exactly as it was. It asks for ``base:allocation`` and the bitmap
together in large block-status calls, copies only dirty clusters (zeroed ranges become
zero clusters, not data), releases what it copied with TRIM, and commits the checkpoint
on success or aborts it on failure (the control connection closing aborts it too, so a
job killed half-way loses no dirty bit). Against any other server that exports
``qemu:dirty-bitmap:NAME`` (``qemu-nbd -B NAME``) it reads the bitmap as it stands.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

from bitarray import bitarray

from nbdtrack.backup.hashing import ZERO_HASH, ClusterHashes
from nbdtrack.backup.progress import Progress
from nbdtrack.backup.qcow2 import ClusterState, Qcow2Writer
from nbdtrack.backup.repository import (
    BackupRecord,
    Chain,
    Repository,
    fsync_directory,
    utc_now,
)
from nbdtrack.backup.resume import ResumeFiles, ResumeState
from nbdtrack.backup.zeros import is_zero
from nbdtrack.client import NBDClient, connect, parse_uri
from nbdtrack.client.qmp import QMPControlClient
from nbdtrack.protocol.constants import BASE_ALLOCATION, NBD_STATE_ZERO

MiB = 1024 * 1024
CLUSTER = 64 * 1024
RELEASE_STEP = 64 * MiB  # copied ranges released (TRIM) together on the snapshot export
BACKUP_MODES = ("auto", "full", "incremental", "differential")


class BackupError(Exception):
    """The backup could not be made; the message says why, in one line."""


@dataclass
class BackupRequest:
    source: str  # NBD URI of the export
    repository: str
    bitmap: str | None = None
    mode: str = "auto"
    control: str | None = None  # nbdtrack's control socket: consistent checkpoints
    connections: int = 4
    request_size: int = 2 * MiB
    max_in_flight: int = 16
    resumable: bool = False  # sync=always: a failed run leaves what it copied to the next
    sync_every: int = 64 * MiB  # resumable: bytes copied between durable release points


def choose_mode(
    requested: str, chain: Chain, bitmap: str | None, generation: str | None, size: int
) -> tuple[str, str]:
    """(mode, reason): what this backup will be, and why when it is not what was asked."""
    if requested == "full":
        return "full", ""
    problem = ""
    base = parent_of(chain, "differential" if requested == "differential" else "incremental")
    if bitmap is None:
        problem = "no --bitmap was given"
    elif base is None:
        problem = f"the repository has no full backup of '{chain.export}' yet"
    elif base.export_size != size:
        problem = f"the export size changed ({base.export_size} -> {size} bytes)"
    elif base.bitmap != bitmap:
        problem = f"the chain was made with bitmap '{base.bitmap}', not '{bitmap}'"
    elif generation is not None and base.generation != generation:
        problem = (
            f"bitmap '{bitmap}' is at generation {generation} but the chain's last backup "
            f"continues from {base.generation} (it was cleared, or a backup went elsewhere)"
        )
    if not problem:
        return ("differential" if requested == "differential" else "incremental"), ""
    if requested == "auto":
        return "full", f"taking a full backup: {problem}"
    raise BackupError(f"cannot take a{'n' if requested[0] == 'i' else ''} {requested}: {problem}")


def parent_of(chain: Chain, mode: str) -> BackupRecord | None:
    """The backup a new one of this mode backs onto: none for a full."""
    if mode == "incremental":
        return chain.last
    if mode == "differential":
        return chain.last_full()
    return None


class Plan:
    """Which clusters to copy as data and which to record as zeros."""

    def __init__(self, size: int, cluster: int) -> None:
        self.size = size
        self.cluster = cluster
        count = -(-size // cluster)
        self.data = bitarray(count)
        self.data.setall(0)
        self.zero = bitarray(count)
        self.zero.setall(0)

    def runs(self, bits: bitarray, max_clusters: int) -> Iterator[tuple[int, int]]:
        """(first cluster, count) runs of set bits, at most ``max_clusters`` long."""
        pos = 0
        while True:
            first = bits.find(1, pos)
            if first < 0:
                return
            end = bits.find(0, first)
            end = len(bits) if end < 0 else end
            for start in range(first, end, max_clusters):
                yield start, min(max_clusters, end - start)
            pos = end

    def span(self, first: int, count: int) -> tuple[int, int]:
        offset = first * self.cluster
        return offset, min(count * self.cluster, self.size - offset)

    @property
    def data_bytes(self) -> int:
        return sum(self.span(f, n)[1] for f, n in self.runs(self.data, 1 << 30))


async def scan(
    client: NBDClient,
    mode: str,
    bitmap: str | None,
    cluster: int,
    reused: dict[int, int] | None = None,
) -> Plan:
    """Block status over the whole export: what a full or an incremental must copy.

    ``reused``: clusters an earlier attempt of this backup holds; those that are not
    dirty again need no copy.
    """
    plan = Plan(client.size, cluster)
    allocated = bitarray(len(plan.data))
    allocated.setall(0)
    dirty = bitarray(len(plan.data))
    dirty.setall(mode == "full" and not reused)
    context = f"qemu:dirty-bitmap:{bitmap}" if mode != "full" or reused else None
    pos = 0
    while pos < client.size:
        answer = await client.block_status(pos, min(client.size - pos, 1 << 31))
        covered = None
        for name, extents in answer.items():
            end = pos
            for length, flags in extents:
                length = min(length, client.size - end)
                first, last = end // cluster, -(-(end + length) // cluster)
                if name == BASE_ALLOCATION and not flags & NBD_STATE_ZERO:
                    allocated[first:last] = 1
                elif name == context and flags & 1:
                    dirty[first:last] = 1
                end += length
            covered = end if covered is None else min(covered, end)
        if not covered or covered <= pos:
            raise BackupError(f"the server answered block status at {pos} with no extents")
        pos = covered
    if mode == "full" and reused:
        held = bitarray(len(plan.data))
        held.setall(0)
        for index in reused:
            held[index] = 1
        plan.data = allocated & ~(held & ~dirty)
        plan.zero = held & dirty & ~allocated  # what the earlier attempt held is now zero
        return plan
    plan.data = dirty & allocated
    if mode != "full":  # a standalone full leaves zeros unallocated; an incremental must not
        plan.zero = dirty & ~allocated
    return plan


class Copier:
    """Reads planned clusters over several connections and writes them into one image."""

    def __init__(
        self,
        clients: list[NBDClient],
        writer: Qcow2Writer,
        plan: Plan,
        request: BackupRequest,
        progress: Progress,
        release: bool,
        standalone: bool,
    ) -> None:
        self.clients = clients
        self.writer = writer
        self.plan = plan
        self.request = request
        self.progress = progress
        self.release = release  # TRIM copied ranges on a checkpoint's snapshot export
        self.standalone = standalone  # a full: zero clusters need not be recorded
        self.hashes = ClusterHashes()
        self.bytes_read = 0
        self.bytes_written = 0
        self._next = itertools.cycle(clients)
        # Resumable: ranges are released only after the image holds them durably.
        self.resume: ResumeFiles | None = None
        self._unreleased: list[tuple[int, int]] = []
        self._unsynced = 0
        self._sync_lock = asyncio.Lock()
        # Not resumable: released in steps, below the lowest run still being copied.
        self._copying: set[int] = set()  # offsets of the runs being copied
        self._issued_to = 0  # end of the last run handed out
        self._released_to = 0  # everything below was released
        self._releases: list[asyncio.Task] = []

    async def run(self) -> None:
        plan = self.plan
        per_request = max(1, self.request.request_size // plan.cluster)
        for first, count in plan.runs(plan.zero, 1 << 20):
            self._zero(first, count)
            if self.resume is not None:
                self._unreleased.append(self.plan.span(first, count))
        if self.resume is not None:
            await self._sync_and_release()
        elif self.release and plan.zero.any():
            await self._release_runs(plan.zero)
        runs = plan.runs(plan.data, per_request)
        try:
            # Each worker copies one run at a time: max_in_flight requests in flight, and
            # no task per run. The first failure cancels the other workers.
            async with asyncio.TaskGroup() as workers:
                for _ in range(self.request.max_in_flight):
                    workers.create_task(self._copy_runs(runs))
            if self.release and self.resume is None:
                self._release_copied(final=True)
            await asyncio.gather(*self._releases)
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None  # the first failure, as one error
        finally:
            for release in self._releases:  # a failed copy: no TRIM is left behind
                release.cancel()
            await asyncio.gather(*self._releases, return_exceptions=True)

    async def _copy_runs(self, runs: Iterator[tuple[int, int]]) -> None:
        """Copy runs taken from ``runs``, shared with the other workers, in order, each
        read into this worker's buffer (as large as its largest run so far)."""
        buffer = bytearray()
        for first, count in runs:
            offset, length = self.plan.span(first, count)
            self._copying.add(offset)
            self._issued_to = offset + length
            if len(buffer) < length:
                buffer = bytearray(length)
            with memoryview(buffer) as view:
                await self._copy(first, count, offset, view[:length])

    def _zero(self, first: int, count: int) -> None:
        offset, length = self.plan.span(first, count)
        self.writer.write_zeroes(offset, length)
        for index in range(first, first + count):
            self.hashes[str(index)] = ZERO_HASH

    async def _release_runs(self, bits: bitarray) -> None:
        client = self.clients[0]
        for first, count in self.plan.runs(bits, 1 << 14):
            offset, length = self.plan.span(first, count)
            await client.trim(offset, min(length, client.size - offset))

    async def _copy(self, first: int, count: int, offset: int, view: memoryview) -> None:
        """Read the run of ``count`` clusters from ``first`` (at ``offset``, as long as
        ``view``) into ``view``, then write, hash and release it."""
        length = view.nbytes
        client = next(self._next)
        readable = min(length, client.size - offset)
        await client.pread_into(view[:readable], offset)
        view[readable:] = bytes(length - readable)  # past the export's end: zeros
        self.bytes_read += readable
        cluster = self.plan.cluster
        for i in range(count):
            index = first + i
            piece = view[i * cluster : (i + 1) * cluster]
            position = offset + i * cluster
            if is_zero(piece):  # data that reads as zeros
                if not self.standalone:
                    self.writer.write_zeroes(position, len(piece))
                    self.hashes[str(index)] = ZERO_HASH
                continue
            self.writer.write(position, piece)
            self.bytes_written += len(piece)
            self.hashes[str(index)] = self.hashes.of(piece)
        if self.resume is not None:
            self._unreleased.append((offset, length))
            self._unsynced += length
            if self._unsynced >= self.request.sync_every:
                await self._sync_and_release()
        elif self.release:
            self._copying.discard(offset)
            self._release_copied()
        self.progress.advance(length)

    def _release_copied(self, final: bool = False) -> None:
        """TRIM what lies below every run still being copied, once it is a step's worth
        (or at the end): far fewer round trips than one per run. The clean ranges between
        dirty runs go too: the job never reads them, and nobody else reads its snapshot."""
        low = min(self._copying, default=self._issued_to)
        if low - self._released_to < (1 if final else RELEASE_STEP):
            return
        client = self.clients[0]
        end = min(low, client.size)
        for start in range(self._released_to, end, 1 << 30):
            length = min(1 << 30, end - start)
            self._releases.append(asyncio.ensure_future(client.trim(start, length)))
        self._released_to = low

    async def _sync_and_release(self) -> None:
        """Make what was copied durable (data, then its cluster entries), then release it."""
        assert self.resume is not None
        async with self._sync_lock:
            ranges, self._unreleased = self._unreleased, []
            self._unsynced = 0
            entries = await asyncio.to_thread(self.writer.sync)
            await asyncio.to_thread(self.resume.append, entries)
            client = self.clients[0]
            for offset, length in ranges:
                length = min(length, client.size - offset)
                if length > 0:
                    await client.trim(offset, length)


async def _open_clients(uri: str, export: str | None, contexts: list[str], count: int) -> list:
    first = await connect(uri, export, meta_contexts=contexts)
    clients = [first]
    try:
        missing = [ctx for ctx in contexts if ctx not in first.contexts]
        if missing:
            raise BackupError(f"the server does not offer {', '.join(missing)}")
        if first.can_multi_conn and count > 1:  # the others' handshakes at the same time
            more = [connect(uri, export, meta_contexts=contexts) for _ in range(count - 1)]
            opened = await asyncio.gather(*more, return_exceptions=True)
            clients += [client for client in opened if isinstance(client, NBDClient)]
            for outcome in opened:
                if isinstance(outcome, BaseException):
                    raise outcome
    except BaseException:
        for client in clients:
            await client.close()
        raise
    return clients


async def run_backup(request: BackupRequest, progress: Progress) -> BackupRecord:
    """Take one backup into the repository; returns its manifest record."""
    if request.mode not in BACKUP_MODES:
        raise BackupError(f"unknown mode '{request.mode}': expected {', '.join(BACKUP_MODES)}")
    if request.resumable and not request.control:
        raise BackupError("--resumable needs --control: it works through checkpoints")
    export = parse_uri(request.source).export
    chain = Repository(request.repository).chain(export)
    with chain.locked():
        return await _run_backup(request, progress, chain, export)


async def _run_backup(
    request: BackupRequest, progress: Progress, chain: Chain, export: str
) -> BackupRecord:
    qmp: QMPControlClient | None = None
    checkpoint: dict | None = None
    try:
        if request.control:
            if request.bitmap is None:
                raise BackupError("--control needs --bitmap: a checkpoint freezes a bitmap")
            qmp = QMPControlClient(request.control)
            await asyncio.to_thread(qmp.connect)
        # The mode decides the sync mode of the checkpoint; the checkpoint tells the
        # generation. Ask the server first, then check again once frozen.
        generation, size = await _bitmap_and_size(qmp, export, request.bitmap, request.source)
        attempt = _resumable_attempt(request, chain, generation, size)
        if attempt is not None:
            mode, backup_id = attempt[1].mode, attempt[1].id
            progress.message(f"resuming backup {backup_id} (attempt {attempt[1].attempt + 1})")
        else:
            mode, reason = choose_mode(request.mode, chain, request.bitmap, generation, size)
            if reason:
                progress.message(reason)
            backup_id = chain.new_id(mode)
        resumable = request.resumable and mode != "differential"
        source_export: str | None = None
        if qmp is not None:
            sync = "always" if resumable else "never" if mode == "differential" else "on-success"
            name = backup_id if attempt is None else f"{backup_id}-{attempt[1].attempt + 1}"
            checkpoint = await asyncio.to_thread(
                qmp.execute,
                "nbdtrack-checkpoint-start",
                {
                    "node": export,
                    "bitmap": request.bitmap,
                    "sync": sync,
                    "name": name,
                    "auto-abort": True,
                },
            )
            source_export = checkpoint["export"]
            if attempt is not None and not attempt[1].continues(checkpoint["generation"]):
                raise BackupError("the bitmap changed while the backup was resuming; try again")
            if attempt is None and checkpoint["generation"] != generation:
                raise BackupError("the bitmap changed while the backup started; try again")
        record = await _copy_point_in_time(
            request,
            chain,
            mode,
            backup_id,
            source_export,
            progress,
            release=qmp is not None,
            resume=_resume_plan(chain, backup_id, mode, request, checkpoint, attempt)
            if resumable and checkpoint is not None
            else None,
        )
        if qmp is not None and checkpoint is not None:
            done = await asyncio.to_thread(
                qmp.execute,
                "nbdtrack-checkpoint-commit",
                {"node": export, "checkpoint": checkpoint["checkpoint"]},
            )
            checkpoint = None
            record.generation = done["generation"]
            record.checkpoint = source_export
        chain.backups.append(record)
        chain.save()
        ResumeFiles(chain, backup_id).remove()
        return record
    except BaseException:
        if qmp is not None and checkpoint is not None:
            try:
                await asyncio.to_thread(
                    qmp.execute,
                    "nbdtrack-checkpoint-abort",
                    {"node": export, "checkpoint": checkpoint["checkpoint"]},
                )
            except Exception as err:  # the connection closing aborts it anyway
                progress.message(f"aborting the checkpoint failed: {err}")
        raise
    finally:
        if qmp is not None:
            qmp.close()


def _resumable_attempt(
    request: BackupRequest, chain: Chain, generation: str | None, size: int
) -> tuple[ResumeFiles, ResumeState] | None:
    """The unfinished attempt this run continues, if it can."""
    if not request.resumable:
        return None
    found = ResumeFiles.find(chain)
    if found is None:
        return None
    files, state = found
    parent_ok = state.parent == (chain.last.id if chain.last is not None else None)
    if (
        state.bitmap == request.bitmap
        and state.continues(generation)
        and parent_ok
        and request.mode in ("auto", state.mode)
        and (chain.last is None or chain.last.export_size == size)
    ):
        return found
    return None


def _resume_plan(
    chain: Chain,
    backup_id: str,
    mode: str,
    request: BackupRequest,
    checkpoint: dict,
    attempt: tuple[ResumeFiles, ResumeState] | None,
) -> tuple[ResumeFiles, ResumeState, dict[int, int]]:
    """Record this attempt durably before anything is released; returns what to reuse."""
    files = ResumeFiles(chain, backup_id)
    parent = parent_of(chain, mode)
    state = ResumeState(
        id=backup_id,
        mode=mode,
        parent=parent.id if parent is not None else None,
        bitmap=request.bitmap or "",
        base_generation=checkpoint["generation"],
        checkpoint=checkpoint["checkpoint"],
        attempt=attempt[1].attempt + 1 if attempt is not None else 1,
    )
    os.makedirs(chain.path, exist_ok=True)
    files.save(state)
    return files, state, files.entries() if attempt is not None else {}


async def _bitmap_and_size(
    qmp: QMPControlClient | None, export: str, bitmap: str | None, uri: str
) -> tuple[str | None, int]:
    """The bitmap's generation (None without a control socket) and the export size:
    both from the control socket when there is one, else the size from an NBD handshake."""
    if qmp is None or bitmap is None:
        client = await connect(uri)
        try:
            return None, client.size
        finally:
            await client.close()
    nodes = await asyncio.to_thread(qmp.execute, "query-named-block-nodes")
    for node in nodes:
        if node.get("node-name") == export:
            for info in node.get("dirty-bitmaps", []):
                if info["name"] == bitmap:
                    return info.get("generation"), node["image"]["virtual-size"]
            raise BackupError(f"export '{export}' has no bitmap '{bitmap}'")
    raise BackupError(f"the server has no export '{export}'")


async def _copy_point_in_time(
    request: BackupRequest,
    chain: Chain,
    mode: str,
    backup_id: str,
    source_export: str | None,
    progress: Progress,
    release: bool,
    resume: tuple[ResumeFiles, ResumeState, dict[int, int]] | None,
) -> BackupRecord:
    reused = resume[2] if resume is not None else {}
    contexts = [BASE_ALLOCATION]
    if mode != "full" or reused:
        contexts.append(f"qemu:dirty-bitmap:{request.bitmap}")
    clients = await _open_clients(request.source, source_export, contexts, request.connections)
    path = os.path.join(chain.path, backup_id + ".qcow2")
    # Written under a temporary name: a job killed half-way leaves no image that looks
    # like a backup; the next job resumes it (--resumable) or sweeps it away.
    partial = os.path.join(chain.path, f".{backup_id}.qcow2.partial")
    remove_leftovers(chain, progress, keep=backup_id)
    if not reused and os.path.exists(partial):
        os.unlink(partial)  # an earlier attempt that had made nothing durable
    writer = None
    try:
        size = clients[0].size
        plan = await scan(clients[0], mode, request.bitmap, CLUSTER, reused)
        # qcow2 sizes are whole sectors: an odd tail reads as zeros past the export end.
        plan.size = -(-size // 512) * 512
        parent = parent_of(chain, mode)
        os.makedirs(chain.path, exist_ok=True)
        backing = parent.file if parent is not None else None
        if reused:
            writer = Qcow2Writer.resume(
                partial, plan.size, reused.items(), cluster_size=CLUSTER, backing_file=backing
            )
        else:
            writer = Qcow2Writer.create(
                partial, plan.size, cluster_size=CLUSTER, backing_file=backing
            )
        copier = Copier(clients, writer, plan, request, progress, release, mode == "full")
        copier.resume = resume[0] if resume is not None else None
        progress.start("copy", plan.data_bytes)
        await copier.run()
        progress.finish()
        _hash_reused(writer, reused, copier.hashes)
        writer.close()  # syncs the image
        writer = None
        os.rename(partial, path)
        fsync_directory(chain.path)
    except BaseException:
        progress.finish()
        if resume is not None and writer is not None:
            # Resumable: keep the unfinished image for the next run; what is released
            # is already durable in it.
            with contextlib.suppress(OSError):
                await asyncio.to_thread(resume[0].append, writer.sync())
        elif writer is not None:
            writer.abort()
        elif os.path.exists(partial):
            os.unlink(partial)
        raise
    finally:
        for client in clients:
            await client.close()
    return BackupRecord(
        id=backup_id,
        time=utc_now(),
        mode=mode,
        file=os.path.basename(path),
        parent=parent.id if parent is not None else None,
        export_size=size,
        cluster_size=CLUSTER,
        bitmap=request.bitmap,
        source=request.source,
        bytes_read=copier.bytes_read,
        bytes_written=copier.bytes_written,
        hashes=copier.hashes,
    )


def _hash_reused(writer: Qcow2Writer, reused: dict[int, int], hashes: ClusterHashes) -> None:
    """Manifest hashes of the clusters an earlier attempt copied and this one kept."""
    for index in reused:
        if str(index) in hashes:
            continue
        data = writer.read_cluster(index)
        if data is not None:
            hashes[str(index)] = hashes.of(data)
        elif writer.state(index) is ClusterState.ZERO:
            hashes[str(index)] = ZERO_HASH


def remove_leftovers(chain: Chain, progress: Progress, keep: str | None = None) -> None:
    """Delete what jobs that died before they finished left (but the attempt resumed)."""
    if not os.path.isdir(chain.path):
        return
    for name in sorted(os.listdir(chain.path)):
        if keep is not None and name.startswith(f".{keep}."):
            continue
        if name.startswith(".") and name.endswith((".qcow2.partial", ".resume.json", ".entries")):
            os.unlink(os.path.join(chain.path, name))
            if name.endswith(".partial"):
                progress.message(f"removed {name}, left by a backup that did not finish")
