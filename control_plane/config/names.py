"""Rules for every name and short text that reaches Envoy config, a header, a response body or a URL path.

Names travel into Envoy config (route matches, metadata, header values) and admin URL paths. Every rule is
applied with `fullmatch`: `match` with `$` also accepts a trailing "\n", and one such name made Envoy reject
every later route update.
"""

from __future__ import annotations

import re

MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")
ENDPOINT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,99}")
# Free text that reaches a response body or a probe's comparison: any character but control ones.
_TEXT = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,200}")
_UNFIT_IN_ID = re.compile(r"[^A-Za-z0-9._-]")
MODEL_ID_RULE = "1-200 characters: letters, digits and . _ : / @ + - (no spaces or control characters)"
ENDPOINT_ID_RULE = "1-100 characters of letters, digits, '.', '_' or '-'"


def check_model_name(value: str) -> str:
    """A model id or alias, or ValueError saying the rule."""
    if not isinstance(value, str) or not MODEL_ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid model name: {MODEL_ID_RULE}")
    return value


def check_endpoint_id(value: str) -> str:
    if not isinstance(value, str) or not ENDPOINT_ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid endpoint id: {ENDPOINT_ID_RULE}")
    return value


def default_endpoint_id(model_id: str, index: int) -> str:
    """`<model id>-<index>`, with characters unfit for an endpoint id (the `/` of `org/model`) as `-`."""
    return _UNFIT_IN_ID.sub("-", f"{model_id}-{index}")[-100:].lstrip("-._") or f"endpoint-{index}"


def check_text(value: str) -> str:
    if not _TEXT.fullmatch(value):
        raise ValueError("must be 1-200 characters without control characters")
    return value


def check_url_text(value: str) -> str:
    # urlsplit silently drops tabs and newlines, so they must be refused before it parses the URL.
    if any(ch.isspace() or ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in value):
        raise ValueError("must not contain spaces or control characters")
    return value
