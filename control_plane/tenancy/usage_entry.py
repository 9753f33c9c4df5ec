"""One keyed request as the usage accounting sees it, read from Envoy's access-log entry.

With API keys on, every request that passed the key check carries the key under the `gateway` metadata
namespace (`key`: key_id, key_name, priority; keys.lua), and every request Envoy refused carries the
refusal's code. Token counts come from two places:
- `ai_protocol_manager` (builders/usage.py) reads the engine's own usage out of JSON answers and of the
  usage chunk of streams, and publishes it at the end of the stream as typed metadata
  (`envoy.data.ai.v3.TokenUsage`, which the Python protos lack: decoded here from its wire format);
- the /v1/generate filter's `gateway.generate` counts (its response is rewritten before the access log).
A stream whose client did not ask for usage has none: it is charged its `max_tokens` (or
`max_completion_tokens`, read from the request body into `gateway.max_tokens`), the most it may have
produced, and flagged `estimated`.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.xds.builders.generate import GENERATE_NAMESPACE
from control_plane.xds.builders.usage import MAX_TOKENS_KEY, TOKEN_USAGE_NAMESPACE
from control_plane.xds.log_entries import metadata_fields, number_field, string_field
from control_plane.xds.resources import METADATA_NAMESPACE

_TOKEN_USAGE_INPUT, _TOKEN_USAGE_OUTPUT = 3, 4  # envoy.data.ai.v3.TokenUsage field numbers (UInt64Value)


@dataclass(frozen=True)
class KeyedRequest:
    key_id: str
    key_name: str
    model: str  # the model as the client named it (an id or alias), "" if none
    status: int
    code: str  # "ok", or the error code the client got (x-gateway-error-code), or "upstream_error"
    prompt_tokens: int
    completion_tokens: int
    estimated: bool  # completion tokens are the request's max_tokens, not the engine's count
    start_time: float  # epoch seconds


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> dict[int, bytes | int]:
    """Top-level fields of a protobuf message (last one wins), enough for TokenUsage's counts."""
    out: dict[int, bytes | int] = {}
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            out[number], pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            out[number] = data[pos : pos + length]
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


def token_usage(value: bytes) -> tuple[int | None, int | None]:
    """(input, output) tokens of a serialized envoy.data.ai.v3.TokenUsage; None where absent."""
    fields = _fields(value)

    def count(number: int) -> int | None:
        wrapper = fields.get(number)
        if not isinstance(wrapper, bytes):
            return None
        inner = _fields(wrapper).get(1, 0)  # UInt64Value.value; absent means 0
        return inner if isinstance(inner, int) else None

    return count(_TOKEN_USAGE_INPUT), count(_TOKEN_USAGE_OUTPUT)


def keyed_request(entry: accesslog_pb2.HTTPAccessLogEntry) -> KeyedRequest | None:
    """The entry as a keyed request, or None when no key passed the check (a refusal: 401)."""
    gateway = metadata_fields(entry, METADATA_NAMESPACE)
    key = gateway.get("key")
    if key is None or key.WhichOneof("kind") != "struct_value":
        return None
    key_fields = dict(key.struct_value.fields)
    key_id = string_field(key_fields, "key_id")
    if key_id is None:
        return None
    prompt: int | None = None
    completion: int | None = None
    typed = entry.common_properties.metadata.typed_filter_metadata.get(TOKEN_USAGE_NAMESPACE)
    if typed is not None:
        try:
            prompt, completion = token_usage(typed.value)
        except ValueError:
            prompt = completion = None
    generate = metadata_fields(entry, GENERATE_NAMESPACE)
    if completion is None and "completion_tokens" in generate:
        prompt = int(number_field(generate, "prompt_tokens") or 0)
        completion = int(number_field(generate, "completion_tokens") or 0)
    status = entry.response.response_code.value
    estimated = False
    if completion is None:
        max_tokens = number_field(gateway, MAX_TOKENS_KEY)
        if 200 <= status < 300 and max_tokens:
            completion, estimated = int(max_tokens), True
    code = entry.response.response_headers.get("x-gateway-error-code", "")
    if not code:
        code = "ok" if status < 400 else "upstream_error"
    start = entry.common_properties.start_time
    return KeyedRequest(
        key_id=key_id,
        key_name=string_field(key_fields, "key_name") or key_id,
        model=string_field(gateway, "model") or "",
        status=status,
        code=code,
        prompt_tokens=prompt or 0,
        completion_tokens=completion or 0,
        estimated=estimated,
        start_time=start.seconds + start.nanos / 1e9,
    )
