"""HTTP helpers for talking to the gateway in tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx


def chat(client: httpx.Client, base: str, model: str, content: str = "Hello", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}
    return client.post(f"{base}/v1/chat/completions", json=body)


def served_by(response: httpx.Response) -> str:
    """The endpoint id that answered: the simulator puts it in system_fingerprint."""
    return str(response.json()["system_fingerprint"])


def eventually(check: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout_s}s")


def envoy_stat(client: httpx.Client, admin_url: str, name: str) -> int:
    text = client.get(f"{admin_url}/stats", params={"filter": f"^{name}$"}).text
    for line in text.splitlines():
        key, _, val = line.partition(": ")
        if key == name:
            return int(val)
    return 0


def prometheus_value(client: httpx.Client, url: str, sample: str, **labels: str) -> float:
    """One sample of a Prometheus text page (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get(url).text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def envoy_cluster_hosts(client: httpx.Client, admin_url: str, cluster: str) -> set[str]:
    """host:port of the endpoints Envoy currently has for a cluster (from its admin /clusters)."""
    hosts = set()
    for line in client.get(f"{admin_url}/clusters").text.splitlines():
        parts = line.split("::")
        if len(parts) >= 3 and parts[0] == cluster and parts[2] == "cx_active":
            hosts.add(parts[1])
    return hosts


def admin_client(stack: Any, timeout_s: float = 10.0) -> httpx.Client:
    """An httpx client for the stack's admin API, with its bearer token."""
    return httpx.Client(
        base_url=stack.admin_url,
        headers={"authorization": f"Bearer {stack.settings.admin_token}"},
        timeout=timeout_s,
    )
