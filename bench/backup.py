"""The backup workload: a full backup, then an incremental after 1% random writes, timed
against nbdcopy of the whole image from the same server, in one run.

    .venv/bin/python bench/backup.py [--size 4G] [--rounds 3] [--json FILE]

Each round: a fresh repository; nbdtrack serves the image with a recording bitmap and a
control socket; ``nbdtrack backup`` takes a full (through a checkpoint), 1% of the image is
rewritten in random 64 KiB blocks, ``nbdtrack backup`` takes the incremental, and
``nbdcopy`` copies the whole export to a file. Reported: medians [min-max] of the times,
the incremental's rate over the dirty bytes, and incremental / nbdcopy. Servers are
started and stopped by pid on 127.0.0.1; every file is removed at the end.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
BLOCK = 64 * 1024


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def fill(path: Path, size: int, seed: int) -> None:
    """Random data everywhere: no server can skip holes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(rng.randbytes(64 * MiB))
        f.write(rng.randbytes(size % (64 * MiB)))


def start_server(image: Path, workdir: Path) -> tuple[subprocess.Popen, str, str]:
    log = workdir / "server.log"
    control = workdir / "control.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbdtrack", "serve", str(image), "--name", "disk"]
        + ["--listen", "127.0.0.1:0", "--state-dir", str(workdir / "state")]
        + ["--control", str(control), "--bitmap", "b"],
        stdout=open(log, "wb"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        for line in text.splitlines():
            if "listening on 127.0.0.1:" in line:
                port = line.rsplit(":", 1)[1].strip()
                return proc, f"nbd://127.0.0.1:{port}/disk", str(control)
        if proc.poll() is not None:
            raise SystemExit(f"nbdtrack exited:\n{text}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("nbdtrack did not start")


def timed(cmd: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return time.monotonic() - started


def one_round(image: Path, size: int, workdir: Path, seed: int) -> dict[str, float]:
    proc, uri, control = start_server(image, workdir)
    repo = workdir / "repo"
    backup = [sys.executable, "-m", "nbdtrack", "backup", uri, str(repo), "--bitmap", "b"]
    backup += ["--control", control, "--progress", "none"]
    try:
        full = timed(backup)
        h = nbd.NBD()
        h.connect_uri(uri)
        rng = random.Random(seed)
        blocks = size // BLOCK
        dirty = set()
        while len(dirty) * BLOCK < size // 100:  # 1% of the image
            dirty.add(rng.randrange(blocks))
        for index in dirty:
            h.pwrite(rng.randbytes(BLOCK), index * BLOCK)
        h.flush()
        h.shutdown()
        incremental = timed(backup)
        out = workdir / "copy.raw"
        copy = timed(["nbdcopy", uri, str(out)])
        out.unlink()
        manifest = json.loads((repo / "disk" / "manifest.json").read_text())
        read = manifest["backups"][-1]["bytes_read"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(workdir / "state", ignore_errors=True)
    return {
        "full_s": full,
        "incremental_s": incremental,
        "nbdcopy_s": copy,
        "dirty_bytes": len(dirty) * BLOCK,
        "incremental_read_bytes": read,
        "incremental_vs_nbdcopy": incremental / copy,
        "incremental_dirty_MiBps": len(dirty) * BLOCK / MiB / incremental,
    }


def cell(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-" + (
        f"{fmt.format(max(values))}]"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=parse_size, default=4 << 30, help="image size (default 4G)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", help="where the image lives (default: the system temp dir)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "backup.json"))
    args = p.parse_args()
    os.environ["PATH"] = "/usr/bin:" + os.environ.get("PATH", "")
    # As pip does when it installs a package: otherwise, under PYTHONDONTWRITEBYTECODE (or
    # in a read-only checkout), every ``nbdtrack backup`` would compile what it imports.
    compileall.compile_dir(ROOT / "nbdtrack", quiet=1)
    workdir = Path(tempfile.mkdtemp(prefix="nbdtrack-bench-backup-", dir=args.dir))
    try:
        image = workdir / "disk.img"
        print(f"writing a {args.size >> 20} MiB image of random data ...", file=sys.stderr)
        fill(image, args.size, seed=1)
        rounds = []
        for n in range(args.rounds):
            rounds.append(one_round(image, args.size, workdir, seed=100 + n))
            print(f"round {n + 1}: {json.dumps(rounds[-1])}", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    keys = [
        ("full backup", "full_s", "s", "{:.2f}"),
        ("incremental after 1% writes", "incremental_s", "s", "{:.2f}"),
        ("nbdcopy of the whole image", "nbdcopy_s", "s", "{:.2f}"),
        ("incremental / nbdcopy", "incremental_vs_nbdcopy", "", "{:.3f}"),
        ("incremental rate over dirty data", "incremental_dirty_MiBps", "MiB/s", "{:.0f}"),
    ]
    print(f"backup workload: {args.size >> 20} MiB image, {args.rounds} rounds, median [min-max]")
    for label, key, unit, fmt in keys:
        print(f"  {label:34} {cell([r[key] for r in rounds], fmt):>24} {unit}")
    dirty = rounds[0]["dirty_bytes"]
    read = [r["incremental_read_bytes"] for r in rounds]
    print(f"  {'dirty bytes / read by the incremental':34} {dirty} / {statistics.median(read):.0f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"size": args.size, "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
