"""A real DNS server on loopback that tests re-program while traffic flows.

dnslib's server (UDP, in a thread of the test process) answers from a table the test
changes: A and AAAA records, SRV records, names that do not exist (NXDOMAIN). `stop_answering`
makes it read queries and answer none in time (lookups time out); `answer_again` undoes it.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSLabel
from dnslib.server import BaseResolver, DNSLogger, DNSServer


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Zone(BaseResolver):  # type: ignore[misc]
    """Records by (name, type); every query is counted."""

    records: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    ttl: int = 1
    queries: int = 0
    silent: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        kind = QTYPE[request.q.qtype]
        if self.silent:
            time.sleep(3.0)  # this query's thread only: an answer far too late to be read
        with self.lock:
            self.queries += 1
            known = any(n == name for n, _ in self.records)
            found = list(self.records.get((name, kind), []))
            ttl = self.ttl
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for rdata in found:
            reply.add_answer(RR(DNSLabel(name), getattr(QTYPE, kind), rdata=rdata, ttl=ttl))
        return reply


class LoopbackDNS:
    def __init__(self) -> None:
        self.zone = Zone()
        self.port = free_udp_port()
        self._servers: list[DNSServer] = []

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")
        server = DNSServer(self.zone, port=self.port, address="127.0.0.1", logger=quiet)
        server.start_thread()
        self._servers.append(server)

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()
        self._servers.clear()

    def stop_answering(self) -> None:
        self.zone.silent = True

    def answer_again(self) -> None:
        self.zone.silent = False

    def set_addresses(self, name: str, addresses: list[str], ttl: int = 1) -> None:
        """`name` answers these A (and AAAA) records from now on."""
        with self.zone.lock:
            self.zone.ttl = ttl
            self._forget(name)
            self.zone.records[(name, "A")] = [A(a) for a in addresses if ":" not in a]
            self.zone.records[(name, "AAAA")] = [AAAA(a) for a in addresses if ":" in a]

    def set_srv(self, name: str, entries: list[tuple[int, int, int, str]], ttl: int = 1) -> None:
        """SRV records of (priority, weight, port, target)."""
        with self.zone.lock:
            self.zone.ttl = ttl
            self._forget(name)
            self.zone.records[(name, "SRV")] = [SRV(p, w, port, t) for p, w, port, t in entries]

    def remove(self, name: str) -> None:
        """`name` no longer exists (NXDOMAIN)."""
        with self.zone.lock:
            self._forget(name)

    def _forget(self, name: str) -> None:
        for key in [k for k in self.zone.records if k[0] == name]:
            del self.zone.records[key]
