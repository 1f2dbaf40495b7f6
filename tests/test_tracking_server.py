"""Dirty tracking through a real server: QEMU's iotest 223, crashes, offline changes."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import nbd

KiB = 1024
MiB = 1024 * KiB


def qemu_map(srv, context: str) -> list[dict]:
    opts = (
        f"driver=nbd,server.type=inet,server.host={srv.host},server.port={srv.port},"
        f"export=disk,x-dirty-bitmap={context}"
    )
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "--image-opts", opts],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [(e["start"], e["length"], e["data"]) for e in json.loads(out)]


def bitmap_extents(h: nbd.NBD, context: str, size: int) -> list[tuple[int, int, int]]:
    """(offset, length, flags) of a context over the whole export, via libnbd."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    while pos < size:
        got: list[tuple[int, int]] = []

        def cb(metacontext, offset, entries, err, got=got):
            if metacontext == context:
                got.extend(zip(entries[0::2], entries[1::2], strict=True))
            return 0

        h.block_status(min(size - pos, 1 << 30), pos, cb)
        for length, flags in got:
            out.append((pos, length, flags))
            pos += length
    return out


def dirty_set(h: nbd.NBD, context: str, size: int, gran: int) -> set[int]:
    dirty = set()
    for offset, length, flags in bitmap_extents(h, context, size):
        if flags & 1:
            dirty.update(range(offset // gran, -(-(offset + length) // gran)))
    return dirty


def test_iotest_223_scenario(nbd_server, make_image):
    """QEMU's iotest 223: the same dirty extents, seen through qemu-img, nbdinfo, libnbd."""
    image = make_image(4 * MiB)
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 2M", str(image)],
        check=True,
        capture_output=True,
    )
    srv = nbd_server(str(image), "--name", "disk", "--bitmap", "b", "--bitmap", "b2:512")
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x22 512 512", "-c", "write -P 0x33 2M 2M"]
        + [srv.uri("disk")],
        check=True,
        capture_output=True,
    )
    # QEMU reads a bitmap through its allocation code: dirty shows as "data": false
    assert qemu_map(srv, "qemu:dirty-bitmap:b") == [
        (0, 65536, False),
        (65536, 2031616, True),
        (2097152, 2097152, False),
    ]
    assert qemu_map(srv, "qemu:dirty-bitmap:b2") == [
        (0, 512, True),
        (512, 512, False),
        (1024, 2096128, True),
        (2097152, 2097152, False),
    ]
    out = subprocess.run(
        ["nbdinfo", "--map=qemu:dirty-bitmap:b", srv.uri("disk")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert [line.split() for line in out] == [
        ["0", "65536", "1", "dirty"],
        ["65536", "2031616", "0", "clean"],
        ["2097152", "2097152", "1", "dirty"],
    ]

    h = nbd.NBD()
    for ctx in ("base:allocation", "qemu:dirty-bitmap:b", "qemu:dirty-bitmap:b2"):
        h.add_meta_context(ctx)
    h.connect_uri(srv.uri("disk"))
    seen: dict[str, list[int]] = {}

    def cb(metacontext, offset, entries, err):
        seen[metacontext] = list(entries)
        return 0

    h.block_status(4 * MiB, 0, cb)  # one call answers all three contexts
    assert seen["qemu:dirty-bitmap:b"] == [65536, 1, 2031616, 0, 2097152, 1]
    assert seen["qemu:dirty-bitmap:b2"] == [512, 0, 512, 1, 2096128, 0, 2097152, 1]
    assert seen["base:allocation"][1] == 0  # data from offset 0 on
    seen.clear()
    h.block_status(4 * MiB - 1000, 1000, cb, nbd.CMD_FLAG_REQ_ONE)
    assert seen["qemu:dirty-bitmap:b"] == [64536, 1]
    assert seen["qemu:dirty-bitmap:b2"] == [24, 1]
    h.shutdown()


def test_meta_context_listing_follows_qemu(nbd_server, image):
    srv = nbd_server(str(image), "--bitmap", "x", "--bitmap", "y", export="disk")
    out = subprocess.run(
        ["nbdinfo", "--json", srv.uri()], check=True, capture_output=True, text=True
    ).stdout
    contexts = json.loads(out)["exports"][0]["contexts"]
    assert contexts == ["base:allocation", "qemu:dirty-bitmap:x", "qemu:dirty-bitmap:y"]

    def listing(*queries: str) -> list[str]:
        h = nbd.NBD()
        h.set_opt_mode(True)
        for q in queries:
            h.add_meta_context(q)
        h.connect_uri(srv.uri())
        names: list[str] = []
        h.opt_list_meta_context(lambda name: names.append(name) or 0)
        h.opt_abort()
        return names

    assert listing("qemu:") == ["qemu:dirty-bitmap:x", "qemu:dirty-bitmap:y"]
    assert listing("qemu:dirty-bitmap:") == ["qemu:dirty-bitmap:x", "qemu:dirty-bitmap:y"]
    assert listing("qemu:dirty-bitmap:y", "nope:x") == ["qemu:dirty-bitmap:y"]
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:")  # a wildcard selects nothing on SET
    h.connect_uri(srv.uri())
    assert not h.can_meta_context("qemu:dirty-bitmap:x")
    h.shutdown()


def test_bitmaps_survive_a_clean_restart(nbd_server, image, tmp_path):
    state = str(tmp_path / "st")
    srv = nbd_server(str(image), "--state-dir", state, "--bitmap", "b", export="disk")
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    h.pwrite(b"a" * 10, 3 * 65536 + 7)
    h.shutdown()
    assert srv.stop() == 0
    srv = nbd_server(str(image), "--state-dir", state, export="disk")
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:b")
    h.connect_uri(srv.uri())
    assert dirty_set(h, "qemu:dirty-bitmap:b", 64 * MiB, 65536) == {3}
    h.shutdown()
    assert "inconsistent" not in srv.log and "unclean" not in srv.log


def test_image_changed_while_stopped_makes_bitmaps_inconsistent(nbd_server, image, tmp_path):
    state = str(tmp_path / "st")
    srv = nbd_server(str(image), "--state-dir", state, "--bitmap", "b", export="disk")
    assert srv.stop() == 0
    time.sleep(0.01)
    with open(image, "r+b") as f:  # someone else writes to the image
        f.seek(MiB)
        f.write(b"sneaky")
    srv = nbd_server(str(image), "--state-dir", state, export="disk")
    assert "changed while nbdtrack was not serving it" in srv.log
    assert "'b'" in srv.log and "inconsistent" in srv.log
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:b")
    h.connect_uri(srv.uri())
    assert not h.can_meta_context("qemu:dirty-bitmap:b")  # never offered to clients
    h.shutdown()


def test_sigkill_with_writes_in_flight_loses_no_dirty_bit(nbd_server, make_image, tmp_path):
    size = 32 * MiB
    gran = 4096
    image = make_image(size)
    state = str(tmp_path / "st")
    rng = random.Random(1234)
    for round_ in range(5):
        args = [str(image), "--state-dir", state, "--name", "disk"]
        srv = nbd_server(*(args + (["--bitmap", "f:4K"] if round_ == 0 else [])), export="disk")
        if round_:
            assert "recovered from an unclean stop" in srv.log
            assert "inconsistent" not in srv.log
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        for _ in range(300):
            while h.aio_in_flight() >= 64:
                h.poll(1)
            length = rng.choice([512, 4096, 65536, 200000])
            offset = rng.randrange(0, size - length)
            h.aio_pwrite(rng.randbytes(length), offset)
        deadline = time.monotonic() + rng.uniform(0.0, 0.2)
        while time.monotonic() < deadline and h.aio_in_flight():
            h.poll(0)
        srv.stop(signal.SIGKILL)
        del h

    srv = nbd_server(str(image), "--state-dir", state, "--name", "disk", export="disk")
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:f")
    h.connect_uri(srv.uri())
    assert h.can_meta_context("qemu:dirty-bitmap:f")
    dirty = dirty_set(h, "qemu:dirty-bitmap:f", size, gran)
    h.shutdown()
    content = image.read_bytes()
    zero = bytes(gran)
    changed = {g for g in range(size // gran) if content[g * gran : (g + 1) * gran] != zero}
    assert changed, "no write reached the image"
    assert changed - dirty == set()  # zero misses
