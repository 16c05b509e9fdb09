"""What an operator monitors with: the exported metrics, the alert rules, the Grafana dashboard
and the Kubernetes manifests in deploy/.

The metrics are scraped from the real proxy and linted by `promtool check metrics`; the alert
rules pass `promtool check rules` and their unit tests (`promtool test rules`); every query of
the dashboard runs on a real Prometheus server that scrapes the real proxy on loopback, and
must find the metric names and labels it asks for; the manifests are validated against the
Kubernetes API schemas (offline, by kubernetes-validate) and checked for what a gateway needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from failover_proxy.config.loading import line_finder, parse_config
from failover_proxy.ops.audit import audit
from failover_proxy.sim.faults import FaultBackend

from .conftest import ROOT, FileProxy, StartFaultBackends, free_port, parse_metrics, sample

StartFileProxy = Callable[[str], Awaitable[FileProxy]]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "failover-proxy.json"
TOKEN = "monitoring-token"

needs_prometheus = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="Debian's prometheus package is not installed (make test installs it)",
)


def monitored_config(backends: list[FaultBackend], admin_port: int = 0) -> str:
    """Two providers in two regions each, probed, plus a backend named by a hostname."""
    regions = {"a": "east", "b": "west"}
    lines = "".join(
        f'      - {{name: {b.name}, url: "http://127.0.0.1:{b.port}", provider: {b.provider}, '
        f"region: {regions[b.name[-1]]}}}\n"
        for b in backends
    )
    first = backends[0]
    lines += (f'      - {{name: aws-lb, url: "http://localhost:{first.port}", provider: aws, '
              "region: east, discovery: logical}\n")
    return (
        f"listen: {{host: 127.0.0.1, port: 0}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin_port}, token: {TOKEN}}}\n"
        "access_log: {enabled: false}\n"
        "upstreams:\n  web:\n    backends:\n" + lines +
        "    health_check: {path: /healthz, interval: 200ms, jitter: 0%}\n"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )


@pytest.fixture
async def monitored(
    file_proxy: StartFileProxy, fault_backends: StartFaultBackends
) -> AsyncIterator[FileProxy]:
    backends = await fault_backends("aws-a", "aws-b", "gcp-a", "gcp-b")
    yield await file_proxy(monitored_config(backends))


async def scrape_text(proxy: FileProxy) -> str:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{proxy.admin}/metrics")
    response.raise_for_status()
    return response.text


async def send_traffic(proxy: FileProxy, count: int) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(count):
            assert (await http.get(f"http://127.0.0.1:{proxy.port}/")).status_code == 200


async def test_counters_exist_at_zero_before_anything_happens(monitored: FileProxy) -> None:
    samples = parse_metrics(await scrape_text(monitored))
    zero = {
        "failover_proxy_failovers_total": dict(
            upstream="web", from_provider="aws", to_provider="gcp", reason="health"),
        "failover_proxy_retries_total": dict(upstream="web", reason="connect_failure"),
        "failover_proxy_retry_budget_exhausted_total": dict(upstream="web"),
        "failover_proxy_config_reloads_total": dict(result="failure"),
        "failover_proxy_worker_restarts_total": {},
        "failover_proxy_connections_refused_total": dict(reason="per_ip_limit"),
        "failover_proxy_requests_total": dict(
            route="*/", upstream="web", provider="gcp", backend="gcp-b", code_class="5xx"),
        "failover_proxy_upstream_attempts_total": dict(
            upstream="web", provider="aws", backend="aws-lb",
            endpoint=next(endpoint for (name, labels), _ in samples.items()
                          if name == "failover_proxy_backend_up"
                          and ("backend", "aws-lb") in labels
                          for key, endpoint in labels if key == "endpoint"),
            outcome="timeout"),
        "failover_proxy_dns_lookups_total": dict(
            upstream="web", backend="aws-lb", result="nxdomain"),
        "failover_proxy_request_duration_seconds_count": dict(upstream="web", provider="gcp"),
    }
    for name, labels in zero.items():
        key = (name, frozenset(labels.items()))
        assert key in samples, f"{name}{labels} is not exported"
        assert samples[key] == 0, f"{name}{labels} = {samples[key]}"
    assert sample(samples, "failover_proxy_dns_lookups_total", upstream="web", backend="aws-lb",
                  result="ok") >= 1
    assert sample(samples, "failover_proxy_backend_info", upstream="web", provider="gcp",
                  region="west", backend="gcp-b") == 1


@needs_prometheus
async def test_promtool_finds_nothing_to_lint_in_the_exported_metrics(
    monitored: FileProxy,
) -> None:
    await send_traffic(monitored, 20)
    async with httpx.AsyncClient() as http:
        forced = await http.post(f"{monitored.admin}/providers/web/aws/force-down",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
        assert forced.status_code == 200, forced.text
    await send_traffic(monitored, 10)
    text = await scrape_text(monitored)
    assert 'failover_proxy_provider_up{provider="aws",upstream="web"} 0.0' in text
    linted = await asyncio.to_thread(
        subprocess.run, ["promtool", "check", "metrics"], input=text, text=True,
        capture_output=True, timeout=30)
    assert linted.returncode == 0 and not linted.stdout.strip() and not linted.stderr.strip(), (
        linted.stdout + linted.stderr)


@needs_prometheus
def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    checked = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    for wanted in ("FailoverProxyProviderDown", "FailoverProxyFailover",
                   "FailoverProxyRetryBudgetExhausted", "FailoverProxyNoUsableBackend",
                   "FailoverProxyReloadFailed", "FailoverProxyDNSFailing"):
        assert wanted in names
    tested = subprocess.run(["promtool", "test", "rules", "alerts.test.yaml"],
                            cwd=ALERTS.parent, capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    unit_tests = yaml.safe_load((ALERTS.parent / "alerts.test.yaml").read_text())["tests"]
    tested_alerts = {case["alertname"] for test in unit_tests for case in test["alert_rule_test"]}
    assert tested_alerts == names, f"alerts without a unit test: {names - tested_alerts}"


# -- the dashboard on a real Prometheus ---------------------------------------------------------


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard: panels, annotations, variables."""
    board = json.loads(DASHBOARD.read_text())
    queries = [(f"panel {panel['title']!r}", target["expr"])
               for panel in board["panels"] for target in panel["targets"]]
    queries += [(f"annotation {a['name']!r}", a["expr"]) for a in board["annotations"]["list"]]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"])
            assert found, variable["definition"]
            queries.append((f"variable {variable['name']}",
                            f"count by ({found[2]}) ({found[1]})"))
    return queries


def as_prometheus_query(expr: str) -> str:
    """Grafana's variables as Prometheus would receive them (every upstream, a 1 m window),
    and a trailing filter (`== 0`, `> 0`) left off: it selects, the query under it must find."""
    expr = expr.replace("$__rate_interval", "1m").replace('=~"$upstream"', '=~".*"')
    return re.sub(r"\s*(==|!=|>|<)\s*[0-9.]+\s*$", "", expr)


class Prometheus:
    """A real Prometheus server on loopback that scrapes one target every second."""

    def __init__(self, work: Path, target: str) -> None:
        self.port = free_port()
        config = work / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "failover-proxy",
                                "static_configs": [{"targets": [target]}]}],
        }))
        self.log = work / "prometheus.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT,
            )
        self.api = f"http://127.0.0.1:{self.port}/api/v1"

    async def query(self, http: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
        answer = await http.get(f"{self.api}/query", params={"query": expr})
        body = answer.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def wait_for_scrapes(self, http: httpx.AsyncClient, count: int) -> None:
        for _ in range(300):
            assert self.process.poll() is None, self.log.read_text()
            try:
                seen = await self.query(http, 'count_over_time(up{job="failover-proxy"}[1m])')
            except httpx.HTTPError:
                seen = []
            if seen and float(seen[0]["value"][1]) >= count:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(self.log.read_text())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def start_prometheus(http: httpx.AsyncClient, work: Path, target: str) -> Prometheus:
    """Prometheus on a free port; another one when a busy machine took that port between
    finding it free and Prometheus binding it."""
    for attempt in range(3):
        folder = work / f"prometheus-{attempt}"
        folder.mkdir()
        prometheus = Prometheus(folder, target)
        for _ in range(100):
            if prometheus.process.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"http://127.0.0.1:{prometheus.port}/-/ready")).is_success:
                    return prometheus
            await asyncio.sleep(0.1)
        prometheus.stop()
        if "address already in use" not in prometheus.log.read_text():
            raise AssertionError(prometheus.log.read_text())
    raise AssertionError("no free port for Prometheus in 3 tries")


@needs_prometheus
async def test_every_dashboard_query_finds_what_the_proxy_exports(
    monitored: FileProxy, tmp_path: Path
) -> None:
    exported = {name for name, _ in parse_metrics(await scrape_text(monitored))}
    queries = dashboard_queries()
    assert len(queries) >= 15
    for where, expr in queries:
        for name in re.findall(r"failover_proxy_\w+", expr):
            assert name in exported, f"{where}: {name} is not a metric the proxy exports"
    async with httpx.AsyncClient(timeout=5) as http:
        prometheus = await start_prometheus(http, tmp_path, monitored.admin.removeprefix("http://"))
        try:
            await prometheus.wait_for_scrapes(http, 2)
            await send_traffic(monitored, 30)
            await prometheus.wait_for_scrapes(http, 5)
            for where, expr in queries:
                result = await prometheus.query(http, as_prometheus_query(expr))
                assert result, f"{where}: no series for {as_prometheus_query(expr)}"
                grouped = re.search(r"\bby \(([^)]*)\)", expr)
                for label in (grouped[1].split(", ") if grouped else []):
                    if label != "le":
                        assert any(label in series["metric"] for series in result), (
                            f"{where}: no series has the label {label}: {result}")
            rules = (await http.get(f"{prometheus.api}/rules")).json()["data"]["groups"]
            loaded = [rule for group in rules for rule in group["rules"]]
            assert len(loaded) == len(yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"])
            assert all(rule["health"] in ("ok", "unknown") for rule in loaded), loaded
        finally:
            prometheus.stop()


# -- Kubernetes ---------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """The resources of deploy/kubernetes by kind, as listed by its kustomization."""
    folder = DEPLOY / "kubernetes"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    resources = {}
    for name in listed:
        resource = yaml.safe_load((folder / name).read_text())
        resources[resource["kind"]] = resource
    return resources


def test_kubernetes_manifests_validate_against_the_api_schemas() -> None:
    version = kubernetes_validate.latest_version()
    resources = manifests()
    assert set(resources) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                              "HorizontalPodAutoscaler", "NetworkPolicy"}
    for resource in resources.values():
        kubernetes_validate.validate(resource, version, strict=True)
    # The validator is not a formality: an unknown field is refused.
    broken = json.loads(json.dumps(resources["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_kubernetes_deployment_is_built_for_failover_and_drain() -> None:
    resources = manifests()
    deployment = resources["Deployment"]["spec"]
    pod = deployment["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["replicas"] >= 2
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} >= {
        "topology.kubernetes.io/zone"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 8080, "admin": 9901}
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The ConfigMap is mounted as a directory: a subPath mount would never see an edit.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/failover-proxy" and "subPath" not in mount
    config_text = resources["ConfigMap"]["data"]["config.yaml"]
    os.environ.setdefault("ADMIN_TOKEN", "from-the-secret")
    config = parse_config(config_text, "configmap.yaml")
    assert config.watch_config is True
    assert config.admin is not None and config.admin.port == 9901
    assert config.listen.port == 8080
    # preStop + drain delay + drain timeout fit in the grace period.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pre_stop + config.drain.delay + config.drain.timeout < pod[
        "terminationGracePeriodSeconds"]
    findings = audit(config, line_finder(config_text))
    assert not [f for f in findings if f.severity == "high"], findings
    # The admin port is reachable only from the monitoring namespace.
    rules = resources["NetworkPolicy"]["spec"]["ingress"]
    admin_rules = [r for r in rules if any(p["port"] == "admin" for p in r["ports"])]
    assert admin_rules and all(r.get("from") for r in admin_rules)
    service_ports = [p["targetPort"] for p in resources["Service"]["spec"]["ports"]]
    assert service_ports == ["http"]
    assert resources["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert resources["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2


def test_history_p99_interpolates_inside_its_bucket_as_prometheus_does() -> None:
    from failover_proxy.model.counters import DURATION_BUCKETS
    from failover_proxy.ops.history import quantile

    buckets = [0.0] * (len(DURATION_BUCKETS) + 1)
    buckets[DURATION_BUCKETS.index(0.01)] = 100  # all 100 in (5 ms, 10 ms]
    assert quantile(0.99, buckets) == pytest.approx(0.005 + 0.005 * 0.99)
    buckets[-1] = 10  # 10 more beyond the last bound: p99 lands in +Inf
    assert quantile(0.99, buckets) == DURATION_BUCKETS[-1]
    assert quantile(0.5, buckets) == pytest.approx(0.005 + 0.005 * 0.55)
    assert quantile(0.99, [0.0] * len(buckets)) is None
