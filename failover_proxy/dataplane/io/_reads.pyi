"""Types of the C extension _reads.c: batched socket reads for plain-TCP transports."""

import asyncio
from collections.abc import Callable

class ReadLoop:
    def __init__(self) -> None: ...
    def fileno(self) -> int: ...
    def ready(self) -> None: ...
    def close(self) -> None: ...
    @property
    def batches(self) -> int:
        """Times ready() found the set ready."""
    @property
    def reads(self) -> int:
        """Reads that returned bytes."""
    @property
    def registered(self) -> int:
        """Sockets in the set now."""

class Reader:
    def __init__(
        self,
        loop: ReadLoop,
        fd: int,
        transport: asyncio.Transport,
        data_received: Callable[[bytes], None],
        eof_received: Callable[[], bool | None],
        failed: Callable[[BaseException], None],
    ) -> None: ...
    def take_over(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def is_reading(self) -> bool: ...
    def detach(self) -> None: ...
    @property
    def registered(self) -> bool:
        """In the ReadLoop's set now."""
    @property
    def fallbacks(self) -> int:
        """Times the socket could not be put in the set, so the transport kept reading."""
    @property
    def taken_over(self) -> bool:
        """Reading is the Reader's, no longer the transport's."""
