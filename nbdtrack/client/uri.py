"""NBD URIs (the NBD project's doc/uri.md) and the other ways to name a server.

``nbd://host[:port][/export]`` and ``nbd+unix:///export?socket=PATH``. The export name
is the path without its first ``/``, percent-decoded (``nbd://h//disk`` names
``/disk``). TLS schemes are refused because this client cannot do TLS; unknown query
parameters are refused as the URI spec asks, so a typo is not silently ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

DEFAULT_PORT = 10809

# tls-* parameters only matter once TLS is negotiated, which the plain schemes only do
# opportunistically; without TLS support they have no effect and are accepted.
_TLS_PARAMETERS = frozenset({"tls-type", "tls-hostname", "tls-verify-peer", "tls-psk-file"})


class URIError(ValueError):
    """Not an NBD URI this client can use."""


@dataclass(frozen=True, slots=True)
class NBDAddress:
    """Where a server listens (TCP ``host``/``port`` or a unix ``socket``), and the export."""

    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    export: str = ""

    def uri(self) -> str:
        """The address as an NBD URI (what ``parse_uri`` turns back into this address)."""
        name = quote(self.export, safe="")
        if self.socket is not None:
            return f"nbd+unix:///{name}?socket={quote(self.socket, safe='/')}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"


def parse_uri(uri: str) -> NBDAddress:
    """Split an ``nbd://`` or ``nbd+unix://`` URI into an address."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as err:
        raise URIError(f"'{uri}': {err}") from None
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix"):
        raise URIError(f"'{uri}': TLS ({scheme}://) is not supported by this client")
    if scheme not in ("nbd", "nbd+unix"):
        raise URIError(f"'{uri}': not an NBD URI (scheme must be nbd or nbd+unix)")
    if parts.fragment:
        raise URIError(f"'{uri}': NBD URIs have no fragment")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    params = _query(uri, parts.query)
    if scheme == "nbd+unix":
        if parts.netloc:
            raise URIError(f"'{uri}': nbd+unix URIs take no host (use nbd+unix:///export)")
        socket_path = params.pop("socket", None)
        if not socket_path:
            raise URIError(f"'{uri}': nbd+unix URIs need ?socket=PATH")
        _refuse_unknown(uri, params)
        return NBDAddress(socket=socket_path, export=export)
    if "socket" in params:
        raise URIError(f"'{uri}': ?socket= needs the nbd+unix scheme")
    _refuse_unknown(uri, params)
    return NBDAddress(
        host=parts.hostname or "localhost",
        port=DEFAULT_PORT if port is None else port,
        export=export,
    )


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
        address = NBDAddress(address.host, address.port, address.socket, export)
    return address
