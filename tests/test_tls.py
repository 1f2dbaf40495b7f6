"""TLS (STARTTLS): libnbd, QEMU and nbdtrack's own client connect with certificates; a
client without TLS, with a certificate from another CA, or with one not on the
allow-list is refused and reads nothing.

Certificates come from tests/tls_certs.py (openssl, at test time).
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import nbd
import pytest

from nbdtrack.client import (
    NBDConnectionError,
    NBDOptionError,
    NBDRequestError,
    client_context,
    connect,
    list_exports,
)
from nbdtrack.protocol import constants as c
from tests.tls_certs import Certificates

MiB = 1024 * 1024
MARKER = b"SECRET-DISK-CONTENT-" * 8


def nbds(srv, tls_certs: Certificates, who: str = "client", export: str = "disk") -> str:
    return f"nbds://{srv.host}:{srv.port}/{export}?tls-certificates={tls_certs.client_dir(who)}"


def marked_image(make_image, name: str = "disk.img") -> Path:
    path = make_image(16 * MiB, name)
    with open(path, "r+b") as f:
        f.write(MARKER)
        f.seek(MiB)
        f.write(MARKER)
    return path


def run(*cmd: str, ok: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stderr}"
    return proc


def libnbd_handle(who_dir: Path | None, tls: int = nbd.TLS_REQUIRE) -> nbd.NBD:
    h = nbd.NBD()
    h.set_tls(tls)
    if who_dir is not None:
        h.set_tls_certificates(str(who_dir))
    return h


@pytest.fixture
def tls_server(nbd_server, make_image, tls_certs):
    """tls_server(*extra) -> a server in TLS require mode (client certs checked)."""

    def start(*extra: str, mode: str = "require", image: Path | None = None):
        image = image or marked_image(make_image)
        return nbd_server(str(image), *tls_certs.server_args(mode), *extra, export="disk")

    return start


# --- the three clients over TLS --------------------------------------------------------


def test_nbdinfo_and_libnbd_over_nbds(tls_server, tls_certs):
    srv = tls_server("--bitmap", "b0")
    out = run("nbdinfo", "--json", nbds(srv, tls_certs)).stdout
    info = json.loads(out)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 16 * MiB

    h = libnbd_handle(tls_certs.client_dir())
    h.add_meta_context("qemu:dirty-bitmap:b0")
    h.connect_uri(f"nbds://{srv.host}:{srv.port}/disk")
    assert h.get_tls_negotiated()
    assert h.pread(len(MARKER), 0) == MARKER
    h.pwrite(b"over tls", 4 * MiB)
    h.flush()
    assert h.pread(8, 4 * MiB) == b"over tls"
    seen = []
    h.block_status(64 * 1024, 4 * MiB, lambda ctx, off, ents, err: seen.append(ents))
    assert seen and seen[0][1] & 1  # the written granule is dirty
    h.shutdown()
    assert "TLS established (TLSv1." in srv.log


def test_qemu_over_tls_creds_x509(tls_server, tls_certs, tmp_path):
    srv = tls_server()
    creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={tls_certs.client_dir()}"
    opts = f"driver=nbd,host={srv.host},port={srv.port},export=disk,tls-creds=tls0"
    info = run("qemu-img", "info", "--output=json", "--object", creds, "--image-opts", opts)
    assert json.loads(info.stdout)["virtual-size"] == 16 * MiB
    run(
        "qemu-io", "--object", creds, "--image-opts", opts,
        "-c", f"write -P 0x5a {2 * MiB} 65536", "-c", "flush",
    )  # fmt: skip
    copy = tmp_path / "copy.raw"
    run("qemu-img", "convert", "--object", creds, "--image-opts", opts, "-O", "raw", str(copy))
    data = copy.read_bytes()
    assert data[: len(MARKER)] == MARKER
    assert data[2 * MiB : 2 * MiB + 65536] == b"\x5a" * 65536


def test_project_client_over_tls(tls_server, tls_certs):
    srv = tls_server("--bitmap", "b0")

    async def main():
        uri = nbds(srv, tls_certs)
        async with await connect(uri, meta_contexts=["qemu:dirty-bitmap:b0"]) as client:
            assert client.tls_version in ("TLSv1.2", "TLSv1.3")
            assert await client.pread(len(MARKER), 0) == MARKER
            await client.pwrite(b"x" * 4096, 8 * MiB)
            status = await client.block_status(8 * MiB, 64 * 1024)
            assert status["qemu:dirty-bitmap:b0"][0].flags == 1
        # An explicit context instead of the URI's parameters.
        ctx = client_context(str(tls_certs.client_dir()))
        async with await connect((srv.host, srv.port), "disk", tls=ctx) as client:
            assert await client.pread(4096, 8 * MiB) == b"x" * 4096
        assert [e.name for e in await list_exports(uri)] == ["disk"]

    asyncio.run(main())


def test_read_only_enforced_over_tls(tls_server, tls_certs):
    srv = tls_server("--read-only")
    h = libnbd_handle(tls_certs.client_dir())
    h.set_strict_mode(0)  # send the write anyway: the server must refuse it
    h.connect_uri(f"nbds://{srv.host}:{srv.port}/disk")
    assert h.is_read_only()
    with pytest.raises(nbd.Error) as info:
        h.pwrite(b"nope", 0)
    assert info.value.errnum == errno.EPERM
    assert h.pread(len(MARKER), 0) == MARKER
    h.shutdown()

    async def main():
        async with await connect(nbds(srv, tls_certs)) as client:
            for call in (
                client.pwrite(b"x", 0),
                client.trim(0, 4096),
                client.zero(0, 4096),
            ):
                with pytest.raises(NBDRequestError) as err:
                    await call
                assert err.value.error == c.NBD_EPERM

    asyncio.run(main())


# --- refusals ----------------------------------------------------------------------------


def _recv_all(sock: socket.socket, timeout: float = 3) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            more = sock.recv(65536)
            if not more:
                break
            data += more
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _replies(data: bytes) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos + 20 <= len(data):
        magic, opt, rtype, length = c.OPTION_REPLY_HEADER.unpack_from(data, pos)
        assert magic == c.OPTION_REPLY_MAGIC
        out.append((opt, rtype))
        pos += 20 + length
    return out


def _opt(opt: int, data: bytes = b"") -> bytes:
    return c.OPTION_HEADER.pack(c.IHAVEOPT, opt, len(data)) + data


def _name(text: bytes) -> bytes:
    return struct.pack(">I", len(text)) + text


def test_plaintext_client_gets_tls_reqd_and_reads_nothing(tls_server, tls_certs):
    srv = tls_server()
    sock = socket.create_connection((srv.host, srv.port), timeout=5)
    options = [
        _opt(c.NBD_OPT_LIST),
        _opt(c.NBD_OPT_INFO, _name(b"disk") + b"\0\0"),
        _opt(c.NBD_OPT_GO, _name(b"disk") + b"\0\0"),
        _opt(c.NBD_OPT_GO, _name(b"") + b"\0\0"),
        _opt(c.NBD_OPT_STRUCTURED_REPLY),
        _opt(c.NBD_OPT_EXTENDED_HEADERS),
        _opt(c.NBD_OPT_LIST_META_CONTEXT, _name(b"disk") + b"\0\0\0\0"),
        _opt(c.NBD_OPT_SET_META_CONTEXT, _name(b"disk") + b"\0\0\0\0"),
        _opt(99),
        _opt(c.NBD_OPT_EXPORT_NAME, b"disk"),  # cannot be refused: the server hangs up
        c.REQUEST.pack(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_READ, 1, 0, 4096),
    ]
    sock.sendall(struct.pack(">I", 3) + b"".join(options))
    data = _recv_all(sock)
    sock.close()
    assert data[:16] == b"NBDMAGICIHAVEOPT"
    replies = _replies(data[18:])
    assert [r for _, r in replies] == [c.NBD_REP_ERR_TLS_REQD] * 9
    assert MARKER[:16] not in data and b"disk" not in data  # not even the export's name
    assert "NBD_OPT_EXPORT_NAME before TLS" in srv.log

    # libnbd without TLS, and nbdtrack's client on a plain URI: refused the same way.
    h = libnbd_handle(None, nbd.TLS_DISABLE)
    with pytest.raises(nbd.Error):
        h.connect_uri(f"nbd://{srv.host}:{srv.port}/disk")

    async def main():
        with pytest.raises(NBDOptionError) as err:
            await connect((srv.host, srv.port), "disk")
        assert err.value.reply == c.NBD_REP_ERR_TLS_REQD

    asyncio.run(main())


def _refused_everywhere(srv, tls_certs: Certificates, who: str) -> None:
    h = libnbd_handle(tls_certs.client_dir(who))
    with pytest.raises(nbd.Error):
        h.connect_uri(f"nbds://{srv.host}:{srv.port}/disk")
        h.pread(16, 0)  # TLS 1.3 reports a refused client certificate late

    async def main():
        with pytest.raises(NBDConnectionError):
            client = await connect(nbds(srv, tls_certs, who))
            await client.pread(16, 0)

    asyncio.run(main())
    creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={tls_certs.client_dir(who)}"
    opts = f"driver=nbd,host={srv.host},port={srv.port},export=disk,tls-creds=tls0"
    proc = run("qemu-img", "info", "--object", creds, "--image-opts", opts, ok=False)
    assert proc.returncode != 0


def test_certificate_from_another_ca_is_refused(tls_server, tls_certs):
    srv = tls_server()
    _refused_everywhere(srv, tls_certs, "rogue")
    assert "certificate verify failed" in srv.log
    assert "serving export" not in srv.log


def test_missing_client_certificate_is_refused(tls_server, tls_certs):
    srv = tls_server()
    _refused_everywhere(srv, tls_certs, "anonymous")
    assert "serving export" not in srv.log


@pytest.mark.parametrize(
    "allow, allowed",
    [
        ("client1", True),
        ("CN=client1,O=nbdtrack tests", True),
        ("O=nbdtrack tests,CN=client1", True),  # order does not matter
        ("CN=client1", False),  # a DN must match the whole subject
        ("CN=client1,O=other", False),
        ("intruder2", False),
    ],
)
def test_allow_list(tls_server, tls_certs, allow, allowed):
    srv = tls_server("--tls-allow", allow, "--tls-allow", "nobody")

    async def main():
        client = await connect(nbds(srv, tls_certs))
        try:
            assert await client.pread(len(MARKER), 0) == MARKER
        finally:
            await client.close()

    if allowed:
        asyncio.run(main())
    else:
        with pytest.raises(NBDConnectionError):
            asyncio.run(main())
        assert "is not on the TLS allow-list" in srv.log


def test_signed_certificate_not_on_allow_list_is_refused(tls_server, tls_certs):
    srv = tls_server("--tls-allow", "client1")
    _refused_everywhere(srv, tls_certs, "other")
    assert "client certificate 'CN=intruder' is not on the TLS allow-list" in srv.log
    h = libnbd_handle(tls_certs.client_dir())  # client1 still gets in
    h.connect_uri(f"nbds://{srv.host}:{srv.port}/disk")
    assert h.pread(len(MARKER), 0) == MARKER
    h.shutdown()


# --- selective TLS: tls-only exports -----------------------------------------------------


def test_selective_tls_hides_and_refuses_tls_only_exports(
    nbd_server, make_image, tls_certs, tmp_path
):
    public = marked_image(make_image, "public.img")
    secret = marked_image(make_image, "secret.img")
    config = tmp_path / "nbdtrack.toml"
    config.write_text(
        f'[server]\ntls = "on"\ntls-cert = "{tls_certs.server_cert}"\n'
        f'tls-key = "{tls_certs.server_key}"\n'
        f'[[export]]\nname = "public"\npath = "{public}"\n'
        f'[[export]]\nname = "secret"\npath = "{secret}"\ntls-only = true\n'
    )
    srv = nbd_server("--config", str(config), "--state-dir", str(tmp_path / "state"))

    async def main():
        plain = (srv.host, srv.port)
        assert [e.name for e in await list_exports(plain)] == ["public"]
        with pytest.raises(NBDOptionError) as err:
            await connect(plain, "secret")
        assert err.value.reply == c.NBD_REP_ERR_TLS_REQD
        with pytest.raises(NBDConnectionError):  # EXPORT_NAME: the server hangs up
            await connect(plain, "secret", go=False, structured=False)
        async with await connect(plain, "public") as client:
            assert client.tls_version is None
            assert await client.pread(16, 0) == MARKER[:16]
        ctx = client_context(str(tls_certs.client_dir()))
        names = [e.name for e in await list_exports(plain, tls=ctx)]
        assert names == ["public", "secret"]
        async with await connect(plain, "secret", tls=ctx) as client:
            assert await client.pread(16, 0) == MARKER[:16]

    asyncio.run(main())
    # libnbd with TLS_ALLOW upgrades on its own and reaches the secret export.
    h = libnbd_handle(tls_certs.client_dir(), nbd.TLS_ALLOW)
    h.connect_uri(f"nbd://{srv.host}:{srv.port}/secret")
    assert h.get_tls_negotiated()
    h.shutdown()


# --- handshake misbehaviour around STARTTLS ------------------------------------------------


def test_garbage_instead_of_tls_handshake_closes(tls_server, tls_certs):
    srv = tls_server()
    for tail in (b"\x16\x03\x01\x00\x05hello", b"IHAVEOPT" * 4, b""):
        sock = socket.create_connection((srv.host, srv.port), timeout=5)
        sock.sendall(struct.pack(">I", 3) + _opt(c.NBD_OPT_STARTTLS))
        data = sock.recv(18)
        while len(data) < 18 + 20:
            data += sock.recv(64)
        assert _replies(data[18:38]) == [(c.NBD_OPT_STARTTLS, c.NBD_REP_ACK)]
        if tail:
            sock.sendall(tail)
            assert _recv_all(sock, 5) is not None
        sock.close()
    # Plaintext right behind STARTTLS, in the same packet: a protocol error.
    sock = socket.create_connection((srv.host, srv.port), timeout=5)
    sock.sendall(struct.pack(">I", 3) + _opt(c.NBD_OPT_STARTTLS) + _opt(c.NBD_OPT_LIST))
    _recv_all(sock)
    sock.close()
    assert "after NBD_OPT_STARTTLS" in srv.log
    h = libnbd_handle(tls_certs.client_dir())
    h.connect_uri(f"nbds://{srv.host}:{srv.port}/disk")
    assert h.pread(len(MARKER), 0) == MARKER
    h.shutdown()


def test_no_key_material_in_logs(nbd_server, make_image, tls_certs):
    srv = nbd_server(
        str(marked_image(make_image)), *tls_certs.server_args("require"), "-v", export="disk"
    )
    h = libnbd_handle(tls_certs.client_dir())
    h.connect_uri(f"nbds://{srv.host}:{srv.port}/disk")
    h.pread(4096, 0)
    h.shutdown()
    with pytest.raises(nbd.Error):  # a failed handshake is logged too
        libnbd_handle(tls_certs.client_dir("rogue")).connect_uri(
            f"nbds://{srv.host}:{srv.port}/disk"
        )
    srv.stop()
    log = srv.log
    assert "TLS established" in log
    key_lines = [
        line
        for line in tls_certs.server_key.read_text().splitlines()
        if line and not line.startswith("-----")
    ]
    assert "PRIVATE KEY" not in log
    assert not any(line in log for line in key_lines)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tls=require"], "needs --tls-cert and --tls-key"),
        (["--tls=on", "--tls-cert", "/nonexistent.pem", "--tls-key", "/x"], "does not exist"),
        (["--tls-allow", "client1"], "need --tls=on or --tls=require"),
        (["--tls=on", "--tls-cert", "CERT", "--tls-key", "CERT"], "cannot load TLS certificate"),
        (["--tls=on", "--tls-cert", "CERT", "--tls-key", "KEY", "--tls-allow", "x"], "--tls-ca"),
    ],
)
def test_tls_configuration_errors_are_one_line(image, tls_certs, args, message, tmp_path):
    files = {"CERT": str(tls_certs.server_cert), "KEY": str(tls_certs.server_key)}
    args = [files.get(a, a) for a in args]
    proc = subprocess.run(
        [
            sys.executable, "-m", "nbdtrack", "serve", str(image), "--listen", "127.0.0.1:0",
            "--state-dir", str(tmp_path / "s"), *args,
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbdtrack: error:") and message in lines[0]


def test_backup_over_nbds(tls_server, tls_certs, tmp_path):
    """The backup command reads through nbdtrack's client: an nbds URI is all it needs."""
    srv = tls_server("--bitmap", "b")
    h = libnbd_handle(tls_certs.client_dir())
    h.connect_uri(f"nbds://{srv.host}:{srv.port}/disk")
    h.pwrite(b"backed up over TLS" * 100, 3 * MiB)
    h.flush()
    h.shutdown()
    repo = tmp_path / "repo"
    for _ in range(2):  # a full, then an incremental over the same URI
        proc = subprocess.run(
            [sys.executable, "-m", "nbdtrack", "backup", nbds(srv, tls_certs), str(repo),
             "--bitmap", "b", "--control", srv.control, "--progress", "none"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    manifest = json.loads((repo / "disk" / "manifest.json").read_text())
    first = repo / "disk" / manifest["backups"][0]["file"]
    out = tmp_path / "restored.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(first), str(out))
    data = out.read_bytes()
    assert data[: len(MARKER)] == MARKER
    assert data[3 * MiB : 3 * MiB + 18] == b"backed up over TLS"


def test_client_checks_the_server_certificate(nbd_server, make_image, tls_certs, tmp_path):
    srv = nbd_server(
        str(marked_image(make_image)),
        *tls_certs.server_args("require", verify_clients=False),
        export="disk",
    )
    base = f"nbds://{srv.host}:{srv.port}/disk"
    anonymous = tls_certs.client_dir("anonymous")  # the CA only, no client certificate
    untrusted = tmp_path / "empty"
    untrusted.mkdir()

    async def main():
        async with await connect(f"{base}?tls-certificates={anonymous}") as client:
            assert await client.pread(16, 0) == MARKER[:16]
        with pytest.raises(NBDConnectionError, match="TLS handshake failed"):
            await connect(f"{base}?tls-certificates={anonymous}&tls-hostname=elsewhere")
        with pytest.raises(NBDConnectionError, match="TLS handshake failed"):
            await connect(f"{base}?tls-certificates={untrusted}")  # system CAs only
        insecure = f"{base}?tls-certificates={untrusted}&tls-verify-peer=false"
        async with await connect(insecure) as client:
            assert client.tls_version is not None

    asyncio.run(main())
