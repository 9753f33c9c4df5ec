"""Fallback lists in the registry (known models, not itself, no cycle: errors naming the path) and the
choice of the fallback a model's requests go to."""

from __future__ import annotations

from typing import Any

import pytest

from control_plane.config import parse_registry
from control_plane.errors import ConfigError
from control_plane.overload.fallback import choose_fallbacks
from control_plane.state import Health, StateInputs, build_state

pytestmark = pytest.mark.unit


def _model(model_id: str, *fallbacks: str, port: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "engine": "vllm",
        "endpoints": [{"url": f"http://127.0.0.1:{port}"}],
        "fallbacks": list(fallbacks),
        **extra,
    }


def _problems(*models: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as error:
        parse_registry({"models": list(models)})
    return str(error.value)


def test_unknown_self_and_twice_name_their_path() -> None:
    text = _problems(_model("a", "nope", "a", "b", "b"), _model("b", port=2))
    assert "models[0].fallbacks[0]: no model is named 'nope'" in text
    assert "models[0].fallbacks[1]: a model cannot fall back to itself ('a')" in text
    assert "models[0].fallbacks[3]: 'b' is listed twice" in text


def test_a_cycle_is_refused_with_its_path() -> None:
    text = _problems(_model("a", "b"), _model("b", "c", port=2), _model("c", "a-alias", port=3))
    # An alias counts as its model.
    assert "no model is named 'a-alias'" in text
    text = _problems(
        _model("a", "b"),
        _model("b", "c", port=2),
        _model("c", "x", port=3, aliases=["x"]) | {"fallbacks": ["a"]},
    )
    assert "models[2].fallbacks[0]: fallbacks form a cycle (a → b → c → a)" in text


def test_aliases_and_chains_are_accepted() -> None:
    registry = parse_registry(
        {"models": [_model("a", "bee"), _model("b", "c", port=2, aliases=["bee"]), _model("c", port=3)]}
    )
    assert registry.models[0].fallbacks == ("bee",)


def _state(health: dict[str, Health], saturation: dict[str, int] | None = None) -> Any:
    registry = parse_registry(
        {
            "models": [
                _model("a", "b", "c"),
                _model("b", "c", port=2),
                _model("c", port=3),
                _model("off", "c", port=4, enabled=False),
            ]
        }
    )
    inputs = StateInputs(health=health, saturation=saturation or {})
    return build_state(registry, lambda host: host, inputs)


def test_the_first_available_unsaturated_fallback_is_chosen() -> None:
    down = Health.UNHEALTHY
    assert _state({}).fallbacks == ()  # every endpoint not probed yet: routable
    assert _state({"a-0": down}).fallbacks == (("a", "b"),)
    assert _state({"a-0": down, "b-0": down}).fallbacks == (("a", "c"), ("b", "c"))
    assert _state({"a-0": down}, {"b": 1}).fallbacks == (("a", "c"), ("b", "c"))  # b saturated too
    assert _state({}, {"a": 2}).fallbacks == (("a", "b"),)
    # No fallback can take them: the model keeps its route. A disabled model keeps its 503.
    assert _state({"a-0": down, "b-0": down, "c-0": down}).fallbacks == ()
    assert _state({"a-0": down}, {"b": 1, "c": 1}).fallbacks == ()
    assert ("off", "c") not in _state({"off-0": down}).fallbacks


def test_choose_fallbacks_follows_one_hop_only() -> None:
    state = _state({"a-0": Health.UNHEALTHY, "b-0": Health.DRAINING, "c-0": Health.UNHEALTHY})
    # b's own fallback (c) is not followed for a: a's list is b, c, both unavailable.
    assert choose_fallbacks(state.models, {}) == ()
