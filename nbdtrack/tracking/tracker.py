"""The dirty bitmaps of one export, their management, and their crash-safe persistence.

Rules kept here:
- ``mark`` runs before any content-changing write reaches the backend. Newly dirtied
  granules are journaled and the journal made durable before it returns; granules that
  were already dirty (and durable) cost one bit test.
- Management operations (add, remove, clear, enable, disable, merge, transactions)
  apply under the tracker lock and are made durable (a compaction) before they return.
- Compaction writes the state file atomically, then starts an empty journal under a new
  id; the state names the journal id it covers, so a crash between the two replays
  nothing twice and loses nothing.
- Start-up after an unclean stop replays the journal: nothing is lost or invalidated.
  After a clean stop the image's identity (size, mtime, ctime, inode) is compared with
  what was recorded, and a change marks every bitmap inconsistent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from bitarray import bitarray

from nbdtrack.tracking.bitmap import (
    DEFAULT_GRANULARITY,
    DirtyBitmap,
    check_granularity,
    new_generation,
)
from nbdtrack.tracking.errors import BitmapError
from nbdtrack.tracking.journal import Journal, parse_journal
from nbdtrack.tracking.statefile import BitmapRecord, State, decode_state, encode_state
from nbdtrack.tracking.statefiles import StateFiles

log = logging.getLogger("nbdtrack.tracking")

STATE_NAME = "bitmaps"
JOURNAL_NAME = "journal"
COMPACT_JOURNAL_BYTES = 8 * 1024 * 1024
COMPACT_RETRY_SECONDS = 5.0  # after a failed compaction on the write path


class DirtyTracker:
    def __init__(self, label: str, size: int, files: StateFiles | None = None) -> None:
        """An empty tracker; ``open`` loads persistent state into one."""
        self.label = label
        self.size = size
        self.files = files
        self.bitmaps: dict[str, DirtyBitmap] = {}
        self._recording: list[DirtyBitmap] = []
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._quiescing = 0
        self.journal: Journal | None = None
        self.journal_id = b""
        self.closed = False
        self._compact_retry_at = 0.0
        # Writes marked but not finished: a clear must not lose their bits, since their
        # data may land after it.
        self._in_flight: dict[int, tuple[int, int]] = {}
        self._next_token = 0
        # Set by the tracking filter: makes acknowledged writes durable before bits are
        # dropped, so a power loss cannot take back data a backup already copied.
        self.flush_image: Callable[[], None] | None = None

    # --- opening and closing ---------------------------------------------------------

    @classmethod
    def open(
        cls, label: str, size: int, files: StateFiles | None, identity: dict | None
    ) -> DirtyTracker:
        """Load the state, replay the journal or check the image, and start recording."""
        tracker = cls(label, size, files)
        if files is None:
            return tracker
        files.lock()
        try:
            raw = files.read(STATE_NAME)
            journal_file = files.open_journal(JOURNAL_NAME)
            if raw is not None:
                state = decode_state(raw, files.path(STATE_NAME))
                tracker._load(state)
                if state.clean:
                    tracker._check_identity(state.identity, identity)
                else:
                    tracker._replay(state.journal_id, journal_file.read_all())
                tracker._check_size()
            tracker.journal = Journal(journal_file)
            tracker.compact(clean=False)
        except BaseException:
            files.unlock()
            raise
        return tracker

    def _load(self, state: State) -> None:
        reclaimed = []
        for rec in state.bitmaps:
            # A bitmap made for another image size loads as it was; _check_size handles it.
            expected = -(-self.size // rec.granularity)
            size = self.size if len(rec.bits) == expected else len(rec.bits) * rec.granularity
            bitmap = DirtyBitmap(
                rec.name,
                size,
                rec.granularity,
                recording=rec.recording,
                inconsistent=rec.inconsistent,
                bits=rec.bits,
                generation=rec.generation or None,
            )
            if rec.successor is not None:  # a checkpoint was open: it ends as an abort
                bitmap.bits |= rec.successor
                reclaimed.append(rec.name)
            self.bitmaps[rec.name] = bitmap
        self._update_recording()
        if reclaimed:
            log.warning(
                "export '%s': checkpoints of bitmaps %s were open at the stop: aborted, "
                "their bits kept and the writes made since merged back",
                self.label,
                ", ".join(f"'{name}'" for name in reclaimed),
            )

    def _check_identity(self, recorded: dict | None, current: dict | None) -> None:
        if not self.bitmaps or recorded is None or current is None:
            return
        changed = [key for key in sorted(recorded) if recorded.get(key) != current.get(key)]
        if changed:
            self._mark_all_inconsistent(
                f"the image changed while nbdtrack was not serving it ({', '.join(changed)} differ)"
            )

    def _check_size(self) -> None:
        wrong = [b for b in self.bitmaps.values() if b.size != self.size]
        if wrong:
            for bitmap in wrong:
                self.bitmaps[bitmap.name] = DirtyBitmap(
                    bitmap.name, self.size, bitmap.granularity, recording=bitmap.recording
                )
            self._mark_all_inconsistent(f"the image size changed to {self.size} bytes")

    def _mark_all_inconsistent(self, reason: str) -> None:
        for bitmap in self.bitmaps.values():
            bitmap.inconsistent = True
            bitmap.recording = False
        self._update_recording()
        log.warning(
            "export '%s': %s; bitmaps %s are now inconsistent: remove them and take a full backup",
            self.label,
            reason,
            ", ".join(f"'{name}'" for name in self.bitmaps),
        )

    def _replay(self, journal_id: bytes, data: bytes) -> None:
        records = parse_journal(data, journal_id) or []
        for offset, length in records:
            for bitmap in self._recording:
                bitmap.mark(offset, length)
        log.info(
            "export '%s': recovered from an unclean stop, %d journal records replayed",
            self.label,
            len(records),
        )

    def close(self, identity: dict | None) -> None:
        """A clean stop: write the state with the image's identity, keep no journal."""
        with self._lock:
            if self.closed:
                return
            if self.files is not None and self.journal is not None:
                try:
                    self.compact(clean=True, identity=identity)
                finally:
                    self.journal.close()
                    self.files.unlock()
            self.closed = True

    # --- persistence -----------------------------------------------------------------

    def compact(self, clean: bool = False, identity: dict | None = None) -> None:
        """Write every persistent bitmap atomically and start an empty journal."""
        if self.files is None or self.journal is None:
            return
        with self._lock:
            journal_id = os.urandom(16)
            state = State(
                journal_id,
                clean,
                identity if clean else None,
                [
                    BitmapRecord(
                        b.name,
                        b.granularity,
                        b.recording,
                        b.inconsistent,
                        b.bits,
                        b.generation,
                        b.successor.bits if b.successor is not None else None,
                    )
                    for b in self.bitmaps.values()
                    if b.persistent
                ],
            )
            self.files.replace(STATE_NAME, encode_state(state))
            self.journal.reset(journal_id)
            self.journal_id = journal_id

    # --- the write path --------------------------------------------------------------

    def mark(self, offset: int, length: int) -> int:
        """Dirty [offset, offset+length) in every recording bitmap, durably, before a write.

        Returns a token to pass to ``done`` once the write has finished.
        """
        journal = self.journal
        with self._lock:  # the condition's lock, without Condition.__enter__'s Python frame
            while self._quiescing:
                self._cond.wait()
            self._next_token = token = self._next_token + 1
            self._in_flight[token] = (offset, length)
            try:
                seq, compact = self._mark_locked(offset, length)
            except BaseException:
                del self._in_flight[token]
                raise
        if seq and journal is not None:  # seq 0: nothing of this range awaits a sync
            try:
                journal.wait_durable(seq)
            except BaseException:
                self.done(token)
                raise
        if compact:
            self._compact_on_write_path()
        return token

    def _compact_on_write_path(self) -> None:
        """Compact because the journal grew. The write's record is durable already, so a
        failure (a full disk) must not fail the write: log it and retry a bit later."""
        now = time.monotonic()
        if now < self._compact_retry_at:
            return
        try:
            self.compact()
        except OSError as err:
            self._compact_retry_at = now + COMPACT_RETRY_SECONDS
            log.warning(
                "export '%s': compacting the bitmap state failed, retrying later: %s",
                self.label,
                err,
            )

    def mark_now(self, offset: int, length: int) -> int | None:
        """``mark`` for a range already dirty and durable in every recording bitmap, or None.

        Called on the event loop thread, so it never waits: not for the lock (a worker
        may hold it across a compaction), not for a quiesce, not for the journal. None
        means "call ``mark`` in a worker thread".
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            journal = self.journal
            if self._quiescing or (
                journal is not None and (journal.durable < journal.appended or journal.broken)
            ):
                return None
            for bitmap in self._recording:
                if not bitmap.is_dirty(offset, length):
                    return None
            self._next_token = token = self._next_token + 1
            self._in_flight[token] = (offset, length)
            return token
        finally:
            self._lock.release()

    def done(self, token: int) -> None:
        """The write of ``token`` has finished. Takes the lock only to wake a quiesce, so
        that the event loop thread can call it: ``quiesced`` counts itself in
        ``_quiescing`` before it looks at ``_in_flight``, and the lock makes the
        notification wait for it to be waiting. Readers of ``_in_flight`` copy it (one
        C call under the GIL) rather than iterate it while this removes a token."""
        self._in_flight.pop(token, None)
        if self._quiescing:
            with self._lock:
                self._cond.notify_all()

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold new writes back and wait for those in flight: a point in time."""
        with self._cond:
            self._quiescing += 1
            try:
                while self._in_flight:
                    self._cond.wait()
            except BaseException:
                self._quiescing -= 1
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._quiescing -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self, offset: int, length: int) -> Iterator[None]:
        """Mark a range, durably, for the duration of the write that changes it."""
        token = self.mark(offset, length)
        try:
            yield
        finally:
            self.done(token)

    def _mark_locked(self, offset: int, length: int) -> tuple[int, bool]:
        """Set the bits; returns (journal sequence to wait for, whether to compact)."""
        new = False
        persistent_new = False
        for bitmap in self._recording:
            if bitmap.mark(offset, length):
                new = True
                if bitmap.persistent:
                    persistent_new = True
        journal = self.journal
        if journal is None:
            return 0, False
        # Already dirty, but maybe by a record that is not durable yet: wait for that.
        if persistent_new:
            seq = journal.append(offset, length)
        elif journal.durable >= journal.appended:  # the common case: every record durable
            return 0, False
        else:
            coarsest = max((b.granularity for b in self._recording), default=1)
            seq = journal.pending_for(offset, length, coarsest)
        if journal.broken is not None and seq > journal.durable:
            # A compaction writes these bits into the state and resets the journal; if it
            # fails again, wait_durable fails the write rather than let it go untracked.
            with contextlib.suppress(OSError):
                self.compact()
        return seq, new and journal.size > COMPACT_JOURNAL_BYTES

    # --- management ------------------------------------------------------------------

    def _update_recording(self) -> None:
        """The bitmaps writes mark: a frozen bitmap's successor records in its place."""
        self._recording = [b.successor or b for b in self.bitmaps.values() if b.recording]

    def get(self, name: str) -> DirtyBitmap:
        bitmap = self.bitmaps.get(name)
        if bitmap is None:
            raise BitmapError(f"Dirty bitmap '{name}' not found")
        return bitmap

    def _usable(self, name: str, allow_inconsistent: bool = False) -> DirtyBitmap:
        bitmap = self.get(name)
        if bitmap.busy:
            raise BitmapError(
                f"Bitmap '{name}' is currently in use by another operation and cannot be used"
            )
        if bitmap.inconsistent and not allow_inconsistent:
            raise BitmapError(
                f"Bitmap '{name}' is inconsistent and cannot be used; "
                "remove it and take a full backup"
            )
        return bitmap

    def _add(
        self,
        name: str,
        granularity: int | None = None,
        persistent: bool = True,
        disabled: bool = False,
    ) -> None:
        if name in self.bitmaps:
            raise BitmapError(f"Bitmap already exists: {name}")
        granularity = DEFAULT_GRANULARITY if granularity is None else granularity
        check_granularity(granularity)
        self.bitmaps[name] = DirtyBitmap(
            name, self.size, granularity, recording=not disabled, persistent=persistent
        )

    def _remove(self, name: str) -> None:
        self._usable(name, allow_inconsistent=True)
        del self.bitmaps[name]

    def _clear(self, name: str) -> None:
        bitmap = self._usable(name)
        bitmap.clear()
        for offset, length in list(self._in_flight.values()):
            bitmap.mark(offset, length)

    def _enable(self, name: str) -> None:
        self._usable(name).recording = True

    def _disable(self, name: str) -> None:
        self._usable(name).recording = False

    def _merge(self, target: str, bitmaps: list[str]) -> None:
        dest = self._usable(target)
        sources = [self._usable(name) for name in bitmaps]
        for src in sources:
            if src.granularity != dest.granularity:
                raise BitmapError(
                    f"Bitmap '{src.name}' has granularity {src.granularity} but "
                    f"'{dest.name}' has {dest.granularity}: merge needs the same granularity"
                )
        for src in sources:
            dest.merge(src)

    OPERATIONS: dict[str, Callable[..., None]] = {
        "add": _add,
        "remove": _remove,
        "clear": _clear,
        "enable": _enable,
        "disable": _disable,
        "merge": _merge,
    }

    def apply(self, operations: list[tuple[str, dict]]) -> None:
        """Run bitmap operations all or nothing, then make the result durable.

        ``operations`` are (name, arguments) with names from ``OPERATIONS``; a failure
        anywhere leaves every bitmap exactly as it was.
        """
        with self.transaction() as run:
            for op, args in operations:
                run(op, args)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Callable[[str, dict], None]]:
        """Hold the lock while the caller runs operations one by one with the function
        yielded; all are undone if the block raises, else made durable at its end.

        The QMP ``transaction`` nests several exports' transactions (entered in export
        name order, so two callers never deadlock) to be all or nothing across exports.
        """
        with self._lock:
            # Undo restores the same objects in place: snapshot exports and checkpoints
            # keep references to bitmaps, which must stay the tracker's own.
            saved = dict(self.bitmaps)
            states = {name: (dict(b.__dict__), b.bits.copy()) for name, b in saved.items()}
            flushed = False

            def run(op: str, args: dict) -> None:
                nonlocal flushed
                if op == "clear" and self.flush_image is not None and not flushed:
                    self.flush_image()  # as in apply: acknowledged data durable first
                    flushed = True
                self.OPERATIONS[op](self, **args)

            try:
                yield run
                self._update_recording()
                self.compact()
            except BaseException:
                for name, bitmap in saved.items():
                    state, bits = states[name]
                    bitmap.__dict__.update(state)
                    bitmap.bits[:] = bits
                self.bitmaps = saved
                self._update_recording()
                # A checkpoint started and aborted inside may have saved its state.
                with contextlib.suppress(OSError):
                    self.compact()
                raise

    # --- checkpoints -------------------------------------------------------------------

    def freeze(self, name: str) -> DirtyBitmap:
        """Start a checkpoint: the bitmap keeps its bits (busy), a successor records.

        Call while ``quiesced`` and after flushing the image, so that the frozen bits
        describe exactly the content at this instant, durably.
        """
        with self._lock:
            bitmap = self._usable(name)
            successor = DirtyBitmap(
                name, self.size, bitmap.granularity, persistent=bitmap.persistent
            )
            for offset, length in list(self._in_flight.values()):
                successor.mark(offset, length)
            bitmap.successor = successor
            bitmap.busy = True
            self._update_recording()
            self.compact()
            return bitmap

    def unfreeze(self, name: str, drop: bitarray | None, generation: str | None = None) -> str:
        """End a checkpoint; returns the bitmap's generation afterwards.

        ``drop`` are the bits the checkpoint copied (all of them after a successful
        incremental, the released ones for sync=always, None to keep every bit). The
        successor's bits are merged back in every case, so nothing written is lost.
        """
        with self._lock:
            bitmap = self.get(name)
            successor = bitmap.successor
            if successor is None:
                raise BitmapError(f"Bitmap '{name}' has no checkpoint open")
            if drop is not None and drop.any():
                if self.flush_image is not None:
                    self.flush_image()
                bitmap.bits &= ~drop
                bitmap.generation = generation or new_generation()
            bitmap.bits |= successor.bits
            bitmap.successor = None
            bitmap.busy = False
            self._update_recording()
            self.compact()
            return bitmap.generation

    def add(self, name: str, granularity: int | None = None, **kw: bool) -> None:
        self.apply([("add", {"name": name, "granularity": granularity, **kw})])

    def query(self) -> list[dict]:
        with self._lock:
            return [b.info() for b in self.bitmaps.values()]

    def extents(
        self, name: str, offset: int, length: int, limit: int, wait: bool = True
    ) -> list[tuple[int, int]] | None:
        """A bitmap's (length, dirty) runs. ``wait=False`` (the event loop) gives None
        rather than wait for the lock, which a worker may hold across a compaction."""
        if not self._lock.acquire(blocking=wait):
            return None
        try:
            bitmap = self.get(name)
            if bitmap.successor is not None:  # frozen: what it holds and what came since
                bitmap = DirtyBitmap(
                    name,
                    self.size,
                    bitmap.granularity,
                    bits=bitmap.bits | bitmap.successor.bits,
                )
            return list(bitmap.extents(offset, length, limit))
        finally:
            self._lock.release()
