"""A change is validated before anything of it is kept; a rejected one leaves nothing behind and never
blocks the next; a control plane never starts into a config it cannot serve; the registry file cannot
empty the gateway by accident. Envoy's own verdict comes from the real binary (`--mode validate`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from control_plane.admin.operations import AdminOperations
from control_plane.config import ModelConfig, parse_registry
from control_plane.errors import ConfigError, ConflictError, RejectedChangeError
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.state import GatewayState, NodeParams
from control_plane.store.overlay import AdminStore
from control_plane.vetting import build_checked
from control_plane.xds.builders import build_snapshot
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.envoy_check import cluster_problem
from control_plane.xds.resources import CLUSTER
from control_plane.xds.snapshot import Snapshot

pytestmark = pytest.mark.unit

ENVOY_REFUSES = {"outlier_detection": {"max_ejection_percent": 500}}


def model_doc(model_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "engine": "tgi", "endpoints": [{"url": "http://127.0.0.1:9000"}], **extra}


def make_plane(*models: dict[str, Any], store: AdminStore | None = None, **kwargs: Any) -> ControlPlane:
    registry = parse_registry({"models": list(models or [model_doc("a")])})
    return ControlPlane(
        registry,
        cache=SnapshotCache(),
        metrics=ControlPlaneMetrics.create(),
        store=store,
        resolver=lambda h: h,
        **kwargs,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": "other"},
        {"eds_cluster_config": {"service_name": "x"}},
        {"edsClusterConfig": {"serviceName": "x"}},
        {"type": "STATIC"},
        {"type": "LOGICAL_DNS"},
        {"load_assignment": {"cluster_name": "x"}},
        {"alt_stat_name": "x"},
    ],
)
def test_overrides_of_fields_the_gateway_owns_are_refused_naming_them(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_registry({"models": [model_doc("a", cluster_overrides=overrides)]})
    (problem,) = info.value.problems
    key = next(iter(overrides))
    assert problem.startswith("models[0].cluster_overrides") and f"cluster_overrides.{key}" in problem


def test_envoy_validate_mode_gives_its_reason() -> None:
    plane = make_plane(model_doc("a", cluster_overrides={"per_connection_buffer_limit_bytes": 4096}))
    snapshot = build_snapshot(plane.state, NodeParams())
    assert cluster_problem(snapshot.resources[CLUSTER]["model_a"]) is None  # type: ignore[arg-type]
    bad = make_plane(model_doc("b"))
    cluster = build_snapshot(bad.state, NodeParams()).resources[CLUSTER]["model_b"]
    cluster.outlier_detection.max_ejection_percent.value = 500  # type: ignore[attr-defined]
    problem = cluster_problem(cluster)  # type: ignore[arg-type]
    assert problem is not None and "MaxEjectionPercent: value must be less than or equal to 100" in problem


def test_an_admin_change_envoy_refuses_leaves_nothing_and_does_not_block_the_next() -> None:
    async def scenario() -> None:
        plane = make_plane()
        ops = AdminOperations(plane, ControlPlaneMetrics.create())
        audit = plane.store.audit()
        bad = ModelConfig.model_validate(model_doc("bad", cluster_overrides=ENVOY_REFUSES))
        with pytest.raises(RejectedChangeError) as info:
            await ops.add_model(bad)
        assert "model 'bad': cluster_overrides: Envoy refuses the cluster" in str(info.value)
        assert "less than or equal to 100" in str(info.value)
        assert plane.store.rows("SELECT id FROM added_models") == [] and plane.store.audit() == audit
        assert plane.registry.model("bad") is None
        # The next writes go through, and the bad model can be fixed and added.
        await ops.set_enabled("a", False)
        fixed = await ops.add_model(
            bad.model_copy(update={"cluster_overrides": {"max_requests_per_connection": 1}})
        )
        assert fixed.value.id == "bad" and plane.registry.model("bad") is not None

    asyncio.run(scenario())


def test_an_inconsistent_snapshot_is_refused_with_its_problems() -> None:
    plane = make_plane()

    def dangling(state: GatewayState, params: NodeParams) -> Snapshot:
        good = build_snapshot(state, params)
        return Snapshot.create({**good.resources, CLUSTER: {}})  # routes now target unknown clusters

    with pytest.raises(RejectedChangeError) as info:
        build_checked(plane.state, [NodeParams()], dangling)
    assert any("targets unknown cluster 'model_a'" in p for p in info.value.problems)


def test_a_clash_made_by_a_change_is_refused_and_not_stored() -> None:
    async def scenario() -> None:
        plane = make_plane(model_doc("a"), model_doc("b", endpoints=[{"url": "http://127.0.0.1:9001"}]))
        ops = AdminOperations(plane, ControlPlaneMetrics.create())
        with pytest.raises(ConflictError):
            await ops.add_endpoint(
                "a", plane.registry.models[1].endpoints[0].model_copy(update={"id": "b-0"})
            )
        assert plane.store.rows("SELECT id FROM added_endpoints") == []

    asyncio.run(scenario())


def test_start_with_an_overlay_that_no_longer_validates_serves_the_rest(tmp_path: Path) -> None:
    store = AdminStore(tmp_path / "state.db")
    good = ModelConfig.model_validate(model_doc("good"))
    store.add_model(good)
    # Written by an older version, before today's rules: a newline in a name, an owned override, and
    # an override Envoy refuses.
    for model_id, doc in (
        ("nl\n", model_doc("nl\n")),
        ("named", model_doc("named", cluster_overrides={"name": "x"})),
        ("refused", model_doc("refused", cluster_overrides=ENVOY_REFUSES)),
    ):
        store.write(
            [("INSERT INTO added_models (id, doc, seq) VALUES (?, ?, 99)", (model_id, json.dumps(doc)))],
            "model.add",
            model_id,
            "legacy",
        )
    plane = make_plane(store=store)
    assert [m.id for m in plane.registry.models] == ["a", "good"]
    warnings = "\n".join(plane.applied.warnings)
    for model_id in ("nl\\n", "named", "refused"):
        assert model_id in warnings
    assert build_snapshot(plane.state, NodeParams()).consistency_problems() == []


def test_start_refuses_a_file_envoy_cannot_serve() -> None:
    with pytest.raises(ConfigError) as info:
        make_plane(model_doc("a", cluster_overrides=ENVOY_REFUSES))
    assert "Envoy refuses the cluster" in str(info.value)


def test_a_reload_that_would_remove_every_model_is_refused_unless_forced() -> None:
    async def scenario() -> None:
        plane = make_plane()
        empty = parse_registry({"models": []}, allow_empty=True)  # what `serve --allow-empty` would load
        with pytest.raises(ConfigError, match="would remove every model"):
            await plane.apply_registry(empty)
        assert [m.id for m in plane.registry.models] == ["a"]
        await plane.apply_registry(empty, force_empty=True)
        assert plane.registry.models == ()
        # The file itself can say so.
        plane = make_plane()
        await plane.apply_registry(parse_registry({"allow_empty": True, "models": []}))
        assert plane.registry.models == ()

    asyncio.run(scenario())


@pytest.mark.parametrize("document", [None, {}, {"models": []}, {"models": [], "gateway": {}}])
def test_an_empty_registry_document_is_refused(document: Any) -> None:
    with pytest.raises(ConfigError, match="allow_empty"):
        parse_registry(document)
