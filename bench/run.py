#!/usr/bin/env python3
"""Side-by-side benchmark: nbdtrack against qemu-nbd and nbdkit on one image.

Every server serves the same raw image on 127.0.0.1 in turn, alternating over several
rounds; fio's nbd engine drives the I/O workloads and libnbd's Python bindings the
block-status loops. The printed table quotes medians, min and max per server and the
ratios nbdtrack / qemu-nbd and nbdtrack-with-bitmaps / nbdtrack; everything is also
written as JSON. Run it with the project venv (``make bench`` does):

    .venv/bin/python bench/run.py [--size 1G] [--runtime 4] [--rounds 3] [--pin same]

See bench/README.md for what each workload means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import nbd  # Debian's python3-libnbd; the venv sees it through --system-site-packages

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
EXPORT = "bench"
MiB = 1 << 20
# Without extended headers a BLOCK_STATUS length is 32 bits: ask for just under 4 GiB.
MAX_STATUS = (1 << 32) - (1 << 16)
# Bitmaps of the "with bitmaps" server; FINE is the one block status is timed on.
BITMAPS = ("coarse:64K", "fine:4K")
FINE = "fine"
SPARSE_SIZE = 1 << 40
SPARSE_BITMAP = "sparse"
SPARSE_GRANULE = 64 * 1024
SPARSE_DIRTY = 8  # scattered 4 KiB writes into the 1 TiB export: 8 dirty granules
PROFILE_RATE = 250  # py-spy samples per second
BUSY_WARNING_PCT = 20  # other processes' median CPU (% of a core) above which we warn
PLACEMENTS = {  # name -> (server CPUs, client CPUs) for taskset; None = unpinned
    "none": (None, None),
    "same": ("0", "0"),
    "split": ("0", "1"),
}


# --- servers ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """One server configuration: how to start it on an image and a port."""

    key: str
    kind: str  # "nbdtrack", "qemu-nbd", "nbdkit"
    bitmaps: tuple[str, ...] = ()
    image_format: str = "raw"
    args: tuple[str, ...] = ()  # more nbdtrack options

    def command(self, image: Path, port: int, state_dir: Path) -> list[str]:
        """The server's command line (foreground, 127.0.0.1 only)."""
        if self.kind == "nbdtrack":
            cmd = [sys.executable, "-m", "nbdtrack", "serve", str(image), "--name", EXPORT]
            cmd += ["--listen", f"{HOST}:{port}", "--state-dir", str(state_dir)]
            for bitmap in self.bitmaps:
                cmd += ["--bitmap", bitmap]
            return [*cmd, *self.args]
        if self.kind == "qemu-nbd":
            cmd = ["qemu-nbd", "-f", self.image_format, "--cache=writeback", "--aio=threads"]
            cmd += ["-b", HOST, "-p", str(port), "-x", EXPORT, "-t", "-e", "4"]
            for bitmap in self.bitmaps:
                cmd += ["-B", bitmap]
            return [*cmd, str(image)]
        if self.kind == "nbdkit":
            return ["nbdkit", "-f", "-i", HOST, "-p", str(port), "-e", EXPORT, "file", str(image)]
        raise ValueError(self.kind)


SERVERS = [
    ServerSpec("nbdtrack", "nbdtrack"),
    ServerSpec("nbdtrack+bitmaps", "nbdtrack", BITMAPS),
    ServerSpec("qemu-nbd", "qemu-nbd"),
    ServerSpec("nbdkit", "nbdkit"),
    # Not run by default: nbdtrack on uvloop (the ``fast`` extra), for --servers.
    ServerSpec("nbdtrack+uvloop", "nbdtrack", args=("--event-loop", "uvloop")),
]
SPARSE_SERVERS = [
    ServerSpec("nbdtrack", "nbdtrack", (f"{SPARSE_BITMAP}:64K",)),
    ServerSpec("qemu-nbd", "qemu-nbd", (SPARSE_BITMAP,), image_format="qcow2"),
]


@dataclass
class Running:
    """A started server: its process (stopped by pid) and its NBD URI."""

    spec: ServerSpec
    proc: subprocess.Popen
    uri: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def taskset(cpus: str | None) -> list[str]:
    """The command prefix that pins to ``cpus`` (nothing when unpinned)."""
    return ["taskset", "-c", cpus] if cpus is not None else []


@contextlib.contextmanager
def serving(spec: ServerSpec, image: Path, workdir: Path, cpus: str | None) -> Iterator[Running]:
    """Start a server, wait until it answers NBD, yield it, stop it by pid, clean up."""
    port = free_port()
    state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=workdir))
    log = workdir / f"{spec.key}-{spec.image_format}.log"
    cmd = taskset(cpus) + spec.command(image, port, state_dir)
    with open(log, "wb") as out:
        # Its own session: a ^C reaches only this script, which stops the server by pid.
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    running = Running(spec, proc, f"nbd://{HOST}:{port}/{EXPORT}", log)
    try:
        wait_ready(running)
        yield running
    finally:
        stop(proc)
        shutil.rmtree(state_dir, ignore_errors=True)


def wait_ready(server: Running, timeout: float = 30.0) -> None:
    """Poll with libnbd until a handshake succeeds; fail with the log if the server died."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            tail = server.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{server.spec.key} exited with {server.proc.returncode}:\n{tail}")
        h = nbd.NBD()  # libnbd frees a handle (and its socket) when it is dropped
        try:
            h.connect_uri(server.uri)
            h.shutdown()
            return
        except nbd.Error:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.spec.key} did not answer on {server.uri}") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM by pid, then SIGKILL by pid if it does not exit in time."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process, all its threads (ended ones too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def thread_switches(pid: int) -> dict[int, int]:
    """Context switches (voluntary + not) of each live thread of a process."""
    counts = {}
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError, ValueError):  # a thread may end while we read
            text = status.read_text()
            counts[int(status.parent.name)] = sum(
                int(line.split(":")[1]) for line in text.splitlines() if "ctxt_switches:" in line
            )
    return counts


class SwitchCounter:
    """Counts a process's context switches over a span, threads that end meanwhile included.

    /proc keeps per-thread counts only while a thread lives (nbdkit's connection threads
    end with the connection), so a helper thread samples them every 50 ms.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = thread_switches(pid)
        self.last = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.last.update(thread_switches(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.last.update(thread_switches(self.pid))
        return sum(n - self.base.get(tid, 0) for tid, n in self.last.items())


def machine_busy() -> float:
    """CPU seconds all CPUs have spent busy since boot (from /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# --- fio workloads ------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One fio job: pattern, block size, requests in flight."""

    key: str
    rw: str
    bs: str
    iodepth: int

    @property
    def writes(self) -> bool:
        return "write" in self.rw


WORKLOADS = [
    Workload("seq-read-1M-qd16", "read", "1m", 16),
    Workload("rand-read-4K-qd16", "randread", "4k", 16),
    Workload("rand-read-4K-qd1", "randread", "4k", 1),
    Workload("seq-write-1M-qd16", "write", "1m", 16),
    Workload("rand-write-4K-qd16", "randwrite", "4k", 16),
    Workload("rand-write-4K-qd1", "randwrite", "4k", 1),
]
FIRST_TOUCH = Workload("first-touch-rand-write-4K-qd16", "randwrite", "4k", 16)
PRETOUCH = Workload("pretouch-seq-write-1M-qd16", "write", "1m", 16)
# The tracking-cost table: the writes (what tracking touches) on both nbdtrack variants,
# server and fio on one CPU, in alternating rounds after the main ones.
TRACKED = ("nbdtrack", "nbdtrack+bitmaps")
TRACKING_WORKLOADS = [w for w in WORKLOADS if w.writes]
TRACKING_PLACEMENT = "same"


@dataclass
class Options:
    """What every run shares: image size, fio timing, CPU placement, scratch directory."""

    size: int
    runtime: float
    ramp: float
    status_seconds: float
    server_cpus: str | None
    client_cpus: str | None
    workdir: Path


def run_fio(
    server: Running, work: Workload, opts: Options, time_based: bool = True
) -> dict[str, float]:
    """Run one fio job against a server; returns its figures and the server's CPU use."""
    out = opts.workdir / f"fio-{work.key}.json"
    cmd = taskset(opts.client_cpus) + [
        "fio",
        f"--name={work.key}",
        "--ioengine=nbd",
        f"--uri={server.uri}",
        f"--rw={work.rw}",
        f"--bs={work.bs}",
        f"--iodepth={work.iodepth}",
        f"--size={opts.size}",
        "--norandommap=1",
        "--lat_percentiles=1",
        "--output-format=json",
        f"--output={out}",
    ]
    if time_based:
        cmd += ["--time_based=1", f"--runtime={opts.runtime:g}", f"--ramp_time={opts.ramp:g}"]
    switches = SwitchCounter(server.pid)
    busy0, cpu0, t0 = machine_busy(), cpu_times(server.pid), time.monotonic()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    busy1, cpu1, t1 = machine_busy(), cpu_times(server.pid), time.monotonic()
    switched = switches.stop()
    if done.returncode != 0:
        raise RuntimeError(f"fio {work.key} on {server.spec.key} failed:\n{done.stdout[-2000:]}")
    try:
        job = json.loads(out.read_text())["jobs"][0]
    finally:
        out.unlink(missing_ok=True)
    side = job["write" if work.writes else "read"]
    if side["total_ios"] == 0 or job["error"]:
        raise RuntimeError(f"fio {work.key} on {server.spec.key} did no I/O")
    # Counted over ramp + runtime, like the CPU time; fio's total_ios leaves out the ramp.
    ios = (
        side["total_ios"] * (opts.runtime + opts.ramp) / opts.runtime
        if time_based
        else side["total_ios"]
    )
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    server = 100 * (user + system) / (t1 - t0)
    client = job["usr_cpu"] + job["sys_cpu"]
    lat = side["lat_ns"]
    p99 = lat.get("percentile", {}).get("99.000000", 0)
    return {
        "mib_s": side["bw_bytes"] / MiB,
        "iops": side["iops"],
        "lat_mean_us": lat["mean"] / 1000,
        "lat_p99_us": p99 / 1000,
        "server_cpu_pct": server,
        "server_user_pct": 100 * user / (t1 - t0),
        "server_sys_pct": 100 * system / (t1 - t0),
        "server_cpu_us_per_io": 1e6 * (user + system) / ios,
        "server_switches_per_io": switched / ios,
        "client_cpu_pct": client,
        # Everything else on the machine meanwhile (other people's tests, writeback): noise.
        "other_cpu_pct": max(0.0, 100 * (busy1 - busy0) / (t1 - t0) - server - client),
    }


# --- block status -------------------------------------------------------------------


def open_handle(uri: str, context: str) -> nbd.NBD:
    """A libnbd handle with one metadata context negotiated."""
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    if not h.can_meta_context(context):
        raise RuntimeError(f"{uri} does not offer {context}")
    return h


def block_status_rate(uri: str, context: str, seconds: float) -> float:
    """BLOCK_STATUS calls per second, one at a time, each over the whole (< 4 GiB) export."""
    h = open_handle(uri, context)
    count = min(h.get_size(), MAX_STATUS)
    seen: list[int] = []

    def extent(ctx: str, offset: int, entries: list[int], err: Any) -> int:
        seen.append(len(entries))
        return 0

    for _ in range(20):  # warm up
        h.block_status(count, 0, extent)
    calls, t0 = 0, time.perf_counter()
    deadline = t0 + seconds
    while True:
        h.block_status(count, 0, extent)
        calls += 1
        if time.perf_counter() >= deadline:
            break
    rate = calls / (time.perf_counter() - t0)
    h.shutdown()
    if not seen or min(seen) < 2:
        raise RuntimeError(f"{context}: no extents came back")
    return rate


def walk(h: nbd.NBD, context: str, size: int) -> tuple[int, int]:
    """Block status over a whole export in < 4 GiB calls: (calls, dirty extents seen)."""
    offset, calls, dirty = 0, 0, 0
    got: list[int] = []

    def extent(ctx: str, start: int, entries: list[int], err: Any) -> int:
        if ctx == context:
            got.extend(entries)
        return 0

    while offset < size:
        got.clear()
        h.block_status(min(size - offset, MAX_STATUS), offset, extent)
        calls += 1
        covered = sum(got[0::2])
        if covered == 0:
            raise RuntimeError(f"{context}: empty reply at {offset}")
        dirty += sum(1 for flags in got[1::2] if flags & 1)
        offset += covered
    return calls, dirty


def sparse_walk(uri: str, seconds: float) -> dict[str, float]:
    """Dirty a few granules of the 1 TiB export, then time whole-export dirty-bitmap walks."""
    context = f"qemu:dirty-bitmap:{SPARSE_BITMAP}"
    writer = nbd.NBD()
    writer.connect_uri(uri)
    size = writer.get_size()
    for k in range(SPARSE_DIRTY):
        writer.pwrite(b"\xa5" * 4096, (k * 2 + 1) * size // (2 * SPARSE_DIRTY))
    writer.flush()
    writer.shutdown()
    h = open_handle(uri, context)
    times: list[float] = []
    calls = dirty = 0
    deadline = time.monotonic() + seconds
    while len(times) < 3 or time.monotonic() < deadline:
        t0 = time.perf_counter()
        calls, dirty = walk(h, context, size)
        times.append(time.perf_counter() - t0)
    h.shutdown()
    if dirty != SPARSE_DIRTY:
        raise RuntimeError(f"expected {SPARSE_DIRTY} dirty extents, saw {dirty}")
    walk_ms = 1000 * statistics.median(times)
    return {"walk_ms": walk_ms, "calls_per_walk": calls, "ms_per_call": walk_ms / calls}


def extended_single_call_ms(uri: str, seconds: float) -> float | None:
    """One BLOCK_STATUS over the whole 1 TiB with extended headers (nbdtrack's own client).

    libnbd 1.14 has no extended headers; nbdtrack.client does. None if it is unusable.
    """
    try:
        from nbdtrack.client import connect
    except ImportError:
        return None
    context = f"qemu:dirty-bitmap:{SPARSE_BITMAP}"

    async def measure() -> float | None:
        client = await connect(uri, extended=True, meta_contexts=[context])
        async with client:
            if client.mode.name != "EXTENDED":
                return None
            times: list[float] = []
            deadline = time.monotonic() + seconds
            while len(times) < 3 or time.monotonic() < deadline:
                t0 = time.perf_counter()
                extents = await client.block_status(0, client.size)
                times.append(time.perf_counter() - t0)
                if sum(e.length for e in extents[context]) != client.size:
                    return None  # not the whole export in one reply
            return 1000 * statistics.median(times)

    try:
        return asyncio.run(measure())
    except Exception as err:  # an optional extra: report why, never stop the bench
        print(f"  (extended-header call skipped: {err!r})", file=sys.stderr)
        return None


# --- the rounds ---------------------------------------------------------------------


@dataclass
class Results:
    """Per-round values: results[server][metric] -> [value, ...]."""

    main: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    sparse: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    tracking: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, part: str, server: str, metric: str, value: float) -> None:
        """Append one round's value; ``part`` is "main", "sparse" or "tracking"."""
        getattr(self, part).setdefault(server, {}).setdefault(metric, []).append(value)


def sync() -> None:
    """Write back dirty page cache so the next server starts from the same state."""
    os.sync()


def bench_server(spec: ServerSpec, image: Path, opts: Options, results: Results) -> None:
    """Every workload against one server, once."""
    with serving(spec, image, opts.workdir, opts.server_cpus) as server:
        say(f"  {spec.key} (pid {server.pid}, {server.uri})")
        if spec.kind == "nbdtrack":
            # First touch of fresh bitmaps, then one pass over the whole image so that the
            # measured writes below pay only the cost after the first touch of a granule.
            for work, time_based in ((FIRST_TOUCH, True), (PRETOUCH, False)):
                figures = run_fio(server, work, opts, time_based)
                metric = "iops" if time_based else "mib_s"
                results.add("main", spec.key, f"{work.key}:{metric}", figures[metric])
            sync()
        for work in WORKLOADS:
            figures = run_fio(server, work, opts)
            for metric, value in figures.items():
                results.add("main", spec.key, f"{work.key}:{metric}", value)
        contexts = ["base:allocation"]
        if spec.bitmaps:
            contexts.append(f"qemu:dirty-bitmap:{FINE}")
        for context in contexts:
            rate = block_status_rate(server.uri, context, opts.status_seconds)
            results.add("main", spec.key, f"block-status {context}:calls_s", rate)
    sync()


def bench_tracking(spec: ServerSpec, image: Path, opts: Options, results: Results) -> None:
    """The write workloads on one nbdtrack variant, after the same pass over the whole
    image as in the main rounds (every granule dirty: the cost after the first touch)."""
    with serving(spec, image, opts.workdir, opts.server_cpus) as server:
        say(f"  {spec.key} (pid {server.pid}, {server.uri})")
        run_fio(server, PRETOUCH, opts, time_based=False)
        sync()
        for work in TRACKING_WORKLOADS:
            for metric, value in run_fio(server, work, opts).items():
                results.add("tracking", spec.key, f"{work.key}:{metric}", value)
    sync()


def bench_sparse(spec: ServerSpec, image: Path, opts: Options, results: Results) -> None:
    """Whole-export dirty-bitmap block status on the 1 TiB export."""
    with serving(spec, image, opts.workdir, opts.server_cpus) as server:
        say(f"  {spec.key} 1 TiB {spec.image_format} (pid {server.pid})")
        for metric, value in sparse_walk(server.uri, opts.status_seconds).items():
            results.add("sparse", spec.key, metric, value)
        if spec.kind == "nbdtrack":
            ms = extended_single_call_ms(server.uri, opts.status_seconds)
            if ms is not None:
                results.add("sparse", spec.key, "extended_single_call_ms", ms)


def make_image(path: Path, size: int) -> None:
    """A fully written raw image (no holes: every server reads real data)."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, MiB)
            f.write(chunk[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def make_sparse_images(workdir: Path) -> dict[str, Path]:
    """A 1 TiB sparse raw image, and a 1 TiB qcow2 with a persistent enabled bitmap."""
    raw = workdir / "sparse.img"
    with open(raw, "wb") as f:
        f.truncate(SPARSE_SIZE)
    qcow2 = workdir / "sparse.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(SPARSE_SIZE)], check=True
    )
    subprocess.run(
        ["qemu-img", "bitmap", "--add", "-g", str(SPARSE_GRANULE), str(qcow2), SPARSE_BITMAP],
        check=True,
    )
    return {"raw": raw, "qcow2": qcow2}


def rotated(items: list, k: int) -> list:
    """The list started at position k: each round begins with a different server."""
    k %= len(items)
    return items[k:] + items[:k]


# --- summary ------------------------------------------------------------------------


def summarize(values: list[float]) -> dict[str, float]:
    """Median, min and max of one metric's per-round values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(x: float) -> str:
    """Three significant figures, with k/M for large numbers: 0.0943, 45.6, 1480, 21.3k."""
    for scale, suffix in ((1e6, "M"), (1e4, "k")):
        if abs(x) >= scale:
            return fmt(x / (scale if suffix == "M" else 1e3)) + suffix
    if x == 0 or abs(x) >= 1000:
        return f"{x:.0f}"
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def cell(values: list[float] | None) -> str:
    """'21.3k [20.9k-22.0k]': median [min-max]."""
    if not values:
        return "-"
    s = summarize(values)
    return f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"


def ratio(table: dict, a: str, b: str, metric: str, metric_b: str | None = None) -> float | None:
    """median(a's metric) / median(b's metric_b, default the same metric); None if missing."""
    va, vb = table.get(a, {}).get(metric), table.get(b, {}).get(metric_b or metric)
    if not va or not vb or statistics.median(vb) == 0:
        return None
    return statistics.median(va) / statistics.median(vb)


# rows of the main table: (metric key, label, unit with the better direction)
ROWS = [
    ("seq-read-1M-qd16:mib_s", "seq read 1M qd16", "MiB/s ^"),
    ("rand-read-4K-qd16:iops", "rand read 4K qd16", "IOPS ^"),
    ("rand-read-4K-qd1:iops", "rand read 4K qd1", "IOPS ^"),
    ("rand-read-4K-qd1:lat_p99_us", "  p99 latency", "us v"),
    ("seq-write-1M-qd16:mib_s", "seq write 1M qd16", "MiB/s ^"),
    ("rand-write-4K-qd16:iops", "rand write 4K qd16", "IOPS ^"),
    ("rand-write-4K-qd1:iops", "rand write 4K qd1", "IOPS ^"),
    ("rand-write-4K-qd1:lat_p99_us", "  p99 latency", "us v"),
    ("block-status base:allocation:calls_s", "block status base:alloc", "calls/s ^"),
    (f"block-status qemu:dirty-bitmap:{FINE}:calls_s", f"block status bitmap {FINE}", "calls/s ^"),
    (f"{FIRST_TOUCH.key}:iops", "first-touch rand write 4K qd16", "IOPS ^"),
    (f"{PRETOUCH.key}:mib_s", "first-touch seq write 1M (1 pass)", "MiB/s ^"),
]


def render(results: Results, servers: list[str]) -> str:
    """The printed tables (plain text, fixed width)."""
    main = results.main
    head = ["workload", "unit", *servers, "track/qemu", "bitmaps/track"]
    rows = []
    for metric, label, unit in ROWS:
        if not any(metric in main.get(s, {}) for s in servers):
            continue
        r1 = ratio(main, "nbdtrack", "qemu-nbd", metric)
        r2 = ratio(main, "nbdtrack+bitmaps", "nbdtrack", metric)
        if metric.startswith("block-status qemu:dirty-bitmap"):
            # No base to compare with: set against nbdtrack's own base:allocation rate.
            base = "block-status base:allocation:calls_s"
            r2 = ratio(main, "nbdtrack+bitmaps", "nbdtrack", metric, base)
        rows.append(
            [label, unit, *(cell(main.get(s, {}).get(metric)) for s in servers), rfmt(r1), rfmt(r2)]
        )
    out = [table(head, rows)]
    cpu_head = ["server CPU: % of a core, per request", *servers]
    cpu_rows = [
        [w.key, *(cpu_cell(main.get(s, {}), w.key) for s in servers)]
        for w in WORKLOADS
        if any(f"{w.key}:server_cpu_pct" in main.get(s, {}) for s in servers)
    ]
    if cpu_rows:
        out.append(table(cpu_head, cpu_rows))
    sparse = results.sparse
    if sparse:
        names = list(sparse)
        title = f"1 TiB export, {SPARSE_DIRTY} dirty {SPARSE_GRANULE // 1024}K granules"
        sp_head = [title, "unit", *names, "track/qemu"]
        sp_rows = []
        for metric, label, unit in (
            ("walk_ms", "whole-export dirty-bitmap walk", "ms v"),
            ("calls_per_walk", "  calls per walk (< 4 GiB each)", "calls"),
            ("ms_per_call", "  per call", "ms v"),
            ("extended_single_call_ms", "one call, extended headers", "ms v"),
        ):
            if any(metric in sparse[n] for n in names):
                r = ratio(sparse, "nbdtrack", "qemu-nbd", metric)
                sp_rows.append(
                    [label, unit, *(cell(sparse[n].get(metric)) for n in names), rfmt(r)]
                )
        out.append(table(sp_head, sp_rows))
    if results.tracking:
        out.append(render_tracking(results.tracking))
    return "\n\n".join(out)


def render_tracking(tracking: dict[str, dict[str, list[float]]]) -> str:
    """The tracking-cost table: throughput and server CPU per write, with and without."""
    server_cpus, client_cpus = PLACEMENTS[TRACKING_PLACEMENT]
    head = [
        f"tracking cost (server CPU {server_cpus}, fio CPU {client_cpus}, alternating)",
        "unit",
        *TRACKED,
        "bitmaps/track",
        "server CPU us/write",
    ]
    labels = {metric: (label, unit) for metric, label, unit in ROWS}
    rows = []
    for work in TRACKING_WORKLOADS:
        metric = f"{work.key}:{'mib_s' if work.bs == '1m' else 'iops'}"
        label, unit = labels[metric]
        cpu = [tracking.get(s, {}).get(f"{work.key}:server_cpu_us_per_io") for s in TRACKED]
        cpu_text = " -> ".join(fmt(statistics.median(v)) for v in cpu if v)
        rows.append(
            [
                label,
                unit,
                *(cell(tracking.get(s, {}).get(metric)) for s in TRACKED),
                rfmt(ratio(tracking, TRACKED[1], TRACKED[0], metric)),
                cpu_text or "-",
            ]
        )
    return table(head, rows)


def cpu_cell(metrics: dict[str, list[float]], key: str) -> str:
    """'106% 90us 4.1cs': share of one core, CPU time and context switches per request."""
    got = [metrics.get(f"{key}:{m}") for m in CPU_METRICS]
    if not all(got):
        return "-"
    pct, per_io, switches = (statistics.median(v) for v in got)  # type: ignore[arg-type]
    return f"{pct:.0f}% {fmt(per_io)}us {fmt(switches)}cs"


CPU_METRICS = ("server_cpu_pct", "server_cpu_us_per_io", "server_switches_per_io")


def rfmt(r: float | None) -> str:
    """'0.46x', or '-' when there is nothing to compare."""
    return "-" if r is None else f"{r:.2f}x"


def table(head: list[str], rows: list[list[str]]) -> str:
    """Fixed-width columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        first = r[0].ljust(widths[0])
        rest = [str(v).rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join([first, *rest]))
    return "\n".join(lines)


# --- machine facts ------------------------------------------------------------------


def first_line(cmd: list[str]) -> str:
    """The first line a command prints (its version, say), or why it could not run."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable ({err})"
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def machine_facts(placement: str, workdir: Path) -> dict[str, Any]:
    """What a reader needs to judge the numbers: machine, versions, placement, load."""
    model = "?"
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = match.group(1) if match else "?"
    git = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "nbdtrack"],
        capture_output=True,
        text=True,
    ).stdout
    server_cpus, client_cpus = PLACEMENTS[placement]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nbdtrack_commit": git,
        "nbdtrack_tree_changed_files": len(status.splitlines()),
        "fio": first_line(["fio", "--version"]),
        "qemu_nbd": first_line(["qemu-nbd", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "libnbd": nbd.NBD().get_version(),
        "workdir_fs": first_line(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(workdir)]),
        "placement": placement,
        "server_cpus": server_cpus or "any",
        "client_cpus": client_cpus or "any",
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# --- profile mode -------------------------------------------------------------------


def profile(args: argparse.Namespace, image: Path, opts: Options) -> None:
    """Run one workload against nbdtrack under py-spy and print where its CPU goes."""
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if py_spy is None:
        sys.exit("--profile needs py-spy: .venv/bin/pip install py-spy (a local tool only)")
    work = next(w for w in [*WORKLOADS, FIRST_TOUCH] if w.key == args.profile)
    spec = next(s for s in SERVERS if s.key == args.profile_server)
    out = Path(args.json).parent / f"profile-{spec.key}-{work.key}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    with serving(spec, image, opts.workdir, opts.server_cpus) as server:
        if spec.bitmaps and work is not FIRST_TOUCH:
            run_fio(server, PRETOUCH, opts, time_based=False)
            sync()
        figures: dict[str, float] = {}
        fio = threading.Thread(target=lambda: figures.update(run_fio(server, work, opts)))
        fio.start()
        time.sleep(opts.ramp + 0.2)
        # --gil: only the thread holding the GIL is sampled, so the sample count over the
        # duration says how busy the GIL was, and the stacks say where Python time goes.
        duration = max(1, int(opts.runtime - 0.5))
        spy = [py_spy, "record", "--pid", str(server.pid), "--gil", "--nonblocking"]
        spy += ["--rate", str(PROFILE_RATE), "--duration", str(duration)]
        spy += ["--format", "raw", "--output", str(out)]
        subprocess.run(spy, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fio.join()
    print(
        f"{spec.key} {work.key} (placement {args.pin}): {fmt(figures['iops'])} IOPS, "
        f"server CPU {figures['server_cpu_pct']:.0f}% of one core\n"
    )
    print(summarize_profile(out, duration * PROFILE_RATE))
    print(f"\ncollapsed stacks: {out} (flamegraph.pl or speedscope read them)")


def short_frame(frame: str) -> str:
    """'func (/path/to/file.py:12)' -> 'func (file.py)'."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame)
    return f"{match.group(1)} ({Path(match.group(2)).name})" if match else frame


def summarize_profile(path: Path, possible: int, top: int = 15) -> str:
    """Top functions by own and by inclusive samples, from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [short_frame(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    if not total:
        return "no samples"
    held = 100 * total / possible
    lines = [f"GIL held in {total} of {possible} samples ({held:.0f}%)", "", "own samples:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive samples:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'1G', '512M', '1GiB', '4096' -> bytes."""
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)(i?B)?", text.strip(), re.I)
    if not match:
        raise argparse.ArgumentTypeError(f"bad size '{text}'")
    return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--size", type=parse_size, default=parse_size("1G"), help="image size (default 1G)"
    )
    p.add_argument("--runtime", type=float, default=4.0, help="seconds per fio job (default 4)")
    p.add_argument("--ramp", type=float, default=1.0, help="fio ramp time, seconds (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all servers (default 3)")
    p.add_argument(
        "--status-seconds",
        type=float,
        default=1.5,
        help="seconds per block-status loop (default 1.5)",
    )
    p.add_argument(
        "--pin",
        choices=sorted(PLACEMENTS),
        default="none",
        help="CPU placement via taskset: none (default), same (server and client "
        "on CPU 0), split (server on 0, client on 1)",
    )
    p.add_argument(
        "--servers",
        default=",".join(s.key for s in SERVERS if s.key != "nbdtrack+uvloop"),
        help="comma-separated list (default: %(default)s; also nbdtrack+uvloop)",
    )
    p.add_argument("--no-sparse", action="store_true", help="skip the 1 TiB block-status test")
    p.add_argument(
        "--tracking-rounds",
        type=int,
        default=3,
        metavar="N",
        help="rounds of the tracking-cost table (both nbdtrack variants pinned to one CPU, "
        "alternating; default 3, 0 skips it; needs both variants in --servers)",
    )
    p.add_argument("--dir", help="where to put the image (default: the system temp dir)")
    p.add_argument(
        "--json",
        default=str(ROOT / "bench" / "results" / "latest.json"),
        help="results file (default: bench/results/latest.json)",
    )
    p.add_argument(
        "--profile",
        metavar="WORKLOAD",
        choices=[w.key for w in [*WORKLOADS, FIRST_TOUCH]],
        help="instead of the bench: profile nbdtrack under py-spy for one workload",
    )
    p.add_argument(
        "--profile-server",
        default="nbdtrack",
        choices=["nbdtrack", "nbdtrack+bitmaps"],
        help="which nbdtrack --profile runs (default nbdtrack)",
    )
    args = p.parse_args(argv)
    known = {s.key for s in SERVERS}
    args.server_keys = [k for k in args.servers.split(",") if k]
    if not args.server_keys or set(args.server_keys) - known:
        p.error(f"--servers: choose from {', '.join(sorted(known))}")
    if args.rounds < 1 or args.runtime <= 0 or args.size < MiB or args.tracking_rounds < 0:
        p.error("need --rounds >= 1, --tracking-rounds >= 0, --runtime > 0 and --size >= 1M")
    return args


def main(argv: list[str] | None = None) -> int:
    """Check the tools, write the image, run the bench (or a profile), clean up."""
    args = parse_args(argv)
    for tool in ("fio", "qemu-nbd", "qemu-img", "nbdkit", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing (make bench installs it)")
    server_cpus, client_cpus = PLACEMENTS[args.pin]
    if client_cpus is not None:  # this process runs the libnbd loops: the client side
        os.sched_setaffinity(0, {int(client_cpus)})
    workdir = Path(tempfile.mkdtemp(prefix="nbdtrack-bench-", dir=args.dir))
    try:
        image = workdir / "bench.img"
        say(f"writing a {fmt(args.size / MiB)} MiB image in {workdir}")
        make_image(image, args.size)
        opts = Options(
            args.size,
            args.runtime,
            args.ramp,
            args.status_seconds,
            server_cpus,
            client_cpus,
            workdir,
        )
        if args.profile:
            profile(args, image, opts)
            return 0
        return bench_main(args, image, opts)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def say(text: str) -> None:
    """A progress line, with the seconds since the start."""
    print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", flush=True)


STARTED = time.monotonic()


def bench_main(args: argparse.Namespace, image: Path, opts: Options) -> int:
    """The rounds, the tables, the JSON file."""
    facts = machine_facts(args.pin, opts.workdir)
    specs = [s for s in SERVERS if s.key in args.server_keys]
    sparse_images = {} if args.no_sparse else make_sparse_images(opts.workdir)
    results = Results()
    for rnd in range(args.rounds):
        say(f"round {rnd + 1}/{args.rounds}")
        for spec in rotated(specs, rnd):
            bench_server(spec, image, opts, results)
        if sparse_images:
            for spec in rotated(SPARSE_SERVERS, rnd):
                img = sparse_images[spec.image_format]
                bench_sparse(spec, img, opts, results)
    tracked = [s for s in specs if s.key in TRACKED]
    if len(tracked) == len(TRACKED):
        server_cpus, client_cpus = PLACEMENTS[TRACKING_PLACEMENT]
        pinned = replace(opts, server_cpus=server_cpus, client_cpus=client_cpus)
        for rnd in range(args.tracking_rounds):
            say(f"tracking round {rnd + 1}/{args.tracking_rounds} (placement {TRACKING_PLACEMENT})")
            for spec in rotated(tracked, rnd):
                bench_tracking(spec, image, pinned, results)
    facts["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    facts["duration_s"] = round(time.monotonic() - STARTED, 1)
    other = [
        v
        for ms in results.main.values()
        for m, vs in ms.items()
        if m.endswith(":other_cpu_pct")
        for v in vs
    ]
    facts["other_cpu_pct"] = summarize(other) if other else None
    report = render(results, [s.key for s in specs])
    print()
    print(header_text(args, facts))
    print()
    print(report)
    print()
    print(NOTES)
    save(args, facts, results, report)
    return 0


NOTES = """\
Cells: median [min-max] over the rounds; ^ higher is better, v lower is better.
Server CPU cells (medians): share of one core over the job, CPU time per request (us) and
context switches per request (cs), all threads of the server process.
track/qemu = nbdtrack / qemu-nbd; bitmaps/track = nbdtrack with bitmaps / without (the
tracking cost; for the bitmap block-status row: against nbdtrack's base:allocation rate).
Writes on nbdtrack+bitmaps run after one sequential pass over the whole image (pre-touch):
they show the cost after the first touch of each granule. The first-touch rows run on fresh
bitmaps (and, for comparison, on nbdtrack without bitmaps).
The tracking-cost table repeats the writes on both nbdtrack variants with the server and
fio pinned to one CPU, in alternating rounds after the main ones: the same placement for
both, so that the scheduler's choices do not pass for the cost of tracking."""


def header_text(args: argparse.Namespace, facts: dict[str, Any]) -> str:
    """Date, machine, load, options, placement and versions above the tables."""
    return (
        f"{facts['date']}  {facts['nproc']} CPUs ({facts['cpu_model']}), kernel "
        f"{facts['kernel']}, load {' '.join(facts['loadavg_start'])} -> "
        f"{' '.join(facts['loadavg_end'])}; {other_text(facts['other_cpu_pct'])}\n"
        f"image {fmt(args.size / MiB)} MiB fully written on {facts['workdir_fs']}; "
        f"fio {args.runtime:g} s + {args.ramp:g} s ramp per job; {args.rounds} rounds; "
        f"placement: {facts['placement']} "
        f"(server CPUs {facts['server_cpus']}, client CPUs {facts['client_cpus']})\n"
        f"nbdtrack {facts['nbdtrack_commit']} "
        f"({facts['nbdtrack_tree_changed_files']} changed files under nbdtrack/), "
        f"{facts['qemu_nbd']}, {facts['nbdkit']}, {facts['fio']}, libnbd {facts['libnbd']}"
    )


def other_text(other: dict[str, float] | None) -> str:
    """How much CPU everything else took while fio ran: the noise in these numbers."""
    if other is None:
        return "no fio jobs"
    text = (
        f"CPU of everything else during fio jobs: median {other['median']:.0f}%, "
        f"max {other['max']:.0f}% of one core"
    )
    if other["median"] > BUSY_WARNING_PCT:
        text += "\nWARNING: the machine was busy with other work; these numbers are disturbed"
    return text


def save(args: argparse.Namespace, facts: dict, results: Results, report: str) -> None:
    """Everything as JSON: facts, options, per-round values, summaries, ratios, the table."""

    def summaries(table: dict[str, dict[str, list[float]]]) -> dict:
        return {s: {m: summarize(v) for m, v in ms.items()} for s, ms in table.items()}

    ratios = {}
    for metric in {m for ms in results.main.values() for m in ms}:
        ratios[metric] = {
            "nbdtrack/qemu-nbd": ratio(results.main, "nbdtrack", "qemu-nbd", metric),
            "nbdtrack+bitmaps/nbdtrack": ratio(
                results.main, "nbdtrack+bitmaps", "nbdtrack", metric
            ),
        }
    for metric in {m for ms in results.tracking.values() for m in ms}:
        ratios[f"tracking {metric}"] = {
            "nbdtrack+bitmaps/nbdtrack": ratio(results.tracking, *reversed(TRACKED), metric)
        }
    doc = {
        "machine": facts,
        "options": {
            "size": args.size,
            "runtime_s": args.runtime,
            "ramp_s": args.ramp,
            "rounds": args.rounds,
            "tracking_rounds": args.tracking_rounds,
            "status_seconds": args.status_seconds,
            "servers": args.server_keys,
            "bitmaps": list(BITMAPS),
            "workloads": [asdict(w) for w in WORKLOADS],
        },
        "rounds": {"main": results.main, "sparse": results.sparse, "tracking": results.tracking},
        "summary": {
            "main": summaries(results.main),
            "sparse": summaries(results.sparse),
            "tracking": summaries(results.tracking),
        },
        "ratios": ratios,
        "table": report,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"\nresults: {path}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # servers are stopped and files removed on the way out
        sys.exit("bench: interrupted")
