"""A model's resilience settings in the registry: health probing, concurrency limits and timeouts, retries
and outlier ejection (how the gateway finds, spares and routes around a failing replica)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from control_plane.config.base import Frozen, OptionalSeconds, PositiveSeconds


class HealthCheck(Frozen):
    """Active probing of every endpoint: the engine's health call, then a check of the model it serves."""

    interval_s: PositiveSeconds = 2.0
    timeout_s: PositiveSeconds = 1.0
    unhealthy_threshold: int = Field(
        default=2, ge=1, le=100, description="Failures in a row to mark it down."
    )
    healthy_threshold: int = Field(
        default=1, ge=1, le=100, description="Successes in a row to bring it back."
    )
    jitter: float = Field(
        default=0.1, ge=0, le=1, description="Random spread of the interval, as a fraction."
    )
    check_model: bool = Field(default=True, description="Refuse an endpoint that serves another model.")


class ModelLimits(Frozen):
    """Per-model limits, enforced by Envoy's circuit breakers and route timeouts."""

    max_concurrent_requests: int = Field(default=256, ge=1, le=1_000_000)
    max_pending_requests: int = Field(default=512, ge=0, le=1_000_000)
    request_timeout_s: OptionalSeconds = Field(
        default=600, description="Whole request, streams included; 0 = none."
    )
    idle_timeout_s: PositiveSeconds = Field(
        default=120, description="Longest silence of the upstream before the stream is cut."
    )
    connect_timeout_s: PositiveSeconds = 2.0


RetriableStatus = Annotated[int, Field(ge=500, le=599)]


class RetryPolicy(Frozen):
    """Retries on another replica, only where no byte has reached the client yet, and only for causes that
    say a replica failed (refused or broken connection, a try gone silent), never for those that say the
    fleet is full (an engine's 429 or 503, the circuit breaker), which a retry would only multiply.
    See docs/operations.md, "When a replica fails"."""

    attempts: int = Field(default=2, ge=0, le=10, description="Retries after the first try.")
    timeout_retries: int = Field(
        default=1,
        ge=0,
        le=10,
        description="Of those, how many may follow a try that stayed silent for `limits.idle_timeout_s` "
        "(a hung replica; on a merely slow fleet each one adds a request, hence its own bound). "
        "0 = a silent try ends the request with 504.",
    )
    budget_percent: float = Field(
        default=100.0,
        ge=0,
        le=100,
        description="Retries in progress at once may be at most this share of the active requests. 100 lets "
        "every request in flight on one of two replicas be retried when it dies (N replicas need "
        "100/(N-1)); the circuit breaker (limits.max_concurrent_requests) still caps retries and first "
        "tries together.",
    )
    min_retry_concurrency: int = Field(default=3, ge=0, le=10_000)
    retriable_status_codes: tuple[RetriableStatus, ...] = Field(
        default=(),
        description="Model-server answers retried on another replica. None by default: engines answer 429 "
        "or 503 when they are full, and retrying those multiplies load on a saturated fleet.",
    )

    @model_validator(mode="after")
    def _timeout_retries_within_attempts(self) -> RetryPolicy:
        if self.timeout_retries > self.attempts:
            raise ValueError(
                f"timeout_retries ({self.timeout_retries}) cannot exceed attempts ({self.attempts})"
            )
        return self


class OutlierDetection(Frozen):
    consecutive_5xx: int = Field(default=5, ge=1)
    consecutive_local_origin_failure: int = Field(default=2, ge=1)
    interval_s: PositiveSeconds = 2.0
    base_ejection_time_s: PositiveSeconds = 10.0
    max_ejection_percent: int = Field(default=50, ge=0, le=100)
