"""Balancers inside a provider (least request, consistent hash) and the latency strategy."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import httpx

from failover_proxy.model.balance import ConsistentHash, hash_key
from failover_proxy.process.server import ProxyServer
from failover_proxy.sim.faults import FaultBackend

from .conftest import StartFaultBackends, backend_lines

StartProxy = Callable[[str], Awaitable[ProxyServer]]


def config(backends: list[FaultBackend], extra: str) -> str:
    entries = backend_lines(backends)
    return (
        "listen: {port: 0}\nupstreams:\n  web:\n    backends:\n"
        f"{entries}{extra}routes:\n  - {{path_prefix: /, upstream: web}}\n"
    )


async def test_least_request_avoids_the_slow_backend(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    fast, slow = await fault_backends(("fast", "aws"), ("slow", "aws"))
    slow.mode, slow.delay = "slow", 0.2
    server = await proxy(config([fast, slow], "    balancer: least_request\n"))
    limits = httpx.Limits(max_connections=8)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=10) as http:

        async def worker() -> None:
            for _ in range(15):
                assert (await http.get(f"http://127.0.0.1:{server.port}/")).status_code == 200

        await asyncio.gather(*(worker() for _ in range(8)))
    assert len(fast.received) > 3 * len(slow.received), (len(fast.received), len(slow.received))


async def test_hash_keeps_a_client_on_one_backend_and_moves_few_keys(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    pool = await fault_backends(*[(f"b{i}", "aws") for i in range(4)])
    server = await proxy(
        config(
            pool,
            "    balancer: hash\n    hash_on: {header: X-User}\n"
            "    health_check: {path: /healthz, interval: 200ms, unhealthy_interval: 100ms,"
            " unhealthy_threshold: 1}\n"
            "    policy: {min_healthy_fraction: 0%}\n",
        )
    )
    users = [f"user-{n}" for n in range(200)]

    async def placement() -> dict[str, str]:
        async with httpx.AsyncClient(trust_env=False) as http:
            return {
                user: (await http.get(f"http://127.0.0.1:{server.port}/", headers={"X-User": user})).json()["backend"]
                for user in users
            }

    first, again = await placement(), await placement()
    assert first == again  # sticky
    assert len(set(first.values())) == 4  # and spread
    await pool[3].set_mode("refusing")
    await asyncio.sleep(0.6)  # health checks take b3 out
    after = await placement()
    moved = [u for u in users if after[u] != first[u]]
    assert all(first[u] == "b3" for u in moved)  # only b3's keys moved
    assert "b3" not in after.values()


async def test_hash_on_cookie_keeps_a_session_on_one_backend(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    """The session cookie is found among other cookies, in any Cookie field, spelled any case."""
    pool = await fault_backends(*[(f"b{i}", "aws") for i in range(4)])
    server = await proxy(config(pool, "    balancer: hash\n    hash_on: {cookie: sid}\n"))
    url = f"http://127.0.0.1:{server.port}/"
    sessions = [f"s{n}" for n in range(100)]
    async with httpx.AsyncClient(trust_env=False) as http:

        async def backend(headers: list[tuple[str, str]]) -> str:
            answer: str = (await http.get(url, headers=headers)).json()["backend"]
            return answer

        alone = {s: await backend([("Cookie", f"sid={s}")]) for s in sessions}
        among_others = {
            s: await backend([("cookie", f"theme=dark; sid={s}; lang=en")]) for s in sessions
        }
        second_field = {
            s: await backend([("Cookie", "theme=dark"), ("COOKIE", f"sid={s}")]) for s in sessions
        }
    assert alone == among_others == second_field  # sticky, wherever the cookie is
    assert len(set(alone.values())) == 4  # and spread


def test_ring_moves_only_the_departed_backends_keys() -> None:
    names = ["a", "b", "c", "d", "e"]
    full = ConsistentHash(names, [1] * 5, names)
    reduced = ConsistentHash(names[:4], [1] * 4, names[:4])
    keys = [hash_key(f"k{i}".encode()) for i in range(5000)]
    before = [full.pick(k) for k in keys]
    after = [reduced.pick(k) for k in keys]
    moved = [b for b, a in zip(before, after, strict=True) if a != b]
    assert set(moved) == {"e"}
    share = Counter(before)
    assert all(700 < share[n] < 1300 for n in names), share  # roughly even


async def test_latency_strategy_prefers_the_fastest_provider(
    fault_backends: StartFaultBackends, proxy: StartProxy
) -> None:
    pool = await fault_backends("aws-a", "gcp-a", "azure-a")
    pool[0].mode, pool[0].delay = "slow", 0.05
    pool[2].mode, pool[2].delay = "slow", 0.08
    server = await proxy(config(pool, "    policy: {strategy: latency}\n"))
    async with httpx.AsyncClient(trust_env=False) as http:
        for _ in range(30):  # learn the latencies
            await http.get(f"http://127.0.0.1:{server.port}/")
        await asyncio.sleep(0.3)  # a sweep re-ranks the providers
        answers = [
            (await http.get(f"http://127.0.0.1:{server.port}/")).json()["provider"] for _ in range(40)
        ]
    assert Counter(answers)["gcp"] >= 36, Counter(answers)
