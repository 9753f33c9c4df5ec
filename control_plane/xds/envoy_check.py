"""Envoy's own verdict on a cluster before it is pushed: `envoy --mode validate` on a bootstrap that holds
the cluster statically.

Used only for clusters carrying `cluster_overrides`, the escape hatch whose values the registry schema
cannot check: the generated part of a cluster is known good. Validate mode builds the whole config
(protobuf constraints, then the cluster factories: TLS files, incompatible options) without opening a
socket, in about 70 ms here. What it cannot see (a rare check only a running Envoy makes) is still caught
by the ACK/NACK wait after the push.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import json_format

from control_plane.envoy_bootstrap import envoy_binary

log = logging.getLogger(__name__)

TIMEOUT_S = 20.0
# `off`: no check before the push (a control plane with no Envoy binary, or one of another version than
# its Envoys); the ACK/NACK wait after the push still rolls back what an Envoy rejects.
SWITCH = "GATEWAY_ENVOY_VALIDATE"
# Validation errors of a static cluster come wrapped in the bootstrap's path; Envoy's NACK of the same
# cluster over CDS names only the cluster's part.
_BOOTSTRAP_WRAPPING = re.compile(
    r"BootstrapValidationError\.StaticResources: embedded message failed validation \| caused by "
    r"StaticResourcesValidationError\.Clusters\[\d+\]: embedded message failed validation \| caused by "
)


_DEBUG_MARKER = re.compile(r":?\s*goo\.gle/debug\w*\s*$")


class EnvoyUnavailable(Exception):
    """No Envoy binary to ask, or it did not answer in time: the check is skipped, not failed."""


def _message(output: str) -> str:
    """Envoy's reason, out of its log. The critical line holds it after the file name, unless it points
    at a dump of the offending proto (`goo.gle/debugstr`); a constraint failure then follows the dump
    on a last line starting with ": "; a short dump (the bad value) is kept."""
    lines = [line.rstrip() for line in output.strip().splitlines() if line.strip()]
    at = next((i for i, line in enumerate(lines) if "error initializing configuration" in line), None)
    if at is None:
        return lines[-1] if lines else "Envoy refused the configuration (no message)"
    found = re.search(r"error initializing configuration '[^']*': (.*)", lines[at])
    head = _DEBUG_MARKER.sub("", found.group(1) if found else lines[at]).strip().removesuffix(":")
    rest = lines[at + 1 :]
    parts = [head] if head else []
    if rest and rest[-1].startswith(": "):
        parts.append(rest[-1][2:])
    elif 0 < len(rest) <= 3:
        parts.append("(" + "; ".join(line.strip() for line in rest) + ")")
    return _BOOTSTRAP_WRAPPING.sub("", ": ".join(parts)).strip() or "Envoy refused the configuration"


def cluster_problem(cluster: cluster_pb2.Cluster, binary: str | None = None) -> str | None:
    """Envoy's reason for refusing `cluster`, or None if it accepts it. Blocking: run it in a thread."""
    try:
        binary = binary or envoy_binary()
    except FileNotFoundError as exc:
        raise EnvoyUnavailable(str(exc)) from None
    bootstrap = {
        "node": {"id": "llm-gateway-validate", "cluster": "llm-gateway-validate"},
        "static_resources": {
            "clusters": [json_format.MessageToDict(cluster, preserving_proto_field_name=True)]
        },
    }
    with tempfile.TemporaryDirectory(prefix="cluster-check-") as work:
        path = Path(work) / "bootstrap.json"
        path.write_text(json.dumps(bootstrap), encoding="utf-8")
        try:
            done = subprocess.run(
                [binary, "--mode", "validate", "-c", str(path), "-l", "error", "--disable-hot-restart"],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EnvoyUnavailable(f"cannot run {binary} --mode validate: {exc}") from None
    if done.returncode == 0:
        return None
    return _message(done.stderr + done.stdout)


def cluster_problems(clusters: Sequence[cluster_pb2.Cluster]) -> dict[str, str]:
    """Envoy's reason per refused cluster name; {} when all pass. One run per cluster, so each reason
    names its cluster. Without an Envoy binary nothing is checked (logged): the NACK wait remains."""
    if os.environ.get(SWITCH, "").lower() in ("off", "0", "false", "no"):
        return {}
    problems = {}
    for cluster in clusters:
        try:
            problem = cluster_problem(cluster)
        except EnvoyUnavailable as exc:
            log.warning("cluster %s not checked by Envoy before the push: %s", cluster.name, exc)
            continue
        if problem is not None:
            problems[cluster.name] = problem
    return problems
