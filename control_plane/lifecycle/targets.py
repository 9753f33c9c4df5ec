"""Launched replicas as endpoints to watch: the health prober, the telemetry scraper and Prometheus' file
SD follow them like the registry's endpoints, with the same ids, labels and checks (docs/lifecycle.md).

Pure: the registry and the control plane's `inputs.launched` in, one entry per ready replica out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from control_plane.config.schema import ModelConfig, Registry
from control_plane.state import LaunchedReplica

Launched = Mapping[str, tuple[LaunchedReplica, ...]]


@dataclass(frozen=True)
class LaunchedEndpoint:
    model: ModelConfig
    replica: LaunchedReplica

    @property
    def id(self) -> str:
        return self.replica.id

    @property
    def host(self) -> str:
        return f"[{self.replica.address}]" if ":" in self.replica.address else self.replica.address

    @property
    def url(self) -> str:
        """The replica's base URL (`http://host:port`), as an endpoint's `url` in the registry."""
        return f"http://{self.host}:{self.replica.port}"


def launched_endpoints(registry: Registry, launched: Launched) -> list[LaunchedEndpoint]:
    """Every ready replica of the registry's launched models, in registry order then replica order.

    Replicas of a model no longer in the registry (or no longer launched) are left out: what is watched
    follows what is served."""
    return [
        LaunchedEndpoint(model, replica)
        for model in registry.models
        if model.launch is not None
        for replica in launched.get(model.id, ())
    ]
