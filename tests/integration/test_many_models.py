"""A registry of a hundred models is accepted by Envoy whole: the /v1/models answer outgrows Envoy's
default 4 KiB limit on direct responses, which the route configuration raises."""

from __future__ import annotations

import httpx
import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory
from tests.support.gateway import chat, prometheus_value
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

MODELS = 100


def test_a_hundred_models_are_routed_and_listed(make_stack: StackFactory) -> None:
    port = free_port()
    # Only the first model gets a live (simulated) server; the others point at a closed port.
    models = [model("org/first-model-8B-Instruct", "vllm", [port], aliases=["first"])]
    models += [
        model(f"org/model-{i:03d}-7B-Instruct-GPTQ-Int4", "vllm", [free_port()], aliases=[f"alias-{i:03d}"])
        for i in range(1, MODELS)
    ]
    stack = make_stack(registry(*models), start=False)
    model_doc = stack.registry().models[0]
    stack.start_simulator(model_doc, 0)
    stack.start_control_plane()
    stack.start_envoy()
    url = stack.envoys[0].url
    with httpx.Client(timeout=10) as client:
        listed = client.get(f"{url}/v1/models")
        assert listed.status_code == 200 and len(listed.content) > 4096
        assert len(listed.json()["data"]) == MODELS
        assert chat(client, url, "first").status_code == 200
        assert chat(client, url, "alias-042").status_code == 503  # routed to its (dead) servers
        assert chat(client, url, "nope").status_code == 404
        assert (
            prometheus_value(client, f"{stack.admin_url}/metrics", "llm_gateway_xds_nacks_total", type="rds")
            == 0
        )
