"""One probe of one endpoint: the engine's health call, then which model it really serves.

The calls per engine are data: a health path, and where the served model's name is found.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import aiohttp

from control_plane.config.schema import EngineKind, HealthCheck, ModelConfig


@dataclass(frozen=True)
class ModelInfoCall:
    path: str
    kind: str  # "model_id": {"model_id": ...}; "model_list": {"data": [{"id": ...}, ...]}


HEALTH_PATH = {
    EngineKind.TGI: "/health",
    EngineKind.VLLM: "/health",
    EngineKind.SGLANG: "/health",
    EngineKind.TEI: "/health",
}
MODEL_INFO = {
    EngineKind.TGI: ModelInfoCall("/info", "model_id"),
    EngineKind.TEI: ModelInfoCall("/info", "model_id"),
    EngineKind.VLLM: ModelInfoCall("/v1/models", "model_list"),
    EngineKind.SGLANG: ModelInfoCall("/v1/models", "model_list"),
}


@dataclass(frozen=True)
class ProbeTarget:
    endpoint_id: str
    base_url: str
    model: ModelConfig
    check: HealthCheck


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str = ""
    wrong_model: bool = False


def _reported_models(kind: str, body: Any) -> list[str]:
    if kind == "model_id" and isinstance(body, dict) and isinstance(body.get("model_id"), str):
        return [body["model_id"]]
    if kind == "model_list" and isinstance(body, dict) and isinstance(body.get("data"), list):
        return [str(item["id"]) for item in body["data"] if isinstance(item, dict) and "id" in item]
    return []


async def probe(session: aiohttp.ClientSession, target: ProbeTarget) -> ProbeResult:
    timeout = aiohttp.ClientTimeout(total=target.check.timeout_s)
    engine = target.model.engine
    try:
        async with session.get(target.base_url + HEALTH_PATH[engine], timeout=timeout) as response:
            if response.status != 200:
                return ProbeResult(False, f"{HEALTH_PATH[engine]} answered {response.status}")
        if not target.check.check_model:
            return ProbeResult(True)
        call = MODEL_INFO[engine]
        async with session.get(target.base_url + call.path, timeout=timeout) as response:
            if response.status != 200:
                return ProbeResult(False, f"{call.path} answered {response.status}")
            body = await response.json(content_type=None)
    except TimeoutError:
        return ProbeResult(False, f"no answer within {target.check.timeout_s:g}s")
    except aiohttp.ClientError as exc:
        return ProbeResult(False, f"unreachable: {exc.__class__.__name__}: {exc}"[:200])
    except ValueError:
        return ProbeResult(False, f"{MODEL_INFO[engine].path} did not answer JSON")
    reported = _reported_models(MODEL_INFO[engine].kind, body)
    if not any(target.model.serves(name) for name in reported):
        expected = target.model.served_model or " or ".join(target.model.names)
        return ProbeResult(
            False, f"serves {', '.join(reported) or 'no model'}, expected {expected}", wrong_model=True
        )
    return ProbeResult(True)


async def cancel_quietly(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
