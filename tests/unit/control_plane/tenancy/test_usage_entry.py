"""A keyed request read from an access-log entry: key, tokens from Envoy's typed TokenUsage (decoded from
its wire format), from the generate filter, or the request's max_tokens when the engine reported none."""

from __future__ import annotations

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import wrappers_pb2

from control_plane.tenancy.usage_entry import keyed_request, token_usage

pytestmark = pytest.mark.unit


def _usage_bytes(prompt: int | None, completion: int | None) -> bytes:
    out = b"\x12\x01m"  # field 2 (model): "m"
    for number, value in ((3, prompt), (4, completion)):
        if value is not None:
            inner = wrappers_pb2.UInt64Value(value=value).SerializeToString()
            out += bytes([number << 3 | 2, len(inner)]) + inner
    return out + b"\x48\x01"  # field 9 (extraction_status): COMPLETE


def _entry(status: int = 200, **gateway: object) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.response.response_code.value = status
    entry.common_properties.metadata.filter_metadata["gateway"].update(
        {"model": "qwen", "key": {"key_id": "key_1", "key_name": "team-a"}, **gateway}
    )
    entry.common_properties.start_time.FromSeconds(1_800_000_000)
    return entry


def test_token_usage_wire_format() -> None:
    assert token_usage(_usage_bytes(12, 30)) == (12, 30)
    assert token_usage(_usage_bytes(None, 0)) == (None, 0)
    with pytest.raises(ValueError):
        token_usage(b"\x1a\x05\x08")  # a length past the end... then a truncated varint


def test_keyed_request_from_each_source() -> None:
    entry = _entry()
    usage = entry.common_properties.metadata.typed_filter_metadata["envoy.ai.token_usage"]
    usage.type_url = "type.googleapis.com/envoy.data.ai.v3.TokenUsage"
    usage.value = _usage_bytes(12, 30)
    request = keyed_request(entry)
    assert request is not None
    assert (request.key_id, request.key_name, request.model, request.code) == (
        "key_1",
        "team-a",
        "qwen",
        "ok",
    )
    assert (request.prompt_tokens, request.completion_tokens, request.estimated) == (12, 30, False)
    assert request.start_time == 1_800_000_000

    generated = _entry()
    generated.common_properties.metadata.filter_metadata["gateway.generate"].update(
        {"prompt_tokens": 5, "completion_tokens": 7}
    )
    assert keyed_request(generated).completion_tokens == 7  # type: ignore[union-attr]

    no_usage = keyed_request(_entry(max_tokens=64))  # a stream whose client asked for no usage
    assert no_usage is not None and (no_usage.completion_tokens, no_usage.estimated) == (64, True)
    refused = _entry(429)
    refused.response.response_headers["x-gateway-error-code"] = "rate_limit_exceeded"
    assert keyed_request(refused).code == "rate_limit_exceeded"  # type: ignore[union-attr]
    assert keyed_request(_entry(500)).code == "upstream_error"  # type: ignore[union-attr]


def test_an_entry_without_a_key_is_not_keyed() -> None:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.response.response_code.value = 401
    assert keyed_request(entry) is None
