"""Exports: a name, a description, a backend stack, and the contexts it offers.

An ``Export`` answers what the handshake asks (size, flags, contexts) and the
metadata queries of BLOCK_STATUS; the ``ExportRegistry`` resolves the names clients
send, where "" selects the default export.
"""

from __future__ import annotations

from collections.abc import Iterator

from nbdtrack.protocol import constants as c
from nbdtrack.storage.backend import Backend, Extent


class Export:
    def __init__(
        self, name: str, backend: Backend, description: str = "", read_only: bool = False
    ) -> None:
        self.name = name
        self.description = description
        self.backend = backend
        self.read_only = read_only or not backend.can_write()

    @property
    def size(self) -> int:
        return self.backend.size()

    def transmission_flags(self) -> int:
        # One process serves every connection through one descriptor per image, so a
        # FLUSH on any connection makes every completed write durable: CAN_MULTI_CONN.
        flags = (
            c.NBD_FLAG_HAS_FLAGS
            | c.NBD_FLAG_SEND_FLUSH
            | c.NBD_FLAG_SEND_FUA
            | c.NBD_FLAG_SEND_CACHE
            | c.NBD_FLAG_CAN_MULTI_CONN
        )
        if self.read_only:
            flags |= c.NBD_FLAG_READ_ONLY
        else:
            flags |= c.NBD_FLAG_SEND_TRIM | c.NBD_FLAG_SEND_WRITE_ZEROES
            if self.backend.can_fast_zero():
                flags |= c.NBD_FLAG_SEND_FAST_ZERO
        return flags

    def meta_contexts(self) -> list[str]:
        return [c.BASE_ALLOCATION]

    def context_extents(self, context: str, offset: int, length: int) -> list[Extent]:
        """Extents of one metadata context over [offset, offset+length)."""
        if context == c.BASE_ALLOCATION:
            return self.backend.extents(offset, length)
        raise KeyError(context)

    def close(self) -> None:
        self.backend.close()


class ExportRegistry:
    def __init__(self, exports: list[Export] | None = None) -> None:
        self._exports: dict[str, Export] = {}
        for export in exports or []:
            self.add(export)

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise ValueError(f"duplicate export name '{export.name}'")
        self._exports[export.name] = export

    def remove(self, name: str) -> Export:
        return self._exports.pop(name)

    def lookup(self, name: str) -> Export | None:
        """The export a client names; "" selects the default (the first) export."""
        if name == "" and name not in self._exports:
            return next(iter(self._exports.values()), None)
        return self._exports.get(name)

    def listing(self) -> Iterator[Export]:
        return iter(list(self._exports.values()))

    def __iter__(self) -> Iterator[Export]:
        return self.listing()

    def __len__(self) -> int:
        return len(self._exports)
