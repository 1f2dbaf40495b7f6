"""The client side of the fixed-newstyle NBD handshake, as a sans-IO state machine.

Theory of operation (the mirror of ``nbdtrack.protocol.handshake``): build a
``ClientHandshake`` from a plan (``Negotiate``, ``ListExports`` or ``ListMetaContexts``),
send ``data_to_send()``, feed every byte the server sends to ``receive_data()`` and send
``data_to_send()`` again, until ``done``; ``result`` then holds what the plan produced
(an ``ExportInfo``, a list of ``ExportEntry``, a list of context names). Bytes that
arrive after the end are kept in ``trailing_data`` for the transmission phase.

The negotiation itself is one generator per plan that reads top to bottom like the
option sequence it sends, fallbacks included (QEMU's and libnbd's order)::

    greeting -> client flags -> [EXTENDED_HEADERS, on any error STRUCTURED_REPLY,
    on any error simple] -> [SET_META_CONTEXT] -> GO (+ BLOCK_SIZE, NAME, DESCRIPTION)
    -> on ERR_UNSUP only: EXPORT_NAME

With ``starttls=True`` every plan starts with NBD_OPT_STARTTLS: once it is
acknowledged, ``tls_requested`` turns true and the machine waits (no byte in or out)
until the caller has run the TLS handshake on the socket and called
``tls_established()``; any refusal of STARTTLS ends the handshake with its error.

``_read(n)`` suspends the generator until n bytes have arrived. Errors: a reply that
breaks the protocol raises ``NBDProtocolError``; a refused option that has no fallback
raises ``NBDOptionError``; the caller must then close the connection.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

from nbdtrack.client.errors import ClientError, NBDOptionError, NBDProtocolError
from nbdtrack.protocol import constants as c
from nbdtrack.protocol.events import MetaContext, Mode

# Longest option reply payload we accept (libnbd's limit): anything longer is hostile.
MAX_OPTION_REPLY = 64 * 1024 * 1024
_START_TLS = -1  # what the generator yields to ask for the TLS upgrade
_KNOWN_INFOS = (c.NBD_INFO_BLOCK_SIZE, c.NBD_INFO_NAME, c.NBD_INFO_DESCRIPTION)


@dataclass(frozen=True, slots=True)
class BlockSize:
    """The server's size constraints (NBD_INFO_BLOCK_SIZE), or the spec's defaults."""

    minimum: int = c.MIN_BLOCK
    preferred: int = c.PREFERRED_BLOCK
    maximum: int = c.MAX_PAYLOAD


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """Everything the handshake learned about the export it entered."""

    name: str  # the name the client asked for
    size: int
    flags: int  # transmission flags
    mode: Mode
    block_size: BlockSize
    contexts: tuple[MetaContext, ...] = ()
    canonical_name: str | None = None  # NBD_INFO_NAME, when the server sent it
    description: str = ""
    used_go: bool = True  # False: entered with NBD_OPT_EXPORT_NAME


@dataclass(frozen=True, slots=True)
class ExportEntry:
    """One NBD_REP_SERVER answer to NBD_OPT_LIST."""

    name: str
    description: str = ""


# --- plans ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Negotiate:
    """Enter transmission on ``export``.

    ``extended`` tries NBD_OPT_EXTENDED_HEADERS first, ``structured`` then (or as the
    fallback) NBD_OPT_STRUCTURED_REPLY. ``go=False`` sends NBD_OPT_EXPORT_NAME straight
    away as ``nbd-client -g`` does; it rules out extended headers, which forbid it.
    """

    export: str = ""
    structured: bool = True
    extended: bool = True
    meta_contexts: tuple[str, ...] = ()
    full_info: bool = True  # also ask for NBD_INFO_NAME and NBD_INFO_DESCRIPTION
    go: bool = True


@dataclass(frozen=True, slots=True)
class ListExports:
    """NBD_OPT_LIST, then NBD_OPT_ABORT."""


@dataclass(frozen=True, slots=True)
class ListMetaContexts:
    """NBD_OPT_LIST_META_CONTEXT (after negotiating structured replies), then ABORT."""

    export: str = ""
    queries: tuple[str, ...] = ()
    structured: bool = True
    extended: bool = True


Plan = Negotiate | ListExports | ListMetaContexts
_Steps = Generator[int, None, object]


class ClientHandshake:
    """Drives one connection from the greeting to transmission (or to ABORT)."""

    def __init__(self, plan: Plan, starttls: bool = False) -> None:
        self.plan = plan
        self.starttls = starttls
        self.tls_requested = False  # waiting for the caller's TLS handshake
        self.tls_active = False
        self._in = bytearray()
        self._out = bytearray()
        self.done = False
        self.result: object = None
        self.mode = Mode.SIMPLE
        self.fixed_newstyle = False
        self.no_zeroes = False
        _check_strings(plan)  # fail here, not halfway through the handshake
        self._steps = self._run(plan)
        self._advance()

    # --- public surface ------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.tls_requested and data:
            raise NBDProtocolError("plaintext from the server after NBD_OPT_STARTTLS")
        self._in += data
        if not self.done:
            self._advance()

    def tls_established(self) -> None:
        """The caller upgraded the socket to TLS: negotiate the rest over it."""
        if not self.tls_requested:
            raise ClientError("tls_established() without a STARTTLS in progress")
        self.tls_requested = False
        self.tls_active = True
        self._advance()

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the handshake ended: the start of transmission."""
        return bytes(self._in) if self.done else b""

    # --- the generator driver --------------------------------------------------------

    def _advance(self) -> None:
        try:
            need = next(self._steps)  # runs until _read() needs more bytes
        except StopIteration as stop:
            self.done = True
            self.result = stop.value
            return
        if need == _START_TLS:
            self.tls_requested = True

    def _read(self, count: int) -> Generator[int, None, bytes]:
        while len(self._in) < count:
            yield count
        data = bytes(self._in[:count])
        del self._in[:count]
        return data

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._out += c.OPTION_HEADER.pack(c.IHAVEOPT, option, len(data)) + data

    def _option(
        self, option: int, data: bytes = b"", allowed: Sequence[int] = ()
    ) -> Generator[int, None, tuple[list[bytes], NBDOptionError | None]]:
        """Send one option; collect its replies until the final ACK or error.

        Returns the payloads of the non-final replies (of the types in ``allowed``)
        and the refusal, if the final reply was an error: the caller decides on the
        fallback.
        """
        self._send_option(option, data)
        payloads = []
        while True:
            header = yield from self._read(c.OPTION_REPLY_HEADER.size)
            magic, echoed, reply, length = c.OPTION_REPLY_HEADER.unpack(header)
            name = option_name(option)
            if magic != c.OPTION_REPLY_MAGIC:
                raise NBDProtocolError(f"bad option reply magic 0x{magic:x} to {name}")
            if echoed != option:
                raise NBDProtocolError(f"reply to {option_name(echoed)} while waiting for {name}")
            if length > MAX_OPTION_REPLY:
                raise NBDProtocolError(f"option reply of {length} bytes to {name}")
            payload = yield from self._read(length)
            if reply == c.NBD_REP_ACK:
                if payload:
                    raise NBDProtocolError(f"NBD_REP_ACK to {name} with a {length}-byte payload")
                return payloads, None
            if reply & c.NBD_REP_FLAG_ERROR:
                return payloads, NBDOptionError(option, reply, text(payload))
            if reply not in allowed:
                raise NBDProtocolError(f"unexpected reply type {reply} to {name}")
            payloads.append(payload)

    # --- plans -----------------------------------------------------------------------

    def _run(self, plan: Plan) -> _Steps:
        yield from self._greeting()
        if self.starttls:
            yield from self._starttls()
        if isinstance(plan, Negotiate):
            return (yield from self._negotiate(plan))
        if not self.fixed_newstyle:
            raise ClientError("the server does not speak fixed newstyle: it cannot list")
        if isinstance(plan, ListExports):
            result: object = yield from self._list_exports()
        else:
            yield from self._reply_mode(plan.extended, plan.structured)
            result = yield from self._list_meta_contexts(plan.export, plan.queries)
        # The server answers ABORT with an ACK, but the spec lets the client hang up
        # without reading it.
        self._send_option(c.NBD_OPT_ABORT)
        return result

    def _greeting(self) -> Generator[int, None, None]:
        data = yield from self._read(c.GREETING.size)
        magic, second, flags = c.GREETING.unpack(data)
        if magic != c.NBDMAGIC:
            raise NBDProtocolError(f"not an NBD server (greeting starts 0x{magic:016x})")
        if second == c.CLISERV_MAGIC:
            raise NBDProtocolError("oldstyle NBD server: not supported")
        if second != c.IHAVEOPT:
            raise NBDProtocolError(f"bad newstyle magic 0x{second:016x}")
        self.fixed_newstyle = bool(flags & c.NBD_FLAG_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & c.NBD_FLAG_NO_ZEROES)
        client_flags = c.NBD_FLAG_C_FIXED_NEWSTYLE if self.fixed_newstyle else 0
        if self.no_zeroes:
            client_flags |= c.NBD_FLAG_C_NO_ZEROES
        self._out += c.CLIENT_FLAGS.pack(client_flags)

    def _starttls(self) -> Generator[int, None, None]:
        if not self.fixed_newstyle:
            raise ClientError("the server does not speak fixed newstyle: no TLS possible")
        _, refused = yield from self._option(c.NBD_OPT_STARTTLS)
        if refused is not None:
            raise refused
        if self._in:
            raise NBDProtocolError("plaintext from the server after NBD_OPT_STARTTLS")
        yield _START_TLS
        # Over TLS now: the server has forgotten everything negotiated before.
        self.mode = Mode.SIMPLE

    def _reply_mode(self, extended: bool, structured: bool) -> Generator[int, None, None]:
        """Extended headers, else structured replies, else simple; any error falls back."""
        if extended:
            _, refused = yield from self._option(c.NBD_OPT_EXTENDED_HEADERS)
            if refused is None:
                self.mode = Mode.EXTENDED
                return
        if structured:
            _, refused = yield from self._option(c.NBD_OPT_STRUCTURED_REPLY)
            if refused is None:
                self.mode = Mode.STRUCTURED

    def _negotiate(self, plan: Negotiate) -> Generator[int, None, ExportInfo]:
        if not self.fixed_newstyle:  # plain newstyle: EXPORT_NAME is the only option
            return (yield from self._export_name(plan.export, ()))
        yield from self._reply_mode(plan.extended and plan.go, plan.structured)
        contexts: tuple[MetaContext, ...] = ()
        if plan.meta_contexts and self.mode is not Mode.SIMPLE:
            contexts = yield from self._set_meta_context(plan.export, plan.meta_contexts)
        if not plan.go:
            return (yield from self._export_name(plan.export, contexts))
        infos = _KNOWN_INFOS if plan.full_info else (c.NBD_INFO_BLOCK_SIZE,)
        payloads, refused = yield from self._option(
            c.NBD_OPT_GO, info_request(plan.export, infos), (c.NBD_REP_INFO,)
        )
        if refused is None:
            return parse_infos(plan.export, payloads, self.mode, contexts)
        if refused.reply != c.NBD_REP_ERR_UNSUP:
            raise refused
        if self.mode is Mode.EXTENDED:
            raise NBDProtocolError("NBD_OPT_GO refused with ERR_UNSUP after extended headers")
        return (yield from self._export_name(plan.export, contexts))

    def _set_meta_context(
        self, export: str, queries: Sequence[str]
    ) -> Generator[int, None, tuple[MetaContext, ...]]:
        payloads, refused = yield from self._option(
            c.NBD_OPT_SET_META_CONTEXT,
            meta_context_request(export, queries),
            (c.NBD_REP_META_CONTEXT,),
        )
        if refused is not None:
            return ()  # like QEMU and libnbd: no block status, but go on
        contexts = tuple(parse_meta_context(p) for p in payloads)
        if len({ctx.id for ctx in contexts}) != len(contexts):
            raise NBDProtocolError("NBD_OPT_SET_META_CONTEXT gave one id to two contexts")
        return contexts

    def _export_name(
        self, export: str, contexts: tuple[MetaContext, ...]
    ) -> Generator[int, None, ExportInfo]:
        # No way to fail but closing the connection: an unknown export shows as EOF.
        self._send_option(c.NBD_OPT_EXPORT_NAME, export.encode())
        data = yield from self._read(c.EXPORT_NAME_REPLY.size)
        size, flags = c.EXPORT_NAME_REPLY.unpack(data)
        if not self.no_zeroes:
            yield from self._read(124)
        check_flags(flags, self.mode)
        return ExportInfo(
            name=export,
            size=size,
            flags=flags,
            mode=self.mode,
            block_size=BlockSize(),
            contexts=contexts,
            used_go=False,
        )

    def _list_exports(self) -> Generator[int, None, list[ExportEntry]]:
        payloads, refused = yield from self._option(c.NBD_OPT_LIST, b"", (c.NBD_REP_SERVER,))
        if refused is not None:
            raise refused
        return [parse_server(p) for p in payloads]

    def _list_meta_contexts(
        self, export: str, queries: Sequence[str]
    ) -> Generator[int, None, list[str]]:
        payloads, refused = yield from self._option(
            c.NBD_OPT_LIST_META_CONTEXT,
            meta_context_request(export, queries),
            (c.NBD_REP_META_CONTEXT,),
        )
        if refused is not None:
            raise refused
        return [parse_meta_context(p).name for p in payloads]


# --- option data encoders and reply parsers (pure functions) ----------------------------


def option_name(option: int) -> str:
    return "NBD_OPT_" + c.OPTION_NAMES.get(option, str(option))


def text(raw: bytes) -> str:
    """Human-readable server text: never fails on bad UTF-8."""
    return raw.decode("utf-8", "replace")


def _string(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > c.NBD_MAX_STRING:
        raise ValueError(f"'{value[:40]}...' is longer than {c.NBD_MAX_STRING} bytes")
    return c.U32.pack(len(raw)) + raw


def _check_strings(plan: Plan) -> None:
    """Raise ValueError for a name or query the wire cannot carry."""
    if isinstance(plan, Negotiate):
        names: tuple[str, ...] = (plan.export, *plan.meta_contexts)
    elif isinstance(plan, ListMetaContexts):
        names = (plan.export, *plan.queries)
    else:
        names = ()
    for name in names:
        _string(name)


def info_request(export: str, infos: Sequence[int]) -> bytes:
    """NBD_OPT_INFO / NBD_OPT_GO data: name, then the info types asked for."""
    return _string(export) + c.U16.pack(len(infos)) + b"".join(c.U16.pack(i) for i in infos)


def meta_context_request(export: str, queries: Sequence[str]) -> bytes:
    """LIST/SET_META_CONTEXT data: name, then the queries."""
    return _string(export) + c.U32.pack(len(queries)) + b"".join(_string(q) for q in queries)


def _name(raw: bytes, what: str) -> str:
    if len(raw) > c.NBD_MAX_STRING:
        raise NBDProtocolError(f"{what} longer than {c.NBD_MAX_STRING} bytes")
    return text(raw)


def parse_meta_context(payload: bytes) -> MetaContext:
    """NBD_REP_META_CONTEXT: a 32-bit id, then the context name."""
    if len(payload) <= c.U32.size:
        raise NBDProtocolError("NBD_REP_META_CONTEXT without a context name")
    (context_id,) = c.U32.unpack_from(payload)
    return MetaContext(context_id, _name(payload[c.U32.size :], "context name"))


def parse_server(payload: bytes) -> ExportEntry:
    """NBD_REP_SERVER: name length, name, then the description."""
    if len(payload) < c.U32.size:
        raise NBDProtocolError("NBD_REP_SERVER shorter than 4 bytes")
    (length,) = c.U32.unpack_from(payload)
    end = c.U32.size + length
    if end > len(payload):
        raise NBDProtocolError("NBD_REP_SERVER name runs past the reply")
    return ExportEntry(
        _name(payload[c.U32.size : end], "export name"), _name(payload[end:], "description")
    )


def check_flags(flags: int, mode: Mode) -> None:
    if not flags & c.NBD_FLAG_HAS_FLAGS:
        raise NBDProtocolError(f"transmission flags 0x{flags:04x} lack NBD_FLAG_HAS_FLAGS")
    if mode is Mode.SIMPLE and flags & c.NBD_FLAG_SEND_DF:
        raise NBDProtocolError("NBD_FLAG_SEND_DF without structured replies")


def check_block_size(block: BlockSize) -> None:
    """QEMU's rules: powers of two, minimum ≤ 64 KiB, preferred and maximum ≥ minimum."""
    minimum, preferred, maximum = block.minimum, block.preferred, block.maximum
    if not _power_of_two(minimum) or minimum > 65536:
        raise NBDProtocolError(f"bad minimum block size {minimum}")
    if not _power_of_two(preferred) or preferred < minimum:
        raise NBDProtocolError(f"bad preferred block size {preferred} (minimum {minimum})")
    if maximum < minimum:
        raise NBDProtocolError(f"maximum payload {maximum} below minimum block {minimum}")


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def parse_infos(
    export: str, payloads: Sequence[bytes], mode: Mode, contexts: tuple[MetaContext, ...]
) -> ExportInfo:
    """The NBD_REP_INFO replies of a successful GO; unknown info types are ignored."""
    size = flags = None
    block = BlockSize()
    canonical = None
    description = ""
    for payload in payloads:
        if len(payload) < c.U16.size:
            raise NBDProtocolError("NBD_REP_INFO shorter than 2 bytes")
        (info,) = c.U16.unpack_from(payload)
        if info == c.NBD_INFO_EXPORT:
            if len(payload) != c.INFO_EXPORT.size:
                raise NBDProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes")
            _, size, flags = c.INFO_EXPORT.unpack(payload)
        elif info == c.NBD_INFO_BLOCK_SIZE:
            if len(payload) != c.INFO_BLOCK_SIZE.size:
                raise NBDProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes")
            block = BlockSize(*c.INFO_BLOCK_SIZE.unpack(payload)[1:])
            check_block_size(block)
        elif info == c.NBD_INFO_NAME:
            canonical = _name(payload[2:], "NBD_INFO_NAME")
        elif info == c.NBD_INFO_DESCRIPTION:
            description = _name(payload[2:], "NBD_INFO_DESCRIPTION")
    if size is None or flags is None:
        raise NBDProtocolError("the server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")
    check_flags(flags, mode)
    return ExportInfo(
        name=export,
        size=size,
        flags=flags,
        mode=mode,
        block_size=block,
        contexts=contexts,
        canonical_name=canonical,
        description=description,
    )
