"""Building blocks of every registry schema: frozen models that forbid unknown keys (a typo in the file is
an error naming its path, not a silently ignored setting) and the durations they share."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveSeconds = Annotated[float, Field(gt=0, le=86_400)]
# 0 turns a timeout off; Envoy takes the same convention.
OptionalSeconds = Annotated[float, Field(ge=0, le=86_400)]
