"""Typed errors of the control plane. The edges (CLI, admin API) map them to exit codes or HTTP."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the control plane raises on purpose."""


class ConfigError(GatewayError):
    """The registry file cannot be used: unreadable, not YAML, or invalid.

    `problems` lists one `path: message` line per problem, e.g. `models[2].endpoints[0].url: …`.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid configuration\n  " + "\n  ".join(problems))


class InconsistentSnapshotError(GatewayError):
    """A snapshot references resources it does not contain; it must never be pushed."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("inconsistent snapshot: " + "; ".join(problems))


class ResolutionError(GatewayError):
    """An endpoint host name could not be resolved to an IP address."""


class NotFoundError(GatewayError):
    """An admin call named a model or endpoint that does not exist."""


class ConflictError(GatewayError):
    """An admin call would clash with what exists (a taken name or id)."""


class InvalidNameError(NotFoundError):
    """A name or id that breaks the naming rules: nothing can have it, so it is refused (422) before any
    lookup. A NotFoundError for callers that only ask whether the thing exists."""


class RejectedChangeError(GatewayError):
    """A change was refused before anything of it was kept: its snapshot is inconsistent, Envoy's own
    validation refuses it, or a connected Envoy rejected (NACKed) it and it was rolled back.

    `problems` lists one reason per line, Envoy's message included when Envoy said no.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("change refused: " + "; ".join(problems))
