"""The tenancy parts wired together for the control plane's process: the key service over its store, the
publisher pushing the key table to every Envoy, the quota server of the per-key request limit, the usage
accounting (an access-log sink: `sinks`, with its store, flusher and token limits), and the admin
routes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from fastapi import FastAPI
from fastapi.params import Depends

from control_plane.admin.keys import register_key_routes
from control_plane.admin.usage import register_usage_routes
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.store.overlay import AdminStore
from control_plane.tenancy.keys import ApiKey
from control_plane.tenancy.live import LiveState
from control_plane.tenancy.live_server import LiveConfigServicer, add_live_servicer
from control_plane.tenancy.publish import KeyPublisher
from control_plane.tenancy.quota import QuotaServicer, UnknownKey, add_quota_servicer
from control_plane.tenancy.service import KeyListener, KeyService
from control_plane.tenancy.store import SqliteKeyStore
from control_plane.tenancy.usage import UsageAccounting, UsageSettings
from control_plane.tenancy.usage_store import SqliteUsageStore
from control_plane.xds.als import EntrySink, LiveSink
from control_plane.xds.auth import XdsAuthenticator


@dataclass
class TenancyWiring:
    store: SqliteKeyStore
    keys: KeyService
    publisher: KeyPublisher
    quota: QuotaServicer
    usage_store: SqliteUsageStore
    usage: UsageAccounting
    usage_settings: UsageSettings
    live: LiveState
    live_server: LiveConfigServicer
    key_listeners: tuple[KeyListener, ...] = ()

    @property
    def sinks(self) -> tuple[EntrySink | LiveSink, ...]:
        """For the access-log servicer: the usage accounting counts the keyed entries; the live state
        (remaining limits, requests in flight) takes the periodic ones too."""
        return (self.usage, self.live)

    @classmethod
    def create(
        cls,
        plane: ControlPlane,
        state_db: Path,
        admin_store: AdminStore,
        grpc_server: grpc.aio.Server,
        authenticator: XdsAuthenticator | None,
        metrics: ControlPlaneMetrics,
        usage_settings: UsageSettings | None = None,
    ) -> TenancyWiring:
        store = SqliteKeyStore(state_db)
        # Audited through the admin store, with the actor of the call (admin token, registry file).
        keys = KeyService(
            store, audit=lambda action, target, detail: admin_store.write([], action, target, detail)
        )
        publisher = KeyPublisher(plane.set_keys)
        rpm_limits: dict[str, int | None] = {}

        def rpm_limit_of(key_id: str) -> int | None:
            try:
                return rpm_limits[key_id]
            except KeyError:
                raise UnknownKey(key_id) from None  # unknown, revoked or expired: DENY_ALL

        # The per-key requests-per-minute limit across Envoys: the quota server of their RLQS filter.
        quota = QuotaServicer(rpm_limit_of, authenticator=authenticator)
        add_quota_servicer(grpc_server, quota)

        async def limits_follow_keys(active: tuple[ApiKey, ...]) -> None:
            rpm_limits.clear()
            rpm_limits.update({k.id: k.settings.rpm_limit for k in active})
            quota.limits_changed()

        # Usage per key and model, and the token limits refused through the key table (after the
        # publisher, whose key table the limits read).
        usage_settings = usage_settings or UsageSettings()
        usage_store = SqliteUsageStore(state_db)
        usage = UsageAccounting(usage_store, metrics, plane.registry, publisher, usage_settings)

        # The keys' live state (what each active key used lately, its requests in flight), on its own
        # ECDS stream: never with the key table, never through the listener.
        live_server = LiveConfigServicer(authenticator=authenticator)
        add_live_servicer(grpc_server, live_server)
        live = LiveState(publisher, usage.limits, live_server.publish)

        key_listeners = (publisher.keys_changed, limits_follow_keys, usage.keys_changed, live.keys_changed)
        for listener in key_listeners:
            keys.add_listener(listener)
        plane.add_registry_listener(keys.follow)
        plane.add_registry_listener(usage.follow)
        return cls(
            store=store,
            keys=keys,
            publisher=publisher,
            quota=quota,
            usage_store=usage_store,
            usage=usage,
            usage_settings=usage_settings,
            live=live,
            live_server=live_server,
            key_listeners=key_listeners,
        )

    async def start(self, plane: ControlPlane) -> None:
        """Load the registry's declared keys with the stored ones and publish the table (with the
        budgets used up before a restart refused again), and start storing usage."""
        await self.keys.follow(plane.registry)  # the first call announces the table to every listener
        self.usage.start()
        self.live.start()

    def register_routes(self, app: FastAPI, dependencies: Sequence[Depends]) -> None:
        # Usage first: the key routes' `/admin/keys/{id:path}` would take `/admin/keys/{id}/usage`.
        register_usage_routes(
            app,
            self.usage,
            self.keys,
            retention_days=self.usage_settings.retention_days,
            dependencies=list(dependencies),
        )
        register_key_routes(app, self.keys, dependencies=list(dependencies))

    def close(self) -> None:
        """At shutdown, after the gRPC server stopped: the usage not yet stored is stored."""
        self.live.stop()
        try:
            self.usage.stop()
        finally:
            self.usage_store.close()
            self.store.close()
