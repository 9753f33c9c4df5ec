"""Where the llama.cpp launcher finds `llama-server` when no executable is configured: $LLAMA_SERVER, else
the build `make llamacpp` puts in the virtual environment, else the name, looked up on PATH."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from control_plane.lifecycle.launchers import LlamaCppLauncher, launcher_for, llama_server_binary

pytestmark = pytest.mark.unit


def _venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built: bool) -> Path:
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    binary = tmp_path / "llama.cpp" / "bin" / "llama-server"
    if built:
        binary.parent.mkdir(parents=True)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    return binary


def test_the_venv_build_is_used_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = _venv(tmp_path, monkeypatch, built=True)
    assert llama_server_binary() == str(binary)
    assert LlamaCppLauncher().executable == str(binary)


def test_path_lookup_without_a_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _venv(tmp_path, monkeypatch, built=False)
    assert llama_server_binary() == "llama-server"


def test_environment_and_configured_executable_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _venv(tmp_path, monkeypatch, built=True)
    monkeypatch.setenv("LLAMA_SERVER", "/opt/llama/llama-server")
    assert launcher_for("llamacpp").executable == "/opt/llama/llama-server"
    assert launcher_for("llamacpp", executable="/usr/local/bin/ls").executable == "/usr/local/bin/ls"
