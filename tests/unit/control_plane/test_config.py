"""Registry validation: good files load, bad ones are refused with the path of every problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from control_plane.config import load_registry, parse_registry
from control_plane.errors import ConfigError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]


def problems_of(doc: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_registry(doc, "test.yaml")
    return info.value.problems


def test_the_shipped_registry_is_valid() -> None:
    registry = load_registry(REPO / "models.yaml")
    assert [m.id for m in registry.models] == ["qwen2", "llama3", "bge-m3", "bge-reranker-v2-m3"]
    assert {m.engine.value for m in registry.models} == {"tgi", "vllm", "tei"}
    assert registry.model("qwen").id == "qwen2"  # type: ignore[union-attr]
    assert registry.models[1].endpoint_id(1) == "llama3-vllm-1"


def test_defaults_fill_in() -> None:
    registry = parse_registry(
        {"models": [{"id": "m", "engine": "vllm", "endpoints": [{"url": "http://10.0.0.1:8000"}]}]}
    )
    model = registry.models[0]
    assert model.endpoint_id(0) == "m-0"
    assert model.endpoints[0].host == "10.0.0.1" and model.endpoints[0].port == 8000
    assert model.limits.request_timeout_s == 600 and model.retry.attempts == 2
    assert registry.gateway.listen_port == 8080 and not registry.gateway.expose_upstream_host


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            {"models": [{"id": "m", "engine": "tgi", "endpoints": [{"url": "http://h"}]}]},
            "models[0].endpoints[0].url: must name a port",
        ),
        (
            {"models": [{"id": "m", "engine": "tgi", "endpoints": [{"url": "ftp://h:1"}]}]},
            "models[0].endpoints[0].url: must start with http://",
        ),
        (
            {"models": [{"id": "m", "engine": "tgi", "endpoints": [{"url": "http://h:1/v1"}]}]},
            "models[0].endpoints[0].url: must be a bare base URL",
        ),
        (
            {"models": [{"id": "m", "engine": "tgi", "endpoints": [{"url": "http://h:99999"}]}]},
            "models[0].endpoints[0].url: has an invalid port",
        ),
        ({"models": [{"id": "m", "engine": "llamacpp"}]}, "models[0].engine: Input should be"),
        ({"models": [{"id": "has space", "engine": "tgi"}]}, "models[0].id: must be 1-200 characters"),
        ({"models": [{"engine": "tgi"}]}, "models[0].id: Field required"),
        (
            {"models": [{"id": "m", "engine": "tgi", "endpoints": [{"url": "http://h:1", "wieght": 2}]}]},
            "models[0].endpoints[0].wieght: Extra inputs are not permitted",
        ),
        (
            {"models": [{"id": "m", "engine": "tgi", "endpoints": [{"url": "http://h:1", "weight": 0}]}]},
            "models[0].endpoints[0].weight: Input should be greater than or equal to 1",
        ),
        (
            {"models": [{"id": "m", "engine": "tgi", "limits": {"max_concurrent_requests": 0}}]},
            "models[0].limits.max_concurrent_requests: Input should be greater than or equal to 1",
        ),
        (
            {"models": [{"id": "m", "engine": "tgi", "cluster_overrides": {"no_such_field": 1}}]},
            "models[0].cluster_overrides: not a valid Envoy Cluster fragment",
        ),
        ({"gateway": {"listen_port": 0}}, "gateway.listen_port: Input should be greater than or equal to 1"),
        (
            {"models": [{"id": "a", "engine": "tgi"}, {"id": "b", "engine": "tgi", "aliases": ["a"]}]},
            "models[1].aliases[0]: name 'a' is already used by models[0].id",
        ),
        (
            {
                "models": [
                    {"id": "a", "engine": "tgi", "endpoints": [{"id": "x", "url": "http://h:1"}]},
                    {"id": "b", "engine": "tgi", "endpoints": [{"id": "x", "url": "http://h:2"}]},
                ]
            },
            "models[1].endpoints[0].id: endpoint id 'x' is already used by models[0].endpoints[0].id",
        ),
        ([1, 2], "top level must be a mapping"),
    ],
)
def test_invalid_documents_name_the_field(doc: object, expected: str) -> None:
    problems = problems_of(doc)
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of(
        {"models": [{"id": "a", "engine": "nope"}, {"id": "b", "engine": "tgi", "endpoints": [{"url": "x"}]}]}
    )
    assert len(problems) == 2
    assert problems[0].startswith("models[0].engine") and problems[1].startswith("models[1].endpoints[0].url")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read file"):
        load_registry(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_registry(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="the document is empty"):
        load_registry(empty)
    assert load_registry(empty, allow_empty=True).models == ()  # forced (serve --allow-empty)


def test_error_message_lists_the_source_and_paths(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        yaml.safe_dump({"models": [{"id": "m", "engine": "tgi", "endpoints": [{"url": "http://h"}]}]})
    )
    with pytest.raises(ConfigError) as info:
        load_registry(path)
    assert str(path) in str(info.value)
    assert "models[0].endpoints[0].url" in str(info.value)


def test_default_endpoint_ids_are_fit_for_urls() -> None:
    registry = parse_registry(
        {
            "models": [
                {"id": "meta-llama/Llama-3.1-8B", "engine": "vllm", "endpoints": [{"url": "http://h:1"}]}
            ]
        }
    )
    assert registry.models[0].endpoint_id(0) == "meta-llama-Llama-3.1-8B-0"
