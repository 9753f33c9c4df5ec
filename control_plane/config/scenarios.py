"""Scenarios of `POST /v1/generate`: prompt templates kept in the registry.

A scenario is an optional system prompt and a user template containing `{inputs}`, the client's text.
Three ship by default (`qa`, `summarize`, `rewrite`, the seeds' scenarios); the registry's top-level
`scenarios:` adds to them or replaces them by name, and a model's own `scenarios:` does the same for that
model alone. Envoy's Lua filter applies the templates (control_plane/xds/builders/generate.py); nothing
here runs on the request path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

INPUTS = "{inputs}"
SCENARIO_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
SCENARIO_NAME_RULE = "1-64 characters: lower-case letters, digits, _ or -, starting with a letter or digit"
# Templates are prompts, not names: newlines and tabs are fine, other control characters are not.
_TEMPLATE_TEXT = re.compile(r"[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]{1,8000}")


def _check_template_text(value: str) -> str:
    if not _TEMPLATE_TEXT.fullmatch(value):
        raise ValueError("must be 1-8000 characters without control characters (newlines and tabs are fine)")
    return value


class Scenario(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    system: str | None = Field(default=None, description="The system prompt; none when absent.")
    user: str = Field(
        default=INPUTS, description="The user message; `{inputs}` is replaced by the request's `inputs`."
    )

    @field_validator("system")
    @classmethod
    def _check_system(cls, value: str | None) -> str | None:
        return None if value is None else _check_template_text(value)

    @field_validator("user")
    @classmethod
    def _check_user(cls, value: str) -> str:
        _check_template_text(value)
        if INPUTS not in value:
            raise ValueError(f"must contain {INPUTS} (where the request's text goes)")
        return value


def _check_names(value: dict[str, Scenario]) -> dict[str, Scenario]:
    for name in value:
        if not SCENARIO_NAME.fullmatch(name):
            raise ValueError(f"scenario name {name!r} must be {SCENARIO_NAME_RULE}")
    return value


Scenarios = Annotated[dict[str, Scenario], AfterValidator(_check_names)]

# Wording modelled on the seeds' prompt templates (question answering, summary, rewrite).
DEFAULT_SCENARIOS: Mapping[str, Scenario] = {
    "qa": Scenario(
        system="You are a knowledgeable assistant. Answer the user's question accurately and concisely, "
        "in the language of the question.",
        user="Question: {inputs}\nAnswer:",
    ),
    "summarize": Scenario(
        system="You are an assistant that writes faithful, concise summaries, in the language of the text.",
        user="Summarize the following text:\n\n{inputs}\n\nSummary:",
    ),
    "rewrite": Scenario(
        system="You are an editor. Rewrite text so that it reads more clearly and fluently while keeping "
        "its meaning and its language.",
        user="Rewrite the following text:\n\n{inputs}\n\nRewritten text:",
    ),
}


def effective_scenarios(*layers: Mapping[str, Scenario]) -> dict[str, Scenario]:
    """The defaults, then each layer over the previous one (registry-wide, then the model's own)."""
    merged = dict(DEFAULT_SCENARIOS)
    for layer in layers:
        merged.update(layer)
    return merged
