"""Admin changes: validate, persist in the overlay store, publish. Each is visible in the next xDS push,
which happens before the call returns."""

from __future__ import annotations

import logging
from collections.abc import Callable

from control_plane.config.schema import EndpointConfig, ModelConfig
from control_plane.errors import ConfigError, ConflictError, NotFoundError
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane

log = logging.getLogger(__name__)


class AdminOperations:
    def __init__(self, plane: ControlPlane, metrics: ControlPlaneMetrics) -> None:
        self._plane = plane
        self._store = plane.store
        self._metrics = metrics

    def _model(self, name: str) -> ModelConfig:
        model = self._plane.registry.model(name)
        if model is None:
            raise NotFoundError(f"no model {name!r}")
        return model

    def endpoint(self, endpoint_id: str) -> tuple[ModelConfig, EndpointConfig]:
        for model in self._plane.registry.models:
            for index, endpoint in enumerate(model.endpoints):
                if model.endpoint_id(index) == endpoint_id:
                    return model, endpoint
        raise NotFoundError(f"no endpoint {endpoint_id!r}")

    def _file_defines_model(self, model_id: str) -> bool:
        return model_id not in self._plane.applied.admin_models

    async def _commit(self, action: str, undo: Callable[[], None] | None = None) -> None:
        """Publish the overlay; if the result does not validate, undo the store write and raise."""
        try:
            self._plane.candidate()
        except ConfigError as exc:
            if undo is not None:
                undo()
            raise ConflictError("; ".join(exc.problems)) from None
        await self._plane.refresh()
        self._metrics.admin_actions.labels(action).inc()
        # Return once every Envoy has the change, so the caller can rely on it at once.
        if not await self._plane.wait_synced():
            log.warning("admin: %s: not every Envoy confirmed the change within the wait", action)
        log.info("admin: %s", action)

    async def add_model(self, model: ModelConfig) -> ModelConfig:
        for name in model.names:
            if self._plane.registry.model(name) is not None:
                raise ConflictError(f"the name {name!r} is already used by model {self._model(name).id!r}")
        # Endpoints of an admin-added model get explicit ids, so they can be drained and removed by id.
        endpoints = tuple(
            e if e.id else e.model_copy(update={"id": model.endpoint_id(i)})
            for i, e in enumerate(model.endpoints)
        )
        model = model.model_copy(update={"endpoints": endpoints})
        self._store.add_model(model)
        await self._commit("model.add", lambda: self._store.remove_model(model.id, from_file=False))
        return self._model(model.id)

    async def remove_model(self, name: str) -> None:
        model = self._model(name)
        self._store.remove_model(model.id, from_file=self._file_defines_model(model.id))
        await self._commit("model.remove")

    async def set_enabled(self, name: str, enabled: bool) -> ModelConfig:
        model = self._model(name)
        self._store.set_flag("model", model.id, "enabled", enabled)
        await self._commit("model.enable" if enabled else "model.disable")
        return self._model(model.id)

    async def set_model_draining(self, name: str, draining: bool) -> ModelConfig:
        model = self._model(name)
        self._store.set_flag("model", model.id, "draining", True if draining else None)
        await self._commit("model.drain" if draining else "model.undrain")
        return model

    async def add_endpoint(self, name: str, endpoint: EndpointConfig) -> str:
        model = self._model(name)
        taken = {m.endpoint_id(i) for m in self._plane.registry.models for i in range(len(m.endpoints))}
        if endpoint.id is None:
            n = len(model.endpoints)
            while f"{model.id}-{n}" in taken:
                n += 1
            endpoint = endpoint.model_copy(update={"id": f"{model.id}-{n}"})
        elif endpoint.id in taken:
            raise ConflictError(f"endpoint id {endpoint.id!r} is already used")
        assert endpoint.id is not None
        self._store.add_endpoint(model.id, endpoint)
        endpoint_id = endpoint.id
        await self._commit("endpoint.add", lambda: self._store.remove_endpoint(endpoint_id, from_file=False))
        return endpoint.id

    async def remove_endpoint(self, endpoint_id: str) -> None:
        self.endpoint(endpoint_id)
        from_file = endpoint_id not in self._plane.applied.admin_endpoints
        self._store.remove_endpoint(endpoint_id, from_file=from_file)
        await self._commit("endpoint.remove")

    async def set_endpoint_draining(self, endpoint_id: str, draining: bool) -> None:
        self.endpoint(endpoint_id)
        self._store.set_flag("endpoint", endpoint_id, "draining", True if draining else None)
        await self._commit("endpoint.drain" if draining else "endpoint.undrain")
