"""``serve --event-loop uvloop`` (the ``fast`` extra): the same server on uvloop's event
loop, driven by the real clients: libnbd (structured replies, both metadata contexts,
pipelined requests), nbdcopy, qemu-img, TLS, the QMP control socket (qemu.qmp), a clean
SIGTERM. And the choice's errors: an unknown loop, uvloop missing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import nbd
import pytest
from qemu.qmp import QMPClient

from tests.test_service import one_line_error, run_cli
from tests.tls_certs import Certificates

pytest.importorskip("uvloop")  # installed by the test extra: CI runs this module

MiB = 1024 * 1024


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def test_uvloop_serves_every_client(nbd_server, make_image, tmp_path):
    image = make_image(64 * MiB)
    srv = nbd_server(str(image), "--event-loop", "uvloop", "--bitmap", "b", export="disk")
    assert "event loop: uvloop" in srv.log

    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.add_meta_context("qemu:dirty-bitmap:b")
    h.connect_uri(srv.uri())
    for n in range(64):  # pipelined: 64 writes in flight, answered as they come
        h.aio_pwrite(bytes([n + 1]) * 4096, n * 8192)
    while h.aio_in_flight():
        h.poll(-1)
    h.pwrite(b"x" * (4 * MiB), 8 * MiB)  # a large write, through a worker
    h.flush()
    assert h.pread(4096, 63 * 8192) == bytes([64]) * 4096
    seen: dict[str, list[int]] = {}
    h.block_status(16 * MiB, 0, lambda ctx, off, ents, err: seen.__setitem__(ctx, ents))
    assert seen["qemu:dirty-bitmap:b"][:2] == [64 * 8192, 1]
    assert set(seen) == {"base:allocation", "qemu:dirty-bitmap:b"}
    h.shutdown()

    copy = tmp_path / "copy.raw"
    run("nbdcopy", srv.uri(), str(copy))
    assert copy.read_bytes() == image.read_bytes()
    mapping = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", srv.uri()).stdout)
    assert mapping[0]["data"] is True and mapping[0]["start"] == 0

    async def qmp() -> list:
        client = QMPClient("uvloop-test")
        await client.connect(srv.control)
        try:
            await client.execute("block-dirty-bitmap-add", {"node": "disk", "name": "c"})
            return await client.execute("nbdtrack-query-exports")
        finally:
            await client.disconnect()

    exports = asyncio.run(qmp())
    assert {b["name"] for b in exports[0]["bitmaps"]} == {"b", "c"}
    assert srv.stop() == 0


def test_uvloop_with_tls(nbd_server, make_image, tls_certs: Certificates):
    image = make_image(16 * MiB)
    srv = nbd_server(
        str(image), "--event-loop", "uvloop", *tls_certs.server_args("require"), export="disk"
    )
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(tls_certs.client_dir()))
    h.connect_uri(f"nbds://{srv.host}:{srv.port}/disk")
    assert h.get_tls_negotiated()
    h.pwrite(b"over tls on uvloop", MiB)
    assert h.pread(18, MiB) == b"over tls on uvloop"
    h.shutdown()
    assert "TLS established (TLSv1." in srv.log


def test_event_loop_errors_are_one_line(tmp_path, make_image):
    image = make_image(MiB)
    config = tmp_path / "bad.toml"
    config.write_text(f'[server]\nevent-loop = "fast"\n[[export]]\nname = "d"\npath = "{image}"\n')
    line = one_line_error(run_cli("check-config", str(config)))
    assert f"{config}: key 'server.event-loop': 'fast' is not one of asyncio, uvloop" in line
    # uvloop missing: a one-line error that says how to get it, before anything is served.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['uvloop'] = None; from nbdtrack.cli import main; "
            f"sys.exit(main(['serve', '{image}', '--event-loop', 'uvloop', "
            f"'--listen', '127.0.0.1:0', '--state-dir', '{tmp_path / 'st'}']))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "uvloop is not installed (pip install 'nbdtrack[fast]')" in proc.stderr
