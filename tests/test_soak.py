"""A bounded soak: many clients, mixed operations, random disconnects, every read checked.

Each worker owns a region of the export and keeps a model of it: for every 4 KiB block,
the contents it may hold. An acknowledged write, zero or trim makes the block exactly
that; a request cut off by an abrupt disconnect may or may not land — and may land
after later writes, since the server finishes what it received — so its contents stay
possible for good. Every read must return, block by block, something the model allows;
every block an acknowledged request changed must be dirty. Workers use nbdtrack's
client in all three reply modes, pipeline requests, and disconnect politely, rudely
(close with requests in flight) or brutally (abort, cutting a request in half).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import struct
import threading
import time

import nbd

from nbdtrack.client import NBDConnectionError, connect

MiB = 1024 * 1024
BLOCK = 4096
WORKERS = 8
REGION = 4 * MiB
BLOCKS = REGION // BLOCK
DURATION = 20.0
BITMAP = "qemu:dirty-bitmap:b0"


def content(token: int, block: int) -> bytes:
    """What block ``block`` holds after a write with ``token`` (0: zeros)."""
    if token == 0:
        return bytes(BLOCK)
    return struct.pack(">QQ", token, block) * (BLOCK // 16)


class Region:
    def __init__(self, index: int) -> None:
        self.base = index * REGION
        self.possible: list[set[int]] = [{0} for _ in range(BLOCKS)]
        self.lost: list[set[int]] = [set() for _ in range(BLOCKS)]  # unacknowledged
        self.acked_changes: set[int] = set()  # absolute block numbers
        self.reads = 0

    def absolute(self, block: int) -> int:
        return (self.base // BLOCK) + block

    def acked(self, first: int, count: int, token: int) -> None:
        for b in range(first, first + count):
            self.possible[b] = {token} | self.lost[b]
            self.acked_changes.add(self.absolute(b))

    def unknown(self, first: int, count: int, token: int) -> None:
        for b in range(first, first + count):
            self.lost[b].add(token)
            self.possible[b].add(token)

    def check(self, first: int, data: bytes) -> None:
        for i in range(len(data) // BLOCK):
            block = first + i
            got = bytes(data[i * BLOCK : (i + 1) * BLOCK])
            allowed = {content(t, self.absolute(block)) for t in self.possible[block]}
            assert got in allowed, f"block {self.absolute(block)}: unexpected contents"
        self.reads += 1


async def worker(index: int, target, region: Region, deadline: float, seed: int) -> dict:
    rng = random.Random(seed)
    stats = {"ops": 0, "connections": 0, "aborts": 0}
    token_base = (index + 1) << 40
    next_token = 1
    modes = [{}, {"extended": False}, {"extended": False, "structured": False}]

    def new_token() -> int:
        nonlocal next_token
        next_token += 1
        return token_base + next_token

    while time.monotonic() < deadline:
        kw = rng.choice(modes)
        contexts = [BITMAP] if kw.get("structured", True) else []
        client = await connect(target, "disk", meta_contexts=contexts, **kw)
        stats["connections"] += 1
        try:
            for _ in range(rng.randint(5, 60)):
                if time.monotonic() >= deadline:
                    break
                await one_step(client, region, rng, new_token, stats)
            ending = rng.random()
            if ending < 0.5:
                await client.disconnect()
            else:  # requests in flight, then gone
                await in_flight_then_gone(client, region, rng, new_token, ending < 0.75)
                stats["aborts"] += 1
        except BaseException:
            await client.close()
            raise
    return stats


async def one_step(client, region: Region, rng: random.Random, new_token, stats) -> None:
    stats["ops"] += 1
    op = rng.random()
    first = rng.randrange(BLOCKS)
    count = min(rng.choice([1, 1, 2, 4, 16, 64]), BLOCKS - first)
    offset = region.base + first * BLOCK
    if op < 0.35:
        token = new_token()
        data = b"".join(content(token, region.absolute(first + i)) for i in range(count))
        await client.pwrite(data, offset, fua=rng.random() < 0.1)
        region.acked(first, count, token)
    elif op < 0.65:
        region.check(first, await client.pread(count * BLOCK, offset))
    elif op < 0.72:
        await client.zero(offset, count * BLOCK, no_hole=rng.random() < 0.5)
        region.acked(first, count, 0)
    elif op < 0.78:
        await client.trim(offset, count * BLOCK)  # punches a hole: reads as zeros
        region.acked(first, count, 0)
    elif op < 0.82:
        await client.flush()
    elif op < 0.9 and BITMAP in client.contexts:
        status = await client.block_status(region.base, REGION)
        pos = region.base
        for ext in status[BITMAP]:
            if not ext.flags & 1:
                for b in range(pos // BLOCK, (pos + ext.length) // BLOCK):
                    assert b not in region.acked_changes, f"block {b} changed but clean"
            pos += ext.length
    else:  # a pipelined batch of writes and reads on disjoint blocks
        blocks = rng.sample(range(BLOCKS), 8)
        writes = {b: new_token() for b in blocks[:4]}
        reads = blocks[4:]
        results = await asyncio.gather(
            *(
                client.pwrite(content(t, region.absolute(b)), region.base + b * BLOCK)
                for b, t in writes.items()
            ),
            *(client.pread(BLOCK, region.base + b * BLOCK) for b in reads),
        )
        for b, t in writes.items():
            region.acked(b, 1, t)
        for b, data in zip(reads, results[4:], strict=True):
            region.check(b, data)


async def in_flight_then_gone(client, region, rng, new_token, brutal: bool) -> None:
    """Send writes and leave without waiting: their fate is unknown."""
    tasks = []
    for _ in range(rng.randint(1, 6)):
        first = rng.randrange(BLOCKS)
        count = min(rng.choice([1, 8, 64, 256]), BLOCKS - first)
        token = new_token()
        region.unknown(first, count, token)
        data = b"".join(content(token, region.absolute(first + i)) for i in range(count))
        tasks.append(asyncio.create_task(client.pwrite(data, region.base + first * BLOCK)))
    await asyncio.sleep(0)
    await (client.abort() if brutal else client.close())
    for task in tasks:
        try:
            await task
        except NBDConnectionError:
            pass


def libnbd_worker(uri: str, region: Region, deadline: float, errors: list) -> None:
    """One more client, libnbd's: plain writes and verified reads in its own region."""
    rng = random.Random(os.getpid())
    token = 9 << 40
    try:
        while time.monotonic() < deadline:
            h = nbd.NBD()
            h.connect_uri(uri)
            for _ in range(rng.randint(10, 50)):
                first = rng.randrange(BLOCKS - 16)
                if rng.random() < 0.5:
                    token += 1
                    data = b"".join(content(token, region.absolute(first + i)) for i in range(16))
                    h.pwrite(data, region.base + first * BLOCK)
                    region.acked(first, 16, token)
                else:
                    region.check(first, h.pread(16 * BLOCK, region.base + first * BLOCK))
            if rng.random() < 0.5:
                h.shutdown()
            del h  # without shutdown: the socket is just closed
    except Exception as err:  # collected and asserted by the test
        errors.append(err)


def test_soak(nbd_server, make_image):
    image = make_image((WORKERS + 1) * REGION)
    srv = nbd_server(str(image), "--bitmap", f"b0:{BLOCK}", "--idle-timeout", "10", export="disk")
    target = (srv.host, srv.port)
    regions = [Region(i) for i in range(WORKERS + 1)]
    deadline = time.monotonic() + DURATION
    errors: list = []
    side = threading.Thread(
        target=libnbd_worker, args=(srv.uri("disk"), regions[WORKERS], deadline, errors)
    )
    side.start()

    async def main():
        seeds = [random.randrange(1 << 30) for _ in range(WORKERS)]
        return await asyncio.gather(
            *(worker(i, target, regions[i], deadline, seeds[i]) for i in range(WORKERS))
        )

    stats = asyncio.run(main())
    side.join(60)
    assert errors == []
    total = {k: sum(s[k] for s in stats) for k in stats[0]}
    assert total["ops"] > 1000 and total["connections"] > 30 and total["aborts"] > 10, total
    assert sum(r.reads for r in regions) > 300

    async def dirty() -> set[int]:
        found, pos, size = set(), 0, (WORKERS + 1) * REGION
        async with await connect(target, "disk", meta_contexts=[BITMAP]) as client:
            while pos < size:
                for ext in (await client.block_status(pos, size - pos))[BITMAP]:
                    if ext.flags & 1:
                        found.update(range(pos // BLOCK, (pos + ext.length) // BLOCK))
                    pos += ext.length
        return found

    changed = set().union(*(r.acked_changes for r in regions))
    assert changed <= asyncio.run(dirty())
    print(f"soak: {total}, {sum(r.reads for r in regions)} verified reads")
    assert srv.stop() == 0
    with open(image, "rb") as f:  # the image itself, after a clean stop
        for region in regions:
            f.seek(region.base)
            region.check(0, f.read(REGION))
    gc.collect()  # finalize what asyncio left behind here, not in a later test
    assert "Traceback" not in srv.log
