"""Backends behind hostnames: a real DNS server on loopback, re-programmed while traffic flows.

The backends listen on 127.0.0.2, 127.0.0.3, 127.0.0.4… on one port: the addresses a cloud load
balancer's name resolves to. The proxy resolves the name with its own resolver (c-ares), by the
answer's TTL, and makes every address an endpoint of the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from failover_proxy.config.loading import parse_config
from failover_proxy.config.schema import ConfigError
from failover_proxy.model.counters import ATTEMPT_OUTCOMES
from failover_proxy.model.topology import Upstream
from failover_proxy.process.server import ProxyServer
from failover_proxy.sim.faults import FaultBackend
from failover_proxy.sim.loadgen import KeepAliveLoad

from .conftest import ROOT, free_port
from .dnsserver import LoopbackDNS

NAME = "lb.aws.test"


@pytest.fixture
def dns() -> Any:
    server = LoopbackDNS()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def addresses() -> AsyncIterator[Callable[..., Any]]:
    """Start fault backends on the given loopback addresses, all on one port."""
    started: list[FaultBackend] = []

    async def start(*hosts: str, port: int = 0, provider: str = "aws") -> list[FaultBackend]:
        made = []
        for host in hosts:
            backend = FaultBackend(f"{provider}-{host}", provider, host=host, port=port)
            await backend.start()
            port = backend.port
            made.append(backend)
        started.extend(made)
        return made

    yield start
    for backend in started:
        await backend.stop()


def dns_config(dns: LoopbackDNS, port: int, gcp_port: int, url: str = "",
               backend_extra: str = "", upstream_extra: str = "") -> str:
    url = url or f"http://{NAME}:{port}"
    return f"""
listen: {{host: 127.0.0.1, port: 0}}
access_log: {{enabled: false}}
upstreams:
  web:
    backends:
      - {{name: aws-lb, url: "{url}", provider: aws{backend_extra}}}
      - {{name: gcp-a, url: "http://127.0.0.1:{gcp_port}", provider: gcp}}
    dns: {{nameservers: ["{dns.nameserver}"], timeout: 300ms, failure_refresh: 200ms,
           min_ttl: 200ms}}
    policy: {{strategy: priority, providers: [aws, gcp]}}
    retry: {{attempts: 3}}
{upstream_extra}routes:
  - {{path_prefix: /, upstream: web}}
"""


async def gets(port: int, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        return [await http.get(f"http://127.0.0.1:{port}/x") for _ in range(count)]


def web(server: ProxyServer) -> Upstream:
    return server.topology.upstreams["web"]


async def eventually(check: Callable[[], bool], limit: float = 5.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < limit, "not within the limit"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_every_address_is_an_endpoint_and_a_failed_lookup_keeps_them(
    proxy: Any, dns: LoopbackDNS, addresses: Any, fault_backends: Any,
) -> None:
    a2, a3 = await addresses("127.0.0.2", "127.0.0.3")
    [gcp] = await fault_backends("gcp-a")
    dns.set_addresses(NAME, ["127.0.0.2", "127.0.0.3"])
    server = await proxy(dns_config(dns, a2.port, gcp.port))
    upstream = web(server)
    assert sorted(b.name for b in upstream.backends if b.origin == "aws-lb") == [
        "aws-lb@127.0.0.2:" + str(a2.port), "aws-lb@127.0.0.3:" + str(a2.port)]
    responses = await gets(server.port, 20)
    assert [r.status_code for r in responses] == [200] * 20
    assert len(a2.received) == len(a3.received) == 10  # balanced inside the backend
    assert not gcp.received
    # Metrics name the configured backend and the endpoint dialled.
    assert server.store.attempts[("web", "aws", "aws-lb", f"127.0.0.2:{a2.port}")][0] == 10

    dns.stop_answering()  # lookups time out: the last good answer stays in use
    await eventually(lambda: upstream.dns_status["aws-lb"].failures >= 2)
    assert upstream.dns_status["aws-lb"].result == "timeout"
    assert [r.status_code for r in await gets(server.port, 10)] == [200] * 10
    assert not gcp.received
    counts = server.store.counters["dns_lookups"]
    assert counts[("web", "aws-lb", "ok")] >= 1 and counts[("web", "aws-lb", "timeout")] >= 2

    dns.answer_again()
    dns.remove(NAME)  # NXDOMAIN: the backend is unusable, its traffic moves to gcp
    await eventually(lambda: upstream.dns_status["aws-lb"].result == "nxdomain")
    [stand_in] = [b for b in upstream.backends if b.origin == "aws-lb"]
    assert not stand_in.usable and not stand_in.endpoint
    assert "NXDOMAIN" in stand_in.reason
    assert upstream.providers["aws"].state == "down"
    assert [r.status_code for r in await gets(server.port, 5)] == [200] * 5
    assert len(gcp.received) == 5

    dns.set_addresses(NAME, ["127.0.0.3"])  # back, with one address
    await eventually(lambda: upstream.discovered["aws-lb"] is not None)
    [endpoint] = [b for b in upstream.backends if b.origin == "aws-lb"]
    assert endpoint.endpoint == f"127.0.0.3:{a2.port}"


async def test_srv_records_give_hosts_ports_and_weights(
    proxy: Any, dns: LoopbackDNS, addresses: Any, fault_backends: Any,
) -> None:
    b2, = await addresses("127.0.0.2")
    b3, = await addresses("127.0.0.3")  # another port: SRV names it
    [gcp] = await fault_backends("gcp-a")
    dns.set_srv("_web._tcp.svc.test", [(10, 30, b2.port, "a.svc.test"),
                                       (10, 10, b3.port, "b.svc.test"),
                                       (20, 50, b3.port, "backup.svc.test")])
    dns.set_addresses("a.svc.test", ["127.0.0.2"])
    dns.set_addresses("b.svc.test", ["127.0.0.3"])
    server = await proxy(dns_config(dns, 0, gcp.port, url="srv+http://_web._tcp.svc.test"))
    assert [r.status_code for r in await gets(server.port, 40)] == [200] * 40
    assert (len(b2.received), len(b3.received)) == (30, 10)  # weights 30:10, priority 20 unused
    endpoint = next(b for b in web(server).backends if b.endpoint == f"127.0.0.2:{b2.port}")
    assert endpoint.host_header == f"a.svc.test:{b2.port}".encode()


async def test_logical_discovery_uses_one_address(
    proxy: Any, dns: LoopbackDNS, addresses: Any, fault_backends: Any,
) -> None:
    a2, a3 = await addresses("127.0.0.2", "127.0.0.3")
    [gcp] = await fault_backends("gcp-a")
    dns.set_addresses(NAME, ["127.0.0.3", "127.0.0.2"])
    server = await proxy(dns_config(dns, a2.port, gcp.port, backend_extra=", discovery: logical"))
    assert [r.status_code for r in await gets(server.port, 10)] == [200] * 10
    assert (len(a2.received), len(a3.received)) == (10, 0)  # the first address (sorted)


async def test_a_name_that_never_resolved_is_unusable_with_its_reason(
    proxy: Any, dns: LoopbackDNS, fault_backends: Any,
) -> None:
    [gcp] = await fault_backends("gcp-a")
    server = await proxy(dns_config(dns, 8080, gcp.port))  # the name is not in the zone
    [stand_in] = [b for b in web(server).backends if b.origin == "aws-lb"]
    assert not stand_in.usable and "NXDOMAIN" in stand_in.reason
    assert [r.status_code for r in await gets(server.port, 3)] == [200] * 3
    assert len(gcp.received) == 3


def test_dns_settings_are_checked_with_their_line() -> None:
    text = """
upstreams:
  web:
    backends:
      - {name: a, url: "http://lb.example:80", provider: aws}
      - {name: s, url: "srv+http://_web._tcp.example:80", provider: aws}
    dns: {nameservers: ["not-an-address"], min_ttl: 10s, max_ttl: 1s}
routes:
  - {path_prefix: /, upstream: web}
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "dns.yaml")
    message = str(caught.value)
    assert "dns.yaml:6: upstreams.web.backends.1.url: " in message
    assert "SRV" in message
    assert "dns.yaml:7: upstreams.web.dns.nameservers.0: " in message
    good = parse_config(text.replace("not-an-address", "[::1]:5353").replace(
        ', url: "srv+http://_web._tcp.example:80"', ', url: "srv+http://_web._tcp.example"'
    ).replace("min_ttl: 10s", "min_ttl: 1s"), "dns.yaml")
    assert good.upstreams["web"].dns.nameservers == ["[::1]:5353"]


async def test_addresses_rotate_under_load_without_an_error(
    run_proxy: Any, dns: LoopbackDNS, addresses: Any,
) -> None:
    """The real `failover-proxy run` (a supervisor resolving, a worker serving) before a name
    whose answer changes under 16 keep-alive clients: 127.0.0.2 leaves DNS and 127.0.0.4 joins.
    No client sees an error; no request reaches 127.0.0.2 later than TTL + 1 s after it left,
    and its pooled connections are closed; 127.0.0.4 takes traffic only after its first probe."""
    a2, a3, a4 = await addresses("127.0.0.2", "127.0.0.3", "127.0.0.4")
    [gcp] = await addresses("127.0.0.1", provider="gcp")
    ttl = 1
    dns.set_addresses(NAME, ["127.0.0.2", "127.0.0.3"], ttl=ttl)
    port, admin = free_port(), free_port()
    text = f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
access_log: {{path: ACCESS_LOG}}
upstreams:
  web:
    backends:
      - {{name: aws-lb, url: "http://{NAME}:{a2.port}", provider: aws}}
      - {{name: gcp-a, url: "http://127.0.0.1:{gcp.port}", provider: gcp}}
    dns: {{nameservers: ["{dns.nameserver}"], timeout: 300ms, failure_refresh: 200ms}}
    health_check: {{interval: 200ms, unhealthy_interval: 100ms, timeout: 250ms, jitter: 0%}}
    policy: {{strategy: priority, providers: [aws, gcp]}}
    retry: {{attempts: 3, per_try_timeout: 1s}}
routes:
  - {{path_prefix: /, upstream: web}}
"""
    proxy = await run_proxy(text, port, admin)
    load = KeepAliveLoad(port, 16)
    running = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(1.0)
        assert a2.received and a3.received and not a4.received
        changed = time.monotonic()
        dns.set_addresses(NAME, ["127.0.0.3", "127.0.0.4"], ttl=ttl)
        await asyncio.sleep(ttl + 2.0)
        status = (await proxy.status())["upstreams"]["web"]
    finally:
        load.stop()
        await running
    late = [r.at - changed for r in a2.received if r.at > changed]
    first_to_new = a4.received[0].at - changed if a4.received else None
    print(f"\nlast request to the removed address {max(late, default=0):.3f}s after the change;"
          f" the new one's first request {first_to_new}s after it, its first probe "
          f"{a4.probed[0] - changed if a4.probed else None}s; {len(load.samples)} requests")
    assert not load.errors, (load.errors[:5], proxy.failed_requests())
    assert max(late, default=0.0) <= ttl + 1.0
    assert a2.open_connections == 0  # the removed address's pooled connections are closed
    assert a4.received and a4.probed and a4.received[0].at >= a4.probed[0]
    assert status["dns"]["aws-lb"]["endpoints"] == [f"127.0.0.3:{a2.port}",
                                                    f"127.0.0.4:{a2.port}"]
    assert not gcp.received


def test_check_resolves_only_when_asked(dns: LoopbackDNS, tmp_path: Path) -> None:
    dns.set_addresses(NAME, ["127.0.0.3", "127.0.0.2"], ttl=30)
    path = tmp_path / "proxy.yaml"
    path.write_text(dns_config(dns, 8080, 9090).replace("access_log: {enabled: false}\n", ""))

    def check(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "failover_proxy", "check", "-c", str(path), *extra],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )

    offline = check()
    assert offline.returncode == 0 and dns.zone.queries == 0, offline.stderr
    resolved = check("--resolve")
    assert resolved.returncode == 0, resolved.stderr
    assert (f"upstreams.web backend aws-lb: {NAME}: 127.0.0.2:8080, 127.0.0.3:8080 (TTL 30s, "
            "discovery strict)") in resolved.stdout
    dns.remove(NAME)
    missing = check("--resolve")
    assert missing.returncode != 0
    assert "nxdomain: name does not exist (NXDOMAIN)" in missing.stdout


async def test_tls_names_the_host_whatever_address_is_dialled(
    proxy: Any, dns: LoopbackDNS, fault_backends: Any, tmp_path: Path,
) -> None:
    """A certificate for lb.aws.test only, served on 127.0.0.2: the proxy dials the address
    DNS gave and verifies the name (SNI and the certificate), and the probe does the same."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(NAME).configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    names: list[str | None] = []

    def note_sni(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        names.append(name)

    server_context.sni_callback = note_sni  # type: ignore[assignment]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.2", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    [gcp] = await fault_backends("gcp-a")
    dns.set_addresses(NAME, ["127.0.0.2"])
    extra = (f"    tls: {{ca_file: {ca_file}}}\n"
             "    health_check: {path: /healthz, interval: 100ms, jitter: 0%}\n")
    started = await proxy(dns_config(dns, port, gcp.port, url=f"https://{NAME}:{port}",
                                     upstream_extra=extra))
    try:
        await asyncio.sleep(0.3)  # a few probes
        responses = await gets(started.port, 3)
        assert [r.text for r in responses] == ["secure"] * 3
        [endpoint] = [b for b in web(started).backends if b.origin == "aws-lb"]
        assert endpoint.usable and endpoint.last_check.startswith("ok")
        assert names and set(names) == {NAME}
        assert not gcp.received
    finally:
        server.close()


async def test_a_reload_keeps_the_endpoints_and_a_drain_holds_them_all(
    file_proxy: Any, dns: LoopbackDNS, addresses: Any, fault_backends: Any,
) -> None:
    a2, _ = await addresses("127.0.0.2", "127.0.0.3")
    [gcp] = await fault_backends("gcp-a")
    dns.set_addresses(NAME, ["127.0.0.2", "127.0.0.3"], ttl=1)
    text = dns_config(dns, a2.port, gcp.port).replace(
        "listen: {host: 127.0.0.1, port: 0}", "listen: {host: 127.0.0.1, port: 0}\n"
        "admin: {host: 127.0.0.1, port: 0}")
    running = await file_proxy(text)
    before = {b.name: b for b in web(running.server).backends}
    running.path.write_text(text.replace("retry: {attempts: 3}", "retry: {attempts: 2}"))
    reloaded = await running.server.reload()
    assert reloaded.ok, reloaded.errors
    after = {b.name: b for b in web(running.server).backends}
    assert set(after) == set(before) and all(after[n] is before[n] for n in after)
    async with httpx.AsyncClient(base_url=running.admin, trust_env=False) as admin:
        drained = (await admin.post("/backends/web/aws-lb/drain")).json()
    assert sorted(drained) == [f"aws-lb@127.0.0.2:{a2.port}", f"aws-lb@127.0.0.3:{a2.port}"]
    dns.set_addresses(NAME, ["127.0.0.3", "127.0.0.4"], ttl=1)
    upstream = web(running.server)
    await eventually(lambda: any(b.endpoint.startswith("127.0.0.4") for b in upstream.backends))
    assert all(b.draining for b in upstream.backends if b.origin == "aws-lb")
    assert [r.status_code for r in await gets(running.port, 4)] == [200] * 4
    assert len(gcp.received) == 4


async def test_a_failed_endpoint_is_retried_on_another_endpoint(
    proxy: Any, dns: LoopbackDNS, addresses: Any,
) -> None:
    """One provider only: a refused connection on 127.0.0.2 is retried on 127.0.0.3, the other
    endpoint of the same backend, never on the endpoint that just failed."""
    a2, a3 = await addresses("127.0.0.2", "127.0.0.3")
    await a2.set_mode("refusing")
    dns.set_addresses(NAME, ["127.0.0.2", "127.0.0.3"])
    server = await proxy(f"""
listen: {{host: 127.0.0.1, port: 0}}
access_log: {{enabled: false}}
upstreams:
  web:
    backends:
      - {{name: aws-lb, url: "http://{NAME}:{a2.port}", provider: aws}}
    dns: {{nameservers: ["{dns.nameserver}"], timeout: 300ms}}
    retry: {{attempts: 2}}
    outlier: {{consecutive_failures: 100}}
routes:
  - {{path_prefix: /, upstream: web}}
""")
    assert [r.status_code for r in await gets(server.port, 10)] == [200] * 10
    assert len(a3.received) == 10
    refused = server.store.attempts[("web", "aws", "aws-lb", f"127.0.0.2:{a2.port}")]
    # The balancer's turns fell on .2 for every first attempt: each was retried on .3.
    assert refused[ATTEMPT_OUTCOMES.index("connect_failure")] == sum(refused) >= 5


async def test_ipv6_addresses_are_endpoints_too(
    proxy: Any, dns: LoopbackDNS, addresses: Any, fault_backends: Any,
) -> None:
    try:
        [v6] = await addresses("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    [gcp] = await fault_backends("gcp-a")
    dns.set_addresses(NAME, ["::1"])
    server = await proxy(dns_config(dns, v6.port, gcp.port, backend_extra=", dns: {family: ipv6, "
                                    f'nameservers: ["{dns.nameserver}"]}}'))
    assert [r.status_code for r in await gets(server.port, 3)] == [200] * 3
    assert len(v6.received) == 3
    [endpoint] = [b for b in web(server).backends if b.origin == "aws-lb"]
    assert endpoint.endpoint == f"[::1]:{v6.port}"
    assert endpoint.name == f"aws-lb@[::1]:{v6.port}"
