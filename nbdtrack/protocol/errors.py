"""The protocol's exception hierarchy.

``ProtocolError`` means the peer broke the protocol and the connection must be dropped;
``OptionError`` and ``RequestError`` mean one option or one request failed and the
session goes on with an error reply.
"""

from __future__ import annotations

import errno

from nbdtrack.protocol import constants as c


class NBDError(Exception):
    """Base of every error the protocol layer raises."""


class ProtocolError(NBDError):
    """The peer sent something that leaves no way to go on: drop the connection."""


class OptionError(NBDError):
    """One handshake option failed; answer with ``reply`` (an NBD_REP_ERR_*) and go on."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


class RequestError(NBDError):
    """One transmission request failed; answer with ``error`` (an NBD_E*) and go on."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(c.NBD_EINVAL, message)


_ERRNO_TO_NBD = {
    errno.EPERM: c.NBD_EPERM,
    errno.EACCES: c.NBD_EPERM,
    errno.EROFS: c.NBD_EPERM,
    errno.EIO: c.NBD_EIO,
    errno.ENOMEM: c.NBD_ENOMEM,
    errno.EINVAL: c.NBD_EINVAL,
    errno.ENOSPC: c.NBD_ENOSPC,
    errno.EDQUOT: c.NBD_ENOSPC,
    errno.EFBIG: c.NBD_ENOSPC,
    errno.EOVERFLOW: c.NBD_EOVERFLOW,
    errno.ENOTSUP: c.NBD_ENOTSUP,
    errno.ESHUTDOWN: c.NBD_ESHUTDOWN,
}


def nbd_error(errno_value: int | None) -> int:
    """The NBD error for an OS errno; anything without a better match is an I/O error."""
    return _ERRNO_TO_NBD.get(errno_value or errno.EIO, c.NBD_EIO)
