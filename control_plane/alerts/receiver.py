"""The webhook receiver of Alertmanager notifications, and the automatic actions it may take.

An alert named in the auto-drain set (registry `alerting.auto_drain`, or toggled through the admin API)
that names an `endpoint` label drains that endpoint when it fires and undrains it when it resolves.
Every automatic action is logged, audited (actor `alertmanager:<alertname>`) and recorded with the
notification; it is reversible (an
operator's undrain wins and cancels the pending automatic undrain) and bounded: the last routable
endpoint of a model is never drained.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from control_plane.admin.operations import AdminOperations
from control_plane.alerts.known import unknown_alert_problem
from control_plane.errors import NotFoundError
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.state import Health
from control_plane.store.overlay import AdminStore, acting_as

log = logging.getLogger(__name__)


class Alert(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: str = ""
    endsAt: str = ""
    fingerprint: str = ""


class Notification(BaseModel):
    """Alertmanager's webhook payload (version 4)."""

    model_config = ConfigDict(extra="allow")

    version: str = "4"
    status: str
    receiver: str = ""
    alerts: list[Alert]


class UnknownAlertError(ValueError):
    """An auto-drain setting names an alert no rule defines."""


class AlertReceiver:
    def __init__(self, plane: ControlPlane, ops: AdminOperations, metrics: ControlPlaneMetrics) -> None:
        self._plane = plane
        self._ops = ops
        self._store: AdminStore = plane.store
        self._metrics = metrics

    # Settings
    def auto_drain_alerts(self) -> set[str]:
        configured = set(self._plane.registry.alerting.auto_drain)
        rows = self._store.rows("SELECT id, value FROM flags WHERE kind = 'alert' AND flag = 'auto_drain'")
        return (configured | {name for name, value in rows if value}) - {
            name for name, value in rows if not value
        }

    def set_auto_drain(self, alertname: str, enabled: bool) -> None:
        """Raises UnknownAlertError for a name no alert rule has (it could never fire)."""
        problem = unknown_alert_problem(alertname)
        if problem is not None:
            raise UnknownAlertError(problem)
        self._store.set_flag("alert", alertname, "auto_drain", enabled)

    # Reading
    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._store.rows(
            "SELECT received_at, status, alertname, labels, annotations, starts_at, ends_at, action "
            "FROM alerts ORDER BY seq DESC LIMIT ?",
            (limit,),
        )
        return [
            {
                "received_at": received_at,
                "status": status,
                "alertname": alertname,
                "labels": json.loads(labels),
                "annotations": json.loads(annotations),
                "starts_at": starts_at,
                "ends_at": ends_at,
                "action": action,
            }
            for received_at, status, alertname, labels, annotations, starts_at, ends_at, action in rows
        ]

    def pending_undrains(self) -> list[dict[str, Any]]:
        rows = self._store.rows("SELECT endpoint_id, alertname, at FROM auto_actions ORDER BY at")
        return [{"endpoint": e, "alertname": a, "drained_at": at} for e, a, at in rows]

    # Handling
    async def handle(self, notification: Notification) -> list[dict[str, Any]]:
        results = []
        for alert in notification.alerts:
            name = alert.labels.get("alertname", "")
            with acting_as(f"alertmanager:{name or 'unknown'}"):
                results.append(await self._handle_one(name, alert))
        return results

    async def _handle_one(self, name: str, alert: Alert) -> dict[str, Any]:
        action = await self._act(name, alert)
        self._store.write(
            [
                (
                    "INSERT INTO alerts (received_at, status, alertname, fingerprint, labels, "
                    "annotations, starts_at, ends_at, action) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        time.time(),
                        alert.status,
                        name,
                        alert.fingerprint,
                        json.dumps(alert.labels),
                        json.dumps(alert.annotations),
                        alert.startsAt,
                        alert.endsAt,
                        action,
                    ),
                ),
                # Bounded history: the newest 1000 notifications.
                ("DELETE FROM alerts WHERE seq <= (SELECT MAX(seq) FROM alerts) - 1000", ()),
            ],
            f"alert.{alert.status}",
            name,
            json.dumps(alert.labels, sort_keys=True),
        )
        self._metrics.alert_notifications.labels(name or "unknown", alert.status).inc()
        return {"alertname": name, "status": alert.status, "action": action}

    def _routable_peers(self, endpoint_id: str) -> int:
        for model in self._plane.state.models:
            if any(e.id == endpoint_id for e in model.endpoints):
                return sum(
                    1
                    for e in model.endpoints
                    if e.id != endpoint_id and e.health in (Health.HEALTHY, Health.UNKNOWN)
                )
        return 0

    async def _act(self, name: str, alert: Alert) -> str | None:
        endpoint_id = alert.labels.get("endpoint")
        if not endpoint_id or name not in self.auto_drain_alerts():
            return None
        try:
            self._ops.endpoint(endpoint_id)
        except NotFoundError:
            return f"none: no endpoint {endpoint_id!r}"
        if alert.status == "firing":
            return await self._drain(name, endpoint_id)
        return await self._undrain(name, endpoint_id)

    async def _drain(self, name: str, endpoint_id: str) -> str:
        if endpoint_id in self._plane.inputs.draining_endpoints:
            return f"none: {endpoint_id} already draining"
        if self._routable_peers(endpoint_id) == 0:
            self._metrics.auto_actions.labels("drain_refused").inc()
            log.warning(
                "alert %s: NOT draining %s, it is its model's last routable endpoint", name, endpoint_id
            )
            return f"refused: {endpoint_id} is the last routable endpoint of its model"
        # Recorded before the drain shows: from then on it must read as the alert's own drain (the
        # EndpointDown rule ignores operators' drains, not this one, so the alert cannot resolve itself).
        self._record_auto_drain(endpoint_id, name)
        try:
            await self._ops.set_endpoint_draining(endpoint_id, True)
        except BaseException:
            self._release(endpoint_id, name)
            raise
        self._metrics.auto_actions.labels("drain").inc()
        log.warning("alert %s fired: drained %s automatically", name, endpoint_id)
        return f"drained {endpoint_id}"

    def _record_auto_drain(self, endpoint_id: str, name: str) -> None:
        self._store.write(
            [
                (
                    "INSERT OR REPLACE INTO auto_actions (endpoint_id, alertname, at) VALUES (?, ?, ?)",
                    (endpoint_id, name, time.time()),
                )
            ],
            "auto.drain",
            endpoint_id,
            name,
        )

    def _release(self, endpoint_id: str, name: str) -> None:
        self._store.write(
            [("DELETE FROM auto_actions WHERE endpoint_id = ? AND alertname = ?", (endpoint_id, name))],
            "auto.release",
            endpoint_id,
            name,
        )

    async def _undrain(self, name: str, endpoint_id: str) -> str:
        holders = {
            a
            for (a,) in self._store.rows(
                "SELECT alertname FROM auto_actions WHERE endpoint_id = ?", (endpoint_id,)
            )
        }
        if name not in holders:
            return f"none: {endpoint_id} was not drained by {name}"
        if holders - {name}:
            self._release(endpoint_id, name)
            return f"none: {endpoint_id} stays drained for another alert"
        await self._ops.set_endpoint_draining(endpoint_id, False)
        self._release(endpoint_id, name)
        self._metrics.auto_actions.labels("undrain").inc()
        log.warning("alert %s resolved: undrained %s automatically", name, endpoint_id)
        return f"undrained {endpoint_id}"

    def forget_endpoint(self, endpoint_id: str) -> None:
        """An operator undrained it by hand: no automatic undrain is pending any more."""
        if not self._store.rows("SELECT 1 FROM auto_actions WHERE endpoint_id = ?", (endpoint_id,)):
            return  # nothing pending: no audit entry either
        self._store.write(
            [("DELETE FROM auto_actions WHERE endpoint_id = ?", (endpoint_id,))],
            "auto.forget",
            endpoint_id,
            "",
        )
