"""Where the time goes: Envoy's per-request cost of the gateway's config, and the control plane's build.

**Envoy.** Static Envoys (``--concurrency 1``), each on a bootstrap rendered here, add one part of the
gateway's config at a time over the bare Envoy of the overhead benchmark, so that each step's cost per
request shows on its own:

1. bare: router only, one ``prefix: /`` route, one static cluster;
2. ``+ buffer``: the buffer filter (the whole body held before routing);
3. ``+ metadata filters``: header_to_metadata, buffer and json_to_metadata (the body's JSON parsed);
4. the gateway's own Listener, RouteConfiguration and Cluster, built by ``control_plane.xds.builders``
   from a one-model registry and made static (RDS inlined, EDS replaced by the same endpoints);
5. to 7. the same with 100 and 1000 models (one alias each) in the registry, the request naming the
   last model (the first for 7);
8. to 10. the 1000-model route table changed in ways a fix of the route builder could take: without the
   per-name ``GET /v1/models/{name}`` routes, with those matched on the path alone, and with the 400
   ``missing-model`` route moved up.

Rows 4a-4c take one part out of row 4; row 4g makes the model prefix-affine (the prefix-key Lua filter
on its route, Maglev with bounded load on its cluster); rows 4d-4f add API keys (``auth.mode: api_key``,
1000 keys, a valid key on every request; profile_keys.py): the key check alone, then the token usage
(ai_protocol_manager, max_tokens rules, an access-log stream entry per request), then the request quota
(RLQS): row 4f is the keyed listener as the control plane renders it, its key table inlined (no ECDS in
a static bootstrap).

Each runs at concurrency 1 (latency) and at a concurrency that saturates the one Envoy worker
(throughput and Envoy CPU per request). **Control plane.** cProfile of ``build_snapshot`` on a
1000-model registry, and of what a health flip costs at that size (``ControlPlane.set_health``).
"""

from __future__ import annotations

import copy
import cProfile
import dataclasses
import io
import math
import os
import pstats
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import json_format

from control_plane.config import parse_registry
from control_plane.devstack.procs import free_port
from control_plane.state import NodeParams, StateInputs, build_state
from control_plane.xds.builders import build_snapshot
from control_plane.xds.builders.generate import LUA_FILTER_NAME
from control_plane.xds.builders.quota import QUOTA_FILTER_NAME
from control_plane.xds.builders.usage import USAGE_FILTER_NAME
from control_plane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from loadtest._common import (
    ProcessCpu,
    SectionResult,
    fmt_ms,
    markdown_table,
    run_load,
    start_static_envoy,
    start_upstream,
)
from loadtest.bench_overhead import BODY, MODEL, PATH, bare_bootstrap
from loadtest.bench_scale import generated_registry, measure_health_flip
from loadtest.profile_keys import (
    KEY_COUNT,
    GrpcSink,
    bench_keys,
    check_keyed,
    control_plane_cluster,
    inline_key_filter,
    render_keys,
    wait_for,
)

BUFFER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"


@dataclass(frozen=True)
class ProfileSettings:
    duration_s: float = 3.0
    warmup_s: float = 1.0
    saturating_concurrency: int = 64
    many_models: int = 1000
    some_models: int = 100
    build_models: int = 1000
    top: int = 15
    only: tuple[str, ...] = ()
    """Variant keys to run (default: all)."""


# ------------------------------------------------------------------ static bootstraps
def _hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    return config


def with_filters(bootstrap: dict[str, Any], filters: list[dict[str, Any]]) -> dict[str, Any]:
    """The bare bootstrap with ``filters`` put in front of its router."""
    out = copy.deepcopy(bootstrap)
    manager = _hcm(out)
    manager["http_filters"] = [*filters, *manager["http_filters"]]
    return out


def gateway_filters(listener_dict: dict[str, Any], names: tuple[str, ...]) -> list[dict[str, Any]]:
    """The gateway's own HTTP filters (as generated) named in ``names``, in the gateway's order."""
    manager = listener_dict["filter_chains"][0]["filters"][0]["typed_config"]
    return [f for f in manager["http_filters"] if f["name"] in names]


def static_gateway_bootstrap(
    doc: dict[str, Any],
    listen_port: int,
    admin_port: int,
    inputs: StateInputs | None = None,
    control_plane_port: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The control plane's snapshot for ``doc`` (and ``inputs``: API keys) as a static bootstrap: RDS
    inlined into the connection manager, every EDS cluster turned STATIC with its ClusterLoadAssignment,
    the key check's ECDS resource inlined. With ``control_plane_port``, the bootstrap's ``xds_cluster``
    (access-log stream, quota server) points there. Also returns the listener as a dict (for its filters)."""
    registry = parse_registry(doc)
    state = build_state(registry, lambda host: host, inputs or StateInputs())
    # The access log goes to /dev/null: Envoy formats every line as the local stack's file log does, and
    # the disk is left out of the figure.
    node = NodeParams(listen_address="127.0.0.1", listen_port=listen_port, access_log_path="/dev/null")
    snapshot = build_snapshot(state, node)
    listener = listener_pb2.Listener()
    listener.CopyFrom(next(iter(snapshot.resources[LISTENER].values())))
    route = next(iter(snapshot.resources[ROUTE].values()))
    assert isinstance(route, route_pb2.RouteConfiguration)
    flt = listener.filter_chains[0].filters[0]
    manager = hcm.HttpConnectionManager()
    flt.typed_config.Unpack(manager)
    manager.ClearField("rds")
    manager.route_config.CopyFrom(route)
    flt.typed_config.Pack(manager)
    clusters = []
    for name, resource in snapshot.resources[CLUSTER].items():
        cluster = cluster_pb2.Cluster()
        cluster.CopyFrom(resource)
        cluster.ClearField("eds_cluster_config")
        cluster.type = cluster_pb2.Cluster.DiscoveryType.STATIC
        assignment = snapshot.resources[ENDPOINT][name]
        assert isinstance(assignment, endpoint_pb2.ClusterLoadAssignment)
        cluster.load_assignment.CopyFrom(assignment)
        clusters.append(json_format.MessageToDict(cluster, preserving_proto_field_name=True))
    listener_dict = json_format.MessageToDict(listener, preserving_proto_field_name=True)
    if state.auth_mode == "api_key":
        inline_key_filter(listener_dict, state)
    if control_plane_port:
        clusters.append(control_plane_cluster(control_plane_port))
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [listener_dict], "clusters": clusters},
    }
    return bootstrap, listener_dict


def one_model_doc(upstream_port: int) -> dict[str, Any]:
    return {
        "models": [
            {
                "id": MODEL,
                "engine": "vllm",
                "endpoints": [{"id": f"{MODEL}-0", "url": f"http://127.0.0.1:{upstream_port}"}],
            }
        ]
    }


def prefix_model_doc(upstream_port: int) -> dict[str, Any]:
    """Row 4's registry with the model prefix-affine (row 4g)."""
    doc = one_model_doc(upstream_port)
    doc["models"][0]["load_balancing"] = "prefix_affinity"
    return doc


def many_models_doc(upstream_port: int, count: int) -> dict[str, Any]:
    """``count - 1`` other models (one alias each, like ``bench``'s) then ``bench`` last, all on the
    same backend: the route table the gateway would have for ``count`` models."""
    models = [
        {
            "id": f"filler-{i:04d}",
            "aliases": [f"filler-alias-{i:04d}"],
            "engine": "vllm",
            "endpoints": [{"id": f"filler-{i:04d}-0", "url": f"http://127.0.0.1:{upstream_port}"}],
        }
        for i in range(count - 1)
    ]
    models.append(
        {
            "id": MODEL,
            "aliases": ["bench-alias"],
            "engine": "vllm",
            "endpoints": [{"id": f"{MODEL}-0", "url": f"http://127.0.0.1:{upstream_port}"}],
        }
    )
    return {"models": models}


def without_model_info_routes(bootstrap: dict[str, Any]) -> dict[str, Any]:
    """The bootstrap with the per-name ``GET /v1/models/{name}`` routes taken out of its route table."""
    out = copy.deepcopy(bootstrap)
    for vhost in _hcm(out)["route_config"]["virtual_hosts"]:
        vhost["routes"] = [r for r in vhost["routes"] if not r.get("name", "").startswith("model-info:")]
    return out


def model_info_by_path_only(bootstrap: dict[str, Any]) -> dict[str, Any]:
    """The bootstrap with the ``GET /v1/models/{name}`` routes' ``:method`` header matchers removed: Envoy
    checks a route's header matchers before its path, so every POST pays for each of them."""
    out = copy.deepcopy(bootstrap)
    for vhost in _hcm(out)["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            if route.get("name", "").startswith("model-info:"):
                route["match"].pop("headers", None)
    return out


def missing_model_first(bootstrap: dict[str, Any]) -> dict[str, Any]:
    """The bootstrap with its last route (``missing-model``, 400) moved right after ``invalid-json`` and
    matched on the ``model`` metadata being absent (an inverted present-match): the same answers, but the
    route lookup Envoy makes at request headers, before the body set any metadata, stops there instead of
    scanning every model route."""
    out = copy.deepcopy(bootstrap)
    for vhost in _hcm(out)["route_config"]["virtual_hosts"]:
        routes = vhost["routes"]
        missing = next(r for r in routes if r.get("name") == "missing-model")
        routes.remove(missing)
        missing["match"] = {
            "prefix": "/",
            "dynamic_metadata": [
                {
                    "filter": "gateway",
                    "path": [{"key": "model"}],
                    "value": {"present_match": True},
                    "invert": True,
                }
            ],
        }
        at = next(i for i, r in enumerate(routes) if r.get("name") == "invalid-json") + 1
        routes.insert(at, missing)
    return out


def without_hcm_fields(*fields: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The bootstrap with the connection manager's ``fields`` taken out (access logs, header rules)."""

    def transform(bootstrap: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(bootstrap)
        for field in fields:
            _hcm(out).pop(field, None)
        return out

    return transform


def without_http_filter(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The bootstrap with the HTTP filter ``name`` taken out of the connection manager's chain."""

    def transform(bootstrap: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(bootstrap)
        manager = _hcm(out)
        manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != name]
        return out

    return transform


# ------------------------------------------------------------------ Envoy ablation
@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    bootstrap: Callable[[int, int], dict[str, Any]]  # (listen, admin) -> bootstrap
    body: str = BODY
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Sent with every request (an API key); a variant with headers is checked first (401 without)."""
    reports: tuple[str, ...] = ()
    """What the Envoy must have reported to the control plane after the check: "usage", "quota"."""


def variants(upstream_port: int, settings: ProfileSettings, control_plane_port: int = 0) -> list[Variant]:
    bare = lambda listen, admin: bare_bootstrap(listen, admin, upstream_port)  # noqa: E731
    _, gateway_listener = static_gateway_bootstrap(one_model_doc(upstream_port), 1, 2)
    key, key_entries = bench_keys(KEY_COUNT)
    key_header = {"authorization": f"Bearer {key}"}
    keyed_doc = {**one_model_doc(upstream_port), "auth": {"mode": "api_key"}}

    def keyed(
        *transforms: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> Callable[[int, int], dict[str, Any]]:
        def make(lp: int, ap: int) -> dict[str, Any]:
            out = static_gateway_bootstrap(
                keyed_doc, lp, ap, StateInputs(keys=key_entries), control_plane_port=control_plane_port
            )[0]
            for transform in transforms:
                out = transform(out)
            return out

        return make

    def unkeyed_logs_and_body_rules(bootstrap: dict[str, Any]) -> dict[str, Any]:
        """Row 4's access logs (no entry per keyed request) and JSON rules (no max_tokens)."""
        out = copy.deepcopy(bootstrap)
        row4 = gateway_listener["filter_chains"][0]["filters"][0]["typed_config"]
        manager = _hcm(out)
        manager["access_log"] = copy.deepcopy(row4["access_log"])
        json_rules = next(
            f for f in row4["http_filters"] if f["name"] == "envoy.filters.http.json_to_metadata"
        )
        manager["http_filters"] = [
            copy.deepcopy(json_rules) if f["name"] == json_rules["name"] else f
            for f in manager["http_filters"]
        ]
        return out

    buffer_only = gateway_filters(gateway_listener, ("envoy.filters.http.buffer",))
    metadata = gateway_filters(
        gateway_listener,
        (
            "envoy.filters.http.header_to_metadata",
            "envoy.filters.http.buffer",
            "envoy.filters.http.json_to_metadata",
        ),
    )
    many, some = settings.many_models, settings.some_models
    first_body = BODY.replace(f'"model":"{MODEL}"', '"model":"filler-0000"')

    def gateway(models: int) -> Callable[[int, int], dict[str, Any]]:
        doc = one_model_doc(upstream_port) if models == 1 else many_models_doc(upstream_port, models)
        return lambda lp, ap: static_gateway_bootstrap(doc, lp, ap)[0]

    def one_then(
        transform: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> Callable[[int, int], dict[str, Any]]:
        return lambda lp, ap: transform(gateway(1)(lp, ap))

    def many_then(
        transform: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> Callable[[int, int], dict[str, Any]]:
        return lambda lp, ap: transform(gateway(many)(lp, ap))

    return [
        Variant("bare", "1. bare Envoy (router only)", bare),
        Variant("buffer", "2. + buffer filter", lambda lp, ap: with_filters(bare(lp, ap), buffer_only)),
        Variant(
            "metadata",
            "3. + header_to_metadata, buffer, json_to_metadata",
            lambda lp, ap: with_filters(bare(lp, ap), metadata),
        ),
        Variant("gateway", "4. the gateway's listener, routes and cluster (1 model)", gateway(1)),
        Variant(
            "gateway-no-logs",
            "4a. as 4, without the access logs (JSON file, local-reply stream)",
            one_then(without_hcm_fields("access_log")),
        ),
        Variant(
            "gateway-no-early",
            "4b. as 4, without the early header rules (x-envoy-* stripped, x-request-id bounded)",
            one_then(without_hcm_fields("early_header_mutation_extensions")),
        ),
        Variant(
            "gateway-no-lua",
            "4c. as 4, without the Lua filter (/v1/generate, served_model)",
            one_then(without_http_filter(LUA_FILTER_NAME)),
        ),
        Variant(
            "gateway-keys",
            f"4d. as 4, API keys: the key check (Lua SHA-256, {KEY_COUNT:,} hashed keys) on each request",
            keyed(
                without_http_filter(QUOTA_FILTER_NAME),
                without_http_filter(USAGE_FILTER_NAME),
                unkeyed_logs_and_body_rules,
            ),
            headers=key_header,
        ),
        Variant(
            "gateway-keys-usage",
            "4e. as 4d, + token usage (ai_protocol_manager, max_tokens rules, a log entry per request)",
            keyed(without_http_filter(QUOTA_FILTER_NAME)),
            headers=key_header,
            reports=("usage",),
        ),
        Variant(
            "gateway-keys-quota",
            "4f. as 4e, + the request quota (rate_limit_quota, RLQS): the whole keyed listener",
            keyed(),
            headers=key_header,
            reports=("usage", "quota"),
        ),
        Variant(
            "gateway-prefix",
            "4g. as 4, the model with `load_balancing: prefix_affinity` (Lua key of the body, Maglev)",
            lambda lp, ap: static_gateway_bootstrap(prefix_model_doc(upstream_port), lp, ap)[0],
        ),
        Variant("some-last", f"5. the same, {some} models, request for the last", gateway(some)),
        Variant("many-last", f"6. the same, {many} models, request for the last", gateway(many)),
        Variant(
            "many-first", f"7. the same, {many} models, request for the first", gateway(many), first_body
        ),
        Variant(
            "many-no-info",
            f"8. as 6, without the {2 * many} `GET /v1/models/{{name}}` routes",
            many_then(without_model_info_routes),
        ),
        Variant(
            "many-path-only",
            "9. as 6, `GET /v1/models/{name}` routes matched on the path alone (no `:method` matcher)",
            many_then(model_info_by_path_only),
        ),
        Variant(
            "many-reordered",
            "10. as 9, and the 400 `missing-model` route moved up, matched on an absent `model`",
            many_then(lambda b: missing_model_first(model_info_by_path_only(b))),
        ),
    ]


def _wait_for_reports(variant: Variant, sink: GrpcSink | None) -> None:
    """What the keyed Envoy sends the control plane really flows (after check_keyed's requests)."""
    if not variant.reports:
        return
    assert sink is not None
    if "usage" in variant.reports:
        wait_for("an access-log entry with token usage", lambda: sink.counter.with_usage > 0)
    if "quota" in variant.reports:
        wait_for("a quota report for the key's bucket", lambda: sink.quota_buckets() > 0)


def envoy_ablation(settings: ProfileSettings, work: Path) -> list[dict[str, Any]]:
    upstream, upstream_port = start_upstream(work, "upstream-profile")
    chosen = [v for v in variants(upstream_port, settings) if not settings.only or v.key in settings.only]
    # The control plane's access-log and quota services, for the keyed rows only.
    sink = GrpcSink().start() if any(v.headers for v in chosen) else None
    rows: list[dict[str, Any]] = []
    try:
        for variant in variants(upstream_port, settings, sink.port if sink else 0):
            if settings.only and variant.key not in settings.only:
                continue
            listen, admin = free_port(), free_port()
            started = time.monotonic()
            envoy = start_static_envoy(
                work, f"envoy-{variant.key}", variant.bootstrap(listen, admin), listen, admin
            )
            startup_s = time.monotonic() - started
            try:
                url = f"{envoy.url}{PATH}"
                if variant.headers:
                    check_keyed(url, variant.body, variant.headers)
                    _wait_for_reports(variant, sink)
                pids = {"envoy": envoy.process.pid, "upstream": upstream.pid}
                if variant.reports:
                    pids["sink"] = os.getpid()  # the stand-in control plane runs in this process
                for connections in (1, settings.saturating_concurrency):
                    run_load(url, variant.body, connections, settings.warmup_s, variant.headers)
                    logged = sink.counter.entries if sink else 0
                    cpu = ProcessCpu(pids)
                    cpu.start()
                    result = run_load(url, variant.body, connections, settings.duration_s, variant.headers)
                    cores = cpu.stop()
                    rows.append(
                        {
                            "variant": variant.key,
                            "label": variant.label,
                            "startup_s": startup_s,
                            **asdict(result),
                            "rps": result.rps,
                            "cores": cores,
                            "envoy_cpu_us_per_request": cpu.seconds["envoy"] / result.requests * 1e6
                            if result.requests
                            else math.nan,
                            # Log-stream entries that arrived during the run (flushed every second).
                            "stream_entries": (sink.counter.entries - logged) if sink else 0,
                        }
                    )
            finally:
                envoy.process.stop()
    finally:
        if sink is not None:
            sink.stop()
        upstream.stop()
    return rows


def render_ablation(rows: list[dict[str, Any]], settings: ProfileSettings) -> str:
    by = {(r["variant"], r["connections"]): r for r in rows}
    bare1 = by.get(("bare", 1))
    bare_sat = by.get(("bare", settings.saturating_concurrency))
    table = []
    for key in dict.fromkeys(r["variant"] for r in rows):
        one = by.get((key, 1))
        sat = by.get((key, settings.saturating_concurrency))
        if one is None or sat is None:
            continue
        table.append(
            [
                one["label"],
                fmt_ms(one["p50_ms"], 3),
                f"+{(one['p50_ms'] - bare1['p50_ms']) * 1000:.0f} µs" if bare1 else "n/a",
                f"{sat['rps']:,.0f}",
                f"{sat['cores']['envoy']:.2f}",
                f"{sat['envoy_cpu_us_per_request']:.1f} µs",
                f"+{sat['envoy_cpu_us_per_request'] - bare_sat['envoy_cpu_us_per_request']:.1f} µs"
                if bare_sat
                else "n/a",
                one["errors"] + sat["errors"],
                f"{one['startup_s']:.1f} s",
            ]
        )
    c = settings.saturating_concurrency
    return markdown_table(
        [
            "Envoy config",
            "p50 at c=1",
            "vs bare",
            f"req/s at c={c}",
            "Envoy cores",
            "Envoy CPU / request",
            "vs bare",
            "errors",
            "Envoy start",
        ],
        table,
    )


# ------------------------------------------------------------------ control plane profile
def profile_build(models: int, top: int) -> dict[str, Any]:
    registry = generated_registry(models, 4)
    state = build_state(registry, lambda host: host)
    node = NodeParams()
    build_snapshot(state, node)  # warm (imports, descriptor pools)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    build_snapshot(state, node)
    profiler.disable()
    wall = time.perf_counter() - started
    stats = pstats.Stats(profiler, stream=io.StringIO())
    entries = []
    for (filename, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        path = Path(filename)
        entries.append(
            {
                "function": f"{path.parent.name}/{path.name}:{line}({func})" if line else func,
                "ours": "control_plane" in filename,
                "calls": calls,
                "tottime_s": tottime,
                "cumtime_s": cumtime,
            }
        )
    by_tottime = sorted(entries, key=lambda e: e["tottime_s"], reverse=True)[:top]
    ours = sorted((e for e in entries if e["ours"]), key=lambda e: e["cumtime_s"], reverse=True)[:top]
    return {"models": models, "profiled_wall_s": wall, "by_tottime": by_tottime, "ours_by_cumtime": ours}


def render_build_profile(profile: dict[str, Any]) -> str:
    rows = [
        [f"`{e['function']}`", e["calls"], fmt_ms(e["tottime_s"] * 1000, 1), fmt_ms(e["cumtime_s"] * 1000, 1)]
        for e in profile["by_tottime"]
    ]
    return (
        f"`build_snapshot` on {profile['models']} models x 4 endpoints under cProfile: "
        f"{profile['profiled_wall_s'] * 1000:.0f} ms (cProfile's own cost included). "
        "Top functions by own time:\n\n"
        + markdown_table(["function", "calls", "own time", "cumulative"], rows)
    )


def run(settings: ProfileSettings) -> SectionResult:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llm-gw-profile-") as tmp:
        rows = envoy_ablation(settings, Path(tmp))
    build = profile_build(settings.build_models, settings.top)
    flip = measure_health_flip(settings.build_models, repeats=3, profile_top=settings.top)
    markdown = (
        "Envoy, one part of the gateway's config at a time (static bootstraps, `--concurrency 1`, "
        f"{settings.duration_s:g} s per cell):\n\n"
        + render_ablation(rows, settings)
        + "\n\n"
        + (
            f"API keys (rows 4d-4f), with latency percentiles:\n\n{keys}\n\n"
            if (keys := render_keys(rows, settings.saturating_concurrency))
            else ""
        )
        + render_build_profile(build)
        + "\n\n"
        + flip["markdown"]
        + "\n"
    )
    data = {"settings": asdict(settings), "envoy": rows, "build_profile": build, "health_flip": flip}
    return SectionResult(
        "profile",
        "Profile: Envoy per-request cost and snapshot build",
        markdown,
        data,
        time.monotonic() - started,
    )
