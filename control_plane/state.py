"""The desired state of the data plane: the registry resolved to addresses, with live health and weights.

This is what the xDS builders consume. It is plain immutable data: the config loader, health probes and
the admin API produce it; the builders turn it into Envoy resources without side effects.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from control_plane.config.overload import OverloadSettings
from control_plane.config.schema import GatewaySettings, ModelConfig, Registry
from control_plane.errors import ResolutionError
from control_plane.overload.fallback import choose_fallbacks

log = logging.getLogger(__name__)


class Health(StrEnum):
    """Maps one to one onto Envoy's `HealthStatus` of an EDS endpoint."""

    UNKNOWN = "unknown"  # not probed yet: Envoy routes to it
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"  # no new requests, in-flight ones run to their end


@dataclass(frozen=True)
class EndpointState:
    id: str
    address: str  # an IP literal: EDS takes no host names
    port: int
    weight: int = 1
    health: Health = Health.UNKNOWN


@dataclass(frozen=True)
class ModelState:
    config: ModelConfig
    endpoints: tuple[EndpointState, ...] = ()
    draining: bool = False  # no new requests (503), in-flight ones run to their end

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def enabled(self) -> bool:
        return self.config.enabled


@dataclass(frozen=True)
class GatewayState:
    settings: GatewaySettings
    models: tuple[ModelState, ...] = ()
    auth_mode: str = "none"  # the registry's auth.mode: "api_key" puts the key check in every Envoy
    keys: tuple[KeyEntry, ...] = ()  # the keys Envoy accepts (with auth_mode "api_key")
    overload: OverloadSettings = field(default_factory=OverloadSettings)  # priority and shedding settings
    # Saturated models (level 1: shed low priority, 2: default too) and the models routed to a fallback
    # now (model id, fallback id), from control_plane/overload. Both reach Envoy in the routes (RDS).
    saturation: tuple[tuple[str, int], ...] = ()
    fallbacks: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class KeyEntry:
    """An API key as Envoy's key check needs it (builders/keys.py): its hash, never the key itself.
    control_plane/tenancy turns stored and declared keys into these."""

    sha256: str
    id: str
    name: str
    models: tuple[str, ...] | None = None  # ids or aliases the key may use; None: every model
    priority: str = "default"
    expires_at: int = 0  # epoch seconds; 0: never
    rpm_limit: int = 0  # 0: unlimited (for the x-ratelimit-* headers; enforced by the quota filter)
    tpm_limit: int = 0
    # Refused with this code until `denied_until` (epoch s): "rate_limit_exceeded" when the key used its
    # tokens per minute, "insufficient_quota" when it used its budget. Set by the usage accounting.
    denied: str = ""
    denied_until: int = 0


@dataclass(frozen=True)
class NodeParams:
    """Per-Envoy settings taken from the node metadata of its bootstrap; default to the registry's."""

    listen_address: str | None = None
    listen_port: int | None = None
    access_log_path: str | None = None  # this Envoy's access log file (overrides gateway.access_log.path)
    # The credential of the access-log stream this Envoy opens to the control plane (xds/auth.py). Set by
    # the control plane, the same for every node, so Envoys with the same settings still share a snapshot.
    log_credential: str = field(default="", repr=False)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, object]) -> NodeParams:
        address = metadata.get("listen_address")
        port = metadata.get("listen_port")
        log_path = metadata.get("access_log_path")
        return cls(
            listen_address=str(address) if address else None,
            listen_port=int(str(port)) if port not in (None, "") else None,
            access_log_path=str(log_path) if log_path else None,
        )


Resolver = Callable[[str], str]


def resolve_host(host: str) -> str:
    """Resolve a host name to one IPv4/IPv6 address literal (IP literals pass through)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ResolutionError(f"cannot resolve {host!r}: {exc}") from None
    # Prefer IPv4: model servers commonly listen on 0.0.0.0 only.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


@dataclass(frozen=True)
class LaunchedReplica:
    id: str
    address: str  # an IP literal
    port: int


ACTIVATOR_ENDPOINT_ID = "activator"


@dataclass
class StateInputs:
    """What besides the registry shapes the state: probed health, telemetry weights, admin drains."""

    health: dict[str, Health] = field(default_factory=dict)  # by endpoint id
    weights: dict[str, int] = field(default_factory=dict)  # by endpoint id
    draining_endpoints: frozenset[str] = frozenset()
    draining_models: frozenset[str] = frozenset()
    keys: tuple[KeyEntry, ...] = ()  # API keys, from control_plane/tenancy
    # Launched models (a `launch` section): their ready replicas by model id (control_plane/lifecycle),
    # and where requests for one with none ready go meanwhile: the activator, which holds them.
    launched: dict[str, tuple[LaunchedReplica, ...]] = field(default_factory=dict)
    activator: tuple[str, int] | None = None
    saturation: dict[str, int] = field(default_factory=dict)  # model id → level > 0 (control_plane/overload)

    def endpoint_health(self, model_id: str, endpoint_id: str) -> Health:
        if endpoint_id in self.draining_endpoints or model_id in self.draining_models:
            return Health.DRAINING
        return self.health.get(endpoint_id, Health.UNKNOWN)


def _launched_endpoints(model_id: str, inputs: StateInputs) -> tuple[EndpointState, ...]:
    """A launched model's ready replicas; none ready: the activator alone (it loads the model and holds
    the request), or nothing (503) when there is no activator."""
    replicas = inputs.launched.get(model_id, ())
    if replicas:
        return tuple(
            # Probed like any endpoint (runtime.HealthWiring): a hung replica leaves Envoy's rotation.
            EndpointState(r.id, r.address, r.port, weight=1, health=inputs.endpoint_health(model_id, r.id))
            for r in replicas
        )
    if inputs.activator is None:
        return ()
    host, port = inputs.activator
    return (EndpointState(ACTIVATOR_ENDPOINT_ID, host, port, weight=1, health=Health.UNKNOWN),)


def build_state(
    registry: Registry,
    resolver: Resolver,
    inputs: StateInputs | None = None,
    addresses: Mapping[str, str] | None = None,
) -> GatewayState:
    """Resolve every endpoint and overlay live health/weights. An unresolvable endpoint is left out.

    `addresses` (endpoint id → IP) reuses earlier resolutions, so a health flip does not wait on DNS.
    """
    inputs = inputs or StateInputs()
    addresses = addresses or {}
    models = []
    for model in registry.models:
        if model.launch is not None:
            launched = _launched_endpoints(model.id, inputs)
            draining = model.id in inputs.draining_models
            models.append(ModelState(config=model, endpoints=launched, draining=draining))
            continue
        endpoints = []
        for index, endpoint in enumerate(model.endpoints):
            endpoint_id = model.endpoint_id(index)
            try:
                address = addresses.get(endpoint_id) or resolver(endpoint.host)
            except ResolutionError as exc:
                log.warning("endpoint %s of model %s left out: %s", endpoint_id, model.id, exc)
                continue
            endpoints.append(
                EndpointState(
                    id=endpoint_id,
                    address=address,
                    port=endpoint.port,
                    weight=inputs.weights.get(endpoint_id, endpoint.weight),
                    health=inputs.endpoint_health(model.id, endpoint_id),
                )
            )
        models.append(
            ModelState(config=model, endpoints=tuple(endpoints), draining=model.id in inputs.draining_models)
        )
    saturation = {m: level for m, level in inputs.saturation.items() if level > 0}
    return GatewayState(
        settings=registry.gateway,
        models=tuple(models),
        auth_mode=registry.auth.mode,
        keys=inputs.keys,
        overload=registry.overload,
        saturation=tuple(sorted(saturation.items())),
        fallbacks=choose_fallbacks(models, saturation),
    )
