"""The bitmap state file: every persistent bitmap of one export, written atomically.

Layout: magic, a 4-byte length, a JSON header (journal id, clean-stop flag, the image's
identity at a clean stop, and each bitmap's attributes), the raw bits of each bitmap in
header order, and a CRC32 of everything before it.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field

from bitarray import bitarray

from nbdtrack.tracking.errors import StateError

MAGIC = b"NBDTRACK-STATE1\n"
_U32 = struct.Struct(">I")


@dataclass
class BitmapRecord:
    name: str
    granularity: int
    recording: bool
    inconsistent: bool
    bits: bitarray
    generation: str = ""
    successor: bitarray | None = None  # a checkpoint was open: what was written since


@dataclass
class State:
    journal_id: bytes
    clean: bool
    identity: dict | None
    bitmaps: list[BitmapRecord] = field(default_factory=list)


def encode_state(state: State) -> bytes:
    meta = {
        "journal_id": state.journal_id.hex(),
        "clean": state.clean,
        "identity": state.identity,
        "bitmaps": [
            {
                "name": b.name,
                "granularity": b.granularity,
                "recording": b.recording,
                "inconsistent": b.inconsistent,
                "nbits": len(b.bits),
                "generation": b.generation,
                "successor": b.successor is not None,
            }
            for b in state.bitmaps
        ],
    }
    head = json.dumps(meta, separators=(",", ":")).encode()
    parts = [MAGIC, _U32.pack(len(head)), head]
    for b in state.bitmaps:
        parts.append(b.bits.tobytes())
        if b.successor is not None:
            parts.append(b.successor.tobytes())
    body = b"".join(parts)
    return body + _U32.pack(zlib.crc32(body))


def decode_state(data: bytes, where: str) -> State:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise StateError(f"{where}: not an nbdtrack state file")
    body, (crc,) = data[:-4], _U32.unpack(data[-4:])
    if zlib.crc32(body) != crc:
        raise StateError(f"{where}: checksum mismatch (the file is damaged)")
    pos = len(MAGIC)
    (head_len,) = _U32.unpack_from(body, pos)
    pos += 4
    try:
        meta = json.loads(body[pos : pos + head_len])
        pos += head_len
        state = State(bytes.fromhex(meta["journal_id"]), meta["clean"], meta["identity"])
        for entry in meta["bitmaps"]:
            bits, pos = _take_bits(body, pos, entry["nbits"], entry["name"], where)
            successor = None
            if entry.get("successor"):
                successor, pos = _take_bits(body, pos, entry["nbits"], entry["name"], where)
            state.bitmaps.append(
                BitmapRecord(
                    entry["name"],
                    entry["granularity"],
                    entry["recording"],
                    entry["inconsistent"],
                    bits,
                    entry.get("generation", ""),
                    successor,
                )
            )
    except (KeyError, TypeError, ValueError) as err:
        raise StateError(f"{where}: malformed header: {err}") from None
    return state


def _take_bits(body: bytes, pos: int, nbits: int, name: str, where: str) -> tuple[bitarray, int]:
    nbytes = -(-nbits // 8)
    bits = bitarray()
    bits.frombytes(body[pos : pos + nbytes])
    if len(bits) != nbytes * 8:
        raise StateError(f"{where}: bitmap '{name}' is truncated")
    del bits[nbits:]
    return bits, pos + nbytes
