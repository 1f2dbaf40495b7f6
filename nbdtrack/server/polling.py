"""Adaptive polling for asyncio's event loop, as QEMU's ``poll-max-ns``.

A client with one request in flight sends the next one a few tens of microseconds after
it reads a reply. If the loop is asleep in ``epoll_wait`` by then, the request's arrival
has to wake it: a trip through the scheduler, and on a virtual machine an inter-processor
interrupt through the hypervisor (35-40 µs on the 2-vCPU machines of bench/). Polling the
sockets for a short while before sleeping catches such a request awake: in bench/, 4 KiB
requests at one in flight went from ~12k to ~21k per second, block status calls from
~10k to ~19k, for no more CPU per request (the sleep and wake-up cost as much).

The polling time adapts like QEMU's event loop (util/aio-posix.c): it grows while the
loop's sleeps end within ``poll_max_ns`` (a poll that long would have caught the
event), and drops back to none once a sleep is longer (an idle or slow client: polling
would only burn CPU). An idle server therefore does not poll.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Callable

POLL_START_NS = 4_000  # first step when polling starts to grow (QEMU's)


class PollingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The platform's selector, polling up to ``poll_ns`` before a blocking select."""

    def __init__(self, poll_max_ns: int) -> None:
        super().__init__()
        self.poll_max_ns = poll_max_ns
        self.poll_ns = 0  # how long the next wait polls before it sleeps

    def select(self, timeout: float | None = None):  # type: ignore[override]
        if not self.poll_max_ns or (timeout is not None and timeout <= 0):
            return super().select(timeout)
        start = time.perf_counter_ns()
        if self.poll_ns:
            limit = self.poll_ns if timeout is None else min(self.poll_ns, int(timeout * 1e9))
            while True:
                ready = super().select(0)
                if ready:
                    return ready  # caught awake: keep poll_ns as it is
                if time.perf_counter_ns() - start >= limit:
                    break
            if timeout is not None:
                timeout = max(0.0, timeout - (time.perf_counter_ns() - start) / 1e9)
        ready = super().select(timeout)
        self._adapt(time.perf_counter_ns() - start)
        return ready

    def _adapt(self, waited_ns: int) -> None:
        if waited_ns > self.poll_max_ns:
            self.poll_ns = 0  # a long wait: polling would have been spent for nothing
        elif self.poll_ns < self.poll_max_ns:
            self.poll_ns = min(self.poll_max_ns, max(POLL_START_NS, self.poll_ns * 2))


def polling_loop_factory(poll_max_ns: int) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of asyncio event loops whose selector polls adaptively."""

    def new_loop() -> asyncio.AbstractEventLoop:
        return asyncio.SelectorEventLoop(PollingSelector(poll_max_ns))

    return new_loop
