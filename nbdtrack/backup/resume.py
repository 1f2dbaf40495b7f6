"""What a resumable backup leaves behind, so that the next run goes on where it stopped.

A resumable backup (``--resumable``: its checkpoint has sync mode ``always``) releases a
range on the server only once the range is durably in its unfinished image: the data is
synced and the image's cluster entries are appended to a durable sidecar first. If the
backup fails or is killed, the server drops exactly the released bits, and the next run
reopens the unfinished image with the sidecar's entries and copies the rest: what stayed
dirty, and what was written since.

Files in the chain directory, next to ``.ID.qcow2.partial``::

    .ID.resume.json   the attempt: mode, parent, bitmap, checkpoint, base generation
    .ID.entries       (guest cluster, L2 entry, crc32) records, appended and fsynced

The server derives the bitmap's generation after such an abort from the checkpoint's
(``derived_generation``), so a run can tell its own abort from any other change.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass

from nbdtrack.backup.repository import Chain, write_atomically
from nbdtrack.tracking.bitmap import derived_generation

_RECORD = struct.Struct(">QQI")
_PAIR = struct.Struct(">QQ")


@dataclass
class ResumeState:
    id: str
    mode: str
    parent: str | None
    bitmap: str
    base_generation: str  # the bitmap's generation when this attempt's checkpoint started
    checkpoint: str
    attempt: int = 1

    def continues(self, generation: str | None) -> bool:
        """Whether the bitmap is as this attempt left it (aborted, or never released)."""
        return generation in (
            self.base_generation,
            derived_generation(self.base_generation, self.checkpoint),
        )


class ResumeFiles:
    def __init__(self, chain: Chain, backup_id: str) -> None:
        self.chain = chain
        self.id = backup_id
        self.state_path = os.path.join(chain.path, f".{backup_id}.resume.json")
        self.entries_path = os.path.join(chain.path, f".{backup_id}.entries")
        self.partial_path = os.path.join(chain.path, f".{backup_id}.qcow2.partial")

    @classmethod
    def find(cls, chain: Chain) -> tuple[ResumeFiles, ResumeState] | None:
        """The unfinished resumable attempt of this chain, if there is a usable one."""
        if not os.path.isdir(chain.path):
            return None
        for name in sorted(os.listdir(chain.path)):
            if name.startswith(".") and name.endswith(".resume.json"):
                files = cls(chain, name[1 : -len(".resume.json")])
                try:
                    with open(files.state_path, encoding="utf-8") as f:
                        state = ResumeState(**json.load(f))
                except (OSError, ValueError, TypeError):
                    continue
                if os.path.exists(files.partial_path):
                    return files, state
        return None

    def save(self, state: ResumeState) -> None:
        write_atomically(self.state_path, json.dumps(asdict(state)).encode())

    def append(self, entries: list[tuple[int, int]]) -> None:
        """Durably record cluster entries (their data is already synced)."""
        if not entries:
            return
        data = b"".join(
            _RECORD.pack(index, entry, zlib.crc32(_PAIR.pack(index, entry)))
            for index, entry in entries
        )
        fd = os.open(self.entries_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self) -> dict[int, int]:
        """The recorded entries, the last one of each cluster winning; a torn tail ends it."""
        try:
            with open(self.entries_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return {}
        out: dict[int, int] = {}
        for pos in range(0, len(data) - _RECORD.size + 1, _RECORD.size):
            index, entry, crc = _RECORD.unpack_from(data, pos)
            if crc != zlib.crc32(_PAIR.pack(index, entry)):
                break
            out[index] = entry
        return out

    def remove(self) -> None:
        for path in (self.state_path, self.entries_path, self.partial_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
