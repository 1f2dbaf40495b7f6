"""The command line and the config file: clear one-line errors, flags over the file."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import nbd
import pytest

MiB = 1024 * 1024


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nbdtrack", *args], capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "no error message"
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_missing_image(tmp_path):
    result = run_cli("serve", str(tmp_path / "nope.img"), "--listen", "127.0.0.1:0")
    assert_one_line_error(result, "nope.img", "No such file")
    assert result.returncode == 1


def test_wrong_flag():
    result = run_cli("serve", "--no-such-flag")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_listen_address(image):
    result = run_cli("serve", str(image), "--listen", "127.0.0.1:99999")
    assert_one_line_error(result, "bad port")


def test_nothing_to_serve():
    assert_one_line_error(run_cli("serve"), "nothing to serve")


def test_port_in_use(image):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", str(image), "--listen", f"127.0.0.1:{port}")
    assert_one_line_error(result, "cannot listen", "in use")


def test_default_export_name_is_the_stem_and_empty_name_reaches_it(nbd_server, make_image):
    path = make_image(MiB, "vm-disk.raw")
    srv = nbd_server(str(path))
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(srv.uri(""))
    names = []
    h.opt_list(lambda name, description: names.append(name) or 0)
    assert names == ["vm-disk"]
    h.opt_go()
    assert h.get_size() == MiB
    assert h.get_canonical_export_name() == "vm-disk"
    h.shutdown()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_serves_several_exports_and_listeners(nbd_server, make_image, tmp_path):
    make_image(MiB, "a.img")
    make_image(2 * MiB, "b.img")
    sock = tmp_path / "cfg.sock"
    config = write_config(
        tmp_path / "nbdtrack.toml",
        f"""
[server]
listen = ["127.0.0.1:0"]
unix = ["{sock}"]

[[export]]
name = "alpha"
path = "a.img"
description = "first"

[[export]]
path = "b.img"
read-only = true
""",
    )
    srv = nbd_server("--config", str(config))
    for uri in (srv.uri("alpha"), f"nbd+unix:///alpha?socket={sock}"):
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.get_size() == MiB and not h.is_read_only()
        h.shutdown()
    h = nbd.NBD()
    h.connect_uri(srv.uri("b"))
    assert h.get_size() == 2 * MiB and h.is_read_only()
    h.shutdown()


@pytest.mark.parametrize(
    "body, needles",
    [
        ("bogus = 1\n", ["key 'bogus'", "unknown key"]),
        ("[server]\nlisten = 5\n", ["key 'server.listen'", "expected list"]),
        ("[server]\nmax-connections = true\n", ["server.max-connections", "expected int"]),
        ('[server]\nlisten = ["x:y"]\n', ["server.listen[0]", "bad port"]),
        ('[[export]]\npath = "missing.img"\n', ["export[0].path", "does not exist"]),
        ('[[export]]\nname = "x"\n', ["export[0].path", "missing"]),
        ('[[export]]\npath = "a.img"\nsize = 3\n', ["export[0].size", "unknown key"]),
        (
            '[[export]]\npath = "a.img"\n[[export]]\npath = "a.img"\n',
            ["export[1].name", "duplicate export name 'a'"],
        ),
        ("[server\n", ["not valid TOML"]),
    ],
)
def test_config_errors_name_file_key_and_reason(tmp_path, make_image, body, needles):
    make_image(MiB, "a.img")
    config = write_config(tmp_path / "bad.toml", body)
    result = run_cli("serve", "--config", str(config))
    assert_one_line_error(result, str(config), *needles)


def test_missing_config_file(tmp_path):
    result = run_cli("serve", "--config", str(tmp_path / "none.toml"))
    assert_one_line_error(result, "none.toml", "cannot read")


def test_flags_win_over_the_config(nbd_server, make_image, tmp_path):
    make_image(MiB, "a.img")
    config = write_config(
        tmp_path / "c.toml", '[server]\nlisten = ["127.0.0.1:1"]\n[[export]]\npath = "a.img"\n'
    )
    # --listen replaces the file's listeners (port 1 would fail as non-root or be refused)
    srv = nbd_server("--config", str(config), "--listen", "127.0.0.1:0")
    h = nbd.NBD()
    h.connect_uri(srv.uri("a"))
    assert h.get_size() == MiB
    h.shutdown()
    assert ":1\n" not in srv.log


def test_backup_imports_only_its_own_modules():
    """A one-shot command loads its own module, not the server's: no config file parser,
    limits, TLS or fault rules for ``backup`` (each costs a backup milliseconds)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "nbdtrack", "backup", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and "SOURCE_URI" in result.stdout
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "nbdtrack.backup.job" in imported  # the list is read right
    server_side = {
        "nbdtrack.config",
        "nbdtrack.server.limits",
        "nbdtrack.server.tls",
        "nbdtrack.storage.faults",
        "nbdtrack.cli_serve",
        "nbdtrack.cli_security",
        "nbdtrack.service",
        "tomllib",
    }
    assert not server_side & imported


def test_help_of_serve_and_of_every_command():
    serve = run_cli("serve", "--help")
    assert serve.returncode == 0
    assert "--tls" in serve.stdout and "--event-loop" in serve.stdout
    top = run_cli("--help")
    assert top.returncode == 0
    listed = [line.split()[0] for line in top.stdout.splitlines() if line.startswith("    ")]
    commands = ["serve", "check-config", "bitmap", "backup", "restore", "verify", "merge"]
    assert [word for word in listed if word in commands] == commands
    assert "back up an NBD export into a repository of qcow2 chains" in top.stdout
