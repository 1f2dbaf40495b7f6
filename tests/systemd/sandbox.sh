#!/bin/sh
# The running service's sandbox, seen from inside its own namespaces.
set -eu
pid=$(systemctl show -p MainPID --value nbdtrack.service)
[ "$pid" -gt 0 ]
grep -Eq '^NoNewPrivs:[[:space:]]+1$' "/proc/$pid/status"
grep -Eq '^CapEff:[[:space:]]+0+$' "/proc/$pid/status"
grep -Eq '^CapBnd:[[:space:]]+0+$' "/proc/$pid/status"
grep -Eq '^Seccomp:[[:space:]]+2$' "/proc/$pid/status"
inside() { nsenter -t "$pid" -m -- "$@"; }
! inside sh -c ': > /usr/sandbox-probe' 2>/dev/null          # ProtectSystem=strict
! inside sh -c ': > /etc/nbdtrack/sandbox-probe' 2>/dev/null # config read-only
inside sh -c ': > /var/lib/nbdtrack/images/probe && rm /var/lib/nbdtrack/images/probe'
: > /tmp/host-probe && inside test ! -e /tmp/host-probe      # PrivateTmp
: > /root/host-probe && inside test ! -e /root/host-probe    # ProtectHome
rm -f /tmp/host-probe /root/host-probe
echo "sandbox ok (pid $pid)"
