"""Moved simulator ports: the registry mirror the control plane reads when `make run` moves them."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_plane.devstack.ports import RegistryMirror, parse_sim_ports, remap_registry
from control_plane.secret_files import load_or_create_secret, write_private

pytestmark = pytest.mark.unit

DOC = {
    "models": [
        {
            "id": "qwen2",
            "engine": "tgi",
            "endpoints": [
                {"id": "a", "url": "http://127.0.0.1:8101"},
                {"id": "b", "url": "http://localhost:8102/"},
                {"id": "c", "url": "http://10.0.0.7:8000"},
            ],
        }
    ]
}


def urls(doc: dict[str, Any]) -> list[str]:
    return [e["url"] for e in doc["models"][0]["endpoints"]]


def test_offset_moves_loopback_endpoints_only() -> None:
    ports = parse_sim_ports("+100")
    assert ports is not None
    moved = remap_registry(yaml.safe_load(yaml.safe_dump(DOC)), ports)
    assert urls(moved) == ["http://127.0.0.1:8201", "http://localhost:8202/", "http://10.0.0.7:8000"]


def test_auto_picks_a_stable_free_port_per_registry_port() -> None:
    ports = parse_sim_ports("auto")
    assert ports is not None
    first = ports(8101)
    assert first != 8101 and ports(8101) == first and ports(8102) != first


@pytest.mark.parametrize("spec", ["nope", "+0", "-5", "+70000"])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="SIM_PORTS"):
        parse_sim_ports(spec)


def test_registry_means_no_change() -> None:
    assert parse_sim_ports("registry") is None


def test_the_mirror_follows_edits_and_passes_bad_files_through(tmp_path: Path) -> None:
    source, target = tmp_path / "models.yaml", tmp_path / "mirror.yaml"
    source.write_text(yaml.safe_dump(DOC))
    ports = parse_sim_ports("+1")
    assert ports is not None
    mirror = RegistryMirror(source, target, ports)
    assert mirror.sync() and not mirror.sync()  # unchanged source: no rewrite
    assert urls(yaml.safe_load(target.read_text()))[0] == "http://127.0.0.1:8102"
    # Bytes that are not UTF-8, or not YAML, reach the control plane as they are, to be refused there.
    source.write_bytes(b"models: [\n# caf\xe9\n")
    assert mirror.sync()
    assert target.read_bytes() == b"models: [\n# caf\xe9\n"


def test_secret_files_are_private(tmp_path: Path) -> None:
    path = write_private(tmp_path / "new" / "token", "s3cret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    value, new = load_or_create_secret(tmp_path / "new" / "xds")
    again, new_again = load_or_create_secret(tmp_path / "new" / "xds")
    assert new and not new_again and value == again and len(value) >= 32
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "xds").st_mode) == 0o600


def test_the_mirror_anchors_relative_paths_at_the_source_file(tmp_path: Path) -> None:
    """The mirror lives in the state dir: a relative model directory or weights path of the source file
    must still name the same place."""
    doc = {
        "lifecycle": {
            "model_dirs": [{"path": "deploy/models-sim"}, {"path": "/abs/models"}],
            "log_dir": "logs",
        },
        "models": [{"id": "m", "engine": "vllm", "launch": {"path": "weights/m.gguf"}}],
    }
    out = remap_registry(doc, lambda port: port, tmp_path)
    assert out["lifecycle"]["model_dirs"][0]["path"] == str(tmp_path / "deploy/models-sim")
    assert out["lifecycle"]["model_dirs"][1]["path"] == "/abs/models"
    assert out["lifecycle"]["log_dir"] == str(tmp_path / "logs")
    assert out["models"][0]["launch"]["path"] == str(tmp_path / "weights/m.gguf")
