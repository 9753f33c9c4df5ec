"""Helpers shared by the benchmarks: local stacks, a streaming chat client, statistics, machine facts.

Benchmarks start their own stacks with ``control_plane.devstack`` (the code of ``make run`` and of the
integration tests) on ephemeral loopback ports, and always stop every process they started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from control_plane.devstack.procs import ManagedProcess
from control_plane.devstack.stack import LocalStack, StackSettings
from control_plane.envoy_bootstrap import REPO_ROOT, envoy_binary

RESULTS_DIR = REPO_ROOT / "loadtest" / "results"


# ------------------------------------------------------------------ statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(value: float, reference: float) -> float:
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return math.nan
    return value / reference


# ------------------------------------------------------------------ machine
def envoy_version() -> str:
    try:
        out = subprocess.run(
            [envoy_binary(), "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    match = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return match.group(1) if match else out.strip() or "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "envoy": envoy_version(),
        "platform": platform.platform(),
    }


# ------------------------------------------------------------------ CPU accounting
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of one process (Linux /proc); NaN when unknown."""
    if pid is None:
        return math.nan
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _TICKS


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def host_cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole host from /proc/stat; (NaN, NaN) when unknown."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return math.nan, math.nan
    values = [float(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])


class CpuMeter:
    """CPU used by named processes (and this client) between ``start()`` and ``stop()``."""

    def __init__(self, processes: Mapping[str, ManagedProcess]) -> None:
        self.processes = dict(processes)
        self._start: dict[str, float] = {}
        self._host: tuple[float, float] = (math.nan, math.nan)
        self._wall = 0.0
        self.result: dict[str, Any] = {}

    def _sample(self) -> dict[str, float]:
        sample = {name: process_cpu_seconds(p.pid) for name, p in self.processes.items()}
        sample["client"] = own_cpu_seconds()
        return sample

    def start(self) -> None:
        self._start = self._sample()
        self._host = host_cpu_times()
        self._wall = time.monotonic()

    def stop(self) -> dict[str, Any]:
        end = self._sample()
        busy, total = host_cpu_times()
        wall = time.monotonic() - self._wall
        per_process = {name: end[name] - self._start.get(name, math.nan) for name in end}
        self.result = {
            "wall_s": wall,
            "host_busy_fraction": (busy - self._host[0]) / (total - self._host[1])
            if total > self._host[1]
            else math.nan,
            "cores_used": {name: seconds / wall for name, seconds in per_process.items()},
        }
        return self.result


# ------------------------------------------------------------------ stacks
@contextlib.contextmanager
def local_stack(
    doc: Mapping[str, Any],
    *,
    sim_profile: str = "default",
    sim_extra_args: Mapping[str, list[str]] | None = None,
    keep_dir: Path | None = None,
) -> Iterator[LocalStack]:
    """Start simulators, control plane and one Envoy for a registry document; stop them all on exit.

    The stack lives in a fresh temporary directory (or ``keep_dir``, kept afterwards); on an error the
    tails of its logs are printed to stderr.
    """
    with contextlib.ExitStack() as cleanup:
        if keep_dir is None:
            work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="llm-gw-bench-")))
        else:
            work = keep_dir
            work.mkdir(parents=True, exist_ok=True)
        config = work / "models.yaml"
        config.write_text(yaml.safe_dump(dict(doc), sort_keys=False))
        stack = LocalStack(
            StackSettings(
                config_path=config,
                work_dir=work,
                python=sys.executable,
                sim_profile=sim_profile,
                sim_extra_args={k: list(v) for k, v in (sim_extra_args or {}).items()},
            )
        )
        try:
            stack.start()
            yield stack
        except BaseException:
            for log in sorted((work / "logs").glob("*.log")):
                with contextlib.suppress(OSError):
                    tail = log.read_text(errors="replace")[-2000:]
                    print(f"----- {log.name} (tail) -----\n{tail}", file=sys.stderr)
            raise
        finally:
            stack.stop()


def stack_processes(stack: LocalStack) -> dict[str, ManagedProcess]:
    processes: dict[str, ManagedProcess] = {f"sim:{k}": p for k, p in stack.simulators.items()}
    if stack.control_plane is not None:
        processes["control-plane"] = stack.control_plane
    for envoy in stack.envoys:
        processes[f"envoy:{envoy.node_id}"] = envoy.process
    return processes


def admin_headers(stack: LocalStack) -> dict[str, str]:
    return {"authorization": f"Bearer {stack.settings.admin_token}"}


# ------------------------------------------------------------------ streaming client
@dataclass(frozen=True, slots=True)
class StreamResult:
    """One streamed chat completion as the client saw it. Times are ``time.monotonic()`` seconds."""

    started: float
    finished: float
    status: int
    """HTTP status; 0 when no response arrived (connection error, client timeout)."""
    ok: bool
    """200, at least one content chunk, and the closing ``[DONE]``."""
    ttft: float
    """Seconds to the first SSE chunk with non-empty content; NaN without one."""
    endpoint: str
    """``x-served-by-endpoint`` (or the ``system_fingerprint``); empty when unknown."""
    completion_tokens: int
    error: str = ""

    @property
    def latency(self) -> float:
        return self.finished - self.started


def _content_of(event: Mapping[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    delta = choices[0].get("delta") or {}
    content = delta.get("content")
    return content if isinstance(content, str) else ""


async def stream_chat(
    session: aiohttp.ClientSession, url: str, body: Mapping[str, Any], timeout_s: float
) -> StreamResult:
    """POST a streaming chat completion and read it to the end.

    Only the events up to the first content and the last one before ``[DONE]`` (the usage chunk) are
    parsed, to keep the client's CPU share small.
    """
    started = time.monotonic()
    status, ttft, endpoint, tokens = 0, math.nan, "", 0
    content_seen = done = False
    last_data = ""
    try:
        async with asyncio.timeout(timeout_s), session.post(url, json=body) as response:
            status = response.status
            endpoint = response.headers.get("x-served-by-endpoint", "")
            if status != 200:
                text = await response.text()
                return StreamResult(started, time.monotonic(), status, False, ttft, endpoint, 0, text[:200])
            async for raw in response.content:
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip().decode()
                if data == "[DONE]":
                    done = True
                    break
                last_data = data
                if not content_seen:
                    event = json.loads(data)
                    if not endpoint:
                        endpoint = str(event.get("system_fingerprint") or "")
                    if _content_of(event):
                        content_seen = True
                        ttft = time.monotonic() - started
        if last_data:
            usage = json.loads(last_data).get("usage") or {}
            tokens = int(usage.get("completion_tokens") or 0)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return StreamResult(
            started, time.monotonic(), status, False, ttft, endpoint, tokens, f"{type(exc).__name__}: {exc}"
        )
    finished = time.monotonic()
    ok = content_seen and done
    error = "" if ok else ("no [DONE]" if content_seen else "no content")
    return StreamResult(started, finished, status, ok, ttft, endpoint, tokens, error)


async def wait_routable(
    session: aiohttp.ClientSession, base_url: str, model: str, timeout_s: float = 30.0
) -> None:
    """Wait until the gateway answers a chat completion for ``model`` (its clusters and EDS are in)."""
    deadline = time.monotonic() + timeout_s
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    last = ""
    while time.monotonic() < deadline:
        try:
            async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
                if response.status == 200:
                    await response.read()
                    return
                last = f"{response.status} {(await response.text())[:200]}"
        except aiohttp.ClientError as exc:
            last = repr(exc)
        await asyncio.sleep(0.2)
    raise TimeoutError(f"model {model!r} not routable through {base_url} within {timeout_s:.0f}s: {last}")
