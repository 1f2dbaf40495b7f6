"""restore, verify and merge on real chains made by ``nbdtrack backup`` from a live server.

Each chain is built the way a user builds one: ``nbdtrack serve IMAGE --bitmap b``, writes
through libnbd between backups, ``nbdtrack backup SOURCE REPO --bitmap b --control SOCK``.
At every backup instant (writes stopped) the image file is copied: the copies are the truth
every restore point is compared with, byte for byte and with ``qemu-img compare``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import pytest
from blake3 import blake3

from nbdtrack.backup import merge as merge_module
from nbdtrack.backup.merge import JOURNAL, merge
from nbdtrack.backup.qcow2 import Qcow2Reader
from nbdtrack.backup.repository import Chain, Repository
from nbdtrack.backup.restore import restore
from nbdtrack.backup.verify import check_image, verify
from nbdtrack.client.qmp import QMPControlClient
from tests.conftest import ServerProcess

KiB = 1024
MiB = 1024 * KiB
CS = 64 * KiB
SIZE = 8 * MiB + 70000  # neither a multiple of the cluster size nor of 512


def nbdtrack(*args: object, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "nbdtrack", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def qemu_img(*args: object, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=120
    )
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def json_lines(text: str) -> list[dict]:
    """Every stdout line of --progress json must be one JSON object."""
    return [json.loads(line) for line in text.splitlines()]


def nbd_ops(uri: str, ops: list[tuple]) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for op in ops:
            if op[0] == "write":
                h.pwrite(op[2], op[1])
            elif op[0] == "zero":
                h.zero(op[2], op[1])
            else:
                h.trim(op[2], op[1])
        h.flush()
    finally:
        h.shutdown()


def random_ops(rng: random.Random, count: int) -> list[tuple]:
    ops: list[tuple] = []
    for _ in range(count):
        kind = rng.choice(["write", "write", "write", "zero", "trim"])
        length = rng.choice([1, 511, 4096, CS, 3 * CS + 17, rng.randrange(1, 400 * KiB)])
        offset = rng.randrange(0, SIZE - length)
        if rng.random() < 0.3:
            offset -= offset % CS
        if kind == "write":
            ops.append(("write", offset, rng.randbytes(length)))
        else:
            ops.append((kind, offset, length))
    return ops


@dataclass
class Built:
    server: ServerProcess
    image: Path
    repo: Path
    tmp: Path
    ids: list[str] = field(default_factory=list)
    copies: dict[str, Path] = field(default_factory=dict)  # id -> raw image at that instant

    @property
    def chain(self) -> Chain:
        return Repository(str(self.repo)).chain("disk")

    def backup(self, mode: str = "auto") -> str:
        proc = nbdtrack(
            "backup",
            self.server.uri(),
            self.repo,
            "--bitmap",
            "b",
            "--control",
            self.server.control,
            "--mode",
            mode,
            "--progress",
            "json",
        )
        result = json_lines(proc.stdout)[-1]
        assert result["event"] == "result"
        backup_id = result["id"]
        copy = self.tmp / f"copy-{len(self.ids)}.img"
        shutil.copyfile(self.image, copy)  # no writes run: this is the backup instant
        self.ids.append(backup_id)
        self.copies[backup_id] = copy
        return backup_id

    def write(self, ops: list[tuple]) -> None:
        nbd_ops(self.server.uri(), ops)


def build(nbd_server, tmp_path: Path, modes: list[str], seed: int = 1) -> Built:
    """A chain with one backup per entry of ``modes``, random writes before each."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    server = nbd_server(str(image), "--bitmap", "b", export="disk")
    built = Built(server, image, tmp_path / "repo", tmp_path)
    rng = random.Random(seed)
    for n, mode in enumerate(modes):
        ops = random_ops(rng, 12)
        if n == 0:  # the tail cluster, past the last multiple of 512
            ops.append(("write", SIZE - 5000, rng.randbytes(5000)))
        built.write(ops)
        built.backup(mode)
    return built


@pytest.fixture
def chain4(nbd_server, tmp_path: Path) -> Built:
    """full + 3 incrementals."""
    built = build(nbd_server, tmp_path, ["full", "incremental", "incremental", "incremental"])
    assert [b.mode for b in built.chain.backups] == ["full"] + ["incremental"] * 3
    return built


def assert_restores(built: Built, ids: list[str] | None = None) -> None:
    """Every restore point in ``ids`` (default: all in the manifest) equals its copy."""
    ids = ids if ids is not None else [b.id for b in built.chain.backups]
    for backup_id in ids:
        out = built.tmp / f"check-{backup_id}.img"
        restore(str(built.repo), str(out), until=backup_id, force=True)
        assert out.read_bytes() == built.copies[backup_id].read_bytes(), backup_id
        out.unlink()


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


# --- restore ------------------------------------------------------------------------------
def test_restore_every_point_to_raw_qcow2_and_an_nbd_export(chain4: Built, nbd_server) -> None:
    repo = chain4.repo
    for backup_id in chain4.ids:
        copy = chain4.copies[backup_id]
        raw = chain4.tmp / f"{backup_id}.img"
        nbdtrack("restore", repo, raw, "--until", backup_id, "--progress", "none")
        assert raw.read_bytes() == copy.read_bytes()
        assert raw.stat().st_size == SIZE
        assert raw.stat().st_blocks * 512 < SIZE  # sparse: holes left where nothing is
        qemu_img("compare", "-f", "raw", "-F", "raw", raw, copy)

        qcow = chain4.tmp / f"{backup_id}.qcow2"
        nbdtrack("restore", repo, qcow, "--until", backup_id)
        qemu_img("check", qcow)
        info = json.loads(qemu_img("info", "--output=json", qcow).stdout)
        assert info["format"] == "qcow2" and "backing-filename" not in info
        qemu_img("compare", "-f", "qcow2", "-F", "raw", qcow, copy)

        forced = chain4.tmp / f"{backup_id}.raw-from-name"  # --format wins over the name
        nbdtrack("restore", repo, forced, "--until", backup_id, "--format", "qcow2")
        qemu_img("compare", "-f", "qcow2", "-F", "raw", forced, copy)

    # Onto a second nbdtrack export full of garbage, newest first, then every older
    # point: whatever a point says is zero must be zeroed over the previous contents.
    target = chain4.tmp / "target.img"
    target.write_bytes(b"\xaa" * SIZE)
    other = nbd_server(str(target), export="target")
    for backup_id in reversed(chain4.ids):
        proc = nbdtrack("restore", repo, other.uri(), "--until", backup_id, "--progress", "json")
        events = json_lines(proc.stdout)
        assert events[-1]["event"] == "result" and events[-1]["id"] == backup_id
        assert events[-1]["format"] == "nbd" and events[-1]["bytes_zeroed"] > 0
        assert any(e["event"] == "progress" for e in events)
        assert target.read_bytes() == chain4.copies[backup_id].read_bytes(), backup_id
    qemu_img("compare", "-f", "raw", "-F", "raw", target, chain4.copies[chain4.ids[0]])

    # The default is the newest point; an existing target needs --force.
    newest = chain4.tmp / "newest.img"
    nbdtrack("restore", repo, newest)
    assert newest.read_bytes() == chain4.copies[chain4.ids[-1]].read_bytes()
    proc = nbdtrack("restore", repo, newest, "--until", chain4.ids[0], ok=False)
    assert proc.returncode == 1 and "exists; use --force" in proc.stderr
    nbdtrack("restore", repo, newest, "--until", chain4.ids[0], "--force")
    assert newest.read_bytes() == chain4.copies[chain4.ids[0]].read_bytes()
    assert not [p for p in chain4.tmp.iterdir() if p.name.endswith(".part")]


def check_one_line_errors(cases: list[tuple[list, str]]) -> None:
    for args, message in cases:
        proc = nbdtrack(*args, ok=False)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nbdtrack: error: "), (args, lines)
        assert message in lines[0], (args, lines)


def test_errors_are_one_line(chain4: Built, tmp_path: Path, nbd_server) -> None:
    repo = chain4.repo
    cases = [
        (["restore", tmp_path / "nothing", tmp_path / "x.img"], "no such repository"),
        (["restore", repo, tmp_path / "x.img", "--until", "nope"], "no backup 'nope'"),
        (["restore", repo, tmp_path / "x.img", "--export", "vm9"], "no backups of export 'vm9'"),
        (["restore", repo, tmp_path], "is a directory"),
        (["restore", repo, tmp_path / "no" / "x.img"], "no such directory"),
        (["restore", repo, "http://example.com/disk"], "not an NBD URI"),
        (["restore", repo, "nbd://127.0.0.1:1/disk"], "cannot connect"),
        (["restore", repo, "/dev/null", "--force"], "not a regular file"),
        (["verify", tmp_path / "nothing"], "no such repository"),
        (["verify", repo, "--export", "vm9"], "no backups of export 'vm9'"),
        (["merge", repo, "--export", "vm9"], "no backups of export 'vm9'"),
        (["merge", repo, "--keep", "-1"], "--keep must be 0 or more"),
    ]
    small = tmp_path / "small.img"
    small.write_bytes(bytes(MiB))
    ro = tmp_path / "ro.img"
    ro.write_bytes(bytes(SIZE))
    small_server = nbd_server(str(small), export="small")
    ro_server = nbd_server(str(ro), "--read-only", export="ro")
    cases += [
        (["restore", repo, small_server.uri()], f"the backup needs {SIZE}"),
        (["restore", repo, ro_server.uri()], "read-only"),
    ]
    check_one_line_errors(cases)
    # A second chain: now --export is needed.
    shutil.copytree(repo / "disk", repo / "other")
    manifest = repo / "other" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["export"] = "other"
    manifest.write_text(json.dumps(data))
    check_one_line_errors(
        [
            (["restore", repo, tmp_path / "y.img"], "choose one with --export"),
            (["merge", repo], "choose one with --export"),
        ]
    )
    assert not (tmp_path / "x.img").exists()
    # With --export, both chains restore and verify.
    nbdtrack("restore", repo, tmp_path / "y.img", "--export", "other")
    assert (tmp_path / "y.img").read_bytes() == chain4.copies[chain4.ids[-1]].read_bytes()
    assert "8 images in 2 chains" in nbdtrack("verify", repo).stdout


# --- verify -------------------------------------------------------------------------------
def test_verify_passes_then_finds_a_flipped_byte_and_names_the_image(chain4: Built) -> None:
    repo = chain4.repo
    proc = nbdtrack("verify", repo)
    assert "4 images in 1 chains" in proc.stdout and "no problems" in proc.stdout
    events = json_lines(nbdtrack("verify", repo, "--progress", "json").stdout)
    assert events[-1] == {
        "event": "result",
        "ok": True,
        "problems": 0,
        "chains": 1,
        "images": 4,
        "clusters": events[-1]["clusters"],
        "compared": 0,
    }
    chain = chain4.chain
    for record in (chain.backups[0], chain.backups[2]):  # the full, an incremental
        path = Path(chain.image_path(record))
        with Qcow2Reader.open(path) as reader:
            data = next(c for c in reader.allocation() if c.host_offset)
            l1_offset = reader.l1_table_offset
        places = {
            "data": data.host_offset + 1234,
            "header": 40,  # the top byte of the L1 table offset
            "L1 table": l1_offset + 7,  # the low byte of the first L1 entry
        }
        for what, offset in places.items():
            flip(path, offset, 0x10)
            proc = nbdtrack("verify", repo, ok=False)
            assert proc.returncode == 1, (record.id, what)
            lines = proc.stdout.strip().splitlines()
            assert lines and all(line.startswith(str(path) + ": ") for line in lines), lines
            assert "problem" in proc.stderr
            flip(path, offset, 0x10)
        assert "no problems" in nbdtrack("verify", repo).stdout


def metadata_offsets(path: Path) -> dict[str, list[int]]:
    """Byte offsets of every metadata structure an image has, by kind."""
    with Qcow2Reader.open(path) as r:
        cs = r.cluster_size
        l1 = Path(path).read_bytes()[r.l1_table_offset : r.l1_table_offset + r.l1_size * 8]
        l2_offsets = [
            int.from_bytes(l1[i : i + 8], "big") & 0x00FFFFFFFFFFFE00 for i in range(0, len(l1), 8)
        ]
        raw = Path(path).read_bytes()
        reftable = r.refcount_table_offset
        first_block = int.from_bytes(raw[reftable : reftable + 8], "big")
        header_end = r.cluster_size
        used_header = max(i for i in range(header_end) if raw[i]) + 1
    return {
        "header": list(range(0, used_header + 8)),
        "L1": list(range(r.l1_table_offset, r.l1_table_offset + 64)),
        "L2": [o + i for o in l2_offsets if o for i in range(0, 8 * 40)],
        "reftable": list(range(reftable, reftable + 32)),
        "refblock": list(range(first_block, first_block + 2 * (len(raw) // cs) + 16)),
        "padding": [cs - 1, r.l1_table_offset + cs - 1, reftable + cs - 1],
    }


def test_every_single_byte_flip_in_metadata_or_data_is_found(chain4: Built) -> None:
    """Systematically: every byte of the header, the L1 table's first entries, the first
    L2 entries, the refcount table and block, padding, and random data bytes, with a
    random bit pattern each time; check_image must report the image."""
    chain = chain4.chain
    rng = random.Random(7)
    for record in (chain.backups[0], chain.backups[-1]):
        path = Path(chain.image_path(record))
        assert check_image(chain, record)[0] == []
        places = metadata_offsets(path)
        with Qcow2Reader.open(path) as reader:
            hosts = [c.host_offset for c in reader.allocation() if c.host_offset]
        places["data"] = [rng.choice(hosts) + rng.randrange(CS) for _ in range(40)]
        missed = []
        for kind, offsets in places.items():
            for offset in offsets:
                mask = rng.choice([0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF])
                flip(path, offset, mask)
                try:
                    problems, _ = check_image(chain, record)
                finally:
                    flip(path, offset, mask)
                if not problems:
                    missed.append((kind, offset, mask))
                assert all(p.image == str(path) for p in problems)
        assert not missed, missed
        assert check_image(chain, record)[0] == []


def test_verify_source_against_the_live_export_and_a_checkpoint(chain4: Built) -> None:
    repo, server = chain4.repo, chain4.server
    proc = nbdtrack("verify", repo, "--source", server.uri())
    assert f"{SIZE} bytes compared with the source: no problems" in proc.stdout
    # A checkpoint's snapshot export shows the image as it is now, whatever comes later.
    with QMPControlClient(server.control) as qmp:
        ckpt = qmp.execute(
            "nbdtrack-checkpoint-start", {"node": "disk", "bitmap": "b", "sync": "never"}
        )
        try:
            chain4.write([("write", 123457, b"\x99"), ("write", 5 * MiB + 3, b"\x98" * 70000)])
            nbdtrack("verify", repo, "--source", server.uri(ckpt["export"]))
            proc = nbdtrack("verify", repo, "--source", server.uri(), ok=False)
        finally:
            qmp.execute(
                "nbdtrack-checkpoint-abort", {"node": "disk", "checkpoint": ckpt["checkpoint"]}
            )
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    before = chain4.copies[chain4.ids[-1]].read_bytes()
    expected = [123457] if before[123457] != 0x99 else []
    first = next(i for i in range(70000) if before[5 * MiB + 3 + i] != 0x98)
    expected.append(5 * MiB + 3 + first)
    assert [int(line.split("offset ")[1].split(":")[0]) for line in lines] == expected
    assert all(line.startswith(f"disk@{chain4.ids[-1]}: offset ") for line in lines)


# --- merge --------------------------------------------------------------------------------
def backing_chain(path: str) -> list[dict]:
    return json.loads(qemu_img("info", "--backing-chain", "--output=json", path).stdout)


def check_repository(built: Built) -> None:
    """verify clean, qemu-img check clean, every remaining restore point identical."""
    assert "no problems" in nbdtrack("verify", built.repo).stdout
    chain = built.chain
    for record in chain.backups:
        qemu_img("check", chain.image_path(record))
        qemu_img(
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            chain.image_path(record),
            built.copies[record.id],
        )
    assert_restores(built)
    on_disk = sorted(p.name for p in Path(chain.path).iterdir() if p.suffix == ".qcow2")
    assert on_disk == sorted(b.file for b in chain.backups)


def test_merge_keep_1_then_keep_0(chain4: Built) -> None:
    full, i1, i2, i3 = chain4.ids
    proc = nbdtrack("merge", chain4.repo, "--keep", "1", "--progress", "json")
    result = json_lines(proc.stdout)[-1]
    assert result["steps"] == [{"full": full, "target": i2, "folded": [full, i1], "rebased": []}]
    chain = chain4.chain
    assert [(b.id, b.mode, b.parent) for b in chain.backups] == [
        (i2, "full", None),
        (i3, "incremental", i2),
    ]
    check_repository(chain4)
    infos = backing_chain(chain.image_path(chain.get(i3)))
    assert [os.path.basename(i["filename"]) for i in infos] == [
        chain.get(i3).file,
        chain.get(i2).file,
    ]
    assert "backing-filename" not in infos[1]

    # Nothing more to fold with --keep 1.
    assert "nothing to merge" in nbdtrack("merge", chain4.repo, "--keep", "1").stdout
    proc = nbdtrack("merge", chain4.repo)
    assert f"merged {i2} into {i3} (now a full backup)" in proc.stdout
    chain = chain4.chain
    assert [(b.id, b.mode, b.parent) for b in chain.backups] == [(i3, "full", None)]
    check_repository(chain4)
    assert len(backing_chain(chain.image_path(chain.get(i3)))) == 1

    # The chain goes on: the next backup continues it as an incremental of the merged full.
    chain4.write([("write", 3 * MiB, b"\x77" * 100000)])
    i4 = chain4.backup()
    record = chain4.chain.get(i4)
    assert (record.mode, record.parent) == ("incremental", i3)
    check_repository(chain4)


def test_merge_rewrites_differentials_whose_full_is_folded(
    nbd_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = build(nbd_server, tmp_path, ["full", "differential", "differential", "incremental"])
    full, d1, d2, i3 = built.ids
    chain = built.chain
    assert [(b.mode, b.parent) for b in chain.backups] == [
        ("full", None),
        ("differential", full),
        ("differential", full),
        ("incremental", d2),
    ]
    plan = merge(str(built.repo), dry_run=True)
    assert [(s.target, s.folded, s.rebased) for s in plan] == [(i3, [full, d2], [d1])]
    assert built.chain.backups == chain.backups  # a dry run changes nothing
    # Killed after the renames, before the manifest: the rewritten differential and the
    # merged image restore correctly under the old manifest too.
    with monkeypatch.context() as patch:
        patch.setattr(Chain, "save", _raise)
        with pytest.raises(Crash):
            merge(str(built.repo))
    assert [b.id for b in built.chain.backups] == built.ids
    assert_restores(built)
    merge(str(built.repo))  # finishes the journal
    chain = built.chain
    assert [(b.id, b.mode, b.parent) for b in chain.backups] == [
        (d1, "differential", i3),
        (i3, "full", None),
    ]
    check_repository(built)
    infos = backing_chain(chain.image_path(chain.get(d1)))
    assert [os.path.basename(i["filename"]) for i in infos] == [
        chain.get(d1).file,
        chain.get(i3).file,
    ]


def test_merge_refuses_a_damaged_image_and_changes_nothing(chain4: Built) -> None:
    chain = chain4.chain
    record = chain.backups[1]
    path = Path(chain.image_path(record))
    with Qcow2Reader.open(path) as reader:
        host = next(c.host_offset for c in reader.allocation() if c.host_offset)
    flip(path, host + 99)

    def files() -> dict[str, bytes]:  # the chain's lock file records who held it last
        return {
            p.name: p.read_bytes() for p in (chain4.repo / "disk").iterdir() if p.name != ".lock"
        }

    before = files()
    proc = nbdtrack("merge", chain4.repo, ok=False)
    assert proc.returncode == 1 and "does not match the manifest" in proc.stderr
    assert str(path) in proc.stderr
    assert files() == before


class Crash(Exception):
    pass


@pytest.mark.parametrize(
    "when", ["before-journal", "after-journal", "after-renames", "after-manifest"]
)
def test_merge_crash_at_any_step_restores_correctly_and_recovers(
    chain4: Built, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Kill the merge at each step: every restore point the manifest then lists restores
    byte for byte, verify says what is going on, and the next merge finishes the job."""
    repo = str(chain4.repo)
    if when == "before-journal":
        monkeypatch.setattr(merge_module, "write_atomically", _raise)
    elif when == "after-journal":
        monkeypatch.setattr(merge_module, "_finish", _raise)
    elif when == "after-renames":
        monkeypatch.setattr(Chain, "save", _raise)
    else:
        original = Chain.save

        def save_then_crash(self: Chain) -> None:
            original(self)
            raise Crash

        monkeypatch.setattr(Chain, "save", save_then_crash)
    with pytest.raises(Crash):
        merge(repo, keep=1)
    monkeypatch.undo()
    assert_restores(chain4)
    report = verify(repo)
    journal = (chain4.repo / "disk" / JOURNAL).exists()
    assert journal == (when != "before-journal")
    if journal:
        assert any("interrupted" in p.what for p in report.problems)
    else:
        assert report.ok and report.notes == []  # the temp files are no images
    steps = merge(repo, keep=1)
    chain = chain4.chain
    assert [b.id for b in chain.backups] == chain4.ids[2:]
    assert chain.backups[0].mode == "full"
    assert len(steps) == (0 if journal else 1)
    check_repository(chain4)
    assert not [p for p in (chain4.repo / "disk").iterdir() if p.name.endswith(".merge-tmp")]


def _raise(*args: object, **kwargs: object) -> None:
    raise Crash


def test_hashes_live_beside_each_image(chain4: Built) -> None:
    """Each image's cluster hashes are in IMAGE.hashes.json, not in the manifest (which
    every backup reads); a merge moves and removes them with the images; a missing one
    is a problem verify names; a format-1 manifest (hashes inside) still verifies and
    moves them out when the chain is next saved."""
    chain = chain4.chain
    directory = Path(chain.path)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["version"] == 2 and all("hashes" not in b for b in manifest["backups"])
    for record in chain.backups:
        sidecar = directory / (record.file + ".hashes.json")
        hashes = json.loads(sidecar.read_text())
        assert hashes["algorithm"] == "blake3-128"
        assert hashes["clusters"] and hashes["clusters"] == chain.hashes(record)

    # A format-1 manifest: (BLAKE2b) hashes inline, no side files.
    v1 = dict(manifest, version=1)
    inline = {}
    for record in chain.backups:
        sidecar = directory / (record.file + ".hashes.json")
        _rehash_as_first_format(chain, record)
        inline[record.id] = json.loads(sidecar.read_text())
        sidecar.unlink()
    v1["backups"] = [dict(b, hashes=inline[b["id"]]) for b in v1["backups"]]
    (directory / "manifest.json").write_text(json.dumps(v1))
    assert "no problems" in nbdtrack("verify", chain4.repo).stdout
    chain4.chain.save()
    assert json.loads((directory / "manifest.json").read_text()) == manifest
    assert "no problems" in nbdtrack("verify", chain4.repo).stdout

    # One missing: verify names the file and fails.
    last = directory / (chain.backups[-1].file + ".hashes.json")
    saved = last.read_bytes()
    last.unlink()
    proc = nbdtrack("verify", chain4.repo, ok=False)
    assert proc.returncode == 1 and f"{last}: missing" in proc.stdout
    last.write_bytes(saved)

    # A merge leaves exactly one side file per image.
    nbdtrack("merge", chain4.repo, "--keep", "0")
    chain = chain4.chain
    assert sorted(p.name for p in directory.glob("*.hashes.json")) == sorted(
        b.file + ".hashes.json" for b in chain.backups
    )
    check_repository(chain4)


def _rehash_as_first_format(chain: Chain, record) -> None:
    """Rewrite a backup's hashes file as the first repositories did: a bare object of
    BLAKE2b-128 hashes, computed here from the image's clusters."""
    sidecar = Path(chain.hashes_path(record.file))
    sidecar.write_text(json.dumps(_rehashed(chain, record, _blake2b_128)))


def _rehash_as_sha256(chain: Chain, record) -> None:
    """Rewrite a backup's hashes file as repositories made before BLAKE3 hold it."""
    clusters = _rehashed(chain, record, lambda data: hashlib.sha256(data).hexdigest()[:32])
    sidecar = Path(chain.hashes_path(record.file))
    sidecar.write_text(json.dumps({"algorithm": "sha256-128", "clusters": clusters}))


def _blake2b_128(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _rehashed(chain: Chain, record, hash_of) -> dict[str, str]:
    """The backup's cluster hashes made with ``hash_of`` from the image's clusters, after
    checking that each recorded one is BLAKE3 cut to 128 bits."""
    recorded = json.loads(Path(chain.hashes_path(record.file)).read_text())["clusters"]
    out = {}
    with Qcow2Reader.open(chain.image_path(record)) as reader:
        for key, value in recorded.items():
            if value == "zero":
                out[key] = value
                continue
            offset = int(key) * CS
            data = reader.read(offset, min(CS, reader.virtual_size - offset))
            assert blake3(data).hexdigest(16) == value
            out[key] = hash_of(data)
    return out


def test_hashes_name_their_algorithm_and_older_ones_still_verify_and_merge(
    chain4: Built,
) -> None:
    """New hashes are BLAKE3/128 and say so; a repository hashed with BLAKE2b-128 before
    the algorithm was recorded, or with SHA-256/128 before BLAKE3, verifies (and still
    finds damage), and a merge of old and new images records the new algorithm; an
    unknown algorithm is a named problem."""
    chain = chain4.chain
    sidecars = [Path(chain.hashes_path(record.file)) for record in chain.backups]
    new = [path.read_text() for path in sidecars]
    for record in chain.backups:
        _rehash_as_first_format(chain, record)
    assert "no problems" in nbdtrack("verify", chain4.repo).stdout
    full = Path(chain.image_path(chain.backups[0]))
    saved = full.read_bytes()
    with Qcow2Reader.open(str(full)) as reader:
        data_at = next(c.host_offset for c in reader.allocation() if c.host_offset)
    flip(full, data_at + 100)
    proc = nbdtrack("verify", chain4.repo, ok=False)
    assert proc.returncode == 1 and "does not match the manifest's hash" in proc.stdout
    full.write_bytes(saved)

    # SHA-256/128, as repositories made before BLAKE3 hold them.
    for path, text in zip(sidecars, new, strict=True):
        path.write_text(text)
    for record in chain.backups:
        _rehash_as_sha256(chain, record)
    assert "no problems" in nbdtrack("verify", chain4.repo).stdout
    flip(full, data_at + 100)
    proc = nbdtrack("verify", chain4.repo, ok=False)
    assert proc.returncode == 1 and "does not match the manifest's hash" in proc.stdout
    full.write_bytes(saved)

    # The full hashed with BLAKE2b, the next image with SHA-256, the rest with BLAKE3: the
    # merge checks each image with its own algorithm.
    for path, text in zip(sidecars, new, strict=True):
        path.write_text(text)
    _rehash_as_first_format(chain, chain.backups[0])
    _rehash_as_sha256(chain, chain.backups[1])
    nbdtrack("merge", chain4.repo, "--keep", "1")
    chain = chain4.chain
    for record in chain.backups:
        sidecar = json.loads(Path(chain.hashes_path(record.file)).read_text())
        assert sidecar["algorithm"] == "blake3-128"
    check_repository(chain4)

    last = Path(chain.hashes_path(chain.backups[-1].file))
    last.write_text(json.dumps({"algorithm": "md4", "clusters": {}}))
    proc = nbdtrack("verify", chain4.repo, ok=False)
    assert proc.returncode == 1 and "unknown cluster hash algorithm 'md4'" in proc.stdout
