"""Access control: export names never reach a path outside the configured exports, the
control socket's mode and owner, read-only enforced by the server itself."""

from __future__ import annotations

import asyncio
import errno
import grp
import os
import pwd
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import nbd
import pytest

from nbdtrack.client import NBDConnectionError, NBDOptionError, connect, list_meta_contexts
from nbdtrack.exports import Export, state_directory
from nbdtrack.protocol import constants as c
from nbdtrack.storage.memory import MemoryBackend
from nbdtrack.tracking.checkpoint import Checkpoint

HOSTILE_NAMES = [
    "../x",
    "..",
    ".",
    "/etc/passwd",
    "%2e%2e",
    "%2e%2e%2fdisk",
    "../disk.img",
    "disk/../disk",
    "./disk",
    "/disk",
    "disk/",
    "DISK",
    "disk.img",
    "secret",
    "secret.img",
    "%64isk",  # "disk", percent-encoded: names are never decoded by the server
    "disk\\",
    "disk@",
    "\u0000disk"[1:] + "\u202e",
]


def test_hostile_export_names_are_unknown(nbd_server, make_image, tmp_path):
    image = make_image(1024 * 1024, "disk.img")
    secret = make_image(1024 * 1024, "secret.img")
    secret.write_bytes(b"SECRET" * 1000)
    state = tmp_path / "state"
    srv = nbd_server(str(image), "--state-dir", str(state), export="disk")
    target = (srv.host, srv.port)
    names = HOSTILE_NAMES + [str(secret), str(image), str(tmp_path)]

    async def main():
        for name in names:
            with pytest.raises(NBDOptionError) as err:
                await connect(target, name)
            assert err.value.reply == c.NBD_REP_ERR_UNKNOWN, name
            with pytest.raises(NBDOptionError) as err:
                await list_meta_contexts(target, name)
            assert err.value.reply == c.NBD_REP_ERR_UNKNOWN, name
            with pytest.raises(NBDConnectionError):  # EXPORT_NAME: closed, nothing served
                await connect(target, name, go=False, structured=False)
        async with await connect(target, "") as client:  # "" is the default export
            assert client.size == 1024 * 1024
            assert await client.pread(6, 0) == bytes(6)

    asyncio.run(main())
    # A URI's percent-encoding is decoded by the client: "%2e%2e" asks for "..".
    h = nbd.NBD()
    with pytest.raises(nbd.Error) as err:
        h.connect_uri(f"nbd://{srv.host}:{srv.port}/%2e%2e%2fsecret.img")
    assert err.value.errnum == errno.ENOENT
    # Nothing but the one export's state was ever created.
    assert sorted(p.name for p in (state / "exports").iterdir()) == ["disk"]
    srv.stop()
    assert secret.read_bytes() == b"SECRET" * 1000


def test_export_name_with_nul_or_bad_utf8_is_refused(server):
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.recv(18)
    sock.sendall(struct.pack(">I", 3))
    for raw in (b"disk\0../x", b"\xff\xfe", b"d" * 4097):
        data = struct.pack(">I", len(raw)) + raw + b"\0\0"
        sock.sendall(c.OPTION_HEADER.pack(c.IHAVEOPT, c.NBD_OPT_GO, len(data)) + data)
        head = b""
        while len(head) < 20:
            head += sock.recv(20 - len(head))
        _, _, reply, length = c.OPTION_REPLY_HEADER.unpack(head)
        body = b""
        while len(body) < length:
            body += sock.recv(length - len(body))
        assert reply == c.NBD_REP_ERR_INVALID, raw
    sock.close()


def test_state_directory_stays_under_exports():
    for name in ("..", ".", "../x", "/etc/passwd", "%2e%2e", "a/b", "", "%"):
        path = state_directory("/state", name)
        assert os.path.dirname(path) == "/state/exports", name
        assert os.path.basename(path) not in (".", "..", ""), name
    assert len({state_directory("/s", n) for n in ("..", "%2E%2E", "%2e%2e", ".", "%")}) == 5


def test_snapshot_of_tls_only_export_is_tls_only():
    class Tracker:
        def get(self, name):
            return None

    export = Export("disk", MemoryBackend(1 << 20))
    export.tls_only = True
    export.tracker = Tracker()  # type: ignore[assignment]
    checkpoint = Checkpoint("c1", "b", "never", object(), "")  # type: ignore[arg-type]
    snapshot = export.snapshot_export(checkpoint)
    assert snapshot.tls_only


# --- the control socket ---------------------------------------------------------------------


def _mode(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def test_control_socket_is_private_by_default(server):
    mode, uid, _ = _mode(server.control)
    assert mode == 0o600 and uid == os.getuid()
    assert stat.S_ISSOCK(os.stat(server.control).st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_control_socket_owner_and_group(nbd_server, image, tmp_path):
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid)
    srv = nbd_server(
        str(image), "--control-owner", "nobody", "--control-group", group.gr_name, export="disk"
    )
    assert _mode(srv.control) == (0o660, nobody.pw_uid, group.gr_gid)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\ncontrol = "{tmp_path / "ctl.sock"}"\ncontrol-owner = {nobody.pw_uid}\n'
        f'[[export]]\npath = "{image}"\n'
    )
    srv = nbd_server("--config", str(config), "--state-dir", str(tmp_path / "s2"))
    assert _mode(str(tmp_path / "ctl.sock")) == (0o600, nobody.pw_uid, os.getgid())


def test_unknown_control_owner_is_one_line_error(image, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "nbdtrack", "serve", str(image), "--listen", "127.0.0.1:0",
         "--state-dir", str(tmp_path / "s"), "--control-group", "no-such-group-x"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr == "nbdtrack: error: control socket group: no group 'no-such-group-x'\n"


# --- read-only, enforced by the server --------------------------------------------------------


def test_read_only_refused_by_the_server_whatever_the_client(nbd_server, make_image):
    image: Path = make_image(1024 * 1024)
    image.write_bytes(b"ORIGINAL" * (1024 * 1024 // 8))
    srv = nbd_server(str(image), "--read-only", export="disk")
    sock = socket.create_connection((srv.host, srv.port), timeout=5)
    sock.recv(18)
    sock.sendall(struct.pack(">I", 3) + c.OPTION_HEADER.pack(c.IHAVEOPT, 1, 4) + b"disk")
    reply = b""
    while len(reply) < 10:
        reply += sock.recv(10 - len(reply))
    assert struct.unpack(">QH", reply)[1] & c.NBD_FLAG_READ_ONLY
    requests = [
        (c.NBD_CMD_WRITE, 0, b"x" * 4096),
        (c.NBD_CMD_WRITE_ZEROES, 0, b""),
        (c.NBD_CMD_TRIM, c.NBD_CMD_FLAG_FUA, b""),
        (c.NBD_CMD_WRITE, c.NBD_CMD_FLAG_FUA, b"y" * 4096),
    ]
    for cookie, (cmd, flags, payload) in enumerate(requests):
        length = len(payload) or 4096
        sock.sendall(c.REQUEST.pack(c.NBD_REQUEST_MAGIC, flags, cmd, cookie, 0, length) + payload)
        got = b""
        while len(got) < 16:
            got += sock.recv(16 - len(got))
        assert struct.unpack(">IIQ", got)[1:] == (c.NBD_EPERM, cookie)
    sock.close()
    srv.stop()
    assert image.read_bytes()[:8] == b"ORIGINAL"
