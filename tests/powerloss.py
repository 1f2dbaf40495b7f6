"""A storage layer for tests that loses everything not yet synced when the power fails.

``VolatileFiles`` stands in for the state directory and ``VolatileDisk`` for the image.
Both keep what the process sees apart from what is on stable storage; ``crash()`` turns
each into what a machine would find after a power loss: the synced bytes, plus any part
of what was not synced (a random prefix of a journal's unsynced tail, a random subset of
the image's unsynced writes). A countdown can make the power fail inside any file call.
"""

from __future__ import annotations

import random

from nbdtrack.storage.memory import MemoryBackend
from nbdtrack.tracking.statefiles import StateFiles


class PowerFailure(Exception):
    """The power failed: nothing more reaches any disk."""


class Fuse:
    """Counts file operations down; at zero, the power fails."""

    def __init__(self, countdown: int | None) -> None:
        self.countdown = countdown
        self.blown = False

    def tick(self) -> None:
        if self.blown:
            raise PowerFailure
        if self.countdown is not None:
            self.countdown -= 1
            if self.countdown <= 0:
                self.blown = True
                raise PowerFailure


class VolatileJournal:
    def __init__(self, files: VolatileFiles, name: str) -> None:
        self.files, self.name = files, name
        files.current.setdefault(name, bytearray())
        files.durable.setdefault(name, b"")

    def read_all(self) -> bytes:
        return bytes(self.files.current[self.name])

    def append(self, data: bytes) -> None:
        self.files.fuse.tick()
        self.files.current[self.name] += data

    def sync(self) -> None:
        self.files.fuse.tick()
        self.files.durable[self.name] = bytes(self.files.current[self.name])

    def truncate(self, size: int) -> None:
        self.files.fuse.tick()
        del self.files.current[self.name][size:]

    def reset(self, header: bytes) -> None:
        self.files.fuse.tick()
        self.files.current[self.name] = bytearray(header)
        self.files.durable[self.name] = header

    def size(self) -> int:
        return len(self.files.current[self.name])

    def close(self) -> None:
        pass


class VolatileFiles(StateFiles):
    def __init__(self, fuse: Fuse) -> None:
        self.directory = "<volatile>"
        self.fuse = fuse
        self.current: dict[str, bytearray] = {}
        self.durable: dict[str, bytes] = {}

    def lock(self) -> None:
        pass

    def unlock(self) -> None:
        pass

    def read(self, name: str) -> bytes | None:
        data = self.current.get(name)
        return None if data is None else bytes(data)

    def replace(self, name: str, data: bytes) -> None:
        self.fuse.tick()  # the rename is atomic: all or nothing
        self.current[name] = bytearray(data)
        self.durable[name] = data

    def open_journal(self, name: str) -> VolatileJournal:
        return VolatileJournal(self, name)

    def remove(self, name: str) -> None:
        self.current.pop(name, None)
        self.durable.pop(name, None)

    def after_power_loss(self, rng: random.Random) -> VolatileFiles:
        """What the next boot finds: synced bytes, plus a torn piece of an unsynced tail."""
        survivor = VolatileFiles(Fuse(None))
        for name, durable in self.durable.items():
            current = bytes(self.current.get(name, b""))
            data = durable
            if current.startswith(durable) and len(current) > len(durable):
                data = current[: rng.randint(len(durable), len(current))]
            survivor.durable[name] = data
            survivor.current[name] = bytearray(data)
        return survivor


class VolatileDisk(MemoryBackend):
    """A memory image with a write cache: writes reach 'stable' storage on flush."""

    def __init__(self, size: int, fuse: Fuse) -> None:
        super().__init__(size)
        self.fuse = fuse
        self.stable = MemoryBackend(size)
        self.unsynced: list[tuple[str, int, bytes | int]] = []

    def pwrite(self, data, offset: int, fua: bool = False) -> None:
        self.fuse.tick()
        super().pwrite(data, offset)
        self.unsynced.append(("write", offset, bytes(data)))
        if fua:
            self.flush()

    def zero(self, offset, length, *, may_trim=False, fast=False, fua=False) -> None:
        self.fuse.tick()
        super().zero(offset, length)
        self.unsynced.append(("zero", offset, length))
        if fua:
            self.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.zero(offset, length, fua=fua)

    def flush(self) -> None:
        self.fuse.tick()
        for op in self.unsynced:
            self._apply(self.stable, op)
        self.unsynced.clear()

    @staticmethod
    def _apply(target: MemoryBackend, op) -> None:
        kind, offset, arg = op
        if kind == "write":
            target.pwrite(arg, offset)
        else:
            target.zero(offset, arg)

    def after_power_loss(self, rng: random.Random) -> MemoryBackend:
        """Stable data plus a random subset of the unsynced writes, in a random order."""
        image = MemoryBackend(self.size())
        image.pwrite(self.stable.pread(self.size(), 0), 0)
        survivors = [op for op in self.unsynced if rng.random() < 0.5]
        rng.shuffle(survivors)
        for op in survivors:
            self._apply(image, op)
        return image
