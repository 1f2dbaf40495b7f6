"""Fault injection: each injected storage error reaches the client as the right NBD
error, the connection stays usable, a failed write is still dirty, and afterwards the
data and bitmaps are exactly what the operations imply. A bitmap journal that cannot be
written (a full disk) fails the write with ENOSPC instead of letting it go untracked."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from nbdtrack.client import NBDRequestError, connect
from nbdtrack.protocol import constants as c
from nbdtrack.storage.faults import FaultConfigError, FaultFilter, load_rules, parse_rules
from nbdtrack.storage.memory import MemoryBackend
from nbdtrack.tracking import tracker as tracker_module
from nbdtrack.tracking.filter import TrackingFilter
from nbdtrack.tracking.statefiles import JournalFile, StateFiles
from nbdtrack.tracking.tracker import DirtyTracker

KiB = 1024
MiB = 1024 * KiB
GRAN = 4 * KiB
BITMAP = "qemu:dirty-bitmap:b0"

# (op, errno, start MiB, extra) -- each fires once, in its own MiB of the image
RULES = [
    {"op": "write", "errno": "EIO", "start": 1 * MiB, "end": 2 * MiB, "count": 1},
    {"op": "write", "errno": "ENOSPC", "start": 2 * MiB, "end": 3 * MiB, "count": 1},
    {"op": "write", "short": True, "start": 3 * MiB, "end": 4 * MiB, "count": 1},
    {"op": "read", "errno": "EIO", "start": 4 * MiB, "end": 5 * MiB, "count": 1},
    {"op": "read", "short": True, "start": 5 * MiB, "end": 6 * MiB, "count": 3},
    {"op": "flush", "errno": "ENOSPC", "count": 1},
    {"op": "trim", "errno": "EIO", "start": 6 * MiB, "end": 7 * MiB, "count": 1},
    {"op": "zero", "errno": "ENOSPC", "start": 7 * MiB, "end": 8 * MiB, "count": 1},
    {"op": "zero", "short": True, "start": 8 * MiB, "end": 9 * MiB, "count": 1},
    {"op": "write", "errno": "EDQUOT", "start": 9 * MiB, "end": 10 * MiB, "count": 1},
    {"op": "write", "errno": "EPERM", "start": 10 * MiB, "end": 11 * MiB, "count": 1},
    {"op": "read", "errno": "ENOMEM", "start": 11 * MiB, "end": 12 * MiB, "count": 1},
    {"op": "write", "errno": errno.EBADF, "start": 12 * MiB, "end": 13 * MiB, "count": 1},
    {"op": "trim", "short": True, "start": 13 * MiB, "end": 14 * MiB, "count": 1},
    {"op": "write", "errno": "EIO", "start": 14 * MiB, "end": 15 * MiB, "skip": 2, "count": 1},
]


class Model:
    """What the image and the bitmap must hold, given what was asked and answered."""

    def __init__(self, content: bytes) -> None:
        self.data = bytearray(content)
        self.dirty: set[int] = set()

    def touch(self, offset: int, length: int) -> None:
        self.dirty.update(range(offset // GRAN, (offset + length - 1) // GRAN + 1))

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self.touch(offset, len(data))

    def zero(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)
        self.touch(offset, length)


async def expect_error(call, error: int) -> None:
    with pytest.raises(NBDRequestError) as err:
        await call
    assert err.value.error == error, err.value


async def dirty_granules(client, size: int) -> set[int]:
    found, pos = set(), 0
    while pos < size:
        extents = (await client.block_status(pos, size - pos))[BITMAP]
        for ext in extents:
            if ext.flags & 1:
                found.update(range(pos // GRAN, (pos + ext.length) // GRAN))
            pos += ext.length
    return found


def test_injected_faults_map_to_nbd_errors(nbd_server, make_image, tmp_path):
    size = 16 * MiB
    image = make_image(size)
    content = bytes((i * 7 + 3) & 0xFF for i in range(256)) * (size // 256)
    image.write_bytes(content)
    rules = tmp_path / "faults.json"
    rules.write_text(json.dumps({"faults": RULES}))
    srv = nbd_server(
        str(image), "--faults", str(rules), "--bitmap", f"b0:{GRAN}", export="disk"
    )
    model = Model(content)
    target = (srv.host, srv.port)
    k64 = 64 * KiB
    new = b"N" * k64

    async def main():
        simple = await connect(target, "disk", structured=False, extended=False)
        structured = await connect(target, "disk", extended=False)
        nbd = await connect(target, "disk", meta_contexts=[BITMAP])
        clients = (simple, structured, nbd)

        async def failed_write(offset: int, error: int, client=nbd) -> None:
            await expect_error(client.pwrite(new, offset), error)
            model.touch(offset, len(new))  # still dirty: it may have written part

        # write: EIO, ENOSPC, a short write, then a retry that succeeds
        for offset, error in ((1 * MiB + 4096, c.NBD_EIO), (2 * MiB, c.NBD_ENOSPC)):
            await failed_write(offset, error)
            await nbd.pwrite(new, offset)
            model.write(offset, new)
        await failed_write(3 * MiB, c.NBD_EIO)
        model.write(3 * MiB, new[: k64 // 2])  # the first half landed
        # read: EIO, and a short read in every reply mode, each noticed by the server
        await expect_error(nbd.pread(4096, 4 * MiB), c.NBD_EIO)
        assert await nbd.pread(4096, 4 * MiB) == bytes(model.data[4 * MiB : 4 * MiB + 4096])
        for client in clients:
            await expect_error(client.pread(k64, 5 * MiB), c.NBD_EIO)
        for client in clients:  # still in sync: the next read is whole and right
            got = await client.pread(k64, 5 * MiB)
            assert got == bytes(model.data[5 * MiB : 5 * MiB + k64])
        # flush
        await expect_error(nbd.flush(), c.NBD_ENOSPC)
        await nbd.flush()
        # trim and write zeroes: failed ones are dirty, short ones did half
        await expect_error(nbd.trim(6 * MiB, k64), c.NBD_EIO)
        model.touch(6 * MiB, k64)
        await nbd.trim(6 * MiB, k64)
        model.zero(6 * MiB, k64)  # a punched hole reads as zeros
        await expect_error(nbd.zero(7 * MiB, k64), c.NBD_ENOSPC)
        model.touch(7 * MiB, k64)
        await expect_error(nbd.zero(8 * MiB, k64), c.NBD_EIO)
        model.touch(8 * MiB, k64)
        model.zero(8 * MiB, k64 // 2)
        await expect_error(nbd.trim(13 * MiB, k64), c.NBD_EIO)
        model.touch(13 * MiB, k64)
        model.zero(13 * MiB, k64 // 2)
        # errno mapping: EDQUOT -> ENOSPC, EPERM -> EPERM, ENOMEM, anything else -> EIO
        await failed_write(9 * MiB, c.NBD_ENOSPC)
        await failed_write(10 * MiB, c.NBD_EPERM, simple)  # simple replies carry it too
        await expect_error(nbd.pread(4096, 11 * MiB), c.NBD_ENOMEM)
        await failed_write(12 * MiB, c.NBD_EIO)
        # skip=2: the third write in range fails, not the first two
        for i in range(2):
            await nbd.pwrite(new, 14 * MiB + i * k64)
            model.write(14 * MiB + i * k64, new)
        await failed_write(14 * MiB + 2 * k64, c.NBD_EIO)
        for client in clients:  # every connection is still usable
            assert await client.pread(4096, 0) == bytes(model.data[:4096])
        assert await dirty_granules(nbd, size) == model.dirty
        await nbd.flush()
        for client in clients:
            await client.disconnect()

    asyncio.run(main())
    assert srv.stop() == 0
    assert image.read_bytes() == bytes(model.data)
    assert srv.log.count("injecting") == 17  # 15 rules, the short read fires 3 times
    assert "short read from storage" in srv.log


# --- the filter and its rules, without a server ---------------------------------------------


def test_rules_count_skip_probability_and_export():
    plan = parse_rules(
        {
            "seed": 7,
            "faults": [
                {"op": "write", "skip": 1, "count": 2, "export": "a"},
                {"op": "read", "probability": 0.5, "errno": "ENOSPC"},
                {"op": "any", "start": 4096, "end": 8192, "errno": 5},
            ],
        }
    )
    assert [r.op for r in plan.for_export("b")] == ["read", "any"]
    disk = FaultFilter(MemoryBackend(1 << 20), plan.for_export("a"), plan.seed)
    outcomes = []
    for _ in range(5):
        try:
            disk.pwrite(b"x", 0)
            outcomes.append("ok")
        except OSError as err:
            outcomes.append(err.errno)
    assert outcomes == ["ok", errno.EIO, errno.EIO, "ok", "ok"]
    failures = 0
    for _ in range(200):
        try:
            disk.pread(1, 0)
        except OSError as err:
            assert err.errno == errno.ENOSPC
            failures += 1
    assert 60 < failures < 140  # seeded: the same every run
    with pytest.raises(OSError):
        disk.trim(8000, 500)  # "any" overlaps [4096, 8192)
    disk.trim(8192, 4096)  # just past the range


@pytest.mark.parametrize(
    "rules, message",
    [
        ({"faults": [{"op": "scribble"}]}, "'op' must be one of"),
        ({"faults": [{"op": "read", "errno": "EWHAT"}]}, "unknown errno 'EWHAT'"),
        ({"faults": [{"op": "read", "probability": 2}]}, "between 0 and 1"),
        ({"faults": [{"op": "flush", "short": True}]}, "'short' needs op"),
        ({"faults": [{"op": "read", "start": 10, "end": 5}]}, "'end' must be past"),
        ({"faults": [{"op": "read", "count": -1}]}, "non-negative integer"),
        ({"faults": [{"op": "read", "bogus": 1}]}, "unknown key 'bogus'"),
        ({"rules": []}, "unknown key 'rules'"),
    ],
)
def test_bad_rules_are_refused(rules, message):
    with pytest.raises(FaultConfigError) as err:
        parse_rules(rules, "f.json")
    assert message in str(err.value) and str(err.value).startswith("f.json: ")


def test_rules_file_in_toml_and_cli_errors(tmp_path, image):
    toml = tmp_path / "faults.toml"
    toml.write_text('seed = 3\n[[fault]]\nop = "write"\nerrno = "ENOSPC"\ncount = 1\n')
    plan = load_rules(str(toml))
    assert plan.seed == 3 and plan.rules[0].errno == errno.ENOSPC
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    proc = subprocess.run(
        [sys.executable, "-m", "nbdtrack", "serve", str(image), "--listen", "127.0.0.1:0",
         "--state-dir", str(tmp_path / "s"), "--faults", str(bad)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.startswith(f"nbdtrack: error: {bad}: cannot parse")
    assert proc.stderr.count("\n") == 1


# --- the bitmap journal on a full disk ---------------------------------------------------------


class FlakyJournal(JournalFile):
    """A journal file whose disk can be made full, or whose reset can be made to fail."""

    full = False
    reset_fails = False

    def append(self, data: bytes) -> None:
        if FlakyJournal.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().append(data)

    def reset(self, header: bytes) -> None:
        if FlakyJournal.reset_fails:
            os.ftruncate(self.fd, 0)
            raise OSError(errno.EIO, "Input/output error")
        super().reset(header)


class FlakyFiles(StateFiles):
    full = False

    def open_journal(self, name: str) -> JournalFile:
        return FlakyJournal(self.path(name))

    def replace(self, name: str, data: bytes) -> None:
        if FlakyFiles.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().replace(name, data)


@pytest.fixture
def flaky(tmp_path, monkeypatch):
    monkeypatch.setattr(FlakyJournal, "full", False)
    monkeypatch.setattr(FlakyJournal, "reset_fails", False)
    monkeypatch.setattr(FlakyFiles, "full", False)
    tracker = DirtyTracker.open("disk", 8 * MiB, FlakyFiles(str(tmp_path)), None)
    tracker.add("b", GRAN)
    disk = MemoryBackend(8 * MiB)
    yield tracker, disk, TrackingFilter(disk, tracker)
    FlakyJournal.full = FlakyJournal.reset_fails = FlakyFiles.full = False
    tracker.close(None)


def _quiesces(tracker: DirtyTracker) -> bool:
    done = threading.Event()

    def run() -> None:
        with tracker.quiesced():
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(5)


def test_failed_compaction_does_not_fail_the_write_or_leak_it(flaky, monkeypatch, caplog):
    tracker, disk, stack = flaky
    monkeypatch.setattr(tracker_module, "COMPACT_JOURNAL_BYTES", 100)
    FlakyFiles.full = True  # the state file cannot be rewritten; the journal still can
    for i in range(20):  # journal records are durable, so every write goes through
        stack.pwrite(b"w", i * 2 * GRAN)
    assert disk.pread(1, 38 * GRAN) == b"w"
    assert _quiesces(tracker)  # no write was left counted as in flight (it used to hang)
    assert "compacting the bitmap state failed" in caplog.text
    FlakyFiles.full = False
    tracker.compact()
    assert len(list(tracker.get("b").bits.search(1))) == 20


def test_broken_journal_fails_new_writes_until_compaction_repairs_it(flaky):
    tracker, disk, stack = flaky
    stack.pwrite(b"a", 0)
    FlakyJournal.reset_fails = True
    with pytest.raises(OSError):
        tracker.compact()  # state written, journal reset failed: the journal is broken
    assert tracker.journal is not None and tracker.journal.broken is not None
    stack.pwrite(b"b", 0)  # granule 0 is in the state file already: fine
    stack.pwrite(b"c", 3 * GRAN)  # a new granule: made durable by a fresh state file
    FlakyFiles.full = True  # and now not even the state file can be written
    with pytest.raises(OSError) as err:
        stack.pwrite(b"d", 5 * GRAN)  # neither journal nor state: refused
    assert err.value.errno == errno.EIO
    assert disk.pread(1, 5 * GRAN) == b"\0"
    FlakyFiles.full = FlakyJournal.reset_fails = False
    stack.pwrite(b"d", 5 * GRAN)  # the write path repairs the journal first
    assert tracker.journal.broken is None
    assert list(tracker.get("b").bits.search(1)) == [0, 3, 5]


def test_full_journal_fails_the_write_with_enospc(flaky):
    tracker, disk, stack = flaky
    FlakyJournal.full = True
    with pytest.raises(OSError) as err:
        stack.pwrite(b"x" * 100, 3 * GRAN)
    assert err.value.errno == errno.ENOSPC
    assert disk.pread(100, 3 * GRAN) == bytes(100)  # never written untracked
    FlakyJournal.full = False
    stack.pwrite(b"x" * 100, 3 * GRAN)
    assert list(tracker.get("b").bits.search(1)) == [3]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs for the state directory (needs root)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_full_state_disk_fails_writes_with_enospc(tiny_tmpfs, nbd_server, make_image):
    # (tiny_tmpfs first: it is then unmounted after the server has stopped)
    image = make_image(64 * MiB)
    state = tiny_tmpfs / "state"
    srv = nbd_server(str(image), "--state-dir", str(state), "--bitmap", f"b0:{GRAN}", export="disk")
    target = (srv.host, srv.port)
    acked: list[int] = []

    async def main():
        async with await connect(target, "disk", meta_contexts=[BITMAP]) as nbd:
            filler = _fill(tiny_tmpfs)
            refused = None
            for i in range(1024):  # new granules until the journal's page is full
                offset = i * 2 * GRAN
                try:
                    await nbd.pwrite(b"D" * 512, offset)
                    acked.append(offset)
                except NBDRequestError as err:
                    assert err.error == c.NBD_ENOSPC
                    refused = offset
                    break
            assert refused is not None, "the journal never filled up"
            await nbd.pwrite(b"E" * 512, acked[0])  # already dirty and durable: fine
            filler.unlink()
            await nbd.pwrite(b"F" * 512, refused)  # space again: tracked, accepted
            acked.append(refused)
            dirty = await dirty_granules(nbd, 64 * MiB)
            assert {o // GRAN for o in acked} <= dirty
            return refused

    refused = asyncio.run(main())
    srv.stop(sig=9)  # no clean stop: what was acknowledged must be in the journal
    with open(image, "rb") as f:
        f.seek(refused)
        assert f.read(512) == b"F" * 512
    srv = nbd_server(str(image), "--state-dir", str(state), "--bitmap", f"b0:{GRAN}", export="disk")

    async def after_restart():
        async with await connect((srv.host, srv.port), "disk", meta_contexts=[BITMAP]) as nbd:
            return await dirty_granules(nbd, 64 * MiB)

    assert {o // GRAN for o in acked} <= asyncio.run(after_restart())
    srv.stop()
