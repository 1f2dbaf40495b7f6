"""Shared by the checks that run inside the container."""

import subprocess


def show(prop: str) -> str:
    """A property of nbdtrack.service, as `systemctl show` gives it."""
    out = subprocess.run(
        ["systemctl", "show", "-p", prop, "--value", "nbdtrack.service"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()
