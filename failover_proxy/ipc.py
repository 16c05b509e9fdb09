"""Messages between the supervisor and its workers: dicts, pickled and prefixed by their length,
over a Unix socket pair (one per worker).

Pickle, because the config goes over it as the validated objects themselves (schema.py's
dataclasses), so a worker never loads yaml or pydantic. Both ends are the same installed code
and the socket pair is private to a parent and the child it started: nothing else can write
to it.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 64 * 1024 * 1024

Message = dict[str, Any]


def encode(message: Message) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


async def receive(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None when the other side has gone."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if length > MAX_MESSAGE:
            raise ValueError(f"message of {length} bytes is too large")
        message: Message = pickle.loads(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return message


def send(writer: asyncio.StreamWriter, message: Message) -> None:
    if not writer.is_closing():
        writer.write(encode(message))
