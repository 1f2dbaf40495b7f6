"""Interoperability with QEMU's tools (qemu-img, qemu-io, qemu-nbd 7.2) and libnbd's
command-line tools (nbdinfo, nbdcopy), run as real processes against nbdtrack.

Each test checks what the tool reports *and* what really landed in the image file.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest

MiB = 1024 * 1024
K64 = 64 * 1024


def run(*cmd: str, ok: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stderr}"
    return proc


def file_bytes(path: Path, offset: int = 0, length: int | None = None) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


def put(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def is_data(path: Path, offset: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) == offset
    except OSError:  # ENXIO: only hole up to the end
        return False
    finally:
        os.close(fd)


def sparse_image(make_image) -> tuple[Path, list[tuple[int, int, bool]]]:
    """A 16 MiB image with three allocated ranges; returns it and its (start, length,
    is_data) map. The third range holds zeros that are nevertheless allocated."""
    path = make_image(16 * MiB)
    put(path, MiB, b"\x11" * K64)
    put(path, 5 * MiB + 4096, b"\x22" * 4096)
    put(path, 8 * MiB, bytes(8192))
    expected = [
        (0, MiB, False),
        (MiB, K64, True),
        (MiB + K64, 4 * MiB - K64 + 4096, False),
        (5 * MiB + 4096, 4096, True),
        (5 * MiB + 8192, 3 * MiB - 8192, False),
        (8 * MiB, 8192, True),
        (8 * MiB + 8192, 8 * MiB - 8192, False),
    ]
    return path, expected


def serving_lines(server) -> list[str]:
    return re.findall(r"(\S+): serving export", server.log)


# --- qemu-img ----------------------------------------------------------------------


def test_qemu_img_info(nbd_server, make_image):
    image = make_image(48 * MiB + 4096)
    server = nbd_server(str(image), export="disk")
    info = json.loads(run("qemu-img", "info", "--output=json", server.uri()).stdout)
    assert info["virtual-size"] == 48 * MiB + 4096
    assert info["format"] == "raw"
    assert info["filename"] == server.uri()
    text = run("qemu-img", "info", server.uri()).stdout
    assert f"virtual size: 48 MiB ({48 * MiB + 4096} bytes)" in text


def test_qemu_img_map_sparse(nbd_server, make_image):
    image, expected = sparse_image(make_image)
    server = nbd_server(str(image), export="disk")
    out = run("qemu-img", "map", "--output=json", server.uri()).stdout
    got = [(e["start"], e["length"], e["data"], e["zero"]) for e in json.loads(out)]
    assert got == [(start, length, data, not data) for start, length, data in expected]


def test_qemu_img_convert_raw_both_ways_and_compare(nbd_server, make_image, tmp_path):
    size = 8 * MiB
    rng = random.Random(3)
    source = tmp_path / "source.raw"
    content = rng.randbytes(3 * MiB) + bytes(2 * MiB) + rng.randbytes(3 * MiB)
    source.write_bytes(content)
    image = make_image(size)
    image.write_bytes(b"\xff" * size)  # the zeros in the middle must really be written
    server = nbd_server(str(image), export="disk")

    # -W -m 16: sixteen coroutines writing out of order.
    convert = ["qemu-img", "convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw"]
    run(*convert, str(source), server.uri())
    assert file_bytes(image) == content

    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri(), str(back))
    assert file_bytes(back) == content

    same = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), server.uri())
    assert "Images are identical." in same.stdout
    put(image, 3 * MiB + 2 * MiB - 1, b"\x01")  # one byte inside the zeroed range
    diff = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), server.uri(), ok=False)
    assert diff.returncode == 1
    assert f"Content mismatch at offset {5 * MiB - 512}!" in diff.stdout


def test_qemu_img_convert_qcow2_to_nbd(nbd_server, make_image, tmp_path):
    size = 16 * MiB
    qcow2 = tmp_path / "source.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(size))
    run(
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        f"write -P 0x11 {MiB} {256 * 1024}",
        "-c",
        f"write -P 0x22 {9 * MiB + 512} 4096",
        str(qcow2),
    )
    image = make_image(size)
    image.write_bytes(b"\xee" * size)
    server = nbd_server(str(image), export="disk")

    run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(qcow2), server.uri())
    expected = bytearray(size)
    expected[MiB : MiB + 256 * 1024] = b"\x11" * (256 * 1024)
    expected[9 * MiB + 512 : 9 * MiB + 512 + 4096] = b"\x22" * 4096
    assert file_bytes(image) == bytes(expected)
    same = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow2), server.uri())
    assert "Images are identical." in same.stdout


def test_qemu_img_bench_queue_depth_64(nbd_server, make_image):
    """QEMU's NBD client with 64 requests in flight, writing then reading back."""
    image = make_image(32 * MiB)
    put(image, 32 * MiB - 4096, b"\x01" * 4096)  # just past the benchmarked range
    server = nbd_server(str(image), export="disk")
    bench = f"qemu-img bench -w --pattern=0x5a -c 496 -d 64 -s {K64} -f raw".split()
    out = run(*bench, server.uri()).stdout
    assert "Sending 496 write requests, 65536 bytes each, 64 in parallel" in out
    assert file_bytes(image, 0, 496 * K64) == b"\x5a" * (496 * K64)
    assert file_bytes(image, 32 * MiB - 4096, 4096) == b"\x01" * 4096
    out = run(
        "qemu-img", "bench", "-c", "512", "-d", "64", "-s", str(K64), "-f", "raw", server.uri()
    ).stdout
    assert "Sending 512 read requests, 65536 bytes each, 64 in parallel" in out
    assert "Run completed" in out


# --- qemu-io -----------------------------------------------------------------------


def qemu_io(uri: str, *commands: str, ok: bool = True) -> str:
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    proc = run(*args, uri, ok=ok)
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_qemu_io_patterns_sync_and_aio(nbd_server, make_image, transport):
    image = make_image(16 * MiB)
    server = nbd_server(str(image), export="disk", unix=transport == "unix")
    out = qemu_io(
        server.uri(),
        f"write -P 0xab {MiB} {K64}",
        f"read -P 0xab {MiB} {K64}",
        f"aio_write -P 0xcd {2 * MiB} {128 * 1024}",
        f"aio_write -P 0xef {3 * MiB + 512} {128 * 1024}",
        f"aio_write -f -P 0x99 {5 * MiB} 4096",  # -f: FUA
        "aio_flush",
        f"aio_read -P 0xcd {2 * MiB} {128 * 1024}",
        f"aio_read -P 0xef {3 * MiB + 512} {128 * 1024}",
        "aio_flush",
        "flush",
    )
    assert "verification failed" not in out and "error" not in out.lower()
    assert f"wrote 65536/65536 bytes at offset {MiB}" in out
    assert f"read 65536/65536 bytes at offset {MiB}" in out
    assert f"wrote 131072/131072 bytes at offset {2 * MiB}" in out
    assert f"read 131072/131072 bytes at offset {3 * MiB + 512}" in out
    assert file_bytes(image, MiB, K64) == b"\xab" * K64
    assert file_bytes(image, 2 * MiB, 128 * 1024) == b"\xcd" * (128 * 1024)
    assert file_bytes(image, 3 * MiB + 512, 128 * 1024) == b"\xef" * (128 * 1024)
    assert file_bytes(image, 3 * MiB, 512) == bytes(512)
    assert file_bytes(image, 5 * MiB, 4096) == b"\x99" * 4096

    # read -P really compares: data written behind qemu's back makes it fail.
    put(image, MiB + 4096, b"\x00")
    bad = qemu_io(server.uri(), f"read -P 0xab {MiB} {K64}", ok=False)
    assert "Pattern verification failed" in bad


def test_qemu_io_write_zeroes_discard_flush(nbd_server, make_image):
    image = make_image(16 * MiB)
    put(image, MiB, b"\x77" * MiB)
    server = nbd_server(str(image), export="disk")
    zero_at, unmap_at, discard_at = MiB + K64, MiB + 4 * K64, MiB + 8 * K64
    out = qemu_io(
        server.uri(),
        f"write -z {zero_at} {K64}",
        f"write -z -u -f {unmap_at} {K64}",
        f"discard {discard_at} {2 * K64}",
        "flush",
        f"read -P 0 {zero_at} {K64}",
        f"read -P 0 {unmap_at} {K64}",
        f"read -P 0x77 {MiB} {K64}",
        f"read -P 0x77 {discard_at + 2 * K64} {K64}",
    )
    assert "verification failed" not in out and "error" not in out.lower()
    assert f"wrote 65536/65536 bytes at offset {zero_at}" in out
    assert f"discard 131072/131072 bytes at offset {discard_at}" in out

    expected = bytearray(b"\x77" * MiB)
    for offset, length in ((zero_at, K64), (unmap_at, K64), (discard_at, 2 * K64)):
        expected[offset - MiB : offset - MiB + length] = bytes(length)
    assert file_bytes(image, MiB, MiB) == bytes(expected)
    # Unmapping zeroes and discards punched holes into the file.
    assert not is_data(image, unmap_at)
    assert not is_data(image, discard_at)
    assert is_data(image, MiB)


# --- qemu-nbd and nbdinfo ------------------------------------------------------------


def two_exports(nbd_server, make_image, tmp_path):
    disk, _ = sparse_image(make_image)
    other = make_image(2 * MiB, "other.img")
    config = tmp_path / "exports.toml"
    config.write_text(
        f'[[export]]\nname = "other"\npath = "{other}"\n'
        'description = "second export"\nread-only = true\n'
    )
    return nbd_server(
        str(disk), "--description", "first export", "--config", str(config), export="disk"
    )


def test_qemu_nbd_list(nbd_server, make_image, tmp_path):
    server = two_exports(nbd_server, make_image, tmp_path)
    out = run("qemu-nbd", "--list", "-b", server.host, "-p", str(server.port)).stdout
    assert "exports available: 2" in out
    disk, other = out.split(" export: ")[1:]
    assert disk.startswith("'disk'") and "description: first export" in disk
    assert f"size:  {16 * MiB}" in disk and "base:allocation" in disk
    assert "flush fua trim zeroes df multi cache fast-zero" in disk
    assert other.startswith("'other'") and "description: second export" in other
    assert f"size:  {2 * MiB}" in other and "readonly" in other


def test_nbdinfo_list(nbd_server, make_image, tmp_path):
    server = two_exports(nbd_server, make_image, tmp_path)
    base = f"nbd://{server.host}:{server.port}"
    text = run("nbdinfo", "--list", base).stdout
    assert 'export="disk":' in text and 'export="other":' in text
    assert "description: first export" in text and "description: second export" in text

    info = json.loads(run("nbdinfo", "--list", "--json", base).stdout)
    exports = {e["export-name"]: e for e in info["exports"]}
    assert set(exports) == {"disk", "other"}
    assert exports["disk"]["description"] == "first export"
    assert exports["disk"]["export-size"] == 16 * MiB
    assert not exports["disk"]["is_read_only"]
    assert exports["other"]["description"] == "second export"
    assert exports["other"]["export-size"] == 2 * MiB
    assert exports["other"]["is_read_only"]


def test_nbdinfo_json(nbd_server, make_image):
    image = make_image(24 * MiB)
    server = nbd_server(str(image), "--description", "json me", export="disk")
    info = json.loads(run("nbdinfo", "--json", server.uri()).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True and info["TLS"] is False
    (export,) = info["exports"]
    assert export["export-name"] == "disk"
    assert export["description"] == "json me"
    assert export["export-size"] == 24 * MiB
    assert export["contexts"] == ["base:allocation"]
    assert export["is_read_only"] is False
    for flag in ("flush", "fua", "trim", "zero", "fast_zero", "cache", "df", "multi_conn"):
        assert export[f"can_{flag}"] is True, flag
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * MiB


def test_nbdinfo_map_sparse(nbd_server, make_image):
    image, expected = sparse_image(make_image)
    server = nbd_server(str(image), export="disk")
    out = run("nbdinfo", "--map", server.uri()).stdout
    got = []
    for line in out.splitlines():
        offset, length, state, description = line.split(maxsplit=3)
        got.append((int(offset), int(length), int(state), description))
    assert got == [
        (start, length, 0, "data") if data else (start, length, 3, "hole,zero")
        for start, length, data in expected
    ]
    totals = {}
    for line in run("nbdinfo", "--map", "--totals", server.uri()).stdout.splitlines():
        length, _percent, state, _description = line.split(maxsplit=3)
        totals[int(state)] = int(length)
    data_bytes = sum(length for _, length, data in expected if data)
    assert totals == {0: data_bytes, 3: 16 * MiB - data_bytes}


# --- nbdcopy -----------------------------------------------------------------------


def wait_for(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def new_connections(server, before: int) -> list[str]:
    """Peers that started transmission after the first ``before`` ones; waits until all
    of them disconnected, and checks that they were all connected at the same time."""
    peers = serving_lines(server)[before:]

    def events() -> list[tuple[str, str]]:
        found = re.findall(r"(\S+): (serving export|disconnected)", server.log)
        starts = [i for i, (_, what) in enumerate(found) if what == "serving export"]
        return found[starts[before] :]

    wait_for(lambda: sum(what == "disconnected" for _, what in events()) == len(peers))
    kinds = [what for _, what in events()]
    assert kinds == ["serving export"] * len(peers) + ["disconnected"] * len(peers), (
        "connections were not open at the same time"
    )
    return peers


def test_nbdcopy_multi_conn_roundtrip(nbd_server, make_image, tmp_path):
    size = 32 * MiB
    rng = random.Random(11)
    source = tmp_path / "source.raw"
    with open(source, "wb") as f:  # random data around a 4 MiB hole
        f.write(rng.randbytes(14 * MiB))
        f.seek(18 * MiB)
        f.write(rng.randbytes(14 * MiB))
    content = file_bytes(source)
    assert len(content) == size
    image = make_image(size)
    image.write_bytes(b"\xff" * size)  # the hole must be written as zeros
    server = nbd_server(str(image), export="disk")

    before = len(serving_lines(server))
    run("nbdcopy", "--connections=4", "--threads=4", str(source), server.uri())
    assert len(set(new_connections(server, before))) == 4
    assert file_bytes(image) == content

    out = tmp_path / "out.raw"
    before = len(serving_lines(server))
    run("nbdcopy", "--connections=4", "--threads=4", server.uri(), str(out))
    assert len(set(new_connections(server, before))) == 4
    assert file_bytes(out) == content
    run("cmp", str(source), str(out))


def test_nbdcopy_nbd_to_nbd(nbd_server, make_image, tmp_path):
    src_image = make_image(8 * MiB, "a.img")
    content = random.Random(5).randbytes(8 * MiB)
    src_image.write_bytes(content)
    dst_image = make_image(8 * MiB, "b.img")
    src = nbd_server(str(src_image), "--read-only", export="a")
    dst = nbd_server(str(dst_image), unix=True, export="b")
    run("nbdcopy", "--connections=4", "--threads=4", src.uri(), dst.uri())
    assert file_bytes(dst_image) == content
    assert len(serving_lines(src)) == len(serving_lines(dst)) == 4
