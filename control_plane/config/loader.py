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


def parse_registry(data: Any, source: str = "<registry>") -> Registry:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"top level must be a mapping, got {type(data).__name__}"])
    try:
        return Registry.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, validation_problems(exc)) from None


def load_registry(path: Path) -> Registry:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    return parse_registry(data, str(path))
