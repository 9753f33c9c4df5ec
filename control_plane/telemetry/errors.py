"""Typed errors of the telemetry package."""

from __future__ import annotations

from control_plane.errors import GatewayError


class TelemetryError(GatewayError):
    """Base of the telemetry errors."""


class MetricMapError(TelemetryError):
    """A metric mapping file cannot be used. ``problems`` lists one ``path: message`` line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid metric map\n  " + "\n  ".join(problems))


class MetricsParseError(TelemetryError):
    """A /metrics answer is not valid Prometheus text exposition."""


class ScrapeError(TelemetryError):
    """A scrape failed: connection, timeout, HTTP status, oversized or unparsable answer."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"scrape of {url} failed: {reason}")


class UnknownEngineError(TelemetryError):
    """The metric map has no entry for an engine kind."""

    def __init__(self, engine: str, known: list[str]) -> None:
        self.engine = engine
        super().__init__(f"no metric mapping for engine {engine!r}; known: {', '.join(sorted(known))}")
