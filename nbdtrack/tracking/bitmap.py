"""One dirty bitmap: a bit per granule of an export, with QEMU's states and rules.

A bit set means "the content of this granule may differ from the last checkpoint".
Marking a byte range sets the bits of every granule it touches; a 1-byte write dirties
its whole granule. Runs are found with bitarray's C search, so reporting extents costs
O(runs), not O(image).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

from bitarray import bitarray

from nbdtrack.tracking.errors import BitmapError

DEFAULT_GRANULARITY = 64 * 1024
MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31
MAX_NAME_BYTES = 1023
STATE_DIRTY = 1  # qemu:dirty-bitmap bit 0


def new_generation() -> str:
    return os.urandom(8).hex()


def derived_generation(generation: str, checkpoint: str) -> str:
    """The generation after an aborted sync=always checkpoint dropped what it released.

    Derived rather than random, so the backup that resumes can tell its own abort from
    any other change of the bitmap.
    """
    return hashlib.blake2b(f"{generation}/{checkpoint}".encode(), digest_size=8).hexdigest()


def check_name(name: str) -> None:
    if not name:
        raise BitmapError("Bitmap name cannot be empty")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise BitmapError(f"Bitmap name too long: {name}")


def check_granularity(granularity: int) -> None:
    if (
        granularity < MIN_GRANULARITY
        or granularity > MAX_GRANULARITY
        or granularity & (granularity - 1)
    ):
        raise BitmapError("Granularity must be power of 2, and at least 512")


class DirtyBitmap:
    def __init__(
        self,
        name: str,
        size: int,
        granularity: int = DEFAULT_GRANULARITY,
        *,
        recording: bool = True,
        persistent: bool = True,
        inconsistent: bool = False,
        bits: bitarray | None = None,
        generation: str | None = None,
    ) -> None:
        check_name(name)
        check_granularity(granularity)
        self.name = name
        self.size = size
        self.granularity = granularity
        self.recording = recording
        self.persistent = persistent
        self.inconsistent = inconsistent
        self.busy = False
        # Changes whenever bits are dropped (clear, a committed checkpoint): a backup
        # chain continues only from the generation its last backup recorded.
        self.generation = generation or new_generation()
        # While a checkpoint is open: the bitmap is frozen and this one records instead.
        self.successor: DirtyBitmap | None = None
        nbits = -(-size // granularity)
        if bits is None:
            bits = bitarray(nbits)
            bits.setall(0)
        elif len(bits) != nbits:
            raise BitmapError(f"Bitmap '{name}' has {len(bits)} bits, expected {nbits}")
        self.bits = bits

    def _granules(self, offset: int, length: int) -> tuple[int, int]:
        first = offset // self.granularity
        last = min(-(-(offset + length) // self.granularity), len(self.bits))
        return first, last

    def mark(self, offset: int, length: int) -> bool:
        """Dirty every granule of [offset, offset+length); True if any bit was clean."""
        if length <= 0:
            return False
        first, last = self._granules(offset, length)
        if last - first == 1:
            if self.bits[first]:
                return False
            self.bits[first] = 1
            return True
        if first >= last or self.bits.count(1, first, last) == last - first:
            return False
        self.bits[first:last] = 1
        return True

    def is_dirty(self, offset: int, length: int) -> bool:
        """Every granule of the range dirty (counted in place: a slice would copy)."""
        first, last = self._granules(offset, length)
        if last - first == 1:
            return bool(self.bits[first])
        return first < last and self.bits.count(1, first, last) == last - first

    def clear(self) -> None:
        self.bits.setall(0)
        self.generation = new_generation()

    def merge(self, other: DirtyBitmap) -> None:
        self.bits |= other.bits

    @property
    def dirty_bytes(self) -> int:
        count = self.bits.count()
        if count and self.bits[-1]:
            count_bytes = count * self.granularity
            return count_bytes - (len(self.bits) * self.granularity - self.size)
        return count * self.granularity

    def extents(self, offset: int, length: int, limit: int) -> Iterator[tuple[int, int]]:
        """(length, state) runs over [offset, offset+length), at most ``limit`` of them.

        The first starts at ``offset``, the last ends exactly at the request end, and
        interior boundaries fall on granule multiples, as QEMU reports them.
        """
        end = min(offset + length, self.size)
        pos = offset
        granule = offset // self.granularity
        bits = self.bits
        count = 0
        while pos < end and count < limit:
            value = bits[granule]
            last = -(-end // self.granularity)
            change = bits.find(not value, granule + 1, last)
            run_end = end if change < 0 else min(change * self.granularity, end)
            yield run_end - pos, STATE_DIRTY if value else 0
            count += 1
            pos = run_end
            granule = change

    def info(self) -> dict:
        """The fields QEMU's query commands show for a bitmap."""
        return {
            "name": self.name,
            "granularity": self.granularity,
            "count": self.dirty_bytes,
            "recording": self.recording,
            "busy": self.busy,
            "persistent": self.persistent,
            "inconsistent": self.inconsistent,
            "generation": self.generation,
        }
