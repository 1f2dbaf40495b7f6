"""TLS for the NBD server: the SSL context and the allow-list of client certificates.

Owns building the ``ssl.SSLContext`` (TLS 1.2 or later, the server's certificate and
key, client certificates required and checked against a CA when one is given) and
deciding whether a verified client certificate's subject is on the allow-list. The
upgrade itself (STARTTLS) is ``connection.py``'s. Nothing here logs or keeps key
material: only file names appear in messages.

Allow-list entries: a plain name (``backup1``) matches a certificate whose subject
common name (CN) is exactly that; an entry with ``=`` is a distinguished name such as
``CN=backup1,O=Example Corp`` and matches a subject with exactly those attributes, in
any order (short names CN, O, OU, C, ST, L, DC, UID, emailAddress/E, ...; ``\\,``
escapes a comma in a value). Matching is exact and case-sensitive for values.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from collections import Counter
from dataclasses import dataclass, field

from nbdtrack.protocol.handshake import TLSMode

log = logging.getLogger("nbdtrack.tls")

# Short attribute names as people write them in DNs -> the long names ssl reports.
_LONG_NAMES = {
    "cn": "commonName",
    "o": "organizationName",
    "ou": "organizationalUnitName",
    "c": "countryName",
    "st": "stateOrProvinceName",
    "l": "localityName",
    "street": "streetAddress",
    "dc": "domainComponent",
    "uid": "userId",
    "e": "emailAddress",
    "emailaddress": "emailAddress",
    "serialnumber": "serialNumber",
    "title": "title",
    "gn": "givenName",
    "sn": "surname",
}
_SHORT_NAMES = {long.lower(): short.upper() for short, long in _LONG_NAMES.items()}
_SHORT_NAMES["emailaddress"] = "emailAddress"

Attribute = tuple[str, str]  # (lower-case long attribute name, value)


class TLSSetupError(Exception):
    """The TLS configuration cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class SubjectPattern:
    """One allow-list entry: the attributes a client certificate's subject must have."""

    text: str
    attributes: tuple[Attribute, ...]
    cn_only: bool

    def matches(self, subject: list[Attribute]) -> bool:
        if self.cn_only:
            name = self.attributes[0][1]
            return any(key == "commonname" and value == name for key, value in subject)
        return Counter(subject) == Counter(self.attributes)


@dataclass(frozen=True)
class TLSSettings:
    """What the server needs per connection: the mode, the context, the allow-list."""

    mode: TLSMode = TLSMode.OFF
    context: ssl.SSLContext | None = None
    allow: tuple[SubjectPattern, ...] = field(default_factory=tuple)

    @property
    def verifies_clients(self) -> bool:
        return self.context is not None and self.context.verify_mode == ssl.CERT_REQUIRED


def _key_name(name: str) -> str:
    name = name.strip()
    return _LONG_NAMES.get(name.lower(), name).lower()


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, current, escaped = [], [], False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if escaped:
        raise ValueError("ends with a lone backslash")
    parts.append("".join(current))
    return parts


def parse_subject_pattern(text: str) -> SubjectPattern:
    """An allow-list entry: ``NAME`` (a common name) or ``CN=NAME,O=ORG,...``."""
    if not text.strip():
        raise ValueError("empty subject")
    if "=" not in text:
        return SubjectPattern(text, (("commonname", text),), cn_only=True)
    attributes = []
    for part in _split_unescaped(text, ","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"'{part}' is not KEY=VALUE")
        attributes.append((_key_name(key), value.strip()))
    return SubjectPattern(text, tuple(attributes), cn_only=False)


def subject_attributes(peercert: dict) -> list[Attribute]:
    """The subject of ``SSLObject.getpeercert()`` as (long name, value) pairs."""
    return [
        (str(key).lower(), str(value))
        for rdn in peercert.get("subject", ())
        for key, value in rdn
    ]


def format_subject(attributes: list[Attribute]) -> str:
    """``CN=...,O=...`` in the certificate's order, for logs and error messages."""
    parts = []
    for key, value in attributes:
        name = _SHORT_NAMES.get(key, key)
        parts.append(f"{name}={value.replace(',', chr(92) + ',')}")
    return ",".join(parts) or "(empty subject)"


def allowed_subject(peercert: dict, allow: tuple[SubjectPattern, ...]) -> bool:
    """True when no allow-list is set, or the certificate's subject is on it."""
    if not allow:
        return True
    subject = subject_attributes(peercert)
    return any(pattern.matches(subject) for pattern in allow)


def _no_password() -> bytes:
    return b""  # an encrypted key then fails to load instead of prompting on a TTY


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """The server's TLS context; raises TLSSetupError naming the file that is wrong."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for path, what in ((cert, "certificate"), (key, "key")):
        if not os.path.isfile(path):
            raise TLSSetupError(f"TLS {what} '{path}' does not exist")
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, OSError) as err:
        raise TLSSetupError(
            f"cannot load TLS certificate '{cert}' with key '{key}': {_reason(err)}"
        ) from None
    _warn_if_exposed(key)
    if ca:
        if not os.path.isfile(ca):
            raise TLSSetupError(f"TLS CA certificate '{ca}' does not exist")
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as err:
            raise TLSSetupError(f"cannot load TLS CA certificate '{ca}': {_reason(err)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _reason(err: Exception) -> str:
    if isinstance(err, ssl.SSLError) and err.reason:
        return err.reason.lower().replace("_", " ")
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)


def _warn_if_exposed(key: str) -> None:
    try:
        mode = os.stat(key).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("TLS key %s can be read by group or others: chmod 600 it", key)


def make_settings(
    mode: TLSMode,
    cert: str | None = None,
    key: str | None = None,
    ca: str | None = None,
    allow: list[str] | tuple[str, ...] = (),
) -> TLSSettings:
    """Validate a TLS configuration and build its settings (TLSSetupError if unusable)."""
    if mode is TLSMode.OFF:
        if allow or ca:
            raise TLSSetupError("--tls-ca and --tls-allow need --tls=on or --tls=require")
        return TLSSettings()
    if not cert or not key:
        raise TLSSetupError(f"--tls={mode.value} needs --tls-cert and --tls-key")
    if allow and not ca:
        raise TLSSetupError("--tls-allow needs --tls-ca: only verified certificates can match")
    patterns = []
    for text in allow:
        try:
            patterns.append(parse_subject_pattern(text))
        except ValueError as err:
            raise TLSSetupError(f"--tls-allow '{text}': {err}") from None
    return TLSSettings(mode, server_context(cert, key, ca), tuple(patterns))
