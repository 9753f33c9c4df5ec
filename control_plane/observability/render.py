"""Render the Prometheus and Alertmanager configs from the templates in `observability/`, and make a copy
of the alert rules with short `for:` durations for tests.

Everything here is pure (text in, text out; the templates are read only when no text is passed), so it is
unit-tested without the binaries; `promtool check config` and `amtool check-config` check the output in
tests/integration/test_promtool_rules.py.

Placeholders are `${NAME}` (`string.Template`); every value is written as JSON, which YAML reads unchanged,
so paths and URLs need no quoting rules of their own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import urlsplit

import yaml

from control_plane.envoy_bootstrap import REPO_ROOT
from control_plane.observability.file_sd import BACKENDS_FILE, GPU_FILE
from control_plane.xds.resources import cluster_name

OBSERVABILITY_DIR = REPO_ROOT / "observability"
PROMETHEUS_TEMPLATE = OBSERVABILITY_DIR / "prometheus" / "prometheus.yml"
ALERTMANAGER_TEMPLATE = OBSERVABILITY_DIR / "alertmanager" / "alertmanager.yml"
RULES_FILE = OBSERVABILITY_DIR / "rules" / "gateway.rules.yml"
RULES_TEST_FILE = OBSERVABILITY_DIR / "rules" / "gateway.rules.test.yml"

WEBHOOK_PATH = "/alerts/webhook"


@dataclass(frozen=True)
class Timings:
    """How often Prometheus scrapes and evaluates, and how Alertmanager batches notifications.

    The defaults suit production; `Timings.fast()` is for tests (a notification within seconds)."""

    scrape_interval_s: float = 15.0
    evaluation_interval_s: float = 15.0
    scrape_timeout_s: float | None = None  # None: min(10 s, scrape interval)
    group_wait_s: float = 30.0
    group_interval_s: float = 300.0
    repeat_interval_s: float = 4 * 3600.0

    @classmethod
    def fast(cls) -> Timings:
        """1 s scrapes and evaluations, 1 s Alertmanager group wait and interval."""
        return cls(
            scrape_interval_s=1.0,
            evaluation_interval_s=1.0,
            group_wait_s=1.0,
            group_interval_s=1.0,
            repeat_interval_s=3600.0,
        )

    @property
    def effective_scrape_timeout_s(self) -> float:
        if self.scrape_timeout_s is not None:
            return self.scrape_timeout_s
        return min(10.0, self.scrape_interval_s)


@dataclass(frozen=True)
class PrometheusParams:
    envoy_targets: Sequence[str]
    """Envoy admin addresses, `host:port` or URLs (`http://127.0.0.1:9901`); scraped at /stats/prometheus."""
    control_plane_target: str
    """The control plane's admin address (`host:port` or URL); scraped at /metrics."""
    targets_dir: Path
    """Where the file-SD files (`backends.json`, `gpu.json`) are written."""
    rule_files: Sequence[Path] = (RULES_FILE,)
    prometheus_address: str = "127.0.0.1:9090"
    alertmanager_address: str | None = "127.0.0.1:9093"
    timings: Timings = field(default_factory=Timings)
    model_ids: Sequence[str] = ()
    """The registry's model ids: those whose cluster names are sanitised get an exact relabelling."""


@dataclass(frozen=True)
class AlertmanagerParams:
    webhook_url: str
    """The control plane's receiver, e.g. `http://127.0.0.1:8081/alerts/webhook` (see `webhook_url()`)."""
    credentials_file: Path
    """A file holding the admin bearer token (read by Alertmanager at each notification)."""
    timings: Timings = field(default_factory=Timings)


def duration(seconds: float) -> str:
    """A Prometheus/Alertmanager duration: 15 → "15s", 300 → "5m", 0.5 → "500ms", 3600 → "1h"."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be positive, not {seconds!r}")
    ms = round(seconds * 1000)
    if ms == 0:
        raise ValueError(f"a duration must be at least 1ms, not {seconds!r}")
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def host_port(address: str) -> str:
    """`host:port` of an address given as `host:port` or as a URL (its path is ignored)."""
    if "//" not in address:
        address = "//" + address
    parts = urlsplit(address)
    if not parts.hostname or parts.port is None:
        raise ValueError(f"{address.lstrip('/')!r} does not name a host and a port")
    host = parts.hostname
    return f"[{host}]:{parts.port}" if ":" in host else f"{host}:{parts.port}"


def webhook_url(control_plane_admin_url: str) -> str:
    """The control plane's Alertmanager webhook receiver under its admin URL."""
    return control_plane_admin_url.rstrip("/") + WEBHOOK_PATH


def envoy_model_relabels(model_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Exact `envoy_cluster_name` → `model` mappings for the ids whose cluster name is not `model_<id>`."""
    relabels = []
    for model_id in sorted(set(model_ids)):
        name = cluster_name(model_id)
        if name != f"model_{model_id}":
            relabels.append(
                {
                    "source_labels": ["envoy_cluster_name"],
                    "regex": name,
                    "target_label": "model",
                    "replacement": model_id,
                }
            )
    return relabels


def _json(value: Any) -> str:
    return json.dumps(value)


def _relabel_lines(relabels: list[dict[str, Any]], indent: int) -> str:
    """Relabel configs as YAML list items at `indent` spaces, values as JSON (flow style, one key a line)."""
    pad = " " * indent
    lines = []
    for relabel in relabels:
        for index, (key, value) in enumerate(relabel.items()):
            lines.append(f"{pad}{'- ' if index == 0 else '  '}{key}: {_json(value)}")
    return "\n".join(lines)


def render_prometheus_config(params: PrometheusParams, template: str | None = None) -> str:
    """prometheus.yml for these targets and timings (template: observability/prometheus/prometheus.yml)."""
    text = template if template is not None else PROMETHEUS_TEMPLATE.read_text(encoding="utf-8")
    timings = params.timings
    timeout = timings.effective_scrape_timeout_s
    if timeout > timings.scrape_interval_s:
        raise ValueError("the scrape timeout must not exceed the scrape interval")
    alertmanagers = [host_port(params.alertmanager_address)] if params.alertmanager_address else []
    rendered = Template(text).substitute(
        SCRAPE_INTERVAL=duration(timings.scrape_interval_s),
        SCRAPE_TIMEOUT=duration(timeout),
        EVALUATION_INTERVAL=duration(timings.evaluation_interval_s),
        RULE_FILES=_json([str(path) for path in params.rule_files]),
        ALERTMANAGER_TARGETS=_json(alertmanagers),
        PROMETHEUS_TARGETS=_json([host_port(params.prometheus_address)]),
        ENVOY_TARGETS=_json([host_port(target) for target in params.envoy_targets]),
        ENVOY_MODEL_RELABELS=_relabel_lines(envoy_model_relabels(params.model_ids), indent=6),
        CONTROL_PLANE_TARGETS=_json([host_port(params.control_plane_target)]),
        BACKENDS_SD_FILE=_json(str(Path(params.targets_dir) / BACKENDS_FILE)),
        GPU_SD_FILE=_json(str(Path(params.targets_dir) / GPU_FILE)),
    )
    yaml.safe_load(rendered)  # a template edit that breaks YAML fails here, not in Prometheus
    return rendered


def render_alertmanager_config(params: AlertmanagerParams, template: str | None = None) -> str:
    """alertmanager.yml routing every alert to the control plane's webhook, `send_resolved: true`."""
    text = template if template is not None else ALERTMANAGER_TEMPLATE.read_text(encoding="utf-8")
    timings = params.timings
    rendered = Template(text).substitute(
        GROUP_WAIT=duration(timings.group_wait_s),
        GROUP_INTERVAL=duration(timings.group_interval_s),
        REPEAT_INTERVAL=duration(timings.repeat_interval_s),
        WEBHOOK_URL=_json(params.webhook_url),
        CREDENTIALS_FILE=_json(str(params.credentials_file)),
    )
    yaml.safe_load(rendered)
    return rendered


def shorten_for(rules_text: str, seconds: float) -> str:
    """A copy of a rule file where every alert's `for:` is `seconds` (alerts without one keep none).

    For end-to-end tests: with 1 s scrapes and evaluations and `shorten_for(text, 1)`, EndpointDown fires
    within seconds of the endpoint going down. Comments are not kept."""
    doc = yaml.safe_load(rules_text)
    for group in doc.get("groups") or ():
        for rule in group.get("rules") or ():
            if "alert" in rule and "for" in rule:
                rule["for"] = duration(seconds)
    return str(yaml.safe_dump(doc, sort_keys=False, width=1000, allow_unicode=True))


def rules_for(seconds: float | None = None, rules_file: Path = RULES_FILE) -> str:
    """The rule file's text, with every `for:` shortened to `seconds` if given."""
    text = rules_file.read_text(encoding="utf-8")
    return text if seconds is None else shorten_for(text, seconds)
