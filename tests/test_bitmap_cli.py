"""``nbdtrack bitmap``: every subcommand against a running server, its JSON, its errors.

The CLI is a thin client of the control socket, so these tests check what a user sees:
the table, ``--json`` output that parses, one-line errors with a non-zero exit and no
traceback, and the default socket path (STATE_DIR/control.sock).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import nbd
import pytest

from nbdtrack.cli_bitmap import format_size, parse_size

KiB = 1024
MiB = 1024 * KiB
G64K = 64 * KiB


def bitmap_cli(
    *args: str, control: str | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nbdtrack", "bitmap", *args]
    if control is not None:
        cmd += ["--control", control]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


def ok(*args: str, control: str) -> str:
    result = bitmap_cli(*args, control=control)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def as_json(*args: str, control: str) -> object:
    return json.loads(ok(*args, "--json", control=control))


def fails(*args: str, control: str | None) -> str:
    """The one error line of a failing command."""
    result = bitmap_cli(*args, control=control)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nbdtrack: error: ")
    assert result.stdout == ""
    return lines[0].removeprefix("nbdtrack: error: ")


def nbd_write(uri: str, offset: int, data: bytes) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(data, offset)
    h.shutdown()


def bitmaps(control: str, export: str = "disk") -> dict[str, dict]:
    [info] = as_json("list", export, control=control)
    return {b["name"]: b for b in info["bitmaps"]}


def test_add_list_and_table(server):
    ctl = server.control
    assert ok("list", control=ctl).splitlines() == [
        "EXPORT  BITMAP  GRANULARITY  DIRTY  STATE",
        "disk    -                           no bitmaps",
    ]
    assert ok("add", "disk", "daily", control=ctl) == "added bitmap 'daily' to export 'disk'\n"
    ok("add", "disk", "fine", "--granularity", "4K", "--transient", control=ctl)
    ok("add", "disk", "paused", "--granularity", "1MiB", "--disabled", control=ctl)
    nbd_write(server.uri(), 0, b"x" * 5000)
    table = ok("list", control=ctl).splitlines()
    assert table[0].split() == ["EXPORT", "BITMAP", "GRANULARITY", "DIRTY", "STATE"]
    rows = {line.split()[1]: line for line in table[1:]}
    assert rows["daily"].split() == ["disk", "daily", "64", "KiB", "64", "KiB", "recording"]
    assert rows["fine"].split()[2:] == ["4", "KiB", "8", "KiB", "recording,", "transient"]
    assert rows["paused"].split()[2:] == ["1", "MiB", "0", "B", "disabled"]

    exports = as_json("list", control=ctl)
    assert [e["name"] for e in exports] == ["disk"]
    info = {b["name"]: b for b in exports[0]["bitmaps"]}
    assert info["daily"]["count"] == G64K and info["daily"]["persistent"] is True
    assert info["fine"]["granularity"] == 4096 and info["fine"]["persistent"] is False
    assert info["paused"]["recording"] is False and info["paused"]["granularity"] == MiB
    assert exports[0]["size"] == 64 * MiB


def test_json_after_changes(server):
    ctl = server.control
    added = as_json("add", "disk", "b1", "--granularity", "65536", control=ctl)
    assert added["name"] == "disk"
    assert [(b["name"], b["granularity"]) for b in added["bitmaps"]] == [("b1", G64K)]
    disabled = as_json("disable", "disk", "b1", control=ctl)
    assert disabled["bitmaps"][0]["recording"] is False
    assert as_json("remove", "disk", "b1", control=ctl)["bitmaps"] == []


def test_clear_enable_disable_merge_remove(server):
    ctl = server.control
    uri = server.uri()
    ok("add", "disk", "a", control=ctl)
    ok("add", "disk", "b", control=ctl)
    ok("add", "disk", "sum", control=ctl)
    nbd_write(uri, 0, b"1")
    assert ok("disable", "disk", "b", control=ctl) == "disabled bitmap 'b' of export 'disk'\n"
    nbd_write(uri, MiB, b"2")  # b does not see this one
    assert ok("enable", "disk", "b", control=ctl) == "enabled bitmap 'b' of export 'disk'\n"
    nbd_write(uri, 2 * MiB, b"3")
    assert ok("clear", "disk", "sum", control=ctl) == "cleared bitmap 'sum' of export 'disk'\n"
    assert bitmaps(ctl)["sum"]["count"] == 0
    assert (
        ok("merge", "disk", "sum", "a", "b", control=ctl)
        == "merged 'a', 'b' into bitmap 'sum' of export 'disk'\n"
    )
    counts = {name: b["count"] for name, b in bitmaps(ctl).items()}
    assert counts == {"a": 3 * G64K, "b": 2 * G64K, "sum": 3 * G64K}
    assert ok("remove", "disk", "a", control=ctl) == "removed bitmap 'a' of export 'disk'\n"
    assert set(bitmaps(ctl)) == {"b", "sum"}


def test_errors_are_one_line(server):
    ctl = server.control
    ok("add", "disk", "b1", control=ctl)
    ok("add", "disk", "fine", "--granularity", "512", control=ctl)
    assert fails("add", "nope", "b1", control=ctl) == "no export named 'nope' on this server"
    assert fails("clear", "nope", "b1", control=ctl) == "no export named 'nope' on this server"
    assert fails("list", "nope", control=ctl) == "no export named 'nope' on this server"
    assert fails("add", "disk", "b1", control=ctl) == "Bitmap already exists: b1"
    for action in ("remove", "clear", "enable", "disable"):
        assert fails(action, "disk", "zz", control=ctl) == "Dirty bitmap 'zz' not found"
    assert fails("merge", "disk", "b1", "zz", control=ctl) == "Dirty bitmap 'zz' not found"
    assert fails("add", "disk", "g", "--granularity", "1000", control=ctl).startswith(
        "Granularity must be power of 2"
    )
    assert "granularity" in fails("merge", "disk", "b1", "fine", control=ctl)
    assert fails("add", "disk", "", control=ctl) == "Bitmap name cannot be empty"
    assert set(bitmaps(ctl)) == {"b1", "fine"}


def test_missing_or_dead_socket(tmp_path):
    missing = str(tmp_path / "nowhere.sock")
    message = fails("list", control=missing)
    assert message.startswith(f"no control socket at {missing}")
    assert "nbdtrack serve" in message
    dead = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(dead))  # a socket file nobody listens on
    sock.close()
    assert fails("add", "disk", "b1", control=str(dead)).startswith(
        f"nothing listens on control socket {dead}"
    )
    not_qmp = tmp_path / "plain"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(not_qmp))
    listener.listen(1)
    try:
        # Connected, but the greeting never comes: the CLI must not wait for ever.
        message = fails("list", "--timeout", "0.5", control=str(not_qmp))
    finally:
        listener.close()
    assert message == f"{not_qmp}: no answer in 0.5 s"


def test_default_control_path_is_in_the_state_dir(nbd_server, image, tmp_path):
    state = tmp_path / "st"
    nbd_server(str(image), "--state-dir", str(state), export="disk")
    # The CLI finds the socket where serve made it: STATE_DIR/control.sock, with the
    # state directory from systemd's STATE_DIRECTORY as serve computes it.
    result = bitmap_cli("add", "disk", "b1", env={"STATE_DIRECTORY": str(state)})
    assert result.returncode == 0, result.stderr
    result = bitmap_cli("list", "--json", env={"STATE_DIRECTORY": str(state)})
    assert json.loads(result.stdout)[0]["bitmaps"][0]["name"] == "b1"
    help_text = bitmap_cli("list", "--help", env={"STATE_DIRECTORY": str(state)}).stdout
    assert str(state / "control.sock") in help_text.replace("\n", "").replace(" ", "")


def test_bad_size_is_a_usage_error():
    result = bitmap_cli("add", "disk", "b1", "--granularity", "64X", control="/nonexistent")
    assert result.returncode == 2
    assert "invalid size '64X'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "size"),
    [("512", 512), ("64K", G64K), ("64k", G64K), ("64KiB", G64K), ("1M", MiB), ("2G", 2 << 30)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_format_size():
    assert [format_size(n) for n in (0, 512, G64K, 1536, 3 * MiB)] == [
        "0 B",
        "512 B",
        "64 KiB",
        "1.5 KiB",
        "3 MiB",
    ]
