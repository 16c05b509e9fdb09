"""TLS at the edge: the listener's certificates, chosen by SNI, replaced without a restart.

Each certificate gets its own server context; the listener's context (the "front", made once,
since a listening server's context cannot be swapped) picks one per handshake in its SNI
callback: the exact name, then a wildcard (`*.example.com` for `api.example.com`), then the
first certificate as the default. Replacing the certificates replaces that table only: new
handshakes get the new certificates, established connections keep theirs. Protocol versions,
ciphers and client-certificate checks are fixed per connection when it is created (OpenSSL
copies them from the front context), so they change only with a restart.

Certificates are read again on reload and when their files change (polled every second); a
certificate that fails to load leaves the running ones serving, and says why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config.certificates import CertificateError, check_key_pair

if TYPE_CHECKING:
    from ..config.schema import CertificateConfig, ListenTlsConfig

log = logging.getLogger("failover_proxy")

WATCH_INTERVAL = 1.0
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
                "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True)
class Certificate:
    """A loaded certificate: its context, the names it serves and when it expires."""

    context: ssl.SSLContext
    names: tuple[str, ...]
    not_after: datetime.datetime
    cert_file: str

    def as_dict(self) -> dict[str, Any]:
        return {"cert_file": self.cert_file, "names": list(self.names),
                "not_after": self.not_after.isoformat()}


class ServerTls:
    """The listener's TLS: the front context and the certificates it chooses from."""

    def __init__(self, config: ListenTlsConfig) -> None:
        self.config = config
        self.certificates = self._load(config.certificates)
        self._by_name: dict[str, Certificate] = {}
        self._index()
        self.front = self._context(config.certificates[0])
        self.front.sni_callback = self._choose
        self._watcher: asyncio.Task[None] | None = None
        self._seen = self._file_marks()
        self.on_reload: Callable[[str], None] | None = None
        """Told "success" or "failure" after each attempt to replace the certificates."""

    def _context(self, certificate: CertificateConfig) -> ssl.SSLContext:
        config = self.config
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _VERSIONS[config.min_version]
        if config.ciphers:
            context.set_ciphers(config.ciphers)
        context.set_alpn_protocols(list(config.alpn))
        context.options |= ssl.OP_NO_RENEGOTIATION  # a client cannot make us redo handshakes
        if not config.session_tickets:
            context.options |= ssl.OP_NO_TICKET
            context.num_tickets = 0
        context.load_cert_chain(certificate.cert_file, certificate.key_file)
        if config.client_auth != "none":
            context.verify_mode = _CLIENT_AUTH[config.client_auth]
            context.load_verify_locations(cafile=config.client_ca_file)
        return context

    def _load(self, configs: list[CertificateConfig]) -> list[Certificate]:
        loaded = []
        for certificate in configs:
            names, not_after = check_key_pair(certificate.cert_file, certificate.key_file)
            loaded.append(Certificate(self._context(certificate), names, not_after,
                                      certificate.cert_file))
        return loaded

    def _index(self) -> None:
        by_name: dict[str, Certificate] = {}
        for certificate in self.certificates:
            for name in certificate.names:
                by_name.setdefault(name, certificate)
        self._by_name = by_name

    def choose(self, server_name: str | None) -> Certificate:
        """The certificate for a name a client asked for: exact, wildcard, then the first."""
        if server_name:
            name = server_name.lower().rstrip(".")
            found = self._by_name.get(name)
            if found is None and "." in name:
                found = self._by_name.get("*" + name[name.index("."):])
            if found is not None:
                return found
        return self.certificates[0]

    def _choose(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                _: ssl.SSLContext) -> None:
        connection.context = self.choose(server_name).context

    def replace(self, configs: list[CertificateConfig]) -> None:
        """Serve these certificates to new handshakes from now on; on any error (raised), the
        ones serving stay."""
        loaded = self._load(configs)
        self.certificates = loaded
        self._index()
        self.config = dataclasses.replace(self.config, certificates=configs)
        self._seen = self._file_marks()

    # -- watching the files --------------------------------------------------------------------

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watcher is None:
            self._watcher = loop.create_task(self._watch_forever())

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def _file_marks(self) -> tuple[tuple[int, int, int] | None, ...]:
        marks: list[tuple[int, int, int] | None] = []
        for certificate in self.config.certificates:
            for path in (certificate.cert_file, certificate.key_file):
                try:
                    found = os.stat(path)
                    marks.append((found.st_ino, found.st_size, found.st_mtime_ns))
                except OSError:
                    marks.append(None)
        return tuple(marks)

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            marks = self._file_marks()
            if marks == self._seen:
                continue
            self._seen = marks  # each change is tried once; the next change tries again
            self.reload_files("certificate files changed")

    def reload_files(self, why: str) -> bool:
        """Read the configured files again; True when the new certificates serve."""
        try:
            self.replace(self.config.certificates)
        except (CertificateError, ssl.SSLError, OSError) as error:
            log.error("TLS: %s, but the new certificates were refused; the running ones keep "
                      "serving: %s", why, error)
            if self.on_reload is not None:
                self.on_reload("failure")
            return False
        log.info("TLS: %s: serving %s", why, self.summary())
        if self.on_reload is not None:
            self.on_reload("success")
        return True

    def summary(self) -> str:
        return "; ".join(f"{c.cert_file} ({', '.join(c.names) or 'no names'}, until "
                         f"{c.not_after:%Y-%m-%d})" for c in self.certificates)

