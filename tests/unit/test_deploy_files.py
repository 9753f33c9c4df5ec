"""The shipped deployment files stay coherent with the code: registries validate, compose wiring holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from control_plane.config import load_registry

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


class _ComposeLoader(yaml.SafeLoader):
    """Compose's `!reset` tag (drop a merged key) as a plain value."""


_ComposeLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


@pytest.mark.parametrize("path", ["models.yaml", "deploy/compose/models.yaml"])
def test_shipped_registries_validate(path: str) -> None:
    assert load_registry(REPO / path).models


def test_keys_are_off_locally_and_on_in_compose() -> None:
    assert load_registry(REPO / "models.yaml").auth.mode == "none"
    assert load_registry(REPO / "deploy/compose/models.yaml").auth.mode == "api_key"


def test_compose_backends_match_the_compose_registry() -> None:
    services = compose(REPO / "docker-compose.yml")["services"]
    registry = load_registry(REPO / "deploy/compose/models.yaml")
    hosts = {e.host for m in registry.models for e in m.endpoints}
    assert hosts <= set(services), hosts - set(services)
    assert set(compose(REPO / "deploy/compose/sim.yaml")["services"]) == hosts
    assert {"control-plane", "envoy", "envoy-bootstrap"} <= set(services)
