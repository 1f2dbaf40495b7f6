"""The QMP control socket, driven by QEMU's own client library (qemu.qmp).

Every command and every error a script can meet, against a real ``nbdtrack serve``:
the greeting and negotiation, framing and malformed input, QEMU's argument errors,
bitmap management with QEMU's messages, transactions that are all or nothing across
exports (checked with query and with NBD block status), counts after writes, bitmaps
added over QMP showing up as ``qemu:dirty-bitmap:NAME`` to libnbd and nbdinfo, and the
socket's mode and lifetime. The sans-IO pieces (framing, and a busy bitmap: one frozen
by a checkpoint, which no QMP command opens yet) are tested in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbd
import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from nbdtrack.control.commands import COMMANDS, Control
from nbdtrack.control.framing import JSONSplitter, TooLarge
from nbdtrack.control.session import Execute, QMPSession
from nbdtrack.exports import Export, ExportRegistry
from nbdtrack.storage.memory import MemoryBackend
from nbdtrack.tracking.tracker import DirtyTracker

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB
G64K = 64 * KiB
BUSY = "Bitmap 'b1' is currently in use by another operation and cannot be used"
# QEMU's BlockDirtyInfo
QEMU_BITMAP_KEYS = (
    "name",
    "granularity",
    "count",
    "recording",
    "busy",
    "persistent",
    "inconsistent",
)


class QMP:
    """qemu.qmp's synchronous client, with replies as data: results, or (class, desc)."""

    def __init__(self, path: str) -> None:
        self.monitor = QEMUMonitorProtocol(path)
        self.greeting = self.monitor.connect()

    def ok(self, command: str, args: dict | None = None) -> Any:
        reply = self.monitor.cmd_raw(command, args)
        assert "return" in reply, reply
        return reply["return"]

    def error(self, command: str, args: dict | None = None) -> tuple[str, str]:
        reply = self.monitor.cmd_raw(command, args)
        assert "error" in reply, reply
        return reply["error"]["class"], reply["error"]["desc"]

    def bitmaps(self, node: str) -> dict[str, dict]:
        for info in self.ok("query-named-block-nodes"):
            if info["node-name"] == node:
                return {b["name"]: b for b in info["dirty-bitmaps"]}
        raise AssertionError(f"no node {node}")

    def close(self) -> None:
        self.monitor.close()


@pytest.fixture
def qmp(server):
    client = QMP(server.control)
    yield client
    client.close()


def generic(desc: str) -> tuple[str, str]:
    return ("GenericError", desc)


def nbd_write(uri: str, offset: int, data: bytes) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(data, offset)
    h.flush()
    h.shutdown()


def dirty_runs(uri: str, bitmap: str, size: int = SIZE) -> list[tuple[int, int]]:
    """The dirty (offset, length) runs of a bitmap, read over NBD block status."""
    context = "qemu:dirty-bitmap:" + bitmap
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    assert h.can_meta_context(context)
    runs: list[tuple[int, int]] = []
    seen: list[tuple[int, int]] = []

    def extents(ctx: str, offset: int, entries: list[int], err: Any) -> int:
        if ctx == context:
            seen.extend(zip(entries[0::2], entries[1::2], strict=True))
        return 0

    pos = 0
    while pos < size:
        seen.clear()
        h.block_status(size - pos, pos, extents)
        assert seen
        for length, flags in seen:
            if flags & 1:
                if runs and runs[-1][0] + runs[-1][1] == pos:
                    runs[-1] = (runs[-1][0], runs[-1][1] + length)
                else:
                    runs.append((pos, length))
            pos += length
    h.shutdown()
    return runs


def raw_session(path: str) -> tuple[socket.socket, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock, sock.makefile("rb")


def read_json(reader: Any) -> dict:
    line = reader.readline()
    assert line.endswith(b"\r\n"), line  # one object a line, CRLF as QEMU ends them
    return json.loads(line)


@pytest.fixture
def three_exports(tmp_path: Path, make_image) -> list[str]:
    """Server arguments for exports a, b (writable) and ro (read-only, 1 MiB)."""
    a = make_image(SIZE, "a.img")
    b = make_image(SIZE, "b.img")
    ro = make_image(MiB, "ro.img")
    config = tmp_path / "exports.toml"
    config.write_text(
        f'[[export]]\nname = "a"\npath = "{a}"\n'
        f'[[export]]\nname = "b"\npath = "{b}"\ndescription = "second"\n'
        f'[[export]]\nname = "ro"\npath = "{ro}"\nread-only = true\n'
    )
    state = str(tmp_path / "state")
    return ["--config", str(config), "--state-dir", state, "--control", str(tmp_path / "ctl.sock")]


# --- the protocol itself ------------------------------------------------------------------


def test_greeting_negotiation_and_ids(server):
    sock, reader = raw_session(server.control)
    greeting = read_json(reader)
    version = greeting["QMP"]["version"]
    assert set(version["qemu"]) == {"major", "minor", "micro"}
    assert version["package"].startswith("nbdtrack ")
    assert greeting["QMP"]["capabilities"] == []

    sock.sendall(b'{"execute": "query-version", "id": "early"}')  # no newline, as qemu.qmp
    assert read_json(reader) == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
        "id": "early",
    }
    sock.sendall(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n')
    assert read_json(reader)["error"] == {
        "class": "GenericError",
        "desc": "Capability 'oob' not available",
    }
    sock.sendall(b'{"execute": "qmp_capabilities", "id": 1}')
    assert read_json(reader) == {"return": {}, "id": 1}
    sock.sendall(b'{"execute": "qmp_capabilities", "id": 2}')
    assert read_json(reader) == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Capabilities negotiation is already complete, command ignored",
        },
        "id": 2,
    }
    # Any JSON value is an id, echoed as sent; two commands in one write, split anywhere.
    sock.sendall(b'{"execute": "query-version", "id": {"n": [1, "x"]}}{"execute": "query-')
    sock.sendall(b'version", "id": null}')
    assert read_json(reader) == {"return": version, "id": {"n": [1, "x"]}}
    assert read_json(reader) == {"return": version, "id": None}
    sock.close()


def test_malformed_input_gets_an_error_and_the_session_goes_on(server):
    sock, reader = raw_session(server.control)
    read_json(reader)
    sock.sendall(b'{"execute": "qmp_capabilities"}')
    assert read_json(reader) == {"return": {}}
    cases = [
        (b'{"execute": "query-version",, "id": 1}', "JSON parse error, expecting"),
        (b'{"execute": nonsense}', "JSON parse error, expecting value"),
        (b"]", "JSON parse error,"),
        (b'{"execute": "query-version", "id": NaN}', "JSON parse error, invalid keyword 'NaN'"),
        (b'{"execute": "x", "execute": "y"}', "JSON parse error, duplicate key 'execute'"),
        (b'{"execute": "\xff"}', "JSON parse error, invalid UTF-8"),
        (b"42", "QMP input must be a JSON object"),
        (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
        (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
        (
            b'{"execute": "query-version", "arguments": []}',
            "QMP input member 'arguments' must be an object",
        ),
        (b'{"exec-oob": "query-version"}', "QMP input member 'exec-oob' is unexpected"),
    ]
    for text, desc in cases:
        sock.sendall(text + b"\n")
        reply = read_json(reader)
        assert reply["error"]["class"] == "GenericError", text
        assert reply["error"]["desc"].startswith(desc), (text, reply)
        assert "id" not in reply  # none could be read from these
        sock.sendall(b'{"execute": "query-version", "id": "after"}')
        assert read_json(reader)["id"] == "after"  # the session survived
    # A well-formed request with an id gets its id back on a dispatch error.
    sock.sendall(b'{"execute": "query-version", "foo": 1, "id": 7}')
    assert read_json(reader) == {
        "error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"},
        "id": 7,
    }
    sock.close()


def test_end_of_input_still_gets_its_replies(server):
    sock, reader = raw_session(server.control)
    read_json(reader)
    sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-block-exports"}')
    sock.shutdown(socket.SHUT_WR)  # as `echo ... | socat - UNIX:...` does
    assert read_json(reader) == {"return": {}}
    assert read_json(reader)["return"][0]["id"] == "disk"
    assert reader.readline() == b""  # then the server closes
    sock.close()


def test_qemu_qmp_async_client_and_commands(server):
    async def session() -> None:
        client = QMPClient("nbdtrack-test")
        await client.connect(server.control)
        assert client.greeting.QMP.version["package"].startswith("nbdtrack ")
        version = await client.execute("query-version")
        assert version["package"].startswith("nbdtrack ")
        names = {c["name"] for c in await client.execute("query-commands")}
        assert names == set(COMMANDS)
        assert {
            "qmp_capabilities",
            "query-version",
            "query-commands",
            "block-dirty-bitmap-add",
            "block-dirty-bitmap-remove",
            "block-dirty-bitmap-clear",
            "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable",
            "block-dirty-bitmap-merge",
            "transaction",
            "query-block-exports",
            "query-named-block-nodes",
            "nbdtrack-query-exports",
        } <= names
        await client.execute("block-dirty-bitmap-add", {"node": "disk", "name": "b1"})
        with pytest.raises(ExecuteError) as info:
            await client.execute("block-dirty-bitmap-add", {"node": "disk", "name": "b1"})
        assert info.value.error_class == "GenericError"
        assert str(info.value) == "Bitmap already exists: b1"
        with pytest.raises(ExecuteError) as info:
            await client.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert str(info.value) == "The command no-such-command has not been found"
        await client.disconnect()

    asyncio.run(session())


def test_several_clients_at_once(server):
    async def clients() -> None:
        connected = [QMPClient(f"c{i}") for i in range(6)]
        await asyncio.gather(*(c.connect(server.control) for c in connected))

        async def work(i: int, client: QMPClient) -> None:
            for k in range(5):
                args = {"node": "disk", "name": f"c{i}-{k}"}
                await client.execute("block-dirty-bitmap-add", args)
                await client.execute("query-named-block-nodes")

        # A client sending garbage gets its error; the others never notice.
        sock, reader = raw_session(server.control)
        read_json(reader)
        sock.sendall(b"{nonsense}\n")
        assert "JSON parse error" in read_json(reader)["error"]["desc"]
        await asyncio.gather(*(work(i, c) for i, c in enumerate(connected)))
        names = {
            b["name"] for b in (await connected[0].execute("nbdtrack-query-exports"))[0]["bitmaps"]
        }
        assert names == {f"c{i}-{k}" for i in range(6) for k in range(5)}
        sock.close()
        await asyncio.gather(*(c.disconnect() for c in connected))

    asyncio.run(clients())


class QMPContext:
    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> QMP:
        self.client = QMP(self.path)
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()


# --- bitmaps --------------------------------------------------------------------------------


def test_bitmap_lifecycle(qmp):
    assert qmp.bitmaps("disk") == {}
    assert qmp.ok("block-dirty-bitmap-add", {"node": "disk", "name": "b1"}) == {}
    b1 = qmp.bitmaps("disk")["b1"]
    assert {key: b1[key] for key in QEMU_BITMAP_KEYS} == {
        "name": "b1",
        "granularity": G64K,
        "count": 0,
        "recording": True,
        "busy": False,
        "persistent": True,  # nbdtrack's default; QEMU's is false
        "inconsistent": False,
    }
    assert set(b1) - set(QEMU_BITMAP_KEYS) == {"generation"}  # nbdtrack's own
    qmp.ok(
        "block-dirty-bitmap-add",
        {"node": "disk", "name": "t", "granularity": 4096, "persistent": False, "disabled": True},
    )
    t = qmp.bitmaps("disk")["t"]
    assert (t["granularity"], t["persistent"], t["recording"]) == (4096, False, False)
    qmp.ok("block-dirty-bitmap-disable", {"node": "disk", "name": "b1"})
    assert qmp.bitmaps("disk")["b1"]["recording"] is False
    qmp.ok("block-dirty-bitmap-enable", {"node": "disk", "name": "b1"})
    assert qmp.bitmaps("disk")["b1"]["recording"] is True
    qmp.ok("block-dirty-bitmap-clear", {"node": "disk", "name": "b1"})
    qmp.ok("block-dirty-bitmap-remove", {"node": "disk", "name": "t"})
    qmp.ok("block-dirty-bitmap-remove", {"node": "disk", "name": "b1"})
    assert qmp.bitmaps("disk") == {}


def test_counts_after_writes_and_clear_and_merge(server, qmp):
    uri = server.uri()
    qmp.ok("block-dirty-bitmap-add", {"node": "disk", "name": "b1"})
    qmp.ok("block-dirty-bitmap-add", {"node": "disk", "name": "off", "disabled": True})
    qmp.ok("block-dirty-bitmap-add", {"node": "disk", "name": "fine", "granularity": 4096})
    nbd_write(uri, 0, b"x")  # one byte dirties its whole granule
    nbd_write(uri, MiB + 100, b"y" * 4096)  # inside one 64K granule, two 4K ones
    nbd_write(uri, 10 * MiB, b"z" * (128 * KiB))  # two aligned granules
    bitmaps = qmp.bitmaps("disk")
    assert bitmaps["b1"]["count"] == 4 * G64K
    assert bitmaps["fine"]["count"] == (1 + 2 + 32) * 4096
    assert bitmaps["off"]["count"] == 0
    assert dirty_runs(uri, "b1") == [(0, G64K), (MiB, G64K), (10 * MiB, 2 * G64K)]

    # A bitmap added after the writes starts clean; merge ORs sources into it.
    qmp.ok("block-dirty-bitmap-add", {"node": "disk", "name": "copy"})
    qmp.ok("block-dirty-bitmap-merge", {"node": "disk", "target": "copy", "bitmaps": ["b1"]})
    assert qmp.bitmaps("disk")["copy"]["count"] == 4 * G64K
    qmp.ok("block-dirty-bitmap-clear", {"node": "disk", "name": "b1"})
    assert qmp.bitmaps("disk")["b1"]["count"] == 0
    assert dirty_runs(uri, "b1") == []
    nbd_write(uri, 20 * MiB, b"w")
    # Sources as QEMU also accepts them: {"node", "name"} objects, mixed with names.
    qmp.ok(
        "block-dirty-bitmap-merge",
        {"node": "disk", "target": "copy", "bitmaps": [{"node": "disk", "name": "b1"}, "b1"]},
    )
    assert qmp.bitmaps("disk")["copy"]["count"] == 5 * G64K
    assert dirty_runs(uri, "copy")[-1] == (20 * MiB, G64K)
    # The export's request counters saw every write, by name.
    (disk,) = [e for e in qmp.ok("nbdtrack-query-exports") if e["name"] == "disk"]
    assert disk["stats"]["requests"]["write"] == 4
    assert disk["stats"]["bytes"]["write"] == 1 + 4096 + 128 * KiB + 1
    assert disk["stats"]["requests"]["block_status"] == 3  # one per dirty_runs above


def test_bitmaps_added_over_qmp_are_nbd_contexts(server, qmp):
    uri = server.uri()
    qmp.ok("block-dirty-bitmap-add", {"node": "disk", "name": "live"})
    nbd_write(uri, 3 * MiB + 5, b"data")
    assert dirty_runs(uri, "live") == [(3 * MiB, G64K)]

    listed = subprocess.run(
        ["nbdinfo", "--list", "--json", uri], capture_output=True, text=True, check=True
    )
    [export] = json.loads(listed.stdout)["exports"]
    assert "qemu:dirty-bitmap:live" in export["contexts"]
    mapped = subprocess.run(
        ["nbdinfo", "--json", "--map=qemu:dirty-bitmap:live", uri],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [(e["offset"], e["length"], e["type"]) for e in json.loads(mapped.stdout)] == [
        (0, 3 * MiB, 0),
        (3 * MiB, G64K, 1),
        (3 * MiB + G64K, SIZE - 3 * MiB - G64K, 0),
    ]

    qmp.ok("block-dirty-bitmap-remove", {"node": "disk", "name": "live"})
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:live")
    h.connect_uri(uri)
    assert not h.can_meta_context("qemu:dirty-bitmap:live")
    h.shutdown()


def test_argument_errors_as_qemu_words_them(qmp):
    add = "block-dirty-bitmap-add"
    cases = [
        (add, {"name": "b"}, "Parameter 'node' is missing"),
        (add, {"node": "disk"}, "Parameter 'name' is missing"),
        (add, {"node": "disk", "name": "b", "x": 1}, "Parameter 'x' is unexpected"),
        (
            add,
            {"node": "disk", "name": "b", "granularity": "64K"},
            "Invalid parameter type for 'granularity', expected: integer",
        ),
        (
            add,
            {"node": "disk", "name": "b", "granularity": True},
            "Invalid parameter type for 'granularity', expected: integer",
        ),
        (
            add,
            {"node": "disk", "name": "b", "granularity": 65536.0},
            "Invalid parameter type for 'granularity', expected: integer",
        ),
        (
            add,
            {"node": "disk", "name": "b", "persistent": "yes"},
            "Invalid parameter type for 'persistent', expected: boolean",
        ),
        (add, {"node": 3, "name": "b"}, "Invalid parameter type for 'node', expected: string"),
        (
            add,
            {"node": "disk", "name": "b", "granularity": 1 << 32},
            "Parameter 'granularity' expects uint32_t",
        ),
        (
            "block-dirty-bitmap-merge",
            {"node": "disk", "target": "t", "bitmaps": "b"},
            "Invalid parameter type for 'bitmaps', expected: array",
        ),
        (
            "block-dirty-bitmap-merge",
            {"node": "disk", "target": "t", "bitmaps": ["a", 3]},
            "Invalid parameter type for 'bitmaps[1]', expected: BlockDirtyBitmapOrStr",
        ),
        (
            "block-dirty-bitmap-merge",
            {"node": "disk", "target": "t", "bitmaps": [{"node": "disk"}]},
            "Parameter 'bitmaps[0].name' is missing",
        ),
        (
            "query-named-block-nodes",
            {"flat": 1},
            "Invalid parameter type for 'flat', expected: boolean",
        ),
        ("query-version", {"x": 1}, "Parameter 'x' is unexpected"),
        ("transaction", {}, "Parameter 'actions' is missing"),
        (
            "transaction",
            {"actions": [{"type": "drive-backup", "data": {}}]},
            "Parameter 'actions[0].type' does not accept value 'drive-backup'",
        ),
        ("transaction", {"actions": [{"data": {}}]}, "Parameter 'actions[0].type' is missing"),
        (
            "transaction",
            {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "disk"}}]},
            "Parameter 'actions[0].data.name' is missing",
        ),
        (
            "transaction",
            {"actions": [], "properties": {"completion-mode": "never"}},
            "Parameter 'properties.completion-mode' does not accept value 'never'",
        ),
    ]
    for command, args, desc in cases:
        assert qmp.error(command, args) == generic(desc), (command, args)
    assert qmp.error("block-dirty-bitmap-frobnicate") == (
        "CommandNotFound",
        "The command block-dirty-bitmap-frobnicate has not been found",
    )
    assert qmp.bitmaps("disk") == {}  # none of these changed anything


def test_bitmap_errors_as_qemu_words_them(qmp):
    qmp.ok("block-dirty-bitmap-add", {"node": "disk", "name": "b1"})
    qmp.ok("block-dirty-bitmap-add", {"node": "disk", "name": "fine", "granularity": 4096})
    # QEMU words an unknown node one way for add, another for the rest.
    assert qmp.error("block-dirty-bitmap-add", {"node": "nope", "name": "b1"}) == generic(
        "Cannot find device='nope' nor node-name='nope'"
    )
    for command in ("remove", "clear", "enable", "disable"):
        assert qmp.error(f"block-dirty-bitmap-{command}", {"node": "nope", "name": "b1"}) == (
            generic("Node 'nope' not found")
        )
    for command in ("remove", "clear", "enable", "disable"):
        assert qmp.error(f"block-dirty-bitmap-{command}", {"node": "disk", "name": "x"}) == (
            generic("Dirty bitmap 'x' not found")
        )
    assert qmp.error("block-dirty-bitmap-add", {"node": "", "name": "b"}) == generic(
        "Cannot find device='' nor node-name=''"
    )
    assert qmp.error("block-dirty-bitmap-add", {"node": "disk", "name": "b1"}) == generic(
        "Bitmap already exists: b1"
    )
    for node in ("disk", "nope"):  # the name is checked first
        assert qmp.error("block-dirty-bitmap-add", {"node": node, "name": ""}) == generic(
            "Bitmap name cannot be empty"
        )
    for granularity in (0, 256, 1000, 65537):
        args = {"node": "disk", "name": "g", "granularity": granularity}
        assert qmp.error("block-dirty-bitmap-add", args) == generic(
            "Granularity must be power of 2, and at least 512"
        )
    merge = "block-dirty-bitmap-merge"
    assert qmp.error(merge, {"node": "disk", "target": "x", "bitmaps": ["b1"]}) == generic(
        "Dirty bitmap 'x' not found"
    )
    assert qmp.error(merge, {"node": "disk", "target": "b1", "bitmaps": ["x"]}) == generic(
        "Dirty bitmap 'x' not found"
    )
    error_class, desc = qmp.error(merge, {"node": "disk", "target": "b1", "bitmaps": ["fine"]})
    assert error_class == "GenericError"
    assert "granularity" in desc and "'fine'" in desc and "'b1'" in desc
    assert qmp.error(
        merge, {"node": "disk", "target": "b1", "bitmaps": [{"node": "nope", "name": "b1"}]}
    ) == generic("Node 'nope' not found")
    assert qmp.error(merge, {"node": "nope", "target": "b1", "bitmaps": []}) == generic(
        "Node 'nope' not found"
    )
    assert set(qmp.bitmaps("disk")) == {"b1", "fine"}


def test_merge_is_within_one_export(nbd_server, three_exports):
    server = nbd_server(*three_exports)
    with QMPContext(server.control) as q:
        q.ok("block-dirty-bitmap-add", {"node": "a", "name": "x"})
        q.ok("block-dirty-bitmap-add", {"node": "b", "name": "x"})
        args = {"node": "a", "target": "x", "bitmaps": [{"node": "b", "name": "x"}]}
        error_class, desc = q.error("block-dirty-bitmap-merge", args)
        assert error_class == "GenericError"
        assert "one export" in desc


def test_inconsistent_bitmap_only_removes(nbd_server, image, tmp_path):
    state = ("--state-dir", str(tmp_path / "state"))
    first = nbd_server(str(image), *state, export="disk")
    with QMPContext(first.control) as q:
        q.ok("block-dirty-bitmap-add", {"node": "disk", "name": "b1"})
        q.ok("block-dirty-bitmap-add", {"node": "disk", "name": "b2"})
    assert first.stop() == 0
    fd = os.open(image, os.O_WRONLY)  # a write nbdtrack could not see
    os.pwrite(fd, b"behind its back", 5 * MiB)
    os.close(fd)
    second = nbd_server(str(image), *state, export="disk")
    with QMPContext(second.control) as q:
        b1 = q.bitmaps("disk")["b1"]
        assert (b1["inconsistent"], b1["recording"]) == (True, False)
        refused = "Bitmap 'b1' is inconsistent and cannot be used; remove it and take a full backup"
        for command in ("clear", "enable", "disable"):
            assert q.error(f"block-dirty-bitmap-{command}", {"node": "disk", "name": "b1"}) == (
                generic(refused)
            )
        merge = {"node": "disk", "target": "b1", "bitmaps": ["b2"]}
        assert q.error("block-dirty-bitmap-merge", merge)[1].startswith("Bitmap 'b")
        q.ok("block-dirty-bitmap-remove", {"node": "disk", "name": "b1"})
        assert set(q.bitmaps("disk")) == {"b2"}


# --- transactions -------------------------------------------------------------------------------


def _action(kind: str, **data: Any) -> dict:
    return {"type": kind, "data": data}


def test_transaction_failing_half_way_changes_nothing(nbd_server, three_exports):
    server = nbd_server(*three_exports)
    with QMPContext(server.control) as q:
        q.ok("block-dirty-bitmap-add", {"node": "a", "name": "a1"})
        q.ok("block-dirty-bitmap-add", {"node": "b", "name": "b1"})
        q.ok("block-dirty-bitmap-add", {"node": "b", "name": "b2", "disabled": True})
        q.ok("block-dirty-bitmap-add", {"node": "b", "name": "fine", "granularity": 4096})
        nbd_write(server.uri("a"), 2 * MiB, b"a" * 100)
        nbd_write(server.uri("b"), 7 * MiB, b"b" * 100)
        before = {node: q.bitmaps(node) for node in ("a", "b")}
        runs_before = {
            "a": dirty_runs(server.uri("a"), "a1"),
            "b": dirty_runs(server.uri("b"), "b1"),
        }
        assert runs_before == {"a": [(2 * MiB, G64K)], "b": [(7 * MiB, G64K)]}

        good = [
            _action("block-dirty-bitmap-clear", node="a", name="a1"),
            _action("block-dirty-bitmap-add", node="b", name="new", granularity=4096),
            _action("block-dirty-bitmap-merge", node="b", target="b2", bitmaps=["b1"]),
            _action("block-dirty-bitmap-disable", node="b", name="b1"),
            _action("block-dirty-bitmap-remove", node="a", name="a1"),
            _action("block-dirty-bitmap-add", node="a", name="a1", disabled=True),
            _action("block-dirty-bitmap-clear", node="b", name="b1"),
        ]
        failures = [
            (
                _action("block-dirty-bitmap-clear", node="b", name="zz"),
                "Dirty bitmap 'zz' not found",
            ),
            (_action("block-dirty-bitmap-add", node="nope", name="x"), "Cannot find device="),
            (_action("block-dirty-bitmap-enable", node="nope", name="x"), "Node 'nope' not"),
            (_action("block-dirty-bitmap-add", node="b", name="b2"), "Bitmap already exists: b2"),
            (_action("block-dirty-bitmap-add", node="a", name="g", granularity=100), "Granularity"),
            (_action("abort"), "Transaction aborted using Abort action"),
            (
                _action("block-dirty-bitmap-merge", node="b", target="b2", bitmaps=["fine"]),
                "Bitmap 'fine' has granularity",
            ),
        ]
        for failing, desc in failures:
            for cut in (0, 3, len(good)):
                actions = good[:cut] + [failing] + good[cut:]
                error_class, text = q.error("transaction", {"actions": actions})
                assert error_class == "GenericError"
                assert text.startswith(desc), text
                assert {node: q.bitmaps(node) for node in ("a", "b")} == before
        assert dirty_runs(server.uri("a"), "a1") == runs_before["a"]
        assert dirty_runs(server.uri("b"), "b1") == runs_before["b"]

        # The first failing action is the one reported.
        actions = [
            _action("block-dirty-bitmap-enable", node="a", name="x1"),
            _action("block-dirty-bitmap-enable", node="nope", name="x2"),
        ]
        assert q.error("transaction", {"actions": actions}) == generic(
            "Dirty bitmap 'x1' not found"
        )

        # Then the same actions succeed, all of them, on both exports.
        assert (
            q.ok("transaction", {"actions": good, "properties": {"completion-mode": "grouped"}})
            == {}
        )
        after_a, after_b = q.bitmaps("a"), q.bitmaps("b")
        assert after_a["a1"]["recording"] is False and after_a["a1"]["count"] == 0
        assert after_b["new"]["granularity"] == 4096
        assert after_b["b2"]["count"] == G64K  # merged before b1 was cleared
        assert (after_b["b1"]["count"], after_b["b1"]["recording"]) == (0, False)
        assert q.ok("transaction", {"actions": []}) == {}
    # Committed means durable: a restart finds the same bitmaps.
    assert server.stop() == 0
    again = nbd_server(*three_exports)
    with QMPContext(again.control) as q:
        assert q.bitmaps("a") == after_a
        assert q.bitmaps("b") == after_b


def test_failed_transaction_is_not_persisted(nbd_server, image, tmp_path):
    state = ("--state-dir", str(tmp_path / "state"))
    first = nbd_server(str(image), *state, export="disk")
    with QMPContext(first.control) as q:
        q.ok("block-dirty-bitmap-add", {"node": "disk", "name": "keep"})
        nbd_write(first.uri(), 0, b"x")
        actions = [
            _action("block-dirty-bitmap-clear", node="disk", name="keep"),
            _action("block-dirty-bitmap-add", node="disk", name="gone"),
            _action("abort"),
        ]
        q.error("transaction", {"actions": actions})
    assert first.stop() == 0
    second = nbd_server(str(image), *state, export="disk")
    with QMPContext(second.control) as q:
        assert set(q.bitmaps("disk")) == {"keep"}
        assert q.bitmaps("disk")["keep"]["count"] == G64K


# --- queries ------------------------------------------------------------------------------------


def test_export_queries(nbd_server, three_exports, tmp_path):
    server = nbd_server(*three_exports)
    with QMPContext(server.control) as q:
        q.ok("block-dirty-bitmap-add", {"node": "b", "name": "b1", "granularity": 512})
        assert q.ok("query-block-exports") == [
            {"id": name, "type": "nbd", "node-name": name, "shutting-down": False}
            for name in ("a", "b", "ro")
        ]
        nodes = {n["node-name"]: n for n in q.ok("query-named-block-nodes", {"flat": True})}
        assert set(nodes) == {"a", "b", "ro"}
        assert nodes["ro"]["ro"] is True and nodes["a"]["ro"] is False
        assert nodes["ro"]["image"]["virtual-size"] == MiB
        assert nodes["b"]["file"] == str(tmp_path / "b.img")
        assert nodes["a"]["dirty-bitmaps"] == []
        assert [b["name"] for b in nodes["b"]["dirty-bitmaps"]] == ["b1"]

        exports = q.ok("nbdtrack-query-exports")
        assert [e["name"] for e in exports] == ["a", "b", "ro"]
        b = exports[1]
        assert b["size"] == SIZE and b["read-only"] is False
        assert b["description"] == "second"
        assert b["image"] == str(tmp_path / "b.img")
        assert b["bitmaps"][0]["granularity"] == 512
        assert exports[2]["read-only"] is True
        assert q.ok("nbdtrack-query-exports", {"name": "ro"}) == [exports[2]]
        assert q.error("nbdtrack-query-exports", {"name": "zz"}) == generic("Node 'zz' not found")


# --- the socket ---------------------------------------------------------------------------------


def test_socket_mode_and_removal(server):
    path = server.control
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert server.stop() == 0
    assert not os.path.exists(path)


def test_default_path_stale_and_live_sockets(nbd_server, image, make_image, tmp_path):
    state = tmp_path / "own-state"
    state.mkdir()
    default = state / "control.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(default))  # bound, never listening: what a killed server leaves
    stale.close()
    server = nbd_server(str(image), "--state-dir", str(state), export="disk")
    assert server.control == str(default)  # conftest left the default alone
    with QMPContext(str(default)) as q:
        assert q.ok("query-block-exports")[0]["id"] == "disk"
    # A second server on the same socket must not take it over.
    other = make_image(MiB, "other.img")
    result = subprocess.run(
        [sys.executable, "-m", "nbdtrack", "serve", str(other)]
        + ["--state-dir", str(state), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot make control socket" in result.stderr
    assert "in use" in result.stderr.splitlines()[-1]
    with QMPContext(str(default)) as q:  # still the first server's
        assert q.ok("query-block-exports")[0]["id"] == "disk"
    server.stop()
    assert not default.exists()


def test_control_in_config_file(nbd_server, make_image, tmp_path):
    image = make_image(MiB, "c.img")
    config = tmp_path / "c.toml"
    config.write_text(
        '[server]\ncontrol = "qmp.sock"\nstate-dir = "st"\n'
        f'[[export]]\nname = "c"\npath = "{image}"\n'
    )
    nbd_server("--config", str(config))
    with QMPContext(str(tmp_path / "qmp.sock")) as q:
        assert q.ok("query-block-exports")[0]["id"] == "c"


# --- in-process: framing, and a busy bitmap (a checkpoint's frozen one) --------------------------


def test_splitter_cuts_messages_by_brackets():
    s = JSONSplitter(limit=64)
    assert s.feed(b'  {"a": "}{\\"", "b": [1, {"c": 2}]}{"d"') == [
        b'{"a": "}{\\"", "b": [1, {"c": 2}]}'
    ]
    assert s.partial
    assert s.feed(b": 1}\r\n42 true\n") == [b'{"d": 1}', b"42", b"true"]
    assert not s.partial
    big = s.feed(b'{"x": "' + b"y" * 200 + b'"} {"ok": 1}')
    assert big == [TooLarge(209), b'{"ok": 1}']


def run_session(session: QMPSession, message: dict) -> dict:
    [event] = session.receive_data(json.dumps(message).encode())
    data = event.run() if isinstance(event, Execute) else event.data
    return json.loads(data)


def test_busy_bitmap_is_refused():
    tracker = DirtyTracker("mem", 4 * MiB)
    tracker.add("b1")
    tracker.add("b2")
    export = Export("mem", MemoryBackend(4 * MiB), tracker=tracker)
    session = QMPSession(Control(ExportRegistry([export])))
    assert run_session(session, {"execute": "qmp_capabilities"}) == {"return": {}}
    tracker.freeze("b1")  # what a checkpoint in flight does

    def call(command: str, **args: Any) -> dict:
        return run_session(session, {"execute": command, "arguments": args})

    for command in ("remove", "clear", "enable", "disable"):
        reply = call(f"block-dirty-bitmap-{command}", node="mem", name="b1")
        assert reply == {"error": {"class": "GenericError", "desc": BUSY}}
    assert (
        call("block-dirty-bitmap-merge", node="mem", target="b1", bitmaps=["b2"])["error"]["desc"]
        == BUSY
    )
    assert (
        call("block-dirty-bitmap-merge", node="mem", target="b2", bitmaps=["b1"])["error"]["desc"]
        == BUSY
    )
    actions = [
        _action("block-dirty-bitmap-add", node="mem", name="b3"),
        _action("block-dirty-bitmap-clear", node="mem", name="b1"),
    ]
    assert call("transaction", actions=actions)["error"]["desc"] == BUSY
    [node] = call("query-named-block-nodes")["return"]
    assert [(b["name"], b["busy"]) for b in node["dirty-bitmaps"]] == [("b1", True), ("b2", False)]
    tracker.unfreeze("b1", None)
    assert call("block-dirty-bitmap-clear", node="mem", name="b1") == {"return": {}}


def test_stop_with_clients_connected(server):
    idle, reader = raw_session(server.control)  # connected, never negotiates
    read_json(reader)
    with QMPContext(server.control) as q:
        q.ok("block-dirty-bitmap-add", {"node": "disk", "name": "b1"})
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 10
    assert reader.readline() == b""  # the server hung up on it
    idle.close()
    assert not os.path.exists(server.control)
