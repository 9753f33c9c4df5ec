"""Render the operations guide's alert section from the alert rules, so the two cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from control_plane.observability.render import RULES_FILE

# The alerts the gateway promises operators: the observability issue's list, then overload and fallback
# (docs/balancing.md) and launched models' replicas (docs/lifecycle.md).
REQUIRED_ALERTS = frozenset(
    {
        "ModelUnavailable",
        "EndpointDown",
        "HighErrorRate",
        "HighP99Latency",
        "HighTimeToFirstToken",
        "QueueBacklog",
        "GPUMemoryHigh",
        "XdsConfigRejected",
        "ControlPlaneDown",
        "EnvoyDown",
        "ModelSaturated",
        "DefaultPriorityShed",
        "ModelOnFallback",
        "ModelReplicaRestarts",
        "ModelReplicasBelowDesired",
    }
)


def alerts(rules_file: Path = RULES_FILE) -> list[dict[str, Any]]:
    doc = yaml.safe_load(rules_file.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def _plain(text: str) -> str:
    # Template placeholders read as the label names they stand for.
    named = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", r"<\1>", text)
    return re.sub(r"\{\{[^}]*\}\}", "…", named).strip()


def render_alert_section(rules_file: Path = RULES_FILE) -> str:
    parts = []
    for rule in alerts(rules_file):
        annotations = rule["annotations"]
        steps = re.split(r"\s(?=\d+\.\s)", _plain(annotations["runbook"]))
        parts.append(
            f"### {rule['alert']}\n\n"
            f"*Severity:* `{rule['labels']['severity']}` · *fires after:* `{rule.get('for', '0s')}` · "
            f"*condition:* `{' '.join(rule['expr'].split())}`\n\n"
            f"**What it means.** {_plain(annotations['description'])}\n\n"
            "**What to do.**\n\n"
            + "\n".join(f"{step}" if step[:1].isdigit() else f"- {step}" for step in steps)
            + "\n"
        )
    return "\n".join(parts)


BEGIN, END = "<!-- alerts:begin -->\n", "<!-- alerts:end -->\n"


def with_alert_section(document: str, rules_file: Path = RULES_FILE) -> str:
    """The operations guide with its generated alert section replaced by a fresh rendering."""
    head, _, rest = document.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + BEGIN + render_alert_section(rules_file) + END + tail
