"""Adaptive polling (server/polling.py, ``serve --poll-max-ns``): the selector polls only
after short sleeps, drops back to sleeping at once after a long one, catches an event
that arrives while it polls, keeps the loop's timeouts; the server runs on it by default,
and its setting's errors are one line."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import nbd
import pytest

from nbdtrack.server.polling import POLL_START_NS, PollingSelector, polling_loop_factory
from tests.test_service import one_line_error, run_cli

MiB = 1024 * 1024


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_polling_grows_after_short_sleeps_and_stops_after_a_long_one():
    sel = PollingSelector(poll_max_ns=50_000)
    steps = []
    for _ in range(6):
        sel._adapt(20_000)  # the event came 20 µs into the wait: polling would catch it
        steps.append(sel.poll_ns)
    assert steps == [POLL_START_NS, 8_000, 16_000, 32_000, 50_000, 50_000]
    sel._adapt(50_001)  # longer than poll-max-ns: an idle client, stop polling
    assert sel.poll_ns == 0
    sel.close()


def test_no_polling_when_poll_max_ns_is_zero(pair):
    a, b = pair
    sel = PollingSelector(poll_max_ns=0)
    sel.register(a, 1)  # EVENT_READ
    for _ in range(3):
        b.send(b"x")
        assert [key.fileobj for key, _ in sel.select(None)] == [a]
        a.recv(1)
    assert sel.poll_ns == 0
    sel.close()


def test_an_event_during_the_poll_is_returned_without_sleeping(pair):
    a, b = pair
    sel = PollingSelector(poll_max_ns=2_000_000_000)
    sel.register(a, 1)
    sel.poll_ns = sel.poll_max_ns  # poll up to 2 s; the byte comes after ~10 ms
    sender = threading.Timer(0.01, b.send, (b"x",))
    sender.start()
    ready = sel.select(None)
    sender.join()
    assert [key.fileobj for key, _ in ready] == [a]
    assert sel.poll_ns == sel.poll_max_ns  # caught while polling: polling stays as it was
    sel.close()


def test_polling_keeps_the_loops_timeout(pair):
    a, _ = pair
    sel = PollingSelector(poll_max_ns=2_000_000_000)
    sel.register(a, 1)
    sel.poll_ns = sel.poll_max_ns
    start = time.monotonic()
    assert sel.select(0.05) == []  # a timer due in 50 ms: the poll ends with it
    assert time.monotonic() - start < 1.5  # not the 2 s poll
    assert sel.select(0) == []
    sel.close()


def test_an_asyncio_loop_runs_on_the_polling_selector():
    loop = polling_loop_factory(65_536)()
    try:
        assert isinstance(loop._selector, PollingSelector)  # type: ignore[attr-defined]
        assert loop.run_until_complete(_sleep_then(7)) == 7
    finally:
        loop.close()


async def _sleep_then(value: int) -> int:
    for _ in range(20):
        await asyncio.sleep(0.001)  # short waits: the selector starts polling
    return value


def test_the_server_polls_by_default_and_not_with_zero(nbd_server, make_image):
    image = make_image(4 * MiB)
    polling = nbd_server(str(image), export="disk")
    plain = nbd_server(str(image), "--poll-max-ns", "0", export="disk")
    assert "event loop: asyncio, polling up to 65536 ns" in polling.log
    assert "event loop: asyncio\n" in plain.log
    for srv, byte in ((polling, b"p"), (plain, b"q")):
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        for n in range(200):  # one request in flight at a time: the case polling is for
            h.pwrite(byte * 4096, (n % 64) * 4096)
            assert h.pread(4096, (n % 64) * 4096) == byte * 4096
        h.shutdown()


def test_poll_max_ns_errors_are_one_line(tmp_path, make_image):
    image = make_image(MiB)
    for value, message in (
        ("-1", "key 'server.poll-max-ns': must be from 0 to 10000000"),
        ('"fast"', "key 'server.poll-max-ns': expected int, got str"),
    ):
        config = tmp_path / "bad.toml"
        config.write_text(f'[server]\npoll-max-ns = {value}\n[[export]]\npath = "{image}"\n')
        assert f"{config}: {message}" in one_line_error(run_cli("check-config", str(config)))
    proc = run_cli("serve", str(image), "--poll-max-ns", "1ms")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --poll-max-ns: '1ms': not a number of nanoseconds" in proc.stderr
