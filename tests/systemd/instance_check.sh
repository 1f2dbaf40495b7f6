#!/bin/sh
# The template units: nbdtrack@b.socket (a unix socket) activates nbdtrack@b.service,
# which serves /etc/nbdtrack/b.toml with its state in /var/lib/nbdtrack/b.
set -eu
out=$(systemd-analyze verify nbdtrack@b.service nbdtrack@b.socket 2>&1) || { echo "$out"; exit 1; }
[ -z "$out" ] || { echo "$out"; exit 1; }
systemctl start nbdtrack@b.socket
[ "$(stat -c %a /run/nbdtrack-b.sock)" = 600 ]
/opt/nbdtrack/bin/python - <<'PY'
import asyncio
from nbdtrack.client import connect

async def main():
    c = await connect("/run/nbdtrack-b.sock", "b")
    await c.pwrite(b"\x33" * 4096, 0)
    assert await c.pread(4096, 0) == b"\x33" * 4096
    await c.disconnect()

asyncio.run(main())
PY
[ "$(systemctl is-active nbdtrack@b.service)" = active ]
systemctl show -p StatusText --value nbdtrack@b.service | grep -q 'serving 1 export (b)'
test -s /var/lib/nbdtrack/b/exports/b/bitmaps
journalctl -q -u nbdtrack@b.service -o cat | grep -q 'READY=1'
systemctl stop nbdtrack@b.service nbdtrack@b.socket
[ "$(systemctl show -p Result --value nbdtrack@b.service)" = success ]
journalctl -q -u nbdtrack@b.service -o cat | grep -q 'STOPPING=1'
echo "instance ok"
