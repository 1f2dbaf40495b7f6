"""nbdtrack/heap.py: with the thresholds raised, 1 MiB request buffers freed and allocated
again reuse the heap's pages (counted as minor page faults, not timed)."""

from __future__ import annotations

import os
import subprocess
import sys

ROUNDS = 40
IN_FLIGHT = 16  # 1 MiB buffers alive at once, as with 16 sequential writes in flight

PROGRAM = f"""
import resource, sys
from nbdtrack import heap
changed = heap.keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def one_round():
    buffers = [bytearray(1 << 20) for _ in range({IN_FLIGHT})]
    for b in buffers:
        b[::4096] = b"x" * len(b[::4096])  # touch every page, as a received payload does
one_round()
before = faults()
for _ in range({ROUNDS}):
    one_round()
print(changed, faults() - before)
"""


def run(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_buffers_are_reused_without_faulting_pages_in() -> None:
    pages_per_round = IN_FLIGHT * (1 << 20) // 4096
    changed, faults = run("keep")
    assert changed == "True"
    assert faults < pages_per_round  # all 40 rounds together fault in less than one round
    _, default_faults = run("default")
    assert default_faults > 10 * pages_per_round  # glibc's default gives memory back each round


def test_thresholds_set_in_the_environment_are_kept() -> None:
    changed, _ = run("keep", {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert changed == "False"
