"""`failover-proxy audit`: single points of failure and risky settings, with file, line, fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from failover_proxy.config.loading import line_finder, parse_config
from failover_proxy.ops.audit import audit

from .conftest import ROOT


def findings_of(path: Path) -> list[tuple[str, str, str]]:
    text = path.read_text()
    found = audit(parse_config(text, str(path)), line_finder(text))
    return [(f.severity, f.code, f.path) for f in found]


def run_audit(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "failover_proxy", "audit", "-c", str(path), *extra],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


def test_the_demo_config_has_only_low_findings() -> None:
    assert sorted(findings_of(ROOT / "config" / "demo.yaml")) == [
        ("low", "admin-no-token", "admin"),
        ("low", "single-region", "upstreams.web-h2.backends.0"),
        ("low", "single-region", "upstreams.web-h2.backends.2"),
        ("low", "single-region", "upstreams.web-h2.backends.4"),
        ("low", "single-region", "upstreams.web.backends.0"),
        ("low", "single-region", "upstreams.web.backends.2"),
        ("low", "single-region", "upstreams.web.backends.4"),
    ]


def test_the_example_config_findings() -> None:
    assert findings_of(ROOT / "config" / "example.yaml") == [
        ("medium", "retries-outlast-clients", "upstreams.static.retry"),
        ("medium", "single-backend", "upstreams.static.backends.0"),
        ("medium", "single-backend", "upstreams.static.backends.1"),
        ("low", "admin-no-token", "admin"),
        ("low", "single-region", "upstreams.api.backends.0"),
        ("low", "single-region", "upstreams.api.backends.2"),
        ("low", "single-region", "upstreams.api.backends.4"),
    ]
    result = run_audit(ROOT / "config" / "example.yaml")
    assert result.returncode == 0, result.stderr  # nothing high
    assert "config/example.yaml:" in result.stdout and "fix: " in result.stdout


RISKY = """
admin: {host: 0.0.0.0, port: 9901, token: s3cret}
upstreams:
  solo:
    backends:
      - {name: a1, url: "https://a1.example:8443", provider: aws, region: r1}
      - {name: a2, url: "https://a2.example:8443", provider: aws, region: r2}
    tls: {verify: false}
    retry: {attempts: 1}
    dns: {max_ttl: 1h}
    policy: {panic_threshold: 50%}
  split:
    backends:
      - {name: aws-a, url: "http://127.0.0.1:1", provider: aws, region: r1, capacity: 100}
      - {name: aws-b, url: "http://127.0.0.1:2", provider: aws, region: r2, capacity: 100}
      - {name: gcp-a, url: "http://127.0.0.1:3", provider: gcp, region: r1, capacity: 50}
      - {name: gcp-b, url: "http://127.0.0.1:4", provider: gcp, region: r2, capacity: 50}
    health_check: {path: /healthz}
    retry: {next_attempt: any, per_try_timeout: 5s}
    policy: {strategy: weighted, provider_weights: {aws: 1, gcp: 1}}
routes:
  - {path_prefix: /, upstream: solo}
"""


def test_every_rule_names_its_line_and_a_high_finding_fails_the_command(
    tmp_path: Path,
) -> None:
    path = tmp_path / "risky.yaml"
    path.write_text(RISKY)
    found = {(f[0], f[1]) for f in findings_of(path)}
    assert found >= {
        ("high", "single-provider"), ("high", "no-health-check"), ("high", "retries-off"),
        ("high", "tls-unverified"), ("high", "cannot-absorb"),
        ("medium", "retry-same-provider"), ("medium", "admin-exposed"),
        ("low", "panic-tiny-pool"), ("low", "dns-rarely-resolved"),
    }, found
    result = run_audit(path, "--format", "json")
    assert result.returncode == 1
    document = json.loads(result.stdout)
    by_code = {f["code"]: f for f in document["findings"]}
    # An even split carries at most 200 req/s (then gcp's 100 is full); losing aws leaves
    # only gcp's 100.
    assert "losing aws leaves 100 req/s" in by_code["cannot-absorb"]["problem"]
    assert by_code["tls-unverified"]["line"] == 8  # tls: {verify: false}
    assert by_code["retries-off"]["line"] == 9
    assert by_code["admin-exposed"]["line"] == 2
    text = run_audit(path)
    assert text.returncode == 1
    assert f"HIGH   {path}:9: upstreams.solo.retry.attempts: " in text.stdout


def test_a_bad_config_is_an_error_not_an_audit(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("upstreams: {}\nroutes: []\n")
    result = run_audit(path)
    assert result.returncode == 2 and f"{path}:" in result.stderr
