"""The asyncio NBD client (nbdtrack.client).

* Against the real nbdtrack server, in all three reply styles (simple, structured,
  extended): pipelined reads and writes checked byte for byte against the image file,
  every command, block status, and the error paths (past the end, unknown commands and
  flags, oversized payloads, read-only exports) with the connection still usable after.
* Against qemu-nbd 7.2 (structured replies; it has no extended headers, so this also
  proves the fallback), so the client is not only matched to our own server.
* Against a scripted in-process server: replies out of order, a server that hangs up,
  a server that breaks the protocol.
* The sans-IO parts on plain bytes: URIs, the handshake, the reply parser.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from nbdtrack.client import (
    ExportEntry,
    Extent,
    Mode,
    NBDAddress,
    NBDClient,
    NBDConnectionError,
    NBDOptionError,
    NBDProtocolError,
    NBDRequestError,
    URIError,
    connect,
    list_exports,
    list_meta_contexts,
    parse_uri,
)
from nbdtrack.client.handshake import (
    ClientHandshake,
    ListExports,
    ListMetaContexts,
    Negotiate,
)
from nbdtrack.client.transmission import ReplyParser, encode_request
from nbdtrack.protocol import constants as c
from nbdtrack.protocol.events import TransmissionReady
from nbdtrack.protocol.handshake import ServerHandshake
from nbdtrack.protocol.requests import RequestParser

KiB = 1024
MiB = 1024 * KiB
K64 = 64 * KiB
HOLE = c.NBD_STATE_HOLE | c.NBD_STATE_ZERO
DATA = 0

MODES = {
    "simple": {"structured": False, "extended": False},
    "structured": {"extended": False},
    "extended": {},
}


def run(coro: Awaitable, timeout: float = 120):
    """Run one test coroutine in a fresh event loop, bounded in time."""

    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def put(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flags_at(extents: list[Extent], start: int, pos: int) -> int:
    """The flags of the extent covering ``pos``, extents starting at ``start``."""
    for length, flags in extents:
        if start <= pos < start + length:
            return flags
        start += length
    raise AssertionError(f"no extent covers {pos}")


def wait_for_log(server, text: str, timeout: float = 10) -> None:
    """The server logs from its own process: give it a moment."""
    deadline = time.monotonic() + timeout
    while text not in server.log:
        assert time.monotonic() < deadline, f"{text!r} not in the server log:\n{server.log}"
        time.sleep(0.05)


async def expect_error(awaitable: Awaitable, *errors: int) -> NBDRequestError:
    with pytest.raises(NBDRequestError) as info:
        await awaitable
    assert info.value.error in errors, str(info.value)
    return info.value


async def still_usable(client: NBDClient) -> None:
    """The connection survived: a write and a read round-trip."""
    assert not client.closed
    if client.read_only:
        assert len(await client.pread(512, 0)) == 512
        return
    await client.pwrite(b"\x5a" * 512, client.size - 512)
    assert await client.pread(512, client.size - 512) == b"\x5a" * 512


@pytest.fixture(params=list(MODES))
def mode(request) -> str:
    return request.param


@pytest.fixture
def srv(nbd_server, image: Path):
    return nbd_server(str(image), export="disk")


async def open_client(srv, mode: str, **kwargs) -> NBDClient:
    kwargs.setdefault("meta_contexts", [c.BASE_ALLOCATION])
    return await connect(srv.uri(), **MODES[mode], **kwargs)


# --- against nbdtrack: handshake --------------------------------------------------------


def test_handshake_negotiates_each_mode(srv, mode):
    async def main():
        async with await open_client(srv, mode) as client:
            assert client.mode is Mode[mode.upper()]
            assert client.size == 64 * MiB
            assert client.export_name == "disk"
            assert client.info.canonical_name == "disk"
            assert client.info.used_go
            assert client.transmission_flags & c.NBD_FLAG_HAS_FLAGS
            assert client.can_flush and client.can_fua and client.can_trim and client.can_zero
            assert not client.read_only
            assert client.can_df == (mode != "simple")  # SEND_DF only with structured replies
            assert client.block_size.minimum == 1
            assert client.block_size.preferred == 4096
            assert client.block_size.maximum == 32 * MiB
            if mode == "simple":  # SET_META_CONTEXT needs structured replies: not sent
                assert client.contexts == {}
            else:
                assert list(client.contexts) == [c.BASE_ALLOCATION]

    run(main())


def test_connect_address_forms(nbd_server, image):
    tcp = nbd_server(str(image), export="disk")

    async def main():
        for target in (
            tcp.uri(),
            (tcp.host, tcp.port),
            NBDAddress(host=tcp.host, port=tcp.port, export="disk"),
        ):
            client = await connect(target, "disk")
            assert client.size == 64 * MiB
            await client.disconnect()
        # The URI's export is used unless the argument overrides it.
        with pytest.raises(NBDOptionError) as info:
            await connect(tcp.uri(), "other")
        assert info.value.reply == c.NBD_REP_ERR_UNKNOWN

    run(main())
    tcp.stop()

    unix = nbd_server(str(image), export="disk", unix=True)

    async def main_unix():
        for target, export in ((unix.uri(), None), (unix.unix, "disk")):
            client = await connect(target, export)
            assert client.export_name == "disk"
            await client.pwrite(b"u" * 4096, 0)
            assert await client.pread(4096, 0) == b"u" * 4096
            await client.disconnect()

    run(main_unix())


def test_unknown_export(srv, mode):
    async def main():
        with pytest.raises(NBDOptionError) as info:
            await connect(srv.uri("nope"), **MODES[mode])
        assert info.value.reply == c.NBD_REP_ERR_UNKNOWN
        assert info.value.option == c.NBD_OPT_GO
        # EXPORT_NAME cannot say "unknown": the server can only hang up.
        with pytest.raises(NBDConnectionError):
            await connect(srv.uri("nope"), go=False, **MODES[mode])

    run(main())


def test_export_name_instead_of_go(srv, mode):
    """go=False enters with NBD_OPT_EXPORT_NAME (nbd-client -g); forbidden after
    extended headers, so that mode falls back to structured replies."""

    async def main():
        async with await open_client(srv, mode, go=False) as client:
            assert not client.info.used_go
            expected = Mode.SIMPLE if mode == "simple" else Mode.STRUCTURED
            assert client.mode is expected
            assert client.size == 64 * MiB
            await client.pwrite(b"e" * 1000, 12345)
            assert await client.pread(1000, 12345) == b"e" * 1000
            if expected is Mode.STRUCTURED:  # the SET before EXPORT_NAME still counts
                status = await client.block_status(0, MiB)
                assert status[c.BASE_ALLOCATION][0] == (12288, HOLE)

    run(main())


def test_list_exports_and_meta_contexts(nbd_server, make_image, tmp_path):
    first = make_image(name="disk.img")
    second = make_image(8 * MiB, name="other.img")
    config = tmp_path / "exports.toml"
    config.write_text(
        f'[[export]]\nname = "other"\npath = "{second}"\ndescription = "the other one"\n'
    )
    server = nbd_server(
        str(first),
        "--description",
        "main disk",
        "--config",
        str(config),
        "--state-dir",
        str(tmp_path / "state"),
        export="disk",
    )

    async def main():
        exports = await list_exports(server.uri())
        assert exports == [ExportEntry("disk", "main disk"), ExportEntry("other", "the other one")]
        assert await list_meta_contexts(server.uri()) == [c.BASE_ALLOCATION]
        assert await list_meta_contexts(server.uri(), queries=["base:"]) == [c.BASE_ALLOCATION]
        assert await list_meta_contexts(server.uri(), queries=["qemu:"]) == []
        assert await list_meta_contexts(server.uri(), "other", extended=False) == [
            c.BASE_ALLOCATION
        ]
        with pytest.raises(NBDOptionError) as info:
            await list_meta_contexts(server.uri(), "nope")
        assert info.value.reply == c.NBD_REP_ERR_UNKNOWN
        async with await connect(server.uri("other")) as client:
            assert client.size == 8 * MiB
            assert client.description == "the other one"

    run(main())
    # LIST and LIST_META_CONTEXT never reached transmission: only the last connect did.
    wait_for_log(server, "serving export 'other'")
    assert server.log.count("serving export") == 1


# --- against nbdtrack: data ---------------------------------------------------------------


def test_pipelined_writes_and_reads(srv, image, mode):
    """Hundreds of requests in flight at once; every byte checked, also in the file."""
    rng = random.Random(1234)
    layout = []  # (offset, data): non-overlapping, with holes between them
    pos = 0
    while len(layout) < 300:
        pos += rng.choice((0, 512, 4096, 100_000))
        length = rng.choice((1, 511, 4096, 65536, 200_000))
        layout.append((pos, rng.randbytes(length)))
        pos += length
    assert pos < 64 * MiB

    async def main():
        async with await open_client(srv, mode) as client:
            peak = 0

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, client.in_flight)
                    await asyncio.sleep(0)

            sampler = asyncio.create_task(sample())
            await asyncio.gather(*(client.pwrite(d, o) for o, d in layout))
            sampler.cancel()
            assert peak > 100  # really pipelined
            assert client.in_flight == 0

            reads = [asyncio.create_task(client.pread(len(d), o)) for o, d in layout]
            await asyncio.sleep(0)
            assert client.in_flight == len(reads)  # reads carry no payload: all in flight
            results = await asyncio.gather(*reads)
            for (offset, data), got in zip(layout, results, strict=True):
                assert got == data, f"mismatch at {offset}"

            # Reads spanning data and holes (several chunks in structured modes).
            spans = [(0, 2 * MiB), (3 * MiB + 123, 777_777), (pos - 5000, 10_000)]
            got = await asyncio.gather(*(client.pread(n, o) for o, n in spans))
            for (offset, length), data in zip(spans, got, strict=True):
                assert data == file_bytes(image, offset, length)
            # The largest payload the server allows, in one request.
            assert await client.pread(32 * MiB, 0) == file_bytes(image, 0, 32 * MiB)

        for offset, data in layout:
            assert file_bytes(image, offset, len(data)) == data

    run(main())


def test_zero_trim_flush_cache(srv, image, mode):
    async def main():
        async with await open_client(srv, mode) as client:
            base = 4 * MiB
            await client.pwrite(b"\xab" * MiB, base, fua=True)
            await client.zero(base + 4096, 8192, no_hole=True)
            await client.zero(base + 64 * KiB, 64 * KiB)  # may punch a hole
            await client.zero(base + 256 * KiB, 4096, fua=True)
            expected = bytearray(b"\xab" * MiB)
            for start, length in ((4096, 8192), (64 * KiB, 64 * KiB), (256 * KiB, 4096)):
                expected[start : start + length] = bytes(length)
            assert await client.pread(MiB, base) == expected
            assert file_bytes(image, base, MiB) == expected

            # FAST_ZERO: done fast, or refused with ENOTSUP leaving the data alone.
            await client.pwrite(b"\xcd" * K64, 6 * MiB)
            for no_hole in (False, True):
                try:
                    await client.zero(6 * MiB, 8192, fast=True, no_hole=no_hole)
                    assert await client.pread(8192, 6 * MiB) == bytes(8192)
                except NBDRequestError as err:
                    assert err.error == c.NBD_ENOTSUP
                    assert await client.pread(8192, 6 * MiB) == b"\xcd" * 8192
            assert client.can_fast_zero

            await client.trim(base + 512 * KiB, 256 * KiB)
            await client.trim(0, 0)
            await client.flush()
            await client.cache(0, 8 * MiB)
            await client.cache(0, 0)
            # Still byte-exact outside the trimmed range (trim is only a hint inside it).
            data = await client.pread(512 * KiB, base)
            assert data == bytes(expected[: 512 * KiB])
            if mode != "simple":
                status = await client.block_status(base + 64 * KiB, 64 * KiB)
                assert status[c.BASE_ALLOCATION][0].flags & c.NBD_STATE_ZERO

    run(main())


def test_edge_lengths(srv, image, mode):
    """Zero-length requests, FUA on a read, and commands longer than the maximum payload
    (TRIM/WRITE_ZEROES/CACHE over the whole disk must not be refused for their size)."""

    async def main():
        async with await open_client(srv, mode) as client:
            assert await client.pread(0, 0) == b""
            assert await client.pread(0, client.size) == b""
            await client.pwrite(b"", 4096)
            await client.pwrite(b"f" * 4096, 4096, fua=True)
            assert await client.pread(4096, 4096, fua=True) == b"f" * 4096
            assert client.size > client.block_size.maximum
            await client.cache(0, client.size)
            await client.zero(0, client.size)
            await client.trim(0, client.size, fua=True)
            assert await client.pread(8192, 0) == bytes(8192)
            if mode != "simple":
                await expect_error(client.block_status(0, 0), c.NBD_EINVAL)
            await still_usable(client)
        assert file_bytes(image, 0, 8192) == bytes(8192)

    run(main())


def test_block_status_base_allocation(srv, image, mode):
    """A sparse image reads as holes, then data where written; REQ_ONE gives one extent."""

    async def main():
        async with await open_client(srv, mode) as client:
            await client.pwrite(b"d" * K64, MiB)
            await client.pwrite(b"e" * 8192, 8 * MiB)
            if mode == "simple":  # no contexts without structured replies
                await expect_error(client.block_status(0, MiB), c.NBD_EINVAL)
                await still_usable(client)
                return
            status = await client.block_status(0, client.size)
            assert list(status) == [c.BASE_ALLOCATION]
            extents = status[c.BASE_ALLOCATION]
            assert extents == [
                (MiB, HOLE),
                (K64, DATA),
                (7 * MiB - K64, HOLE),
                (8192, DATA),
                (client.size - 8 * MiB - 8192, HOLE),
            ]
            one = await client.block_status(0, client.size, req_one=True)
            assert one == {c.BASE_ALLOCATION: [(MiB, HOLE)]}
            one = await client.block_status(MiB + 4096, client.size - MiB - 4096, req_one=True)
            assert one == {c.BASE_ALLOCATION: [(K64 - 4096, DATA)]}
            # Never past the request: a short query inside data answers exactly it.
            part = await client.block_status(MiB + 100, 1000)
            assert part == {c.BASE_ALLOCATION: [(1000, DATA)]}
            # Walk the image the way backup code will: advance by what came back.
            pos, walked = 0, []
            while pos < client.size:
                length = min(3 * MiB, client.size - pos)
                got = (await client.block_status(pos, length))[c.BASE_ALLOCATION]
                walked += got
                pos += sum(e.length for e in got)
            assert pos == client.size
            assert sum(length for length, flags in walked if flags == DATA) == K64 + 8192

    run(main())


def test_block_status_without_contexts(srv, mode):
    async def main():
        async with await open_client(srv, mode, meta_contexts=()) as client:
            assert client.contexts == {}
            await expect_error(client.block_status(0, 4096), c.NBD_EINVAL)
            await still_usable(client)

    run(main())


def test_block_status_beyond_4g_extended(nbd_server, make_image):
    """Extended headers carry 64-bit lengths: one request and one extent cover 6 GiB."""
    big = make_image(6 * 1024 * MiB, name="big.img")
    server = nbd_server(str(big), export="big")

    async def main():
        async with await connect(server.uri(), meta_contexts=[c.BASE_ALLOCATION]) as client:
            assert client.mode is Mode.EXTENDED
            size = client.size
            await client.pwrite(b"x" * 4096, 5 * 1024 * MiB)
            status = await client.block_status(0, size)
            assert status[c.BASE_ALLOCATION] == [
                (5 * 1024 * MiB, HOLE),
                (4096, DATA),
                (size - 5 * 1024 * MiB - 4096, HOLE),
            ]
            await client.zero(0, size)  # one 6 GiB WRITE_ZEROES
            await client.trim(0, size)
            assert await client.pread(4096, 5 * 1024 * MiB) == bytes(4096)
        async with await connect(
            server.uri(), extended=False, meta_contexts=[c.BASE_ALLOCATION]
        ) as client:
            # Compact requests: the client clips the hint below 4 GiB.
            status = await client.block_status(0, client.size)
            assert 0 < sum(e.length for e in status[c.BASE_ALLOCATION]) < 4 * 1024 * MiB
            with pytest.raises(ValueError):
                await client.zero(0, client.size)  # cannot be encoded in 32 bits

    run(main())


def test_dirty_bitmap_context_next_to_allocation(nbd_server, image, mode):
    """Two contexts negotiated: every BLOCK_STATUS answers both, by name."""
    server = nbd_server(str(image), "--bitmap", "b0", export="disk")
    bitmap = "qemu:dirty-bitmap:b0"

    async def main():
        async with await open_client(
            server, mode, meta_contexts=[c.BASE_ALLOCATION, bitmap]
        ) as client:
            await client.pwrite(b"z" * 4096, MiB + 4096)
            if mode == "simple":
                assert client.contexts == {}
                return
            assert set(client.contexts) == {c.BASE_ALLOCATION, bitmap}
            status = await client.block_status(0, 2 * MiB)
            assert set(status) == {c.BASE_ALLOCATION, bitmap}
            assert flags_at(status[bitmap], 0, 0) == 0
            assert flags_at(status[bitmap], 0, MiB) == c.NBD_STATE_DIRTY
            assert flags_at(status[c.BASE_ALLOCATION], 0, MiB + 4096) == DATA

    run(main())


# --- against nbdtrack: errors ---------------------------------------------------------------


def test_requests_past_the_end(srv, mode):
    async def main():
        async with await open_client(srv, mode) as client:
            end = client.size
            await expect_error(client.pread(4096, end - 2048), c.NBD_EINVAL)
            await expect_error(client.pread(1, end), c.NBD_EINVAL)
            await expect_error(client.pwrite(b"x" * 4096, end - 2048), c.NBD_ENOSPC)
            await expect_error(client.zero(end - 2048, 4096), c.NBD_ENOSPC)
            await expect_error(client.trim(end - 2048, 4096), c.NBD_EINVAL)
            await expect_error(client.cache(end, 1), c.NBD_EINVAL)
            await expect_error(client.pread(1, (1 << 64) - 1), c.NBD_EINVAL)
            if mode != "simple":
                await expect_error(client.block_status(end, 1), c.NBD_EINVAL)
                err = await expect_error(client.pread(1, end), c.NBD_EINVAL)
                assert "end" in err.message  # structured errors carry a message
            # Nothing was written past the end or around it.
            assert await client.pread(2048, end - 2048) == bytes(2048)
            await still_usable(client)

    run(main())


def test_unknown_commands_and_flags(srv, mode):
    async def main():
        async with await open_client(srv, mode) as client:
            for command, flags, length in (
                (42, 0, 0),  # unknown command
                (c.NBD_CMD_RESIZE, 0, 0),  # not advertised
                (c.NBD_CMD_READ, 0x8000, 512),  # unknown flag
                (c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_FLAG_REQ_ONE, 512),  # wrong command
                (c.NBD_CMD_FLUSH, c.NBD_CMD_FLAG_DF, 0),
            ):
                reply = await client.request(command, flags=flags, length=length, check=False)
                assert reply.error == c.NBD_EINVAL, (command, flags)
                await still_usable(client)
            if mode == "simple":  # DF is not advertised without structured replies
                await expect_error(client.pread(512, 0, df=True), c.NBD_EINVAL)
            if mode == "extended":
                # Unexpected payloads are drained and refused; the stream stays in sync.
                for command in (c.NBD_CMD_READ, c.NBD_CMD_BLOCK_STATUS, c.NBD_CMD_TRIM):
                    reply = await client.request(
                        command, flags=c.NBD_CMD_FLAG_PAYLOAD_LEN, payload=b"p" * 4096, check=False
                    )
                    assert reply.error == c.NBD_EINVAL
                    await still_usable(client)
                # A WRITE without PAYLOAD_LEN is tolerated (as QEMU tolerates it).
                await client.request(c.NBD_CMD_WRITE, offset=8192, payload=b"w" * 100)
                assert await client.pread(100, 8192) == b"w" * 100
            await still_usable(client)

    run(main())


def test_oversized_write_and_read(srv, image, mode):
    """33 MiB is over the advertised maximum: refused, payload drained, connection fine."""

    async def main():
        async with await open_client(srv, mode) as client:
            too_big = client.block_size.maximum + MiB
            await expect_error(client.pwrite(b"\xee" * too_big, 0), c.NBD_EINVAL, c.NBD_EOVERFLOW)
            await still_usable(client)
            assert await client.pread(MiB, 0) == bytes(MiB)  # nothing of it was written
            await expect_error(client.pread(too_big, 0), c.NBD_EINVAL, c.NBD_EOVERFLOW)
            await still_usable(client)
        assert file_bytes(image, 0, MiB) == bytes(MiB)

    run(main())


def test_df_reads(srv, mode):
    async def main():
        async with await open_client(srv, mode) as client:
            await client.pwrite(b"q" * 8192, K64)
            expected = bytes(4096) + b"q" * 8192 + bytes(4096)
            if mode == "simple":
                assert not client.can_df
                return
            assert client.can_df
            # Without DF the server may split holes and data into chunks ...
            plain = await client.request(c.NBD_CMD_READ, offset=K64 - 4096, length=16384)
            assert plain.data == expected and plain.chunks >= 2
            # ... with DF the reply is one chunk (the parser enforces it).
            assert await client.pread(16384, K64 - 4096, df=True) == expected
            df = await client.request(
                c.NBD_CMD_READ, flags=c.NBD_CMD_FLAG_DF, offset=K64 - 4096, length=16384
            )
            assert df.data == expected and df.chunks == 1
            around = await client.pread(K64, K64 - 32 * KiB, df=True)
            assert around == bytes(32 * KiB) + b"q" * 8192 + bytes(24 * KiB)
            whole_hole = await client.pread(K64, 10 * MiB, df=True)
            assert whole_hole == bytes(K64)

    run(main())


def test_read_only_export(nbd_server, image, mode):
    put(image, 0, b"r" * 4096)
    server = nbd_server(str(image), "--read-only", export="disk")

    async def main():
        async with await open_client(server, mode) as client:
            assert client.read_only
            assert not client.can_trim and not client.can_zero
            await expect_error(client.pwrite(b"x" * 512, 0), c.NBD_EPERM)
            # Unadvertised commands still get an error, not a disconnect.
            await expect_error(client.zero(0, 512), c.NBD_EPERM, c.NBD_EINVAL)
            await expect_error(client.trim(0, 512), c.NBD_EPERM, c.NBD_EINVAL)
            assert await client.pread(4096, 0) == b"r" * 4096
            await client.flush()
            await still_usable(client)
        assert file_bytes(image, 0, 4096) == b"r" * 4096

    run(main())


# --- ending a connection ----------------------------------------------------------------------


def test_disconnect_waits_for_requests_in_flight(srv, image, mode):
    async def main():
        client = await open_client(srv, mode)
        writes = [
            asyncio.create_task(client.pwrite(bytes([i]) * 4096, i * 4096)) for i in range(1, 65)
        ]
        await asyncio.sleep(0)
        await client.disconnect()
        await asyncio.gather(*writes)  # all answered before NBD_CMD_DISC went out
        assert client.closed
        with pytest.raises(NBDConnectionError):
            await client.pread(512, 0)
        await client.disconnect()  # idempotent

    run(main())
    for i in range(1, 65):
        assert file_bytes(image, i * 4096, 4096) == bytes([i]) * 4096
    wait_for_log(srv, "disconnected from export")


def test_close_fails_pending_requests(srv, mode):
    async def main():
        client = await open_client(srv, mode)
        reads = [asyncio.create_task(client.pread(4096, i * 4096)) for i in range(16)]
        await asyncio.sleep(0)  # all sent, no reply read yet
        await client.close()
        results = await asyncio.gather(*reads, return_exceptions=True)
        assert all(isinstance(r, NBDConnectionError) for r in results)
        with pytest.raises(NBDConnectionError):
            await client.flush()
        # The server is unharmed.
        async with await open_client(srv, mode) as again:
            await still_usable(again)

    run(main())


def test_cancelled_request_does_not_disturb_others(srv, mode):
    async def main():
        async with await open_client(srv, mode) as client:
            await client.pwrite(b"k" * MiB, 0)
            slow = asyncio.create_task(client.pread(16 * MiB, 0))
            await asyncio.sleep(0)
            slow.cancel()
            assert await client.pread(MiB, 0) == b"k" * MiB  # the late reply is skipped
            with pytest.raises(asyncio.CancelledError):
                await slow
            await still_usable(client)

    run(main())


# --- a scripted server: ordering, hang-ups, protocol violations ----------------------------------


class _View:
    name = "disk"
    description = ""
    size = MiB

    def transmission_flags(self) -> int:
        return c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_SEND_FLUSH

    def meta_contexts(self) -> list[str]:
        return [c.BASE_ALLOCATION]


class _Directory:
    def lookup(self, name: str):
        return _View() if name in ("", "disk") else None

    def listing(self):
        return [_View()]


class _Requests:
    def __init__(self, reader: asyncio.StreamReader, parser: RequestParser) -> None:
        self.reader, self.parser = reader, parser

    async def next(self):
        while (request := self.parser.next_request()) is None:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError
            self.parser.receive_data(data)
        return request


Script = Callable[[_Requests, asyncio.StreamWriter, Mode], Awaitable[None]]


async def scripted_server(tmp_path: Path, script: Script) -> tuple[asyncio.AbstractServer, str]:
    """A unix-socket server: the real sans-IO handshake, then ``script`` answers."""
    path = str(tmp_path / "scripted.sock")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handshake = ServerHandshake(_Directory())
        writer.write(handshake.data_to_send())
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                handshake.receive_data(data)
                writer.write(handshake.data_to_send())
                event = handshake.next_event()
                if isinstance(event, TransmissionReady):
                    break
                if event is not None:
                    return
            parser = RequestParser(event.mode)
            parser.receive_data(handshake.trailing_data)
            await script(_Requests(reader, parser), writer, event.mode)
            await writer.drain()
        except (EOFError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path)
    return server, path


def simple_reply(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return c.SIMPLE_REPLY.pack(c.NBD_SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(mode: Mode, flags: int, ctype: int, cookie: int, offset: int, payload: bytes) -> bytes:
    if mode is Mode.EXTENDED:
        head = c.EXTENDED_CHUNK.pack(
            c.NBD_EXTENDED_REPLY_MAGIC, flags, ctype, cookie, offset, len(payload)
        )
    else:
        head = c.STRUCTURED_CHUNK.pack(
            c.NBD_STRUCTURED_REPLY_MAGIC, flags, ctype, cookie, len(payload)
        )
    return head + payload


def pattern(offset: int, length: int) -> bytes:
    """Bytes that depend on their absolute position: a misplaced piece shows."""
    return bytes(p % 251 for p in range(offset, offset + length))


@pytest.mark.parametrize("mode", list(MODES))
def test_replies_out_of_order_and_interleaved(tmp_path, mode):
    """Eight READs answered last-first; with chunks, the halves of different replies
    interleave on the wire. Each caller still gets its own bytes."""
    count = 8

    async def script(requests: _Requests, writer: asyncio.StreamWriter, wire_mode: Mode) -> None:
        got = [await requests.next() for _ in range(count)]
        if wire_mode is Mode.SIMPLE:
            for r in reversed(got):
                writer.write(simple_reply(r.cookie, 0, pattern(r.offset, r.length)))
            return
        half = got[0].length // 2
        for r in got:  # second halves first, not final
            body = c.U64.pack(r.offset + half) + pattern(r.offset + half, r.length - half)
            writer.write(
                chunk(wire_mode, 0, c.NBD_REPLY_TYPE_OFFSET_DATA, r.cookie, r.offset, body)
            )
        for r in reversed(got):  # then the first halves, final, last request first
            body = c.U64.pack(r.offset) + pattern(r.offset, half)
            writer.write(
                chunk(
                    wire_mode,
                    c.NBD_REPLY_FLAG_DONE,
                    c.NBD_REPLY_TYPE_OFFSET_DATA,
                    r.cookie,
                    r.offset,
                    body,
                )
            )

    async def main():
        server, path = await scripted_server(tmp_path, script)
        async with server:
            client = await connect(path, "disk", **MODES[mode])
            assert client.mode is Mode[mode.upper()]
            offsets = [i * 4096 for i in range(count)]
            results = await asyncio.gather(*(client.pread(1000, o) for o in offsets))
            for offset, data in zip(offsets, results, strict=True):
                assert data == pattern(offset, 1000)
            await client.close()

    run(main())


def test_server_hang_up_fails_pending_requests(tmp_path, mode):
    async def script(requests: _Requests, writer: asyncio.StreamWriter, wire_mode: Mode) -> None:
        for _ in range(3):
            await requests.next()
        # then hang up with three requests unanswered

    async def main():
        server, path = await scripted_server(tmp_path, script)
        async with server:
            client = await connect(path, "disk", **MODES[mode])
            results = await asyncio.gather(
                *(client.pread(512, i * 512) for i in range(3)), return_exceptions=True
            )
            assert all(type(r) is NBDConnectionError for r in results), results
            assert client.closed
            with pytest.raises(NBDConnectionError):
                await client.pread(512, 0)

    run(main())


def _bad_replies(mode: Mode, cookie: int, offset: int):
    """Replies to a 4096-byte READ at ``offset`` that break the protocol."""
    if mode is Mode.SIMPLE:
        yield "unknown cookie", simple_reply(cookie + 99)
        yield "bad magic", b"\xde\xad\xbe\xef" + bytes(28)
        yield "chunk in simple mode", chunk(Mode.STRUCTURED, 1, 0, cookie, offset, b"")
        return
    data = c.NBD_REPLY_TYPE_OFFSET_DATA
    yield "unknown cookie", chunk(mode, 1, c.NBD_REPLY_TYPE_NONE, cookie + 99, offset, b"")
    yield "bad magic", b"\xde\xad\xbe\xef" + bytes(28)
    yield "simple reply to READ", simple_reply(cookie, 0)
    outside = c.U64.pack(offset + 4000) + bytes(200)
    yield "data outside the request", chunk(mode, 1, data, cookie, offset, outside)
    short = c.U64.pack(offset) + bytes(100)
    yield "read not covered", chunk(mode, 1, data, cookie, offset, short)
    yield "unknown chunk type", chunk(mode, 1, 77, cookie, offset, b"")
    yield "NONE without DONE", chunk(mode, 0, c.NBD_REPLY_TYPE_NONE, cookie, offset, b"")


@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
def test_protocol_violation_kills_the_connection(tmp_path, mode):
    wire_mode = Mode[mode.upper()]
    cases = list(_bad_replies(wire_mode, 1, 8192))

    async def main():
        for name, bad in cases:

            async def script(requests, writer, _mode, bad=bad):
                await requests.next()
                await requests.next()
                writer.write(bad)
                await asyncio.sleep(5)  # the client must hang up first

            server, path = await scripted_server(tmp_path, script)
            async with server:
                client = await connect(path, "disk", **MODES[mode])
                results = await asyncio.gather(
                    client.pread(4096, 8192), client.pread(4096, 0), return_exceptions=True
                )
                assert all(isinstance(r, NBDProtocolError) for r in results), (name, results)
                assert client.closed
                with pytest.raises(NBDConnectionError):
                    await client.flush()

    run(main())


# --- qemu-nbd 7.2: the same client against another server ---------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def qemu_nbd(tmp_path):
    """qemu_nbd(image, *args, fmt="raw", tcp=False) -> NBDAddress of a running qemu-nbd."""
    procs: list[subprocess.Popen] = []

    def start(image: Path, *args: str, fmt: str = "raw", tcp: bool = False) -> NBDAddress:
        n = len(procs)
        cmd = ["qemu-nbd", "-f", fmt, "-x", "disk", "--persistent", "--shared=8"]
        if tcp:
            address = NBDAddress(host="127.0.0.1", port=_free_port(), export="disk")
            cmd += ["-b", "127.0.0.1", "-p", str(address.port)]
        else:
            address = NBDAddress(socket=str(tmp_path / f"qemu{n}.sock"), export="disk")
            cmd += ["-k", address.socket]
        log = open(tmp_path / f"qemu-nbd{n}.log", "wb")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen([*cmd, *args, str(image)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        procs.append(proc)
        deadline = time.monotonic() + 20
        while True:
            family = socket.AF_INET if tcp else socket.AF_UNIX
            target = (address.host, address.port) if tcp else address.socket
            with socket.socket(family) as probe:
                try:
                    probe.connect(target)
                    return address
                except OSError:
                    pass
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (tmp_path / f"qemu-nbd{n}.log").read_text()
                raise RuntimeError(f"qemu-nbd did not start: {text}")
            time.sleep(0.05)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_qemu_nbd_structured(qemu_nbd, image):
    put(image, 2 * MiB, b"\x77" * K64)
    address = qemu_nbd(image, "--allocation-depth")
    depth = "qemu:allocation-depth"

    async def main():
        client = await connect(address, meta_contexts=[c.BASE_ALLOCATION, depth])
        async with client:
            # qemu-nbd 7.2 has no extended headers: the client fell back to structured.
            assert client.mode is Mode.STRUCTURED
            assert set(client.contexts) == {c.BASE_ALLOCATION, depth}
            assert client.size == 64 * MiB and client.can_df

            rng = random.Random(7)
            layout = [(i * 300_000 + 8 * MiB, rng.randbytes(200_000)) for i in range(64)]
            await asyncio.gather(*(client.pwrite(d, o) for o, d in layout))
            got = await asyncio.gather(*(client.pread(len(d), o) for o, d in layout))
            assert got == [d for _, d in layout]
            for offset, data in layout:
                assert file_bytes(image, offset, len(data)) == data

            assert await client.pread(4 * MiB, 0) == file_bytes(image, 0, 4 * MiB)
            assert await client.pread(K64, 2 * MiB - 4096, df=True) == file_bytes(
                image, 2 * MiB - 4096, K64
            )

            status = await client.block_status(0, 8 * MiB)
            assert status[c.BASE_ALLOCATION][:2] == [(2 * MiB, HOLE), (K64, DATA)]
            assert flags_at(status[depth], 0, 2 * MiB) == 1  # allocated in the top layer
            one = await client.block_status(0, 8 * MiB, req_one=True)
            assert one[c.BASE_ALLOCATION] == [(2 * MiB, HOLE)]

            await client.zero(2 * MiB, 4096, no_hole=True)
            await client.zero(2 * MiB + 8192, 4096, fua=True)
            try:
                await client.zero(2 * MiB + 16384, 4096, fast=True)
            except NBDRequestError as err:
                assert err.error == c.NBD_ENOTSUP
            await client.trim(40 * MiB, MiB)
            await client.flush()
            await client.cache(0, MiB)
            assert await client.pread(4096, 2 * MiB) == bytes(4096)

            # qemu-nbd 7.2 answers EINVAL for every request past the end (newer QEMU
            # says ENOSPC for writes).
            await expect_error(client.pread(4096, client.size - 2048), c.NBD_EINVAL)
            await expect_error(
                client.pwrite(b"x" * 4096, client.size - 2048), c.NBD_EINVAL, c.NBD_ENOSPC
            )
            await expect_error(client.block_status(client.size, 1), c.NBD_EINVAL)
            err = await expect_error(client.request(42), c.NBD_EINVAL)
            assert err.message  # QEMU explains itself in the error chunk
            await expect_error(client.request(c.NBD_CMD_READ, flags=0x8000, length=1), c.NBD_EINVAL)
            await still_usable(client)

        assert await list_exports(address) == [ExportEntry("disk", "")]
        listed = await list_meta_contexts(address)
        assert c.BASE_ALLOCATION in listed and depth in listed

    run(main())


def test_qemu_nbd_simple_mode_and_tcp(qemu_nbd, image):
    put(image, 0, b"s" * 8192)
    address = qemu_nbd(image, tcp=True)

    async def main():
        async with await connect(address.uri(), structured=False, extended=False) as client:
            assert client.mode is Mode.SIMPLE and not client.can_df
            reads = await asyncio.gather(*(client.pread(4096, i * 4096) for i in range(2)))
            assert reads == [b"s" * 4096] * 2
            await client.pwrite(b"t" * 4096, 4096)
            await expect_error(client.pread(1, client.size), c.NBD_EINVAL)
            assert await client.pread(8192, 0) == b"s" * 4096 + b"t" * 4096
        async with await connect(address.uri(), go=False) as client:
            assert client.mode is Mode.STRUCTURED and not client.info.used_go
            assert await client.pread(4096, 4096) == b"t" * 4096

    run(main())


def test_qemu_nbd_read_only(qemu_nbd, image):
    address = qemu_nbd(image, "--read-only")

    async def main():
        async with await connect(address) as client:
            assert client.read_only
            # qemu-nbd 7.2 refuses with EINVAL ("Export is read-only"), not EPERM.
            await expect_error(client.pwrite(b"x" * 512, 0), c.NBD_EPERM, c.NBD_EINVAL)
            assert await client.pread(512, 0) == bytes(512)
            await still_usable(client)

    run(main())


def test_qemu_nbd_dirty_bitmap(qemu_nbd, tmp_path):
    """A qcow2 bitmap exported by qemu-nbd: the client reads both contexts at once."""
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "16M"], check=True)
    io = ["qemu-io", "-f", "qcow2"]
    subprocess.run([*io, "-c", "write -P 0x11 0 64k", str(qcow2)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(qcow2), "b0"], check=True)
    subprocess.run(
        [*io, "-c", "write -P 0x22 1M 64k", "-c", "write -P 0x33 8M 4k", str(qcow2)],
        check=True,
        capture_output=True,
    )
    address = qemu_nbd(qcow2, "--bitmap=b0", fmt="qcow2")
    bitmap = "qemu:dirty-bitmap:b0"

    async def main():
        async with await connect(address, meta_contexts=[c.BASE_ALLOCATION, bitmap]) as client:
            status = await client.block_status(0, client.size)
            assert status[bitmap] == [
                (MiB, 0),
                (K64, c.NBD_STATE_DIRTY),
                (7 * MiB - K64, 0),
                (K64, c.NBD_STATE_DIRTY),
                (client.size - 8 * MiB - K64, 0),
            ]
            allocation = status[c.BASE_ALLOCATION]
            for offset in (0, MiB, 8 * MiB):
                assert flags_at(allocation, 0, offset) == DATA
            assert flags_at(allocation, 0, 4 * MiB) & c.NBD_STATE_ZERO
            one = await client.block_status(0, client.size, req_one=True)
            assert one[bitmap] == [(MiB, 0)] and len(one[c.BASE_ALLOCATION]) == 1
            assert await client.pread(4096, MiB) == b"\x22" * 4096

    run(main())


# --- sans-IO: URIs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("nbd://example.com/disk", NBDAddress("example.com", 10809, None, "disk")),
        ("nbd://example.com", NBDAddress("example.com", 10809, None, "")),
        ("nbd://example.com/", NBDAddress("example.com", 10809, None, "")),
        ("nbd://example.com//disk", NBDAddress("example.com", 10809, None, "/disk")),
        ("nbd://h:1234/hello%20world", NBDAddress("h", 1234, None, "hello world")),
        ("nbd://[::1]:10810/x", NBDAddress("::1", 10810, None, "x")),
        ("nbd://127.0.0.1/a?tls-type=x509", NBDAddress("127.0.0.1", 10809, None, "a")),
        ("nbd+unix:///disk?socket=/run/nbd.sock", NBDAddress(None, 10809, "/run/nbd.sock", "disk")),
        ("nbd+unix:///?socket=/a%20b+c", NBDAddress(None, 10809, "/a b+c", "")),
        ("nbds://h/d", NBDAddress("h", 10809, None, "d", tls=True)),
        (
            "nbds://h:99/d?tls-certificates=/etc/pki/x&tls-verify-peer=false&tls-hostname=n",
            NBDAddress("h", 99, None, "d", True, "/etc/pki/x", False, "n"),
        ),
        ("nbds+unix:///d?socket=/s", NBDAddress(None, 10809, "/s", "d", tls=True)),
    ],
)
def test_parse_uri(uri, expected):
    assert parse_uri(uri) == expected
    assert parse_uri(expected.uri()) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "http://example.com/disk",
        "nbds://example.com/disk?tls-psk-file=/k",
        "nbds://example.com/disk?tls-verify-peer=maybe",
        "nbds+unix:///disk",
        "nbd+unix:///disk",
        "nbd+unix://host/disk?socket=/s",
        "nbd://example.com/disk?socket=/s",
        "nbd://example.com/disk?bogus=1",
        "nbd://example.com:99999/disk",
        "nbd+unix:///d?socket=/a&socket=/b",
    ],
)
def test_parse_uri_refuses(uri):
    with pytest.raises(URIError):
        parse_uri(uri)


# --- sans-IO: the handshake ------------------------------------------------------------


def pump(client: ClientHandshake, server: ServerHandshake) -> None:
    """Move bytes both ways until neither side has anything to say."""
    for _ in range(100):
        down = server.data_to_send()
        if down:
            client.receive_data(down)
        up = client.data_to_send()
        if up:
            server.receive_data(up)
        if not down and not up:
            return
    raise AssertionError("handshake did not settle")


@pytest.mark.parametrize(
    "options, mode",
    [
        ({}, Mode.EXTENDED),
        ({"extended": False}, Mode.STRUCTURED),
        ({"extended": False, "structured": False}, Mode.SIMPLE),
        ({"go": False}, Mode.STRUCTURED),
    ],
)
def test_handshake_against_the_server_state_machine(options, mode):
    client = ClientHandshake(
        Negotiate("disk", meta_contexts=(c.BASE_ALLOCATION, "nope:x"), **options)
    )
    server = ServerHandshake(_Directory())
    pump(client, server)
    assert client.done
    info = client.result
    assert info.mode is mode and info.size == MiB
    assert info.used_go == options.get("go", True)
    ready = server.next_event()
    assert isinstance(ready, TransmissionReady) and ready.mode is mode
    if mode is Mode.SIMPLE:
        assert info.contexts == ()
    else:  # the ids the server chose, and only the context it knows
        assert info.contexts == ready.contexts
        assert [ctx.name for ctx in info.contexts] == [c.BASE_ALLOCATION]


def test_handshake_listing_plans():
    client = ClientHandshake(ListExports())
    server = ServerHandshake(_Directory())
    pump(client, server)
    assert client.result == [ExportEntry("disk", "")]

    client = ClientHandshake(ListMetaContexts("disk", ("base:",)))
    server = ServerHandshake(_Directory())
    pump(client, server)
    assert client.result == [c.BASE_ALLOCATION]
    assert client.mode is Mode.EXTENDED  # negotiated before listing


def options_sent(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        magic, option, length = c.OPTION_HEADER.unpack_from(data, pos)
        assert magic == c.IHAVEOPT
        pos += c.OPTION_HEADER.size
        out.append((option, data[pos : pos + length]))
        pos += length
    return out


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return c.OPTION_REPLY_HEADER.pack(c.OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def greeting(flags: int = c.NBD_FLAG_FIXED_NEWSTYLE | c.NBD_FLAG_NO_ZEROES) -> bytes:
    return c.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, flags)


def test_handshake_fallbacks_down_to_export_name():
    """EXTENDED refused -> STRUCTURED; GO unsupported -> EXPORT_NAME (with the pad)."""
    hs = ClientHandshake(Negotiate("disk"))
    hs.receive_data(greeting(c.NBD_FLAG_FIXED_NEWSTYLE))  # no NO_ZEROES: 124-byte pad
    sent = hs.data_to_send()
    assert sent[:4] == c.CLIENT_FLAGS.pack(c.NBD_FLAG_C_FIXED_NEWSTYLE)
    assert options_sent(sent[4:]) == [(c.NBD_OPT_EXTENDED_HEADERS, b"")]
    hs.receive_data(option_reply(c.NBD_OPT_EXTENDED_HEADERS, c.NBD_REP_ERR_UNSUP, b"no"))
    assert options_sent(hs.data_to_send()) == [(c.NBD_OPT_STRUCTURED_REPLY, b"")]
    hs.receive_data(option_reply(c.NBD_OPT_STRUCTURED_REPLY, c.NBD_REP_ACK))
    [(option, data)] = options_sent(hs.data_to_send())
    assert option == c.NBD_OPT_GO
    assert data[:8] == c.U32.pack(4) + b"disk"
    hs.receive_data(option_reply(c.NBD_OPT_GO, c.NBD_REP_ERR_UNSUP))
    assert options_sent(hs.data_to_send()) == [(c.NBD_OPT_EXPORT_NAME, b"disk")]
    flags = c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_SEND_DF
    hs.receive_data(c.EXPORT_NAME_REPLY.pack(5 * MiB, flags) + bytes(100))
    assert not hs.done  # the pad is not complete yet
    hs.receive_data(bytes(24) + b"TRAIL")
    assert hs.done
    assert hs.result.mode is Mode.STRUCTURED and not hs.result.used_go
    assert hs.result.size == 5 * MiB and hs.result.flags == flags
    assert hs.trailing_data == b"TRAIL"


def test_handshake_refusals_and_violations():
    def started(plan=None) -> ClientHandshake:
        hs = ClientHandshake(plan or Negotiate("disk", extended=False, structured=False))
        hs.receive_data(greeting())
        hs.data_to_send()
        return hs

    # GO refused with anything but ERR_UNSUP: no fallback, the refusal surfaces.
    hs = started()
    with pytest.raises(NBDOptionError) as info:
        hs.receive_data(option_reply(c.NBD_OPT_GO, c.NBD_REP_ERR_UNKNOWN, b"no such export"))
    assert info.value.reply == c.NBD_REP_ERR_UNKNOWN and "no such export" in str(info.value)

    # ACK without NBD_INFO_EXPORT.
    hs = started()
    with pytest.raises(NBDProtocolError, match="NBD_INFO_EXPORT"):
        hs.receive_data(option_reply(c.NBD_OPT_GO, c.NBD_REP_ACK))

    # A reply echoing another option, an ACK with a payload, a bad INFO length.
    for bad in (
        option_reply(c.NBD_OPT_LIST, c.NBD_REP_ACK),
        option_reply(c.NBD_OPT_GO, c.NBD_REP_ACK, b"x"),
        option_reply(c.NBD_OPT_GO, c.NBD_REP_INFO, c.U16.pack(c.NBD_INFO_EXPORT) + bytes(4)),
        option_reply(c.NBD_OPT_GO, c.NBD_REP_SERVER, c.U32.pack(0)),
        option_reply(
            c.NBD_OPT_GO,
            c.NBD_REP_INFO,
            c.INFO_BLOCK_SIZE.pack(c.NBD_INFO_BLOCK_SIZE, 3, 4096, MiB),  # not a power of 2
        ),
    ):
        with pytest.raises(NBDProtocolError):  # INFO payloads are checked at the ACK
            started().receive_data(bad + option_reply(c.NBD_OPT_GO, c.NBD_REP_ACK))

    # GO answered ERR_UNSUP after extended headers were accepted: forbidden.
    hs = ClientHandshake(Negotiate("disk"))
    hs.receive_data(greeting())
    hs.data_to_send()
    hs.receive_data(option_reply(c.NBD_OPT_EXTENDED_HEADERS, c.NBD_REP_ACK))
    with pytest.raises(NBDProtocolError, match="extended"):
        hs.receive_data(option_reply(c.NBD_OPT_GO, c.NBD_REP_ERR_UNSUP))

    # Not an NBD server; an oldstyle one.
    with pytest.raises(NBDProtocolError):
        ClientHandshake(Negotiate()).receive_data(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(NBDProtocolError, match="oldstyle"):
        ClientHandshake(Negotiate()).receive_data(c.GREETING.pack(c.NBDMAGIC, c.CLISERV_MAGIC, 0))

    # A plain-newstyle server gets EXPORT_NAME straight away, without client flags bits.
    hs = ClientHandshake(Negotiate("disk"))
    hs.receive_data(greeting(0))
    sent = hs.data_to_send()
    assert sent[:4] == c.CLIENT_FLAGS.pack(0)
    assert options_sent(sent[4:]) == [(c.NBD_OPT_EXPORT_NAME, b"disk")]


# --- sans-IO: the reply parser ---------------------------------------------------------


def test_reply_parser_assembles_chunks_in_any_order():
    parser = ReplyParser(Mode.STRUCTURED, 2 * MiB, [0])
    parser.expect(1, c.NBD_CMD_READ, 0, 4096, 3000)
    parser.expect(2, c.NBD_CMD_BLOCK_STATUS, 0, 0, MiB)
    parser.expect(3, c.NBD_CMD_WRITE, 0, 0, 10)
    m = Mode.STRUCTURED
    wire = b"".join(
        [
            chunk(m, 0, c.NBD_REPLY_TYPE_OFFSET_DATA, 1, 0, c.U64.pack(6096) + b"b" * 1000),
            simple_reply(3),
            chunk(m, 0, c.NBD_REPLY_TYPE_OFFSET_HOLE, 1, 0, c.OFFSET_HOLE.pack(5096, 1000)),
            chunk(
                m,
                1,
                c.NBD_REPLY_TYPE_BLOCK_STATUS,
                2,
                0,
                c.U32.pack(0) + c.EXTENT.pack(4096, 3) + c.EXTENT.pack(MiB, 0),
            ),
            chunk(m, 1, c.NBD_REPLY_TYPE_OFFSET_DATA, 1, 0, c.U64.pack(4096) + b"a" * 1000),
        ]
    )
    replies = []
    for i in range(0, len(wire), 7):  # byte-by-byte-ish: headers split anywhere
        parser.receive_data(wire[i : i + 7])
        while (reply := parser.next_reply()) is not None:
            replies.append(reply)
    assert [r.cookie for r in replies] == [3, 2, 1]
    assert replies[0].error == 0 and replies[0].chunks == 0
    assert replies[1].extents == {0: [(4096, 3), (MiB, 0)]}  # last may overshoot the request
    assert replies[2].data == b"a" * 1000 + bytes(1000) + b"b" * 1000
    assert replies[2].chunks == 3
    assert parser.in_flight == 0


def feed_through_buffers(parser: ReplyParser, wire: bytes, cuts: list[int]) -> list:
    """Feed ``wire`` as a BufferedProtocol's socket would: each read fills at most the
    buffer ``get_buffer`` gives and at most the next cut; returns the replies."""
    replies, pos, k = [], 0, 0
    while pos < len(wire):
        buf = parser.get_buffer()
        n = min(buf.nbytes, len(wire) - pos, cuts[k % len(cuts)])
        k += 1
        buf[:n] = wire[pos : pos + n]
        buf.release()
        parser.buffer_updated(n)
        pos += n
        while (reply := parser.next_reply()) is not None:
            replies.append(reply)
    return replies


@pytest.mark.parametrize("mode", [Mode.SIMPLE, Mode.STRUCTURED, Mode.EXTENDED])
def test_reply_parser_receives_large_read_data_straight_into_its_destination(mode):
    """Once the header of a large READ's data is parsed, ``get_buffer`` hands out the rest
    of its destination (the caller's buffer with ``into``), so the socket writes it there;
    a small READ and the replies after it still come through the receive buffer."""
    size = 3 * MiB
    data = random.Random(5).randbytes(size)
    parser = ReplyParser(mode, 16 * MiB, [0])
    into = bytearray(b"x" * size)
    parser.expect(1, c.NBD_CMD_READ, 0, MiB, size, memoryview(into))
    parser.expect(2, c.NBD_CMD_READ, 0, 8 * MiB, size)
    parser.expect(3, c.NBD_CMD_READ, 0, 0, 100)
    parser.expect(4, c.NBD_CMD_WRITE, 0, 0, 10)
    if mode is Mode.SIMPLE:
        first = simple_reply(1, data=data)
        wire = first + simple_reply(2, data=data)
        wire += simple_reply(3, data=data[:100]) + simple_reply(4)
    else:
        offset_data = c.NBD_REPLY_TYPE_OFFSET_DATA
        first = chunk(mode, 1, offset_data, 1, MiB, c.U64.pack(MiB) + data)
        wire = first + chunk(mode, 1, offset_data, 2, 8 * MiB, c.U64.pack(8 * MiB) + data)
        wire += chunk(mode, 1, offset_data, 3, 0, c.U64.pack(0) + data[:100])
        wire += simple_reply(4) if mode is Mode.STRUCTURED else chunk(mode, 1, 0, 4, 0, b"")
    start = len(first) - size + 1000  # the first reply's header and 1000 bytes of its data
    buf = parser.get_buffer()
    buf[:start] = wire[:start]
    buf.release()
    parser.buffer_updated(start)
    assert parser.next_reply() is None
    sink = parser.get_buffer()
    assert sink.obj is into and sink.nbytes == size - 1000
    sink.release()
    replies = feed_through_buffers(parser, wire[start:], [200_000, 7, 1 << 20, 3])
    assert [r.cookie for r in replies] == [1, 2, 3, 4]
    assert into == data and replies[0].data is None  # in the caller's buffer, not the reply
    assert replies[1].data == data and isinstance(replies[1].data, bytes)
    assert replies[2].data == data[:100] and replies[3].error == 0
    assert parser.in_flight == 0


def test_reply_parser_buffers_give_what_receive_data_gives():
    """The same stream, fed in one go or read by read through the buffers with cuts
    anywhere, gives the same replies; holes zero a READ's part of the caller's buffer."""
    m = Mode.STRUCTURED
    rng = random.Random(6)
    big = rng.randbytes(200_000)
    wire = b"".join(
        [
            chunk(m, 0, c.NBD_REPLY_TYPE_OFFSET_DATA, 1, 0, c.U64.pack(0) + big),
            chunk(m, 0, c.NBD_REPLY_TYPE_OFFSET_HOLE, 1, 0, c.OFFSET_HOLE.pack(200_000, 5000)),
            simple_reply(2),
            chunk(m, 1, c.NBD_REPLY_TYPE_OFFSET_DATA, 1, 0, c.U64.pack(205_000) + big[:95_000]),
            chunk(
                m, 1, c.NBD_REPLY_TYPE_BLOCK_STATUS, 3, 0, c.U32.pack(0) + c.EXTENT.pack(MiB, 0)
            ),
        ]
    )
    expected = big + bytes(5000) + big[:95_000]

    def parser_with(into: bytearray | None) -> ReplyParser:
        parser = ReplyParser(m, 2 * MiB, [0])
        parser.expect(1, c.NBD_CMD_READ, 0, 0, 300_000, None if into is None else memoryview(into))
        parser.expect(2, c.NBD_CMD_WRITE, 0, 0, 10)
        parser.expect(3, c.NBD_CMD_BLOCK_STATUS, 0, 0, MiB)
        return parser

    whole = parser_with(None)
    whole.receive_data(wire)
    reference = []
    while (reply := whole.next_reply()) is not None:
        reference.append(reply)
    assert [r.cookie for r in reference] == [2, 1, 3] and reference[1].data == expected
    for cuts in ([1], [5, 70_000], [65_536 * 3], [100_001, 2]):
        assert feed_through_buffers(parser_with(None), wire, cuts) == reference
        into = bytearray(b"\xff" * 300_000)  # holes must be zeroed, not left as they were
        replies = feed_through_buffers(parser_with(into), wire, cuts)
        assert [r.cookie for r in replies] == [2, 1, 3] and into == expected


def test_reply_parser_stops_writing_into_a_buffer_its_caller_dropped():
    """A cancelled ``pread_into``: the rest of its data goes to a scratch buffer, and the
    stream stays in sync for the replies after it."""
    m = Mode.STRUCTURED
    size = MiB
    parser = ReplyParser(m, 4 * MiB, [0])
    into = bytearray(size)
    parser.expect(1, c.NBD_CMD_READ, 0, 0, size, memoryview(into))
    parser.expect(2, c.NBD_CMD_WRITE, 0, 0, 10)
    wire = chunk(m, 1, c.NBD_REPLY_TYPE_OFFSET_DATA, 1, 0, c.U64.pack(0) + b"d" * size)
    wire += simple_reply(2)
    replies = feed_through_buffers(parser, wire[:100_000], [100_000])
    assert not replies and into[: 100_000 - 28] == b"d" * (100_000 - 28)
    parser.drop_into(1)
    replies = feed_through_buffers(parser, wire[100_000:], [300_000])
    assert [r.cookie for r in replies] == [1, 2]
    assert into == b"d" * (100_000 - 28) + bytes(size - (100_000 - 28))


def test_reply_parser_errors_fail_only_their_request():
    parser = ReplyParser(Mode.EXTENDED, MiB, [0])
    parser.expect(7, c.NBD_CMD_READ, 0, 512, 1024)
    parser.expect(8, c.NBD_CMD_TRIM, 0, 0, 10)
    m = Mode.EXTENDED
    parser.receive_data(
        chunk(m, 0, c.NBD_REPLY_TYPE_OFFSET_DATA, 7, 512, c.U64.pack(512) + bytes(512))
        + chunk(
            m,
            1,
            c.NBD_REPLY_TYPE_ERROR_OFFSET,
            7,
            512,
            c.ERROR_HEADER.pack(c.NBD_EIO, 3) + b"bad" + c.U64.pack(1100),
        )
        + chunk(m, 1, 0x8123, 8, 0, c.ERROR_HEADER.pack(c.NBD_EPERM, 0) + b"future")
    )
    first, second = parser.next_reply(), parser.next_reply()
    assert (first.error, first.message, first.error_offset) == (c.NBD_EIO, "bad", 1100)
    assert first.data is None
    assert second.error == c.NBD_EPERM  # an unknown error chunk type fails the request only


def _violations():
    """(name, mode, request registered as cookie 1, server bytes) that break the protocol."""
    s, x = Mode.STRUCTURED, Mode.EXTENDED
    read = (c.NBD_CMD_READ, 0, 4096, 1000)
    df_read = (c.NBD_CMD_READ, c.NBD_CMD_FLAG_DF, 4096, 1000)
    status = (c.NBD_CMD_BLOCK_STATUS, 0, 0, 4096)
    req_one = (c.NBD_CMD_BLOCK_STATUS, c.NBD_CMD_FLAG_REQ_ONE, 0, 4096)
    data, hole = c.NBD_REPLY_TYPE_OFFSET_DATA, c.NBD_REPLY_TYPE_OFFSET_HOLE
    bs, bs_ext = c.NBD_REPLY_TYPE_BLOCK_STATUS, c.NBD_REPLY_TYPE_BLOCK_STATUS_EXT
    error, error_offset = c.NBD_REPLY_TYPE_ERROR, c.NBD_REPLY_TYPE_ERROR_OFFSET

    def sc(flags: int, ctype: int, payload: bytes = b"") -> bytes:  # structured, cookie 1
        return chunk(s, flags, ctype, 1, 0, payload)

    def piece(offset: int, length: int) -> bytes:
        return c.U64.pack(offset) + bytes(length)

    def extents(context_id: int, *pairs: tuple[int, int]) -> bytes:
        return c.U32.pack(context_id) + b"".join(c.EXTENT.pack(*p) for p in pairs)

    overlap = sc(0, data, piece(4096, 600)) + sc(1, data, piece(4596, 500))
    whole_then_more = sc(0, data, piece(4096, 1000)) + sc(1, data, piece(4096, 10))
    split = sc(0, data, piece(4096, 500)) + sc(1, data, piece(4596, 500))
    long_message = c.ERROR_HEADER.pack(5, 10) + b"abc"  # says 10 bytes, has 3
    bad_offset = c.ERROR_HEADER.pack(5, 0) + c.U64.pack(0)  # the request starts at 4096
    ext_miscount = c.BLOCK_STATUS_EXT_HEADER.pack(0, 2) + c.EXTENT_EXT.pack(4096, 0)
    cases = [
        ("simple reply in extended mode", x, read, simple_reply(1)),
        ("structured chunk in extended mode", x, read, sc(1, 0)),
        ("extended chunk in structured mode", s, read, chunk(x, 1, 0, 1, 4096, b"")),
        ("unknown reply flags", s, read, sc(3, 0)),
        ("offset not echoed", x, read, chunk(x, 1, 0, 1, 0, b"")),
        ("data chunk too long", s, read, sc(1, data, piece(4096, 1001))),
        ("hole of length 0", s, read, sc(1, hole, c.OFFSET_HOLE.pack(4096, 0))),
        ("overlapping chunks", s, read, overlap),
        ("a chunk over a whole one", s, read, whole_then_more),
        ("DF read in two chunks", s, df_read, split),
        ("data chunk to a block status", s, status, sc(1, data, piece(0, 1))),
        ("unknown context id", s, status, sc(1, bs, extents(9, (4096, 0)))),
        ("extent of length 0", s, status, sc(1, bs, extents(0, (0, 0)))),
        ("extents past the export end", s, status, sc(1, bs, extents(0, (1024, 0), (MiB, 3)))),
        ("extents past the request", s, status, sc(1, bs, extents(0, (4096, 0), (512, 3)))),
        ("REQ_ONE with two extents", s, req_one, sc(1, bs, extents(0, (1024, 0), (1024, 3)))),
        ("compact status in extended mode", x, status, chunk(x, 1, bs, 1, 0, extents(0, (1, 0)))),
        ("BLOCK_STATUS_EXT count mismatch", x, status, chunk(x, 1, bs_ext, 1, 0, ext_miscount)),
        ("block status missing a context", s, status, sc(1, c.NBD_REPLY_TYPE_NONE)),
        ("simple success to block status", s, status, simple_reply(1)),
        ("error chunk with error 0", s, read, sc(1, error, c.ERROR_HEADER.pack(0, 0))),
        ("error message past its chunk", s, read, sc(1, error, long_message)),
        ("error offset outside the request", s, read, sc(1, error_offset, bad_offset)),
    ]
    return [pytest.param(*case, id=case[0]) for case in cases]


@pytest.mark.parametrize("name, mode, request_, wire", _violations())
def test_reply_parser_rejects_protocol_violations(name, mode, request_, wire):
    parser = ReplyParser(mode, 8192, [0, 1] if "missing" in name else [0])
    parser.expect(1, *request_)
    parser.receive_data(wire)
    with pytest.raises(NBDProtocolError):
        while parser.next_reply() is not None:
            pass


def test_encode_request():
    header = encode_request(Mode.STRUCTURED, c.NBD_CMD_READ, c.NBD_CMD_FLAG_DF, 9, 4096, 512)
    assert header == c.REQUEST.pack(c.NBD_REQUEST_MAGIC, c.NBD_CMD_FLAG_DF, 0, 9, 4096, 512)
    header = encode_request(Mode.EXTENDED, c.NBD_CMD_TRIM, 0, 9, 0, 1 << 40)
    assert header == c.EXTENDED_REQUEST.pack(c.NBD_EXTENDED_REQUEST_MAGIC, 0, 4, 9, 0, 1 << 40)
    with pytest.raises(ValueError):
        encode_request(Mode.SIMPLE, c.NBD_CMD_TRIM, 0, 9, 0, 1 << 32)


def test_client_package_layering():
    """client/ knows the protocol layer and nothing of the server, exports or storage."""
    root = Path(__file__).resolve().parent.parent / "nbdtrack" / "client"
    for path in root.glob("*.py"):
        text = path.read_text()
        for forbidden in ("nbdtrack.server", "nbdtrack.exports", "nbdtrack.storage"):
            assert forbidden not in text, f"{path.name} imports {forbidden}"
