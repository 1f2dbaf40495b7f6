"""The entry points a user runs first: ``make run`` (the README's first command) serves a
sparse default image with a default bitmap, and ``bench/backup.py`` runs and reports its
figures (on a small image: a check that it works, never a timing assertion)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbd

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_run_serves_a_sparse_default_image_with_a_default_bitmap(tmp_path: Path) -> None:
    image, port = tmp_path / "var" / "default.img", free_port()
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "-C", str(ROOT), "run", f"IMAGE={image}"]
            + [f"LISTEN=127.0.0.1:{port}", f"STATE_DIR={tmp_path / 'state'}", "IMAGE_SIZE=1G"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # make and the server it starts: one group to stop
        )
    try:
        deadline = time.monotonic() + 120
        while "listening on" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert image.stat().st_size == 1 << 30
        assert image.stat().st_blocks * 512 < MiB  # sparse: created, not written
        h = nbd.NBD()
        h.add_meta_context("qemu:dirty-bitmap:default")
        h.connect_uri(f"nbd://127.0.0.1:{port}/default")
        assert h.get_size() == 1 << 30
        assert h.can_meta_context("qemu:dirty-bitmap:default")
        h.pwrite(b"x" * 4096, 0)
        dirty = []
        h.block_status(
            65536, 0, lambda ctx, offset, entries, err: dirty.append(entries[1] & 1) or 0
        )
        assert dirty == [1]  # the write was recorded
        h.shutdown()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make's exit status is then make's business
        proc.wait(30)
    assert "Traceback" not in log.read_text()


def test_backup_bench_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "backup.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "backup.py"), "--size", "64M", "--rounds", "1"]
        + ["--dir", str(tmp_path), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PATH="/usr/bin:" + os.environ["PATH"]),
    )
    assert run.returncode == 0, run.stderr
    for row in ("full backup", "incremental after 1% writes", "nbdcopy of the whole image"):
        assert row in run.stdout
    assert "incremental / nbdcopy" in run.stdout
    [result] = json.loads(out.read_text())["rounds"]
    assert result["incremental_read_bytes"] == result["dirty_bytes"] > 0  # only what changed
    assert result["incremental_s"] > 0 and result["nbdcopy_s"] > 0
    assert list(tmp_path.iterdir()) == [out]  # the bench removed its image and servers' files
