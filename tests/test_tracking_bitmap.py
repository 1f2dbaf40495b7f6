"""Bitmaps and bitmap operations: QEMU's extent rules, errors, and a reference model."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdtrack.storage.memory import MemoryBackend
from nbdtrack.tracking.bitmap import DirtyBitmap
from nbdtrack.tracking.errors import BitmapError
from nbdtrack.tracking.filter import TrackingFilter
from nbdtrack.tracking.tracker import DirtyTracker

KiB = 1024
MiB = 1024 * KiB


def test_libnbd_interop_example():
    """libnbd's interop test: 1 MiB, 64 KiB granules, writes at 64k and 512k."""
    b = DirtyBitmap("b0", MiB)
    b.mark(65536, 1)
    b.mark(512 * KiB, 4096)
    assert list(b.extents(0, MiB, 100)) == [
        (65536, 0),
        (65536, 1),
        (393216, 0),
        (65536, 1),
        (458752, 0),
    ]
    assert list(b.extents(0, MiB, 1)) == [(65536, 0)]


def test_extents_start_at_the_request_and_end_exactly_at_its_end():
    b = DirtyBitmap("b", MiB)
    b.mark(0, 3 * 65536)
    assert list(b.extents(1000, 100000, 10)) == [(100000, 1)]
    assert list(b.extents(100, 300000, 10)) == [(3 * 65536 - 100, 1), (300000 - 3 * 65536 + 100, 0)]


def test_extents_never_pass_an_unaligned_export_end():
    b = DirtyBitmap("b", MiB + 1000)
    b.mark(MiB + 5, 1)
    assert list(b.extents(0, MiB + 1000, 10)) == [(MiB, 0), (1000, 1)]
    assert b.dirty_bytes == 1000


def test_mark_reports_only_new_bits_and_counts_bytes():
    b = DirtyBitmap("b", 4 * MiB, 512)
    assert b.mark(512, 512)
    assert not b.mark(600, 100)
    assert b.mark(600, 1000)  # reaches into the next granule
    assert b.dirty_bytes == 1024 + 512
    assert b.is_dirty(512, 1000) and not b.is_dirty(0, 1024)
    assert not b.mark(10, 0)


@pytest.mark.parametrize("gran", [0, 256, 511, 1000, 3 << 20, 1 << 32])
def test_bad_granularity(gran):
    with pytest.raises(BitmapError, match="Granularity must be power of 2, and at least 512"):
        DirtyBitmap("b", MiB, gran)


def test_bad_names():
    with pytest.raises(BitmapError, match="cannot be empty"):
        DirtyBitmap("", MiB)
    with pytest.raises(BitmapError, match="too long"):
        DirtyBitmap("é" * 512, MiB)
    DirtyBitmap("x" * 1023, MiB)


def touch(t: DirtyTracker, offset: int, length: int) -> None:
    """A write that has finished: marked, then done."""
    with t.writing(offset, length):
        pass


def tracker_with(*names: str, size: int = MiB, gran: int = 65536) -> DirtyTracker:
    t = DirtyTracker("disk", size)
    for name in names:
        t.add(name, gran)
    return t


def test_operation_errors_are_worded_as_qemu():
    t = tracker_with("a")
    with pytest.raises(BitmapError, match="Bitmap already exists: a"):
        t.add("a")
    for op in ("remove", "clear", "enable", "disable"):
        with pytest.raises(BitmapError, match="Dirty bitmap 'x' not found"):
            t.apply([(op, {"name": "x"})])
    t.get("a").busy = True
    for op in ("remove", "clear", "enable", "disable"):
        with pytest.raises(BitmapError, match="in use by another operation"):
            t.apply([(op, {"name": "a"})])
    with pytest.raises(BitmapError, match="in use"):
        t.apply([("merge", {"target": "a", "bitmaps": []})])


def test_inconsistent_bitmap_can_only_be_removed():
    t = tracker_with("a", "b")
    t.get("a").inconsistent = True
    for op, args in [
        ("clear", {"name": "a"}),
        ("enable", {"name": "a"}),
        ("disable", {"name": "a"}),
        ("merge", {"target": "b", "bitmaps": ["a"]}),
    ]:
        with pytest.raises(BitmapError, match="inconsistent"):
            t.apply([(op, args)])
    t.apply([("remove", {"name": "a"})])
    assert list(t.bitmaps) == ["b"]


def test_merge_needs_the_same_granularity_and_leaves_target_on_failure():
    t = tracker_with("a", "b")
    t.add("fine", 512)
    touch(t, 0, 10)
    t.apply([("clear", {"name": "b"})])
    with pytest.raises(BitmapError, match="granularity"):
        t.apply([("merge", {"target": "b", "bitmaps": ["a", "fine"]})])
    assert t.get("b").dirty_bytes == 0
    t.apply([("merge", {"target": "b", "bitmaps": ["a"]})])
    assert t.get("b").dirty_bytes == 65536


def test_transaction_is_all_or_nothing():
    t = tracker_with("a", "b")
    touch(t, 0, 1)
    with pytest.raises(BitmapError):
        t.apply(
            [
                ("clear", {"name": "a"}),
                ("add", {"name": "c"}),
                ("disable", {"name": "b"}),
                ("remove", {"name": "nope"}),
            ]
        )
    assert list(t.bitmaps) == ["a", "b"]
    assert t.get("a").dirty_bytes == 65536 and t.get("b").recording
    touch(t, MiB - 1, 1)  # both still record
    assert t.get("a").dirty_bytes == t.get("b").dirty_bytes == 2 * 65536


def test_disabled_bitmaps_do_not_record():
    t = tracker_with("a")
    t.add("off", disabled=True)
    touch(t, 0, MiB)
    assert t.get("off").dirty_bytes == 0
    t.apply([("enable", {"name": "off"}), ("disable", {"name": "a"})])
    t.apply([("clear", {"name": "a"})])
    touch(t, 0, 1)
    assert t.get("off").dirty_bytes == 65536 and t.get("a").dirty_bytes == 0


def test_clear_keeps_the_bits_of_writes_in_flight():
    t = tracker_with("a")
    flushed = []
    t.flush_image = lambda: flushed.append(True)
    token = t.mark(65536, 10)  # a write that has marked but not yet landed
    t.apply([("clear", {"name": "a"})])
    assert flushed == [True]
    assert list(t.get("a").extents(0, MiB, 10)) == [(65536, 0), (65536, 1), (MiB - 131072, 0)]
    t.done(token)
    t.apply([("clear", {"name": "a"})])
    assert t.get("a").dirty_bytes == 0


# --- a reference model ------------------------------------------------------------------

SIZE = 64 * KiB * 20 + 700  # an unaligned tail
ops = st.one_of(
    st.tuples(
        st.sampled_from(["write", "zero", "trim"]), st.integers(0, SIZE - 1), st.integers(1, 200000)
    ),
    st.tuples(st.just("clear"), st.sampled_from(["a", "b", "fine"])),
    st.tuples(st.just("merge"), st.sampled_from(["a", "b"]), st.sampled_from(["a", "b"])),
    st.tuples(st.sampled_from(["enable", "disable"]), st.sampled_from(["a", "b", "fine"])),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(ops, max_size=40), st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, SIZE)))
)
def test_operations_agree_with_a_reference_model(operations, queries):
    backend = MemoryBackend(SIZE)
    tracker = DirtyTracker("disk", SIZE)
    grans = {"a": 65536, "b": 65536, "fine": 512}
    for name, gran in grans.items():
        tracker.add(name, gran)
    stack = TrackingFilter(backend, tracker)
    model = {name: set() for name in grans}  # dirty granule indexes
    recording = dict.fromkeys(grans, True)
    for op in operations:
        if op[0] in ("write", "zero", "trim"):
            _, offset, length = op
            length = min(length, SIZE - offset)
            if op[0] == "write":
                stack.pwrite(b"\1" * length, offset)
            elif op[0] == "zero":
                stack.zero(offset, length)
            else:
                stack.trim(offset, length)
            for name, gran in grans.items():
                if recording[name]:
                    model[name].update(range(offset // gran, (offset + length - 1) // gran + 1))
        elif op[0] == "clear":
            tracker.apply([("clear", {"name": op[1]})])
            model[op[1]].clear()
        elif op[0] == "merge":
            tracker.apply([("merge", {"target": op[1], "bitmaps": [op[2]]})])
            model[op[1]] |= model[op[2]]
        else:
            tracker.apply([(op[0], {"name": op[1]})])
            recording[op[1]] = op[0] == "enable"
    for name, gran in grans.items():
        bitmap = tracker.get(name)
        assert set(bitmap.bits.search(1)) == model[name]
        for offset, length in queries:
            length = min(length, SIZE - offset)
            extents = list(bitmap.extents(offset, length, 1 << 20))
            assert sum(e[0] for e in extents) == length  # tiles the range exactly
            assert all(e[0] > 0 for e in extents)
            pos = offset
            for i, (ext_len, state) in enumerate(extents):
                if i:
                    assert pos % gran == 0  # interior boundaries on granule multiples
                    assert state != extents[i - 1][1]  # neighbours merged
                for g in range(pos // gran, (pos + ext_len - 1) // gran + 1):
                    assert (g in model[name]) == bool(state)
                pos += ext_len


def test_mark_now_only_where_nothing_is_left_to_mark():
    """The event loop's mark: a token only when every recording bitmap already has every
    granule of the range; otherwise None and no bit, token or wait."""
    t = tracker_with("coarse", "fine", gran=4096)
    t.add("off", 4096, disabled=True)
    assert t.mark_now(0, 4096) is None
    assert t.get("coarse").dirty_bytes == t.get("fine").dirty_bytes == 0
    touch(t, 0, 8192)
    assert t.mark_now(4096, 8192) is None  # the second granule is still clean
    token = t.mark_now(0, 8192)
    assert token is not None  # the disabled bitmap does not count
    assert t.get("off").dirty_bytes == 0
    t.apply([("clear", {"name": "fine"})])  # a clear keeps the bits of a write in flight
    assert t.get("fine").dirty_bytes == 8192
    t.done(token)
    with t.quiesced():  # a point in time being taken: writes wait, never on the loop
        assert t.mark_now(0, 4096) is None
    held = threading.Thread(target=lambda: t._lock.acquire() and time.sleep(0.3))
    held.start()  # a worker holding the lock (a compaction): the loop does not wait for it
    time.sleep(0.05)
    assert t.mark_now(0, 4096) is None
    held.join()


def test_done_wakes_a_quiesce_without_the_lock():
    """``done`` takes no lock unless a quiesce waits, and then it wakes it."""
    t = tracker_with("a")
    touch(t, 0, 4096)
    token = t.mark_now(0, 4096)
    entered = threading.Event()

    def quiesce() -> None:
        with t.quiesced():
            entered.set()

    waiter = threading.Thread(target=quiesce)
    waiter.start()
    assert not entered.wait(0.2)  # the write is in flight
    t.done(token)
    assert entered.wait(5)
    waiter.join()
