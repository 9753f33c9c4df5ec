"""The admin overlay: persisted across reopen, layered over the file with the documented rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.config import EndpointConfig, ModelConfig, parse_registry
from control_plane.errors import ConfigError
from control_plane.store import AdminStore

pytestmark = pytest.mark.unit

FILE = parse_registry(
    {
        "models": [
            {
                "id": "qwen2",
                "aliases": ["qwen"],
                "engine": "tgi",
                "endpoints": [{"url": "http://127.0.0.1:1"}, {"id": "q-b", "url": "http://127.0.0.1:2"}],
            },
            {"id": "llama3", "engine": "vllm", "enabled": False},
        ]
    }
)


def ids(store: AdminStore) -> dict[str, list[str]]:
    registry = store.apply(FILE).registry
    return {m.id: [m.endpoint_id(i) for i in range(len(m.endpoints))] for m in registry.models}


def test_empty_overlay_is_the_file(tmp_path: Path) -> None:
    store = AdminStore(tmp_path / "s.db")
    assert ids(store) == {"qwen2": ["qwen2-0", "q-b"], "llama3": []}
    assert store.apply(FILE).registry.model("llama3").enabled is False  # type: ignore[union-attr]


def test_changes_survive_reopening_the_database(tmp_path: Path) -> None:
    store = AdminStore(tmp_path / "s.db")
    store.add_model(
        ModelConfig(id="mistral", engine="vllm", endpoints=(EndpointConfig(id="m0", url="http://h:3"),))
    )
    store.add_endpoint("qwen2", EndpointConfig(id="q-c", url="http://127.0.0.1:4"))
    store.remove_endpoint("qwen2-0", from_file=True)
    store.set_flag("model", "llama3", "enabled", True)
    store.set_flag("endpoint", "q-b", "draining", True)
    store.close()

    reopened = AdminStore(tmp_path / "s.db")
    assert ids(reopened) == {"qwen2": ["q-b", "q-c"], "llama3": [], "mistral": ["m0"]}
    assert reopened.apply(FILE).registry.model("llama3").enabled is True  # type: ignore[union-attr]
    assert reopened.flags().draining_endpoints == {"q-b"}
    assert [e["action"] for e in reopened.audit()][:2] == ["endpoint.draining", "model.enabled"]


def test_removed_file_model_stays_removed_until_added_again() -> None:
    store = AdminStore(":memory:")
    store.remove_model("llama3", from_file=True)
    assert "llama3" not in ids(store)
    store.add_model(ModelConfig(id="llama3", engine="vllm"))
    assert "llama3" in ids(store)


def test_the_file_wins_a_name_clash() -> None:
    store = AdminStore(":memory:")
    store.add_model(ModelConfig(id="other", aliases=("qwen",), engine="vllm"))
    applied = store.apply(FILE)
    assert "other" not in [m.id for m in applied.registry.models]
    assert "skipped" in applied.warnings[0]


def test_endpoint_of_a_removed_model_is_skipped() -> None:
    store = AdminStore(":memory:")
    store.add_endpoint("ghost", EndpointConfig(id="g0", url="http://h:1"))
    applied = store.apply(FILE)
    assert "no model 'ghost'" in applied.warnings[0]


def test_an_invalid_result_is_a_config_error() -> None:
    store = AdminStore(":memory:")
    # Two admin endpoints may not share an id with each other's model either.
    store.add_model(ModelConfig(id="a", engine="vllm", endpoints=(EndpointConfig(id="x", url="http://h:1"),)))
    store.add_model(ModelConfig(id="b", engine="vllm", endpoints=(EndpointConfig(id="y", url="http://h:1"),)))
    store.add_endpoint("b", EndpointConfig(id="x2", url="http://h:2"))
    assert ids(store)["b"] == ["y", "x2"]
    with pytest.raises(ConfigError):
        parse_registry({"models": [{"id": "a", "engine": "tgi"}, {"id": "a", "engine": "tgi"}]})
