"""Rendering of the Prometheus and Alertmanager configs, the `for:` shortener, and the shape of the rules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_plane.observability.render import (
    ALERTMANAGER_TEMPLATE,
    PROMETHEUS_TEMPLATE,
    RULES_FILE,
    RULES_TEST_FILE,
    AlertmanagerParams,
    PrometheusParams,
    Timings,
    duration,
    envoy_model_relabels,
    host_port,
    render_alertmanager_config,
    render_prometheus_config,
    rules_for,
    shorten_for,
    webhook_url,
)
from control_plane.observability.runbooks import REQUIRED_ALERTS
from control_plane.xds.resources import cluster_name

pytestmark = pytest.mark.unit

ALERTS = REQUIRED_ALERTS


def prometheus_params(tmp_path: Path, **overrides: Any) -> PrometheusParams:
    values: dict[str, Any] = {
        "envoy_targets": ["http://127.0.0.1:9901", "127.0.0.1:9902"],
        "control_plane_target": "http://127.0.0.1:8081/",
        "targets_dir": tmp_path / "targets",
        "rule_files": [tmp_path / "rules" / "gateway.rules.yml"],
        "model_ids": ["qwen2", "meta-llama/Llama-3.1-8B-Instruct", "Qwen2.5-7B"],
    }
    values.update(overrides)
    return PrometheusParams(**values)


def jobs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in config["scrape_configs"]}


# Small helpers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (1, "1s"),
        (15, "15s"),
        (60, "1m"),
        (300, "5m"),
        (90, "90s"),
        (3600, "1h"),
        (14400, "4h"),
        (0.5, "500ms"),
    ],
)
def test_duration(seconds: float, expected: str) -> None:
    assert duration(seconds) == expected


@pytest.mark.parametrize("seconds", [0, -1, 0.0001, float("nan"), float("inf")])
def test_duration_refuses_non_positive_or_tiny(seconds: float) -> None:
    with pytest.raises(ValueError):
        duration(seconds)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9901", "127.0.0.1:9901"),
        ("http://127.0.0.1:9901", "127.0.0.1:9901"),
        ("http://127.0.0.1:9901/stats/prometheus", "127.0.0.1:9901"),
        ("http://localhost:8081/", "localhost:8081"),
        ("http://[::1]:9090", "[::1]:9090"),
    ],
)
def test_host_port(address: str, expected: str) -> None:
    assert host_port(address) == expected


@pytest.mark.parametrize("address", ["127.0.0.1", "http://127.0.0.1", ""])
def test_host_port_needs_a_port(address: str) -> None:
    with pytest.raises(ValueError):
        host_port(address)


def test_webhook_url() -> None:
    assert webhook_url("http://127.0.0.1:8081") == "http://127.0.0.1:8081/alerts/webhook"
    assert webhook_url("http://127.0.0.1:8081/") == "http://127.0.0.1:8081/alerts/webhook"


# Envoy cluster name → model label -------------------------------------------------------------------------
def _expand(replacement: str, groups: tuple[str | None, ...]) -> str:
    return re.sub(r"\$(\d+)", lambda m: groups[int(m.group(1))] or "", replacement)


def apply_relabels(relabels: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str]:
    """Prometheus' `replace` action, enough for these rules: anchored regex, $1-style replacement."""
    labels = dict(labels)
    for relabel in relabels:
        value = ";".join(labels.get(name, "") for name in relabel["source_labels"])
        match = re.fullmatch(relabel.get("regex", "(.*)"), value)
        if match is None:
            continue
        replacement = relabel.get("replacement", "$1")
        groups = (match.group(0), *match.groups())
        labels[relabel["target_label"]] = _expand(replacement, groups)
    return labels


def rendered_envoy_relabels(tmp_path: Path, model_ids: list[str]) -> list[dict[str, Any]]:
    config = yaml.safe_load(render_prometheus_config(prometheus_params(tmp_path, model_ids=model_ids)))
    relabels: list[dict[str, Any]] = jobs(config)["envoy"]["metric_relabel_configs"]
    return relabels


@pytest.mark.parametrize(
    "model_id",
    ["qwen2", "llama3", "Llama-3_1", "meta-llama/Llama-3.1-8B-Instruct", "Qwen2.5-7B", "org:model@v1+x"],
)
def test_every_model_id_gets_its_exact_model_label(tmp_path: Path, model_id: str) -> None:
    ids = ["qwen2", "llama3", "Llama-3_1", "meta-llama/Llama-3.1-8B-Instruct", "Qwen2.5-7B", "org:model@v1+x"]
    relabels = rendered_envoy_relabels(tmp_path, ids)
    labels = apply_relabels(relabels, {"envoy_cluster_name": cluster_name(model_id)})
    assert labels["model"] == model_id


def test_non_model_clusters_get_no_model_label(tmp_path: Path) -> None:
    relabels = rendered_envoy_relabels(tmp_path, ["qwen2"])
    assert "model" not in apply_relabels(relabels, {"envoy_cluster_name": "xds_cluster"})
    assert "model" not in apply_relabels(relabels, {"envoy_http_conn_manager_prefix": "gateway"})


def test_only_sanitised_ids_need_an_exact_mapping() -> None:
    assert envoy_model_relabels(["qwen2", "llama-3_1"]) == []
    [relabel] = envoy_model_relabels(["Qwen2.5-7B", "Qwen2.5-7B"])
    assert relabel == {
        "source_labels": ["envoy_cluster_name"],
        "regex": cluster_name("Qwen2.5-7B"),
        "target_label": "model",
        "replacement": "Qwen2.5-7B",
    }


def test_a_model_added_later_falls_back_to_the_cluster_derived_name(tmp_path: Path) -> None:
    relabels = rendered_envoy_relabels(tmp_path, [])
    labels = apply_relabels(relabels, {"envoy_cluster_name": cluster_name("Qwen2.5-7B")})
    assert labels["model"] == cluster_name("Qwen2.5-7B").removeprefix("model_")


# Prometheus config ----------------------------------------------------------------------------------------
def test_prometheus_config_jobs_and_targets(tmp_path: Path) -> None:
    config = yaml.safe_load(render_prometheus_config(prometheus_params(tmp_path)))
    by_name = jobs(config)
    assert set(by_name) == {"prometheus", "alertmanager", "envoy", "control-plane", "backends", "gpu"}
    envoy = by_name["envoy"]
    assert envoy["metrics_path"] == "/stats/prometheus"
    assert envoy["static_configs"] == [{"targets": ["127.0.0.1:9901", "127.0.0.1:9902"]}]
    control_plane = by_name["control-plane"]
    assert control_plane["metrics_path"] == "/metrics"
    assert control_plane["static_configs"] == [{"targets": ["127.0.0.1:8081"]}]
    assert by_name["prometheus"]["static_configs"] == [{"targets": ["127.0.0.1:9090"]}]
    assert by_name["alertmanager"]["static_configs"] == [{"targets": ["127.0.0.1:9093"]}]
    assert by_name["backends"]["file_sd_configs"][0]["files"] == [str(tmp_path / "targets" / "backends.json")]
    assert by_name["gpu"]["file_sd_configs"][0]["files"] == [str(tmp_path / "targets" / "gpu.json")]
    assert config["rule_files"] == [str(tmp_path / "rules" / "gateway.rules.yml")]
    assert config["alerting"]["alertmanagers"] == [{"static_configs": [{"targets": ["127.0.0.1:9093"]}]}]


def test_prometheus_config_production_and_fast_timings(tmp_path: Path) -> None:
    production = yaml.safe_load(render_prometheus_config(prometheus_params(tmp_path)))["global"]
    assert production == {"scrape_interval": "15s", "scrape_timeout": "10s", "evaluation_interval": "15s"}
    fast = yaml.safe_load(render_prometheus_config(prometheus_params(tmp_path, timings=Timings.fast())))
    assert fast["global"] == {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}


def test_prometheus_config_refuses_a_timeout_over_the_interval(tmp_path: Path) -> None:
    timings = Timings(scrape_interval_s=5, scrape_timeout_s=10)
    with pytest.raises(ValueError, match="timeout"):
        render_prometheus_config(prometheus_params(tmp_path, timings=timings))


def test_prometheus_config_without_alertmanager(tmp_path: Path) -> None:
    config = yaml.safe_load(render_prometheus_config(prometheus_params(tmp_path, alertmanager_address=None)))
    assert config["alerting"]["alertmanagers"] == [{"static_configs": [{"targets": []}]}]


def test_paths_with_odd_characters_survive(tmp_path: Path) -> None:
    odd = tmp_path / 'dir with "quotes" and: colons'
    config = yaml.safe_load(render_prometheus_config(prometheus_params(tmp_path, targets_dir=odd)))
    assert jobs(config)["backends"]["file_sd_configs"][0]["files"] == [str(odd / "backends.json")]


def test_a_stray_dollar_in_a_template_is_an_error(tmp_path: Path) -> None:
    template = PROMETHEUS_TEMPLATE.read_text() + "\n# costs $5\n"
    with pytest.raises(ValueError):
        render_prometheus_config(prometheus_params(tmp_path), template=template)


def test_templates_have_no_unfilled_placeholders(tmp_path: Path) -> None:
    rendered = render_prometheus_config(prometheus_params(tmp_path))
    rendered += render_alertmanager_config(
        AlertmanagerParams(
            webhook_url="http://127.0.0.1:8081/alerts/webhook", credentials_file=tmp_path / "t"
        )
    )
    assert "${" not in rendered


# Alertmanager config --------------------------------------------------------------------------------------
def test_alertmanager_config_routes_everything_to_the_webhook(tmp_path: Path) -> None:
    token_file = tmp_path / "webhook-token"
    text = render_alertmanager_config(
        AlertmanagerParams(webhook_url="http://127.0.0.1:8081/alerts/webhook", credentials_file=token_file)
    )
    config = yaml.safe_load(text)
    route = config["route"]
    assert route["receiver"] == "control-plane"
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == ("30s", "5m", "4h")
    [receiver] = config["receivers"]
    assert receiver["name"] == "control-plane"
    [webhook] = receiver["webhook_configs"]
    assert webhook["url"] == "http://127.0.0.1:8081/alerts/webhook"
    assert webhook["send_resolved"] is True
    assert webhook["http_config"]["authorization"] == {"type": "Bearer", "credentials_file": str(token_file)}


def test_alertmanager_config_fast_timings(tmp_path: Path) -> None:
    config = yaml.safe_load(
        render_alertmanager_config(
            AlertmanagerParams(
                webhook_url="http://127.0.0.1:1/alerts/webhook",
                credentials_file=tmp_path / "t",
                timings=Timings.fast(),
            )
        )
    )
    route = config["route"]
    assert (route["group_wait"], route["group_interval"]) == ("1s", "1s")


def test_the_token_itself_is_never_in_the_alertmanager_config(tmp_path: Path) -> None:
    text = ALERTMANAGER_TEMPLATE.read_text()
    assert "credentials_file:" in text
    assert re.search(r"^\s*credentials:", text, re.MULTILINE) is None


# Rules ----------------------------------------------------------------------------------------------------
def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES_FILE.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_required_alert_exists_with_severity_and_annotations() -> None:
    alerts = {rule["alert"]: rule for rule in load_rules() if "alert" in rule}
    assert set(alerts) == ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        assert all(rule["annotations"][key].strip() for key in ("summary", "description", "runbook")), name


@pytest.mark.parametrize(
    ("alert", "labels"),
    [
        ("ModelUnavailable", ["model"]),
        ("EndpointDown", ["model", "endpoint"]),
        ("HighErrorRate", ["model"]),
        ("HighP99Latency", ["model"]),
        ("HighTimeToFirstToken", ["model"]),
        ("QueueBacklog", ["model", "endpoint"]),
        ("GPUMemoryHigh", ["model", "endpoint"]),
        ("ModelSaturated", ["model"]),
        ("DefaultPriorityShed", ["model"]),
        ("ModelOnFallback", ["model", "fallback"]),
        ("ModelReplicaRestarts", ["model"]),
        ("ModelReplicasBelowDesired", ["model"]),
    ],
)
def test_alerts_name_what_they_are_about(alert: str, labels: list[str]) -> None:
    """The labels appear in the templates, so the text an operator reads names the model/endpoint."""
    [rule] = [r for r in load_rules() if r.get("alert") == alert]
    for label in labels:
        assert f"$labels.{label}" in rule["annotations"]["summary"] + rule["annotations"]["description"]


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    doc = yaml.safe_load(RULES_TEST_FILE.read_text())
    assert doc["rule_files"] == [RULES_FILE.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert firing == ALERTS
    assert quiet == ALERTS


def test_recording_rule_names_follow_the_convention() -> None:
    for rule in load_rules():
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]


def test_shorten_for_rewrites_every_for_and_nothing_else() -> None:
    original = RULES_FILE.read_text()
    short = yaml.safe_load(shorten_for(original, 2))
    before = yaml.safe_load(original)
    for group_before, group_after in zip(before["groups"], short["groups"], strict=True):
        for rule_before, rule_after in zip(group_before["rules"], group_after["rules"], strict=True):
            if "for" in rule_before:
                assert rule_after["for"] == "2s"
                rule_after["for"] = rule_before["for"]
            else:
                assert "for" not in rule_after
            assert rule_after == rule_before
    assert rules_for(None) == original
    assert yaml.safe_load(rules_for(1))["groups"][2]["rules"][0]["for"] == "1s"


def test_production_for_durations_are_at_least_a_minute() -> None:
    for rule in load_rules():
        if "for" in rule:
            assert re.fullmatch(r"\d+m", rule["for"]), (rule["alert"], rule["for"])
