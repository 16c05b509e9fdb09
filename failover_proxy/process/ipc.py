"""Messages between the supervisor and its workers: dicts, pickled and prefixed by their length,
over a Unix socket pair (one per worker).

Pickle, because the config goes over it as the validated objects themselves (schema.py's
dataclasses), so a worker never loads yaml or pydantic. Both ends are the same installed code
and the socket pair is private to a parent and the child it started: nothing else can write
to it.
"""

from __future__ import annotations

import asyncio
import io
import pickle
import struct
from collections.abc import Callable, Hashable
from typing import Any

_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 64 * 1024 * 1024

Message = dict[str, Any]


Shared = Callable[[object], Hashable | None]
"""For a sender: the name under which the receiver already holds an object (sent as that
name alone), or None to send the object itself."""
Held = Callable[[Any], object]
"""For a receiver: the object it holds under a name a sender used."""


def encode(message: Message, shared: Shared | None = None) -> bytes:
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    if shared is not None:
        pickler.persistent_id = shared  # type: ignore[method-assign]
    pickler.dump(message)
    payload = buffer.getvalue()
    return _LENGTH.pack(len(payload)) + payload


async def receive(reader: asyncio.StreamReader, held: Held | None = None) -> Message | None:
    """The next message, or None when the other side has gone."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if length > MAX_MESSAGE:
            raise ValueError(f"message of {length} bytes is too large")
        unpickler = pickle.Unpickler(io.BytesIO(await reader.readexactly(length)))
        if held is not None:
            unpickler.persistent_load = held  # type: ignore[method-assign]
        message: Message = unpickler.load()
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return message


def send(writer: asyncio.StreamWriter, message: Message, shared: Shared | None = None) -> None:
    if not writer.is_closing():
        writer.write(encode(message, shared))
