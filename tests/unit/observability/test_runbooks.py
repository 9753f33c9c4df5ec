"""The operations guide documents every alert, generated from the rules themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from control_plane.observability.runbooks import REQUIRED_ALERTS, alerts, with_alert_section

pytestmark = pytest.mark.unit

GUIDE = Path(__file__).resolve().parents[3] / "docs" / "operations.md"


def test_every_required_alert_exists_with_a_runbook() -> None:
    rules = {rule["alert"]: rule for rule in alerts()}
    assert set(rules) >= REQUIRED_ALERTS
    for name, rule in rules.items():
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name


def test_the_operations_guide_matches_the_rules() -> None:
    text = GUIDE.read_text()
    fresh = with_alert_section(text)
    if os.environ.get("UPDATE_GOLDEN"):
        GUIDE.write_text(fresh)
    assert text == fresh, "docs/operations.md is out of date: rerun with UPDATE_GOLDEN=1"
    for name in REQUIRED_ALERTS:
        assert f"### {name}\n" in text
