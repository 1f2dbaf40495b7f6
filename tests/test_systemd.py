"""Under a real systemd: the units in systemd/ booted in a throw-away container.

``../shared/systemd-harness/run-under-systemd.sh`` (``NBDTRACK_SYSTEMD_HARNESS``
overrides where it is) boots Debian bookworm with systemd-nspawn. nbdtrack goes in from
wheels built here (the container has no network); ``nbdtrack.socket`` starts, a client
connecting activates the service, which must send READY=1 and have its state directory;
the checks in tests/systemd/ then look at its sandbox from inside, reload it under an
open client while an export appears, stop it (clean bitmaps, no journal) and let the
next client activate it again, and run a template instance on a unix socket. The
harness's own stop must end in STOPPING=1 and Result=success.

The first run builds the rootfs (about a minute) in the harness's cache; later runs
take seconds. It needs root (or password-less sudo); a missing harness is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HARNESS = Path(
    os.environ.get("NBDTRACK_SYSTEMD_HARNESS")
    or Path(__file__).resolve().parents[2] / "shared" / "systemd-harness"
)
CHECKS = Path(__file__).resolve().parent / "systemd"

CONFIG = """\
[server]
listen = ["127.0.0.1:10809"]   # replaced by nbdtrack.socket's listener

[[export]]
name = "disk"
path = "/var/lib/nbdtrack/images/disk.img"
bitmaps = ["daily"]
"""
INSTANCE_CONFIG = """\
[[export]]
name = "b"
path = "/var/lib/nbdtrack/images/b.img"
bitmaps = ["nightly:4K"]
"""


def build_wheels(directory: Path, work: Path) -> None:
    """nbdtrack and its runtime dependencies as wheels, built from a copy of the tree
    (so that the checkout gets no build/ or egg-info)."""
    source = work / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".*", "__pycache__", "*.egg-info", "build", "dist", "var", "tests", "bench"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(directory), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    names = sorted(p.name.split("-")[0].lower() for p in directory.glob("*.whl"))
    # blake3 needs typing_extensions below Python 3.12
    assert names == ["bitarray", "blake3", "nbdtrack", "tqdm", "typing_extensions"], names


def unit_directory(work: Path) -> Path:
    units = work / "units"
    (units / "templates").mkdir(parents=True)
    for name in ("nbdtrack.service", "nbdtrack.socket"):
        shutil.copy(REPO / "systemd" / name, units)
    for name in ("nbdtrack@.service", "nbdtrack@.socket"):
        shutil.copy(REPO / "systemd" / name, units / "templates")
    (units / "config").mkdir()
    (units / "config" / "nbdtrack.toml").write_text(CONFIG)
    (units / "config" / "b.toml").write_text(INSTANCE_CONFIG)
    shutil.copytree(CHECKS, units / "checks")
    build_wheels(units / "wheels", work)
    return units


def run_harness(cmd: list[str], timeout: float) -> str:
    """Run the harness; on timeout end it by pid with SIGTERM, so it powers off its
    container, and with SIGKILL only if that does not work."""
    # The harness's environment reaches the container's commands: keep the test's out.
    env = {k: v for k, v in os.environ.items() if k not in ("STATE_DIRECTORY", "NOTIFY_SOCKET")}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"the harness took more than {timeout} s:\n{out}")
    return out


@pytest.mark.timeout(900)
def test_units_under_real_systemd(tmp_path):
    script = HARNESS / "run-under-systemd.sh"
    assert script.is_file(), (
        f"systemd harness not found at {HARNESS} (CI has shared/ beside the clone; "
        "NBDTRACK_SYSTEMD_HARNESS overrides)"
    )
    if os.geteuid() == 0:
        prefix = []
    else:
        assert shutil.which("sudo"), "the systemd harness needs root, or sudo"
        prefix = ["sudo", "-n", "--preserve-env=NBD_SYSTEMD_CACHE"]
    units = unit_directory(tmp_path)
    checks = "/mnt/units/checks"
    python = "/opt/nbdtrack/bin/python"
    cmd = [
        *prefix,
        str(script),
        "-u",
        str(units),
        "-i",
        f"sh {checks}/install.sh",
        "-s",
        "nbdtrack.socket",
        "-p",
        "10809",
        "-P",
        "python3-venv",  # only used when the rootfs is first built
        "-c",
        "systemctl show -p StatusText --value nbdtrack.service"
        " | grep -q 'serving 1 export (disk), '",
        "-c",
        # By identifier: the harness's debug log level makes journald file a new
        # process's first second under init.scope (without it, -u finds them too).
        "journalctl -q -t nbdtrack -o cat"
        " | grep -q 'listening on inherited socket 127.0.0.1:10809'",
        "-c",  # native entries with priorities: the harness's "ping" is a warning
        "journalctl -q -t nbdtrack -p warning -o cat | grep -q 'unknown client flags'"
        " && ! journalctl -q -t nbdtrack -p warning -o cat | grep -q 'listening on'"
        " && journalctl -q -t nbdtrack -o verbose | grep -q 'NBDTRACK_LOGGER=nbdtrack.server'",
        "-c",
        "test -s /var/lib/nbdtrack/exports/disk/bitmaps"
        " && test -e /var/lib/nbdtrack/exports/disk/journal"
        " && test -S /var/lib/nbdtrack/control.sock",
        "-c",
        "/usr/local/bin/nbdtrack bitmap list | grep -q daily",
        "-c",
        f"sh {checks}/sandbox.sh",
        "-c",
        f"{python} {checks}/reload_check.py",
        "-c",
        f"{python} {checks}/restart_check.py",
        "-c",
        f"sh {checks}/instance_check.sh",
    ]
    out = run_harness(cmd, timeout=800)
    print(out)
    failed = [line for line in out.splitlines() if line.startswith(("FAIL:", "ERROR:"))]
    assert not failed and "RESULT: PASS" in out, "\n".join(failed) or out[-3000:]
    for needed in (
        "PASS: systemd-analyze verify nbdtrack.service",
        "PASS: systemd-analyze verify nbdtrack.socket",
        "PASS: connect 127.0.0.1:10809 -> b'NBDMAGIC",
        "PASS: nbdtrack.service sent READY=1 via NOTIFY_SOCKET",
        "PASS: nbdtrack.service StateDirectory /var/lib/nbdtrack exists",
        "PASS: check: sh /mnt/units/checks/sandbox.sh",
        f"PASS: check: {python} {checks}/reload_check.py",
        f"PASS: check: {python} {checks}/restart_check.py",
        f"PASS: check: sh {checks}/instance_check.sh",
        "PASS: nbdtrack.service stopped cleanly (inactive, Result=success)",
        "PASS: nbdtrack.service sent STOPPING=1",
    ):
        assert needed in out, f"missing '{needed}'"
    score = re.search(r"Overall exposure level for nbdtrack\.service: ([0-9.]+)", out)
    assert score, "no systemd-analyze security score"
    assert float(score.group(1)) <= 3.0, f"sandbox got looser: {score.group(0)}"
