"""The backup job against real servers: consistency under writes, dirty-only reads,
zero clusters, killed backups, differentials, generations, and qemu-nbd as a source."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbd
import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

KiB = 1024
MiB = 1024 * KiB


def nbdtrack(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "nbdtrack", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"nbdtrack {' '.join(args)} failed:\n{result.stderr}")
    return result


def backup(srv, repo: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return nbdtrack(
        "backup",
        srv.uri(),
        str(repo),
        "--bitmap",
        "b",
        "--control",
        srv.control,
        "--progress",
        "json",
        *extra,
        check=check,
    )


def served_after_a_full(nbd_server, make_image, tmp_path: Path, size: int) -> tuple:
    """(image, server with bitmap b, repository holding a full backup, libnbd handle)."""
    image = make_image(size)
    srv = nbd_server(str(image), "--bitmap", "b", export="disk")
    repo = tmp_path / "repo"
    backup(srv, repo)
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    return image, srv, repo, h


def result_of(run: subprocess.CompletedProcess) -> dict:
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert all(line["event"] in ("progress", "message", "result") for line in lines)
    [result] = [line for line in lines if line["event"] == "result"]
    return result


def manifest(repo: Path, export: str = "disk") -> dict:
    return json.loads((repo / export / "manifest.json").read_text())


def restore_raw(image: Path, out: Path) -> bytes:
    """Read a chain through QEMU, not through our own reader."""
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(out)], check=True
    )
    return out.read_bytes()


def qmp(srv) -> QEMUMonitorProtocol:
    q = QEMUMonitorProtocol(srv.control)
    q.connect()
    return q


def bitmap_info(srv, name: str = "b") -> dict:
    q = qmp(srv)
    try:
        for node in q.cmd("query-named-block-nodes"):
            if node["node-name"] == "disk":
                return next(b for b in node["dirty-bitmaps"] if b["name"] == name)
    finally:
        q.close()
    raise AssertionError("no such bitmap")


def export_stats(srv) -> dict:
    q = qmp(srv)
    try:
        [info] = q.cmd("nbdtrack-query-exports", name="disk")
        return info["stats"]
    finally:
        q.close()


class Writer:
    """Random writes from another client, paused and resumed around backups."""

    def __init__(self, uri: str, size: int, seed: int) -> None:
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.size = size
        self.rng = random.Random(seed)
        self.running = threading.Event()
        self.stop = threading.Event()
        self.idle = threading.Event()
        self.writes = 0
        self.errors: list[Exception] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._write()
        except Exception as err:  # asserted in close()
            self.errors.append(err)
            self.idle.set()

    def _write(self) -> None:
        while not self.stop.is_set():
            if not self.running.wait(0.05):
                self.idle.set()
                continue
            self.idle.clear()
            length = self.rng.choice([512, 4096, 65536, 300000])
            offset = self.rng.randrange(0, self.size - length)
            if self.rng.random() < 0.1:
                self.h.zero(length, offset)
            else:
                self.h.pwrite(self.rng.randbytes(length), offset)
            self.writes += 1

    def pause(self) -> None:
        self.running.clear()
        time.sleep(0.1)
        self.idle.wait(5)
        self.h.flush()

    def close(self) -> None:
        self.stop.set()
        self.running.set()
        self.thread.join()
        self.h.shutdown()
        assert self.errors == [], f"the writing client failed: {self.errors}"


def wait_for_checkpoint(srv, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "nbdtrack-checkpoint-start" in srv.log:
            return
        if proc.poll() is not None:
            raise AssertionError(f"backup ended before its checkpoint: {proc.stderr.read()}")
        time.sleep(0.005)
    raise AssertionError("no checkpoint was started")


def test_backups_under_live_writes_restore_their_instant(nbd_server, make_image, tmp_path):
    size = 128 * MiB
    image = make_image(size)
    srv = nbd_server(str(image), "--bitmap", "b", export="disk")
    repo = tmp_path / "repo"
    writer = Writer(srv.uri(), size, seed=5)
    writer.running.set()
    time.sleep(0.5)
    references = []
    for i in range(4):  # a full and three incrementals
        writer.pause()
        references.append(image.read_bytes())  # the export at the checkpoint's instant
        srv_log_mark = srv.log.count("nbdtrack-checkpoint-start")
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbdtrack", "backup", srv.uri(), str(repo), "--bitmap", "b"]
            + ["--control", srv.control, "--progress", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while srv.log.count("nbdtrack-checkpoint-start") == srv_log_mark:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.002)
        writes_before = writer.writes
        writer.running.set()  # the client keeps writing while the backup copies
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert writer.writes > writes_before, "no write happened during the backup"
        result = result_of(subprocess.CompletedProcess([], 0, out, err))
        assert result["mode"] == ("full" if i == 0 else "incremental")
        time.sleep(0.2)
    writer.pause()
    writer.close()
    backups = manifest(repo)["backups"]
    assert [b["mode"] for b in backups] == ["full"] + ["incremental"] * 3
    for i, record in enumerate(backups):
        path = repo / "disk" / record["file"]
        check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
        restored = restore_raw(path, tmp_path / f"restored{i}.raw")
        assert restored == references[i], f"backup {i} does not restore its instant"
    chain = subprocess.run(
        ["qemu-img", "info", "--backing-chain", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert [Path(x["filename"]).name for x in json.loads(chain)] == [
        b["file"] for b in reversed(backups)
    ]
    # qemu-io reads through the whole chain: 16 bytes of data the writer put there
    where = next(i for i in range(0, size, 4096) if any(references[-1][i : i + 16]))
    probe = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-r", "-c", f"read -v {where} 16", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    hex_column = probe.splitlines()[0].split(":", 1)[1].strip().split("  ")[0]
    dumped = bytes.fromhex(hex_column)
    assert dumped == references[-1][where : where + 16], probe


def test_incremental_reads_only_what_changed_and_records_zeroes(nbd_server, make_image, tmp_path):
    size = 1024 * MiB
    image = make_image(size)
    srv = nbd_server(str(image), "--bitmap", "b", export="disk")
    repo = tmp_path / "repo"
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    rng = random.Random(3)
    for _ in range(64):  # 256 MiB of data for the full
        h.pwrite(rng.randbytes(4 * MiB), rng.randrange(0, size // MiB - 4) * MiB)
    h.flush()
    backup(srv, repo)
    before = export_stats(srv)["bytes"].get("read", 0)
    written = 0
    for _ in range(160):  # 1% of the image, in 64 KiB pieces
        h.pwrite(rng.randbytes(65536), rng.randrange(0, size // 65536) * 65536)
        written += 65536
    h.zero(64 * MiB, 8 * MiB)  # a zeroed range: zero clusters, not data
    h.flush()
    h.shutdown()
    result = result_of(backup(srv, repo))
    read = export_stats(srv)["bytes"].get("read", 0) - before
    assert result["mode"] == "incremental"
    assert written * 0.9 <= read <= size * 0.015, f"the incremental read {read} bytes"
    inc = repo / "disk" / manifest(repo)["backups"][-1]["file"]
    mapping = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(inc)], check=True, capture_output=True
        ).stdout
    )
    zeroed = [m for m in mapping if m["start"] <= 20 * MiB < m["start"] + m["length"]]
    assert zeroed and zeroed[0]["depth"] == 0 and zeroed[0]["zero"] and not zeroed[0]["data"]
    assert os.path.getsize(inc) < 20 * MiB  # holds what changed, not 64 MiB of zeros
    restored = restore_raw(inc, tmp_path / "r.raw")
    assert restored == image.read_bytes()


def test_a_killed_backup_aborts_and_the_next_one_has_every_change(nbd_server, make_image, tmp_path):
    size = 256 * MiB
    image = make_image(size)
    srv = nbd_server(str(image), "--bitmap", "b", export="disk")
    repo = tmp_path / "repo"
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    h.pwrite(b"first" * 1000, 0)
    backup(srv, repo)
    rng = random.Random(9)
    for k in range(48):  # enough to copy that the kill lands half-way
        h.pwrite(rng.randbytes(4 * MiB), k * 5 * MiB)
    h.flush()
    generation = bitmap_info(srv)["generation"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbdtrack", "backup", srv.uri(), str(repo), "--bitmap", "b"]
        + ["--control", srv.control, "--progress", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Killed once its unfinished image holds 16 MiB, long before the 192 MiB are copied:
    # watched on disk, not through progress lines, which come every 0.5 s.
    deadline = time.monotonic() + 60
    while True:
        partial = list((repo / "disk").glob(".*.qcow2.partial"))
        if partial and partial[0].stat().st_size >= 16 * MiB:
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while bitmap_info(srv)["busy"]:  # the server aborts the checkpoint of a dead client
        assert time.monotonic() < deadline, "checkpoint still open"
        time.sleep(0.05)
    assert bitmap_info(srv)["generation"] == generation  # nothing was dropped
    assert "aborted: its control connection closed" in srv.log
    assert len(manifest(repo)["backups"]) == 1
    assert not [p for p in (repo / "disk").iterdir() if p.name.endswith("incremental.qcow2")]
    assert [p for p in (repo / "disk").iterdir() if p.name.endswith(".partial")]
    h.pwrite(b"after" * 1000, 100 * MiB + 7)
    h.flush()
    h.shutdown()
    run = backup(srv, repo)
    result = result_of(run)
    assert result["mode"] == "incremental", run.stdout[-3000:]
    assert "left by a backup that did not finish" in run.stdout
    assert not [p for p in (repo / "disk").iterdir() if p.name.endswith(".partial")]
    inc = repo / "disk" / result["file"]
    assert restore_raw(inc, tmp_path / "r.raw") == image.read_bytes()


def test_a_backup_whose_server_dies_half_way_fails_in_one_line(nbd_server, make_image, tmp_path):
    """The copy's requests fail together when the source goes away: the job stops them
    all, says why in one line, and leaves neither an image nor a manifest entry."""
    image = make_image(256 * MiB)
    with open(image, "r+b") as f:  # data to copy everywhere, not holes
        rng = random.Random(4)
        for _ in range(64):
            f.write(rng.randbytes(4 * MiB))
    srv = nbd_server(str(image), export="disk")
    repo = tmp_path / "repo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbdtrack", "backup", srv.uri(), str(repo), "--mode", "full"]
        + ["--progress", "none"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while True:
        partial = list((repo / "disk").glob(".*.qcow2.partial")) if repo.exists() else []
        if partial and partial[0].stat().st_size >= 16 * MiB:
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.002)
    srv.stop(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("nbdtrack: error: ") and "connection" in err, err
    left = sorted(p.name for p in (repo / "disk").iterdir())
    assert left == [".lock"], left  # the chain's lock file, and nothing else


def test_differential_keeps_the_bitmap(nbd_server, make_image, tmp_path):
    image = make_image(32 * MiB)
    srv = nbd_server(str(image), "--bitmap", "b", export="disk")
    repo = tmp_path / "repo"
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    h.pwrite(b"A" * 65536, 0)
    full = result_of(backup(srv, repo))
    h.pwrite(b"B" * 65536, MiB)
    h.flush()
    d1 = result_of(backup(srv, repo, "--mode", "differential"))
    assert bitmap_info(srv)["count"] == 65536  # kept: a differential drops nothing
    h.pwrite(b"C" * 65536, 2 * MiB)
    h.flush()
    d2 = result_of(backup(srv, repo, "--mode", "differential"))
    assert d1["parent"] == d2["parent"] == full["id"]
    assert d2["bytes_read"] == 2 * 65536  # B and C: everything since the full
    h.shutdown()
    assert restore_raw(repo / "disk" / d2["file"], tmp_path / "r.raw") == image.read_bytes()


def test_a_bitmap_that_does_not_continue_the_chain_means_a_full(nbd_server, make_image, tmp_path):
    image = make_image(16 * MiB)
    srv = nbd_server(str(image), "--bitmap", "b", export="disk")
    repo = tmp_path / "repo"
    backup(srv, repo)
    q = qmp(srv)
    q.cmd("block-dirty-bitmap-clear", node="disk", name="b")
    q.close()
    run = backup(srv, repo)
    assert result_of(run)["mode"] == "full"
    messages = [json.loads(x) for x in run.stdout.splitlines()]
    texts = [m["text"] for m in messages if m["event"] == "message"]
    assert any("taking a full backup" in t and "generation" in t for t in texts), texts
    refused = backup(srv, repo, "--mode", "incremental", check=False)
    assert refused.returncode == 0  # the full just taken continues the chain
    q = qmp(srv)
    q.cmd("block-dirty-bitmap-clear", node="disk", name="b")
    q.close()
    refused = backup(srv, repo, "--mode", "incremental", check=False)
    assert refused.returncode == 1 and "cannot take an incremental" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_backup_errors_are_one_line(nbd_server, image, tmp_path):
    srv = nbd_server(str(image), "--bitmap", "b", export="disk")
    cases = [
        ("backup", "nbd://127.0.0.1:1/disk", str(tmp_path / "r"), "--mode", "full"),
        ("backup", srv.uri(), str(tmp_path / "r"), "--bitmap", "nope", "--control", srv.control),
        ("backup", "http://x/y", str(tmp_path / "r")),
        ("backup", srv.uri(), str(tmp_path / "r"), "--control", str(tmp_path / "none.sock")),
    ]
    for args in cases:
        run = nbdtrack(*args, check=False)
        assert run.returncode == 1, (args, run.stderr)
        assert "Traceback" not in run.stderr
        assert run.stderr.startswith("nbdtrack: error: "), run.stderr
    assert not bitmap_info(srv)["busy"]


@pytest.fixture
def qemu_nbd(tmp_path):
    procs = []

    def start(image: Path, *args: str) -> str:
        sock = tmp_path / f"qemu-nbd{len(procs)}.sock"
        proc = subprocess.Popen(
            ["qemu-nbd", "-t", "-f", "qcow2", "-k", str(sock), "-x", "disk", *args, str(image)],
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        return f"nbd+unix:///disk?socket={sock}"

    def stop() -> None:
        while procs:
            proc = procs.pop()
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)

    start.stop = stop
    yield start
    stop()


def test_backup_from_qemu_nbd_with_a_persistent_bitmap(qemu_nbd, tmp_path):
    if shutil.which("qemu-nbd") is None:
        pytest.fail("qemu-nbd is missing (qemu-utils)")
    img = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(img), "64M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 1M 2M", str(img)],
        check=True,
        capture_output=True,
    )
    repo = tmp_path / "repo"
    uri = qemu_nbd(img, "-B", "b", "-r")
    full = result_of(nbdtrack("backup", uri, str(repo), "--bitmap", "b", "--progress", "json"))
    assert full["mode"] == "full"
    qemu_nbd.stop()
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 40M 64k", str(img)],
        check=True,
        capture_output=True,
    )
    uri = qemu_nbd(img, "-B", "b", "-r")
    inc = result_of(nbdtrack("backup", uri, str(repo), "--bitmap", "b", "--progress", "json"))
    assert inc["mode"] == "incremental"
    # the bitmap as it stands: everything since it was added (2 MiB + 64 KiB), not more
    assert inc["bytes_read"] == 2 * MiB + 65536
    qemu_nbd.stop()
    compare = subprocess.run(
        ["qemu-img", "compare", str(repo / "disk" / inc["file"]), str(img)],
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout


def test_a_resumable_backup_goes_on_where_it_stopped(nbd_server, make_image, tmp_path):
    from nbdtrack.tracking.bitmap import derived_generation

    size = 512 * MiB
    image, srv, repo, h = served_after_a_full(nbd_server, make_image, tmp_path, size)
    rng = random.Random(11)
    for k in range(96):  # 384 MiB to copy
        h.pwrite(rng.randbytes(4 * MiB), k * 5 * MiB)
    h.flush()
    dirty_before = bitmap_info(srv)["count"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbdtrack", "backup", srv.uri(), str(repo), "--bitmap", "b"]
        + ["--control", srv.control, "--progress", "json", "--resumable"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Killed once the sidecar of cluster entries (20 bytes each) has grown twice, long
    # before the 384 MiB are copied: a sync appends its entries, then releases its ranges
    # before the next sync may append, so the first sync's ranges (64 MiB or more) are
    # released by then. Watched on disk, not through progress lines, which come every
    # 0.5 s, by when a fast copy may be done. (One sync's entries may cover more than its
    # 64 MiB: copies finish while it runs; a size alone does not say two syncs happened.)
    # A size seen twice in a row is that of whole appends, not of one being written.
    step = 64 * MiB // 65536 * 20
    deadline = time.monotonic() + 60
    settled = last = 0
    while True:
        entries = list((repo / "disk").glob(".*.entries"))
        size = entries[0].stat().st_size if entries else 0
        if settled and size > settled:
            break
        if size and size == last:
            settled = settled or size
        last = size
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert entries[0].stat().st_size < 6 * step, "the copy was over before the kill"
    deadline = time.monotonic() + 10
    while bitmap_info(srv)["busy"]:
        assert time.monotonic() < deadline, "checkpoint still open"
        time.sleep(0.05)
    state = json.loads(next((repo / "disk").glob(".*.resume.json")).read_text())
    info = bitmap_info(srv)
    # the released ranges (durably in the unfinished image) were dropped, the rest kept
    assert info["generation"] == derived_generation(state["base_generation"], state["checkpoint"])
    assert 64 * MiB <= dirty_before - info["count"] < dirty_before
    h.pwrite(b"late" * 16384, 0)  # changes after the failed attempt are copied too
    h.flush()
    h.shutdown()
    run = backup(srv, repo, "--resumable")
    result = result_of(run)
    assert "resuming backup" in run.stdout
    assert result["mode"] == "incremental"
    assert result["bytes_read"] <= info["count"] + 65536  # not what was already saved
    inc = repo / "disk" / result["file"]
    check = subprocess.run(["qemu-img", "check", str(inc)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    assert restore_raw(inc, tmp_path / "r.raw") == image.read_bytes()
    assert [p.name for p in (repo / "disk").glob(".*")] == [".lock"]  # nothing left over
    assert not bitmap_info(srv)["count"]


def test_one_writer_per_chain(nbd_server, image, tmp_path):
    from nbdtrack.backup.repository import Repository

    srv = nbd_server(str(image), "--bitmap", "b", export="disk")
    repo = tmp_path / "repo"
    backup(srv, repo)
    chain = Repository(str(repo)).chain("disk")
    with chain.locked():  # as a merge or another backup running
        run = backup(srv, repo, check=False)
        merged = nbdtrack("merge", str(repo), check=False)
    assert run.returncode == 1 and "busy" in run.stderr and "Traceback" not in run.stderr
    assert merged.returncode == 1 and "busy" in merged.stderr
    assert not bitmap_info(srv)["busy"]  # no checkpoint was left open
    backup(srv, repo)


def test_copied_ranges_are_released_in_steps_only_once_read(
    nbd_server, make_image, tmp_path, monkeypatch
):
    """The job TRIMs the snapshot export below the lowest run still being copied, a
    step at a time: every dirty cluster is released, none before its READ was answered,
    in far fewer TRIMs than clusters."""
    import asyncio

    from nbdtrack.backup import job
    from nbdtrack.backup.progress import Progress
    from nbdtrack.client.connection import NBDClient

    size = 64 * MiB
    _, srv, repo, h = served_after_a_full(nbd_server, make_image, tmp_path, size)
    rng = random.Random(4)
    dirty = sorted(rng.sample(range(size // 65536), 300))
    for index in dirty:
        h.pwrite(rng.randbytes(65536), index * 65536)
    h.flush()
    h.shutdown()

    answered: set[int] = set()  # offsets whose READ was answered
    trims: list[tuple[int, int]] = []
    real_pread_into, real_trim = NBDClient.pread_into, NBDClient.trim

    async def pread_into(self, buf, offset: int, **kw):
        await real_pread_into(self, buf, offset, **kw)
        answered.update(range(offset, offset + memoryview(buf).nbytes, 65536))

    async def trim(self, offset: int, length: int, **kw):
        early = [i for i in dirty if offset <= i * 65536 < offset + length]
        assert all(i * 65536 in answered for i in early), "released before it was read"
        trims.append((offset, length))
        await real_trim(self, offset, length, **kw)

    monkeypatch.setattr(NBDClient, "pread_into", pread_into)
    monkeypatch.setattr(NBDClient, "trim", trim)
    monkeypatch.setattr(job, "RELEASE_STEP", 4 * MiB)
    request = job.BackupRequest(srv.uri(), str(repo), "b", "incremental", srv.control)
    record = asyncio.run(job.run_backup(request, Progress()))
    assert record.mode == "incremental" and record.bytes_read == len(dirty) * 65536
    released = {i for i in dirty for start, n in trims if start <= i * 65536 < start + n}
    assert released == set(dirty)
    assert 3 <= len(trims) <= size // (4 * MiB) + 1
