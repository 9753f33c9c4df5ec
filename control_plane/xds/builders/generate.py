"""The Lua filter behind `POST /v1/generate` and served_model renaming, and its per-route data.

Envoy runs `generate.lua` (shipped next to this module) on every request that reached a model's route:
- `/v1/generate`: the seeds' request (`model_id`, `inputs`, `scenario`, `parameters`, `stream`) becomes a
  chat completion for the engine (so its chat template applies) and the answer becomes
  `{generated_text, model, tokens, finish_reason, usage}`; a stream is rewritten event by event as it
  passes (a chunk transform: the stream is never buffered).
- any other `/v1/...` request to a model with `served_model`: the body's top-level `model` value is
  replaced in place by the served name, so engines need not know the gateway's ids and aliases.

The Lua source is fixed (it lives in the listener and changes only with the code); what changes with the
registry (each model's engine, served name and scenarios) rides in the model routes' metadata, so a
registry change is an RDS update and never drains the listener.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2

from control_plane.config.schema import ModelConfig
from control_plane.xds.builders._common import struct

LUA_FILTER_NAME = "envoy.filters.http.lua"
GENERATE_PATH = "/v1/generate"
# Dynamic metadata namespace the filter writes (stream flag, scenario) for its response side and logs.
GENERATE_NAMESPACE = "gateway.generate"


@cache
def lua_source() -> str:
    """The filter's Lua code (read on first use, not at import)."""
    return resources.files("control_plane.xds.builders").joinpath("generate.lua").read_text(encoding="utf-8")


def build_lua_filter() -> lua_pb2.Lua:
    return lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=lua_source()))


def route_data(model: ModelConfig) -> dict[str, Any]:
    """What the Lua filter reads from a model route: see generate.lua."""
    data: dict[str, Any] = {
        "id": model.id,
        "engine": model.engine.value,
        "scenarios": {
            name: {"user": s.user, **({"system": s.system} if s.system is not None else {})}
            for name, s in sorted(model.generate_scenarios.items())
        },
    }
    if model.served_model:
        data["served_model"] = model.served_model
    return data


def route_metadata(model: ModelConfig) -> base_pb2.Metadata:
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[LUA_FILTER_NAME].CopyFrom(struct(route_data(model)))
    return metadata
