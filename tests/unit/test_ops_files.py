"""The deployment files in ops/, the Dockerfile and the compose stack agree with the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from router_worker.metrics import create_metrics
from router_worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
COMPOSE = ROOT / "docker-compose.redpanda.yml"
ALERTS = OPS / "prometheus" / "alerts.yml"
DASHBOARDS = OPS / "grafana" / "dashboards"
K8S = OPS / "k8s"

# Referenced by ops/ but not yet exported by router_worker.metrics; each must say why.
PENDING_METRICS = {
    "router_budget_used_ratio": "budget alerts and panel: spend in window / tenant budget",
}
REQUIRED_SERVICES = {"redpanda", "redis", "postgres", "init", "worker", "prometheus", "grafana"}
METRIC_RE = re.compile(r"\brouter_[a-z_]+")
SERIES_SUFFIXES = ("_bucket", "_sum", "_count")
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1m", "$tenant": ".*"}
COMPOSE_DEFAULT_RE = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")
# Grafana's label_values(selector, label) variable query, reduced to its PromQL selector.
LABEL_VALUES_RE = re.compile(r"^label_values\((.+),\s*\w+\)$")


def _yaml_files() -> list[Path]:
    return sorted(p for p in OPS.rglob("*") if p.suffix in {".yml", ".yaml"})


def _load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in _load_all(path):
            # kustomization files and JSON 6902 patches are not resources.
            if isinstance(doc, dict) and doc.get("kind") != "Kustomization":
                yield path, doc


def _k8s(kind: str, name: str) -> dict[str, Any]:
    found = [
        doc for _, doc in _k8s_docs() if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"expected one {kind}/{name} in ops/k8s, found {len(found)}"
    return found[0]


@cache
def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _dashboards() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))]


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for d in _dashboards() for p in _panels(d) for t in p.get("targets", [])]
    for d in _dashboards():
        for var in d["templating"]["list"]:
            if var["type"] == "query":
                exprs.append(LABEL_VALUES_RE.sub(r"\1", var["definition"]))
    return exprs


def _concrete(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def _metric_names(exprs: list[str]) -> set[str]:
    names = set()
    for expr in exprs:
        for name in METRIC_RE.findall(expr):
            for suffix in SERIES_SUFFIXES:
                name = name.removesuffix(suffix)
            names.add(name)
    return names


def _exported_metrics() -> set[str]:
    names = set()
    for family in create_metrics().registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
    return names


def _promtool(*args: str, cwd: Path = ROOT) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not on PATH (Debian: apt-get install prometheus)")
    proc = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _settings_from_env(env: dict[str, Any]) -> Settings:
    fields = {}
    for key, value in env.items():
        assert key.startswith("ROUTER_"), key
        field = key.removeprefix("ROUTER_").lower()
        assert field in Settings.model_fields, f"{key} is not a Settings field"
        fields[field] = COMPOSE_DEFAULT_RE.sub(r"\1", str(value))
    return Settings.model_validate(fields)


# --- every file parses --------------------------------------------------------------------


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_ops_yaml_file_parses(path: Path) -> None:
    assert _load_all(path), f"{path} is empty"


@pytest.mark.parametrize("path", sorted(OPS.rglob("*.json")), ids=lambda p: p.name)
def test_every_ops_json_file_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


# --- metric names agree with router_worker.metrics --------------------------------------------


def test_metric_name_pattern_strips_histogram_series_suffixes() -> None:
    expr = 'histogram_quantile(0.9, sum by (le) (rate(router_stage_latency_ms_bucket{s="x"}[1m])))'
    assert _metric_names([expr, "router_stage_latency_ms_count"]) == {"router_stage_latency_ms"}


def test_alerts_and_dashboards_reference_only_exported_metrics() -> None:
    referenced = _metric_names([r["expr"] for r in _alert_rules()] + _dashboard_exprs())
    missing = referenced - _exported_metrics() - PENDING_METRICS.keys()
    assert not missing, f"not in router_worker.metrics.create_metrics(): {sorted(missing)}"
    assert {"router_stage_latency_ms", "router_consumer_lag", "router_model_health"} <= referenced


def test_autoscaler_metric_is_exported() -> None:
    hpa = _k8s("HorizontalPodAutoscaler", "router-worker")
    metrics = hpa["spec"]["metrics"]
    names = {m["external"]["metric"]["name"] for m in metrics if m["type"] == "External"}
    assert names == {"router_consumer_lag"}
    assert names <= _exported_metrics()


# --- Prometheus ------------------------------------------------------------------------------


def test_alert_rules_have_required_fields() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in rules:
        assert rule["expr"].strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        required = {"summary", "description", "runbook_url"}
        assert required <= rule["annotations"].keys(), rule["alert"]


def test_alerts_cover_the_operational_failure_modes() -> None:
    exprs = " ".join(rule["expr"] for rule in _alert_rules())
    for needle in ("router_consumer_lag", "router_failed_total", "router_budget_used_ratio",
                   "router_model_health", "router_sink_lag", 'up{job=~"router-worker.*"}'):
        assert needle in exprs, needle


def test_alert_rules_pass_promtool() -> None:
    _promtool("check", "rules", str(ALERTS))


def test_alert_rules_fire_as_specified_by_promtool_unit_tests() -> None:
    _promtool("test", "rules", "alerts_test.yml", cwd=ALERTS.parent)


def test_prometheus_config_passes_promtool() -> None:
    _promtool("check", "config", "prometheus.yml", cwd=ALERTS.parent)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:query_{i}", "expr": _concrete(e)}
             for i, e in enumerate(_dashboard_exprs())]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    _promtool("check", "rules", str(path))


# --- Grafana -----------------------------------------------------------------------------------


def test_dashboards_are_provisioned_with_unique_uids_and_queries() -> None:
    boards = _dashboards()
    assert len(boards) >= 4
    uids = [d["uid"] for d in boards]
    assert len(uids) == len(set(uids))
    for d in boards:
        targets = [t for p in _panels(d) for t in p.get("targets", [])]
        assert targets, d["uid"]
        assert all(t["expr"].strip() for t in targets), d["uid"]
    provisioning = OPS / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["uid"] == "prometheus"
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_latency_dashboard_shows_p50_p95_p99_from_the_histogram() -> None:
    exprs = " ".join(_dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(router_stage_latency_ms_bucket" in exprs


def test_compose_mounts_the_paths_grafana_provisioning_expects() -> None:
    provisioning = OPS / "grafana" / "provisioning"
    provider = yaml.safe_load((provisioning / "dashboards" / "router-worker.yml").read_text())
    dash_path = provider["providers"][0]["options"]["path"]
    volumes = _compose()["services"]["grafana"]["volumes"]
    assert f"./ops/grafana/dashboards:{dash_path}:ro" in volumes
    assert "./ops/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes


# --- docker compose ----------------------------------------------------------------------------


def test_compose_file_passes_compose_config() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    proc = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_compose_names_the_required_services_with_healthchecks() -> None:
    services = _compose()["services"]
    assert set(services) >= REQUIRED_SERVICES
    for name in ("redpanda", "redis", "postgres"):
        assert services[name]["healthcheck"]["test"], name
    assert "--mode=dev-container" in services["redpanda"]["command"]


def test_compose_starts_the_worker_only_after_setup_succeeded() -> None:
    services = _compose()["services"]
    init_deps = services["init"]["depends_on"]
    conditions = {init_deps[s]["condition"] for s in ("redpanda", "redis", "postgres")}
    assert conditions == {"service_healthy"}
    assert "topics apply" in services["init"]["command"][0]
    assert "db migrate" in services["init"]["command"][0]
    assert services["worker"]["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_compose_worker_settings_are_valid_and_point_at_compose_services() -> None:
    worker = _compose()["services"]["worker"]
    settings = _settings_from_env(worker["environment"])
    assert settings.kafka_bootstrap == "redpanda:9092"
    assert re.search(r"[/@]redis:6379/", settings.redis_url.get_secret_value())
    assert "@postgres:5432/" in settings.database_url.get_secret_value()
    assert settings.session_timeout_s >= 10 > settings.heartbeat_interval_s
    assert worker["command"] == ["worker", "--web-port", str(settings.web_port)]


# --- Kubernetes --------------------------------------------------------------------------------


def test_k8s_manifests_have_api_version_kind_and_name() -> None:
    docs = list(_k8s_docs())
    assert docs
    for path, doc in docs:
        assert doc.get("apiVersion"), path
        assert doc.get("kind"), path
        assert doc.get("metadata", {}).get("name"), path


def test_k8s_gpu_worker_schedules_on_gpus_and_probes_health() -> None:
    spec = _k8s("Deployment", "router-worker")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" in {t["key"] for t in spec["tolerations"]}
    assert any(k.startswith("nvidia.com/") for k in spec["nodeSelector"])
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"]["path"] == path
        assert ports[container[probe]["httpGet"]["port"]] == 6066
    sources = {next(iter(s.values()))["name"] for s in container["envFrom"]}
    assert sources == {"router-worker-config", "router-worker-credentials"}


def test_k8s_config_and_secret_keys_are_settings_fields() -> None:
    config = _k8s("ConfigMap", "router-worker-config")["data"]
    secret = _k8s("Secret", "router-worker-credentials")["stringData"]
    settings = _settings_from_env({**config, **secret})
    assert settings.web_port == 6066
    assert settings.session_timeout_s >= 10


def test_k8s_autoscaler_never_exceeds_the_partition_count() -> None:
    hpa = _k8s("HorizontalPodAutoscaler", "router-worker")["spec"]
    partitions = int(_k8s("ConfigMap", "router-worker-config")["data"]["ROUTER_TOPIC_PARTITIONS"])
    assert hpa["scaleTargetRef"]["name"] == "router-worker"
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"] <= partitions


def test_k8s_disruption_budget_selects_the_workers() -> None:
    pdb = _k8s("PodDisruptionBudget", "router-worker")["spec"]
    labels = _k8s("Deployment", "router-worker")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_setup_job_applies_topics_and_migrations() -> None:
    job = _k8s("Job", "router-worker-setup")["spec"]["template"]["spec"]
    command = " ".join(job["containers"][0]["command"] + job["containers"][0]["args"])
    assert "router-worker topics apply" in command
    assert "router-worker db migrate" in command


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_k8s_overlays_build_with_kustomize(overlay: str) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not on PATH")
    proc = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(proc.stdout) if doc}
    required = {"Deployment", "Job", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert required <= kinds
    if overlay == "cpu":
        assert "nvidia.com/gpu" not in proc.stdout


# --- image ---------------------------------------------------------------------------------------


def test_dockerfile_is_multistage_non_root_and_pins_cpu_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "python:3.11-slim" in text
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user, "no USER instruction"
    assert not user[-1].startswith(("root", "0"))
    assert "ARG EXTRAS" in text
    assert 'pip install "${target}"' in text
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "https://download.pytorch.org/whl/cpu" in text
    assert "torch==2.13.0" in (ROOT / "pyproject.toml").read_text(), "pin drifted from pyproject"


def test_dockerignore_keeps_the_build_inputs() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv"} <= ignored
    assert not ignored & {"router_worker", "pyproject.toml", "setup.py", "topics", "README.md"}


def test_the_image_builds_the_compiled_keyword_scan() -> None:
    text = (ROOT / "Dockerfile").read_text()
    copied = " ".join(re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE))
    assert "setup.py" in copied, "without setup.py the image runs the regex keyword scan"
    assert "build-essential" in text


def test_operations_doc_has_the_runbook_anchor() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    assert re.search(r"^## Alerts$", doc, re.MULTILINE)
