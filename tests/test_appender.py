"""The appender behind the qcow2 writer: every appended byte lands where it belongs,
through O_DIRECT where the file system takes it and through the page cache (with its
writeback started at once) where it does not; write errors reach the caller."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest

from nbdtrack.backup import appender as appender_module
from nbdtrack.backup.appender import ALIGN, Appender
from nbdtrack.backup.qcow2 import Qcow2Writer

K64 = 64 * 1024
MiB = 1024 * 1024


def _supports_direct(directory: Path) -> bool:
    probe = directory / "direct-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


def cached_bytes(path: Path) -> int:
    """What of the file the page cache holds, as util-linux's fincore counts it."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip())


def append_random(path: Path, sizes: list[int], start: int = 0, **kw) -> tuple[Appender, bytes]:
    """Append pieces of the given sizes to a new file at ``start``; returns what was sent."""
    rng = random.Random(len(sizes))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    appender = Appender(fd, str(path), start, buffer_bytes=MiB, buffers=3, **kw)
    sent = b""
    try:
        for size in sizes:
            data = rng.randbytes(size)
            appender.append(memoryview(data))
            sent += data
        appender.flush()
    finally:
        appender.close()
        os.close(fd)
    return appender, sent


def test_direct_appends_land_in_place_and_leave_the_page_cache_alone(tmp_path: Path) -> None:
    if not _supports_direct(tmp_path):
        pytest.skip(f"{tmp_path}: no O_DIRECT here")
    path = tmp_path / "direct.img"
    appender, sent = append_random(path, [K64] * 100 + [3 * MiB] + [ALIGN] * 7, start=K64)
    assert appender.end == K64 + len(sent)
    assert cached_bytes(path) == 0  # written around the cache
    assert path.read_bytes() == bytes(K64) + sent


def test_unaligned_tail_and_no_direct_go_through_the_cache_with_writeback_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each buffer written through the page cache is handed to writeback at once: the
    ranges advised are exactly the ranges written, one per buffer."""
    advised: list[tuple[int, int]] = []

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        advised.append((offset, length))

    monkeypatch.setattr(appender_module.os, "posix_fadvise", fadvise, raising=False)
    path = tmp_path / "cached.img"
    sizes = [12345, K64, 5 * MiB // 2, 1]
    appender, sent = append_random(path, sizes, start=512, direct=False)
    assert path.read_bytes() == bytes(512) + sent
    total = sum(sizes)
    assert advised == [(512 + n * MiB, min(MiB, total - n * MiB)) for n in range(-(-total // MiB))]


def test_a_file_system_refusing_the_alignment_falls_back_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _supports_direct(tmp_path):
        pytest.skip(f"{tmp_path}: no O_DIRECT here")
    real_pwrite = os.pwrite
    refused: list[int] = []
    direct_fds: set[int] = set()
    real_open_direct = appender_module._open_direct

    def open_direct(path: str) -> int:
        fd = real_open_direct(path)
        direct_fds.add(fd)
        return fd

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if fd in direct_fds:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(appender_module, "_open_direct", open_direct)
    monkeypatch.setattr(appender_module.os, "pwrite", pwrite)
    path = tmp_path / "fallback.img"
    appender, sent = append_random(path, [K64] * 80)
    assert refused == [0]  # tried once, then the page cache for good
    assert path.read_bytes() == sent


def test_a_write_error_reaches_the_writer_and_no_image_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC in the writing thread is raised by the next append, flush or close of the
    qcow2 writer; the job then aborts and removes the file."""
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        calls["n"] += 1
        if offset >= 2 * MiB:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(appender_module.os, "pwrite", pwrite)
    path = tmp_path / "full.qcow2"
    rng = random.Random(1)
    with pytest.raises(OSError) as raised, Qcow2Writer.create(path, 64 * MiB) as writer:
        for index in range(64 * MiB // K64):
            writer.write(index * K64, rng.randbytes(K64))
    assert raised.value.errno == errno.ENOSPC
    assert not path.exists()
    assert calls["n"] >= 2


def test_qcow2_writer_appends_its_data_directly(tmp_path: Path) -> None:
    """A backup image's data clusters bypass the page cache; the image is still whole
    (header and tables are written in place at close)."""
    if not _supports_direct(tmp_path):
        pytest.skip(f"{tmp_path}: no O_DIRECT here")
    path = tmp_path / "b.qcow2"
    rng = random.Random(2)
    data = {i: rng.randbytes(K64) for i in rng.sample(range(1024), 200)}
    writer = Qcow2Writer.create(path, 64 * MiB)
    for index, piece in data.items():
        writer.write(index * K64, piece)
    writer._appender.flush()
    assert writer._appender.direct
    assert cached_bytes(path) == 0
    writer.close()
    subprocess.run(["qemu-img", "check", str(path)], check=True, capture_output=True)
    raw = tmp_path / "b.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", path, raw], check=True)
    with open(raw, "rb") as f:
        for index, piece in data.items():
            f.seek(index * K64)
            assert f.read(K64) == piece
