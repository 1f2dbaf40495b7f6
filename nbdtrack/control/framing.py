"""Cutting a QMP byte stream into JSON texts, as QEMU's JSON streamer does.

QMP clients need not end a command with a newline (``qemu.qmp`` sends none), so a
message ends where its outermost bracket closes. The scan only tracks brackets and
strings; whether the text is valid JSON is decided later by the JSON parser, so a
malformed message costs one error reply and the stream goes on after it. UTF-8 is
safe to scan byte by byte: no byte of a multi-byte character is ASCII.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_WHITESPACE = b" \t\r\n"
_OPEN = b"{["
_CLOSE = b"}]"
_QUOTE = ord('"')
_BACKSLASH = ord("\\")
# What ends a bare top-level token such as ``42`` or ``foo``.
_TOKEN_END = _WHITESPACE + _OPEN + _CLOSE + b'"'


@dataclass(frozen=True)
class TooLarge:
    """A message longer than the limit was skipped whole."""

    size: int


class JSONSplitter:
    """Feed bytes, get back the complete top-level JSON texts seen so far."""

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._pos = 0  # next byte to scan
        self._start = -1  # where the current message starts, -1 between messages
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._skipped = 0  # bytes of an oversized message dropped so far

    @property
    def partial(self) -> bool:
        """True if the stream stopped inside a message."""
        return self._start >= 0 or self._skipped > 0

    def feed(self, data: bytes) -> list[bytes | TooLarge]:
        self._buf += data
        out: list[bytes | TooLarge] = []
        buf = self._buf
        i = self._pos
        while i < len(buf):
            b = buf[i]
            if self._start < 0 and not self._skipped:
                if b in _WHITESPACE:
                    i += 1
                    continue
                self._start = i
                if b in _CLOSE:  # a stray closing bracket is a message of its own
                    i = self._emit(out, i + 1)
                    continue
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif b == _BACKSLASH:
                    self._escape = True
                elif b == _QUOTE:
                    self._in_string = False
                    if self._depth == 0:
                        i = self._emit(out, i + 1)
                        continue
            elif b == _QUOTE:
                self._in_string = True
            elif b in _OPEN:
                self._depth += 1
            elif b in _CLOSE:
                self._depth -= 1
                if self._depth == 0:
                    i = self._emit(out, i + 1)
                    continue
            elif self._depth == 0 and b in _TOKEN_END:
                i = self._emit(out, i)  # a bare token ends before its delimiter
                continue
            i += 1
            if self._start >= 0 and i - self._start > self.limit:
                # Keep following the brackets to find the end, but store nothing more.
                self._skipped = i - self._start
                del buf[:i]
                i = 0
                self._start = -1
        if self._skipped:
            self._skipped += i
            del buf[:i]
            i = 0
        elif self._start < 0:
            buf.clear()  # only whitespace was left
            i = 0
        elif self._start > 0:
            del buf[: self._start]
            i -= self._start
            self._start = 0
        self._pos = i
        return out

    def _emit(self, out: list[bytes | TooLarge], end: int) -> int:
        """Close the current message at ``end``; returns where scanning goes on."""
        if self._skipped:
            out.append(TooLarge(self._skipped + end))
            self._skipped = 0
        else:
            out.append(bytes(self._buf[self._start : end]))
        del self._buf[:end]
        self._start = -1
        self._depth = 0
        return 0
