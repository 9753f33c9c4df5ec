"""A few seconds of the locust load test (loadtest/locustfile.py) through a real stack: it runs headless,
writes its CSV and HTML report with the custom LLM entries, and sees no failure on two models."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from control_plane.envoy_bootstrap import REPO_ROOT
from loadtest import locust_report
from loadtest.locust_stack import wait_models
from tests.integration.conftest import StackFactory

pytestmark = pytest.mark.integration

MODELS = ("qwen2", "llama3")


def test_locust_headless_run_reports_llm_metrics_for_both_models(
    make_stack: StackFactory, two_models: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = make_stack(two_models)  # the simulator's fast profile
    url = stack.envoys[0].url
    wait_models(url, MODELS, timeout_s=15)
    prefix = tmp_path / "results" / "run"
    argv = [
        *(sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtest" / "locustfile.py")),
        *("--headless", "-u", "4", "-r", "4", "-t", "5s", "--stop-timeout", "5"),
        *("--host", url, "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary"),
        *("--model-mix", "qwen2=1,llama3=1", "--stream-ratio", "0.5", "--seed", "7"),
        *("--prompt-tokens", "uniform:16:128", "--max-tokens", "uniform:8:32"),
    ]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    output = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, output

    with (tmp_path / "results" / "run_stats.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["Name"] != "Aggregated"]
    counts = {(r["Type"], r["Name"]): int(r["Request Count"]) for r in rows}
    assert all(int(r["Failure Count"]) == 0 for r in rows), output
    for model in MODELS:
        chat = sum(n for (kind, name), n in counts.items() if kind == "POST" and f"[{model}" in name)
        assert chat > 0, f"no chat requests for {model}: {sorted(counts)}"
        assert counts.get(("E2E", model), 0) > 0
        assert counts.get(("TTFT", model), 0) > 0, f"no TTFT entry for {model}: {sorted(counts)}"
        assert counts.get(("ITL", model), 0) > counts[("TTFT", model)]  # one sample per gap
        assert counts.get(("TOKENS/S", f"{model} (tok/s, not ms)"), 0) > 0
    assert counts[("E2E", "all models")] == sum(counts[("E2E", m)] for m in MODELS)
    assert (tmp_path / "results" / "run.html").stat().st_size > 0
    summary = (tmp_path / "results" / "run_llm_summary.md").read_text()
    assert "| qwen2 |" in summary and "| llama3 |" in summary

    assert locust_report.main([str(tmp_path / "results" / "run_stats.csv"), "--seeds"]) == 0
    report = capsys.readouterr().out
    assert "P99 end-to-end latency at 128 new tokens" in report
    assert "| 4 users |" in report  # the peak user count, from the history CSV
