"""A few seconds of the locust load test (loadtest/locustfile.py) through a real stack: it runs headless,
sees no failure on two models, and writes its CSV and HTML report with the LLM samples kept apart: the
report's totals, request rate and charts count only the real requests."""

from __future__ import annotations

import csv
import json
import re
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

    # Locust's own statistics: the chat requests and nothing else, and their total is their sum. (Its CSV
    # is rewritten every second until it quits, so the final counts are the HTML report's.)
    with (tmp_path / "results" / "run_stats.csv").open(newline="") as handle:
        locust_rows = list(csv.DictReader(handle))
    csv_requests = [int(r["Request Count"]) for r in locust_rows if r["Name"] != "Aggregated"]
    assert {r["Type"] for r in locust_rows if r["Name"] != "Aggregated"} == {"POST"}, locust_rows
    total = next(r for r in locust_rows if r["Name"] == "Aggregated")
    assert int(total["Request Count"]) == sum(csv_requests) > 0
    assert all(int(r["Failure Count"]) == 0 for r in locust_rows), output
    page = (tmp_path / "results" / "run.html").read_text()
    match = re.search(r"window\.templateArgs = (\{.*?\})\n", page)
    assert match, page[-2000:]
    args = json.loads(match.group(1))
    stats = {(e["method"], e["name"]): e for e in args["requests_statistics"]}
    requests = {name: e["num_requests"] for (method, name), e in stats.items() if name != "Aggregated"}

    # The LLM samples, apart: one E2E sample per request, TTFT per stream, one ITL per gap ...
    with (tmp_path / "results" / "run_llm_stats.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    counts = {(r["Type"], r["Name"]): int(r["Request Count"]) for r in rows}
    assert all(int(r["Failure Count"]) == 0 for r in rows), output
    for model in MODELS:
        chat = sum(n for name, n in requests.items() if f"[{model}" in name)
        assert chat > 0, f"no chat requests for {model}: {sorted(requests)}"
        assert counts.get(("E2E", model), 0) == chat
        assert counts.get(("TTFT", model), 0) > 0, f"no TTFT entry for {model}: {sorted(counts)}"
        assert counts.get(("ITL", model), 0) > counts[("TTFT", model)]  # one sample per gap
        assert counts.get(("TOKENS/S", f"{model} (tok/s, not ms)"), 0) > 0
    assert counts[("E2E", "all models")] == sum(counts[("E2E", m)] for m in MODELS)

    # ... and the HTML report: its tables and total hold the real requests only (its charts are drawn
    # from the same statistics), and the LLM samples come in their own section after them.
    assert {m for m, n in stats if n != "Aggregated"} == {"POST"}, sorted(stats)
    aggregated = next(e for (_, name), e in stats.items() if name == "Aggregated")
    assert aggregated["num_requests"] == sum(requests.values())
    assert {r["method"] for r in args["response_time_statistics"] if r["name"] != "Aggregated"} == {"POST"}
    section = page[page.index('id="llm-metrics"') :]
    assert "<td>TTFT</td>" in section and "<td>ITL</td>" in section and "| qwen2 |" in section
    summary = (tmp_path / "results" / "run_llm_summary.md").read_text()
    assert "| qwen2 |" in summary and "| llama3 |" in summary

    assert locust_report.main([str(tmp_path / "results" / "run_llm_stats.csv"), "--seeds"]) == 0
    report = capsys.readouterr().out
    assert "P99 end-to-end latency at 128 new tokens" in report
    assert "| 4 users |" in report  # the peak user count, from the history CSV
