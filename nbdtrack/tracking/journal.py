"""The dirty journal: newly dirtied ranges, made durable before data is written.

A write that dirties a clean granule appends a record and waits until the record is
durable; concurrent writers share one sync (group commit: the first waiter writes and
syncs everything pending while the others wait for it). A write whose granules were
already dirty and durable pays nothing.

File format: a header (magic + the 16-byte journal id that the state file names), then
records of (offset, length, crc32). Only the tail can be torn by a crash, and replay
stops at the first record whose checksum does not match.

A journal that could not be reset, or whose torn append could not be cut off, is
``broken``: appending after it could hide records from replay, so every record not
yet durable fails (the write it guards fails too) until a compaction resets it.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections import deque

from nbdtrack.tracking.statefiles import JournalFile

MAGIC = b"NBDTRACK-JOURNAL1\n"
ID_LENGTH = 16
RECORD = struct.Struct(">QQI")
_RANGE = struct.Struct(">QQ")


def header(journal_id: bytes) -> bytes:
    return MAGIC + journal_id


def encode_record(offset: int, length: int) -> bytes:
    return RECORD.pack(offset, length, zlib.crc32(_RANGE.pack(offset, length)))


def parse_journal(data: bytes, journal_id: bytes) -> list[tuple[int, int]] | None:
    """The (offset, length) records of a journal, or None if it is not this journal."""
    head = header(journal_id)
    if not data.startswith(head):
        return None
    records = []
    for pos in range(len(head), len(data) - RECORD.size + 1, RECORD.size):
        offset, length, crc = RECORD.unpack_from(data, pos)
        if crc != zlib.crc32(_RANGE.pack(offset, length)):
            break  # a torn tail: nothing after it was ever acknowledged
        records.append((offset, length))
    return records


class Journal:
    def __init__(self, file: JournalFile) -> None:
        self.file = file
        self._cond = threading.Condition(threading.Lock())
        self._pending = bytearray()
        # (seq, offset, length) of the records not durable yet: a write to a granule
        # that is already dirty waits only for the records that touched it, so one
        # record stuck on a full disk does not fail writes to granules already durable.
        self._unsynced: deque[tuple[int, int, int]] = deque()
        self._syncing = False
        self._good_size = file.size()
        self.appended = 0  # sequence number of the last appended record
        self.durable = 0  # every record up to this one is on stable storage
        self.broken: OSError | None = None  # why no record can be made durable now

    @property
    def size(self) -> int:
        return self._good_size + len(self._pending)

    def append(self, offset: int, length: int) -> int:
        """Queue a record; returns the sequence number to pass to ``wait_durable``."""
        with self._cond:
            self._pending += encode_record(offset, length)
            self.appended += 1
            self._unsynced.append((self.appended, offset, length))
            return self.appended

    def pending_for(self, offset: int, length: int, granularity: int) -> int:
        """The newest record not yet durable that dirtied a granule of this range (0: none).

        Granules are ``granularity`` bytes (the coarsest of the bitmaps), so a record
        counts when it touched the same granule, even without overlapping the range.
        """
        start = offset - offset % granularity
        end = offset + length + (-(offset + length)) % granularity
        with self._cond:
            return max(
                (s for s, o, n in self._unsynced if o < end and o + max(n, 1) > start),
                default=0,
            )

    def wait_durable(self, seq: int) -> None:
        """Return once record ``seq`` is durable; raise OSError if it cannot be made so."""
        if self.durable >= seq:
            return
        with self._cond:
            while self.durable < seq:
                if self.broken is not None:
                    raise OSError(
                        self.broken.errno,
                        f"bitmap journal unusable: {self.broken.strerror or self.broken}",
                    )
                if self._syncing:
                    self._cond.wait()
                else:
                    self._sync_locked()

    def _sync_locked(self) -> None:
        """Write and sync everything pending; called with the lock held, drops it meanwhile."""
        self._syncing = True
        data = bytes(self._pending)
        target = self.appended
        error: OSError | None = None
        self._cond.release()
        try:
            self.file.append(data)
            self.file.sync()
        except OSError as err:
            error = err
            try:  # cut a partial append so later records are not hidden behind it
                self.file.truncate(self._good_size)
            except OSError:
                self.broken = err
        finally:
            self._cond.acquire()
            self._syncing = False
            self._cond.notify_all()
        if error is not None:
            raise error
        del self._pending[: len(data)]
        self._good_size += len(data)
        self.durable = target
        while self._unsynced and self._unsynced[0][0] <= target:
            self._unsynced.popleft()

    def reset(self, journal_id: bytes) -> None:
        """Start an empty journal: everything appended so far is in a durable state file."""
        with self._cond:
            while self._syncing:
                self._cond.wait()
            # Whatever happens now, the state file just written holds every record.
            self._pending.clear()
            self._unsynced.clear()
            self.durable = self.appended
            try:
                self.file.reset(header(journal_id))
                self._good_size = self.file.size()
            except OSError as err:
                self.broken = err
                raise
            else:
                self.broken = None
            finally:
                self._cond.notify_all()

    def close(self) -> None:
        self.file.close()
