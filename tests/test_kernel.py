"""The real Linux kernel NBD client (nbd.ko from Debian's 6.1 kernel + nbd-client 3.24).

The host kernel has no NBD driver, so these tests boot a small Debian guest under QEMU
with the harness in ``$NBD_KVM_HARNESS`` (default ../shared/kernel-vm beside the
repository, see its README). The guest's nbd-client connects through qemu user networking
to an nbdtrack server on the host, builds an ext4 file system on the export, writes
files (one of them 20 MiB of random data), remounts after dropping caches, checks the checksums and
disconnects. On the host the image must then pass ``e2fsck -fn`` and hold exactly what
the guest wrote. The harness relay decodes the protocol (NBD_TRACE), so the tests also
check what the kernel negotiated and that every request got a reply without an error.

The first run builds the VM into ``$NBD_KVM_CACHE`` (default ~/.cache/nbd-kernel-vm)
and installs qemu-system-x86 if it is missing; later runs reuse it. One VM runs at a
time; each test takes about 20-30 s under TCG.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Worst case: building the VM on the first test, then one VM run that hits its limit.
pytestmark = [pytest.mark.kernel, pytest.mark.timeout(720)]

# The project's shared/ folder sits beside the repository (in CI too).
HARNESS = Path(
    os.environ.get("NBD_KVM_HARNESS")
    or Path(__file__).resolve().parents[2] / "shared" / "kernel-vm"
)
CACHE = Path(os.environ.get("NBD_KVM_CACHE") or Path.home() / ".cache" / "nbd-kernel-vm")
GUEST_TESTS = Path(__file__).parent / "kernel"
SMOKE = HARNESS / "guest" / "tests" / "smoke.sh"

EXPORT = "disk"
IMAGE_SIZE = 256 * 1024 * 1024
VM_TIMEOUT = 150  # run-guest.sh's hard limit for one VM (a normal run takes 20-30 s)
BUILD_TIMEOUT = 420  # apt-get install qemu + apt-get download of ~80 MB (~10 s here)
HELLO = "hello from the linux kernel nbd client"

# Host variables run-guest.sh and build-initramfs.sh read. They are cleared so that a
# developer's shell cannot change what these tests run; the tests set the ones they use.
HARNESS_KNOBS = frozenset(
    {
        *("TIMEOUT", "ACCEL", "CPU", "MEM", "SMP", "RELAY", "NBD_TRACE", "GUEST_ENV"),
        *("OUTDIR", "LOGDIR", "KERNEL_APPEND", "QUIET", "STREAM", "EXTRA_QEMU_ARGS"),
        *("PERF_MB", "BIG_MB", "NBD_CLIENT_OPTS", "NBD_DEV", "NBD_MODPARAMS", "LAT_N"),
        *("HARNESS_DMESG", "OUT", "WORK", "KPKG", "EXTRA_PKGS", "INSTALL_QEMU"),
        *("TEST", "EXPORT", "RUN", "SIZE"),
    }
)


# --- processes ---------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children before grandchildren), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a harness run and everything it started (timeout, qemu, relays, tail).

    GNU timeout puts qemu in a process group of its own, so killing run-guest.sh's group
    is not enough: the tree is collected first and every pid is killed by number.
    """
    if proc.poll() is not None:
        return
    pids = [proc.pid, *_descendants(proc.pid)]
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def _run_logged(cmd: list[str], env: dict, log: Path, timeout: float) -> int | None:
    """Run ``cmd`` with stdout+stderr in ``log``; None if it hit ``timeout`` (killed)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:  # also on KeyboardInterrupt or a pytest-timeout failure
        _kill_tree(proc)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").replace("\r", "")
    except OSError as err:
        return f"({path}: {err.strerror})"
    kept = text.splitlines()[-lines:]
    return "\n".join(kept) if kept else "(empty)"


def _harness_env(**knobs: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HARNESS_KNOBS}
    env["NBD_KVM_CACHE"] = str(CACHE)
    env["PATH"] = "/usr/bin:/usr/sbin:/bin:/sbin:" + env.get("PATH", "")
    env.update(knobs)
    return env


# --- the VM ------------------------------------------------------------------------


def _vm_missing() -> list[str]:
    out = CACHE / "out"
    missing = [f for f in ("vmlinuz", "base.cpio.gz", "busybox") if not (out / f).is_file()]
    if shutil.which("qemu-system-x86_64", path=_harness_env()["PATH"]) is None:
        missing.append("qemu-system-x86_64")
    return missing


@pytest.fixture(scope="session")
def kernel_vm(tmp_path_factory) -> Path:
    """The harness directory, with the VM built and qemu installed (once per cache)."""
    if not (HARNESS / "run-guest.sh").is_file():
        pytest.fail(f"kernel-vm harness not found at {HARNESS} (set NBD_KVM_HARNESS)")
    for tool in ("e2fsck", "debugfs"):
        if shutil.which(tool, path=_harness_env()["PATH"]) is None:
            pytest.fail(f"{tool} is missing on the host (apt-get install e2fsprogs)")
    if not _vm_missing():
        return HARNESS
    if shutil.which("apt-get") is None:
        pytest.fail(f"the kernel VM is not built and there is no apt-get: {_vm_missing()}")
    CACHE.mkdir(parents=True, exist_ok=True)
    log = tmp_path_factory.mktemp("kernel-vm-build") / "build.log"
    # Another test session may be building the same cache: build under a lock.
    with open(CACHE / ".nbdtrack-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _vm_missing():
            started = time.monotonic()
            rc = _run_logged(
                [str(HARNESS / "build-initramfs.sh"), "--install-qemu"],
                _harness_env(),
                log,
                BUILD_TIMEOUT,
            )
            if rc != 0 or _vm_missing():
                pytest.fail(
                    f"building the kernel VM failed (rc={rc}, after "
                    f"{time.monotonic() - started:.0f} s, missing {_vm_missing()}):\n"
                    f"{_tail(log, 60)}"
                )
    return HARNESS


# --- one guest run -----------------------------------------------------------------


@dataclass
class GuestRun:
    rc: int | None  # run-guest.sh's exit status; None when it had to be killed
    logdir: Path
    output: Path  # run-guest.sh's stdout and stderr
    trace: Path
    server_log: str = ""
    results: dict[str, dict[str, str]] = field(default_factory=dict)

    def details(self) -> str:
        """Everything needed to see why a run failed, for assertion messages."""
        trace = self.trace.read_text(errors="replace") if self.trace.exists() else ""
        summaries = [line for line in trace.splitlines() if " SUMMARY " in line]
        return "\n".join(
            [
                f"run-guest.sh exit status: {self.rc} (logs in {self.logdir})",
                f"--- results.log:\n{_tail(self.logdir / 'results.log', 100)}",
                f"--- console.log (tail):\n{_tail(self.logdir / 'console.log', 120)}",
                f"--- run-guest.sh output besides the console (tail):\n{self._output()}",
                f"--- server log (tail):\n{self.server_log[-4000:] or '(empty)'}",
                "--- protocol trace summaries:\n" + ("\n".join(summaries) or "(none)"),
            ]
        )

    def _output(self) -> str:
        console = set(_tail(self.logdir / "console.log", 100_000).splitlines())
        lines = [line for line in _tail(self.output, 100_000).splitlines() if line not in console]
        return "\n".join(lines[-30:]) or "(empty)"

    def connections(self) -> list[dict]:
        """The relay's per-connection summaries, in the order the guest connected."""
        order: list[str] = []
        summary: dict[str, dict] = {}
        for line in self.trace.read_text(errors="replace").splitlines():
            conn, _, rest = line.partition(" ")
            if conn not in summary and conn not in order:
                order.append(conn)
            if " SUMMARY " in line:
                summary[conn] = json.loads(rest.split(" SUMMARY ", 1)[1])
            assert "TRACE STOPPED" not in rest, f"decoder gave up: {line}\n{self.details()}"
        missing = [conn for conn in order if conn not in summary]
        assert not missing, f"connections without a summary: {missing}\n{self.details()}"
        return [summary[conn] for conn in order]


def _parse_results(text: str) -> dict[str, dict[str, str]]:
    """``RESULT kind k=v k2='v 2' ...`` lines -> {kind: {k: v}}."""
    results: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            words = shlex.split(line[len("RESULT ") :])
            results[words[0]] = dict(w.partition("=")[::2] for w in words[1:] if "=" in w)
    return results


def run_guest(
    harness: Path,
    server,
    workdir: Path,
    script: Path,
    files: tuple[Path, ...] = (),
    **knobs: str,
) -> GuestRun:
    """Boot the VM, run ``script`` in it against ``server``; stop the server afterwards."""
    logdir = workdir / "guest"
    run = GuestRun(None, logdir, workdir / "run-guest.out", workdir / "nbd-trace.log")
    knobs = {"TIMEOUT": str(VM_TIMEOUT), "STREAM": "0", "RELAY": "python", **knobs}
    env = _harness_env(LOGDIR=str(logdir), NBD_TRACE=str(run.trace), **knobs)
    cmd = [str(harness / "run-guest.sh"), str(server.port), EXPORT, str(script), *map(str, files)]
    run.rc = _run_logged(cmd, env, run.output, int(knobs["TIMEOUT"]) + 60)
    stopped = server.stop()
    run.server_log = server.log
    run.results = _parse_results(_tail(logdir / "results.log", 10_000))
    assert run.rc == 0, f"the guest test failed\n{run.details()}"
    assert stopped == 0, f"nbdtrack exited with {stopped} on SIGTERM\n{run.details()}"
    # a well-behaved client must not make nbdtrack warn (protocol errors, failed I/O...)
    bad = [
        line
        for line in run.server_log.splitlines()
        if line.startswith(("WARNING", "ERROR", "CRITICAL", "Traceback"))
    ]
    assert not bad, f"nbdtrack complained: {bad}\n{run.details()}"
    return run


# --- checks ------------------------------------------------------------------------


def check_connected(run: GuestRun) -> None:
    """The block queue the kernel set up from the export flags nbdtrack sent."""
    conn = run.results.get("connected")
    assert conn, f"no 'RESULT connected' line\n{run.details()}"
    expected = {
        "size": str(IMAGE_SIZE),
        "lbs": "512",
        "ro": "0",  # no READ_ONLY flag
        "write_cache": "write back",  # SEND_FLUSH
        "fua": "1",  # SEND_FLUSH + SEND_FUA
        "rotational": "0",
    }
    wrong = {k: conn.get(k) for k, v in expected.items() if conn.get(k) != v}
    assert not wrong, f"unexpected queue settings {wrong}, wanted {expected}\n{run.details()}"
    assert int(conn["discard_max"]) > 0, f"discard not enabled (SEND_TRIM)\n{run.details()}"
    perf = run.results.get("perf")
    assert perf and perf.get("raw_sha_ok") == "1", f"raw O_DIRECT read-back\n{run.details()}"
    fs = run.results.get("fs")
    assert fs and fs.get("files") == "50", f"no 'RESULT fs ok' line\n{run.details()}"
    assert run.results.get("disconnected", {}).get("size_after") == "0", run.details()


def check_transmission(run: GuestRun, conn: dict) -> None:
    """One kernel connection: negotiated with GO, every request answered without error."""
    where = f"connection {conn['pid']}: {json.dumps(conn)}\n{run.details()}"
    assert conn["options"] == [f"GO export='{EXPORT}' info_requests=[]"], where
    assert conn["export"] == EXPORT and conn["export_size"] == IMAGE_SIZE, where
    flags = set(conn["transmission_flags"].split("|"))
    assert {"HAS_FLAGS", "SEND_FLUSH", "SEND_FUA", "SEND_TRIM", "CAN_MULTI_CONN"} <= flags, where
    assert "READ_ONLY" not in flags, where
    commands = conn["commands"]
    assert commands.get("DISC") == 1, where
    assert conn["errors"] == 0, where
    assert not conn.get("structured_replies"), where
    assert set(conn["reply_kinds"]) <= {"simple"}, where
    requests = sum(commands.values()) - commands["DISC"]
    assert conn["reply_kinds"].get("simple", 0) == requests, f"unanswered requests: {where}"


def check_image(image: Path, run: GuestRun, workdir: Path) -> None:
    """On the host: the file system is clean and holds exactly what the guest wrote."""
    assert image.stat().st_size == IMAGE_SIZE
    fsck = subprocess.run(
        ["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=120
    )
    assert fsck.returncode == 0, f"e2fsck -fn on the host:\n{fsck.stdout}{fsck.stderr}"
    big = workdir / "big.bin"
    subprocess.run(
        ["debugfs", "-R", f"dump /big.bin {big}", str(image)],
        capture_output=True,
        check=True,
        timeout=120,
    )
    fs = run.results["fs"]
    assert big.stat().st_size == int(fs["big_mb"]) * 1024 * 1024
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    assert digest == fs["big_sha256"], "big.bin on the host differs from the guest's"

    def cat(path: str) -> str:
        result = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(image)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return result.stdout

    hello = cat("/hello.txt")
    assert hello == HELLO + "\n"
    assert hashlib.sha256(hello.encode()).hexdigest() == fs["hello_sha256"]
    assert cat("/dir/f37") == "file 37\n"
    listing = subprocess.run(
        ["debugfs", "-R", "ls -p /dir", str(image)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    names = {line.split("/")[5] for line in listing.splitlines() if line.count("/") >= 6}
    assert names >= {f"f{i}" for i in range(1, 51)}, listing


# --- tests -------------------------------------------------------------------------


@pytest.fixture
def disk(make_image) -> Path:
    return make_image(IMAGE_SIZE, f"{EXPORT}.img")


def test_kernel_client_ext4(kernel_vm, nbd_server, disk, tmp_path):
    """One connection: the harness smoke test (raw I/O, ext4, remount, fsck, disconnect)."""
    server = nbd_server(str(disk), "--name", EXPORT, export=EXPORT)
    run = run_guest(kernel_vm, server, tmp_path, SMOKE, PERF_MB="16")

    check_connected(run)
    conns = run.connections()
    # nbd-client -l: NBD_OPT_LIST (answered with our export), then ABORT
    assert conns[0]["options"] == ["LIST", "ABORT"], run.details()
    assert f"S reply to LIST: SERVER name='{EXPORT}'" in run.trace.read_text(), run.details()
    assert len(conns) == 2, run.details()
    conn = conns[1]
    check_transmission(run, conn)
    commands, flags = conn["commands"], conn["cmd_flags"]
    # ext4 and mkfs use every command the 6.1 driver has: journal commits are FUA
    # writes, mkfs discards the whole device, and the kernel pipelines requests.
    for name in ("READ", "WRITE", "FLUSH", "TRIM"):
        assert commands.get(name, 0) > 0, f"no {name}: {conn}"
    assert flags.get("WRITE:FUA", 0) > 0, f"no FUA writes: {conn}"
    assert conn["sizes"]["TRIM"]["max"] == IMAGE_SIZE, f"mkfs discards everything: {conn}"
    assert conn["max_in_flight"] >= 2, f"requests were not pipelined: {conn}"
    assert run.server_log.count(f"serving export '{EXPORT}'") == 1, run.details()

    check_image(disk, run, tmp_path)


def test_kernel_client_multi_conn(kernel_vm, nbd_server, disk, tmp_path):
    """``nbd-client -C 2`` on a 2-cpu guest: I/O on both sockets, coherent across them."""
    server = nbd_server(str(disk), "--name", EXPORT, export=EXPORT)
    run = run_guest(
        kernel_vm,
        server,
        tmp_path,
        GUEST_TESTS / "multiconn.sh",
        (SMOKE,),
        SMP="2",
        NBD_CLIENT_OPTS="-C 2",
        PERF_MB="8",
    )

    multi = run.results.get("multiconn")
    assert multi and multi.get("cpus") == "2", f"no 'RESULT multiconn ok'\n{run.details()}"
    assert multi.get("size_after") == "0", run.details()
    check_connected(run)

    conns = run.connections()
    # pinned phase: 2 connections; smoke test: LIST, then 2 more connections
    assert [c["options"][0].split()[0] for c in conns] == ["GO", "GO", "LIST", "GO", "GO"], (
        run.details()
    )
    for conn in conns[:2] + conns[3:]:
        check_transmission(run, conn)
    # The pinned phase wrote 4 MiB on each cpu (ending in fsync) and read it back on the
    # other: with one blk-mq hardware queue per connection, each socket carried one
    # region's writes and FLUSH and the other region's reads, and the guest saw the
    # right data, so a write acknowledged on one connection is visible on the other.
    mib = int(multi["mb"]) * 1024 * 1024
    for conn in conns[:2]:
        sizes = conn["sizes"]
        assert sizes.get("WRITE", {}).get("bytes") == mib, f"writes of one cpu: {conn}"
        assert sizes.get("READ", {}).get("bytes", 0) >= mib, f"reads of one cpu: {conn}"
        assert conn["commands"].get("FLUSH", 0) > 0, f"no FLUSH on this socket: {conn}"
    assert sum(c["commands"].get("TRIM", 0) for c in conns[3:]) > 0, run.details()
    assert run.server_log.count(f"serving export '{EXPORT}'") == 4, run.details()

    check_image(disk, run, tmp_path)
