"""NBD URIs (the NBD project's doc/uri.md) and the other ways to name a server.

``nbd://host[:port][/export]`` and ``nbd+unix:///export?socket=PATH``; ``nbds://`` and
``nbds+unix://`` require TLS. The export name is the path without its first ``/``,
percent-decoded (``nbd://h//disk`` names ``/disk``). TLS parameters as libnbd reads
them: ``tls-certificates=DIR`` (ca-cert.pem, client-cert.pem, client-key.pem),
``tls-verify-peer=false``, ``tls-hostname=NAME``; PSK is not supported. Unknown query
parameters are refused as the URI spec asks, so a typo is not silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

DEFAULT_PORT = 10809

# tls-* parameters only matter once TLS is negotiated, which the plain schemes never do
# here: on nbd:// they are accepted and have no effect.
_TLS_PARAMETERS = frozenset(
    {"tls-type", "tls-hostname", "tls-verify-peer", "tls-psk-file", "tls-certificates"}
)
_FALSE = ("false", "off", "no", "0")
_TRUE = ("true", "on", "yes", "1")


class URIError(ValueError):
    """Not an NBD URI this client can use."""


@dataclass(frozen=True, slots=True)
class NBDAddress:
    """Where a server listens (TCP ``host``/``port`` or a unix ``socket``), and the export."""

    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    export: str = ""
    tls: bool = False  # nbds: STARTTLS must succeed
    tls_certificates: str | None = None
    tls_verify_peer: bool = True
    tls_hostname: str | None = None

    def uri(self) -> str:
        """The address as an NBD URI (what ``parse_uri`` turns back into this address)."""
        name = quote(self.export, safe="")
        scheme = "nbds" if self.tls else "nbd"
        params = []
        if self.socket is not None:
            params.append(f"socket={quote(self.socket, safe='/')}")
        if self.tls_certificates is not None:
            params.append(f"tls-certificates={quote(self.tls_certificates, safe='/')}")
        if not self.tls_verify_peer:
            params.append("tls-verify-peer=false")
        if self.tls_hostname is not None:
            params.append(f"tls-hostname={quote(self.tls_hostname, safe='')}")
        query = "?" + "&".join(params) if params else ""
        if self.socket is not None:
            return f"{scheme}+unix:///{name}{query}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{name}{query}"


def parse_uri(uri: str) -> NBDAddress:
    """Split an ``nbd://`` or ``nbd+unix://`` URI into an address."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as err:
        raise URIError(f"'{uri}': {err}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("nbd", "nbd+unix", "nbds", "nbds+unix"):
        raise URIError(f"'{uri}': not an NBD URI (scheme must be nbd, nbds, nbd+unix or nbds+unix)")
    if parts.fragment:
        raise URIError(f"'{uri}': NBD URIs have no fragment")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    params = _query(uri, parts.query)
    tls = _tls_options(uri, params) if scheme.startswith("nbds") else {}
    if scheme.endswith("+unix"):
        if parts.netloc:
            raise URIError(f"'{uri}': {scheme} URIs take no host (use {scheme}:///export)")
        socket_path = params.pop("socket", None)
        if not socket_path:
            raise URIError(f"'{uri}': {scheme} URIs need ?socket=PATH")
        _refuse_unknown(uri, params)
        return NBDAddress(socket=socket_path, export=export, **tls)
    if "socket" in params:
        raise URIError(f"'{uri}': ?socket= needs the nbd+unix scheme")
    _refuse_unknown(uri, params)
    return NBDAddress(
        host=parts.hostname or "localhost",
        port=DEFAULT_PORT if port is None else port,
        export=export,
        **tls,
    )


def _tls_options(uri: str, params: dict[str, str]) -> dict:
    """The NBDAddress fields of an nbds URI's tls-* parameters (they are consumed)."""
    if "tls-psk-file" in params:
        raise URIError(f"'{uri}': TLS with a pre-shared key (tls-psk-file) is not supported")
    if params.get("tls-type", "x509") != "x509":
        raise URIError(f"'{uri}': tls-type must be x509")
    params.pop("tls-type", None)
    options: dict = {"tls": True}
    if "tls-certificates" in params:
        options["tls_certificates"] = params.pop("tls-certificates")
    if "tls-hostname" in params:
        options["tls_hostname"] = params.pop("tls-hostname")
    verify = params.pop("tls-verify-peer", "true").lower()
    if verify not in _TRUE + _FALSE:
        raise URIError(f"'{uri}': tls-verify-peer must be true or false")
    options["tls_verify_peer"] = verify in _TRUE
    return options


def _query(uri: str, query: str) -> dict[str, str]:
    # Not parse_qs: RFC 3986 has no "+ means space" rule, and socket paths may hold '+'.
    params: dict[str, str] = {}
    for item in query.split("&") if query else ():
        key, _, value = item.partition("=")
        key = unquote(key)
        if key in params:
            raise URIError(f"'{uri}': query parameter '{key}' given twice")
        params[key] = unquote(value)
    return params


def _refuse_unknown(uri: str, params: dict[str, str]) -> None:
    unknown = sorted(set(params) - _TLS_PARAMETERS)
    if unknown:
        raise URIError(f"'{uri}': unknown query parameter '{unknown[0]}'")


def resolve_address(
    target: str | os.PathLike[str] | tuple[str, int] | NBDAddress, export: str | None = None
) -> NBDAddress:
    """Any accepted form of server address → ``NBDAddress``; ``export`` overrides the URI's.

    Accepted: an NBD URI, a ``(host, port)`` tuple, a unix socket path, an ``NBDAddress``.
    """
    if isinstance(target, NBDAddress):
        address = target
    elif isinstance(target, tuple):
        host, port = target
        address = NBDAddress(host=host, port=int(port))
    else:
        text = os.fspath(target)
        address = parse_uri(text) if "://" in text else NBDAddress(socket=text)
    if export is not None:
        address = dataclasses.replace(address, export=export)
    return address
