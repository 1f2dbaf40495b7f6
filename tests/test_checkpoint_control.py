"""Checkpoints over the control socket, driven by qemu.qmp: snapshot exports, commit,
abort, auto-abort, and checkpoints of several exports in one transaction."""

from __future__ import annotations

import subprocess
import time

import nbd
import pytest
from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

MiB = 1024 * 1024


@pytest.fixture
def two_disks(nbd_server, make_image, tmp_path):
    make_image(8 * MiB, "a.img")
    make_image(8 * MiB, "b.img")
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nstate-dir = "{tmp_path / "st"}"\ncontrol = "{tmp_path / "ctl.sock"}"\n'
        '[[export]]\npath = "a.img"\nbitmaps = ["x"]\n'
        '[[export]]\npath = "b.img"\nbitmaps = ["y"]\n'
    )
    srv = nbd_server("--config", str(config))
    srv.control = str(tmp_path / "ctl.sock")
    srv.extra["restart"] = lambda: nbd_server("--config", str(config))
    return srv


def connect(srv) -> QEMUMonitorProtocol:
    q = QEMUMonitorProtocol(srv.control)
    q.connect()
    return q


def bitmaps(q: QEMUMonitorProtocol) -> dict[str, dict]:
    return {
        f"{node['node-name']}/{b['name']}": b
        for node in q.cmd("query-named-block-nodes")
        for b in node["dirty-bitmaps"]
    }


def exports(q: QEMUMonitorProtocol) -> list[str]:
    return [e["id"] for e in q.cmd("query-block-exports")]


def test_snapshot_export_over_nbd(two_disks):
    srv = two_disks
    h = nbd.NBD()
    h.connect_uri(srv.uri("a"))
    h.pwrite(b"old!" * 1024, 0)
    q = connect(srv)
    ckpt = q.cmd("nbdtrack-checkpoint-start", node="a", bitmap="x", name="daily")
    assert ckpt["export"] == "a@daily" and ckpt["checkpoint"] == "daily"
    assert "a@daily" in exports(q)
    assert bitmaps(q)["a/x"]["busy"]
    h.pwrite(b"new!" * 1024, 0)  # the live export moves on
    s = nbd.NBD()
    s.add_meta_context("qemu:dirty-bitmap:x")
    s.connect_uri(srv.uri("a@daily"))
    assert s.pread(4096, 0) == b"old!" * 1024
    assert not s.is_read_only() and s.can_trim()
    with pytest.raises(nbd.Error) as err:
        s.pwrite(b"x", 0)
    assert err.value.errno == "EPERM"
    s.trim(65536, 0)  # releases what a backup copied
    seen = []
    s.block_status(8 * MiB, 0, lambda ctx, off, ents, e: seen.extend(ents) or 0)
    assert seen == [65536, 1, 8 * MiB - 65536, 0]
    s.shutdown()
    listing = subprocess.run(
        ["nbdinfo", "--list", "--json", srv.uri("")], capture_output=True, text=True, check=True
    ).stdout
    assert "a@daily" in listing
    done = q.cmd("nbdtrack-checkpoint-commit", node="a", checkpoint="daily")
    assert done["generation"] != ckpt["generation"]
    assert "a@daily" not in exports(q)
    assert bitmaps(q)["a/x"]["count"] == 65536  # the write made after the checkpoint
    with pytest.raises(ExecuteError, match="Checkpoint 'daily' not found"):
        q.cmd("nbdtrack-checkpoint-abort", node="a", checkpoint="daily")
    h.shutdown()
    q.close()


def test_checkpoints_of_two_exports_in_one_transaction(two_disks):
    q = connect(two_disks)
    q.cmd(
        "transaction",
        actions=[
            {"type": "nbdtrack-checkpoint-start", "data": {"node": "a", "bitmap": "x"}},
            {"type": "nbdtrack-checkpoint-start", "data": {"node": "b", "bitmap": "y"}},
        ],
    )
    assert {"a@ckpt-1", "b@ckpt-1"} <= set(exports(q))
    state = bitmaps(q)
    assert state["a/x"]["busy"] and state["b/y"]["busy"]
    q.cmd("nbdtrack-checkpoint-abort", node="a", checkpoint="ckpt-1")
    q.cmd("nbdtrack-checkpoint-commit", node="b", checkpoint="ckpt-1")
    assert not any(b["busy"] for b in bitmaps(q).values())
    q.close()


def test_a_failing_transaction_starts_no_checkpoint(two_disks):
    q = connect(two_disks)
    before = bitmaps(q)
    with pytest.raises(ExecuteError, match="Dirty bitmap 'nope' not found"):
        q.cmd(
            "transaction",
            actions=[
                {"type": "block-dirty-bitmap-add", "data": {"node": "a", "name": "new"}},
                {"type": "nbdtrack-checkpoint-start", "data": {"node": "a", "bitmap": "x"}},
                {"type": "nbdtrack-checkpoint-start", "data": {"node": "b", "bitmap": "nope"}},
            ],
        )
    assert bitmaps(q) == before
    assert exports(q) == ["a", "b"]
    q.close()
    # nothing of it was saved either
    assert two_disks.stop() == 0
    srv = two_disks.extra["restart"]()
    srv.control = two_disks.control
    q = connect(srv)
    assert bitmaps(q).keys() == before.keys()
    assert not any(b["busy"] for b in bitmaps(q).values())
    q.close()


def test_auto_abort_when_the_session_closes(two_disks):
    q = connect(two_disks)
    generation = bitmaps(q)["a/x"]["generation"]
    q.cmd("nbdtrack-checkpoint-start", node="a", bitmap="x", **{"auto-abort": True})
    q.close()
    q = connect(two_disks)
    for _ in range(100):
        if not bitmaps(q)["a/x"]["busy"]:
            break
        time.sleep(0.05)
    state = bitmaps(q)["a/x"]
    assert not state["busy"] and state["generation"] == generation
    assert exports(q) == ["a", "b"]
    # without auto-abort the checkpoint outlives its session
    q.cmd("nbdtrack-checkpoint-start", node="a", bitmap="x", name="keep")
    q.close()
    q = connect(two_disks)
    assert "a@keep" in exports(q)
    q.cmd("nbdtrack-checkpoint-abort", node="a", checkpoint="keep")
    q.close()


def test_checkpoint_argument_errors(two_disks):
    q = connect(two_disks)
    with pytest.raises(ExecuteError, match="Node 'zz' not found"):
        q.cmd("nbdtrack-checkpoint-start", node="zz", bitmap="x")
    with pytest.raises(ExecuteError, match="does not accept value 'sometimes'"):
        q.cmd("nbdtrack-checkpoint-start", node="a", bitmap="x", sync="sometimes")
    with pytest.raises(ExecuteError, match="Invalid checkpoint name"):
        q.cmd("nbdtrack-checkpoint-start", node="a", bitmap="x", name="a/b")
    q.cmd("nbdtrack-checkpoint-start", node="a", bitmap="x", name="one")
    with pytest.raises(ExecuteError, match="in use"):
        q.cmd("block-dirty-bitmap-clear", node="a", name="x")
    with pytest.raises(ExecuteError, match="does not support"):
        q.cmd("block-dirty-bitmap-add", node="a@one", name="z")
    q.cmd("nbdtrack-checkpoint-abort", node="a", checkpoint="one")
    q.close()
