"""Storage backends: the raw-file backend on files and block devices, and memory."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from nbdtrack.server.connection import READ_NOW_MAX, read_now
from nbdtrack.storage.backend import DATA, HOLE, Extent
from nbdtrack.storage.file import WRITE_NOW_MAX, FileBackend
from nbdtrack.storage.memory import MemoryBackend

MiB = 1024 * 1024


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_file_read_write_and_size(make_image):
    path = make_image(8 * MiB)
    b = FileBackend(str(path))
    assert b.size() == 8 * MiB and b.can_write() and b.can_extents()
    b.pwrite(b"abc" * 1000, 12345, fua=True)
    assert b.pread(3000, 12345) == b"abc" * 1000
    assert path.read_bytes()[12345 : 12345 + 3] == b"abc"
    b.close()


def test_file_extents_follow_holes(make_image):
    path = make_image(8 * MiB)
    b = FileBackend(str(path))
    assert b.extents(0, 8 * MiB) == [Extent(8 * MiB, HOLE)]
    b.pwrite(b"x" * MiB, 2 * MiB)
    assert b.extents(0, 8 * MiB) == [
        Extent(2 * MiB, HOLE),
        Extent(MiB, DATA),
        Extent(5 * MiB, HOLE),
    ]
    assert b.extents(2 * MiB + 10, 100) == [Extent(100, DATA)]
    assert b.extents(MiB, 2 * MiB) == [Extent(MiB, HOLE), Extent(MiB, DATA)]
    b.close()


def test_file_trim_punches_a_hole(make_image):
    path = make_image(8 * MiB)
    b = FileBackend(str(path))
    b.pwrite(b"y" * (4 * MiB), 0)
    before = allocated(path)
    b.trim(0, 2 * MiB)
    assert allocated(path) <= before - 2 * MiB
    assert b.pread(2 * MiB, 0) == bytes(2 * MiB)
    assert b.pread(10, 2 * MiB) == b"y" * 10
    b.close()


@pytest.mark.parametrize("may_trim", [True, False])
def test_file_zero(make_image, may_trim):
    path = make_image(8 * MiB)
    b = FileBackend(str(path))
    b.pwrite(b"z" * (4 * MiB), 0)
    b.zero(MiB, MiB + 7, may_trim=may_trim, fast=True)
    data = b.pread(4 * MiB, 0)
    assert data[:MiB] == b"z" * MiB
    assert data[MiB : 2 * MiB + 7] == bytes(MiB + 7)
    assert data[2 * MiB + 7 :] == b"z" * (2 * MiB - 7)
    b.close()


def test_file_zero_falls_back_to_writing_and_fast_zero_refuses(make_image):
    path = make_image(MiB)
    b = FileBackend(str(path))
    b.pwrite(b"q" * MiB, 0)
    b._can_punch = b._can_zero_range = False  # as on a filesystem without fallocate modes
    with pytest.raises(OSError) as err:
        b.zero(0, 4096, fast=True)
    assert err.value.errno == errno.ENOTSUP
    assert b.pread(4096, 0) == b"q" * 4096  # a refused fast zero leaves data untouched
    b.zero(0, 4096)
    assert b.pread(4097, 0) == bytes(4096) + b"q"
    b.close()


def test_file_read_only_and_missing(make_image, tmp_path):
    path = make_image(MiB)
    b = FileBackend(str(path), read_only=True)
    assert not b.can_write()
    with pytest.raises(OSError):
        b.pwrite(b"x", 0)
    b.close()
    with pytest.raises(FileNotFoundError):
        FileBackend(str(tmp_path / "missing.img"))
    with pytest.raises(OSError):
        FileBackend(str(tmp_path))  # a directory is neither file nor block device


@pytest.fixture
def loop_device(make_image):
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    path = make_image(16 * MiB, "loop.img")
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=True)


def test_block_device(loop_device):
    b = FileBackend(loop_device)
    assert b.is_block and b.size() == 16 * MiB
    assert not b.can_extents()
    assert b.extents(0, MiB) == [Extent(MiB, DATA)]
    b.pwrite(b"k" * 8192, 4096, fua=True)
    assert b.pread(8192, 4096) == b"k" * 8192
    b.zero(4096, 4096)
    assert b.pread(8192, 4096) == bytes(4096) + b"k" * 4096
    b.trim(0, MiB)  # a hint: must not fail
    b.flush()
    b.close()


def test_memory_backend():
    b = MemoryBackend(MiB)
    assert b.extents(0, MiB) == [Extent(MiB, HOLE)]
    b.pwrite(b"m" * 100, 65536 - 50)
    assert b.pread(100, 65536 - 50) == b"m" * 100
    assert b.extents(0, MiB) == [Extent(131072, DATA), Extent(MiB - 131072, HOLE)]
    b.zero(0, 65536)
    assert b.extents(0, 131072) == [Extent(65536, HOLE), Extent(65536, DATA)]
    b.zero(65536, 10)
    assert b.pread(60, 65536) == bytes(10) + b"m" * 40 + bytes(10)


def test_file_pread_nowait_and_hole_hint(make_image, tmp_path):
    """Cached data comes without a worker; the hole hint follows what the server did."""
    path = make_image(8 * MiB)
    b = FileBackend(str(path))
    assert b.may_have_holes()  # a fresh sparse image
    b.pwrite(b"n" * 4096, MiB)
    got = b.pread_nowait(4096, MiB)
    assert got is None or got == b"n" * 4096  # None: no RWF_NOWAIT here
    b.close()

    full = tmp_path / "full.img"
    full.write_bytes(b"f" * MiB)
    b = FileBackend(str(full))
    assert not b.may_have_holes()
    b.trim(0, 64 * 1024)
    assert b.may_have_holes()  # a punched hole: READs look for holes again
    b.close()


def test_filters_that_change_reads_are_not_bypassed(make_image):
    """A filter overriding pread gets no no-wait path unless it defines one."""
    from nbdtrack.storage.backend import Filter
    from nbdtrack.storage.faults import FaultFilter

    class Upper(Filter):
        def pread(self, length: int, offset: int) -> bytes:
            return self.inner.pread(length, offset).upper()

    path = make_image(MiB)
    inner = FileBackend(str(path))
    inner.pwrite(b"x" * 4096, 0)
    assert Upper(inner).pread_nowait(4096, 0) is None
    assert FaultFilter(inner, []).pread_nowait(4096, 0) is None
    assert Filter(inner).pread_nowait(4096, 0) in (None, b"x" * 4096)
    inner.close()


def test_read_now_takes_cached_reads_up_to_its_limit_only(tmp_path):
    """The event loop's READ: cached data up to READ_NOW_MAX; larger reads, and sparse
    reads of a file that may have holes (the hole search may block), go to a worker."""
    full = tmp_path / "full.img"
    full.write_bytes(os.urandom(2 * READ_NOW_MAX))
    b = FileBackend(str(full))
    if b.pread_nowait(4096, 0) is None:
        b.close()
        pytest.skip("no RWF_NOWAIT reads on this file system")
    [piece] = read_now(b, 4096, READ_NOW_MAX, sparse=True)  # no holes: no search needed
    assert (piece.offset, piece.length) == (4096, READ_NOW_MAX)
    assert bytes(piece.data) == full.read_bytes()[4096 : 4096 + READ_NOW_MAX]
    assert read_now(b, 0, READ_NOW_MAX + 4096, sparse=False) is None
    b.close()
    sparse = tmp_path / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(2 * MiB)
    b = FileBackend(str(sparse))
    assert read_now(b, 0, 4096, sparse=True) is None
    assert read_now(b, 0, 4096, sparse=False) is not None
    b.close()


def test_file_pwrite_now_takes_whole_page_writes_up_to_its_limit_only(make_image):
    """Written on the caller's thread: aligned and at most WRITE_NOW_MAX. Anything else is
    left (False) for a worker, and nothing of it is written."""
    path = make_image(16 * MiB)
    b = FileBackend(str(path))
    assert b.pwrite_now(b"a" * 4096, MiB)
    assert b.pwrite_now(b"b" * 65536, 2 * MiB)
    assert b.pwrite_now(b"f" * WRITE_NOW_MAX, 8 * MiB)
    assert b.pread(4096, MiB) == b"a" * 4096 and b.pread(65536, 2 * MiB) == b"b" * 65536
    assert b.pread(WRITE_NOW_MAX, 8 * MiB) == b"f" * WRITE_NOW_MAX
    for data, offset in [
        (b"c" * 4096, 6 * MiB + 512),  # a partial page: the kernel may read it first
        (b"c" * 1000, 3 * MiB),
        (b"c" * (WRITE_NOW_MAX + 4096), 3 * MiB),  # large: it would hold up other clients
        (b"", 0),
    ]:
        assert not b.pwrite_now(data, offset)
        assert b.pread(len(data), offset) == bytes(len(data))
    b._write_now_paused = float("inf")  # after a slow write: workers for a while
    assert not b.pwrite_now(b"d" * 4096, 5 * MiB)
    b.close()
    ro = FileBackend(str(path), read_only=True)
    assert not ro.pwrite_now(b"e" * 4096, 0)
    ro.close()


def test_filters_that_change_writes_are_not_bypassed(make_image):
    """A filter overriding pwrite (faults) gets no on-the-loop write unless it defines one."""
    from nbdtrack.storage.backend import Filter
    from nbdtrack.storage.faults import FaultFilter

    class Logged(Filter):
        def pwrite(self, data, offset: int, fua: bool = False) -> None:
            self.inner.pwrite(data, offset, fua)

    path = make_image(MiB)
    inner = FileBackend(str(path))
    assert not Logged(inner).pwrite_now(b"x" * 4096, 0)
    assert not FaultFilter(inner, []).pwrite_now(b"x" * 4096, 0)
    assert inner.pread(4096, 0) == bytes(4096)
    assert Filter(inner).pwrite_now(b"y" * 4096, 0)
    assert inner.pread(4096, 0) == b"y" * 4096
    inner.close()
