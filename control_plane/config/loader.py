"""Read and validate the registry file; every problem is reported with its path in the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from control_plane.config.schema import Registry
from control_plane.errors import ConfigError


def _format_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def validation_problems(error: ValidationError) -> list[str]:
    """One `path: message` line per problem of a pydantic error (`models[2].endpoints[0].url: …`)."""
    problems = []
    for item in error.errors():
        where = _format_location(tuple(item["loc"]))
        message = item["msg"].removeprefix("Value error, ")
        if where:
            problems.append(f"{where}: {message}")
        else:
            # Cross-field checks already name their paths, one per line.
            problems.extend(message.splitlines())
    return problems


_EMPTY_HINT = (
    "a registry without models answers 404 to every request; if that is intended, set "
    "`allow_empty: true` at the top level of the file (or start with --allow-empty)"
)


def parse_registry(data: Any, source: str = "<registry>", *, allow_empty: bool = False) -> Registry:
    """Validate a registry document. One with no model is refused unless `allow_empty` (the caller's
    force) or the document's own `allow_empty: true` says it is meant."""
    if data is None:
        if not allow_empty:
            raise ConfigError(source, [f"the document is empty: {_EMPTY_HINT}"])
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"top level must be a mapping, got {type(data).__name__}"])
    try:
        registry = Registry.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, validation_problems(exc)) from None
    # Models found in model directories count: a file may list none of its own.
    empty = not registry.models and not registry.lifecycle.model_dirs
    if empty and not (allow_empty or registry.allow_empty):
        raise ConfigError(source, [f"models: no model is defined: {_EMPTY_HINT}"])
    return registry


def decode_text(raw: bytes, source: str) -> str:
    """UTF-8 text of the file, or a ConfigError naming the line and column of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            source,
            [
                f"line {line}, column {column}: byte 0x{raw[exc.start]:02x} is not UTF-8 "
                "(save the file as UTF-8)"
            ],
        ) from None


def load_registry(path: Path, *, allow_empty: bool = False) -> Registry:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    text = decode_text(raw, str(path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    return parse_registry(data, str(path), allow_empty=allow_empty)
