"""The shipped rules, their promtool unit tests and the rendered configs, checked by Prometheus' own tools.

CI installs Debian's prometheus and prometheus-alertmanager (.ci/run); elsewhere these tests are skipped
when promtool / amtool are absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from control_plane.config.loader import parse_registry
from control_plane.observability.file_sd import FileSdWriter
from control_plane.observability.render import (
    RULES_FILE,
    RULES_TEST_FILE,
    AlertmanagerParams,
    PrometheusParams,
    Timings,
    render_alertmanager_config,
    render_prometheus_config,
    shorten_for,
)

pytestmark = pytest.mark.integration

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)"
)
needs_amtool = pytest.mark.skipif(
    AMTOOL is None, reason="amtool not installed (apt-get install prometheus-alertmanager)"
)


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(argv)} failed ({result.returncode}):\n{output}"
    return output


@needs_promtool
def test_rules_are_valid() -> None:
    assert PROMTOOL is not None
    output = run(PROMTOOL, "check", "rules", str(RULES_FILE))
    assert "SUCCESS" in output


@needs_promtool
def test_rules_pass_their_unit_tests() -> None:
    assert PROMTOOL is not None
    output = run(PROMTOOL, "test", "rules", str(RULES_TEST_FILE))
    assert "SUCCESS" in output


@needs_promtool
def test_rules_with_short_for_durations_are_valid(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    short = tmp_path / "gateway.rules.yml"
    short.write_text(shorten_for(RULES_FILE.read_text(), 1))
    run(PROMTOOL, "check", "rules", str(short))


@needs_promtool
@pytest.mark.parametrize("timings", [Timings(), Timings.fast()], ids=["production", "fast"])
def test_rendered_prometheus_config_is_valid(tmp_path: Path, timings: Timings) -> None:
    assert PROMTOOL is not None
    registry = parse_registry(
        {
            "models": [
                {"id": "qwen2", "engine": "tgi", "endpoints": [{"url": "http://127.0.0.1:8101"}]},
                {
                    "id": "meta-llama/Llama-3.1-8B-Instruct",
                    "engine": "vllm",
                    "endpoints": [
                        {"url": "http://127.0.0.1:8201", "gpu_metrics_url": "http://127.0.0.1:9400/metrics"}
                    ],
                },
            ]
        }
    )
    FileSdWriter(tmp_path / "targets").write(registry)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        render_prometheus_config(
            PrometheusParams(
                envoy_targets=["http://127.0.0.1:9901"],
                control_plane_target="http://127.0.0.1:8081",
                targets_dir=tmp_path / "targets",
                rule_files=[RULES_FILE],
                timings=timings,
                model_ids=[m.id for m in registry.models],
            )
        )
    )
    output = run(PROMTOOL, "check", "config", str(config))
    assert "WARNING" not in output
    assert "SUCCESS: 1 rule files found" in output


@needs_amtool
@pytest.mark.parametrize("timings", [Timings(), Timings.fast()], ids=["production", "fast"])
def test_rendered_alertmanager_config_is_valid(tmp_path: Path, timings: Timings) -> None:
    assert AMTOOL is not None
    token = tmp_path / "webhook-token"
    token.write_text("secret")
    config = tmp_path / "alertmanager.yml"
    config.write_text(
        render_alertmanager_config(
            AlertmanagerParams(
                webhook_url="http://127.0.0.1:8081/alerts/webhook", credentials_file=token, timings=timings
            )
        )
    )
    output = run(AMTOOL, "check-config", str(config))
    assert "SUCCESS" in output
    assert "1 receivers" in output
