"""Every name that reaches Envoy config, a header or an admin URL is checked with full-match rules: a
control character anywhere (a trailing newline included, which `re.match` with `$` lets through) is
refused, in the registry and in admin path parameters alike."""

from __future__ import annotations

from typing import Any

import pytest

from control_plane.admin.operations import valid_endpoint_id, valid_model_name
from control_plane.config import parse_registry
from control_plane.errors import ConfigError, InvalidNameError, NotFoundError

pytestmark = pytest.mark.unit

CONTROL = ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85"]


def bad_variants(name: str) -> list[str]:
    """The name with each control character at its end and in its middle."""
    middle = len(name) // 2
    return [v for ch in CONTROL for v in (name + ch, name[:middle] + ch + name[middle:])]


def doc(**model: Any) -> dict[str, Any]:
    base = {"id": "qwen2", "engine": "tgi", "endpoints": [{"url": "http://127.0.0.1:8000"}]}
    return {"models": [{**base, **model}]}


def refused(document: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_registry(document)
    assert any(p.startswith(where) for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("name", bad_variants("qwen2"))
def test_model_id_with_a_control_character_is_refused(name: str) -> None:
    refused(doc(id=name), "models[0].id")


@pytest.mark.parametrize("name", bad_variants("qwen"))
def test_alias_with_a_control_character_is_refused(name: str) -> None:
    refused(doc(aliases=["ok", name]), "models[0].aliases")


@pytest.mark.parametrize("name", bad_variants("qwen2-0"))
def test_endpoint_id_with_a_control_character_is_refused(name: str) -> None:
    refused(doc(endpoints=[{"id": name, "url": "http://127.0.0.1:8000"}]), "models[0].endpoints[0].id")


@pytest.mark.parametrize("name", bad_variants("x-model-id"))
def test_model_header_with_a_control_character_is_refused(name: str) -> None:
    refused({**doc(), "gateway": {"model_header": name}}, "gateway.model_header")


@pytest.mark.parametrize("field", ["owned_by", "served_model"])
@pytest.mark.parametrize("text", bad_variants("acme corp"))
def test_free_text_names_refuse_control_characters(field: str, text: str) -> None:
    refused(doc(**{field: text}), f"models[0].{field}")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000\n", "http://127.0.0.1:80\t00", "http://h\r:1"])
def test_urls_with_control_characters_are_refused(url: str) -> None:
    # urlsplit would silently drop these; the URL must be refused before.
    refused(doc(endpoints=[{"url": url}]), "models[0].endpoints[0].url")
    refused(doc(endpoints=[{"url": "http://127.0.0.1:1", "gpu_metrics_url": url}]), "models[0].endpoints[0]")


@pytest.mark.parametrize("address", ["127.0.0.1\n", "localhost", "0.0.0.0 ", ""])
def test_listen_address_must_be_an_ip(address: str) -> None:
    refused({**doc(), "gateway": {"listen_address": address}}, "gateway.listen_address")


def test_good_names_still_pass() -> None:
    registry = parse_registry(
        {
            "gateway": {"model_header": "x-model", "listen_address": "::1"},
            "models": [
                {
                    "id": "meta-llama/Llama-3.1-8B-Instruct",
                    "aliases": ["llama3", "org@v1+q4:fp8"],
                    "engine": "vllm",
                    "owned_by": "Méta AI",
                    "served_model": "meta-llama/Llama-3.1-8B-Instruct",
                    "endpoints": [{"id": "llama.a_1-2", "url": "http://10.0.0.7:8000"}],
                }
            ],
        }
    )
    assert registry.models[0].names == ("meta-llama/Llama-3.1-8B-Instruct", "llama3", "org@v1+q4:fp8")


@pytest.mark.parametrize("name", bad_variants("qwen2"))
def test_admin_path_names_are_refused_before_any_lookup(name: str) -> None:
    with pytest.raises(InvalidNameError):
        valid_model_name(name)
    with pytest.raises(InvalidNameError):
        valid_endpoint_id(name)
    # Callers asking only "does it exist" (the alert receiver) still get a NotFoundError.
    assert issubclass(InvalidNameError, NotFoundError)


def test_admin_path_names_that_can_exist_pass() -> None:
    assert valid_model_name("org/model") == "org/model"
    assert valid_endpoint_id("qwen2-0") == "qwen2-0"
