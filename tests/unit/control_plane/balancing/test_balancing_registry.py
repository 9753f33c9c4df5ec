"""Policy inputs from the registry: one group per model, static weights by endpoint id."""

from __future__ import annotations

import pytest

from control_plane.balancing.policy import WeightController, make_policy
from control_plane.balancing.registry import endpoint_groups, static_weights
from control_plane.config.schema import Registry
from control_plane.telemetry.signals import EndpointSignals

pytestmark = pytest.mark.unit

REGISTRY = Registry.model_validate(
    {
        "models": [
            {
                "id": "llama3",
                "engine": "vllm",
                "endpoints": [{"url": "http://a:1", "weight": 2}, {"id": "l-b", "url": "http://b:1"}],
            },
            {"id": "qwen2", "engine": "tgi", "endpoints": [{"url": "http://c:1"}, {"url": "http://d:1"}]},
        ]
    }
)


def test_groups_and_static_weights():
    assert endpoint_groups(REGISTRY) == {"llama3": ["llama3-0", "l-b"], "qwen2": ["qwen2-0", "qwen2-1"]}
    assert static_weights(REGISTRY) == {"llama3-0": 2, "l-b": 1, "qwen2-0": 1, "qwen2-1": 1}


def test_controller_over_the_registry():
    policy = make_policy("queue")
    assert policy is not None
    controller = WeightController(policy, clock=lambda: 10.0)
    signals = {
        "llama3-0": EndpointSignals(scraped_at=10.0, queue_depth=0),
        "l-b": EndpointSignals(scraped_at=10.0, queue_depth=0),
        "qwen2-0": EndpointSignals(scraped_at=10.0, queue_depth=0),
        "qwen2-1": EndpointSignals(scraped_at=10.0, queue_depth=12),
    }
    weights = controller.update(signals, static_weights(REGISTRY), groups=endpoint_groups(REGISTRY))
    assert weights == {"llama3-0": 100, "l-b": 50, "qwen2-0": 100, "qwen2-1": 25}
