"""Checkpoints: a consistent point in time of a live export, for one backup.

Start (writes held back for an instant): flush the image, freeze the bitmap (a
successor records from now on) and open a copy-before-write snapshot. Finish:
success drops the bits the backup copied, failure keeps them; the successor is merged
back either way (QEMU's abdicate and reclaim). Sync modes as QEMU's backup job:

- ``on-success``: an incremental chain; success drops every frozen bit.
- ``never``: a differential; the bitmap keeps all its bits, whatever happens.
- ``always``: success drops every frozen bit; failure drops those the backup released
  (TRIM on the snapshot export), so a retry resumes where it stopped.

A crash with a checkpoint open recovers as an abort (the tracker merges the persisted
successor back at start-up); leftover fleece files are removed then.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
import threading
from dataclasses import dataclass

from bitarray import bitarray

from nbdtrack.tracking.bitmap import derived_generation
from nbdtrack.tracking.errors import BitmapError
from nbdtrack.tracking.snapshot import CopyBeforeWrite, Snapshot
from nbdtrack.tracking.tracker import DirtyTracker

SYNC_MODES = ("on-success", "never", "always")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class Checkpoint:
    name: str
    bitmap: str
    sync: str
    snapshot: Snapshot
    generation: str  # the bitmap's generation when the checkpoint started


class Checkpoints:
    """The open checkpoints of one export."""

    def __init__(self, tracker: DirtyTracker, cbw: CopyBeforeWrite) -> None:
        self.tracker = tracker
        self.cbw = cbw
        self.open: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()
        self._counter = 0
        if tracker.files is not None:
            self.fleece_dir = tracker.files.directory
            for leftover in glob.glob(os.path.join(self.fleece_dir, "fleece-*")):
                os.unlink(leftover)
        else:
            self.fleece_dir = tempfile.gettempdir()

    def start(self, bitmap: str, sync: str = "on-success", name: str | None = None) -> Checkpoint:
        if sync not in SYNC_MODES:
            raise BitmapError(
                f"Invalid sync mode '{sync}': expected one of {', '.join(SYNC_MODES)}"
            )
        with self._lock:
            if name is None:
                self._counter += 1
                name = f"ckpt-{self._counter}"
                while name in self.open:
                    self._counter += 1
                    name = f"ckpt-{self._counter}"
            if not _NAME.match(name):
                raise BitmapError(f"Invalid checkpoint name '{name}'")
            if name in self.open:
                raise BitmapError(f"Checkpoint '{name}' already exists")
            fleece = os.path.join(self.fleece_dir, f"fleece-{os.getpid()}-{name}")
            with self.tracker.quiesced():
                if self.tracker.flush_image is not None:
                    self.tracker.flush_image()
                frozen = self.tracker.freeze(bitmap)
                try:
                    snapshot = self.cbw.open_snapshot(fleece)
                except BaseException:
                    self.tracker.unfreeze(bitmap, None)
                    raise
            checkpoint = Checkpoint(name, bitmap, sync, snapshot, frozen.generation)
            self.open[name] = checkpoint
            return checkpoint

    def finish(self, name: str, success: bool) -> str:
        """Commit (success) or abort a checkpoint; returns the bitmap's new generation."""
        with self._lock:
            checkpoint = self.open.pop(name, None)
            if checkpoint is None:
                raise BitmapError(f"Checkpoint '{name}' not found")
        snapshot = checkpoint.snapshot
        self.cbw.close_snapshot(snapshot)
        frozen = self.tracker.get(checkpoint.bitmap)
        generation = None
        if checkpoint.sync == "never":
            drop = None
        elif success:
            drop = frozen.bits.copy()
        elif checkpoint.sync == "always":
            drop = released_bits(snapshot, frozen.granularity, len(frozen.bits))
            generation = derived_generation(checkpoint.generation, checkpoint.name)
        else:
            drop = None
        return self.tracker.unfreeze(checkpoint.bitmap, drop, generation)

    def abort_all(self) -> None:
        for name in list(self.open):
            self.finish(name, success=False)


def released_bits(snapshot: Snapshot, granularity: int, nbits: int) -> bitarray:
    """The bitmap granules wholly inside clusters the backup released."""
    out = bitarray(nbits)
    out.setall(0)
    cluster = snapshot.cluster
    for index in snapshot.released.search(1):
        start, end = index * cluster, min((index + 1) * cluster, snapshot.size)
        first = -(-start // granularity)
        last = end // granularity if end < snapshot.size else nbits
        if first < last:
            out[first:last] = 1
    return out
