"""Fixtures that run the simulator in-process on 127.0.0.1, on a free port.

No pytest-asyncio here: async tests call ``asyncio.run`` themselves and use the ``sim`` fixture, an
async context manager factory. ``threaded_sim`` runs a server on a background loop for sync clients.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

# ``pytest`` (unlike ``python -m pytest``) does not put the repository root on sys.path.
REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from backends.simulator.app import RunningServer, build_app, engine_of, start_server  # noqa: E402
from backends.simulator.config import make_config  # noqa: E402
from backends.simulator.engine import Engine  # noqa: E402

MODEL_ID = "qwen2"
ENDPOINT_ID = "qwen2-0"


@dataclass
class Sim:
    url: str
    app: web.Application
    engine: Engine
    exits: list[int] = field(default_factory=list)
    """Exit codes the ``crash`` knob asked for (the process is not really ended in tests)."""


def _config(engine: str, overrides: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {"profile": "fast"}
    kwargs.update(overrides)
    return make_config(
        engine, kwargs.pop("model_id", MODEL_ID), kwargs.pop("endpoint_id", ENDPOINT_ID), **kwargs
    )


@asynccontextmanager
async def run_sim(engine: str = "vllm", **overrides: Any) -> AsyncIterator[Sim]:
    """Start a simulator (``fast`` profile unless overridden) and stop it afterwards."""
    exits: list[int] = []
    app = build_app(_config(engine, overrides), exit_process=exits.append)
    server = await start_server(app, "127.0.0.1", 0)
    try:
        yield Sim(url=server.url, app=app, engine=engine_of(app), exits=exits)
    finally:
        await server.stop()


@contextmanager
def run_threaded_sim(engine: str = "vllm", **overrides: Any) -> Iterator[str]:
    """A simulator on its own event loop in a thread; yields its base URL."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, RunningServer] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        holder["server"] = loop.run_until_complete(
            start_server(build_app(_config(engine, overrides)), "127.0.0.1", 0)
        )
        ready.set()
        loop.run_forever()
        loop.run_until_complete(holder["server"].stop())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10), "simulator thread did not start"
    try:
        yield holder["server"].url
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture
def sim() -> Callable[..., AbstractAsyncContextManager[Sim]]:
    return run_sim


@pytest.fixture
def threaded_sim() -> Callable[..., AbstractContextManager[str]]:
    return run_threaded_sim
