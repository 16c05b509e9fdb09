"""TLS on the client listener: certificates by SNI, reloaded without a restart, client
certificates both ways. Real TLS with certificates from a test CA (trustme), real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from failover_proxy.config.loading import ConfigError, parse_config

from .conftest import FileProxy, read_one_response

StartFileProxy = Callable[[str], Awaitable[FileProxy]]
StartApp = Callable[[web.Application], Awaitable[int]]


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, folder: Path, stem: str, *names: str) -> tuple[Path, Path]:
    """A certificate for `names` signed by `ca`, and its key, as PEM files."""
    issued = ca.issue_cert(*names)
    cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    return cert, key


async def echo_backend(aiohttp_backend: StartApp) -> int:
    """Answers with the forwarding headers it received, as JSON."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({
            "proto": request.headers.get("X-Forwarded-Proto"),
            "host": request.headers.get("Host"), "path": request.path,
            "body": len(await request.read()),
        })

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    return await aiohttp_backend(app)


def tls_config(backend_port: int, certificates: list[tuple[Path, Path]], extra: str = "",
               top: str = "") -> str:
    entries = "".join(f"        - {{cert_file: {cert}, key_file: {key}}}\n"
                      for cert, key in certificates)
    return (
        "listen:\n  port: 0\n  tls:\n    certificates:\n" + entries + extra +
        "admin: {port: 0}\naccess_log: {enabled: false}\n" + top +
        "upstreams:\n  web:\n    backends:\n"
        f'      - {{name: b, url: "http://127.0.0.1:{backend_port}", provider: aws}}\n'
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def handshake(port: int, context: ssl.SSLContext, server_name: str | None
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, set[str]]:
    """A TLS connection asking for `server_name`; the names of the certificate it got."""
    if server_name is None:
        context.check_hostname = False
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name or "")
    peer = writer.get_extra_info("peercert")
    names = {value for kind, value in peer.get("subjectAltName", ()) if kind == "DNS"}
    return reader, writer, names


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
              host: str = "x") -> dict[str, object]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    answer = await asyncio.wait_for(read_one_response(reader), 5)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 "), answer
    found: dict[str, object] = json.loads(body)
    return found


async def test_certificates_are_chosen_by_sni_and_requests_say_https(
    ca: trustme.CA, tmp_path: Path, file_proxy: StartFileProxy, aiohttp_backend: StartApp,
) -> None:
    default = write_pair(ca, tmp_path, "default", "default.test")
    api = write_pair(ca, tmp_path, "api", "api.test")
    wildcard = write_pair(ca, tmp_path, "wild", "*.example.test")
    proxy = await file_proxy(tls_config(await echo_backend(aiohttp_backend),
                                        [default, api, wildcard]))
    port = proxy.port
    cases = {"api.test": {"api.test"}, "API.test": {"api.test"},
             "shop.example.test": {"*.example.test"}, "other.test": {"default.test"},
             None: {"default.test"}}
    for asked, expected in cases.items():
        context = client_context(ca)
        if asked == "other.test":
            context.check_hostname = False  # the default certificate does not name it
        reader, writer, names = await handshake(port, context, asked)
        assert names == expected, (asked, names)
        for number in range(3):  # keep-alive over TLS
            seen = await get(reader, writer, f"/r{number}", host=asked or "x")
            assert seen["proto"] == "https" and seen["path"] == f"/r{number}"
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() in (None, "http/1.1")
        writer.close()
    # A large upload and download cross the TLS transport intact (no fast-path shortcuts).
    reader, writer, _ = await handshake(port, client_context(ca), "api.test")
    body = b"u" * (3 * 1024 * 1024)
    writer.write(b"POST /up HTTP/1.1\r\nHost: api.test\r\nContent-Length: %d\r\n\r\n"
                 % len(body) + body)
    answer = await asyncio.wait_for(read_one_response(reader), 10)
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["body"] == len(body)
    writer.close()
    # Plain HTTP on the TLS port gets no answer in the clear.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    leaked = await asyncio.wait_for(reader.read(), 10)
    assert b"HTTP/1.1 200" not in leaked
    writer.close()


async def test_tls_1_2_floor_and_protocol_settings(
    ca: trustme.CA, tmp_path: Path, file_proxy: StartFileProxy, aiohttp_backend: StartApp,
) -> None:
    pair = write_pair(ca, tmp_path, "api", "api.test")
    proxy = await file_proxy(tls_config(await echo_backend(aiohttp_backend), [pair],
                                        extra="    min_version: '1.3'\n"))
    old = client_context(ca)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(proxy.port, old, "api.test")
    reader, writer, _ = await handshake(proxy.port, client_context(ca), "api.test")
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
    assert (await get(reader, writer, "/"))["proto"] == "https"
    writer.close()


def test_a_key_that_does_not_match_or_cannot_be_read_is_a_located_error(
    ca: trustme.CA, tmp_path: Path,
) -> None:
    good = write_pair(ca, tmp_path, "good", "good.test")
    other = write_pair(ca, tmp_path, "other", "other.test")
    text = tls_config(1, [good, (good[0], other[1])])
    with pytest.raises(ConfigError) as mismatch:
        parse_config(text, "proxy.yaml")
    message = str(mismatch.value)
    assert "proxy.yaml:6: listen.tls.certificates.1.key_file:" in message, message
    assert "is not the private key of the certificate" in message
    missing = tls_config(1, [(good[0], tmp_path / "absent.key")])
    with pytest.raises(ConfigError) as unreadable:
        parse_config(missing, "proxy.yaml")
    assert "listen.tls.certificates.0.key_file: cannot read" in str(unreadable.value)
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as not_pem:
        parse_config(tls_config(1, [(garbage, good[1])]), "proxy.yaml")
    assert "listen.tls.certificates.0.cert_file:" in str(not_pem.value)
    with pytest.raises(ConfigError) as no_ca:
        parse_config(tls_config(1, [good], extra="    client_auth: required\n"), "proxy.yaml")
    assert "listen.tls.client_ca_file: client_auth required needs client_ca_file" in str(
        no_ca.value)


async def test_certificates_reload_without_dropping_connections_and_bad_ones_are_refused(
    ca: trustme.CA, tmp_path: Path, file_proxy: StartFileProxy, aiohttp_backend: StartApp,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="failover_proxy")
    cert, key = write_pair(ca, tmp_path, "api", "api.test")
    proxy = await file_proxy(tls_config(await echo_backend(aiohttp_backend), [(cert, key)]))
    server = proxy.server
    held_reader, held_writer, names = await handshake(proxy.port, client_context(ca), "api.test")
    assert names == {"api.test"}
    # New files in place, then a reload: new handshakes get the new certificate...
    write_pair(ca, tmp_path, "api", "api.test", "www.api.test")
    assert (await server.reload()).ok
    reader, writer, names = await handshake(proxy.port, client_context(ca), "api.test")
    assert names == {"api.test", "www.api.test"}
    writer.close()
    # ...and the connection made before it goes on being served.
    assert (await get(held_reader, held_writer, "/still"))["path"] == "/still"
    # A changed file is noticed without a reload (polled each second).
    write_pair(ca, tmp_path, "api", "api.test", "v3.api.test")
    for _ in range(50):
        reader, writer, names = await handshake(proxy.port, client_context(ca), "api.test")
        writer.close()
        if "v3.api.test" in names:
            break
        await asyncio.sleep(0.1)
    assert names == {"api.test", "v3.api.test"}
    # A key that does not match the new certificate: refused, the running one serves on.
    other = ca.issue_cert("api.test", "broken.api.test")
    cert.write_bytes(b"".join(blob.bytes() for blob in other.cert_chain_pems))
    for _ in range(50):
        if "new certificates were refused" in caplog.text:
            break
        await asyncio.sleep(0.1)
    assert "the running ones keep serving" in caplog.text
    reader, writer, names = await handshake(proxy.port, client_context(ca), "api.test")
    assert names == {"api.test", "v3.api.test"}
    assert (await get(reader, writer, "/after"))["proto"] == "https"
    writer.close()
    assert not (await server.reload()).ok  # the config names a pair that does not match
    assert server.store.counters["tls_certificate_reloads"] == {
        ("success",): 2, ("failure",): 1}
    assert (await get(held_reader, held_writer, "/end"))["path"] == "/end"
    held_writer.close()


async def test_client_certificates_are_required_when_configured(
    ca: trustme.CA, tmp_path: Path, file_proxy: StartFileProxy, aiohttp_backend: StartApp,
) -> None:
    pair = write_pair(ca, tmp_path, "api", "api.test")
    clients = trustme.CA()
    clients_ca = tmp_path / "clients-ca.pem"
    clients.cert_pem.write_to_path(str(clients_ca))
    proxy = await file_proxy(tls_config(
        await echo_backend(aiohttp_backend), [pair],
        extra=f"    client_auth: required\n    client_ca_file: {clients_ca}\n"))
    anonymous = client_context(ca)
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        reader, writer, _ = await handshake(proxy.port, anonymous, "api.test")
        await get(reader, writer, "/")  # TLS 1.3: the refusal arrives after the handshake
    stranger = client_context(ca)
    trustme.CA().issue_cert("someone@example.test").configure_cert(stranger)
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        reader, writer, _ = await handshake(proxy.port, stranger, "api.test")
        await get(reader, writer, "/")
    member = client_context(ca)
    clients.issue_cert("client@example.test").configure_cert(member)
    reader, writer, _ = await handshake(proxy.port, member, "api.test")
    assert (await get(reader, writer, "/in"))["path"] == "/in"
    writer.close()


@pytest.fixture
def mutual_backend(
    ca: trustme.CA, aiohttp_backend: Callable[..., Awaitable[int]]
) -> Callable[[trustme.CA], Awaitable[int]]:
    """An HTTPS backend (certificate for localhost from `ca`) that requires a client
    certificate signed by the CA it is given."""

    async def start(clients: trustme.CA) -> int:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost").configure_cert(context)
        context.verify_mode = ssl.CERT_REQUIRED
        clients.configure_trust(context)

        async def hello(request: web.Request) -> web.Response:
            peer = request.transport.get_extra_info("peercert") if request.transport else None
            subject = dict(item[0] for item in peer["subject"]) if peer else {}
            return web.Response(text=f"hello {subject.get('organizationalUnitName', '?')}")

        app = web.Application()
        app.router.add_get("/", hello)
        return await aiohttp_backend(app, context)

    return start


async def test_upstream_client_certificate_and_a_refused_backend_certificate(
    ca: trustme.CA, tmp_path: Path, file_proxy: StartFileProxy,
    mutual_backend: Callable[[trustme.CA], Awaitable[int]],
) -> None:
    clients = trustme.CA()
    port = await mutual_backend(clients)
    ca_file = tmp_path / "backend-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert, key = write_pair(clients, tmp_path, "proxy-client", "proxy.example.test")
    log_file = tmp_path / "access.log"

    def config(tls: str) -> str:
        return (
            "listen: {port: 0}\nadmin: {port: 0}\n"
            f"access_log: {{path: '{log_file}'}}\n"
            "upstreams:\n  web:\n    backends:\n"
            f'      - {{name: b, url: "https://localhost:{port}", provider: aws}}\n'
            f"    tls: {tls}\n    retry: {{attempts: 1}}\n"
            "routes:\n  - {path_prefix: /, upstream: web}\n")

    import httpx

    with_cert = await file_proxy(config(
        f"{{ca_file: {ca_file}, cert_file: {cert}, key_file: {key}}}"))
    async with httpx.AsyncClient(trust_env=False) as http:
        answer = await http.get(f"http://127.0.0.1:{with_cert.port}/")
    assert answer.status_code == 200 and answer.text.startswith("hello"), answer.text
    without = await file_proxy(config(f"{{ca_file: {ca_file}}}"))
    async with httpx.AsyncClient(trust_env=False) as http:
        refused = await http.get(f"http://127.0.0.1:{without.port}/")
    assert refused.status_code == 502
    # A backend whose certificate the proxy does not trust: a connect failure, with its reason.
    untrusting = await file_proxy(config(f"{{cert_file: {cert}, key_file: {key}}}"))
    async with httpx.AsyncClient(trust_env=False) as http:
        unverified = await http.get(f"http://127.0.0.1:{untrusting.port}/")
    assert unverified.status_code == 502
    assert "CERTIFICATE_VERIFY_FAILED" in unverified.text, unverified.text
    await asyncio.sleep(1.2)  # the sweep hands access log lines to the writer
    reasons = [json.loads(line).get("reason", "") for line in log_file.read_text().splitlines()]
    assert any("certificate verify failed" in reason.lower()
               or "CERTIFICATE_VERIFY_FAILED" in reason for reason in reasons), reasons
    attempts = untrusting.server.store.attempts
    assert any(counts[1] for key, counts in attempts.items()), attempts  # connect_failure


async def test_workers_terminate_tls_and_reload_certificates_on_sighup(
    ca: trustme.CA, tmp_path: Path, aiohttp_backend: StartApp,
) -> None:
    """The real `failover-proxy run` with two workers: each terminates TLS on the shared
    socket, and SIGHUP makes each read the new certificate files."""
    import signal

    from .conftest import ProxyProcess, free_port

    cert, key = write_pair(ca, tmp_path, "api", "api.test")
    port = free_port()
    text = tls_config(await echo_backend(aiohttp_backend), [(cert, key)]).replace(
        "  port: 0\n", f"  port: {port}\n", 1).replace("  tls:\n", "  tls:\n    watch: false\n")
    path = tmp_path / "proxy.yaml"
    path.write_text(text.replace("admin: {port: 0}\n", "workers: 2\n"))
    process = await asyncio.to_thread(ProxyProcess, path, port)
    try:
        for _ in range(4):  # connections land on both workers
            reader, writer, names = await handshake(port, client_context(ca), "api.test")
            assert names == {"api.test"}
            assert (await get(reader, writer, "/w"))["proto"] == "https"
            writer.close()
        write_pair(ca, tmp_path, "api", "api.test", "new.api.test")
        process.process.send_signal(signal.SIGHUP)
        seen: list[set[str]] = []
        for _ in range(100):
            reader, writer, names = await handshake(port, client_context(ca), "api.test")
            writer.close()
            seen.append(names)
            if all("new.api.test" in n for n in seen[-6:]) and len(seen) >= 6:
                break
            await asyncio.sleep(0.05)
        assert all("new.api.test" in n for n in seen[-6:]), seen
    finally:
        output = await asyncio.to_thread(process.stop)
    assert "TLS: reload: serving" in output, output
    assert "Traceback" not in output


async def test_sessions_resume_with_tickets_unless_turned_off(
    ca: trustme.CA, tmp_path: Path, file_proxy: StartFileProxy, aiohttp_backend: StartApp,
) -> None:
    import socket

    pair = write_pair(ca, tmp_path, "api", "api.test")
    port = await echo_backend(aiohttp_backend)

    def connect(proxy_port: int, context: ssl.SSLContext,
                session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool]:
        with (socket.create_connection(("127.0.0.1", proxy_port), timeout=5) as raw,
              context.wrap_socket(raw, server_hostname="api.test", session=session) as tls):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
            while tls.recv(65536):  # TLS 1.3 tickets arrive after the handshake
                pass
            return tls.session, tls.session_reused

    for tickets, resumed in (("true", True), ("false", False)):
        proxy = await file_proxy(tls_config(port, [pair],
                                            extra=f"    session_tickets: {tickets}\n"))
        context = client_context(ca)
        session, first_reused = await asyncio.to_thread(connect, proxy.port, context, None)
        assert session is not None and not first_reused
        _, reused = await asyncio.to_thread(connect, proxy.port, context, session)
        assert reused is resumed, tickets
