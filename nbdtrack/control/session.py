"""One QMP conversation as a state machine: bytes in, replies and commands to run out.

Theory of operation, as QEMU's monitor does it:
- The server speaks first with a greeting. Until ``qmp_capabilities`` succeeds the
  session is in negotiation mode, where every other command is CommandNotFound
  ("Expecting capabilities negotiation ...").
- Input is a stream of JSON objects (newlines optional, see ``framing``). A text that
  is not JSON gets a GenericError reply without "id" and the session goes on.
- An object is checked as QEMU checks it (``execute`` a string, ``arguments`` an
  object, nothing else but ``id``), then the command's arguments against its schema.
  Every reply to it carries its ``id``, whatever JSON value that is.
- A checked command is handed out as an ``Execute``: its ``run`` may block (bitmap
  state is fsynced), so the caller runs it off the event loop and sends what it returns.
  Replies go out in the order the commands came in; the caller keeps that order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nbdtrack.control.commands import COMMANDS, Control, version
from nbdtrack.control.errors import CommandNotFound, GenericError, QMPError
from nbdtrack.control.framing import JSONSplitter, TooLarge

log = logging.getLogger("nbdtrack.control")

_NO_ID = object()


@dataclass(frozen=True)
class Send:
    """Bytes to send now (a reply that needed no work, or an error)."""

    data: bytes


@dataclass(frozen=True)
class Execute:
    """A checked command: call ``run`` (it may block) and send the bytes it returns."""

    command: str
    run: Callable[[], bytes]


def encode(message: dict) -> bytes:
    """One QMP message: a JSON object on one line, ended by CRLF as QEMU ends them."""
    return json.dumps(message).encode() + b"\r\n"


def _reply(key: str, value: Any, msg_id: Any) -> bytes:
    message = {key: value}
    if msg_id is not _NO_ID:
        message["id"] = msg_id
    return encode(message)


def parse_json(text: bytes) -> Any:
    """Parse one JSON text strictly (no NaN, no duplicate keys); raises GenericError."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise GenericError("JSON parse error, invalid UTF-8 sequence") from None
    try:
        return json.loads(decoded, object_pairs_hook=_object, parse_constant=_constant)
    except json.JSONDecodeError as err:
        raise GenericError(f"JSON parse error, {err.msg[:1].lower()}{err.msg[1:]}") from None
    except RecursionError:
        raise GenericError("JSON parse error, too many nested containers") from None


def _object(pairs: list[tuple[str, Any]]) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise GenericError(f"JSON parse error, duplicate key '{key}'")
        obj[key] = value
    return obj


def _constant(name: str) -> Any:
    raise GenericError(f"JSON parse error, invalid keyword '{name}'")


def check_message(msg: Any) -> tuple[str, dict]:
    """(command, arguments) of a request object, checked as QEMU's dispatcher checks it."""
    if not isinstance(msg, dict):
        raise GenericError("QMP input must be a JSON object")
    for key, value in msg.items():
        if key == "execute":
            if not isinstance(value, str):
                raise GenericError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise GenericError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise GenericError(f"QMP input member '{key}' is unexpected")
    if "execute" not in msg:
        raise GenericError("QMP input lacks member 'execute'")
    return msg["execute"], msg.get("arguments", {})


class QMPSession:
    def __init__(self, control: Control) -> None:
        self.control = control
        self.negotiated = False
        self._splitter = JSONSplitter()

    @property
    def partial(self) -> bool:
        """True if the input stopped inside a message."""
        return self._splitter.partial

    def greeting(self) -> bytes:
        return encode({"QMP": {"version": version(), "capabilities": []}})

    def receive_data(self, data: bytes) -> list[Send | Execute]:
        """What to do, in order, for every complete message in ``data``."""
        out: list[Send | Execute] = []
        for text in self._splitter.feed(data):
            if isinstance(text, TooLarge):
                error = GenericError(f"JSON parse error, message too large ({text.size} bytes)")
                out.append(Send(_reply("error", error.to_json(), _NO_ID)))
            else:
                out.append(self._message(text))
        return out

    def _message(self, text: bytes) -> Send | Execute:
        msg_id: Any = _NO_ID
        try:
            msg = parse_json(text)
            if isinstance(msg, dict) and "id" in msg:
                msg_id = msg["id"]
            name, arguments = check_message(msg)
            if not self.negotiated and name != "qmp_capabilities":
                raise CommandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'")
            cmd = COMMANDS.get(name)
            if cmd is None:
                raise CommandNotFound(f"The command {name} has not been found")
            args = cmd.args.check(arguments, "")
            if name == "qmp_capabilities":
                return Send(_reply("return", self._negotiate(args), msg_id))
        except QMPError as err:
            return Send(_reply("error", err.to_json(), msg_id))
        return Execute(name, lambda: self._run(name, args, msg_id))

    def _negotiate(self, args: dict) -> dict:
        if self.negotiated:
            raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
        for capability in args.get("enable", []):
            raise GenericError(f"Capability '{capability}' not available")
        self.negotiated = True
        return {}

    def _run(self, name: str, args: dict, msg_id: Any) -> bytes:
        try:
            return _reply("return", self.control.execute(name, args, self), msg_id)
        except QMPError as err:
            return _reply("error", err.to_json(), msg_id)
        except Exception as err:  # a bug: answer it, keep the session and the server
            log.exception("control: %s failed", name)
            return _reply("error", GenericError(f"{name} failed: {err}").to_json(), msg_id)
