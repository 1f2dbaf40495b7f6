"""The server side of the fixed-newstyle NBD handshake, as a sans-IO state machine.

Theory of operation: the caller sends ``data_to_send()`` (the greeting first), feeds
every byte it reads to ``receive_data()`` and then sends ``data_to_send()`` again and
drains ``next_event()``. Option replies are produced here; the only decisions the
caller makes are through the ``ExportDirectory`` it passes in. A ``ProtocolError``
from ``receive_data`` means: close the connection now.

Phases:

    CLIENT_FLAGS --4 bytes--> OPTIONS --option--> OPTIONS | DRAINING | DONE | ABORTED
    DRAINING --all bytes of an oversized option--> OPTIONS
    OPTIONS --STARTTLS acknowledged--> STARTING_TLS --tls_started()--> OPTIONS

Options are dispatched through ``_OPTION_HANDLERS``; the few rules that depend on what
was negotiated before (plain newstyle clients, extended headers, structured replies)
sit in the handlers themselves. TLS (spec "TLS support"): with ``TLSMode.REQUIRE``
every option but STARTTLS and ABORT is answered ERR_TLS_REQD until TLS is up, and
EXPORT_NAME closes; with ``TLSMode.ON`` only exports marked ``tls_only`` are refused
(and hidden from LIST). The TLS handshake itself is the caller's: a ``StartTLS`` event
says "send the queued ACK, then upgrade the socket"; ``tls_started()`` then wipes what
was negotiated in plaintext, as the spec demands.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from nbdtrack.protocol import constants as c
from nbdtrack.protocol.contexts import list_contexts, select_contexts
from nbdtrack.protocol.errors import OptionError, ProtocolError
from nbdtrack.protocol.events import (
    HandshakeAborted,
    MetaContext,
    Mode,
    StartTLS,
    TransmissionReady,
)

SERVER_HANDSHAKE_FLAGS = c.NBD_FLAG_FIXED_NEWSTYLE | c.NBD_FLAG_NO_ZEROES
KNOWN_CLIENT_FLAGS = c.NBD_FLAG_C_FIXED_NEWSTYLE | c.NBD_FLAG_C_NO_ZEROES
# Longest option data we buffer by default; longer options are drained and refused
# (ERR_TOO_BIG).
MAX_OPTION_LENGTH = 1024 * 1024
# Options allowed before TLS when TLS is required (spec: FORCEDTLS).
_BEFORE_TLS = frozenset({c.NBD_OPT_STARTTLS, c.NBD_OPT_ABORT})


class ExportView(Protocol):
    """What the handshake needs to know of an export.

    With TLSMode.ON, a view whose ``tls_only`` attribute is true is reachable only over
    TLS; views without the attribute are reachable either way.
    """

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def size(self) -> int: ...

    def transmission_flags(self) -> int:
        """Flags without NBD_FLAG_SEND_DF (that one depends on the negotiated mode)."""
        ...

    def meta_contexts(self) -> Sequence[str]:
        """Every context name this export offers, in the order ids are given."""
        ...


class ExportDirectory(Protocol):
    def lookup(self, name: str) -> ExportView | None:
        """The export a client's name selects ("" is the default export), or None."""
        ...

    def listing(self) -> Iterable[ExportView]: ...


# Asked before GO/EXPORT_NAME enters an export: a reason to refuse it (ERR_POLICY), or
# None. The server's per-export connection limit lives behind it.
Admit = Callable[[ExportView], str | None]


class TLSMode(enum.Enum):
    """The spec's three server TLS modes."""

    OFF = "off"  # NOTLS: STARTTLS refused with ERR_POLICY
    ON = "on"  # SELECTIVETLS: TLS offered; only tls_only exports require it
    REQUIRE = "require"  # FORCEDTLS: nothing but STARTTLS and ABORT before TLS


class Phase(enum.Enum):
    CLIENT_FLAGS = "client flags"
    OPTIONS = "options"
    DRAINING = "draining"
    STARTING_TLS = "starting TLS"
    DONE = "done"
    ABORTED = "aborted"


class ServerHandshake:
    """Negotiates one connection up to the transmission phase."""

    def __init__(
        self,
        directory: ExportDirectory,
        *,
        tls: TLSMode = TLSMode.OFF,
        max_option_length: int = MAX_OPTION_LENGTH,
        max_name_length: int = c.NBD_MAX_STRING,
        admit: Admit | None = None,
    ) -> None:
        """``max_option_length`` bounds what one option may make us buffer; export names
        longer than ``max_name_length`` (at most 4096) are refused."""
        self._directory = directory
        self.tls = tls
        self.tls_active = False
        self._max_option_length = max_option_length
        self._max_name_length = min(max_name_length, c.NBD_MAX_STRING)
        self._admit = admit
        self._in = bytearray()
        self._out = bytearray(c.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, SERVER_HANDSHAKE_FLAGS))
        self._events: deque[TransmissionReady | HandshakeAborted | StartTLS] = deque()
        self.phase = Phase.CLIENT_FLAGS
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.mode = Mode.SIMPLE
        # (canonical export name, selected context names) from the last SET_META_CONTEXT
        self._selection: tuple[str, list[str]] | None = None
        self._drain_left = 0
        self._drain_option = 0

    # --- public surface ------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> TransmissionReady | HandshakeAborted | StartTLS | None:
        return self._events.popleft() if self._events else None

    def tls_started(self) -> None:
        """The caller finished the TLS handshake: negotiate again, from scratch."""
        if self.phase is not Phase.STARTING_TLS:
            raise ProtocolError(f"tls_started() in phase '{self.phase.value}'")
        self.tls_active = True
        self.mode = Mode.SIMPLE
        self._selection = None
        self.phase = Phase.OPTIONS

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the handshake ended: the start of transmission."""
        return bytes(self._in) if self.phase is Phase.DONE else b""

    def receive_data(self, data: bytes) -> None:
        if self.phase in (Phase.DONE, Phase.ABORTED):
            self._in += data
            return
        if self.phase is Phase.STARTING_TLS and data:
            # The client must wait for the ACK and then speak TLS: plaintext here is
            # either a broken client or an injection attempt.
            raise ProtocolError("plaintext data after NBD_OPT_STARTTLS")
        self._in += data
        while self._step():
            pass

    # --- the machine ---------------------------------------------------------------

    def _step(self) -> bool:
        """Consume one unit of input; return False when more bytes are needed."""
        if self.phase is Phase.CLIENT_FLAGS:
            return self._read_client_flags()
        if self.phase is Phase.OPTIONS:
            return self._read_option()
        if self.phase is Phase.DRAINING:
            return self._drain()
        return False

    def _read_client_flags(self) -> bool:
        if len(self._in) < c.CLIENT_FLAGS.size:
            return False
        (flags,) = c.CLIENT_FLAGS.unpack_from(self._in)
        del self._in[: c.CLIENT_FLAGS.size]
        if flags & ~KNOWN_CLIENT_FLAGS:
            raise ProtocolError(f"unknown client flags 0x{flags:08x}")
        self.fixed_newstyle = bool(flags & c.NBD_FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & c.NBD_FLAG_C_NO_ZEROES)
        self.phase = Phase.OPTIONS
        return True

    def _read_option(self) -> bool:
        if len(self._in) < c.OPTION_HEADER.size:
            return False
        magic, option, length = c.OPTION_HEADER.unpack_from(self._in)
        if magic != c.IHAVEOPT:
            raise ProtocolError(f"bad option magic 0x{magic:016x}")
        if not self.fixed_newstyle and option != c.NBD_OPT_EXPORT_NAME:
            raise ProtocolError(
                f"option {option_name(option)} from a client without fixed newstyle"
            )
        if option == c.NBD_OPT_EXPORT_NAME and self._tls_missing():
            raise ProtocolError("NBD_OPT_EXPORT_NAME before TLS")
        if length > self._max_option_length:
            if option == c.NBD_OPT_EXPORT_NAME:
                raise ProtocolError(f"NBD_OPT_EXPORT_NAME of {length} bytes")
            del self._in[: c.OPTION_HEADER.size]
            self._drain_left, self._drain_option = length, option
            self.phase = Phase.DRAINING
            return True
        end = c.OPTION_HEADER.size + length
        if len(self._in) < end:
            return False
        data = bytes(self._in[c.OPTION_HEADER.size : end])
        del self._in[:end]
        handler = _OPTION_HANDLERS.get(option, ServerHandshake._opt_unsupported)
        if self._tls_missing() and option not in _BEFORE_TLS:
            handler = ServerHandshake._opt_tls_required
        try:
            handler(self, option, data)
        except OptionError as err:
            self._reply_error(option, err)
        return self.phase is Phase.OPTIONS

    def _tls_missing(self) -> bool:
        """True while TLS is required for every option and not running yet."""
        return self.tls is TLSMode.REQUIRE and not self.tls_active

    def _drain(self) -> bool:
        take = min(self._drain_left, len(self._in))
        del self._in[:take]
        self._drain_left -= take
        if self._drain_left:
            return False
        self.phase = Phase.OPTIONS
        if self._tls_missing() and self._drain_option not in _BEFORE_TLS:
            err = OptionError(c.NBD_REP_ERR_TLS_REQD, "TLS is required")
        else:
            err = OptionError(c.NBD_REP_ERR_TOO_BIG, "option data too large")
        self._reply_error(self._drain_option, err)
        return True

    # --- replies -------------------------------------------------------------------

    def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._out += c.OPTION_REPLY_HEADER.pack(c.OPTION_REPLY_MAGIC, option, reply, len(payload))
        self._out += payload

    def _reply_error(self, option: int, err: OptionError) -> None:
        message = err.message.encode()[: c.NBD_MAX_STRING]
        self._reply(option, err.reply, message)

    def _flags_for(self, export: ExportView) -> int:
        flags = export.transmission_flags() | c.NBD_FLAG_HAS_FLAGS
        if self.mode is not Mode.SIMPLE:
            flags |= c.NBD_FLAG_SEND_DF
        return flags

    def _lookup(self, name: str) -> ExportView:
        self._check_name(name)
        export = self._directory.lookup(name)
        if export is None:
            raise OptionError(c.NBD_REP_ERR_UNKNOWN, f"export '{name}' not present")
        if self._needs_tls(export):
            raise OptionError(c.NBD_REP_ERR_TLS_REQD, f"export '{name}' requires TLS")
        return export

    def _check_name(self, name: str) -> None:
        if len(name.encode()) > self._max_name_length:
            raise OptionError(
                c.NBD_REP_ERR_INVALID, f"export name longer than {self._max_name_length} bytes"
            )

    def _needs_tls(self, export: ExportView) -> bool:
        if self.tls_active or self.tls is TLSMode.OFF:
            return False
        return self.tls is TLSMode.REQUIRE or bool(getattr(export, "tls_only", False))

    def _check_admission(self, export: ExportView) -> None:
        refusal = self._admit(export) if self._admit is not None else None
        if refusal is not None:
            raise OptionError(c.NBD_REP_ERR_POLICY, refusal)

    # --- option handlers -----------------------------------------------------------

    def _opt_unsupported(self, option: int, data: bytes) -> None:
        raise OptionError(c.NBD_REP_ERR_UNSUP, f"option {option_name(option)} unsupported")

    def _opt_tls_required(self, option: int, data: bytes) -> None:
        raise OptionError(c.NBD_REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")

    def _opt_export_name(self, option: int, data: bytes) -> None:
        # Every failure closes: EXPORT_NAME has no way to report one.
        if self.mode is Mode.EXTENDED:
            raise ProtocolError("NBD_OPT_EXPORT_NAME after extended headers")
        try:
            name = decode_string(data)
            self._check_name(name)
        except OptionError as err:
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME: {err.message}") from None
        export = self._directory.lookup(name)
        if export is None:
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME: export '{name}' not present")
        if self._needs_tls(export):
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME: export '{name}' requires TLS")
        try:
            self._check_admission(export)
        except OptionError as err:
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME: {err.message}") from None
        self._out += c.EXPORT_NAME_REPLY.pack(export.size, self._flags_for(export))
        if not self.no_zeroes:
            self._out += bytes(124)
        self._finish(export)

    def _opt_abort(self, option: int, data: bytes) -> None:
        self._reply(option, c.NBD_REP_ACK)
        self.phase = Phase.ABORTED
        self._events.append(HandshakeAborted())

    def _opt_list(self, option: int, data: bytes) -> None:
        expect_empty(option, data)
        for export in self._directory.listing():
            if self._needs_tls(export):
                continue  # TLS-only exports are not even named in plaintext
            name = export.name.encode()
            self._reply(
                option,
                c.NBD_REP_SERVER,
                c.U32.pack(len(name)) + name + export.description.encode(),
            )
        self._reply(option, c.NBD_REP_ACK)

    def _opt_starttls(self, option: int, data: bytes) -> None:
        expect_empty(option, data)
        if self.tls is TLSMode.OFF:
            raise OptionError(c.NBD_REP_ERR_POLICY, "TLS not configured")
        if self.tls_active:
            raise OptionError(c.NBD_REP_ERR_INVALID, "TLS already negotiated")
        if self._in:
            raise ProtocolError("data after NBD_OPT_STARTTLS before its reply")
        self._reply(option, c.NBD_REP_ACK)
        self.phase = Phase.STARTING_TLS
        self._events.append(StartTLS())

    def _opt_info_or_go(self, option: int, data: bytes) -> None:
        name, requests = parse_info_request(data)
        export = self._lookup(name)
        if option == c.NBD_OPT_GO:
            self._check_admission(export)
        if c.NBD_INFO_NAME in requests:
            self._info(option, c.NBD_INFO_NAME, export.name.encode())
        if export.description:
            self._info(option, c.NBD_INFO_DESCRIPTION, export.description.encode())
        self._out += c.OPTION_REPLY_HEADER.pack(
            c.OPTION_REPLY_MAGIC, option, c.NBD_REP_INFO, c.INFO_BLOCK_SIZE.size
        )
        self._out += c.INFO_BLOCK_SIZE.pack(
            c.NBD_INFO_BLOCK_SIZE, c.MIN_BLOCK, c.PREFERRED_BLOCK, c.MAX_PAYLOAD
        )
        self._out += c.OPTION_REPLY_HEADER.pack(
            c.OPTION_REPLY_MAGIC, option, c.NBD_REP_INFO, c.INFO_EXPORT.size
        )
        self._out += c.INFO_EXPORT.pack(c.NBD_INFO_EXPORT, export.size, self._flags_for(export))
        self._reply(option, c.NBD_REP_ACK)
        if option == c.NBD_OPT_GO:
            self._finish(export)

    def _info(self, option: int, info: int, payload: bytes) -> None:
        self._reply(option, c.NBD_REP_INFO, c.U16.pack(info) + payload[: c.NBD_MAX_STRING])

    def _opt_structured_reply(self, option: int, data: bytes) -> None:
        expect_empty(option, data)
        if self.mode is Mode.EXTENDED:
            raise OptionError(c.NBD_REP_ERR_EXT_HEADER_REQD, "extended headers already negotiated")
        if self.mode is Mode.STRUCTURED:
            raise OptionError(c.NBD_REP_ERR_INVALID, "structured replies already negotiated")
        self.mode = Mode.STRUCTURED
        self._reply(option, c.NBD_REP_ACK)

    def _opt_extended_headers(self, option: int, data: bytes) -> None:
        expect_empty(option, data)
        if self.mode is Mode.EXTENDED:
            raise OptionError(c.NBD_REP_ERR_INVALID, "extended headers already negotiated")
        self.mode = Mode.EXTENDED
        self._reply(option, c.NBD_REP_ACK)

    def _opt_meta_context(self, option: int, data: bytes) -> None:
        setting = option == c.NBD_OPT_SET_META_CONTEXT
        if setting:
            self._selection = None  # a SET replaces the selection even when it fails
            if self.mode is Mode.SIMPLE:
                raise OptionError(c.NBD_REP_ERR_INVALID, "structured replies not negotiated")
        name, queries = parse_meta_context_request(data)
        export = self._lookup(name)
        available = list(export.meta_contexts())
        if setting:
            chosen = select_contexts(available, queries)
            for ctx in chosen:
                self._reply(
                    option,
                    c.NBD_REP_META_CONTEXT,
                    c.U32.pack(available.index(ctx)) + ctx.encode(),
                )
            self._selection = (export.name, chosen)
        else:
            for ctx in list_contexts(available, queries):
                self._reply(option, c.NBD_REP_META_CONTEXT, c.U32.pack(0) + ctx.encode())
        self._reply(option, c.NBD_REP_ACK)

    def _finish(self, export: ExportView) -> None:
        contexts: tuple[MetaContext, ...] = ()
        if self._selection is not None and self._selection[0] == export.name:
            available = list(export.meta_contexts())
            contexts = tuple(
                MetaContext(available.index(name), name)
                for name in self._selection[1]
                if name in available
            )
        self.phase = Phase.DONE
        self._events.append(TransmissionReady(export.name, self.mode, contexts))


_OPTION_HANDLERS: dict[int, Callable[[ServerHandshake, int, bytes], None]] = {
    c.NBD_OPT_EXPORT_NAME: ServerHandshake._opt_export_name,
    c.NBD_OPT_ABORT: ServerHandshake._opt_abort,
    c.NBD_OPT_LIST: ServerHandshake._opt_list,
    c.NBD_OPT_STARTTLS: ServerHandshake._opt_starttls,
    c.NBD_OPT_INFO: ServerHandshake._opt_info_or_go,
    c.NBD_OPT_GO: ServerHandshake._opt_info_or_go,
    c.NBD_OPT_STRUCTURED_REPLY: ServerHandshake._opt_structured_reply,
    c.NBD_OPT_LIST_META_CONTEXT: ServerHandshake._opt_meta_context,
    c.NBD_OPT_SET_META_CONTEXT: ServerHandshake._opt_meta_context,
    c.NBD_OPT_EXTENDED_HEADERS: ServerHandshake._opt_extended_headers,
}


# --- option payload parsers (pure functions, also used by tests) ------------------------


def option_name(option: int) -> str:
    return "NBD_OPT_" + c.OPTION_NAMES.get(option, str(option))


def expect_empty(option: int, data: bytes) -> None:
    if data:
        raise OptionError(c.NBD_REP_ERR_INVALID, f"{option_name(option)} takes no data")


def decode_string(raw: bytes) -> str:
    """A name or query: at most 4096 bytes of UTF-8 without NUL."""
    if len(raw) > c.NBD_MAX_STRING:
        raise OptionError(c.NBD_REP_ERR_INVALID, "string longer than 4096 bytes")
    if b"\0" in raw:
        raise OptionError(c.NBD_REP_ERR_INVALID, "string contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(c.NBD_REP_ERR_INVALID, "string is not UTF-8") from None


def _take_string(data: bytes, pos: int, what: str) -> tuple[bytes, int]:
    if pos + 4 > len(data):
        raise OptionError(c.NBD_REP_ERR_INVALID, f"{what} length missing")
    (length,) = c.U32.unpack_from(data, pos)
    pos += 4
    if length > len(data) - pos:
        raise OptionError(c.NBD_REP_ERR_INVALID, f"{what} runs past the option data")
    return data[pos : pos + length], pos + length


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """NBD_OPT_INFO / NBD_OPT_GO data: name, then the requested info types."""
    raw, pos = _take_string(data, 0, "export name")
    if pos + 2 > len(data):
        raise OptionError(c.NBD_REP_ERR_INVALID, "number of info requests missing")
    (count,) = c.U16.unpack_from(data, pos)
    pos += 2
    if len(data) != pos + 2 * count:
        raise OptionError(c.NBD_REP_ERR_INVALID, "info request list has the wrong length")
    requests = [c.U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)]
    return decode_string(raw), requests


def parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """LIST/SET_META_CONTEXT data: export name, then the queries.

    Queries longer than 4096 bytes or not UTF-8 are skipped, as QEMU skips them.
    """
    raw, pos = _take_string(data, 0, "export name")
    if pos + 4 > len(data):
        raise OptionError(c.NBD_REP_ERR_INVALID, "number of queries missing")
    (count,) = c.U32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        query, pos = _take_string(data, pos, "query")
        try:
            queries.append(decode_string(query))
        except OptionError:
            continue
    if pos != len(data):
        raise OptionError(c.NBD_REP_ERR_INVALID, "bytes left after the last query")
    return decode_string(raw), queries
