"""The activation benchmark (loadtest/bench_activation.py) measures what it says, through the suite's own
command line (`--only activation --quick`): every cold request answered after exactly one load, the
engine-side clock seeing an engine that took at least its configured load time, and the warm load served
by the replica itself with nothing passing the activator. Figures are not asserted (docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import bench
from loadtest.bench_activation import LAUNCHED, STATIC, ActivationSettings

pytestmark = pytest.mark.integration


def test_the_quick_activation_section_runs(tmp_path: Path) -> None:
    results, report = tmp_path / "results.json", tmp_path / "report.md"
    code = bench.main(["--only", "activation", "--quick", "--json", str(results), "--out", str(report)])
    doc = json.loads(results.read_text())
    section = doc["sections"]["activation"]
    assert code == 0, section.get("traceback")
    cold = section["singles"] + section["bursts"]
    assert len(section["singles"]) == 3 and [b["requests"] for b in section["bursts"]] == [20]
    for run in cold:
        assert run["errors"] == 0 and run["loads"] == 1, run
        # Seen from the engine's side: spawned, then /health 200 no sooner than its load time.
        assert run["engine_load_s"] >= run["load_time_s"] >= ActivationSettings().load_time_s, run
        assert run["total_s"] >= run["engine_load_s"] and run["loaded_in_s"] >= run["load_time_s"], run

    rows = {r["model"]: r for r in section["warm"]["rows"]}
    replica = section["warm"]["replica"]
    for model in (LAUNCHED, STATIC):
        row = rows[model]
        assert row["requests"] > 0 and row["errors"] == 0 and row["statuses"] == [200], row
        assert row["through_activator"] == 0 and row["held_max"] == 0, row
    assert rows[LAUNCHED]["x_served_by"] == [replica]
    assert rows[STATIC]["x_served_by"] != [replica]
    assert "## Model activation" in report.read_text()
