"""The qcow2 writer and reader of the backup repository, judged by QEMU's own tools.

Images we write must pass ``qemu-img check`` (no errors, no leaks) and read back, through
``qemu-img convert``/``compare``/``map`` and ``qemu-io``, as exactly the bytes a plain
bytearray model says; images qemu writes must read the same through our reader.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdtrack.backup.qcow2 import (
    QCOW2_HEADER_V2,
    QCOW2_HEADER_V3,
    ClusterState,
    InvalidImage,
    PartialClusterError,
    Qcow2Reader,
    Qcow2Writer,
    UnsupportedImage,
)

K = 1024
MiB = K * K
K64 = 64 * K


# --- helpers ---------------------------------------------------------------------------


def run(*cmd: str | Path, ok: bool = True, cwd: str = "/") -> subprocess.CompletedProcess:
    # cwd "/" by default: relative backing names must resolve against the image's directory.
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    if ok:
        assert proc.returncode == 0, (
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


def check(path: Path) -> dict:
    """qemu-img check: exit 0 means no corruption and no leaks; the JSON says it too."""
    proc = run("qemu-img", "check", "--output=json", path, ok=False)
    assert proc.returncode == 0, f"qemu-img check {path}:\n{proc.stdout}{proc.stderr}"
    report = json.loads(proc.stdout)
    assert report["check-errors"] == 0
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    return report


def info(path: Path) -> dict:
    return json.loads(run("qemu-img", "info", "--output=json", path).stdout)


def to_raw(path: Path) -> bytes:
    out = path.with_name(path.name + ".raw")
    run("qemu-img", "convert", "-O", "raw", path, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def qemu_map(path: Path) -> list[dict]:
    return json.loads(run("qemu-img", "map", "--output=json", path).stdout)


def qemu_cluster_states(path: Path, size: int, cs: int) -> list[tuple[int, bool, bool]]:
    """(depth, zero, data) per guest cluster, from qemu-img map."""
    states: list[tuple[int, bool, bool] | None] = [None] * (-(-size // cs))
    for e in qemu_map(path):
        for index in range(e["start"] // cs, -(-(e["start"] + e["length"]) // cs)):
            states[index] = (e["depth"], e["zero"], e["data"])
    assert None not in states
    return states  # type: ignore[return-value]


def qemu_io_read_pattern(path: Path, offset: int, length: int, byte: int) -> None:
    out = run("qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {byte:#x} {offset} {length}", path)
    assert "Pattern verification failed" not in out.stdout + out.stderr


def write_image(path: Path, size: int, ops: list, **kw) -> bytearray:
    """Apply ("w", offset, data) / ("z", offset, length) ops to a new image and a model."""
    model = bytearray(size)
    with Qcow2Writer.create(path, size, **kw) as w:
        for op in ops:
            if op[0] == "w":
                w.write(op[1], op[2])
                model[op[1] : op[1] + len(op[2])] = op[2]
            else:
                w.write_zeroes(op[1], op[2])
                model[op[1] : op[1] + op[2]] = bytes(op[2])
    return model


def header(path: Path) -> tuple:
    raw = path.read_bytes()[: QCOW2_HEADER_V2.size + QCOW2_HEADER_V3.size]
    return QCOW2_HEADER_V2.unpack_from(raw) + QCOW2_HEADER_V3.unpack_from(raw, QCOW2_HEADER_V2.size)


# --- images we write, judged by qemu ---------------------------------------------------


def test_full_image_header_check_and_info(tmp_path: Path) -> None:
    path = tmp_path / "full.qcow2"
    size = 8 * MiB
    model = write_image(
        path,
        size,
        [("w", 0, b"\x11" * 3 * K64), ("w", 5 * MiB, os.urandom(MiB)), ("z", 7 * MiB, MiB)],
    )
    fields = header(path)
    assert fields[0] == b"QFI\xfb" and fields[1] == 3  # magic, version
    assert fields[2:4] == (0, 0)  # no backing file
    assert fields[4] == 16 and fields[5] == size and fields[6] == 0  # 64 KiB, size, no crypt
    assert fields[13:] == (0, 0, 0, 4, 112)  # features 0, refcount_order 4, header_length
    report = check(path)
    assert report["allocated-clusters"] == 3 + 16
    meta = info(path)
    assert meta["format"] == "qcow2" and meta["virtual-size"] == size
    assert meta["cluster-size"] == K64 and "backing-filename" not in meta
    data = meta["format-specific"]["data"]
    assert data["compat"] == "1.1" and data["refcount-bits"] == 16
    assert not data["corrupt"] and not data["lazy-refcounts"] and not data["extended-l2"]
    assert to_raw(path) == model
    # Data clusters follow the header in write order: streaming, no seeking back.
    reader = Qcow2Reader.open(path)
    assert [c.host_offset for c in reader.allocation() if c.state is ClusterState.DATA] == [
        K64 * (1 + i) for i in range(19)
    ]


def test_chain_full_and_incremental(tmp_path: Path) -> None:
    """Full + incremental with a relative backing name, zero clusters over backing data."""
    cs = K64
    size = 40 * cs + 1536  # the last cluster is partial
    full, inc = tmp_path / "full-20261126.qcow2", tmp_path / "inc-20261127.qcow2"
    model = write_image(
        full,
        size,
        [
            ("w", 0, b"\x11" * 10 * cs),
            ("w", 20 * cs, b"\x22" * 5 * cs),
            ("w", 40 * cs, b"\x33" * 1536),
        ],
    )
    with Qcow2Writer.create(inc, size, backing_file=full.name) as w:
        w.write(2 * cs, b"\x44" * 2 * cs)  # replaces backing data
        w.write(30 * cs, b"\x55" * cs)  # new data where the backing is unallocated
        w.write_zeroes(5 * cs, 3 * cs)  # zero clusters over backing data
        w.write_zeroes(21 * cs, cs)
        w.write_zeroes(35 * cs, cs)  # over a cluster the backing does not have
        w.write(40 * cs, b"\x66" * 1536)  # the whole tail cluster
    model[2 * cs : 4 * cs] = b"\x44" * 2 * cs
    model[30 * cs : 31 * cs] = b"\x55" * cs
    model[5 * cs : 8 * cs] = bytes(3 * cs)
    model[21 * cs : 22 * cs] = bytes(cs)
    model[40 * cs :] = b"\x66" * 1536

    check(full)
    check(inc)
    meta = info(inc)
    assert meta["format"] == "qcow2" and meta["virtual-size"] == size
    assert meta["format-specific"]["data"]["compat"] == "1.1"
    assert meta["backing-filename"] == full.name
    assert meta["backing-filename-format"] == "qcow2"
    assert meta["full-backing-filename"] == str(full)
    chain = json.loads(run("qemu-img", "info", "--backing-chain", "--output=json", inc).stdout)
    assert [Path(i["filename"]).name for i in chain] == [inc.name, full.name]

    raw = tmp_path / "expected.raw"
    raw.write_bytes(model)
    assert to_raw(inc) == model
    run("qemu-img", "compare", "-F", "raw", inc, raw)
    raw.write_bytes(model[:-1] + b"\x00")
    assert run("qemu-img", "compare", "-F", "raw", inc, raw, ok=False).returncode == 1

    # qemu-img map: the incremental's zero clusters are zero, not data, and hide the backing.
    states = qemu_cluster_states(inc, size, cs)
    for index in (5, 6, 7, 21, 35):
        assert states[index] == (0, True, False), index
    for index in (2, 3, 30, 40):
        assert states[index] == (0, False, True), index
    for index in (0, 1, 8, 9, 20, 22):
        assert states[index] == (1, False, True), index
    for index in (10, 31, 39):
        assert states[index][0] == 1 and states[index][1:] == (True, False), index

    qemu_io_read_pattern(inc, 0, 2 * cs, 0x11)
    qemu_io_read_pattern(inc, 2 * cs, 2 * cs, 0x44)
    qemu_io_read_pattern(inc, 5 * cs, 3 * cs, 0)
    qemu_io_read_pattern(inc, 8 * cs, 2 * cs, 0x11)
    qemu_io_read_pattern(inc, 20 * cs, cs, 0x22)
    qemu_io_read_pattern(inc, 21 * cs, cs, 0)
    qemu_io_read_pattern(inc, 30 * cs, cs, 0x55)
    qemu_io_read_pattern(inc, 40 * cs, 1536, 0x66)

    # Our reader agrees, on the chain and on the incremental alone.
    with Qcow2Reader.open(inc) as reader:
        assert reader.backing_file == full.name and reader.backing_format == "qcow2"
        assert reader.backing_path() == str(full)
        assert reader.read_chain(0, size) == model
        alone = bytearray(size)
        alone[2 * cs : 4 * cs] = b"\x44" * 2 * cs
        alone[30 * cs : 31 * cs] = b"\x55" * cs
        alone[40 * cs :] = b"\x66" * 1536
        assert reader.read(0, size) == alone
        held = {c.index: c.state for c in reader.allocation()}
        zero, data = ClusterState.ZERO, ClusterState.DATA
        assert held == {2: data, 3: data, 5: zero, 6: zero, 7: zero, 21: zero, 30: data,
                        35: zero, 40: data}  # fmt: skip
        assert reader.map()[-1].start + reader.map()[-1].length == size


def test_three_images_chain_and_rebase_free_reading(tmp_path: Path) -> None:
    cs = 4096
    size = 64 * cs
    paths = [tmp_path / f"b{i}.qcow2" for i in range(3)]
    model = write_image(paths[0], size, [("w", 0, os.urandom(size))], cluster_size=cs)
    rng = random.Random(7)
    for i in (1, 2):
        with Qcow2Writer.create(
            paths[i], size, cluster_size=cs, backing_file=paths[i - 1].name
        ) as w:
            for _ in range(20):
                index = rng.randrange(64)
                if rng.random() < 0.5:
                    data = rng.randbytes(cs)
                    w.write(index * cs, data)
                    model[index * cs : (index + 1) * cs] = data
                else:
                    w.write_zeroes(index * cs, cs)
                    model[index * cs : (index + 1) * cs] = bytes(cs)
        check(paths[i])
    assert to_raw(paths[2]) == model
    with Qcow2Reader.open(paths[2]) as reader:
        assert reader.read_chain(0, size) == model


@pytest.mark.parametrize("cs", [512, 4096, K64])
@pytest.mark.parametrize("tail", [512, 1536, -512])
def test_unaligned_virtual_size(tmp_path: Path, cs: int, tail: int) -> None:
    size = 5 * cs + tail if tail > 0 else 5 * cs + cs + tail
    size = max(size, 512)
    path = tmp_path / "odd.qcow2"
    tail_start = size // cs * cs if size % cs else size - cs
    model = write_image(
        path,
        size,
        [("w", 0, b"\x01" * cs), ("w", tail_start, b"\x02" * (size - tail_start))],
        cluster_size=cs,
    )
    check(path)
    assert info(path)["virtual-size"] == size
    assert to_raw(path) == model
    with Qcow2Reader.open(path) as reader:
        assert reader.virtual_size == size
        assert reader.read(0, size) == model
        assert reader.cluster((size - 1) // cs).state is ClusterState.DATA
    qemu_io_read_pattern(path, tail_start, size - tail_start, 0x02)


def test_large_metadata_spans_clusters(tmp_path: Path) -> None:
    """512-byte clusters: L1 over several clusters, many L2 tables, a refcount table
    of two clusters (more than 16384 clusters at 256 refcounts per block)."""
    cs = 512
    size = 12 * MiB
    path = tmp_path / "big.qcow2"
    data = random.Random(1).randbytes(size)
    model = write_image(
        path,
        size,
        [("w", 0, data), ("z", MiB, 3 * cs), ("w", MiB + cs, b"\x07" * cs)],
        cluster_size=cs,
    )
    fields = header(path)
    assert fields[7] * 8 > cs  # l1_size: the L1 table needs more than one cluster
    assert fields[10] == 2  # refcount_table_clusters
    check(path)
    assert to_raw(path) == model
    with Qcow2Reader.open(path) as reader:
        assert reader.read(0, size) == model


def test_sparse_terabyte_image(tmp_path: Path) -> None:
    size = 1 << 40
    path = tmp_path / "tb.qcow2"
    with Qcow2Writer.create(path, size) as w:
        w.write(0, b"\xaa" * K64)
        w.write(size - K64, b"\xbb" * K64)
        w.write_zeroes(size // 2, 4 * MiB)
    check(path)
    assert info(path)["virtual-size"] == size
    assert path.stat().st_size < MiB
    states = {(e["start"], e["data"], e["zero"]) for e in qemu_map(path) if e["depth"] == 0}
    assert (0, True, False) in states and (size - K64, True, False) in states
    assert (size // 2, False, True) in states
    qemu_io_read_pattern(path, size - K64, K64, 0xBB)
    with Qcow2Reader.open(path) as reader:
        assert reader.read(size - K64 - 1, 2) == b"\x00\xbb"


@pytest.mark.parametrize("size", [0, 512, 3 * MiB])
def test_empty_images(tmp_path: Path, size: int) -> None:
    path = tmp_path / "empty.qcow2"
    Qcow2Writer.create(path, size).close()
    check(path)
    assert info(path)["virtual-size"] == size
    assert to_raw(path) == bytes(size)
    with Qcow2Reader.open(path) as reader:
        assert reader.map() == ([(0, size, ClusterState.UNALLOCATED, None)] if size else [])


# --- the writer's rules ----------------------------------------------------------------


def test_partial_cluster_over_backing_is_refused(tmp_path: Path) -> None:
    cs = 4096
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    write_image(base, 8 * cs, [("w", 0, b"\x11" * 8 * cs)], cluster_size=cs)
    with Qcow2Writer.create(top, 8 * cs, cluster_size=cs, backing_file=base.name) as w:
        for offset, length in [(1, cs), (0, cs - 1), (cs - 1, 2), (cs, 2 * cs + 512)]:
            with pytest.raises(PartialClusterError, match="pass the whole cluster"):
                w.write(offset, b"x" * length)
            with pytest.raises(PartialClusterError):
                w.write_zeroes(offset, length)
        # Nothing of a refused request landed, not even its whole clusters.
        w.write(2 * cs, b"\x22" * cs)  # now cluster 2 is ours: partial updates are fine
        w.write(2 * cs + 100, b"\x33" * 10)
        w.write_zeroes(2 * cs + 200, 10)
        w.write_zeroes(4 * cs, cs)  # a zero cluster is ours too
        w.write(4 * cs + 8, b"\x44" * 8)  # the rest of it stays zero, not backing data
    expected = bytearray(b"\x11" * 8 * cs)
    expected[2 * cs : 3 * cs] = b"\x22" * cs
    expected[2 * cs + 100 : 2 * cs + 110] = b"\x33" * 10
    expected[2 * cs + 200 : 2 * cs + 210] = bytes(10)
    expected[4 * cs : 5 * cs] = bytes(8) + b"\x44" * 8 + bytes(cs - 16)
    check(top)
    assert to_raw(top) == expected


def test_partial_cluster_without_backing_pads_zeros(tmp_path: Path) -> None:
    path = tmp_path / "p.qcow2"
    model = write_image(
        path,
        4 * K64,
        [("w", 100, b"\x01" * 50), ("w", K64 - 10, b"\x02" * 20), ("z", 120, 10)],
    )
    assert model[100:150] == b"\x01" * 20 + bytes(10) + b"\x01" * 20
    check(path)
    assert to_raw(path) == model


def test_zeroing_data_frees_the_cluster_for_reuse(tmp_path: Path) -> None:
    path = tmp_path / "z.qcow2"
    with Qcow2Writer.create(path, MiB) as w:
        w.write(0, b"\x01" * 4 * K64)
        w.write_zeroes(K64, 2 * K64)  # frees host clusters 2 and 3
        w.write(8 * K64, b"\x02" * K64)  # reuses host cluster 2
    check(path)  # the still-free cluster 3 has refcount 0 and is no leak
    with Qcow2Reader.open(path) as reader:
        held = [(c.index, c.state, c.host_offset) for c in reader.allocation()]
    assert held == [
        (0, ClusterState.DATA, K64),
        (1, ClusterState.ZERO, None),
        (2, ClusterState.ZERO, None),
        (3, ClusterState.DATA, 4 * K64),
        (8, ClusterState.DATA, 2 * K64),
    ]
    expected = bytearray(MiB)
    expected[0:K64] = b"\x01" * K64
    expected[3 * K64 : 4 * K64] = b"\x01" * K64
    expected[8 * K64 : 9 * K64] = b"\x02" * K64
    assert to_raw(path) == expected


def test_writer_argument_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    with pytest.raises(ValueError, match="multiple of 512"):
        Qcow2Writer.create(path, MiB + 100)
    for cs in (256, 3000, 4 * MiB):
        with pytest.raises(ValueError, match="cluster size"):
            Qcow2Writer.create(path, MiB, cluster_size=cs)
    with pytest.raises(ValueError, match="1..1023"):
        Qcow2Writer.create(path, MiB, backing_file="x" * 1024)
    with pytest.raises(ValueError, match="does not fit"):
        Qcow2Writer.create(path, MiB, cluster_size=512, backing_file="x" * 500)
    with pytest.raises(ValueError, match="colon"):
        Qcow2Writer.create(path, MiB, backing_file="nbd://host/export")
    assert not path.exists()
    w = Qcow2Writer.create(path, MiB)
    with pytest.raises(ValueError, match="outside"):
        w.write(MiB - 1, b"ab")
    with pytest.raises(ValueError, match="outside"):
        w.write_zeroes(-1, 1)
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        w.write(0, b"a")
    with pytest.raises(FileExistsError):
        Qcow2Writer.create(path, MiB)


def test_failed_job_leaves_no_image(tmp_path: Path) -> None:
    path = tmp_path / "failed.qcow2"
    with pytest.raises(RuntimeError), Qcow2Writer.create(path, MiB) as w:
        w.write(0, b"\x01" * K64)
        raise RuntimeError("source went away")
    assert not path.exists()
    # Without close() the file has no header: no tool takes it for an image.
    w = Qcow2Writer.create(path, MiB)
    w.write(0, b"\x01" * K64)
    with pytest.raises(InvalidImage, match="not a qcow2 image"):
        Qcow2Reader.open(path)
    w.close()
    check(path)


# --- images qemu writes, read by us ----------------------------------------------------


def qemu_io_write(path: Path, *commands: str) -> None:
    args: list[str] = []
    for c in commands:
        args += ["-c", c]
    run("qemu-io", "-f", "qcow2", *args, path)


@pytest.mark.parametrize(
    "options",
    [
        "cluster_size=65536",
        "cluster_size=4096",
        "cluster_size=512",
        "compat=0.10",
        "refcount_bits=8,lazy_refcounts=on",
    ],
)
def test_reader_reads_qemu_images(tmp_path: Path, options: str) -> None:
    path = tmp_path / "q.qcow2"
    size = 3 * MiB + 512
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, path, str(size))
    qemu_io_write(
        path,
        "write -P 0x11 0 128k",
        "write -P 0x22 200k 10k",
        "write -z 64k 64k",
        "write -P 0x33 1M 1M",
        "discard 1200k 100k",
        f"write -P 0x44 {size - 1536} 1536",
    )
    expected = to_raw(path)
    with Qcow2Reader.open(path) as reader:
        assert reader.virtual_size == size
        assert reader.backing_file is None
        assert reader.read(0, size) == expected
        assert reader.read_chain(0, size) == expected
        assert reader.read(200 * K - 3, 6) == b"\x00\x00\x00\x22\x22\x22"
        # Per cluster, our map and qemu-img map tell the same story.
        cs = reader.cluster_size
        ours = [reader.cluster(i).state for i in range(-(-size // cs))]
        for state, (_, zero, data) in zip(ours, qemu_cluster_states(path, size, cs), strict=True):
            assert data == (state is ClusterState.DATA)
            assert zero == (state is not ClusterState.DATA)
        if "compat=0.10" not in options:
            assert ours[64 * K // cs] is ClusterState.ZERO


def test_reader_reads_qemu_overlay_chain(tmp_path: Path) -> None:
    base, mid, top = (tmp_path / f"{n}.qcow2" for n in ("base", "mid", "top"))
    raw_base = tmp_path / "base.img"
    raw_base.write_bytes(random.Random(3).randbytes(2 * MiB))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw_base, base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid, "3M")
    qemu_io_write(mid, "write -P 0x55 64k 64k", "write -z 512k 128k")
    # The top image has a raw backing file, and is larger than it.
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", top, "3M")
    qemu_io_write(top, "write -z 0 64k", "write -P 0x66 2M 4k")
    for image in (mid, top):
        expected = to_raw(image)
        with Qcow2Reader.open(image) as reader:
            assert reader.read_chain(0, reader.virtual_size) == expected, image
    with Qcow2Reader.open(top) as reader:
        assert reader.backing_format == "raw"
        assert reader.read(2 * MiB, 4 * K) == b"\x66" * 4 * K
        assert reader.read_chain(2 * MiB - 1, 2) == expected[2 * MiB - 1 : 2 * MiB + 1]


def test_reader_rejects_compressed_image(tmp_path: Path) -> None:
    path, packed = tmp_path / "plain.qcow2", tmp_path / "packed.qcow2"
    write_image(path, MiB, [("w", 0, b"\x01" * MiB)])
    run("qemu-img", "convert", "-c", "-O", "qcow2", path, packed)
    with pytest.raises(UnsupportedImage, match="compressed cluster at guest offset 0"):
        Qcow2Reader.open(packed)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "extended_l2=on"], "extended L2 entries"),
        (["-o", "data_file=data.raw"], "external data file"),
        (
            ["--object", "secret,id=s0,data=x", "-o", "encrypt.format=aes,encrypt.key-secret=s0"],
            r"encrypted image \(crypt_method 1\)",
        ),
    ],
)
def test_reader_rejects_unsupported_features(tmp_path: Path, args: list, message: str) -> None:
    path = tmp_path / "u.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", *args, path, "1M", cwd=str(tmp_path))
    with pytest.raises(UnsupportedImage, match=message):
        Qcow2Reader.open(path)


def test_reader_rejects_luks_encryption(tmp_path: Path) -> None:
    """crypt_method 2 (LUKS). qemu-img's LUKS key derivation benchmarks the CPU and fails
    on a loaded machine, so the header field is set by hand on a plain image."""
    path = tmp_path / "u.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "1M")
    with open(path, "r+b") as f:
        f.seek(32)  # crypt_method
        f.write(struct.pack(">I", 2))
    with pytest.raises(UnsupportedImage, match=r"encrypted image \(crypt_method 2\)"):
        Qcow2Reader.open(path)


def test_reader_rejects_broken_files(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    path.write_bytes(b"not an image" * 100)
    with pytest.raises(InvalidImage, match="not a qcow2 image"):
        Qcow2Reader.open(path)
    path.unlink()
    write_image(path, MiB, [("w", 0, b"\x01" * K64)])
    with open(path, "r+b") as f:  # set the corrupt bit
        f.seek(72)
        f.write(struct.pack(">Q", 2))
    with pytest.raises(UnsupportedImage, match="corrupt"):
        Qcow2Reader.open(path)
    with open(path, "r+b") as f:  # an unknown incompatible feature
        f.seek(72)
        f.write(struct.pack(">Q", 1 << 40))
    with pytest.raises(UnsupportedImage, match="unknown bit 40"):
        Qcow2Reader.open(path)
    with open(path, "r+b") as f:  # the dirty bit alone is fine for reading
        f.seek(72)
        f.write(struct.pack(">Q", 1))
    with Qcow2Reader.open(path) as reader:
        assert reader.read(0, 2) == b"\x01\x01"
    with open(path, "r+b") as f:  # version 4
        f.seek(4)
        f.write(struct.pack(">I", 4))
    with pytest.raises(UnsupportedImage, match="version 4"):
        Qcow2Reader.open(path)


def test_reader_rejects_broken_l2_entries(tmp_path: Path) -> None:
    path = tmp_path / "l2.qcow2"
    write_image(path, MiB, [("w", 3 * K64, b"\x01" * K64)])
    with Qcow2Reader.open(path) as reader:
        host = reader.cluster(3).host_offset
        l1_table_offset = reader.l1_table_offset
        with pytest.raises(ValueError, match="outside virtual size"):
            reader.read(MiB - 1, 2)
    raw = path.read_bytes()
    (l2_offset,) = struct.unpack_from(">Q", raw, l1_table_offset)
    entry_at = (l2_offset & 0x00FFFFFFFFFFFE00) + 3 * 8
    for bad in (host | 1 << 63 | 0x2, host | 1 << 63 | 0x1000):  # reserved bit, unaligned
        with open(path, "r+b") as f:
            f.seek(entry_at)
            f.write(struct.pack(">Q", bad))
        with pytest.raises(InvalidImage, match=f"guest offset {3 * K64}"):
            Qcow2Reader.open(path)


def test_reader_reads_image_with_internal_snapshot(tmp_path: Path) -> None:
    """Shared clusters (refcount 2) lose QCOW_OFLAG_COPIED; reading must not care."""
    path = tmp_path / "snap.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "2M")
    qemu_io_write(path, "write -P 0x11 0 1M")
    run("qemu-img", "snapshot", "-c", "s1", path)
    qemu_io_write(path, "write -P 0x22 512k 64k", "write -z 0 64k")
    with Qcow2Reader.open(path) as reader:
        assert reader.nb_snapshots == 1
        assert reader.read(0, 2 * MiB) == to_raw(path)


def test_backing_loop_is_detected(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    Qcow2Writer.create(a, MiB, backing_file="b.qcow2").close()
    Qcow2Writer.create(b, MiB, backing_file="a.qcow2").close()
    with Qcow2Reader.open(a) as reader, pytest.raises(InvalidImage, match="loops"):
        reader.read_chain(0, 512)


# --- properties: random requests against a bytearray model -----------------------------

PROPS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def requests(draw: st.DrawFn, size: int, cs: int) -> list[tuple[str, int, int, int]]:
    """("w" | "z", offset, length, seed); biased towards cluster boundaries."""
    clusters = -(-size // cs)
    out = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.booleans()):
            start = draw(st.integers(0, clusters - 1)) * cs
            end = min(size, (draw(st.integers(start // cs, clusters - 1)) + 1) * cs)
        else:
            start = draw(st.integers(0, size - 1))
            end = draw(st.integers(start + 1, min(size, start + 3 * cs)))
        out.append((draw(st.sampled_from("wz")), start, end - start, draw(st.integers(0, 255))))
    return out


@st.composite
def image_case(draw: st.DrawFn) -> tuple[int, int, list, list]:
    cs = draw(st.sampled_from([512, 4096]))
    size = draw(st.integers(1, 3 * cs // 512 * 4)) * 512  # up to 12 clusters, any 512 tail
    return cs, size, draw(requests(size, cs)), draw(requests(size, cs))


def apply(w: Qcow2Writer, model: bytearray, owned: set[int] | None, op: tuple) -> None:
    """Apply one request to the writer and the model; ``owned`` (clusters the image
    holds) says when a partial request over a backing file must be refused."""
    kind, offset, length, seed = op
    cs = w.cluster_size
    first, last = offset // cs, (offset + length - 1) // cs
    partial = [
        i
        for i in {first, last}
        if not (offset <= i * cs and offset + length >= min((i + 1) * cs, len(model)))
    ]
    if owned is not None and any(i not in owned for i in partial):
        with pytest.raises(PartialClusterError):
            if kind == "w":
                w.write(offset, bytes(length))
            else:
                w.write_zeroes(offset, length)
        return
    if kind == "w":
        data = random.Random(seed).randbytes(length)
        w.write(offset, data)
        model[offset : offset + length] = data
    else:
        w.write_zeroes(offset, length)
        model[offset : offset + length] = bytes(length)
    if owned is not None:
        owned.update(range(first, last + 1))


@PROPS
@given(image_case())
def test_property_full_then_incremental(case: tuple[int, int, list, list]) -> None:
    cs, size, full_ops, inc_ops = case
    with tempfile.TemporaryDirectory() as tmp:
        full, inc = Path(tmp) / "full.qcow2", Path(tmp) / "inc.qcow2"
        model = bytearray(size)
        with Qcow2Writer.create(full, size, cluster_size=cs) as w:
            for op in full_ops:
                apply(w, model, None, op)
        full_model = bytes(model)
        owned: set[int] = set()
        with Qcow2Writer.create(inc, size, cluster_size=cs, backing_file=full.name) as w:
            for op in inc_ops:
                apply(w, model, owned, op)

        with Qcow2Reader.open(full) as reader:
            assert reader.read(0, size) == full_model
        with Qcow2Reader.open(inc) as reader:
            assert reader.read_chain(0, size) == model
            assert {c.index for c in reader.allocation()} == owned
            states = [reader.cluster(i).state for i in range(-(-size // cs))]
        check(full)
        check(inc)
        assert to_raw(full) == full_model
        assert to_raw(inc) == model
        # qemu-img map of the incremental: what it holds is depth 0, the rest is the backing's.
        qemu_states = qemu_cluster_states(inc, size, cs)
        for state, (depth, zero, data) in zip(states, qemu_states, strict=True):
            if state is ClusterState.UNALLOCATED:
                assert depth == 1
            else:
                assert (depth, zero, data) == (0, state is ClusterState.ZERO,
                                               state is ClusterState.DATA)  # fmt: skip


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_case(), st.booleans())
def test_property_reader_agrees_with_qemu_io(
    case: tuple[int, int, list, list], with_backing: bool
) -> None:
    """Random qemu-io writes, zeroes and discards: our reader reads what qemu-img converts."""
    cs, size, base_ops, top_ops = case
    with tempfile.TemporaryDirectory() as tmp:
        base, top = Path(tmp) / "base.qcow2", Path(tmp) / "top.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", base, str(size))
        if with_backing:
            run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}",
                "-b", base.name, "-F", "qcow2", top, str(size))  # fmt: skip
        for path, ops in ((base, base_ops), (top, top_ops) if with_backing else (base, [])):
            commands = []
            for kind, offset, length, seed in ops:
                if kind == "w":
                    commands.append(f"write -P {seed} {offset} {length}")
                elif seed % 2:
                    commands.append(f"write -z {offset} {length}")
                else:
                    commands.append(f"discard {offset} {length}")
            if commands:
                qemu_io_write(path, *commands)
        image = top if with_backing else base
        expected = to_raw(image)
        with Qcow2Reader.open(image) as reader:
            assert reader.read_chain(0, size) == expected
