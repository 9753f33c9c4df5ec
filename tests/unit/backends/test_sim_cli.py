"""The real command line, as a subprocess: READY line, signals, crash knob, argument errors."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[3]


@contextmanager
def simulator(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    cmd = [sys.executable, "-m", "backends.simulator", "--host", "127.0.0.1", "--port", "0", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "no READY line within 15 s"
        line = proc.stdout.readline()
        match = re.fullmatch(r"READY (http://127\.0\.0\.1:(\d+))\n", line)
        assert match, f"unexpected first line {line!r}; stderr: {proc.stderr.read() if proc.poll() else ''}"
        assert int(match.group(2)) > 0
        yield proc, match.group(1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_cli_serves_and_stops_on_sigterm():
    args = ["--engine", "vllm", "--model-id", "qwen2", "--endpoint-id", "qwen2-7", "--profile", "fast"]
    with simulator(*args, "--served-name", "a", "--served-name", "b", "c", "--max-batch", "3") as (proc, url):
        assert httpx.get(f"{url}/health").status_code == 200
        models = httpx.get(f"{url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["qwen2", "a", "b", "c"]
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert r.status_code == 200 and r.json()["system_fingerprint"] == "qwen2-7"
        assert httpx.get(f"{url}/sim/state").json()["max_batch"] == 3
        # a hung request must not hold up shutdown
        httpx.post(f"{url}/sim/control", json={"hang": True})
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=0.2)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - start < 2  # in-flight requests are aborted, not awaited
        assert proc.stdout is not None and proc.stdout.read() == ""


def test_cli_sigint_exits_zero():
    with simulator("--engine", "tei", "--model-id", "bge", "--endpoint-id", "bge-0") as (proc, url):
        assert httpx.post(f"{url}/embed", json={"inputs": "x"}).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


def test_cli_crash_knob_exits_abruptly():
    with simulator("--engine", "tgi", "--model-id", "qwen2", "--endpoint-id", "qwen2-0") as (proc, url):
        r = httpx.post(f"{url}/sim/control", json={"crash": True})
        assert r.status_code == 200
        assert proc.wait(10) == 1


def test_cli_rejects_bad_arguments():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for bad in (
        ["--engine", "nope", "--model-id", "m"],
        ["--engine", "vllm"],
        ["--engine", "vllm", "--model-id", "m", "--error-rate", "2"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "backends.simulator", *bad],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, (bad, result.stderr)
        assert result.stdout == ""
