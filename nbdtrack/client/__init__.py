"""An asyncio NBD client: handshake, pipelined requests, all three reply styles.

The backup code builds on it, and tests use it for what the distribution's libnbd and
QEMU cannot do yet (extended headers, deliberately invalid requests). It knows the
protocol layer (constants, errors, events) and nothing of the server, exports or
storage.

    async with await connect("nbd://127.0.0.1/disk", meta_contexts=["base:allocation"]) as nbd:
        data = await nbd.pread(4096, 0)
        await nbd.pread_into(buffer, 0)  # into a buffer of yours, no copy on the way
        extents = await nbd.block_status(0, nbd.size)

Modules: ``uri`` (NBD URIs), ``errors`` (the exception hierarchy), ``handshake`` and
``transmission`` (sans-IO: bytes in, results out), ``connection`` (the asyncio part),
``tls`` (TLS contexts from a libnbd/QEMU-style certificates directory).
"""

from nbdtrack.client.connection import NBDClient, connect, list_exports, list_meta_contexts
from nbdtrack.client.errors import (
    ClientError,
    NBDConnectionError,
    NBDOptionError,
    NBDProtocolError,
    NBDRequestError,
)
from nbdtrack.client.handshake import BlockSize, ExportEntry, ExportInfo
from nbdtrack.client.tls import TLSConfigError, client_context
from nbdtrack.client.transmission import Extent, Reply
from nbdtrack.client.uri import NBDAddress, URIError, parse_uri
from nbdtrack.protocol.events import MetaContext, Mode

__all__ = [
    "BlockSize",
    "ClientError",
    "ExportEntry",
    "ExportInfo",
    "Extent",
    "MetaContext",
    "Mode",
    "NBDAddress",
    "NBDClient",
    "NBDConnectionError",
    "NBDOptionError",
    "NBDProtocolError",
    "NBDRequestError",
    "Reply",
    "TLSConfigError",
    "URIError",
    "client_context",
    "connect",
    "list_exports",
    "list_meta_contexts",
    "parse_uri",
]
