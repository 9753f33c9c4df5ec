"""The profile benchmark's API-key rows (loadtest/bench_profile.py 4d-4f) measure the checked path: their
static bootstraps are valid for the real Envoy, carry the key table inline, and a keyed Envoy answers the
benchmark's load (wrk with the key header) with 200s and the same load without the key with 401s."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from control_plane.devstack.procs import free_port
from control_plane.envoy_bootstrap import envoy_binary
from control_plane.xds.builders.keys import KEY_FILTER_NAME
from control_plane.xds.builders.quota import QUOTA_FILTER_NAME
from control_plane.xds.builders.usage import USAGE_FILTER_NAME
from loadtest._common import run_load, start_static_envoy, start_upstream
from loadtest.bench_overhead import BODY, PATH
from loadtest.bench_profile import ProfileSettings, variants
from loadtest.profile_keys import KEY_COUNT, bench_keys, check_keyed

pytestmark = pytest.mark.integration

KEYED: dict[str, set[str]] = {
    "gateway-keys": set(),
    "gateway-keys-usage": {USAGE_FILTER_NAME},
    "gateway-keys-quota": {USAGE_FILTER_NAME, QUOTA_FILTER_NAME},
}


def _filters(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    manager = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f for f in manager["http_filters"]}


def test_keyed_bootstraps_are_valid_and_inline_the_key_table(tmp_path: Path) -> None:
    key, entries = bench_keys()
    assert len(entries) == KEY_COUNT and len({e.sha256 for e in entries}) == KEY_COUNT
    rows = {v.key: v for v in variants(upstream_port=9, settings=ProfileSettings(), control_plane_port=8)}
    for name, extra in KEYED.items():
        variant = rows[name]
        assert variant.headers == {"authorization": f"Bearer {key}"}
        bootstrap = variant.bootstrap(10001, 10002)
        filters = _filters(bootstrap)
        assert {USAGE_FILTER_NAME, QUOTA_FILTER_NAME} & set(filters) == extra
        check = filters[KEY_FILTER_NAME]
        assert "config_discovery" not in check
        source = check["typed_config"]["default_source_code"]["inline_string"]
        assert entries[0].sha256 in source and entries[-1].sha256 in source and key not in source
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(bootstrap))
        out = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr[-2000:]


def test_the_load_carries_the_key(tmp_path: Path) -> None:
    upstream, port = start_upstream(tmp_path)
    try:
        variant = next(v for v in variants(port, ProfileSettings()) if v.key == "gateway-keys")
        listen, admin = free_port(), free_port()
        envoy = start_static_envoy(tmp_path, "envoy-keys", variant.bootstrap(listen, admin), listen, admin)
        try:
            url = f"{envoy.url}{PATH}"
            check_keyed(url, BODY, variant.headers)  # raises unless 401 without the key, 200 with it
            keyed = run_load(url, BODY, 4, 1.0, variant.headers)
            assert keyed.requests > 0 and keyed.errors == 0
            unkeyed = run_load(url, BODY, 4, 1.0)
            assert unkeyed.requests > 0 and unkeyed.errors == unkeyed.requests  # every one a 401
        finally:
            envoy.process.stop()
    finally:
        upstream.stop()
