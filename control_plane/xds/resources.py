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


# The route of each name a model answers to (route.py). Fallbacks, shedding and the high-priority reserve
# rewrite these routes and find them by this name.
MODEL_ROUTE_PREFIX = "model:"


def model_route_name(client_name: str) -> str:
    return f"{MODEL_ROUTE_PREFIX}{client_name}"


def model_route_client_name(route_name: str) -> str | None:
    """The model name (id or alias) a model route answers to; None for any other route."""
    return route_name.removeprefix(MODEL_ROUTE_PREFIX) if route_name.startswith(MODEL_ROUTE_PREFIX) else None
