"""The client's exception hierarchy.

Three ways an NBD exchange can go wrong, and each needs a different reaction from the
caller, so each has its own class:

* ``NBDRequestError``: the server answered one request with an error (it carries the
  NBD errno); the connection is fine and other requests go on.
* ``NBDOptionError``: the server refused one handshake option (it carries the
  NBD_REP_ERR_* code), e.g. an unknown export name.
* ``NBDConnectionError``: the connection is gone; every pending and later request on it
  fails. ``NBDProtocolError`` is the case where the *server* broke the protocol and the
  client killed the connection because the byte stream can no longer be trusted.

All of them derive from ``ClientError`` and from the protocol layer's ``NBDError``; the
request/option/protocol classes also derive from the protocol layer's class of the same
meaning, so code that already catches ``RequestError`` keeps working.
"""

from __future__ import annotations

from nbdtrack.protocol import constants as c
from nbdtrack.protocol.errors import NBDError, OptionError, ProtocolError, RequestError

ERROR_NAMES = {
    c.NBD_EPERM: "EPERM",
    c.NBD_EIO: "EIO",
    c.NBD_ENOMEM: "ENOMEM",
    c.NBD_EINVAL: "EINVAL",
    c.NBD_ENOSPC: "ENOSPC",
    c.NBD_EOVERFLOW: "EOVERFLOW",
    c.NBD_ENOTSUP: "ENOTSUP",
    c.NBD_ESHUTDOWN: "ESHUTDOWN",
}

REPLY_ERROR_NAMES = {
    c.NBD_REP_ERR_UNSUP: "ERR_UNSUP",
    c.NBD_REP_ERR_POLICY: "ERR_POLICY",
    c.NBD_REP_ERR_INVALID: "ERR_INVALID",
    c.NBD_REP_ERR_PLATFORM: "ERR_PLATFORM",
    c.NBD_REP_ERR_TLS_REQD: "ERR_TLS_REQD",
    c.NBD_REP_ERR_UNKNOWN: "ERR_UNKNOWN",
    c.NBD_REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
    c.NBD_REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD",
    c.NBD_REP_ERR_TOO_BIG: "ERR_TOO_BIG",
    c.NBD_REP_ERR_EXT_HEADER_REQD: "ERR_EXT_HEADER_REQD",
}


def error_name(error: int) -> str:
    """``EINVAL`` for 22; unknown values (clients treat them as EINVAL) by number."""
    return ERROR_NAMES.get(error, f"error {error}")


def reply_error_name(reply: int) -> str:
    return "NBD_REP_" + REPLY_ERROR_NAMES.get(reply, f"0x{reply:08x}")


class ClientError(NBDError):
    """Base of everything the NBD client raises about the NBD exchange."""


class NBDRequestError(RequestError, ClientError):
    """The server failed one request; ``error`` is the NBD errno (NBD_EINVAL, ...).

    ``offset`` is set when the server pinned the failure to an offset
    (NBD_REPLY_TYPE_ERROR_OFFSET).
    """

    def __init__(
        self,
        error: int,
        message: str = "",
        *,
        command: int | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(error, message)
        self.command = command
        self.offset = offset

    def __str__(self) -> str:
        what = c.COMMAND_NAMES.get(self.command, f"command {self.command}")
        text = f"{what} failed: {error_name(self.error)}"
        if self.offset is not None:
            text += f" at offset {self.offset}"
        if self.message:
            text += f": {self.message}"
        return text


class NBDOptionError(OptionError, ClientError):
    """The server refused a handshake option with ``reply`` (an NBD_REP_ERR_*)."""

    def __init__(self, option: int, reply: int, message: str = "") -> None:
        super().__init__(reply, message)
        self.option = option

    def __str__(self) -> str:
        name = "NBD_OPT_" + c.OPTION_NAMES.get(self.option, str(self.option))
        text = f"{name} refused with {reply_error_name(self.reply)}"
        return f"{text}: {self.message}" if self.message else text


class NBDConnectionError(ClientError):
    """The connection is closed or broken: nothing more can be sent on it."""


class NBDProtocolError(NBDConnectionError, ProtocolError):
    """The server broke the protocol; the client dropped the connection."""
