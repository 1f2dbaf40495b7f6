"""Inside the container: `systemctl stop nbdtrack.service` (the socket stays) leaves clean
bitmaps and no journal to replay; the next client activates it again and finds its data
and its dirty bits."""

import asyncio
import os
import subprocess

from units import show

from nbdtrack.client import connect
from nbdtrack.tracking.journal import header
from nbdtrack.tracking.statefile import decode_state

STATE = "/var/lib/nbdtrack/exports"


subprocess.run(["systemctl", "stop", "nbdtrack.service"], check=True)
assert show("ActiveState") == "inactive" and show("Result") == "success"
for export in ("disk", "extra"):
    directory = os.path.join(STATE, export)
    with open(os.path.join(directory, "bitmaps"), "rb") as f:
        state = decode_state(f.read(), directory)
    with open(os.path.join(directory, "journal"), "rb") as f:
        journal = f.read()
    assert state.clean and journal == header(state.journal_id), export
journal = subprocess.run(
    ["journalctl", "-q", "-u", "nbdtrack.service", "-o", "cat"], capture_output=True, text=True
).stdout
assert "STOPPING=1" in journal, journal[-2000:]


async def main() -> None:
    client = await connect(("127.0.0.1", 10809), "disk", meta_contexts=["qemu:dirty-bitmap:daily"])
    assert await client.pread(131072, 0) == b"\x11" * 65536 + b"\x22" * 65536
    status = await client.block_status(0, 4 * 65536)
    extents = status["qemu:dirty-bitmap:daily"]
    assert extents[0].length >= 131072 and extents[0].flags & 1, extents
    await client.disconnect()


asyncio.run(main())
assert show("ActiveState") == "active"
print("restart ok")
