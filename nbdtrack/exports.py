"""Exports: a name, a description, a backend stack, and the contexts it offers.

An ``Export`` answers what the handshake asks (size, flags, contexts) and the
metadata queries of BLOCK_STATUS; the ``ExportRegistry`` resolves the names clients
send, where "" selects the default export.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from urllib.parse import quote

from nbdtrack.protocol import constants as c
from nbdtrack.storage.backend import DATA, Backend, Extent
from nbdtrack.storage.faults import FaultFilter, FaultPlan
from nbdtrack.storage.file import FileBackend
from nbdtrack.tracking.bitmap import DirtyBitmap
from nbdtrack.tracking.checkpoint import Checkpoint, Checkpoints
from nbdtrack.tracking.errors import BitmapError
from nbdtrack.tracking.filter import TrackingFilter
from nbdtrack.tracking.snapshot import CopyBeforeWrite, SnapshotBackend
from nbdtrack.tracking.statefiles import StateFiles
from nbdtrack.tracking.tracker import DirtyTracker

DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"


class ExportStats:
    """Requests and bytes per command since start: what clients asked of an export."""

    def __init__(self) -> None:
        # Keyed by command number, named only when asked: counted on every request.
        self._requests: dict[int, int] = {}
        self._bytes: dict[int, int] = {}

    def count(self, command: int, length: int) -> None:
        self._requests[command] = self._requests.get(command, 0) + 1
        self._bytes[command] = self._bytes.get(command, 0) + length

    def as_dict(self) -> dict:
        def named(counts: dict[int, int]) -> dict[str, int]:
            return {c.COMMAND_NAMES.get(k, str(k)).lower(): v for k, v in counts.items()}

        return {"requests": named(self._requests), "bytes": named(self._bytes)}


class Export:
    def __init__(
        self,
        name: str,
        backend: Backend,
        description: str = "",
        read_only: bool = False,
        tracker: DirtyTracker | None = None,
        checkpoints: Checkpoints | None = None,
        frozen: DirtyBitmap | None = None,
    ) -> None:
        """``frozen`` makes a snapshot export: it publishes that bitmap's frozen bits."""
        self.name = name
        self.description = description
        self.backend = backend
        self.checkpoints = checkpoints
        self.frozen = frozen
        self.stats = ExportStats()
        # A snapshot export takes TRIM (to release what was copied) but no writes: it
        # is not read-only on the wire, and its backend refuses writes with EROFS.
        self.read_only = read_only or not (backend.can_write() or backend.can_trim())
        self.tracker = tracker
        # Access and limits, set from the configuration: reachable only over TLS (with
        # --tls=on), and at most this many connections (0: the server's default).
        self.tls_only = False
        self.max_connections = 0

    @property
    def size(self) -> int:
        return self.backend.size()

    def transmission_flags(self) -> int:
        # One process serves every connection through one descriptor per image, so a
        # FLUSH on any connection makes every completed write durable: CAN_MULTI_CONN.
        flags = (
            c.NBD_FLAG_HAS_FLAGS
            | c.NBD_FLAG_SEND_FLUSH
            | c.NBD_FLAG_SEND_FUA
            | c.NBD_FLAG_SEND_CACHE
            | c.NBD_FLAG_CAN_MULTI_CONN
        )
        if self.read_only:
            flags |= c.NBD_FLAG_READ_ONLY
        else:
            if self.backend.can_trim():
                flags |= c.NBD_FLAG_SEND_TRIM
            if self.backend.can_write():
                flags |= c.NBD_FLAG_SEND_WRITE_ZEROES
                if self.backend.can_fast_zero():
                    flags |= c.NBD_FLAG_SEND_FAST_ZERO
        return flags

    def published_bitmaps(self) -> list[str]:
        if self.frozen is not None:
            return [self.frozen.name]
        if self.tracker is None:
            return []
        # An inconsistent bitmap may under-report: it is never offered to clients.
        # list() copies in one step: control commands change the dict in worker threads.
        bitmaps = list(self.tracker.bitmaps.items())
        return [name for name, b in bitmaps if not b.inconsistent]

    def meta_contexts(self) -> list[str]:
        """base:allocation, then qemu:dirty-bitmap:NAME for every bitmap, as QEMU orders them."""
        return [c.BASE_ALLOCATION] + [DIRTY_BITMAP_PREFIX + n for n in self.published_bitmaps()]

    def context_extents(
        self, context: str, offset: int, length: int, limit: int, wait: bool = True
    ) -> list | None:
        """At most about ``limit`` (length, state) extents of a context from ``offset``.

        ``wait=False`` is the event loop's call: None unless the answer needs no I/O
        and no lock a worker may hold (allocation of an image without holes, bitmaps).
        """
        if context == c.BASE_ALLOCATION:
            if wait:
                return self.backend.extents(offset, length)
            return None if self.backend.may_have_holes() else [Extent(length, DATA)]
        name = context[len(DIRTY_BITMAP_PREFIX) :]
        if not context.startswith(DIRTY_BITMAP_PREFIX) or name not in self.published_bitmaps():
            raise KeyError(context)
        if self.frozen is not None:  # busy: its bits do not change while the snapshot lives
            return list(self.frozen.extents(offset, length, limit))
        assert self.tracker is not None
        try:
            return self.tracker.extents(name, offset, length, limit, wait)
        except BitmapError:
            raise KeyError(context) from None

    def snapshot_export(self, checkpoint: Checkpoint) -> Export:
        """The read-only (but TRIM-able) view of a checkpoint: ``NAME@CHECKPOINT``."""
        assert self.tracker is not None
        snapshot = Export(
            f"{self.name}@{checkpoint.name}",
            SnapshotBackend(checkpoint.snapshot),
            f"checkpoint '{checkpoint.name}' of '{self.name}', bitmap '{checkpoint.bitmap}'",
            frozen=self.tracker.get(checkpoint.bitmap),
        )
        snapshot.stats = self.stats  # what backups read counts against the image
        snapshot.tls_only = self.tls_only  # the same data: the same protection
        return snapshot

    def close(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.abort_all()
        self.backend.close()


class ExportRegistry:
    def __init__(self, exports: list[Export] | None = None) -> None:
        self._exports: dict[str, Export] = {}
        for export in exports or []:
            self.add(export)

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise ValueError(f"duplicate export name '{export.name}'")
        self._exports[export.name] = export

    def remove(self, name: str) -> Export:
        return self._exports.pop(name)

    def lookup(self, name: str) -> Export | None:
        """The export a client names; "" selects the default (the first) export."""
        if name == "" and name not in self._exports:
            return next(iter(self._exports.values()), None)
        return self._exports.get(name)

    def listing(self) -> Iterator[Export]:
        return iter(list(self._exports.values()))

    def __iter__(self) -> Iterator[Export]:
        return self.listing()

    def __len__(self) -> int:
        return len(self._exports)


def state_directory(state_dir: str, export_name: str) -> str:
    """Where one export's bitmaps live, always one level under STATE_DIR/exports.

    quote() leaves no "/" but keeps "." and "..", which would name the exports
    directory itself or its parent: those become "%2E" and "%2E%2E" (quote() never
    yields those, as it writes "%" as "%25"). "%" names the "" export likewise.
    """
    quoted = quote(export_name, safe="")
    if quoted in (".", ".."):
        quoted = quoted.replace(".", "%2E")
    return os.path.join(state_dir, "exports", quoted or "%")


def open_export(
    name: str,
    path: str,
    *,
    description: str = "",
    read_only: bool = False,
    state_dir: str | None = None,
    bitmaps: Iterable[tuple[str, int | None]] = (),
    faults: FaultPlan | None = None,
) -> Export:
    """A raw image or block device with dirty tracking, its bitmaps loaded and recovered.

    ``bitmaps`` are (name, granularity) to create when missing; ``faults`` puts a
    fault-injection filter right above the image (tests). Raises OSError for the image,
    StateError for the state directory, BitmapError for a bad bitmap.
    """
    backend: Backend = FileBackend(path, read_only=read_only)
    rules = faults.for_export(name) if faults is not None else []
    if rules:
        assert faults is not None
        backend = FaultFilter(backend, rules, faults.seed)
    try:
        files = StateFiles(state_directory(state_dir, name)) if state_dir else None
        tracker = DirtyTracker.open(name, backend.size(), files, backend.identity())
        try:
            for bitmap, granularity in bitmaps:
                if bitmap not in tracker.bitmaps:
                    tracker.add(bitmap, granularity)
        except BaseException:
            tracker.close(backend.identity())
            raise
    except BaseException:
        backend.close()
        raise
    cbw = CopyBeforeWrite(backend)
    return Export(
        name,
        TrackingFilter(cbw, tracker),
        description,
        read_only,
        tracker,
        Checkpoints(tracker, cbw),
    )
