"""A model route's retry policy and idle timeout: which failures are tried on another replica, and how
long a silent exchange may last (retries included). Pure functions of the model's registry settings."""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from google.protobuf import any_pb2

from control_plane.state import ModelState
from control_plane.xds.builders._common import seconds, uint32


def retry_policy(model: ModelState) -> rc.RetryPolicy:
    retry = model.config.retry
    previous_hosts = any_pb2.Any()
    previous_hosts.Pack(previous_hosts_pb2.PreviousHostsPredicate())
    # Only causes that say a replica failed. `reset` covers a connection broken mid-request (a killed
    # replica) and a try cut by the per-try idle timeout (a hung one). Never an engine's 429/503 (unless
    # the registry asks): that is how an engine says it is full, and a retry would add load to a fleet
    # that is already saturated. Envoy never retries a circuit-breaker overflow itself.
    conditions = ["connect-failure", "refused-stream", "reset"]
    if retry.retriable_status_codes:
        conditions.append("retriable-status-codes")
    policy = rc.RetryPolicy(
        # Envoy never retries once a response byte went downstream, so each of these is safe for a
        # generation: the client sees one answer, at worst the backend did some work twice.
        retry_on=",".join(conditions),
        retriable_status_codes=list(retry.retriable_status_codes),
        num_retries=uint32(retry.attempts),
        retry_host_predicate=[
            rc.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts", typed_config=previous_hosts
            )
        ],
        host_selection_retry_max_attempts=3,
        retry_back_off=rc.RetryPolicy.RetryBackOff(base_interval=seconds(0.025), max_interval=seconds(0.25)),
    )
    if retry.timeout_retries:
        # A replica that accepted the request and went silent is given up for another one (before any
        # byte reached the client). How many times is bounded by the route's idle timeout, see below.
        policy.per_try_idle_timeout.CopyFrom(seconds(_silence_s(model)))
    return policy


def _silence_s(model: ModelState) -> float:
    """The longest silence of one try. A launched model's request may wait in the activator while the
    model loads (its activation timeout) before any byte comes back: that silence is allowed too."""
    idle = model.config.limits.idle_timeout_s
    launch = model.config.launch
    return max(idle, launch.activation_timeout_s + 5) if launch is not None else idle


def route_idle_timeout_s(model: ModelState) -> float:
    """The route's idle timeout: silence allowed to the whole exchange, retries included.

    Envoy has one retry count for every cause, so the retries after a silent try are bounded here: a
    silent try costs `idle_timeout_s`, and the route gives up after `timeout_retries + 1` of them (the
    last try gets that minus the few ms of back-off before it). A slow but live fleet thus sees at most
    `timeout_retries` extra requests per request, while a killed replica's requests keep all `attempts`.
    """
    return _silence_s(model) * (model.config.retry.timeout_retries + 1)
