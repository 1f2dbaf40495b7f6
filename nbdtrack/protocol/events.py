"""Small immutable events that the sans-IO protocol hands to its caller."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nbdtrack.protocol.errors import RequestError


class Mode(enum.IntEnum):
    """Which header style transmission uses, fixed at the end of the handshake."""

    SIMPLE = 0  # simple replies only (the kernel, old clients)
    STRUCTURED = 1  # compact requests, structured reply chunks
    EXTENDED = 2  # 64-bit requests and extended reply chunks


@dataclass(frozen=True, slots=True)
class MetaContext:
    """One negotiated metadata context: the id the client sees and the full name."""

    id: int
    name: str


@dataclass(frozen=True, slots=True)
class TransmissionReady:
    """The handshake finished (GO acknowledged or EXPORT_NAME answered)."""

    export_name: str
    mode: Mode
    contexts: tuple[MetaContext, ...]


@dataclass(frozen=True, slots=True)
class StartTLS:
    """STARTTLS was acknowledged (the ACK is queued): send it, then run the TLS handshake
    on the socket and call ``tls_started()``; no plaintext byte may be fed meanwhile."""


@dataclass(frozen=True, slots=True)
class HandshakeAborted:
    """The client sent NBD_OPT_ABORT: the ACK is queued, then the connection closes."""


@dataclass(slots=True)
class Request:
    """One transmission request, complete with its payload.

    ``error`` is set when the request was malformed at the wire level but the stream
    stayed in sync (its payload was drained): the server answers it with that error.
    """

    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes | memoryview | None = None
    error: RequestError | None = None
