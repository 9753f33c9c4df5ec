"""Load reports through a real Envoy: the control plane learns, over LRS, how many requests are in flight on
each endpoint (streams included), without touching Envoy's admin port."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from control_plane.devstack.procs import free_port
from control_plane.devstack.stack import LocalStack
from tests.integration.conftest import StackFactory
from tests.support.gateway import eventually
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

STREAMS = 5
TOKENS = 20
MS_PER_TOKEN = 200  # 20 tokens at 200 ms: each stream lasts about 4 s


def admin_headers(stack: LocalStack) -> dict[str, str]:
    """The load routes sit behind the admin API's bearer token."""
    return {"authorization": f"Bearer {stack.settings.admin_token}"}


def load(client: httpx.Client, admin_url: str) -> dict[str, Any]:
    response = client.get(f"{admin_url}/admin/load")
    response.raise_for_status()
    return dict(response.json())


def endpoint_load(client: httpx.Client, admin_url: str, address: str) -> dict[str, Any]:
    response = client.get(f"{admin_url}/admin/load/{address}")
    response.raise_for_status()
    return dict(response.json())


async def run_streams(url: str, started: asyncio.Event) -> list[tuple[int, int]]:
    """STREAMS concurrent streaming chats; `started` is set once every one has its response headers.
    Returns (status, number of SSE data events) per stream."""
    body = {
        "model": "qwen2",
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": TOKENS,
        "stream": True,
    }
    headers_in = 0

    async def one(client: httpx.AsyncClient) -> tuple[int, int]:
        nonlocal headers_in
        events = 0
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            headers_in += 1
            if headers_in == STREAMS:
                started.set()
            async for line in response.aiter_lines():
                events += line.startswith("data: ")
        return response.status_code, events

    limits = httpx.Limits(max_connections=STREAMS * 2)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        return list(await asyncio.gather(*(one(client) for _ in range(STREAMS))))


def test_streams_in_flight_are_reported_then_return_to_zero(make_stack: StackFactory) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    stack = make_stack(
        registry(model("qwen2", "tgi", [port])),
        sim_extra_args={"qwen2-0": ["--decode-ms-per-token", str(MS_PER_TOKEN)]},
    )
    node = stack.envoys[0].node_id
    admin = stack.admin_url
    with httpx.Client(timeout=5, headers=admin_headers(stack)) as client:
        # Envoy reports from the moment it connects; a cluster is reported from the report period after it
        # was created, so wait for one report beyond the first to have the model's cluster covered.
        def reporting() -> bool:
            nodes = load(client, admin)["nodes"]
            return node in nodes and nodes[node]["fresh"] and nodes[node]["reports"] >= 2

        eventually(reporting, timeout_s=10, what="Envoy's load reports")
        before = endpoint_load(client, admin, address)
        assert before["in_flight"] == 0
        assert before["fresh_nodes"] == [node]

        async def scenario() -> tuple[float, list[tuple[int, int]], dict[str, Any]]:
            started = asyncio.Event()
            streams = asyncio.create_task(run_streams(stack.envoys[0].url, started))
            await asyncio.wait_for(started.wait(), 10)
            started_at = time.monotonic()
            seen: dict[str, Any] = {}
            async with httpx.AsyncClient(timeout=5, headers=admin_headers(stack)) as admin_client:
                while time.monotonic() - started_at < 3.0 and not streams.done():
                    response = await admin_client.get(f"{admin}/admin/load/{address}")
                    seen = response.json()
                    if seen["in_flight"] == STREAMS:
                        break
                    await asyncio.sleep(0.05)
            seen_after = time.monotonic() - started_at
            return seen_after, await streams, seen

        seen_after, results, seen = asyncio.run(scenario())
        # The streams last about 4 s; their load shows within about one report interval (1 s).
        assert seen.get("in_flight") == STREAMS, seen
        assert seen["in_flight_by_node"] == {node: STREAMS}
        assert seen_after < 2.2, seen_after
        assert all(status == 200 and events >= TOKENS for status, events in results), results

        # Finished streams leave the next report: back to 0 within about one interval.
        finished_at = time.monotonic()
        eventually(
            lambda: endpoint_load(client, admin, address)["in_flight"] == 0,
            timeout_s=3,
            what="in-flight back to 0",
        )
        assert time.monotonic() - finished_at < 2.5
        snapshot = load(client, admin)
        assert snapshot["nodes"][node]["fresh"] is True
        assert snapshot["endpoints"][address]["in_flight_by_node"] == {node: 0}

        # Counters are deltas added up by the store: a few more plain requests show up in the totals.
        issued_before = endpoint_load(client, admin, address)["issued_total"]
        for _ in range(3):
            body = {"model": "qwen2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
            assert client.post(f"{stack.envoys[0].url}/v1/chat/completions", json=body).status_code == 200
        eventually(
            lambda: endpoint_load(client, admin, address)["issued_total"] >= issued_before + 3,
            timeout_s=3,
            what="issued requests counted",
        )
        assert endpoint_load(client, admin, address)["successful_total"] >= 3


def test_a_stopped_envoy_stops_counting(make_stack: StackFactory) -> None:
    port = free_port()
    stack = make_stack(registry(model("qwen2", "tgi", [port])))
    second = stack.start_envoy()
    assert httpx.get(f"{stack.admin_url}/admin/load", timeout=5).status_code == 401  # admin token needed
    with httpx.Client(timeout=5, headers=admin_headers(stack)) as client:
        eventually(
            lambda: (
                set(endpoint_load(client, stack.admin_url, f"127.0.0.1:{port}")["fresh_nodes"])
                == {stack.envoys[0].node_id, second.node_id}
            ),
            timeout_s=10,
            what="both Envoys reporting",
        )
        second.process.stop()
        eventually(
            lambda: (
                endpoint_load(client, stack.admin_url, f"127.0.0.1:{port}")["fresh_nodes"]
                == [stack.envoys[0].node_id]
            ),
            timeout_s=5,
            what="the stopped Envoy dropped from the fresh nodes",
        )
