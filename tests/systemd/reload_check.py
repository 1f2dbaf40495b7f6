"""Inside the container: a client stays connected and working across `systemctl reload`,
while the export the reload adds appears."""

import asyncio
import subprocess
import time

from units import show

from nbdtrack.client import connect, list_exports

ADDRESS = ("127.0.0.1", 10809)
EXTRA = '\n[[export]]\nname = "extra"\npath = "/var/lib/nbdtrack/images/extra.img"\n'


async def main() -> None:
    # Under the harness (PID 1 at log level debug) journald files a new process's first
    # second under init.scope; after that, `journalctl -u` finds the reload's lines.
    started = int(show("ExecMainStartTimestampMonotonic")) / 1e6
    await asyncio.sleep(max(0.0, started + 2.5 - time.monotonic()))
    client = await connect(ADDRESS, "disk")
    await client.pwrite(b"\x11" * 65536, 0)
    await client.flush()
    pid = show("MainPID")
    subprocess.run(["truncate", "-s", "8M", "/var/lib/nbdtrack/images/extra.img"], check=True)
    with open("/etc/nbdtrack/nbdtrack.toml", "a") as f:
        f.write(EXTRA)
    subprocess.run(["systemctl", "reload", "nbdtrack.service"], check=True)
    names: list[str] = []
    for _ in range(100):
        names = [e.name for e in await list_exports(ADDRESS)]
        if "extra" in names:
            break
        await asyncio.sleep(0.1)
    assert names == ["disk", "extra"], names
    await client.pwrite(b"\x22" * 65536, 65536)  # the old connection still works
    assert await client.pread(131072, 0) == b"\x11" * 65536 + b"\x22" * 65536
    await client.disconnect()
    extra = await connect(ADDRESS, "extra")
    assert extra.size == 8 * 1024 * 1024
    await extra.disconnect()
    assert show("MainPID") == pid, "reload must not restart the service"
    assert show("ActiveState") == "active"
    manager = subprocess.run(
        ["journalctl", "-q", "-u", "nbdtrack.service", "-o", "cat"], capture_output=True, text=True
    ).stdout
    assert "RELOADING=1" in manager, manager[-2000:]  # the notification systemd got
    service = subprocess.run(
        ["journalctl", "-q", "-u", "nbdtrack.service", "-o", "cat"], capture_output=True, text=True
    ).stdout
    assert "reload: export 'extra' added" in service, service[-2000:]
    print("reload ok:", names)


asyncio.run(main())
