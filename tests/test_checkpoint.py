"""Checkpoints: freeze + successor, copy-before-write snapshots, sync modes, crashes."""

from __future__ import annotations

import random
import threading

import pytest

from nbdtrack.exports import open_export
from nbdtrack.tracking.errors import BitmapError

KiB = 1024
MiB = 1024 * KiB
G = 65536


def dirty(export, name: str) -> list[int]:
    return list(export.tracker.get(name).bits.search(1))


@pytest.fixture
def export(make_image, tmp_path):
    path = make_image(4 * MiB)
    path.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    exp = open_export("disk", str(path), state_dir=str(tmp_path / "st"), bitmaps=[("b", G)])
    yield exp
    exp.close()


def write(export, offset: int, data: bytes) -> None:
    export.backend.pwrite(data, offset)


def test_snapshot_stays_at_the_checkpoint_while_the_live_export_changes(export):
    original = export.backend.pread(4 * MiB, 0)
    write(export, 0, b"a" * 100)
    ckpt = export.checkpoints.start("b")
    snap = export.snapshot_export(ckpt)
    assert snap.name == "disk@ckpt-1" and not snap.read_only
    assert snap.meta_contexts() == ["base:allocation", "qemu:dirty-bitmap:b"]
    at_checkpoint = original[:0] + b"a" * 100 + original[100:]
    write(export, 50, b"b" * 200000)  # spans 4 clusters, the first partly
    export.backend.zero(3 * MiB, 70000)
    export.backend.trim(2 * MiB, G)
    assert snap.backend.pread(4 * MiB, 0) == at_checkpoint
    assert export.backend.pread(100, 0) == b"a" * 50 + b"b" * 50
    # the snapshot publishes the frozen bits; the live export publishes frozen + new
    assert snap.context_extents("qemu:dirty-bitmap:b", 0, 4 * MiB, 100) == [
        (G, 1),
        (4 * MiB - G, 0),
    ]
    live = export.context_extents("qemu:dirty-bitmap:b", 0, 4 * MiB, 100)
    assert live[:2] == [(4 * G, 1), (2 * MiB - 4 * G, 0)]
    assert export.tracker.get("b").busy
    with pytest.raises(BitmapError, match="in use"):
        export.tracker.apply([("clear", {"name": "b"})])
    with pytest.raises(OSError):
        snap.backend.pwrite(b"x", 0)  # writes refused (EROFS -> EPERM on the wire)
    export.checkpoints.finish(ckpt.name, success=True)


def test_commit_on_success_keeps_only_what_came_after(export):
    write(export, 0, b"x")
    before = export.tracker.get("b").generation
    ckpt = export.checkpoints.start("b")
    assert ckpt.generation == before
    write(export, 5 * G, b"y")
    generation = export.checkpoints.finish(ckpt.name, success=True)
    assert dirty(export, "b") == [5]
    assert generation != before and export.tracker.get("b").generation == generation
    assert not export.tracker.get("b").busy


def test_abort_merges_the_successor_back(export):
    write(export, 0, b"x")
    ckpt = export.checkpoints.start("b", sync="on-success")
    write(export, 5 * G, b"y")
    before = export.tracker.get("b").generation
    assert export.checkpoints.finish(ckpt.name, success=False) == before
    assert dirty(export, "b") == [0, 5]


def test_differential_never_drops_bits(export):
    write(export, 0, b"x")
    ckpt = export.checkpoints.start("b", sync="never")
    write(export, 5 * G, b"y")
    before = export.tracker.get("b").generation
    assert export.checkpoints.finish(ckpt.name, success=True) == before
    assert dirty(export, "b") == [0, 5]


def test_always_drops_released_bits_even_on_failure(export):
    for i in range(8):
        write(export, i * G, b"z")
    ckpt = export.checkpoints.start("b", sync="always")
    snap = export.snapshot_export(ckpt)
    snap.backend.trim(0, 4 * G)  # the backup copied the first four granules
    snap.backend.trim(4 * G + 1, G)  # not a whole cluster: nothing released
    write(export, 20 * G, b"w")
    export.checkpoints.finish(ckpt.name, success=False)
    assert dirty(export, "b") == [4, 5, 6, 7, 20]


def test_release_frees_saved_clusters(export):
    ckpt = export.checkpoints.start("b")
    snap = ckpt.snapshot
    snap.release(0, 2 * G)
    write(export, 0, b"q" * (3 * G))  # clusters 0, 1 released: only cluster 2 is saved
    assert snap.bytes_saved == G
    export.checkpoints.finish(ckpt.name, success=True)


def test_bad_checkpoint_requests(export):
    with pytest.raises(BitmapError, match="Invalid sync mode"):
        export.checkpoints.start("b", sync="sometimes")
    with pytest.raises(BitmapError, match="not found"):
        export.checkpoints.start("nope")
    ckpt = export.checkpoints.start("b", name="daily")
    with pytest.raises(BitmapError, match="in use"):  # one checkpoint per bitmap at a time
        export.checkpoints.start("b", name="again")
    with pytest.raises(BitmapError, match="Invalid checkpoint name"):
        export.checkpoints.start("b", name="../x")
    export.checkpoints.finish(ckpt.name, success=True)
    with pytest.raises(BitmapError, match="Checkpoint 'daily' not found"):
        export.checkpoints.finish("daily", success=True)


def test_crash_with_a_checkpoint_open_recovers_as_abort(make_image, tmp_path, caplog):
    path = make_image(4 * MiB)
    state = str(tmp_path / "st")
    exp = open_export("disk", str(path), state_dir=state, bitmaps=[("b", G)])
    write(exp, 0, b"x")
    exp.checkpoints.start("b")
    write(exp, 7 * G, b"y")
    # kill -9: nothing is closed; the lock goes with the process
    exp.tracker.journal.close()
    exp.tracker.files.unlock()
    exp2 = open_export("disk", str(path), state_dir=state)
    assert dirty(exp2, "b") == [0, 7]
    assert not exp2.tracker.get("b").busy
    assert "were open at the stop: aborted" in caplog.text
    assert not list((tmp_path / "st").rglob("fleece-*"))
    exp2.close()


def test_snapshot_is_exact_under_concurrent_writers(export):
    original = export.backend.pread(4 * MiB, 0)
    ckpt = export.checkpoints.start("b")
    snap = export.snapshot_export(ckpt)
    stop = threading.Event()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            offset = rng.randrange(4 * MiB - 8192)
            export.backend.pwrite(rng.randbytes(rng.choice([1, 512, 8192])), offset)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        rng = random.Random(7)
        for _ in range(200):
            offset = rng.randrange(4 * MiB - 100000)
            length = rng.randrange(1, 100000)
            assert snap.backend.pread(length, offset) == original[offset : offset + length]
    finally:
        stop.set()
        for t in threads:
            t.join()
    export.checkpoints.finish(ckpt.name, success=True)


def test_writes_on_the_loop_never_skip_a_mark_or_a_save(export):
    """``pwrite_now`` (the event loop's write) writes only a granule already dirty, and
    never while a snapshot needs old data saved first: those go to ``pwrite`` in a worker."""
    original = export.backend.pread(4 * MiB, 0)
    assert not export.backend.pwrite_now(b"a" * 4096, G)  # clean: a journal record first
    assert export.backend.pread(4096, G) == original[G : G + 4096] and dirty(export, "b") == []
    write(export, G, b"a" * 4096)
    assert export.backend.pwrite_now(b"b" * 4096, G + 4096)
    assert export.backend.pread(4096, G + 4096) == b"b" * 4096
    ckpt = export.checkpoints.start("b")
    snap = export.snapshot_export(ckpt)
    at_checkpoint = snap.backend.pread(4 * MiB, 0)
    assert not export.backend.pwrite_now(b"c" * 4096, G)  # the snapshot needs its old data
    write(export, G, b"c" * 4096)
    assert snap.backend.pread(4 * MiB, 0) == at_checkpoint
    export.checkpoints.finish(ckpt.name, success=True)
    assert export.backend.pwrite_now(b"d" * 4096, G)  # dirty in the bitmap again
    assert dirty(export, "b") == [1]


def test_snapshot_reads_on_the_loop_only_where_nothing_was_saved(export):
    """The snapshot export's no-wait read: live data where no cluster was saved (the
    snapshot's content there is the live content), never a saved cluster's new data."""
    ckpt = export.checkpoints.start("b")
    snap = export.snapshot_export(ckpt).backend
    at_checkpoint = snap.pread(4 * MiB, 0)
    write(export, G, b"n" * 4096)  # saves cluster 1 first
    nowait = export.backend.pread_nowait(4096, 0) is not None  # RWF_NOWAIT, data cached
    for offset, length in [(0, 4096), (2 * G, G), (G - 4096, 8192), (G, 4096)]:
        got = snap.pread_nowait(length, offset)
        if offset < 2 * G and offset + length > G:  # touches the saved cluster
            assert got is None
        elif nowait:
            assert got == at_checkpoint[offset : offset + length]
    assert snap.may_have_holes() == export.backend.may_have_holes()
    export.checkpoints.finish(ckpt.name, success=True)


def test_block_status_on_the_loop_only_without_io_or_a_held_lock(export, make_image, tmp_path):
    """``context_extents(wait=False)``: base:allocation of an image without holes and
    bitmaps answer at once; a sparse image (lseek) and a tracker lock held by a worker
    (a compaction) give None, for a worker to answer."""
    write(export, G, b"x")
    assert export.context_extents("base:allocation", 0, 4 * MiB, 100, wait=False) == [
        (4 * MiB, 0)
    ]
    bitmap = "qemu:dirty-bitmap:b"
    at_once = export.context_extents(bitmap, 0, 4 * MiB, 100, wait=False)
    assert at_once == export.context_extents(bitmap, 0, 4 * MiB, 100) == [
        (G, 0),
        (G, 1),
        (4 * MiB - 2 * G, 0),
    ]
    held = threading.Event()
    release = threading.Event()

    def compaction() -> None:
        with export.tracker._lock:
            held.set()
            release.wait(5)

    worker = threading.Thread(target=compaction)
    worker.start()
    held.wait(5)
    try:
        assert export.context_extents(bitmap, 0, 4 * MiB, 100, wait=False) is None
    finally:
        release.set()
        worker.join()
    sparse = open_export("sparse", str(make_image(MiB, "sparse.img")), bitmaps=[("b", G)])
    try:
        assert sparse.context_extents("base:allocation", 0, MiB, 100, wait=False) is None
        assert sparse.context_extents("base:allocation", 0, MiB, 100) == [(MiB, 3)]
    finally:
        sparse.close()
