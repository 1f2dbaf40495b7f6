"""Persistence of bitmaps: journal, group commit, clean stops, crashes and power loss."""

from __future__ import annotations

import errno
import os
import random
import threading

import pytest

from nbdtrack.storage.memory import MemoryBackend
from nbdtrack.tracking.errors import StateError
from nbdtrack.tracking.filter import TrackingFilter
from nbdtrack.tracking.journal import encode_record, header, parse_journal
from nbdtrack.tracking.statefiles import JournalFile, StateFiles
from nbdtrack.tracking.tracker import JOURNAL_NAME, STATE_NAME, DirtyTracker
from tests.powerloss import Fuse, PowerFailure, VolatileDisk, VolatileFiles

KiB = 1024
MiB = 1024 * KiB
SIZE = MiB


def open_tracker(path, identity=None, size=SIZE) -> DirtyTracker:
    return DirtyTracker.open("disk", size, StateFiles(str(path)), identity)


def dirty_granules(tracker: DirtyTracker, name: str) -> list[int]:
    return list(tracker.get(name).bits.search(1))


def touch(t: DirtyTracker, offset: int, length: int) -> None:
    with t.writing(offset, length):
        pass


def test_journal_records_and_torn_tail():
    jid = os.urandom(16)
    data = header(jid) + encode_record(0, 512) + encode_record(1 << 40, 7)
    assert parse_journal(data, jid) == [(0, 512), (1 << 40, 7)]
    assert parse_journal(data + encode_record(5, 5)[:-3], jid) == [(0, 512), (1 << 40, 7)]
    broken = bytearray(data)
    broken[-1] ^= 1
    assert parse_journal(bytes(broken), jid) == [(0, 512)]
    assert parse_journal(data, os.urandom(16)) is None


def test_clean_stop_keeps_bitmaps_and_their_attributes(tmp_path):
    t = open_tracker(tmp_path)
    t.add("a", 65536)
    t.add("off", 4096, disabled=True)
    t.add("temp", persistent=False)
    touch(t, 100000, 5)
    t.close({"size": SIZE})
    t = open_tracker(tmp_path, {"size": SIZE})
    assert list(t.bitmaps) == ["a", "off"]  # transient bitmaps do not survive a stop
    assert dirty_granules(t, "a") == [1]
    assert not t.get("off").recording and t.get("off").granularity == 4096
    assert not t.get("a").inconsistent
    t.close({"size": SIZE})


def test_unclean_stop_replays_the_journal(tmp_path):
    t = open_tracker(tmp_path)
    t.add("a", 65536)
    t.add("b", 512)
    touch(t, 0, 1)
    touch(t, 5 * 65536, 70000)
    # no close: as after kill -9; the state file says "not clean"
    t.journal.close()
    t.files.unlock()
    t2 = open_tracker(tmp_path, {"size": 1})  # identity is not compared after a crash
    assert dirty_granules(t2, "a") == [0, 5, 6]
    assert dirty_granules(t2, "b") == [0] + list(range(640, 640 + 137))
    assert not t2.get("a").inconsistent
    t2.close(None)


def test_image_changed_while_stopped_marks_bitmaps_inconsistent(tmp_path, caplog):
    t = open_tracker(tmp_path)
    t.add("a")
    t.close({"size": SIZE, "mtime_ns": 1, "ino": 5})
    t = open_tracker(tmp_path, {"size": SIZE, "mtime_ns": 2, "ino": 5})
    assert t.get("a").inconsistent and not t.get("a").recording
    assert "changed while nbdtrack was not serving it (mtime_ns differ)" in caplog.text
    t.close({"size": SIZE, "mtime_ns": 2, "ino": 5})
    t = open_tracker(tmp_path, {"size": SIZE, "mtime_ns": 2, "ino": 5})
    assert t.get("a").inconsistent  # stays inconsistent until removed
    t.apply([("remove", {"name": "a"})])
    t.close(None)


def test_image_size_changed_marks_bitmaps_inconsistent(tmp_path):
    t = open_tracker(tmp_path)
    t.add("a")
    t.journal.close()
    t.files.unlock()
    t = open_tracker(tmp_path, size=2 * SIZE)
    assert t.get("a").inconsistent and t.get("a").size == 2 * SIZE
    t.close(None)


def test_crash_between_state_and_journal_reset_loses_nothing(tmp_path, monkeypatch):
    t = open_tracker(tmp_path)
    t.add("a")
    touch(t, 0, 1)

    def fail_reset(self, header):
        raise OSError(errno.EIO, "power failed")

    monkeypatch.setattr(JournalFile, "reset", fail_reset)
    with pytest.raises(OSError):
        t.compact()
    monkeypatch.undo()
    t.journal.close()
    t.files.unlock()
    t = open_tracker(tmp_path)
    assert dirty_granules(t, "a") == [0]
    t.close(None)


def test_damaged_state_file_is_a_clear_error(tmp_path):
    t = open_tracker(tmp_path)
    t.add("a")
    t.close(None)
    path = tmp_path / STATE_NAME
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="checksum mismatch"):
        open_tracker(tmp_path)


def test_state_directory_is_locked(tmp_path):
    t = open_tracker(tmp_path)
    with pytest.raises(StateError, match=f"in use by another nbdtrack \\(pid {os.getpid()}\\)"):
        open_tracker(tmp_path)
    t.close(None)
    open_tracker(tmp_path).close(None)


class CountingJournalFile(JournalFile):
    syncs = 0

    def sync(self) -> None:
        type(self).syncs += 1
        super().sync()


def test_group_commit_shares_syncs_and_dirty_granules_pay_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(
        StateFiles, "open_journal", lambda self, name: CountingJournalFile(self.path(name))
    )
    t = open_tracker(tmp_path)
    t.add("a", 4096)
    CountingJournalFile.syncs = 0
    barrier = threading.Barrier(16)

    def writer(n: int) -> None:
        barrier.wait()
        for k in range(16):
            touch(t, (n * 16 + k) * 4096, 1)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(dirty_granules(t, "a")) == 256
    assert 0 < CountingJournalFile.syncs < 256  # concurrent writers shared syncs
    first = CountingJournalFile.syncs
    for n in range(256):
        touch(t, n * 4096, 100)  # already dirty: no journal, no sync
    assert CountingJournalFile.syncs == first
    records = parse_journal((tmp_path / JOURNAL_NAME).read_bytes(), t.journal_id)
    assert len(records) == 256
    t.close(None)


def test_journal_failure_fails_the_write_and_is_retried(tmp_path, monkeypatch):
    t = open_tracker(tmp_path)
    t.add("a", 65536)
    disk = MemoryBackend(SIZE)
    stack = TrackingFilter(disk, t)
    real_append = JournalFile.append

    def full(self, data):
        real_append(self, data[:5])  # a torn append, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(JournalFile, "append", full)
    with pytest.raises(OSError) as err:
        stack.pwrite(b"x" * 10, 0)
    assert err.value.errno == errno.ENOSPC
    assert disk.pread(10, 0) == bytes(10)  # the data write was never issued
    with pytest.raises(OSError):
        stack.pwrite(b"y" * 10, 5)  # same granule: must not pass untracked
    monkeypatch.undo()
    stack.pwrite(b"z" * 10, 0)
    assert disk.pread(10, 0) == b"z" * 10
    t.journal.close()
    t.files.unlock()
    t = open_tracker(tmp_path)
    assert dirty_granules(t, "a") == [0]  # the torn append did not hide the record
    t.close(None)


# --- power loss ------------------------------------------------------------------------

GRANS = {"a": 65536, "b": 4096}


def misses(content: bytes, baseline: bytes, dirty: set[int], gran: int) -> list[int]:
    """Granules whose content changed since ``baseline`` but are not dirty."""
    return [
        g
        for g in range(SIZE // gran)
        if g not in dirty
        and content[g * gran : (g + 1) * gran] != baseline[g * gran : (g + 1) * gran]
    ]


def power_loss_run(seed: int) -> None:
    rng = random.Random(seed)
    fuse = Fuse(rng.randint(1, 400))
    files = VolatileFiles(fuse)
    disk = VolatileDisk(SIZE, fuse)
    baselines: dict[str, list[bytes]] = {name: [bytes(SIZE)] for name in GRANS}
    try:
        tracker = DirtyTracker.open("disk", SIZE, files, None)
        stack = TrackingFilter(disk, tracker)
        for name, gran in GRANS.items():
            tracker.add(name, gran)
        for _ in range(200):
            action = rng.random()
            offset = rng.randrange(SIZE)
            length = min(rng.choice([1, 512, 4096, 70000, 200000]), SIZE - offset)
            if action < 0.55:
                stack.pwrite(rng.randbytes(length), offset, fua=rng.random() < 0.1)
            elif action < 0.65:
                stack.zero(offset, length)
            elif action < 0.72:
                stack.trim(offset, length)
            elif action < 0.82:
                stack.flush()
            elif action < 0.92:
                name = rng.choice(list(GRANS))
                # Until the clear returns, a power loss may find the old or the new state.
                baselines[name].append(disk.pread(SIZE, 0))
                tracker.apply([("clear", {"name": name})])
                baselines[name] = baselines[name][-1:]
            else:
                tracker.compact()
    except PowerFailure:
        pass
    image = disk.after_power_loss(rng)
    recovered = DirtyTracker.open("disk", SIZE, files.after_power_loss(rng), None)
    content = image.pread(SIZE, 0)
    for name, gran in GRANS.items():
        if name not in recovered.bitmaps:
            continue  # the power failed before its add was durable (never acknowledged)
        bitmap = recovered.get(name)
        assert not bitmap.inconsistent
        dirty = set(bitmap.bits.search(1))

        results = [misses(content, b, dirty, gran) for b in baselines[name]]
        assert any(not m for m in results), f"seed {seed}: bitmap {name} misses granules {results}"


def test_power_loss_never_loses_a_dirty_bit():
    for seed in range(300):
        power_loss_run(seed)


def test_power_loss_check_can_fail():
    """The check above finds a miss when the journal is not made durable before writes."""
    from nbdtrack.tracking import journal as journal_module

    original = journal_module.Journal.wait_durable
    journal_module.Journal.wait_durable = lambda self, seq: None
    try:
        with pytest.raises(AssertionError, match="misses granules"):
            for seed in range(300):
                power_loss_run(seed)
    finally:
        journal_module.Journal.wait_durable = original
