"""Backends named by hostnames: resolved ahead of time by our own resolver, by their TTLs.

A cloud load balancer (AWS ALB/NLB, Azure Front Door, Google Cloud Load Balancing) is a name
whose addresses change. The supervisor resolves every backend hostname on its own schedule with
c-ares (aiodns: about 27 µs of CPU per lookup here, against about 400 µs for dnspython's
asyncio resolver, and no thread pool), again when the answer's TTL runs out, and hands each
answer to the upstream's health machine as an event. The machine turns the addresses into the
backend's endpoints; workers get them in the health snapshot. Nothing on a request's path ever
waits on DNS, and probes and traffic dial the same addresses.

A lookup that fails keeps the last good answer (and is tried again after `failure_refresh`); a
name that does not exist (NXDOMAIN) leaves the backend without endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..config.schema import BackendConfig, DnsConfig, ProxyConfig, UpstreamConfig, is_hostname
from .loops import TaskLoops

if TYPE_CHECKING:
    import aiodns


log = logging.getLogger("failover_proxy.dns")


@dataclass(frozen=True, order=True)
class Address:
    """One endpoint's address: where a backend's traffic is dialled."""

    host: str
    port: int
    weight: int = 1
    """Its share within the backend (SRV weight; 1 for A and AAAA answers)."""
    name: str = ""
    """The SRV target it was found under (its Host and TLS name); empty for A and AAAA."""

    @property
    def label(self) -> str:
        """`127.0.0.2:8443`, `[::1]:8443`: the endpoint label of metrics and /status."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Answer:
    """The outcome of one resolution of a backend's name."""

    addresses: tuple[Address, ...] | None
    """Sorted; None when the lookup failed (see `result`)."""
    ttl: float
    result: str
    """ok, nxdomain, nodata, timeout or error (the `result` label of the lookups counter)."""
    detail: str = ""


@dataclass
class DnsStatus:
    """What the lookups of one backend's hostname said last (shown on /status)."""

    result: str = ""
    detail: str = ""
    ttl: float = 0.0
    at: float = 0.0
    """Wall-clock time of the last answer."""
    failures: int = 0
    """Failed lookups in a row (the last good answer stays in use meanwhile)."""


@dataclass(frozen=True)
class Target:
    """What one backend's resolution needs: its name, port, kind and resolver settings."""

    name: str
    port: int
    srv: bool
    settings: DnsConfig


def target_of(backend: BackendConfig, upstream_dns: DnsConfig) -> Target | None:
    """The name a backend's URL gives to resolve, or None for an IP address."""
    if not is_hostname(backend.url):
        return None
    parts = urlsplit(backend.url)
    srv = parts.scheme.startswith("srv+")
    default_port = 443 if parts.scheme.endswith("https") else 80
    return Target(parts.hostname or "", parts.port or default_port, srv,
                  backend.dns or upstream_dns)


class Resolver:
    """c-ares channels, one per set of nameservers and timeout."""

    def __init__(self) -> None:
        self._channels: dict[tuple[tuple[str, ...], float], aiodns.DNSResolver] = {}

    def _channel(self, settings: DnsConfig) -> aiodns.DNSResolver:
        key = (tuple(settings.nameservers), settings.timeout)
        channel = self._channels.get(key)
        if channel is None:
            import aiodns  # here, not at the top: workers never resolve

            options: dict[str, Any] = {"timeout": settings.timeout, "tries": 1}
            if settings.nameservers:
                options["nameservers"] = list(settings.nameservers)
            channel = self._channels[key] = aiodns.DNSResolver(**options)
        return channel

    async def resolve(self, target: Target) -> Answer:
        """The addresses of `target` now (never raises: a failure is an Answer too)."""
        import aiodns.error

        channel = self._channel(target.settings)
        try:
            async with asyncio.timeout(target.settings.timeout + 0.5):
                if target.srv:
                    return await self._srv(channel, target)
                addresses, ttl = await self._addresses(channel, target.name, target.port,
                                                       target.settings.family)
                return Answer(addresses, ttl, "ok")
        except TimeoutError:
            return Answer(None, 0.0, "timeout", f"no answer within {target.settings.timeout:g}s")
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            message = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
            if code == aiodns.error.ARES_ENOTFOUND:
                return Answer(None, 0.0, "nxdomain", "name does not exist (NXDOMAIN)")
            if code == aiodns.error.ARES_ENODATA:
                return Answer(None, 0.0, "nodata", "no address records")
            if code == aiodns.error.ARES_ETIMEOUT:
                return Answer(None, 0.0, "timeout", message)
            return Answer(None, 0.0, "error", message)

    async def _addresses(
        self, channel: aiodns.DNSResolver, name: str, port: int, family: str
    ) -> tuple[tuple[Address, ...], float]:
        """A name's addresses and their TTL. c-ares's getaddrinfo: the hosts file first, then
        DNS (search domains, CNAMEs followed), never a thread."""
        import aiodns.error

        wanted = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(family, socket.AF_UNSPEC)
        result = await channel.getaddrinfo(name, family=wanted, proto=socket.IPPROTO_TCP)
        nodes = [(n.family, n.addr[0], float(n.ttl)) for n in result.nodes]
        if family == "auto" and any(f == socket.AF_INET for f, _, _ in nodes):
            nodes = [n for n in nodes if n[0] == socket.AF_INET]  # AAAA only when no A
        if not nodes:
            raise aiodns.error.DNSError(aiodns.error.ARES_ENODATA, "no address records")
        ttl = min(t for _, _, t in nodes)
        found = {Address(a.decode() if isinstance(a, bytes) else str(a), port)
                 for _, a, _ in nodes}
        return tuple(sorted(found)), ttl

    async def _srv(self, channel: aiodns.DNSResolver, target: Target) -> Answer:
        import pycares

        result = await channel.query_dns(target.name, "SRV")
        records = [(r.data, float(r.ttl)) for r in result.answer
                   if isinstance(r.data, pycares.SRVRecordData)]
        if not records:
            return Answer(None, 0.0, "nodata", "no SRV records")
        best = min(data.priority for data, _ in records)  # the lowest priority is in use
        ttl = min(t for _, t in records)
        found: set[Address] = set()
        for data, _ in records:
            if data.priority != best:
                continue
            hosts, host_ttl = await self._addresses(
                channel, data.target, data.port, target.settings.family
            )
            ttl = min(ttl, host_ttl)
            # An SRV weight of 0 still takes a little traffic (RFC 2782); others in proportion.
            weight = max(1, data.weight)
            found.update(Address(a.host, a.port, weight, data.target) for a in hosts)
        return Answer(tuple(sorted(found)), ttl, "ok")


def next_refresh(answer: Answer, settings: DnsConfig) -> float:
    """Seconds until the name is resolved again."""
    if answer.addresses is None:
        return settings.failure_refresh
    if settings.refresh == "ttl":
        return min(settings.max_ttl, max(settings.min_ttl, answer.ttl))
    return float(settings.refresh)


OnAnswer = Callable[[str, str, Answer], None]
"""Called with (upstream name, backend name, answer) after every lookup."""


class Discovery:
    """Resolves the hostname of every backend of the current topology, each on its own schedule.

    A reload hands it the new upstreams: names that carry on keep their loop; others start at
    once; names no longer configured stop.
    """

    def __init__(self, on_answer: OnAnswer) -> None:
        self.on_answer = on_answer
        self.resolver = Resolver()
        self._loops: TaskLoops[tuple[str, str], Target] = TaskLoops()
        self._due: dict[tuple[str, str], float] = {}
        """When each name is next to be resolved (the loop's clock), after resolve_now."""

    @staticmethod
    def targets(upstreams: Mapping[str, UpstreamConfig]) -> dict[tuple[str, str], Target]:
        """The names to resolve, by (upstream, backend)."""
        found = {}
        for name, upstream in upstreams.items():
            for backend in upstream.backends:
                target = target_of(backend, upstream.dns)
                if target is not None:
                    found[(name, backend.name)] = target
        return found

    async def resolve_now(
        self, upstreams: Mapping[str, UpstreamConfig]
    ) -> dict[tuple[str, str], Answer]:
        """Resolve every name once, together, before the first topology is built (so that it,
        and the first workers, start with endpoints); a name that does not answer within the
        slowest lookup's deadline is left to its loop."""
        targets = self.targets(upstreams)
        loop = asyncio.get_running_loop()
        answers: dict[tuple[str, str], Answer] = {}

        async def one(key: tuple[str, str], target: Target) -> None:
            answer = await self.resolver.resolve(target)
            self._due[key] = loop.time() + next_refresh(answer, target.settings)
            answers[key] = answer

        limit = min(5.0, max((t.settings.timeout for t in targets.values()), default=0.0) + 0.5)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await asyncio.gather(*(one(k, t) for k, t in targets.items()))
        return answers

    def update(self, upstreams: dict[str, UpstreamConfig]) -> None:
        """Resolve exactly the names of `upstreams` (the current config generation)."""
        loop = asyncio.get_running_loop()
        wanted = self.targets(upstreams)
        for key, target in wanted.items():
            if self._loops.target(key) == target:
                continue
            delay = max(0.0, self._due.pop(key, 0.0) - loop.time())
            self._loops.start(key, target, self._resolve_forever(key, target, delay))
        self._loops.keep_only(wanted)

    async def stop(self) -> None:
        await self._loops.stop()

    async def _resolve_forever(self, key: tuple[str, str], target: Target, delay: float) -> None:
        await asyncio.sleep(delay)
        while True:
            answer = await self.resolver.resolve(target)
            try:
                self.on_answer(key[0], key[1], answer)
            except Exception:  # one bad answer must not end the name's resolution for good
                log.exception("DNS answer for %s/%s not applied", *key)
            # A little jitter, so that many names of one TTL are not resolved in lockstep.
            wait = next_refresh(answer, target.settings)
            await asyncio.sleep(wait * random.uniform(0.95, 1.0))


async def resolve_config(config: ProxyConfig) -> tuple[list[str], bool]:
    """`check --resolve`: every backend hostname of a config resolved once, as lines to print,
    and whether all of them resolved."""
    resolver = Resolver()
    lines, good = [], True
    for upstream_name, upstream in config.upstreams.items():
        for backend in upstream.backends:
            target = target_of(backend, upstream.dns)
            if target is None:
                continue
            answer = await resolver.resolve(target)
            where = f"upstreams.{upstream_name} backend {backend.name}: {target.name}"
            if answer.addresses is None:
                good = False
                lines.append(f"{where}: {answer.result}: {answer.detail}")
                continue
            endpoints = endpoints_in(backend, answer.addresses)
            shown = ", ".join(
                a.label + (f" (weight {a.weight}, {a.name})" if a.name else "") for a in endpoints
            )
            lines.append(f"{where}: {shown} (TTL {answer.ttl:g}s, discovery {backend.discovery})")
    return lines, good


def endpoints_in(backend: BackendConfig, addresses: tuple[Address, ...]) -> tuple[Address, ...]:
    """The addresses of an answer a backend makes endpoints: all (strict), or the first."""
    return addresses[:1] if backend.discovery == "logical" else addresses


Resolved = dict[str, dict[str, tuple[Address, ...]]]
"""The first answers, by upstream and backend: what a start builds its topology with."""


def resolved(answers: dict[tuple[str, str], Answer], config: ProxyConfig) -> Resolved:
    found: Resolved = {}
    for (upstream, backend), answer in answers.items():
        if answer.addresses:
            settings = next(b for b in config.upstreams[upstream].backends if b.name == backend)
            found.setdefault(upstream, {})[backend] = endpoints_in(settings, answer.addresses)
    return found
