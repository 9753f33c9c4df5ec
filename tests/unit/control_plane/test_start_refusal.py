"""`serve` refuses to start on a registry it cannot serve (here: an empty one) unless forced, and says
why on stderr with exit status 2, before binding any port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


def serve(tmp_path: Path, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "control_plane",
            "serve",
            "--config",
            str(config),
            "--state-db",
            str(tmp_path / "state.db"),
            "--xds-secret-file",
            str(tmp_path / "xds-secret"),
            "--xds-port",
            "0",
            "--admin-port",
            "0",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("content", ["", "models: []\n", "# only a comment\n"])
def test_serve_refuses_an_empty_registry(tmp_path: Path, content: str) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(content)
    done = serve(tmp_path, config)
    assert done.returncode == 2, done.stderr
    assert "allow_empty" in done.stderr and str(config) in done.stderr
    validate = subprocess.run(
        [sys.executable, "-m", "control_plane", "validate", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert validate.returncode == 2
    forced = subprocess.run(
        [sys.executable, "-m", "control_plane", "validate", "--config", str(config), "--allow-empty"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert forced.returncode == 0 and "OK (0 models)" in forced.stdout
