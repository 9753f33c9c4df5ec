"""The Lua filter behind `POST /v1/generate` and served_model renaming, and its per-route data.

`generate.lua` (shipped next to this module) runs as two filters, each entered only where it is needed
(Envoy runs a Lua filter's coroutines for every request it enters, about 20 µs of CPU each time, see
docs/benchmarks.md):
- the generate filter, wrapped in a matcher that skips it unless the path is `/v1/generate`: the seeds'
  request (`model_id`, `inputs`, `scenario`, `parameters`, `stream`) becomes a
  chat completion for the engine (so its chat template applies) and the answer becomes
  `{generated_text, model, tokens, finish_reason, usage}`; a stream is rewritten event by event as it
  passes (a chunk transform: the stream is never buffered).
- the rename filter, enabled only on the routes of models with `served_model` (per-route config naming
  its code; the name itself in the route's metadata): the body's top-level `model` value is replaced in
  place by the served name, so engines need not know the gateway's ids and aliases.

The Lua source is fixed (it lives in the listener and changes only with the code); what changes with the
registry (each model's engine, served name and scenarios) rides in the model routes' metadata, so a
registry change is an RDS update and never drains the listener.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.common.matcher.action.v3 import skip_action_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from google.protobuf import any_pb2, message
from xds.core.v3 import extension_pb2 as xds_extension_pb2
from xds.type.matcher.v3 import matcher_pb2, regex_pb2, string_pb2

from control_plane.config.schema import ModelConfig
from control_plane.xds.builders._common import struct

LUA_FILTER_NAME = "envoy.filters.http.lua"  # the generate filter (route metadata is read under it)
RENAME_FILTER_NAME = "gateway.served_model"
_RENAME_CODE = "rename"
GENERATE_PATH = "/v1/generate"
# Dynamic metadata namespace the filter writes (stream flag, scenario) for its response side and logs.
GENERATE_NAMESPACE = "gateway.generate"


@cache
def lua_source() -> str:
    """The filter's Lua code (read on first use, not at import)."""
    return resources.files("control_plane.xds.builders").joinpath("generate.lua").read_text(encoding="utf-8")


def _packed(msg: message.Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def build_generate_filter() -> extension_matcher_pb2.ExtensionWithMatcher:
    """The generate filter, skipped (no Lua coroutine at all) unless the path is /v1/generate."""
    not_generate = matcher_pb2.Matcher.MatcherList.Predicate(
        not_matcher=matcher_pb2.Matcher.MatcherList.Predicate(
            single_predicate=matcher_pb2.Matcher.MatcherList.Predicate.SinglePredicate(
                input=xds_extension_pb2.TypedExtensionConfig(
                    name="path",
                    typed_config=_packed(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=":path")),
                ),
                value_match=string_pb2.StringMatcher(
                    safe_regex=regex_pb2.RegexMatcher(
                        google_re2=regex_pb2.RegexMatcher.GoogleRE2(), regex=f"^{GENERATE_PATH}(\\?.*)?$"
                    )
                ),
            )
        )
    )
    skip = matcher_pb2.Matcher.OnMatch(
        action=xds_extension_pb2.TypedExtensionConfig(
            name="skip", typed_config=_packed(skip_action_pb2.SkipFilter())
        )
    )
    return extension_matcher_pb2.ExtensionWithMatcher(
        xds_matcher=matcher_pb2.Matcher(
            matcher_list=matcher_pb2.Matcher.MatcherList(
                matchers=[matcher_pb2.Matcher.MatcherList.FieldMatcher(predicate=not_generate, on_match=skip)]
            )
        ),
        extension_config=extension_pb2.TypedExtensionConfig(
            name=LUA_FILTER_NAME,
            typed_config=_packed(
                lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=lua_source()))
            ),
        ),
    )


def build_rename_filter() -> lua_pb2.Lua:
    """The rename filter: no default code, so Envoy enters it only on routes that name its code."""
    code = "RENAME_ONLY = true\n" + lua_source()
    return lua_pb2.Lua(source_codes={_RENAME_CODE: base_pb2.DataSource(inline_string=code)})


def rename_per_route(model: ModelConfig) -> dict[str, any_pb2.Any]:
    """The route's per-filter config enabling the rename filter, for a model with served_model."""
    if not model.served_model:
        return {}
    return {RENAME_FILTER_NAME: _packed(lua_pb2.LuaPerRoute(name=_RENAME_CODE))}


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
    if model.served_model:  # the rename filter reads it under its own name
        metadata.filter_metadata[RENAME_FILTER_NAME].CopyFrom(struct({"served_model": model.served_model}))
    return metadata
