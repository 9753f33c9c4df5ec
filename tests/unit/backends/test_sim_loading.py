"""The simulator's loading phase (`--load-time-s`) and fixed memory footprint (`--memory-mb`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest

from backends.simulator.cli import build_parser, config_from_args

pytestmark = pytest.mark.unit

CHAT = {"model": "qwen2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def fb_used(metrics: str) -> float:
    line = next(x for x in metrics.splitlines() if x.startswith("DCGM_FI_DEV_FB_USED{"))
    return float(line.rsplit(" ", 1)[1])


def test_loading_answers_503(sim: Callable[..., AbstractAsyncContextManager[Any]]) -> None:
    async def run() -> None:
        async with sim("vllm", load_time_s=60) as s, httpx.AsyncClient(base_url=s.url) as client:
            assert (await client.get("/health")).status_code == 503
            chat = await client.post("/v1/chat/completions", json=CHAT)
            assert chat.status_code == 503 and chat.json()["message"] == "model loading"
            assert (await client.get("/v1/models")).status_code == 503
            assert (await client.get("/metrics")).status_code == 200  # scraping works while loading
            assert (await client.get("/sim/state")).status_code == 200

    asyncio.run(run())


def test_loaded_after_the_load_time(sim: Callable[..., AbstractAsyncContextManager[Any]]) -> None:
    async def run() -> None:
        started = time.monotonic()  # the load time counts from the app's creation, inside `sim`
        async with sim("vllm", load_time_s=0.5) as s, httpx.AsyncClient(base_url=s.url) as client:
            for _ in range(100):  # bounded: 10 s
                if (await client.get("/health")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert time.monotonic() - started >= 0.5
            assert (await client.get("/health")).status_code == 200
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200

    asyncio.run(run())


def test_tei_loading_error_in_tei_shape(sim: Callable[..., AbstractAsyncContextManager[Any]]) -> None:
    async def run() -> None:
        async with sim("tei", load_time_s=30) as s, httpx.AsyncClient(base_url=s.url) as client:
            r = await client.post("/embed", json={"inputs": "hello"})
            assert r.status_code == 503
            assert r.json() == {"error": "model loading", "error_type": "model_loading"}

    asyncio.run(run())


def test_memory_mb_is_the_reported_gpu_memory(sim: Callable[..., AbstractAsyncContextManager[Any]]) -> None:
    args = build_parser().parse_args(["--engine", "vllm", "--model-id", "qwen2", "--memory-mb", "30000"])
    config = config_from_args(args)
    assert config.gpu.reserved_mib == 30000 and config.gpu.total_mib >= 30000

    async def run() -> None:
        async with sim("vllm", gpu=config.gpu) as s, httpx.AsyncClient(base_url=s.url) as client:
            assert fb_used((await client.get("/metrics")).text) == 30000
        async with sim("vllm") as s, httpx.AsyncClient(base_url=s.url) as client:
            assert fb_used((await client.get("/metrics")).text) != 30000  # default: follows the load

    asyncio.run(run())


def test_cli_defaults_and_refusals() -> None:
    parser = build_parser()
    config = config_from_args(parser.parse_args(["--engine", "tgi", "--model-id", "m"]))
    assert config.load_time_s == 0 and config.gpu.reserved_mib == 0
    for bad in (["--load-time-s", "-1"], ["--memory-mb", "-5"]):
        with pytest.raises(ValueError, match="must be >= 0"):
            config_from_args(parser.parse_args(["--engine", "tgi", "--model-id", "m", *bad]))
