"""QMP errors: an error class (QEMU's names) and a description shown to the user as is."""

from __future__ import annotations


class QMPError(Exception):
    """A command failed; the session answers ``{"error": {"class", "desc"}}`` and goes on."""

    error_class = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc

    def to_json(self) -> dict:
        return {"class": self.error_class, "desc": self.desc}


class GenericError(QMPError):
    """QEMU's catch-all class: bad arguments, unknown nodes, refused bitmap operations."""


class CommandNotFound(QMPError):
    """An unknown command, or any command but ``qmp_capabilities`` before negotiation."""

    error_class = "CommandNotFound"
