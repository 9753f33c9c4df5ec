"""Access-log entries of keyed requests as Envoy streams them: the key check's `gateway.key`, the model
name the client gave, the answer's status and error code, and the engine's token usage as
`ai_protocol_manager` publishes it (typed metadata: an `envoy.data.ai.v3.TokenUsage`, whose counts are
UInt64Value messages in fields 3 and 4), or `gateway.max_tokens` when there was none; and the usage
accounting over a fake key-table push and an injected clock."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from pathlib import Path

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import wrappers_pb2

from control_plane.config import parse_registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.state import KeyEntry
from control_plane.tenancy.keys import ApiKey, KeySettings
from control_plane.tenancy.publish import KeyPublisher
from control_plane.tenancy.usage import UsageAccounting, UsageSettings
from control_plane.tenancy.usage_store import SqliteUsageStore, UsageStore

TOKEN_USAGE_TYPE = "type.googleapis.com/envoy.data.ai.v3.TokenUsage"


def _length_delimited(number: int, payload: bytes) -> bytes:
    out = bytearray([(number << 3) | 2])
    length = len(payload)
    while True:
        byte = length & 0x7F
        length >>= 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes(out) + payload


def token_usage_bytes(prompt: int | None, completion: int | None) -> bytes:
    out = b""
    for number, value in ((3, prompt), (4, completion)):
        if value is not None:
            out += _length_delimited(number, wrappers_pb2.UInt64Value(value=value).SerializeToString())
    return out


def keyed_entry(
    key_id: str | None = "key_0123456789abcdef",
    key_name: str = "team-a",
    model: str | None = "qwen2",
    status: int = 200,
    code: str | None = None,
    prompt: int | None = None,
    completion: int | None = None,
    max_tokens: int | None = None,
    start: float = 0.0,
) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.response.response_code.value = status
    if code is not None:
        entry.response.response_headers["x-gateway-error-code"] = code
    gateway = entry.common_properties.metadata.filter_metadata["gateway"]
    if key_id is not None:
        gateway.update({"key": {"key_id": key_id, "key_name": key_name, "priority": "default"}})
    if model is not None:
        gateway.update({"model": model})
    if max_tokens is not None:
        gateway.update({"max_tokens": max_tokens})
    if prompt is not None or completion is not None:
        usage = entry.common_properties.metadata.typed_filter_metadata["envoy.ai.token_usage"]
        usage.type_url = TOKEN_USAGE_TYPE
        usage.value = token_usage_bytes(prompt, completion)
    if start:
        entry.common_properties.start_time.seconds = int(start)
        entry.common_properties.start_time.nanos = int((start % 1) * 1e9)
    return entry


T0 = float(calendar.timegm((2030, 6, 15, 12, 0, 30)))  # mid-month, mid-day, 30 s into a minute
REGISTRY = parse_registry(
    {
        "models": [
            {
                "id": "qwen2",
                "aliases": ["qwen"],
                "engine": "tgi",
                "endpoints": [{"url": "http://127.0.0.1:1"}],
            },
            {"id": "llama3", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:2"}]},
        ]
    }
)
KEY_A = "key_000000000000000a"
KEY_B = "key_000000000000000b"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def api_key(key_id: str, name: str, **settings: object) -> ApiKey:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    return ApiKey(key_id, KeySettings.model_validate({"name": name, **settings}), "0" * 64, None, at, at)


class Harness:
    def __init__(self, db: Path | str, clock: Clock, settings: UsageSettings | None = None) -> None:
        self.clock = clock
        self.tables: list[tuple[KeyEntry, ...]] = []
        self.metrics = ControlPlaneMetrics.create()
        self.store: UsageStore = SqliteUsageStore(db)

        async def push(entries: tuple[KeyEntry, ...]) -> None:
            self.tables.append(entries)

        self.publisher = KeyPublisher(push, clock=clock)
        self.usage = UsageAccounting(
            self.store, self.metrics, REGISTRY, self.publisher, settings or UsageSettings(), clock=clock
        )

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0
