"""The Grafana dashboard and its provisioning: every panel has a datasource and PromQL that parses and names
real metrics; the panels the operators need are there; the compose service mounts what Grafana reads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_plane.config import parse_registry
from control_plane.lifecycle.metrics import LifecycleMetrics
from control_plane.metrics import ControlPlaneMetrics
from control_plane.overload.sinks import OverloadCounters, SaturationGauges
from control_plane.runtime import EndpointGauges
from control_plane.service import ControlPlane
from control_plane.xds.cache import SnapshotCache

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "observability" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "llm-gateway.json"

# What Grafana substitutes before a query reaches Prometheus (values as for a 1 h range, all models).
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$model": ".+",
}
PROMQL_WORDS = frozenset(
    [
        # aggregations
        *("sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "group"),
        # functions
        *("rate", "irate", "increase", "delta", "deriv", "histogram_quantile", "label_replace", "label_join"),
        *("abs", "clamp_min", "clamp_max", "vector", "scalar", "time", "round"),
        *("avg_over_time", "max_over_time", "min_over_time", "sum_over_time"),
        # keywords
        *(
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
            "and",
            "or",
            "unless",
            "bool",
            "offset",
        ),
    ]
)
# Envoy's cluster statistics (https://www.envoyproxy.io/docs/envoy/latest/configuration/upstream/cluster_manager/
# cluster_stats) as its /stats/prometheus names them: the ones the dashboard uses.
ENVOY_CLUSTER_STATS = {
    "envoy_cluster_upstream_rq_xx",
    "envoy_cluster_upstream_rq_time_bucket",
    "envoy_cluster_upstream_rq_active",
    "envoy_cluster_upstream_rq_pending_active",
    "envoy_cluster_upstream_rq_pending_overflow",
    "envoy_cluster_upstream_rq_timeout",
    "envoy_cluster_upstream_rq_per_try_timeout",
    "envoy_cluster_upstream_rq_retry",
    "envoy_cluster_upstream_rq_retry_overflow",
}
# Engine metrics the local simulators do not export but real engines do (documented in
# control_plane/telemetry/metric_map.yaml): vLLM's names before 0.10, and TEI's queue.
KNOWN_ELSEWHERE = {
    "vllm:gpu_cache_usage_perc",
    "vllm:gpu_prefix_cache_hits_total",
    "vllm:gpu_prefix_cache_queries_total",
    "te_queue_size",
}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels() -> list[dict[str, Any]]:
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # panels inside collapsed rows
    return [p for p in found if p["type"] != "row"]


def exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


def substitute(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (strings, label matchers, ranges and label lists removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', substitute(expr))
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\boffset\s+\d+[smhdwy]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = match.group(0)
        following = text[match.end() :].lstrip()
        if name in PROMQL_WORDS or following.startswith("("):
            continue
        names.add(name)
    return names


def balanced(text: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', text):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


def test_dashboard_identity_and_variables() -> None:
    board = dashboard()
    assert board["uid"] == "llm-gateway" and board["title"] == "LLM gateway"
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    model = variables["model"]
    assert model["includeAll"] and model["multi"] and model["allValue"] == ".+"  # never the empty model label
    assert "llm_gateway_endpoint_healthy" in model["definition"]


def test_every_panel_has_a_datasource_and_targets() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels():
        where = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel.get("description"), f"{where}: say what the panel shows"
        assert panel["targets"], where
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), where
        for t in panel["targets"]:
            assert t["datasource"] == panel["datasource"], where
            assert t["expr"].strip() and t.get("legendFormat"), where
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, where


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_promql_looks_valid() -> None:
    for title, expr in exprs():
        query = substitute(expr)
        assert "$" not in query, f"{title}: unknown Grafana variable in {expr!r}"
        assert balanced(query), f"{title}: unbalanced brackets in {expr!r}"
        assert metric_names(expr), f"{title}: selects no metric"
        for selector in re.findall(r"\{([^{}]*)\}", query):
            for matcher in filter(None, (m.strip() for m in selector.split(","))):
                assert re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*\s*(=~|!~|!=|=)\s*"[^"]*"', matcher), (
                    title,
                    matcher,
                )
        for window in re.findall(r"\[([^\[\]]*)\]", query):
            assert re.fullmatch(r"\d+[smhd]", window), (title, window)


def test_per_model_panels_filter_by_the_model_variable() -> None:
    for title, expr in exprs():
        if re.search(r"\benvoy_cluster_|\bvllm:|\btgi_|\bsglang:|\bDCGM_|llm_gateway_endpoint_", expr):
            selectors = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*\{([^{}]*)\}", expr)
            assert selectors and all('model=~"$model"' in s for s in selectors), (title, expr)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promql_parses_with_promtool(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": substitute(expr)}
                    for i, (_, expr) in enumerate(exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_metric_names_are_real() -> None:
    # The control plane's registry as the service fills it: its own metrics, the overload counters and
    # the lifecycle's metrics, and the gauges computed at scrape time.
    metrics = ControlPlaneMetrics.create()
    registry = parse_registry({"allow_empty": True})
    OverloadCounters(registry, metrics.registry)
    LifecycleMetrics.create(metrics.registry)
    families = list(metrics.registry.collect())
    control_plane = {sample.name for family in families for sample in family.samples}
    control_plane |= {family.name for family in families}
    plane = ControlPlane(registry, cache=SnapshotCache(), metrics=ControlPlaneMetrics.create())
    control_plane |= {family.name for family in EndpointGauges(plane).collect()}
    control_plane |= {family.name for family in SaturationGauges(lambda: plane.state).collect()}
    control_plane |= {f"{name}_total" for name in control_plane}
    simulator = set(
        re.findall(r'"([A-Za-z_:][A-Za-z0-9_:]*)"', (REPO / "backends/simulator/metrics.py").read_text())
    )

    def real(name: str) -> bool:
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        if name.startswith("llm_gateway_"):
            return name in control_plane or base in control_plane  # a histogram's series
        if name.startswith("envoy_"):
            return name in ENVOY_CLUSTER_STATS
        return name in simulator or base in simulator or name in KNOWN_ELSEWHERE

    unknown = {(title, name) for title, expr in exprs() for name in metric_names(expr) if not real(name)}
    assert not unknown


def test_the_panels_operators_asked_for_are_there() -> None:
    text = "\n".join(expr for _, expr in exprs())
    titles = " | ".join(p["title"].lower() for p in panels())
    for metric in [
        "envoy_cluster_upstream_rq_xx",  # volume, QPS and status classes per model
        "envoy_cluster_upstream_rq_time_bucket",  # latency
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "tgi_request_input_length_sum",
        "tgi_request_generated_tokens_sum",
        "envoy_cluster_upstream_rq_timeout",
        "envoy_cluster_upstream_rq_retry",
        "llm_gateway_endpoint_healthy",
        "vllm:num_requests_waiting",
        "tgi_queue_size",
        "vllm:kv_cache_usage_perc",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_FREE",
        "llm_gateway_xds_nacks_total",
        # The seeds' API per model and scenario: requests, P95/P99, tokens in and out, errors by kind.
        "llm_gateway_generate_requests_total",
        "llm_gateway_generate_duration_seconds_bucket",
        "llm_gateway_generate_tokens_total",
        # Overload and fallback, launched models' replicas, engines' prefix caches.
        "llm_gateway_model_saturation",
        "llm_gateway_shed_requests_total",
        "llm_gateway_fallback_requests_total",
        "llm_gateway_model_fallback_active",
        "llm_gateway_model_replicas",
        "llm_gateway_model_desired_replicas",
        "llm_gateway_model_replica_restarts_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        "sglang:cache_hit_rate",
    ]:
        assert metric in text, metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (model, le) (rate(envoy_cluster_upstream_rq_time_bucket"
            in text
        )
    assert "envoy_response_code_class" in text
    assert re.search(
        r"sum by \(model\) \(rate\(vllm:prefix_cache_hits_total\{[^}]*\}\[\$__rate_interval\]\).*\) / "
        r"\(sum by \(model\) \(rate\(vllm:prefix_cache_queries_total",
        text,
    ), "prefix-cache hit rate per model: rate(hits) / rate(queries)"
    for word in ("requests per second", "status classes", "latency", "time to first token", "prompt tokens",
                 "completion tokens", "timeouts", "retries", "healthy endpoints", "queue depth", "kv-cache",
                 "gpu memory", "xds nacks", "saturation level", "shed requests", "fallback requests",
                 "fallback active", "replicas ready vs desired", "replica restarts",
                 "prefix cache hit rate"):  # fmt: skip
        assert word in titles, word


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards() -> None:
    (datasource_file,) = (GRAFANA / "provisioning" / "datasources").glob("*.yml")
    datasources = yaml.safe_load(datasource_file.read_text())
    assert datasources["apiVersion"] == 1
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["url"] == "http://prometheus:9090"
    variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert prometheus["uid"] == variable["current"]["value"]  # the dashboard's default datasource

    (provider_file,) = (GRAFANA / "provisioning" / "dashboards").glob("*.yml")
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    assert provider["type"] == "file"

    grafana = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]  # loopback only
    mounts = {
        target.removesuffix(":ro"): REPO / source
        for source, target in (v.split(":", 1) for v in grafana["volumes"])
    }
    assert mounts["/etc/grafana/provisioning"].resolve() == (GRAFANA / "provisioning").resolve()
    dashboards_dir = mounts[provider["options"]["path"]]
    assert (dashboards_dir / DASHBOARD.name).resolve() == DASHBOARD.resolve()
