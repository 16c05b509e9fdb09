"""Large bodies stream through the proxy process with flat memory, both ways, with back-pressure."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from aiohttp import web

from .conftest import ProxyProcess, free_port, single_upstream_config

StartApp = Callable[[web.Application], Awaitable[int]]
MiB = 1024 * 1024
TOTAL = 100 * MiB
CHUNK = b"0123456789abcdef" * 4096  # 64 KiB
MEMORY_BOUND = 40 * MiB  # far below the 100 MiB that passes through


def streaming_app() -> web.Application:
    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(TOTAL)})
        await response.prepare(request)
        for _ in range(TOTAL // len(CHUNK)):
            await response.write(CHUNK)
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    app = web.Application(client_max_size=2 * TOTAL)
    app.router.add_get("/download", download)
    app.router.add_post("/upload", upload)
    return app


class RssWatch:
    def __init__(self, process: ProxyProcess) -> None:
        self.process = process
        self.baseline = process.rss_bytes()
        self.peak = self.baseline
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.rss_bytes())
            await asyncio.sleep(0.02)

    def stop(self) -> int:
        self._task.cancel()
        return self.peak - self.baseline


async def start(aiohttp_backend: StartApp, proxy_process: Callable[[str, int], ProxyProcess]) -> ProxyProcess:
    backend = await aiohttp_backend(streaming_app())
    port = free_port()
    return await asyncio.to_thread(proxy_process, single_upstream_config([backend], listen_port=port), port)


async def test_100_mib_download_and_upload_with_flat_memory(
    aiohttp_backend: StartApp, proxy_process: Callable[[str, int], ProxyProcess]
) -> None:
    process = await start(aiohttp_backend, proxy_process)
    base = f"http://127.0.0.1:{process.port}"
    async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
        await http.get(base + "/download", headers={"Range": "bytes=0-0"})  # warm up
        watch = RssWatch(process)
        digest = hashlib.sha256()
        received = 0
        async with http.stream("GET", base + "/download") as response:
            async for chunk in response.aiter_raw():
                digest.update(chunk)
                received += len(chunk)
        assert received == TOTAL
        assert digest.hexdigest() == hashlib.sha256(CHUNK * (TOTAL // len(CHUNK))).hexdigest()

        async def body() -> AsyncIterator[bytes]:
            for _ in range(TOTAL // len(CHUNK)):
                yield CHUNK

        # Chunked upload (no Content-Length): streamed, re-framed, never buffered whole.
        answer = (await http.post(base + "/upload", content=body())).json()
        growth = watch.stop()
    assert answer == {"size": TOTAL, "sha256": digest.hexdigest()}
    print(f"RSS baseline {watch.baseline / MiB:.1f} MiB, growth {growth / MiB:.1f} MiB")
    assert growth < MEMORY_BOUND, f"proxy RSS grew by {growth / MiB:.1f} MiB"


async def test_slow_client_pauses_the_backend_instead_of_buffering(
    aiohttp_backend: StartApp, proxy_process: Callable[[str, int], ProxyProcess]
) -> None:
    process = await start(aiohttp_backend, proxy_process)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", process.port, limit=64 * 1024
    )
    watch = RssWatch(process)
    writer.write(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    received = 0
    while received < 10 * MiB:
        received += len(await reader.read(256 * 1024))
    await asyncio.sleep(1.5)  # the client stops reading; the backend keeps offering 90 MiB
    paused_growth = watch.peak - watch.baseline
    while received < TOTAL:
        data = await reader.read(1024 * 1024)
        assert data
        received += len(data)
    watch.stop()
    writer.close()
    assert received == TOTAL
    print(f"RSS growth while the client paused: {paused_growth / MiB:.1f} MiB")
    assert paused_growth < MEMORY_BOUND, f"proxy buffered {paused_growth / MiB:.1f} MiB"
