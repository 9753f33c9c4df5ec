"""Type URLs and the names shared between resources."""

from __future__ import annotations

import hashlib
import re

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# HTTP filter configs delivered on their own (ECDS): the API-key table changes without a listener update.
EXTENSION_CONFIG = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"

# Envoy's recommended push order: clusters before their endpoints, listeners before their routes; filter
# configs before the listener that names them.
PUSH_ORDER = (CLUSTER, ENDPOINT, EXTENSION_CONFIG, LISTENER, ROUTE)
SHORT_NAMES = {CLUSTER: "cds", ENDPOINT: "eds", EXTENSION_CONFIG: "ecds", LISTENER: "lds", ROUTE: "rds"}

LISTENER_NAME = "gateway"
ROUTE_CONFIG_NAME = "gateway"
METADATA_NAMESPACE = "gateway"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def cluster_name(model_id: str) -> str:
    """A cluster name that is safe in Envoy stat names ('.' splits them) and unique per model id."""
    safe = _UNSAFE.sub("_", model_id)
    if safe != model_id:
        # Two ids may sanitise to the same string; a short hash of the original keeps them apart.
        safe += "_" + hashlib.sha256(model_id.encode()).hexdigest()[:8]
    return f"model_{safe}"
