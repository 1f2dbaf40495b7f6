"""sd_notify without libsystemd: one datagram per state change to ``$NOTIFY_SOCKET``.

systemd (``Type=notify``) waits for READY=1 before it calls the service started, shows
STATUS= in ``systemctl status``, holds reloads between RELOADING=1 and READY=1, and
learns from STOPPING=1 that a stop is under way. With ``WatchdogSec=`` it sets
``WATCHDOG_USEC`` and kills a service that stops sending WATCHDOG=1, so the pings come
from the event loop: a wedged loop stops them. Outside systemd (no ``NOTIFY_SOCKET``)
every call is a no-op, so the server never needs to know how it was started.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("nbdtrack.notify")


class Notifier:
    def __init__(self, address: str | None) -> None:
        """``address``: a socket path, or ``@name`` for the abstract namespace."""
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self._failed = False

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields as one datagram; False if nobody listens."""
        if self.address is None:
            return False
        message = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as err:
            if not self._failed:  # say it once: a gone manager must not flood the log
                log.warning("cannot notify the service manager: %s", err)
                self._failed = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) tie READY=1 to this reload.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were started by a wrapper)
    return int(usec) / 1e6 / 2
