"""The tenancy parts wired together for the control plane's process: the key service over its store, the
publisher pushing the key table to every Envoy, the quota server of the per-key request limit, and the
admin routes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from fastapi import FastAPI
from fastapi.params import Depends

from control_plane.admin.keys import register_key_routes
from control_plane.service import ControlPlane
from control_plane.store.overlay import AdminStore
from control_plane.tenancy.keys import ApiKey
from control_plane.tenancy.publish import KeyPublisher
from control_plane.tenancy.quota import QuotaServicer, UnknownKey, add_quota_servicer
from control_plane.tenancy.service import KeyService
from control_plane.tenancy.store import SqliteKeyStore
from control_plane.xds.auth import XdsAuthenticator


@dataclass
class TenancyWiring:
    store: SqliteKeyStore
    keys: KeyService
    publisher: KeyPublisher
    quota: QuotaServicer

    @classmethod
    def create(
        cls,
        plane: ControlPlane,
        state_db: Path,
        admin_store: AdminStore,
        grpc_server: grpc.aio.Server,
        authenticator: XdsAuthenticator | None,
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

        keys.add_listener(publisher.keys_changed)
        keys.add_listener(limits_follow_keys)
        plane.add_registry_listener(keys.follow)
        return cls(store=store, keys=keys, publisher=publisher, quota=quota)

    async def start(self, plane: ControlPlane) -> None:
        """Load the registry's declared keys with the stored ones and publish the table."""
        await self.keys.follow(plane.registry)

    def register_routes(self, app: FastAPI, dependencies: Sequence[Depends]) -> None:
        register_key_routes(app, self.keys, dependencies=list(dependencies))

    def close(self) -> None:
        self.store.close()
