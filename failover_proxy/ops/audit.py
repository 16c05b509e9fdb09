"""`failover-proxy audit`: the single points of failure and risky settings of a config.

Each finding has a severity, the config path and line it is about, what can go wrong, and the
fix. High: an outage of one provider, one region or one backend would reach users, or the
proxy's own controls are open. Medium: a failure would be survived but worse than it needs to
be. Low: worth knowing. The command exits 1 when any finding is high, so a CI job can gate on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from ..config.schema import ProxyConfig, UpstreamConfig, is_hostname, is_loopback

Loc = tuple[str | int, ...]
LineOf = Callable[[Loc], int]

SEVERITIES = ("high", "medium", "low")

CLIENT_DEADLINE = 60.0
"""How long clients are assumed to wait for a response (seconds) unless told: the idle timeout
of AWS's and Google's load balancers and a common client default."""


@dataclass(frozen=True)
class Finding:
    severity: str
    code: str
    """A short stable name of the rule (`single-provider`, `no-health-check`…)."""
    path: str
    line: int
    problem: str
    fix: str


class _Auditor:
    def __init__(self, config: ProxyConfig, line_of: LineOf, client_deadline: float) -> None:
        self.config = config
        self.line_of = line_of
        self.client_deadline = client_deadline
        self.findings: list[Finding] = []

    def add(self, severity: str, code: str, loc: Loc, problem: str, fix: str) -> None:
        path = ".".join(str(part) for part in loc) or "(top level)"
        self.findings.append(Finding(severity, code, path, self.line_of(loc), problem, fix))

    def run(self) -> list[Finding]:
        for name, upstream in self.config.upstreams.items():
            self.upstream(name, upstream)
        self.admin()
        order = {severity: index for index, severity in enumerate(SEVERITIES)}
        return sorted(self.findings, key=lambda f: (order[f.severity], f.line))

    def upstream(self, name: str, upstream: UpstreamConfig) -> None:
        loc: Loc = ("upstreams", name)
        backends = upstream.backends
        providers: dict[str, list[int]] = {}
        for index, backend in enumerate(backends):
            providers.setdefault(backend.provider, []).append(index)
        if len(providers) == 1:
            (provider,) = providers
            self.add("high", "single-provider", (*loc, "backends"),
                     f"upstream {name}: every backend is on provider {provider}; an outage of "
                     f"{provider} takes the upstream down",
                     "add backends on a second provider (ideally in another region too)")
        for provider, indexes in providers.items():
            first: Loc = (*loc, "backends", indexes[0])
            regions = {backends[i].region for i in indexes}
            if len(indexes) == 1:
                self.add("medium", "single-backend", first,
                         f"upstream {name}: provider {provider} has one backend; that one "
                         "instance failing takes the whole provider out",
                         f"add a second backend on {provider}, in another region if you can")
            elif len(regions) == 1 and len(providers) > 1:
                (region,) = regions
                where = f"region {region}" if region else "one region (no region set)"
                self.add("low", "single-region", first,
                         f"upstream {name}: every backend of {provider} is in {where}; a "
                         f"regional outage takes {provider} out (other providers take over)",
                         f"spread {provider}'s backends over two regions, and name them in "
                         "`region` so the policy can fail over region by region")
        if upstream.health_check is None:
            self.add("high", "no-health-check", loc,
                     f"upstream {name}: no active health check; a dead or hung backend is found "
                     "only by the real requests it fails",
                     "add health_check: {path: /healthz, interval: 2s}")
        retry = upstream.retry
        if retry.attempts < 2:
            self.add("high", "retries-off", (*loc, "retry", "attempts"),
                     f"upstream {name}: retry.attempts is 1; every request that reaches a "
                     "failing backend fails, even when another provider is up",
                     "retry.attempts: 3")
        elif retry.next_attempt != "different_provider" and len(providers) > 1:
            self.add("medium", "retry-same-provider", (*loc, "retry", "next_attempt"),
                     f"upstream {name}: a retry may go to the provider that just failed",
                     "retry.next_attempt: different_provider")
        per_try = retry.per_try_timeout or upstream.timeouts.read
        worst = retry.attempts * (per_try + upstream.timeouts.connect)
        if worst > self.client_deadline:
            self.add("medium", "retries-outlast-clients", (*loc, "retry"),
                     f"upstream {name}: {retry.attempts} attempts of up to {per_try:g}s each "
                     f"(plus connect) may take {worst:g}s, longer than clients wait "
                     f"({self.client_deadline:g}s): they give up before the last retry",
                     "set retry.per_try_timeout so that attempts x (per_try_timeout + "
                     "timeouts.connect) stays under the clients' deadline")
        self.capacity(name, upstream, providers)
        policy = upstream.policy
        if policy.panic == "spread" and policy.panic_threshold > 0 and len(backends) < 4:
            self.add("low", "panic-tiny-pool", (*loc, "policy", "panic"),
                     f"upstream {name}: panic spreads traffic over all {len(backends)} backends, "
                     "failed ones included, once too few are healthy; in a pool this small "
                     "one failure can trigger it",
                     "lower policy.panic_threshold, or add backends")
        if not upstream.tls.verify and any(
            b.url.startswith(("https://", "srv+https://")) for b in backends
        ):
            self.add("high", "tls-unverified", (*loc, "tls", "verify"),
                     f"upstream {name}: TLS certificates of backends are not verified; "
                     "anyone on the path can pose as a backend",
                     "tls.verify: true (with tls.ca_file for a private CA)")
        self.dns(name, upstream)

    def capacity(self, name: str, upstream: UpstreamConfig,
                 providers: dict[str, list[int]]) -> None:
        """With every backend's capacity known: can the others absorb any one provider's
        share at the most load the split can carry with everyone up?"""
        backends = upstream.backends
        if len(providers) < 2 or any(b.capacity is None for b in backends):
            return
        capacity = {p: sum(backends[i].capacity or 0.0 for i in idx)
                    for p, idx in providers.items()}
        weights = upstream.policy.provider_weights or {}
        if upstream.policy.strategy == "priority":
            order = upstream.policy.providers or list(providers)
            first = order[0].partition("/")[0]
            shares = {p: 1.0 if p == first else 0.0 for p in providers}
        else:
            raw = {p: float(weights.get(p, sum(backends[i].weight for i in idx)))
                   for p, idx in providers.items()}
            total = sum(raw.values())
            shares = {p: w / total for p, w in raw.items()}
        load = min(capacity[p] / s for p, s in shares.items() if s > 0)
        for provider in providers:
            left = sum(c for p, c in capacity.items() if p != provider)
            if left < load:
                self.add("high", "cannot-absorb", ("upstreams", name, "backends"),
                         f"upstream {name}: at {load:g} req/s (what the split carries with "
                         f"every provider up) losing {provider} leaves {left:g} req/s of "
                         "capacity: the rest would be overloaded",
                         "add capacity on the other providers, or plan for lower peak load")

    def dns(self, name: str, upstream: UpstreamConfig) -> None:
        for index, backend in enumerate(upstream.backends):
            if not is_hostname(backend.url):
                continue
            settings = backend.dns or upstream.dns
            loc: Loc = ("upstreams", name, "backends", index)
            refresh = settings.refresh
            slow = refresh == "ttl" and settings.max_ttl > 600
            fixed = isinstance(refresh, float) and refresh > 600
            if slow or fixed:
                every = settings.max_ttl if slow else float(refresh)
                host = urlsplit(backend.url).hostname
                self.add("low", "dns-rarely-resolved", loc,
                         f"upstream {name}: {host} may go unresolved for {every:g}s; a cloud "
                         "load balancer's addresses change within minutes",
                         "dns.max_ttl (and dns.refresh) of a few minutes at most")

    def admin(self) -> None:
        admin = self.config.admin
        if admin is None:
            return
        if not is_loopback(admin.host):  # (without a token, the config is refused)
            self.add("medium", "admin-exposed", ("admin", "host"),
                     f"the admin API listens on {admin.host}: its read endpoints (status, "
                     "metrics) show the topology to whoever reaches them",
                     "keep admin.host on loopback or a private network only")
        elif not admin.token:
            self.add("low", "admin-no-token", ("admin",),
                     "the admin API on loopback has no token: any local process can force "
                     "providers down or reload",
                     "admin.token: ${ADMIN_TOKEN}")


def audit(config: ProxyConfig, line_of: LineOf,
          client_deadline: float = CLIENT_DEADLINE) -> list[Finding]:
    """Every finding about `config`, the most severe first."""
    return _Auditor(config, line_of, client_deadline).run()


def as_text(findings: list[Finding], file: str) -> str:
    counts = ", ".join(
        f"{sum(1 for f in findings if f.severity == s)} {s}" for s in SEVERITIES
    )
    lines = [f"{file}: {len(findings)} finding{'' if len(findings) == 1 else 's'} ({counts})"]
    for finding in findings:
        lines.append(f"{finding.severity.upper():6} {file}:{finding.line}: {finding.path}: "
                     f"{finding.problem} [{finding.code}]")
        lines.append(f"       fix: {finding.fix}")
    return "\n".join(lines)


def as_json(findings: list[Finding], file: str) -> str:
    return json.dumps({"file": file, "findings": [asdict(f) for f in findings]}, indent=1)
