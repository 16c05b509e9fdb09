"""The YAML config: pydantic models, `${ENV}` substitution, and errors that name file:line: field.

Operators edit this file by hand at 3 a.m.; every mistake must point at the exact line and field.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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


AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]
Fraction = Annotated[float, BeforeValidator(parse_fraction)]
StatusRange = Annotated[tuple[int, int], BeforeValidator(parse_status_range)]


class _Strict(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# The models.


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    backlog: int = Field(1024, ge=1)


class TimeoutsConfig(_Strict):
    connect: Duration = 1.0
    read: Duration = 30.0
    """Longest silence from the backend while waiting for or streaming its response."""


class TlsConfig(_Strict):
    verify: bool = True
    ca_file: str | None = None
    server_name: str | None = None
    """SNI and certificate name; defaults to the backend URL's host."""


class PoolConfig(_Strict):
    max_idle_per_backend: int = Field(256, ge=0)
    """Idle connections kept per backend. With more requests in flight than this, the rest
    open and close a connection each: in the benchmark at 256 connections a pool of 64 gave
    5.7k req/s where 64 connections gave 12.8k."""
    idle_timeout: Duration = 4.0
    """Shorter than common backend keep-alive timeouts (5 s in Node.js, 75 s in nginx)."""


class BackendConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    url: str
    provider: str = Field(min_length=1)
    region: str = ""
    weight: int = Field(1, gt=0, le=10_000)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"backend URL must start with http:// or https://, got {url!r}")
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


class HealthCheckConfig(_Strict):
    """Active probes, run once per backend on their own schedule, never on the request path."""

    type: Literal["http", "tcp"] = "http"
    path: AbsolutePath = "/healthz"
    method: str = "GET"
    expect_status: list[StatusRange] = Field(default_factory=lambda: [(200, 399)], min_length=1)
    expect_body: str | None = None
    """A substring the probe's response body must contain."""
    interval: Duration = 2.0
    unhealthy_interval: Duration = 0.5
    """Probe faster while a backend is unhealthy, so it returns sooner."""
    timeout: Duration = 1.0
    jitter: Fraction = 0.1
    healthy_threshold: int = Field(2, ge=1)
    unhealthy_threshold: int = Field(2, ge=1)
    headers: dict[str, str] = Field(default_factory=dict)


class OutlierConfig(_Strict):
    """Passive detection from real traffic (Envoy's consecutive-5xx outlier detection)."""

    consecutive_failures: int = Field(5, ge=1)
    failure_statuses: list[int] = Field(default_factory=lambda: [502, 503, 504])
    base_ejection: Duration = 30.0
    max_ejection: Duration = 300.0
    max_ejection_percent: int = Field(50, ge=0, le=100)


class CorrelatedFailuresConfig(_Strict):
    backends: int = Field(2, ge=1)
    """Distinct backends of one provider failing within `window` take the provider down."""
    window: Duration = 1.0


class PolicyConfig(_Strict):
    """How traffic is spread over providers, and when a provider counts as down."""

    strategy: Literal["priority", "weighted", "latency"] = "weighted"
    """latency: the provider with the lowest recent latency of real requests (EWMA), with the
    others whose latency is within `latency_tolerance` of it sharing by weight."""
    latency_tolerance: Fraction = 0.2
    providers: list[str] | None = None
    """Priority order (strategy priority); default: the order backends are listed in."""
    provider_weights: dict[str, int] | None = None
    """Share per provider (strategy weighted); default: the sum of its backends' weights."""
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


class CircuitBreakerConfig(_Strict):
    """Beyond these the proxy answers 503 at once instead of piling up work."""

    max_requests_per_backend: int = Field(1024, ge=1)
    max_requests: int = Field(10000, ge=1)


RETRY_CONDITIONS = frozenset({"connect-failure", "reset", "timeout", "502", "503", "504"})


class RetryConfig(_Strict):
    attempts: int = Field(3, ge=1, le=10)
    on: list[str] = Field(
        default_factory=lambda: ["connect-failure", "reset", "timeout", "502", "503", "504"]
    )
    per_try_timeout: Duration | None = None
    """Longest wait for a response head per attempt; default: timeouts.read."""
    next_attempt: Literal["different_provider", "any"] = "different_provider"
    budget_percent: float = Field(50.0, ge=0, le=100)
    """Retries in flight may be at most this share of requests in flight. Large enough that a
    whole provider failing (a third or half of traffic) is retried, small enough that when
    everything fails retries cannot multiply the load."""
    min_retry_concurrency: int = Field(10, ge=0)
    replay_max_bytes: ByteSize = 1024 * 1024
    """Request body kept for a retry; a larger body streams and is not retried."""
    retry_with_idempotency_key: bool = False
    hedge_after: Duration | None = None
    """With no response head after this long, also send a bodiless idempotent request to
    another provider; the first response wins and the other attempt is cancelled."""

    @field_validator("on")
    @classmethod
    def _known_conditions(cls, conditions: list[str]) -> list[str]:
        for index, condition in enumerate(conditions):
            if condition not in RETRY_CONDITIONS:
                known = ", ".join(sorted(RETRY_CONDITIONS))
                raise _LocatedError((index,), f"unknown retry condition {condition!r} ({known})")
        return conditions


class HashOnConfig(_Strict):
    """What keeps a client on one backend (balancer: hash): one header, one cookie, or its IP."""

    header: str | None = None
    cookie: str | None = None
    client_ip: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> HashOnConfig:
        chosen = [self.header is not None, self.cookie is not None, self.client_ip]
        if sum(chosen) != 1:
            raise ValueError("hash_on needs exactly one of header, cookie, client_ip: true")
        return self


class UpstreamConfig(_Strict):
    backends: list[BackendConfig] = Field(min_length=1)
    balancer: Literal["round_robin", "least_request", "hash"] = "round_robin"
    hash_on: HashOnConfig | None = None
    timeouts: TimeoutsConfig = TimeoutsConfig()
    host_header: Literal["backend", "preserve"] = "backend"
    tls: TlsConfig = TlsConfig()
    pool: PoolConfig = PoolConfig()
    health_check: HealthCheckConfig | None = None
    outlier: OutlierConfig = OutlierConfig()
    policy: PolicyConfig = PolicyConfig()
    retry: RetryConfig = RetryConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()

    @model_validator(mode="after")
    def _hash_has_a_key(self) -> UpstreamConfig:
        if self.balancer == "hash" and self.hash_on is None:
            raise _LocatedError(
                ("balancer",), "balancer: hash needs hash_on (header, cookie or client_ip)"
            )
        return self

    @model_validator(mode="after")
    def _policy_names_known_providers(self) -> UpstreamConfig:
        known = list(dict.fromkeys(b.provider for b in self.backends))
        policy = self.policy
        for index, name in enumerate(policy.providers or []):
            if name not in known:
                raise _LocatedError(
                    ("policy", "providers", index),
                    f"no backend of provider {name!r} (providers: {', '.join(known)})",
                )
        for name, weight in (policy.provider_weights or {}).items():
            if name not in known:
                raise _LocatedError(
                    ("policy", "provider_weights", name),
                    f"no backend of provider {name!r} (providers: {', '.join(known)})",
                )
            if weight < 0:
                raise _LocatedError(
                    ("policy", "provider_weights", name), "weights cannot be negative"
                )
        return self

    @field_validator("backends")
    @classmethod
    def _unique_names(cls, backends: list[BackendConfig]) -> list[BackendConfig]:
        seen: set[str] = set()
        for index, backend in enumerate(backends):
            if backend.name in seen:
                raise _LocatedError((index, "name"), f"duplicate backend name {backend.name!r}")
            seen.add(backend.name)
        return backends


class RouteConfig(_Strict):
    name: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9_.:/*-]+$")
    """The route's label in metrics and logs; default: host (or *) and path prefix."""
    host: str | None = None
    """Exact host, `*.suffix` for any subdomain, or absent for any host."""
    path_prefix: AbsolutePath = "/"
    upstream: str

    @field_validator("host")
    @classmethod
    def _host_pattern(cls, host: str | None) -> str | None:
        if host is None:
            return None
        if not re.fullmatch(r"(\*\.)?[A-Za-z0-9.-]+", host):
            raise ValueError(f"host must be a name or *.suffix, got {host!r}")
        return host.lower()

    @property
    def label(self) -> str:
        return self.name or f"{self.host or '*'}{self.path_prefix}"


class LimitsConfig(_Strict):
    max_header_bytes: ByteSize = 32 * 1024
    max_url_bytes: ByteSize = 8 * 1024
    max_headers: int = Field(100, ge=1)
    max_body_bytes: ByteSize | None = None
    """Largest request body accepted (413 above it); none = unlimited, streamed."""
    header_timeout: Duration = 10.0
    """Time a client gets to send a whole request head (slowloris guard)."""
    keepalive_timeout: Duration = 75.0


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AdminConfig(_Strict):
    """The control plane's own listener: status, metrics, drills, reloads."""

    host: str = "127.0.0.1"
    port: int = Field(9901, ge=0, le=65535)
    token: str = ""
    """Bearer token the mutating endpoints require (empty: none, allowed on loopback only)."""

    @model_validator(mode="after")
    def _token_off_loopback(self) -> AdminConfig:
        if not self.token and not is_loopback(self.host):
            raise _LocatedError(
                ("token",),
                f"the admin listener on non-loopback address {self.host} needs a token "
                "(anyone who reaches it could drain backends or force providers down)",
            )
        return self


class AccessLogConfig(_Strict):
    """One JSON line per request."""

    enabled: bool = True
    path: str | None = None
    """A file to append to; default: standard output."""


class DrainConfig(_Strict):
    """Graceful stop on SIGTERM: stay ready-but-draining, then let requests in flight finish."""

    delay: Duration = 5.0
    """How long the listener keeps serving after /readyz turns 503, so load balancers notice."""
    timeout: Duration = 30.0
    """How long requests in flight may take to finish once the listener is closed."""


class ProxyConfig(_Strict):
    listen: ListenConfig = ListenConfig()
    admin: AdminConfig | None = None
    upstreams: dict[str, UpstreamConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=1)
    limits: LimitsConfig = LimitsConfig()
    access_log: AccessLogConfig = AccessLogConfig()
    debug_headers: bool = False
    """Add X-Failover-Proxy-Decision (provider, backend, attempts, reason) to responses."""
    drain: DrainConfig = DrainConfig()
    watch_config: bool = False
    """Reload when the config file changes (checked every second), besides SIGHUP and /reload."""
    workers: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = 1
    """Processes serving traffic: `auto` = one per CPU. Above 1, a supervisor process holds the
    listening socket, the health checks and the admin listener, and the workers share them."""

    @property
    def worker_count(self) -> int:
        return (os.cpu_count() or 1) if self.workers == "auto" else self.workers

    @model_validator(mode="after")
    def _routes_name_upstreams(self) -> ProxyConfig:
        labels: set[str] = set()
        for index, route in enumerate(self.routes):
            if route.label in labels:
                raise _LocatedError(
                    ("routes", index, "name"),
                    f"two routes are both labelled {route.label!r}: give one a distinct name",
                )
            labels.add(route.label)
            if route.upstream not in self.upstreams:
                known = ", ".join(sorted(self.upstreams))
                raise _LocatedError(
                    ("routes", index, "upstream"),
                    f"unknown upstream {route.upstream!r} (known: {known})",
                )
        return self


# ---------------------------------------------------------------------------------------------
# Loading: YAML with line marks, environment substitution, located errors.


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


class _LocatedError(ValueError):
    """A cross-field error that knows which field it belongs to (pydantic only knows the model)."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


_RESOLVER = yaml.resolver.Resolver()
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(text: str, env: Mapping[str, str]) -> str:
    """Replace `${VAR}` and `${VAR:-default}`; an unset `${VAR}` without default is an error."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ValueError(f"environment variable {name} is not set")
            return default
        return value

    return _ENV_RE.sub(replace, text)


class _Located:
    """The YAML node tree kept beside the plain data, to turn a field path into a line."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.root = root

    def line_of(self, loc: tuple[str | int, ...]) -> int:
        node = self.root
        if node is None:
            return 1
        line = node.start_mark.line + 1
        for part in loc:
            child = _child(node, part)
            if child is None:
                break
            node = child
            line = node.start_mark.line + 1
        return line


def _child(node: yaml.Node, part: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                found: yaml.Node = value
                return found
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        child: yaml.Node = node.value[part]
        return child
    return None


def _walk_nodes(
    node: yaml.Node, path: tuple[str | int, ...]
) -> Iterator[tuple[yaml.Node, tuple[str | int, ...]]]:
    yield node, path
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from _walk_nodes(value, (*path, str(key.value)))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _walk_nodes(item, (*path, index))


def _dotted(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _keys_are_strings(node: yaml.Node) -> None:
    """YAML 1.1 reads a plain `on:` or `no:` key as a boolean; as a key it is always a name."""
    for child, _ in _walk_nodes(node, ()):
        if isinstance(child, yaml.MappingNode):
            for key, _ in child.value:
                if isinstance(key, yaml.ScalarNode) and key.tag == "tag:yaml.org,2002:bool":
                    key.tag = "tag:yaml.org,2002:str"


def _duplicate_keys(node: yaml.Node, path: tuple[str | int, ...]) -> list[tuple[int, str, str]]:
    found: list[tuple[int, str, str]] = []
    for child, child_path in _walk_nodes(node, path):
        if isinstance(child, yaml.MappingNode):
            seen: set[str] = set()
            for key, _ in child.value:
                if key.value in seen:
                    where = _dotted((*child_path, key.value))
                    found.append((key.start_mark.line + 1, where, "duplicate key"))
                seen.add(key.value)
    return found


def _substitute_tree(
    node: yaml.Node, env: Mapping[str, str], file: str
) -> list[ConfigIssue]:
    """Substitute `${VAR}` inside scalar values in place (after parsing, so no YAML injection)."""
    issues: list[ConfigIssue] = []
    for child, path in _walk_nodes(node, ()):
        if isinstance(child, yaml.ScalarNode) and "${" in child.value:
            try:
                child.value = substitute_env(child.value, env)
            except ValueError as exc:
                issues.append(ConfigIssue(file, child.start_mark.line + 1, _dotted(path), str(exc)))
            else:
                if child.tag == "tag:yaml.org,2002:str" and child.style is None:
                    # A plain scalar like ${PORT} should become an int when it now looks like one.
                    child.tag = _RESOLVER.resolve(  # type: ignore[no-untyped-call]
                        yaml.ScalarNode, child.value, (True, False)
                    )
    return issues


def parse_config(
    text: str, file: str = "<config>", env: Mapping[str, str] | None = None
) -> ProxyConfig:
    """Validate config text; raise ConfigError listing every problem with file:line: field."""
    env = os.environ if env is None else env
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(file, line, "(yaml)", f"invalid YAML: {problem}")]) from exc
    if root is None:
        raise ConfigError([ConfigIssue(file, 1, "(top level)", "the config file is empty")])
    _keys_are_strings(root)
    issues = [ConfigIssue(file, line, field, msg) for line, field, msg in _duplicate_keys(root, ())]
    issues += _substitute_tree(root, env, file)
    if issues:
        raise ConfigError(issues)
    loader = yaml.SafeLoader("")
    try:
        data = loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(file, 1, "(yaml)", str(exc))]) from exc
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(file, 1, "(top level)", "the config must be a mapping")])
    located = _Located(root)
    try:
        return ProxyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_issues_from_validation(exc, located, file)) from exc


def _issues_from_validation(
    exc: ValidationError, located: _Located, file: str
) -> list[ConfigIssue]:
    issues = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        context = error.get("ctx") or {}
        inner = context.get("error")
        if isinstance(inner, _LocatedError):
            loc, message = loc + inner.loc, str(inner)
        else:
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field"
            elif error["type"] == "missing":
                message = "field required"
        issues.append(ConfigIssue(file, located.line_of(loc), _dotted(loc), message))
    return issues


def read_config_text(path: str | Path) -> str:
    """A config file's text; a file that cannot be read is a ConfigError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), 1, "(file)", exc.strerror or str(exc))]) from exc


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> ProxyConfig:
    """Read and validate a config file; errors name the file as the operator gave it."""
    return parse_config(read_config_text(path), str(path), env)


def summarize(config: ProxyConfig) -> str:
    """One line telling an operator what a valid config contains."""
    backends = [b for u in config.upstreams.values() for b in u.backends]
    providers = sorted({b.provider for b in backends})
    return (
        f"{len(config.upstreams)} upstream(s), {len(backends)} backend(s) over "
        f"{len(providers)} provider(s) ({', '.join(providers)}), {len(config.routes)} route(s), "
        f"listening on {config.listen.host}:{config.listen.port}"
    )
