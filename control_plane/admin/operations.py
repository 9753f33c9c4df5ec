"""Admin changes: validate, push, and store once no Envoy rejected them (ControlPlane.admin_change).
Each returns what it changed with the Envoys' verdict (`sync`), so the caller knows who has it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from control_plane.config.names import check_endpoint_id, check_model_name, default_endpoint_id
from control_plane.config.schema import EndpointConfig, ModelConfig
from control_plane.errors import ConfigError, ConflictError, InvalidNameError, NotFoundError
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.xds.sync import SyncReport

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Change(Generic[T]):
    """The result of an admin change, and which Envoys have it."""

    value: T
    sync: SyncReport


def valid_model_name(name: str) -> str:
    """A model name from a URL path, or InvalidNameError (422): never looked up if it cannot exist."""
    try:
        return check_model_name(name)
    except ValueError as exc:
        raise InvalidNameError(str(exc)) from None


def valid_endpoint_id(endpoint_id: str) -> str:
    try:
        return check_endpoint_id(endpoint_id)
    except ValueError as exc:
        raise InvalidNameError(str(exc)) from None


class AdminOperations:
    def __init__(self, plane: ControlPlane, metrics: ControlPlaneMetrics) -> None:
        self._plane = plane
        self._store = plane.store
        self._metrics = metrics

    def model(self, name: str) -> ModelConfig:
        """The model an id or alias names; InvalidNameError if no model can have that name."""
        model = self._plane.registry.model(valid_model_name(name))
        if model is None:
            raise NotFoundError(f"no model {name!r}")
        return model

    def endpoint(self, endpoint_id: str) -> tuple[ModelConfig, EndpointConfig]:
        valid_endpoint_id(endpoint_id)
        for model in self._plane.registry.models:
            for index, endpoint in enumerate(model.endpoints):
                if model.endpoint_id(index) == endpoint_id:
                    return model, endpoint
        raise NotFoundError(f"no endpoint {endpoint_id!r}")

    def _file_defines_model(self, model_id: str) -> bool:
        return model_id not in self._plane.applied.admin_models

    async def _commit(self, action: str, write: Callable[[], None]) -> SyncReport:
        """Check, push and store the change `write` makes; nothing is kept if it is refused."""
        try:
            sync = await self._plane.admin_change(write)
        except ConfigError as exc:
            raise ConflictError("; ".join(exc.problems)) from None
        self._metrics.admin_actions.labels(action).inc()
        if sync.warning:
            log.warning("admin: %s: %s", action, sync.warning)
        if sync.lagging:
            log.warning("admin: %s: not confirmed in time by lagging Envoys %s", action, sync.lagging)
        log.info("admin: %s", action)
        return sync

    async def add_model(self, model: ModelConfig) -> Change[ModelConfig]:
        for name in model.names:
            if self._plane.registry.model(name) is not None:
                raise ConflictError(f"the name {name!r} is already used by model {self.model(name).id!r}")
        # Endpoints of an admin-added model get explicit ids, so they can be drained and removed by id.
        endpoints = tuple(
            e if e.id else e.model_copy(update={"id": model.endpoint_id(i)})
            for i, e in enumerate(model.endpoints)
        )
        model = model.model_copy(update={"endpoints": endpoints})
        added = model
        sync = await self._commit("model.add", lambda: self._store.add_model(added))
        return Change(self.model(model.id), sync)

    async def remove_model(self, name: str) -> Change[str]:
        model = self.model(name)
        from_file = self._file_defines_model(model.id)
        sync = await self._commit("model.remove", lambda: self._store.remove_model(model.id, from_file))
        return Change(model.id, sync)

    async def set_enabled(self, name: str, enabled: bool) -> Change[ModelConfig]:
        model = self.model(name)
        sync = await self._commit(
            "model.enable" if enabled else "model.disable",
            lambda: self._store.set_flag("model", model.id, "enabled", enabled),
        )
        return Change(self.model(model.id), sync)

    async def set_model_draining(self, name: str, draining: bool) -> Change[ModelConfig]:
        model = self.model(name)
        sync = await self._commit(
            "model.drain" if draining else "model.undrain",
            lambda: self._store.set_flag("model", model.id, "draining", True if draining else None),
        )
        return Change(model, sync)

    async def add_endpoint(self, name: str, endpoint: EndpointConfig) -> Change[str]:
        model = self.model(name)
        taken = {m.endpoint_id(i) for m in self._plane.registry.models for i in range(len(m.endpoints))}
        if endpoint.id is None:
            n = len(model.endpoints)
            while default_endpoint_id(model.id, n) in taken:
                n += 1
            endpoint = endpoint.model_copy(update={"id": default_endpoint_id(model.id, n)})
        elif endpoint.id in taken:
            raise ConflictError(f"endpoint id {endpoint.id!r} is already used")
        assert endpoint.id is not None
        added = endpoint
        sync = await self._commit("endpoint.add", lambda: self._store.add_endpoint(model.id, added))
        return Change(endpoint.id, sync)

    async def remove_endpoint(self, endpoint_id: str) -> Change[str]:
        self.endpoint(endpoint_id)
        from_file = endpoint_id not in self._plane.applied.admin_endpoints
        sync = await self._commit(
            "endpoint.remove", lambda: self._store.remove_endpoint(endpoint_id, from_file=from_file)
        )
        return Change(endpoint_id, sync)

    async def set_endpoint_draining(self, endpoint_id: str, draining: bool) -> Change[str]:
        self.endpoint(endpoint_id)
        sync = await self._commit(
            "endpoint.drain" if draining else "endpoint.undrain",
            lambda: self._store.set_flag("endpoint", endpoint_id, "draining", True if draining else None),
        )
        return Change(endpoint_id, sync)
