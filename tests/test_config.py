"""The config: durations, sizes, ${ENV} substitution, and errors naming file:line: field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from failover_proxy.config.loading import ConfigError, parse_config
from failover_proxy.config.schema import parse_duration, parse_size

from .conftest import ROOT

GOOD = """\
listen: {host: 127.0.0.1, port: 8080}
upstreams:
  web:
    backends:
      - {name: aws-use1-a, url: "http://127.0.0.1:9101", provider: aws, region: us-east-1, weight: 2}
      - {name: gcp-usc1-a, url: "https://web.gcp.example:8443/base", provider: gcp}
    timeouts: {connect: 1s, read: 30s}
    host_header: backend
    tls: {verify: true, ca_file: null}
routes:
  - {host: "api.example.com", path_prefix: /v1, upstream: web}
  - {path_prefix: /, upstream: web}
"""


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "failover_proxy", "check", "-c", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("1.5s", 1.5), (3, 3.0), ("1h", 3600.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("64KiB", 65536), ("1MiB", 1 << 20), ("10MB", 10**7), (5, 5)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_issue_example_is_valid() -> None:
    config = parse_config(GOOD)
    web = config.upstreams["web"]
    assert [b.weight for b in web.backends] == [2, 1]
    assert web.timeouts.connect == 1.0 and web.timeouts.read == 30.0


def test_env_substitution_with_default_and_value() -> None:
    text = GOOD.replace("port: 8080", 'port: "${PORT:-8181}"').replace(
        "127.0.0.1:9101", "${AWS_HOST}:9101"
    )
    config = parse_config(text, env={"AWS_HOST": "127.0.0.2"})
    assert config.listen.port == 8181
    assert config.upstreams["web"].backends[0].url == "http://127.0.0.2:9101"
    assert parse_config(text, env={"AWS_HOST": "127.0.0.2", "PORT": "9000"}).listen.port == 9000


def test_unset_env_var_is_named_with_its_line() -> None:
    text = GOOD.replace("127.0.0.1:9101", "${AWS_HOST}:9101")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "x.yaml", env={})
    (issue,) = caught.value.issues
    assert str(issue) == (
        "x.yaml:5: upstreams.web.backends.0.url: environment variable AWS_HOST is not set"
    )


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("weight: 2}", "weight: 0}", "5: upstreams.web.backends.0.weight: Input should be greater than 0"),
        ("weight: 2}", "weight: 2, colour: red}", "5: upstreams.web.backends.0.colour: unknown field\n"),
        ("timeouts:", "helth_check: {path: /}\n    timeouts:", "7: upstreams.web.helth_check: unknown field; did you mean `health_check`?"),
        ("weight: 2}", "wieght: 2}", "5: upstreams.web.backends.0.wieght: unknown field; did you mean `weight`?"),
        ("timeouts:", "timeouts: 5\n    pool:", "7: upstreams.web.timeouts: Input should be a mapping of settings"),
        ("port: 8080", "port: eighty", "1: listen.port: Input should be a valid integer"),
        ('"http://127.0.0.1:9101"', '"ftp://127.0.0.1"', "5: upstreams.web.backends.0.url: backend URL must start with http://, https://, srv+http:// or srv+https://"),
        ('"http://127.0.0.1:9101"', '"http://:80"', "5: upstreams.web.backends.0.url: backend URL has no host"),
        ("name: gcp-usc1-a", "name: aws-use1-a", "6: upstreams.web.backends.1.name: duplicate backend name 'aws-use1-a'"),
        ("upstream: web}\n  - {path", "upstream: api}\n  - {path", "11: routes.0.upstream: unknown upstream 'api' (known: web)"),
        ("connect: 1s", "connect: soon", "7: upstreams.web.timeouts.connect: expected a duration"),
        ("host_header: backend", "host_header: client", "8: upstreams.web.host_header: Input should be 'backend' or 'preserve'"),
        ("timeouts:", "timeouts: {}\n    timeouts:", "8: upstreams.web.timeouts: duplicate key"),
        ("path_prefix: /v1", "path_prefix: v1", "11: routes.0.path_prefix: must start with '/', got 'v1'"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in GOOD
    path = tmp_path / "proxy.yaml"
    path.write_text(GOOD.replace(old, new, 1))
    result = check(path)
    assert result.returncode == 2, result.stdout
    assert f"{path}:{expected}" in result.stderr, result.stderr


def test_the_json_schema_takes_what_operators_write() -> None:
    result = subprocess.run([sys.executable, "-m", "failover_proxy", "schema"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["title"] == "failover-proxy config"
    upstream = schema["$defs"]["UpstreamConfig"]["properties"]
    assert "health_check" in upstream and "dns" in upstream
    connect = schema["$defs"]["TimeoutsConfig"]["properties"]["connect"]
    assert {"type": "string"} in connect["anyOf"]  # `250ms` is valid, not only a number


def test_bad_yaml_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(GOOD.replace("routes:", "routes: [", 1))
    result = check(path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}:"), result.stderr
    assert "invalid YAML" in result.stderr


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert check(empty).stderr.strip() == f"{empty}:1: (top level): the config file is empty"
    missing = tmp_path / "missing.yaml"
    result = check(missing)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{missing}:1: (file): No such file")


def test_missing_required_fields(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("listen: {port: 1}\n")
    stderr = check(path).stderr
    assert f"{path}:1: upstreams: field required" in stderr
    assert f"{path}:1: routes: field required" in stderr


@pytest.mark.parametrize("name", ["demo.yaml", "example.yaml"])
def test_shipped_configs_pass_check(name: str) -> None:
    result = check(ROOT / "config" / name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{ROOT / 'config' / name}: OK: ")
    assert "3 provider(s) (aws, azure, gcp)" in result.stdout


def test_failover_sections_parse_including_a_plain_on_key() -> None:
    text = GOOD.replace(
        "    tls: {verify: true, ca_file: null}\n",
        "    tls: {verify: true, ca_file: null}\n"
        "    health_check: {type: tcp, interval: 500ms, jitter: 5%, expect_status: [200, 300-302]}\n"
        "    policy: {strategy: priority, providers: [gcp, aws], min_healthy_fraction: 50%}\n"
        "    retry:\n      on: [connect-failure, \"503\"]\n      per_try_timeout: 250ms\n",
    )
    web = parse_config(text).upstreams["web"]
    assert web.retry.on == ["connect-failure", "503"]
    assert web.retry.per_try_timeout == 0.25
    assert web.policy.providers == ["gcp", "aws"] and web.policy.min_healthy_fraction == 0.5
    assert web.health_check is not None and web.health_check.jitter == 0.05
    assert web.health_check.expect_status == [(200, 200), (300, 302)]


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("    policy: {providers: [aws, oracle]}\n",
         "10: upstreams.web.policy.providers.1: no backend of provider 'oracle' (providers: aws, gcp)"),
        ("    policy: {provider_weights: {aws: 1, ibm: 2}}\n",
         "10: upstreams.web.policy.provider_weights.ibm: no backend of provider 'ibm'"),
        ("    retry: {on: [reset, teapot]}\n",
         "10: upstreams.web.retry.on.1: unknown retry condition 'teapot'"),
        ("    health_check: {expect_status: [700]}\n",
         "10: upstreams.web.health_check.expect_status.0: status range must lie within 100-599"),
        ("    policy: {strategy: fastest}\n",
         "10: upstreams.web.policy.strategy: Input should be 'priority', 'weighted' or 'latency'"),
        ("    balancer: hash\n",
         "10: upstreams.web.balancer: balancer: hash needs hash_on (header, cookie or client_ip)"),
        ("    balancer: hash\n    hash_on: {header: X-User, client_ip: true}\n",
         "11: upstreams.web.hash_on: hash_on needs exactly one of header, cookie, client_ip: true"),
    ],
)
def test_failover_config_errors(tmp_path: Path, section: str, expected: str) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(GOOD.replace("routes:", section + "routes:", 1))
    result = check(path)
    assert result.returncode == 2
    assert f"{path}:{expected}" in result.stderr, result.stderr
