"""The backend interface every storage plugin implements, and the filter base.

Like nbdkit's plugin API: a backend is synchronous (the server runs it in worker
threads) and reports failures as ``OSError`` with an errno, which the server maps to
an NBD error. A ``Filter`` wraps the next layer with the same interface and changes
one behaviour (dirty tracking, copy-before-write, fault injection, ...).
"""

from __future__ import annotations

from typing import NamedTuple


class Extent(NamedTuple):
    """A run of ``length`` bytes with ``base:allocation`` ``flags`` (HOLE, ZERO)."""

    length: int
    flags: int


# Allocation flags: the same bits as NBD's base:allocation context.
STATE_HOLE = 1  # not allocated
STATE_ZERO = 2  # reads as zeros
DATA = 0
HOLE = STATE_HOLE | STATE_ZERO


class Backend:
    """Base class: read-only, no extents; subclasses override what they support."""

    def size(self) -> int:
        raise NotImplementedError

    def can_write(self) -> bool:
        return False

    def can_trim(self) -> bool:
        return self.can_write()

    def can_extents(self) -> bool:
        return False

    def can_fast_zero(self) -> bool:
        return False

    def pread(self, length: int, offset: int) -> bytes:
        raise NotImplementedError

    def pread_nowait(self, length: int, offset: int) -> bytes | bytearray | None:
        """The data if it can be had at once without blocking (e.g. from the page cache).

        Called on the event loop thread, so it must never wait for a device or a lock
        held across I/O; None (the default) means "call ``pread`` in a worker thread".
        A result shorter than ``length`` is never returned: that is None too.
        """
        return None

    def pwrite(self, data: bytes | memoryview, offset: int, fua: bool = False) -> None:
        raise OSError(30, "read-only backend")  # EROFS

    def pwrite_now(self, data: bytes | memoryview, offset: int) -> bool:
        """Write at once on the caller's (event loop) thread if that cannot wait long.

        True: written (an OSError is the write's own failure). False (the default):
        nothing was done, call ``pwrite`` in a worker thread.
        """
        return False

    def flush(self) -> None:
        """Make every completed write durable."""

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """A hint that a range is no longer needed; doing nothing is correct."""

    def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        raise OSError(30, "read-only backend")

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation of [offset, offset+length): by default all data."""
        return [Extent(length, DATA)]

    def may_have_holes(self) -> bool:
        """False only when no range reads as a hole: READs then skip the hole search.

        A hint: a hole the backend does not know of is still read, as zeros, as data.
        """
        return self.can_extents()

    def cache(self, offset: int, length: int) -> None:
        """Prefetch hint."""

    def identity(self) -> dict | None:
        """What identifies the stored content's version (size, mtime, ...), if knowable.

        Compared across a stop and start to notice writes made while not serving.
        """
        return None

    def close(self) -> None:
        pass


class Filter(Backend):
    """Passes every call to the next layer; subclasses override what they change."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def __init_subclass__(cls, **kwargs: object) -> None:
        """A filter that changes reads or writes (faults, snapshots) must not be bypassed
        by the no-wait paths: unless it says how, it goes through ``pread``/``pwrite``."""
        super().__init_subclass__(**kwargs)
        if cls.pread is not Filter.pread and cls.pread_nowait is Filter.pread_nowait:
            cls.pread_nowait = Backend.pread_nowait  # type: ignore[method-assign]
        if cls.pwrite is not Filter.pwrite and cls.pwrite_now is Filter.pwrite_now:
            cls.pwrite_now = Backend.pwrite_now  # type: ignore[method-assign]

    def size(self) -> int:
        return self.inner.size()

    def can_write(self) -> bool:
        return self.inner.can_write()

    def can_trim(self) -> bool:
        return self.inner.can_trim()

    def can_extents(self) -> bool:
        return self.inner.can_extents()

    def can_fast_zero(self) -> bool:
        return self.inner.can_fast_zero()

    def pread(self, length: int, offset: int) -> bytes:
        return self.inner.pread(length, offset)

    def pread_nowait(self, length: int, offset: int) -> bytes | bytearray | None:
        return self.inner.pread_nowait(length, offset)

    def pwrite(self, data: bytes | memoryview, offset: int, fua: bool = False) -> None:
        self.inner.pwrite(data, offset, fua)

    def pwrite_now(self, data: bytes | memoryview, offset: int) -> bool:
        return self.inner.pwrite_now(data, offset)

    def flush(self) -> None:
        self.inner.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.inner.trim(offset, length, fua)

    def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        self.inner.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.inner.extents(offset, length)

    def may_have_holes(self) -> bool:
        return self.inner.may_have_holes()

    def cache(self, offset: int, length: int) -> None:
        self.inner.cache(offset, length)

    def identity(self) -> dict | None:
        return self.inner.identity()

    def close(self) -> None:
        self.inner.close()
