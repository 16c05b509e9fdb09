"""Where a chunked request body ends in the bytes a client sent, so that the next pipelined
request's head can be read from the same bytes, and the trailer fields it ends with.

llhttp parses and validates the body; it does not say where in a read a message ended. The
client's reads are cut here at the end of each chunked body and fed to llhttp piece by piece,
and the connection checks that llhttp saw the message end exactly there: a body this scanner
and llhttp read differently is refused, never guessed at. Only chunked requests pay for it.
"""

from __future__ import annotations

from typing import Final

_SIZE: Final = 0
"""Reading a chunk-size line (hex digits, then extensions or nothing, then CRLF)."""
_DATA: Final = 1
"""Skipping chunk data and the CRLF after it."""
_TRAILERS: Final = 2
"""Reading trailer lines until the empty line that ends the message."""

_CR: Final = ord("\r")
MAX_LINE: Final = 16 * 1024
"""A chunk-size or trailer line longer than this is left to llhttp to refuse."""


def _hex_value(byte: int) -> int:
    if 48 <= byte <= 57:
        return byte - 48
    byte |= 0x20
    if 97 <= byte <= 102:
        return byte - 87
    return -1


class ChunkedBodyEnd:
    """Follows one chunked body across reads; `scan` says where in a read it ended."""

    def __init__(self) -> None:
        self._state = _SIZE
        self._left = 0
        self._line = b""
        """The start of a size or trailer line that a read cut off."""
        self.broken = False
        """The body is malformed in a way llhttp will refuse: scanning stops."""
        self.trailers: list[bytes] | None = None
        """The trailer lines (`name: value`, as sent) read so far; llhttp validates them."""
        self.trailer_bytes = 0

    def scan(self, data: bytes, pos: int) -> int:
        """The offset just past the body's end in `data` (reading from `pos`), or -1 when the body
        goes on past this read or is broken."""
        size = len(data)
        while pos < size and not self.broken:
            if self._state == _DATA:
                step = min(self._left, size - pos)
                pos += step
                self._left -= step
                if not self._left:
                    self._state = _SIZE
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                self.broken = len(self._line) > MAX_LINE
                return -1
            line = self._line + data[pos:newline] if self._line else data[pos:newline]
            self._line = b""
            pos = newline + 1
            if self._state == _SIZE:
                self._size_line(line)
            elif not line or (len(line) == 1 and line[0] == _CR):
                return pos  # the empty line after the last chunk and any trailers
            else:
                self._trailer(line)
        return -1

    def _trailer(self, line: bytes) -> None:
        if line[-1] == _CR:
            line = line[:-1]
        if self.trailers is None:
            self.trailers = []
        self.trailers.append(line)
        self.trailer_bytes += len(line) + 2

    def _size_line(self, line: bytes) -> None:
        value = 0
        digits = 0
        for byte in line:
            digit = _hex_value(byte)
            if digit < 0:
                break
            value = value * 16 + digit
            digits += 1
        if not digits:
            self.broken = True
        elif value:
            self._state = _DATA
            self._left = value + 2  # the data and its CRLF
        else:
            self._state = _TRAILERS
