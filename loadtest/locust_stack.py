"""Run the locust load test against a local stack of its own, with a chosen simulator latency profile.

``make run`` always uses the simulator's ``default`` profile on fixed ports. This starts the same stack
(the registry's models, simulated model servers, control plane, one Envoy with ``--concurrency 2`` as in
``make run``) on free loopback ports, waits until every model answers, runs locust against it, prints
the CPU each part used, and stops every process it started:

    python -m loadtest.locust_stack [--profile default] [--sim-args "--decode-ms-per-token 10"] \\
        -- --headless -u 50 -r 10 -t 60s --scenario seeds --csv loadtest/results/seeds

Everything after ``--`` goes to locust (``-f loadtest/locustfile.py`` and ``--host`` are added).
Without locust arguments it only serves the stack until Ctrl-C (or ``--serve-for`` seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from control_plane.devstack.procs import free_port
from control_plane.devstack.stack import LocalStack, StackSettings, is_loopback
from control_plane.envoy_bootstrap import REPO_ROOT
from loadtest._common import CpuMeter, machine_info, stack_processes

LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"


def registry_on_free_ports(config: Path) -> dict[str, Any]:
    """The registry document with every loopback endpoint moved to a free port (so that this stack never
    collides with ``make run``) and upstream-host headers on."""
    doc = yaml.safe_load(config.read_text())
    for model in doc.get("models", []):
        for endpoint in model.get("endpoints", []):
            url = str(endpoint["url"])
            host = url.split("://", 1)[-1].rsplit(":", 1)[0]
            if is_loopback(host):
                endpoint["url"] = f"http://127.0.0.1:{free_port()}"
    doc.setdefault("gateway", {})["expose_upstream_host"] = True
    return dict(doc)


def wait_models(base_url: str, models: Sequence[str], timeout_s: float = 30.0) -> None:
    """Wait until a one-token chat completion succeeds for every model (clusters and endpoints are in)."""
    deadline = time.monotonic() + timeout_s
    pending = list(models)
    last = ""
    while pending and time.monotonic() < deadline:
        body = json.dumps(
            {"model": pending[0], "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        ).encode()
        request = urllib.request.Request(
            f"{base_url}/v1/chat/completions", body, {"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    pending.pop(0)
                    continue
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    if pending:
        raise TimeoutError(
            f"models {pending} not routable through {base_url} within {timeout_s:.0f}s: {last}"
        )


def run_locust(base_url: str, locust_args: Sequence[str], timeout_s: float) -> tuple[int, float]:
    """Run locust to its end; (exit code, CPU seconds it used)."""
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", base_url, *locust_args]
    print("$ " + shlex.join(argv), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(argv, cwd=REPO_ROOT)
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
    except KeyboardInterrupt:  # Ctrl-C reached locust too: let it write its reports
        code = process.wait(timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return code, cpu


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # stop the stack on SIGTERM as on Ctrl-C
    args_list = list(sys.argv[1:] if argv is None else argv)
    locust_args: list[str] = []
    if "--" in args_list:
        cut = args_list.index("--")
        args_list, locust_args = args_list[:cut], args_list[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "models.yaml", help="registry to copy")
    parser.add_argument("--profile", default="default", help="simulator profile: instant|fast|default|slow")
    parser.add_argument(
        "--sim-args", default="", help='extra simulator flags, e.g. "--decode-ms-per-token 10"'
    )
    parser.add_argument("--envoy-concurrency", type=int, default=2, help="Envoy worker threads (make run: 2)")
    parser.add_argument("--timeout", type=float, default=900.0, help="longest locust run, seconds")
    parser.add_argument(
        "--serve-for", type=float, default=0.0, help="without locust: serve this long (0: Ctrl-C)"
    )
    parser.add_argument("--keep-dir", type=Path, default=None, help="keep the stack's files (logs) here")
    args = parser.parse_args(args_list)

    doc = registry_on_free_ports(args.config)
    models = [m["id"] for m in doc.get("models", []) if m.get("enabled", True)]
    with contextlib.ExitStack() as cleanup:
        if args.keep_dir is None:
            work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="llm-gw-locust-")))
        else:
            work = args.keep_dir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        config = work / "models.yaml"
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        sim_args = shlex.split(args.sim_args)
        endpoint_ids = [
            str(e.get("id") or f"{m['id']}-{i}")
            for m in doc.get("models", [])
            for i, e in enumerate(m.get("endpoints", []))
        ]
        stack = LocalStack(
            StackSettings(
                config_path=config,
                work_dir=work,
                python=sys.executable,
                sim_profile=args.profile,
                sim_extra_args={endpoint: list(sim_args) for endpoint in endpoint_ids},
                envoy_concurrency=args.envoy_concurrency,
            )
        )
        cleanup.callback(stack.stop)
        try:
            stack.start()
            base_url = stack.envoys[0].url
            wait_models(base_url, models)
        except (RuntimeError, TimeoutError, OSError) as exc:
            print(f"error: the stack did not start: {exc}", file=sys.stderr)
            for log in sorted((work / "logs").glob("*.log")):
                print(
                    f"----- {log.name} (tail) -----\n{log.read_text(errors='replace')[-1500:]}",
                    file=sys.stderr,
                )
            return 1
        info = machine_info()
        print(
            f"stack up: {base_url} (models {', '.join(models)}; simulator profile {args.profile}"
            f"{' ' + args.sim_args if args.sim_args else ''}; Envoy --concurrency {args.envoy_concurrency})\n"
            f"machine: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
            f"Envoy {info['envoy']}, {info['date_utc']}",
            flush=True,
        )
        if not locust_args:
            deadline = time.monotonic() + args.serve_for if args.serve_for > 0 else None
            with contextlib.suppress(KeyboardInterrupt):
                while deadline is None or time.monotonic() < deadline:
                    time.sleep(0.5)
            return 0
        meter = CpuMeter(stack_processes(stack))
        meter.start()
        code, locust_cpu = run_locust(base_url, locust_args, args.timeout)
        result = meter.stop()
        wall = result["wall_s"]
        cores = {name: value for name, value in result["cores_used"].items() if name != "client"}
        cores["locust"] = locust_cpu / wall if wall > 0 else float("nan")
        print(f"\nCPU during the run ({wall:.0f} s wall; cores used, {info['nproc']} available):")
        for name, value in sorted(cores.items(), key=lambda item: -item[1]):
            print(f"  {name:<28} {value:5.2f}")
        print(f"  {'total (these processes)':<28} {sum(cores.values()):5.2f}")
        print(f"  host busy                    {result['host_busy_fraction'] * 100:5.1f} %")
        return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
