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
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from control_plane.devstack.procs import ManagedProcess, http_ok
from control_plane.devstack.stack import EnvoyHandle, LocalStack, StackSettings
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
    simulators: bool = True,
) -> Iterator[LocalStack]:
    """Start simulators, control plane and one Envoy for a registry document; stop them all on exit.

    The stack lives in a fresh temporary directory (or ``keep_dir``, kept afterwards); on an error the
    tails of its logs are printed to stderr. ``simulators=False`` starts no simulator: the registry's
    endpoints are servers the caller runs (e.g. ``loadtest.bench_upstream``).
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
            if simulators:
                stack.start()
            else:
                stack.start_control_plane()
                stack.start_envoy()
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


# ------------------------------------------------------------------ results
def finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def write_results(name: str, payload: Mapping[str, Any], path: Path | None = None) -> Path:
    """Write ``payload`` as JSON to ``path`` (default ``loadtest/results/<name>-<UTC time>.json``)."""
    path = path or RESULTS_DIR / f"{name}-{utc_stamp()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(dict(payload)), indent=2, default=str) + "\n")
    return path


# ------------------------------------------------------------------ plain processes
def start_upstream(work: Path, name: str = "upstream", model: str = "bench") -> tuple[ManagedProcess, int]:
    """Start ``loadtest.bench_upstream`` (the fast fake model server) on a free port; return it, its port."""
    process = ManagedProcess(
        name,
        [sys.executable, "-m", "loadtest.bench_upstream", "--port", "0", "--model", model],
        work / "logs" / f"{name}.log",
        cwd=REPO_ROOT,
    ).start()
    match = process.wait_for_line(r"^READY http://[\d.]+:(\d+)", timeout_s=30)
    return process, int(match.group(1))


def start_static_envoy(
    work: Path,
    name: str,
    bootstrap: Mapping[str, Any],
    listen_port: int,
    admin_port: int,
    concurrency: int = 1,
    timeout_s: float = 60.0,
) -> EnvoyHandle:
    """Start an Envoy on a static bootstrap (a dict, written as JSON) and wait until it is ready.

    The caller stops it (``.process.stop()``)."""
    config = work / f"{name}.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(bootstrap, indent=1))
    argv = [
        envoy_binary(),
        "-c",
        str(config),
        "--concurrency",
        str(concurrency),
        "--log-level",
        "warning",
        "--disable-hot-restart",
        "--drain-time-s",
        "1",
    ]
    process = ManagedProcess(name, argv, work / "logs" / f"{name}.log").start()
    envoy = EnvoyHandle(process=process, node_id=name, listen_port=listen_port, admin_port=admin_port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"Envoy {name} exited:\n{process.log_text()[-3000:]}")
        if http_ok(f"{envoy.admin_url}/ready"):
            return envoy
        time.sleep(0.05)
    process.stop()
    raise TimeoutError(f"Envoy {name} not ready within {timeout_s:.0f}s:\n{process.log_text()[-3000:]}")


def envoy_counters(admin_url: str, prefix: str = "") -> dict[str, int]:
    """Envoy's counters and gauges (``/stats``, optionally filtered by a regex) as a dict; {} on error."""
    url = f"{admin_url}/stats?format=json" + (f"&filter={prefix}" if prefix else "")
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            doc = json.loads(response.read())
    except (OSError, ValueError):
        return {}
    return {
        s["name"]: int(s["value"])
        for s in doc.get("stats", [])
        if isinstance(s.get("value"), int | float)  # text readouts are skipped
    }


# ------------------------------------------------------------------ HTTP load (wrk, else Python)
@dataclass(frozen=True)
class LoadResult:
    """One closed-loop load run: ``connections`` clients each sending the next request on its answer."""

    client: str
    """``wrk`` or ``python`` (the fallback, which bounds the figures itself)."""
    connections: int
    duration_s: float
    requests: int
    errors: int
    """Connection errors, timeouts and non-2xx answers."""
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    client_cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else math.nan


_WRK_LUA = """
wrk.method = "POST"
wrk.body = [==[BODY]==]
wrk.headers["Content-Type"] = "application/json"
HEADERS
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,"
    .. "\\"status\\":%d,\\"timeout\\":%d,\\"p50\\":%d,\\"p90\\":%d,\\"p99\\":%d,\\"max\\":%d}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def run_wrk(
    url: str,
    body: str,
    connections: int,
    duration_s: float,
    timeout_s: float = 5.0,
    headers: Mapping[str, str] | None = None,
) -> LoadResult:
    """``wrk -t1`` (one client thread, to leave the cores to what is measured) POSTing ``body`` to ``url``,
    with ``headers`` on every request besides the JSON content type."""
    binary = wrk_binary()
    if binary is None:
        raise FileNotFoundError("wrk is not installed")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        lines = (f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in (headers or {}).items())
        extra = "".join(lines)
        script.write(_WRK_LUA.replace("HEADERS\n", extra).replace("BODY", body))
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(
            [
                binary,
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(duration_s))}s",
                f"--timeout={timeout_s:g}s",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=duration_s + 60,
            check=False,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        os.unlink(script.name)
    match = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk gave no result (rc {out.returncode}):\n{out.stdout}\n{out.stderr}")
    doc = json.loads(match.group(1))
    errors = sum(int(doc[k]) for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        client="wrk",
        connections=connections,
        duration_s=doc["duration_us"] / 1e6,
        requests=int(doc["requests"]),
        errors=errors,
        p50_ms=doc["p50"] / 1000,
        p90_ms=doc["p90"] / 1000,
        p99_ms=doc["p99"] / 1000,
        max_ms=doc["max"] / 1000,
        client_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    )


async def _python_load(
    url: str, body: str, connections: int, duration_s: float, extra_headers: Mapping[str, str] | None = None
) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    payload = body.encode()
    headers = {"content-type": "application/json", **(extra_headers or {})}
    cpu0 = own_cpu_seconds()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
        started = time.monotonic()
        stop_at = started + duration_s

        async def client() -> None:
            nonlocal errors
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=payload, headers=headers) as response:
                        await response.read()
                        ok = response.status < 300
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        await asyncio.gather(*(client() for _ in range(connections)))
        wall = time.monotonic() - started
    return LoadResult(
        client="python",
        connections=connections,
        duration_s=wall,
        requests=len(latencies) + errors,
        errors=errors,
        p50_ms=percentile(latencies, 50) * 1000,
        p90_ms=percentile(latencies, 90) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        max_ms=max(latencies, default=math.nan) * 1000,
        client_cpu_s=own_cpu_seconds() - cpu0,
    )


def run_load(
    url: str, body: str, connections: int, duration_s: float, headers: Mapping[str, str] | None = None
) -> LoadResult:
    """Closed-loop POST load: ``wrk`` when installed, else an asyncio client (much slower: it bounds the
    figures, so results say which client ran). ``headers`` go on every request (an API key)."""
    if wrk_binary() is not None:
        return run_wrk(url, body, connections, duration_s, headers=headers)
    return asyncio.run(_python_load(url, body, connections, duration_s, headers))


class ProcessCpu:
    """CPU seconds used by a set of processes (by PID) between ``start()`` and ``stop()``, in cores."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self.pids = dict(pids)
        self._start: dict[str, float] = {}
        self._wall = 0.0
        self.seconds: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: process_cpu_seconds(pid) for name, pid in self.pids.items()}
        self._wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        """Cores used by each process over the interval; the CPU seconds stay in ``self.seconds``."""
        wall = time.monotonic() - self._wall
        self.seconds = {
            name: process_cpu_seconds(pid) - self._start.get(name, math.nan)
            for name, pid in self.pids.items()
        }
        return {name: seconds / wall for name, seconds in self.seconds.items()}


# ------------------------------------------------------------------ the suite's sections
@dataclass
class SectionResult:
    """What one section of ``python -m loadtest.bench`` hands back: its markdown and its raw figures."""

    key: str
    title: str
    markdown: str
    data: dict[str, Any]
    wall_s: float = 0.0


def fmt_ms(value: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f} ms"


def fmt_x(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.2f}x"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A markdown table; ``align`` is one letter per column (``l`` or ``r``; default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
