"""The config's shape: plain frozen dataclasses, with the rules pydantic checks written on them.

This module imports neither pydantic nor yaml: `config.py` validates a file into these classes,
and every other module (the workers' data plane above all) only reads them. A worker receives
its config already validated from the supervisor and never loads the validator: pydantic alone
makes a Python process about 12 MiB larger, a worker without it about 28 MiB in all.

The rules are annotations pydantic understands (`Constraints`, `Before`, `After`: pydantic's
`__get_pydantic_core_schema__` protocol, importing pydantic_core only when a validator is
built) and `__post_init__` checks across fields, which pydantic runs after validating a class.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, TypeVar, dataclass_transform
from urllib.parse import urlsplit

# ---------------------------------------------------------------------------------------------
# Rules, as pydantic annotations.


class Constraints:
    """Limits pydantic's own type checks enforce (ge, le, gt, min_length, pattern), with its
    standard messages."""

    def __init__(self, **limits: object) -> None:
        self.limits = limits

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        return {**handler(source), **self.limits}


class Before:
    """Turns what an operator wrote (`250ms`, `64KiB`, `10%`) into the type, before pydantic
    checks it."""

    def __init__(self, parse: Callable[[Any], Any]) -> None:
        self.parse = parse

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        inner = handler(source)
        # What an operator may write: the type itself or text (`250ms`, `64KiB`, `10%`).
        written = core_schema.union_schema([inner, core_schema.str_schema()])
        return core_schema.no_info_before_validator_function(
            self.parse, inner, json_schema_input_schema=written
        )


class After:
    """A check (or normalisation) of a value pydantic has already typed."""

    def __init__(self, check: Callable[[Any], Any]) -> None:
        self.check = check

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self.check, handler(source))


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class ConfigError(Exception):
    """Every problem found in one config file, each naming file, line and field."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues


class LocatedError(ValueError):
    """A cross-field error that knows which field it belongs to (pydantic only knows the class
    whose check raised it)."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


# ---------------------------------------------------------------------------------------------
# Scalar types: durations and byte sizes written the way operators write them.

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "k": 1000, "K": 1024, "KB": 1000, "KiB": 1024, "M": 1024**2,
    "MB": 1000**2, "MiB": 1024**2, "G": 1024**3, "GB": 1000**3, "GiB": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from `250ms`, `2s`, `1m`, `1h` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as 250ms, 2s or 1m, got {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from `64KiB`, `1MiB`, `10MB` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64KiB or 1MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    else:
        raise ValueError(f"expected a size such as 64KiB or 1MiB, got {value!r}")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def parse_fraction(value: object) -> float:
    """A share from `10%` or a number between 0 and 1."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError as exc:
            raise ValueError(f"expected a percentage such as 10%, got {value!r}") from exc
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a fraction such as 0.1 or 10%, got {value!r}")
    if not 0 <= value <= 1:
        raise ValueError("a fraction must be between 0 and 1 (0% and 100%)")
    return float(value)


def parse_status_range(value: object) -> tuple[int, int]:
    """`200-399` or `200` → an inclusive range of HTTP status codes."""
    text = str(value).strip()
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError as exc:
        raise ValueError(f"expected a status or a range such as 200-399, got {value!r}") from exc
    if not 100 <= bounds[0] <= bounds[1] <= 599:
        raise ValueError(f"status range must lie within 100-599, got {value!r}")
    return bounds


def _absolute_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"must start with '/', got {path!r}")
    return path


def _backend_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "srv+http", "srv+https"):
        raise ValueError(
            f"backend URL must start with http://, https://, srv+http:// or srv+https://, "
            f"got {url!r}"
        )
    if parts.scheme.startswith("srv+") and parts.port is not None:
        raise ValueError(f"an SRV backend URL takes its ports from DNS, not the URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"backend URL has no host: {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"backend URL has a bad port: {url!r}") from exc
    if parts.query or parts.fragment:
        raise ValueError(f"backend URL may not carry a query or fragment: {url!r}")
    if parts.username or parts.password:
        raise ValueError("backend URL may not carry credentials")
    return url


def parse_nameserver(value: object) -> str:
    """`127.0.0.1`, `127.0.0.1:5353`, `::1` or `[::1]:5353`, normalised to `address:port`
    (`[address]:port` for IPv6)."""
    text = str(value).strip()
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"expected [address]:port, got {value!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, digits = text.partition(":")
        if not digits.isdigit():
            raise ValueError(f"expected address:port, got {value!r}")
        port = int(digits)
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"a nameserver is an IP address (with an optional port), "
                         f"got {value!r}") from exc
    if not 0 < port < 65536:
        raise ValueError(f"nameserver port out of range: {value!r}")
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def parse_refresh(value: object) -> float | str:
    """`ttl` (the answer's TTL, within min_ttl..max_ttl) or a fixed duration."""
    if value == "ttl":
        return "ttl"
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("refresh must be ttl or a duration above zero")
    return seconds


def is_hostname(url: str) -> bool:
    """Whether a backend URL names its host by a DNS name (resolved by discovery) rather than
    by an IP address (an endpoint as it is)."""
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def _route_host(host: str) -> str:
    if not re.fullmatch(r"(\*\.)?[A-Za-z0-9.-]+", host):
        raise ValueError(f"host must be a name or *.suffix, got {host!r}")
    return host.lower()


AbsolutePath = Annotated[str, After(_absolute_path)]
Duration = Annotated[float, Before(parse_duration)]
ByteSize = Annotated[int, Before(parse_size)]
Fraction = Annotated[float, Before(parse_fraction)]
StatusRange = Annotated[tuple[int, int], Before(parse_status_range)]
Port = Annotated[int, Constraints(ge=0, le=65535)]
AtLeastOne = Annotated[int, Constraints(ge=1)]

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, kw_only_default=True)
def config_class(cls: type[_T]) -> type[_T]:
    """A config class: a frozen, keyword-only dataclass whose unknown keys are errors (a typo
    must never be silently ignored)."""
    made = dataclass(frozen=True, kw_only=True)(cls)
    made.__pydantic_config__ = {"extra": "forbid"}  # type: ignore[attr-defined]
    return made

# ---------------------------------------------------------------------------------------------
# The config classes.


@config_class
class CertificateConfig:
    """A certificate (PEM, with its chain after it) and its private key (PEM)."""

    cert_file: str
    key_file: str

    def __post_init__(self) -> None:
        _check_key_pair(self.cert_file, self.key_file)


def _check_key_pair(cert_file: str, key_file: str) -> None:
    """Both files readable, the key the certificate's: checked when the config is read, so a
    bad certificate is refused with its field and never replaces a serving one."""
    from .certificates import CertificateError, check_key_pair

    try:
        check_key_pair(cert_file, key_file)
    except CertificateError as error:
        raise LocatedError((error.field,), str(error)) from None


@config_class
class ListenTlsConfig:
    """TLS on the client listener (HTTP/1.1, or HTTP/2 where `alpn` offers it;
    X-Forwarded-Proto is then https)."""

    certificates: Annotated[list[CertificateConfig], Constraints(min_length=1)]
    """Chosen per connection by the name the client asks for (SNI): an exact name of a
    certificate's subjectAltName, then a wildcard, then the first certificate. Read again on
    reload and when the files change; one that fails to load leaves the running ones serving."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    ciphers: str | None = None
    """OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's); none: Python's
    defaults (forward-secret AEAD ciphers only)."""
    alpn: list[Literal["h2", "http/1.1"]] = field(default_factory=lambda: ["h2", "http/1.1"])
    """What the listener offers, in order of preference: HTTP/2 to clients that ask for it,
    HTTP/1.1 to the others. `[http/1.1]` serves HTTP/1.1 only."""
    client_auth: Literal["none", "optional", "required"] = "none"
    """Client certificates (mutual TLS): `required` refuses a handshake without a certificate
    signed by `client_ca_file`; `optional` asks for one and checks it when sent."""
    client_ca_file: str | None = None
    handshake_timeout: Duration = 10.0
    """A client that has not finished its handshake by then is dropped (slow handshakes hold a
    connection like a slow request head does)."""
    watch: bool = True
    """Reload the certificates when their files change (checked every second)."""
    session_tickets: bool = True
    """Let clients resume sessions with tickets (a resumed handshake skips the certificate
    signature). Off: no tickets, so TLS 1.3 handshakes are all full ones (TLS 1.2 clients can
    still resume by session id); some turn tickets off so that a stolen ticket key cannot
    decrypt past sessions."""

    def __post_init__(self) -> None:
        if self.client_auth != "none" and not self.client_ca_file:
            raise LocatedError(("client_ca_file",), f"client_auth {self.client_auth} needs "
                               "client_ca_file: the CA that signs the clients' certificates")
        if self.client_ca_file is not None and not os.access(self.client_ca_file, os.R_OK):
            raise LocatedError(("client_ca_file",), f"cannot read {self.client_ca_file}")


@config_class
class Http2Config:
    """HTTP/2 from clients."""

    h2c: bool = True
    """Serve HTTP/2 with prior knowledge (h2c) on a plain listener, on the same port as
    HTTP/1.1: a connection that opens with the HTTP/2 preface is served as HTTP/2 (no HTTP/1.1
    request starts with it). The `Upgrade: h2c` dance of RFC 7540 is not served (RFC 9113
    deprecated it; nginx and Envoy do not serve it either)."""
    max_concurrent_streams: AtLeastOne = 128
    """Streams one client connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS);
    a stream beyond it is refused (RST_STREAM REFUSED_STREAM), the connection serves on."""
    initial_window: Annotated[ByteSize, Constraints(ge=1, le=2**31 - 1)] = 65535
    """How much of a request body a client may send on one stream before the proxy has passed
    it on (SETTINGS_INITIAL_WINDOW_SIZE): the window is given back only as the backend takes
    the body, so a slow backend slows the client instead of filling the proxy's memory."""
    connection_window: Annotated[ByteSize, Constraints(ge=65535, le=2**31 - 1)] = 1024 * 1024
    """The same for all the streams of one connection together: what one client connection
    may make the proxy hold of request bodies at most."""
    max_frame_size: Annotated[ByteSize, Constraints(ge=16384, le=16777215)] = 16384
    """The largest frame a client may send (SETTINGS_MAX_FRAME_SIZE)."""
    max_header_list_bytes: ByteSize | None = None
    """The largest header block a request may decode to (SETTINGS_MAX_HEADER_LIST_SIZE);
    beyond it, an HPACK bomb, the connection ends. None: limits.max_header_bytes +
    limits.max_url_bytes."""
    idle_timeout: Duration | None = None
    """A connection with no stream open for this long is closed (GOAWAY). None:
    limits.keepalive_timeout, as for HTTP/1.1."""
    ping_interval: Duration | None = None
    """Send a PING when a connection with streams open has been silent this long, to find
    clients that vanished without closing; None: never."""
    ping_timeout: Duration = 10.0
    """A PING not answered by then ends the connection."""


@config_class
class ListenConfig:
    host: str = "127.0.0.1"
    """An address (0.0.0.0 or :: for all); a name listens on the first address it resolves to."""
    port: Port = 8080
    backlog: AtLeastOne = 1024
    tls: ListenTlsConfig | None = None
    """None: plain HTTP. Certificates reload without a restart; turning TLS on or off and
    its other settings take a restart."""
    http2: Http2Config = Http2Config()
    """HTTP/2 from clients; a change applies to connections opened after a reload."""


@config_class
class TimeoutsConfig:
    connect: Duration = 1.0
    read: Duration = 30.0
    """Longest silence from the backend while waiting for or streaming its response."""


@config_class
class TlsConfig:
    """TLS to HTTPS backends."""

    verify: bool = True
    ca_file: str | None = None
    server_name: str | None = None
    """SNI and certificate name; defaults to the backend URL's host."""
    cert_file: str | None = None
    """A client certificate (PEM) for backends that require one (mutual TLS), with key_file."""
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise LocatedError((missing,), "a client certificate needs both cert_file and "
                               "key_file")
        if self.cert_file is not None and self.key_file is not None:
            _check_key_pair(self.cert_file, self.key_file)


@config_class
class PoolConfig:
    max_idle_per_backend: Annotated[int, Constraints(ge=0)] = 256
    """Idle connections kept per backend. With more requests in flight than this, the rest
    open and close a connection each: in the benchmark at 256 connections a pool of 64 gave
    5.7k req/s where 64 connections gave 12.8k."""
    idle_timeout: Duration = 4.0
    """Shorter than common backend keep-alive timeouts (5 s in Node.js, 75 s in nginx)."""


@config_class
class UpstreamHttp2Config:
    """HTTP/2 connections to backends."""

    ping_interval: Duration | None = 10.0
    """PING a connection the backend has been silent on this long: a backend that vanished
    without closing (a blackholed host, a dropped NAT entry) is found in ping_interval +
    ping_timeout, and its requests retried, instead of each waiting out its read timeout.
    None: never."""
    ping_timeout: Duration = 5.0
    """A PING not answered by then: the connection is taken for dead, its streams failed."""
    initial_window: Annotated[ByteSize, Constraints(ge=1, le=2**31 - 1)] = 256 * 1024
    """How much of a response one stream may send before the proxy passes it on to its client
    (SETTINGS_INITIAL_WINDOW_SIZE): a slow client holds the backend's stream back by this much
    at most."""
    connection_window: Annotated[ByteSize, Constraints(ge=65535, le=2**31 - 1)] = 4 * 1024 * 1024
    """The same for all the streams of one connection together."""


@config_class
class DnsConfig:
    """How backend hostnames are resolved: by the proxy's own asynchronous resolver, ahead of
    time and honouring TTLs, never on a request's path."""

    refresh: Annotated[float | str, Before(parse_refresh)] = "ttl"
    """`ttl`: again when the answer's TTL runs out (kept within min_ttl..max_ttl); or a fixed
    duration."""
    min_ttl: Duration = 1.0
    max_ttl: Duration = 300.0
    failure_refresh: Duration = 2.0
    """After a failed lookup (the last good answer stays in use), try again this soon."""
    timeout: Duration = 2.0
    """One lookup's deadline (all nameservers together)."""
    nameservers: list[Annotated[str, Before(parse_nameserver)]] = field(default_factory=list)
    """`address` or `address:port` (`[v6]:port`); empty: those of /etc/resolv.conf."""
    family: Literal["auto", "ipv4", "ipv6"] = "auto"
    """auto: A records, and AAAA when there are none."""

    def __post_init__(self) -> None:
        if self.min_ttl > self.max_ttl:
            raise LocatedError(("min_ttl",), "min_ttl is longer than max_ttl")


@config_class
class BackendConfig:
    name: Annotated[str, Constraints(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")]
    url: Annotated[str, After(_backend_url)]
    provider: Annotated[str, Constraints(min_length=1)]
    region: str = ""
    weight: Annotated[int, Constraints(gt=0, le=10_000)] = 1
    discovery: Literal["strict", "logical"] = "strict"
    """For a hostname: strict makes every address of the answer an endpoint with its own
    health, ejection and pool; logical uses the first address alone (a name that already
    balances behind it). IP addresses are one endpoint either way."""
    dns: DnsConfig | None = None
    """This backend's resolver settings, in place of the upstream's."""
    capacity: Annotated[float, Constraints(gt=0)] | None = None
    """Requests per second it can serve, a live limit: it is never sent more (each worker
    sends its share); the excess spills to other backends with room, by the policy's order,
    and what none has room for is shed at once with 503 and Retry-After. With every backend's,
    `audit` checks that the others can absorb any one provider's share."""


@config_class
class HealthCheckConfig:
    """Active probes, run once per backend on their own schedule, never on the request path."""

    type: Literal["http", "tcp"] = "http"
    path: AbsolutePath = "/healthz"
    method: str = "GET"
    expect_status: Annotated[list[StatusRange], Constraints(min_length=1)] = field(
        default_factory=lambda: [(200, 399)]
    )
    expect_body: str | None = None
    """A substring the probe's response body must contain."""
    interval: Duration = 2.0
    unhealthy_interval: Duration = 0.5
    """Probe faster while a backend is unhealthy, so it returns sooner."""
    timeout: Duration = 1.0
    jitter: Fraction = 0.1
    healthy_threshold: AtLeastOne = 2
    unhealthy_threshold: AtLeastOne = 2
    headers: dict[str, str] = field(default_factory=dict)


@config_class
class OutlierConfig:
    """Passive detection from real traffic (Envoy's consecutive-5xx outlier detection)."""

    consecutive_failures: AtLeastOne = 5
    failure_statuses: list[int] = field(default_factory=lambda: [502, 503, 504])
    base_ejection: Duration = 30.0
    max_ejection: Duration = 300.0
    max_ejection_percent: Annotated[int, Constraints(ge=0, le=100)] = 50
    uneject_on_passing_check: bool = True
    """A passing active health check ends an ejection at once (Envoy's
    successful_active_health_check_uneject_host): a backend that is back is not kept out by a
    passive verdict taken while it was failing. The ejection still counts, so one more failure
    on probation ejects it for longer."""


@config_class
class CorrelatedFailuresConfig:
    backends: AtLeastOne = 2
    """Distinct backends of one region (of a provider with several regions) failing within
    `window` take the region down; distinct backends of one provider, in more than one of its
    regions, take the provider down. (A domain of fewer backends: all of them.)"""
    window: Duration = 1.0


@config_class
class PolicyConfig:
    """How traffic is spread over providers, and when a provider counts as down."""

    strategy: Literal["priority", "weighted", "latency"] = "weighted"
    """latency: the provider with the lowest recent latency of real requests (EWMA), with the
    others whose latency is within `latency_tolerance` of it sharing by weight."""
    latency_tolerance: Fraction = 0.2
    providers: list[str] | None = None
    """Priority order (strategy priority); default: the order backends are listed in. An entry
    is a provider (`gcp`) or one region of a provider (`aws/us-east-1`): `[aws/us-east-1,
    aws/us-west-2, gcp]` fails over region by region before leaving aws. The regions of a
    provider named by region that the list leaves out follow its last named region."""
    provider_weights: dict[str, int] | None = None
    """Share per provider or `provider/region` entry of `providers` (strategy weighted);
    default: the sum of its backends' weights."""
    local_region: str | None = None
    """The gateway's own region: inside a provider, its backends there get the traffic while
    that region is healthy enough, and the rest spills to the provider's other regions in
    proportion to the capacity it lacks (Envoy's locality weighting): the local share is
    min(1, overprovisioning x usable fraction of the local region)."""
    overprovisioning: Annotated[float, Constraints(ge=1.0, le=10.0)] = 1.4
    """How much spare capacity a region is assumed to have (1.4: it can lose 29 % of its
    backends before any traffic spills over)."""
    min_healthy_fraction: Fraction = 0.5
    correlated_failures: CorrelatedFailuresConfig = CorrelatedFailuresConfig()
    hold_down: Duration = 10.0
    """A provider taken down stays down at least this long (no flapping)."""
    slow_start: Duration = 0.0
    """A provider or backend that comes back gets a share growing linearly over this time."""
    panic_threshold: Fraction = 0.0
    """Below this usable share of the upstream's backends, health is no longer trusted."""
    panic: Literal["spread", "fail"] = "spread"
    """spread: send to every backend regardless of health; fail: answer 503 at once."""


@config_class
class CircuitBreakerConfig:
    """Beyond these the proxy answers 503 at once instead of piling up work."""

    max_requests_per_backend: AtLeastOne = 1024
    max_requests: AtLeastOne = 10000


RETRY_CONDITIONS = frozenset({"connect-failure", "reset", "timeout", "502", "503", "504"})
IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
"""Methods a retry may send again (RFC 9110 §9.2.2); others only with an idempotency key."""


@config_class
class RequestBufferingConfig:
    """Read a request body before taking a backend connection (nginx's proxy_request_buffering):
    a slow upload then holds a client connection only, never a backend's, and a body read
    whole can be sent again to another backend."""

    enabled: bool = True
    max_bytes: ByteSize = 64 * 1024
    """Bodies up to this size (by Content-Length, or chunked until they pass it) are read
    completely first; larger ones stream as they arrive. Buffered bodies are always
    replayable (the replay buffer is at least this large)."""


@config_class
class RetryConfig:
    attempts: Annotated[int, Constraints(ge=1, le=10)] = 3
    on: list[str] = field(
        default_factory=lambda: ["connect-failure", "reset", "timeout", "502", "503", "504"]
    )
    per_try_timeout: Duration | None = None
    """Longest wait for a response head per attempt; default: timeouts.read."""
    next_attempt: Literal["different_provider", "any"] = "different_provider"
    budget_percent: Annotated[float, Constraints(ge=0, le=100)] = 50.0
    """Retries in flight may be at most this share of requests in flight. Large enough that a
    whole provider failing (a third or half of traffic) is retried, small enough that when
    everything fails retries cannot multiply the load."""
    min_retry_concurrency: Annotated[int, Constraints(ge=0)] = 10
    replay_max_bytes: ByteSize = 1024 * 1024
    """Request body kept for a retry; a larger body streams and is not retried."""
    retry_with_idempotency_key: bool = False
    hedge_after: Duration | None = None
    """With no response head after this long, also send a bodiless idempotent request to
    another provider; the first response wins and the other attempt is cancelled."""

    def __post_init__(self) -> None:
        for index, condition in enumerate(self.on):
            if condition not in RETRY_CONDITIONS:
                known = ", ".join(sorted(RETRY_CONDITIONS))
                raise LocatedError(
                    ("on", index), f"unknown retry condition {condition!r} ({known})"
                )


@config_class
class HashOnConfig:
    """What keeps a client on one backend (balancer: hash): one header, one cookie, or its IP."""

    header: str | None = None
    cookie: str | None = None
    client_ip: bool = False

    def __post_init__(self) -> None:
        chosen = [self.header is not None, self.cookie is not None, self.client_ip]
        if sum(chosen) != 1:
            raise ValueError("hash_on needs exactly one of header, cookie, client_ip: true")


@config_class
class UpstreamConfig:
    backends: Annotated[list[BackendConfig], Constraints(min_length=1)]
    protocol: Literal["http1", "h2c", "h2", "auto"] = "http1"
    """The protocol spoken to these backends: `http1` is HTTP/1.1, one request at a time per
    connection, connections kept alive in a pool per backend (and `http/1.1` offered by ALPN
    over TLS); `h2c` is HTTP/2 in cleartext with prior knowledge (`http://` backends) and
    `h2` HTTP/2 over TLS, agreed by ALPN (`https://` backends): many requests at once on one
    connection per backend (see `http2`); `auto` asks by ALPN and speaks h2 to backends that
    agree, HTTP/1.1 to the others (and to `http://` ones). Clients' protocols are translated
    either way."""
    http2: UpstreamHttp2Config = UpstreamHttp2Config()
    """HTTP/2 connections to these backends (protocol h2c or h2)."""
    balancer: Literal["round_robin", "least_request", "hash"] = "round_robin"
    hash_on: HashOnConfig | None = None
    timeouts: TimeoutsConfig = TimeoutsConfig()
    host_header: Literal["backend", "preserve"] = "backend"
    tls: TlsConfig = TlsConfig()
    pool: PoolConfig = PoolConfig()
    health_check: HealthCheckConfig | None = None
    dns: DnsConfig = DnsConfig()
    """How the backends' hostnames are resolved (a backend's own `dns` replaces it)."""
    outlier: OutlierConfig = OutlierConfig()
    policy: PolicyConfig = PolicyConfig()
    retry: RetryConfig = RetryConfig()
    request_buffering: RequestBufferingConfig = RequestBufferingConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for index, backend in enumerate(self.backends):
            if backend.name in seen:
                raise LocatedError(
                    ("backends", index, "name"), f"duplicate backend name {backend.name!r}"
                )
            seen.add(backend.name)
        if self.balancer == "hash" and self.hash_on is None:
            raise LocatedError(
                ("balancer",), "balancer: hash needs hash_on (header, cookie or client_ip)"
            )
        self._check_policy_providers()
        self._check_protocol()

    def _check_protocol(self) -> None:
        wanted = {"h2c": "http", "h2": "https"}.get(self.protocol)
        for index, backend in enumerate(self.backends):
            scheme = backend.url.split("://", 1)[0].removeprefix("srv+")
            if wanted is not None and scheme != wanted:
                other = "h2" if self.protocol == "h2c" else "h2c"
                raise LocatedError(
                    ("backends", index, "url"),
                    f"protocol {self.protocol} speaks to {wanted}:// backends "
                    f"(use {other} for {scheme}://)",
                )

    def _check_policy_providers(self) -> None:
        known = list(dict.fromkeys(b.provider for b in self.backends))
        regions = list(dict.fromkeys(f"{b.provider}/{b.region}" for b in self.backends))
        policy = self.policy
        entries = policy.providers or []
        for index, name in enumerate(entries):
            provider, slash, _ = name.partition("/")
            if slash and name not in regions:
                raise LocatedError(
                    ("policy", "providers", index),
                    f"no backend in region {name!r} (regions: {', '.join(regions)})",
                )
            if not slash and name not in known:
                raise LocatedError(
                    ("policy", "providers", index),
                    f"no backend of provider {name!r} (providers: {', '.join(known)})",
                )
            if name in entries[:index]:
                raise LocatedError(("policy", "providers", index), f"{name!r} is listed twice")
            if (slash and provider in entries) or (
                not slash and any(e.startswith(provider + "/") for e in entries)
            ):
                raise LocatedError(
                    ("policy", "providers", index),
                    f"provider {provider!r} is named both whole and by region: name its "
                    "regions only, or the provider only",
                )
        local = policy.local_region
        if local is not None and all(b.region != local for b in self.backends):
            named = sorted({b.region for b in self.backends if b.region})
            raise LocatedError(
                ("policy", "local_region"),
                f"no backend in region {local!r} (regions: {', '.join(named) or 'none named'})",
            )
        for name, weight in (policy.provider_weights or {}).items():
            if name not in known and name not in entries:
                raise LocatedError(
                    ("policy", "provider_weights", name),
                    f"no backend of provider {name!r} (providers: {', '.join(known)})",
                )
            if weight < 0:
                raise LocatedError(
                    ("policy", "provider_weights", name), "weights cannot be negative"
                )


@config_class
class RouteConfig:
    name: Annotated[str, Constraints(min_length=1, pattern=r"^[A-Za-z0-9_.:/*-]+$")] | None = None
    """The route's label in metrics and logs; default: host (or *) and path prefix."""
    host: Annotated[str, After(_route_host)] | None = None
    """Exact host, `*.suffix` for any subdomain, or absent for any host."""
    path_prefix: AbsolutePath = "/"
    upstream: str

    @property
    def label(self) -> str:
        return self.name or f"{self.host or '*'}{self.path_prefix}"


@config_class
class LimitsConfig:
    max_header_bytes: ByteSize = 32 * 1024
    max_url_bytes: ByteSize = 8 * 1024
    max_headers: AtLeastOne = 100
    max_body_bytes: ByteSize | None = None
    """Largest request body accepted (413 above it); none = unlimited, streamed."""
    header_timeout: Duration = 10.0
    """Time a client gets to send a whole request head (slowloris guard)."""
    keepalive_timeout: Duration = 75.0
    lingering_timeout: Duration = 5.0
    """Lingering close: how long a connection the proxy is closing waits for more of the
    client's bytes (read and dropped) before it closes; 0 closes at once."""
    lingering_time: Duration = 30.0
    """Lingering close: the longest a closing connection keeps reading a client that goes on
    sending."""
    body_timeout: Duration = 60.0
    """Longest a client may pause while sending a request body the backend is waiting for
    (nginx's client_body_timeout): then 408, and the backend is not blamed. The backend's read
    and per-try timeouts start once the body is sent."""
    send_timeout: Duration = 60.0
    """Longest a client may leave what the proxy has for it untaken: the proxy's buffer for it
    full (the backend meanwhile held back, and not blamed), or what is left when the connection
    closes. Then the connection is dropped (nginx's send_timeout)."""
    tunnel_idle_timeout: Duration | None = 3600.0
    """An upgraded connection (WebSocket) that no byte crosses, either way, for this long is
    closed on both sides; none: never. Its precision is the sweep's (0.2 s)."""
    max_connections: Annotated[int, Constraints(ge=1)] | None = None
    """Client connections one worker process holds at once (nginx's worker_connections). At
    the limit the worker stops accepting: new connections wait in the listening socket's
    backlog (or go to another worker) until it holds fewer. The admin listener stays
    reachable. None: no limit."""
    max_connections_per_ip: Annotated[int, Constraints(ge=1)] | None = None
    """Client connections one address may hold open at once, per worker process; one more is
    answered 429 and closed. None: no limit."""
    max_requests_per_connection: Annotated[int, Constraints(ge=1)] | None = None
    """Requests one client connection may carry; the response to the last says
    `Connection: close` (nginx's keepalive_requests). None: no limit."""
    underscores_in_headers: bool = False
    """Forward request header fields whose name has an underscore. Off by default, as in nginx:
    some backends read `_` as `-`, so `Transfer_Encoding` or `Content_Length` would frame the
    request differently there than here."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@config_class
class AdminConfig:
    """The control plane's own listener: status, metrics, drills, reloads."""

    host: str = "127.0.0.1"
    port: Port = 9901
    token: str = ""
    """Bearer token the mutating endpoints require (empty: none, allowed on loopback only)."""
    history_interval: Annotated[Duration, Constraints(ge=0.1, le=60)] = 10.0
    """How often the status page's 15-minute charts (request rate, errors, p99 per provider)
    take a point; kept in memory by the admin listener."""

    def __post_init__(self) -> None:
        if not self.token and not is_loopback(self.host):
            raise LocatedError(
                ("token",),
                f"the admin listener on non-loopback address {self.host} needs a token "
                "(anyone who reaches it could drain backends or force providers down)",
            )


@config_class
class AccessLogConfig:
    """One JSON line per request."""

    enabled: bool = True
    path: str | None = None
    """A file to append to; default: standard output."""
    redact_query: bool = False
    """Log each target's query string as `?REDACTED` (query strings can carry secrets)."""


@config_class
class DrainConfig:
    """Graceful stop on SIGTERM: stay ready-but-draining, then let requests in flight finish."""

    delay: Duration = 5.0
    """How long the listener keeps serving after /readyz turns 503, so load balancers notice."""
    timeout: Duration = 30.0
    """How long requests in flight may take to finish once the listener is closed."""


@config_class
class ProxyConfig:
    listen: ListenConfig = ListenConfig()
    admin: AdminConfig | None = None
    upstreams: Annotated[dict[str, UpstreamConfig], Constraints(min_length=1)]
    routes: Annotated[list[RouteConfig], Constraints(min_length=1)]
    limits: LimitsConfig = LimitsConfig()
    access_log: AccessLogConfig = AccessLogConfig()
    debug_headers: bool = False
    """Add X-Failover-Proxy-Decision (provider, backend, attempts, reason) to responses."""
    drain: DrainConfig = DrainConfig()
    watch_config: bool = False
    """Reload when the config file changes (checked every second), besides SIGHUP and /reload."""
    workers: Literal["auto"] | Annotated[int, Constraints(ge=1, le=256)] = 1
    """Processes serving traffic: `auto` = one per CPU. A supervisor process beside them (for
    one worker too) holds the listening sockets, the health checks and the admin listener."""

    @property
    def worker_count(self) -> int:
        return (os.cpu_count() or 1) if self.workers == "auto" else self.workers

    def __post_init__(self) -> None:
        labels: set[str] = set()
        for index, route in enumerate(self.routes):
            if route.label in labels:
                raise LocatedError(
                    ("routes", index, "name"),
                    f"two routes are both labelled {route.label!r}: give one a distinct name",
                )
            labels.add(route.label)
            if route.upstream not in self.upstreams:
                known = ", ".join(sorted(self.upstreams))
                raise LocatedError(
                    ("routes", index, "upstream"),
                    f"unknown upstream {route.upstream!r} (known: {known})",
                )

    def keeping_restart_only(self, running: ProxyConfig) -> ProxyConfig:
        """This config with the settings only a restart can change taken from `running`, so
        the config in force says what is really in force."""
        return dataclasses.replace(self, **_restart_only(running, certificates_from=self))

    def keeping_unchanged_upstreams(self, running: ProxyConfig) -> ProxyConfig:
        """This config with each upstream equal to one of `running` replaced by that very
        object: what a reload left unchanged is then known by identity (carried on as it is,
        and sent to workers by name)."""
        upstreams = {
            name: running.upstreams[name]
            if name in running.upstreams and running.upstreams[name] == upstream else upstream
            for name, upstream in self.upstreams.items()
        }
        return dataclasses.replace(self, upstreams=upstreams)

    def restart_only_changes(self, running: ProxyConfig) -> list[str]:
        """A warning for each setting that differs from `running` and needs a restart."""
        return [
            f"{name} changed: it takes effect at the next restart"
            for name, value in _restart_only(running, certificates_from=self).items()
            if getattr(self, name) != value
        ]


def _restart_only(config: ProxyConfig, certificates_from: ProxyConfig | None = None
                  ) -> dict[str, Any]:
    """The settings a reload cannot change (sockets are bound, processes started); with
    `certificates_from`, the listener's certificates are taken from there (they reload)."""
    listen = config.listen
    new_tls = certificates_from.listen.tls if certificates_from is not None else None
    if listen.tls is not None and new_tls is not None:
        listen = dataclasses.replace(listen, tls=dataclasses.replace(
            listen.tls, certificates=new_tls.certificates))
    return {"listen": listen, "admin": config.admin, "workers": config.workers}
