"""TLS contexts for the client, from a certificates directory as libnbd and QEMU use it.

The directory holds ``ca-cert.pem`` (the CA that signed the server's certificate),
and optionally ``client-cert.pem`` and ``client-key.pem`` (our identity, for servers
that require client certificates). Without a directory the system's CAs are trusted.
Nothing here reads or logs key material beyond handing the file to ``ssl``.
"""

from __future__ import annotations

import os
import ssl

from nbdtrack.client.errors import ClientError

CA_CERT = "ca-cert.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"


class TLSConfigError(ClientError):
    """The client's TLS files cannot be used."""


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load instead of prompting on a terminal


def client_context(certificates: str | None = None, verify_peer: bool = True) -> ssl.SSLContext:
    """A TLS ≥ 1.2 client context: trust ``certificates``/ca-cert.pem (or the system's
    CAs), present client-cert.pem/client-key.pem when both exist."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ca = os.path.join(certificates, CA_CERT) if certificates else None
        if ca is not None and os.path.exists(ca):
            ctx.load_verify_locations(cafile=ca)
        else:
            if certificates is not None and not os.path.isdir(certificates):
                raise TLSConfigError(f"TLS certificates directory '{certificates}' does not exist")
            ctx.load_default_certs()
        if certificates:
            cert = os.path.join(certificates, CLIENT_CERT)
            key = os.path.join(certificates, CLIENT_KEY)
            if os.path.exists(cert) and os.path.exists(key):
                ctx.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, OSError) as err:
        raise TLSConfigError(f"cannot load TLS files from '{certificates}': {err}") from None
    if not verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
