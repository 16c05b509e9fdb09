"""Types of the C extension _direct.c: direct socket writes for plain-TCP transports."""

import asyncio
from collections.abc import Iterable

class DirectWriter:
    def __init__(self, fd: int, transport: asyncio.Transport) -> None: ...
    def __call__(self, data: bytes) -> None: ...
    def writelines(self, parts: Iterable[bytes]) -> None: ...
    def detach(self) -> None: ...
    @property
    def detached(self) -> bool:
        """Every write goes through the transport (detach was called)."""
    @property
    def direct_writes(self) -> int:
        """Writes the socket took whole, without the transport."""
    @property
    def handed_over(self) -> int:
        """Writes (or their unwritten ends) given to the transport."""
