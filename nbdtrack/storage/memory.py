"""An in-memory backend: sparse pages in a dict, for tests and scratch exports."""

from __future__ import annotations

import threading

from nbdtrack.storage.backend import DATA, HOLE, Backend, Extent

PAGE = 64 * 1024


class MemoryBackend(Backend):
    def __init__(self, size: int) -> None:
        self._size = size
        self._pages: dict[int, bytearray] = {}
        self._lock = threading.Lock()  # worker threads share the page dict

    def size(self) -> int:
        return self._size

    def can_write(self) -> bool:
        return True

    def can_extents(self) -> bool:
        return True

    def can_fast_zero(self) -> bool:
        return True

    def _spans(self, offset: int, length: int):
        """(page index, start in page, byte count) for each page the range touches."""
        end = offset + length
        while offset < end:
            index, start = divmod(offset, PAGE)
            count = min(PAGE - start, end - offset)
            yield index, start, count
            offset += count

    def pread(self, length: int, offset: int) -> bytes:
        out = bytearray(length)
        pos = 0
        with self._lock:
            for index, start, count in self._spans(offset, length):
                page = self._pages.get(index)
                if page is not None:
                    out[pos : pos + count] = page[start : start + count]
                pos += count
        return bytes(out)

    def pwrite(self, data: bytes | memoryview, offset: int, fua: bool = False) -> None:
        view = memoryview(data)
        pos = 0
        with self._lock:
            for index, start, count in self._spans(offset, len(view)):
                page = self._pages.setdefault(index, bytearray(PAGE))
                page[start : start + count] = view[pos : pos + count]
                pos += count

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.zero(offset, length, may_trim=True)

    def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        with self._lock:
            for index, start, count in self._spans(offset, length):
                if count == PAGE:
                    self._pages.pop(index, None)
                elif index in self._pages:
                    self._pages[index][start : start + count] = bytes(count)

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        with self._lock:
            for index, _start, count in self._spans(offset, length):
                flags = DATA if index in self._pages else HOLE
                if out and out[-1].flags == flags:
                    out[-1] = Extent(out[-1].length + count, flags)
                else:
                    out.append(Extent(count, flags))
        return out
