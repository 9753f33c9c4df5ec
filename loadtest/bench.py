"""The benchmark suite (``make bench``): every figure of docs/benchmarks.md side by side, in one run.

    python -m loadtest.bench [--quick] [--only overhead,streaming,...] [--skip balancing] [--out FILE.md]

Sections, in this order (each starts and stops its own processes, on loopback ports):

- ``overhead``     the same fast backend direct, through a bare Envoy and through the gateway (wrk)
- ``streaming``    added time to first chunk and inter-chunk spacing, direct vs gateway
- ``failover``     one of two replicas SIGKILLed, then one hung, under 64 clients; overloaded fleets
- ``convergence``  admin drain/undrain and health flips: from the change to Envoy applying it
- ``scale``        snapshot build and push/ACK for 10, 100, 1000 models (10 ADS clients, one real Envoy)
- ``profile``      Envoy's per-request cost of each part of the gateway's config; cProfile of the build
                   (``BENCH_PROFILE_ONLY=bare,gateway,...`` in the environment: only those Envoy rows)
- ``balancing``    ``loadtest.bench_balancing`` with short arguments (full run only)
- ``activation``   a launched model: cold-request overhead beyond the engine's own load; warm path (wrk)
- ``prefix``       ``loadtest.bench_prefix``: multi-turn chat on 4 replicas with prefix caches, round robin vs
                   least request vs prefix affinity, and one hot prefix (quick: least request vs prefix
                   affinity only)
- ``priority``     ``loadtest.bench_priority``: a high-priority stream's TTFT while low priority overloads
                   two replicas: shedding with a reserve for high, shedding alone, neither

The full run takes about 10 minutes on 2 cores, ``--quick`` about 3. Prints markdown and writes every
figure as JSON to ``loadtest/results/bench-<UTC time>.json`` (git-ignored). A benchmark, not a test:
nothing here asserts on timings; a section that fails is reported and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadtest import (
    bench_activation,
    bench_balancing,
    bench_convergence,
    bench_failover,
    bench_overhead,
    bench_prefix,
    bench_priority,
    bench_profile,
    bench_scale,
    bench_streaming,
)
from loadtest._common import SectionResult, host_cpu_times, machine_info, write_results, wrk_binary

SECTIONS = (
    "overhead",
    "streaming",
    "failover",
    "convergence",
    "scale",
    "profile",
    "balancing",
    "activation",
    "prefix",
    "priority",
)
QUICK_SKIPS = ("balancing",)


def _overhead(quick: bool) -> SectionResult:
    if quick:
        return bench_overhead.run(bench_overhead.OverheadSettings((1, 32), duration_s=1.5, warmup_s=0.5))
    return bench_overhead.run(bench_overhead.OverheadSettings((1, 8, 32, 64), duration_s=4.0, warmup_s=1.0))


def _streaming(quick: bool) -> SectionResult:
    return bench_streaming.run(bench_streaming.StreamingSettings(duration_s=5.0 if quick else 20.0))


def _failover(quick: bool) -> SectionResult:
    if quick:
        return bench_failover.run(bench_failover.FailoverSettings(warmup_s=2.0, after_kill_s=6.0))
    return bench_failover.run(bench_failover.FailoverSettings(warmup_s=4.0, after_kill_s=14.0))


def _convergence(quick: bool) -> SectionResult:
    if quick:
        return bench_convergence.run(
            bench_convergence.ConvergenceSettings(admin_changes=10, health_flips=1, time_budget_s=20)
        )
    return bench_convergence.run(
        bench_convergence.ConvergenceSettings(admin_changes=50, health_flips=8, time_budget_s=100)
    )


def _scale(quick: bool) -> SectionResult:
    if quick:
        return bench_scale.run(
            bench_scale.ScaleSettings(
                sizes=(10, 100, 1000),
                build_repeats=1,
                flip_repeats=1,
                ads_repeats=3,
                real_envoy_sizes=(1000,),
                real_envoy_repeats=2,
                time_budget_s=40,
            )
        )
    return bench_scale.run(bench_scale.ScaleSettings())


def _profile(quick: bool) -> SectionResult:
    # BENCH_PROFILE_ONLY=bare,gateway,gateway-keys,... runs only those rows (keys of bench_profile.variants).
    only = tuple(_names(os.environ.get("BENCH_PROFILE_ONLY", "")))
    if quick:
        return bench_profile.run(
            bench_profile.ProfileSettings(
                duration_s=1.0,
                warmup_s=0.3,
                only=only or ("bare", "metadata", "gateway", "gateway-keys", "some-last", "many-last"),
            )
        )
    return bench_profile.run(bench_profile.ProfileSettings(duration_s=3.0, warmup_s=1.0, only=only))


BALANCING_ARGS = ["--duration", "10", "--warmup", "3"]


def _balancing(quick: bool) -> SectionResult:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llm-gw-balancing-") as tmp:
        report, results = Path(tmp) / "report.md", Path(tmp) / "results.json"
        argv = [*BALANCING_ARGS, "--out", str(report), "--json", str(results)]
        with contextlib.redirect_stdout(io.StringIO()):  # its report comes back through --out
            code = bench_balancing.main(argv)
        if code != 0:
            raise RuntimeError(f"bench_balancing exited with {code}")
        # Its "Command:" line names the temporary --out/--json files: show the arguments that matter.
        markdown = re.sub(
            r"^Command: `[^`]*`$",
            f"Command: `python -m loadtest.bench_balancing {shlex.join(BALANCING_ARGS)}`",
            report.read_text(),
            flags=re.MULTILINE,
        )
        data = json.loads(results.read_text())
    for policy in data.get("policies", []):
        policy.pop("samples", None)  # per-second samples: in bench_balancing's own runs, not here
    markdown = 'Shorter windows than the 25 s of the "Balancing policies" section.\n\n' + markdown
    return SectionResult(
        "balancing", "Balancing policies (short run)", markdown, data, time.monotonic() - started
    )


def _activation(quick: bool) -> SectionResult:
    if quick:
        return bench_activation.run(
            bench_activation.ActivationSettings(
                runs=3, bursts=1, warm_repeats=3, warm_duration_s=1.5, warmup_s=0.5
            )
        )
    return bench_activation.run(bench_activation.ActivationSettings())


def _prefix(quick: bool) -> SectionResult:
    if quick:
        return bench_prefix.run(skewed=False, policies=("lr", "pa"))
    return bench_prefix.run()


def _priority(quick: bool) -> SectionResult:
    if quick:
        return bench_priority.run(bench_priority.PrioritySettings(duration_s=8.0, warmup_s=3.0))
    return bench_priority.run(bench_priority.PrioritySettings())


RUNNERS: dict[str, Callable[[bool], SectionResult]] = {
    "overhead": _overhead,
    "streaming": _streaming,
    "failover": _failover,
    "convergence": _convergence,
    "scale": _scale,
    "profile": _profile,
    "balancing": _balancing,
    "activation": _activation,
    "priority": _priority,
    "prefix": _prefix,
}


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description="The gateway's benchmark suite: overhead, streaming, failover, convergence, "
        "control-plane scale, profile, balancing, model activation and prefix affinity, in one run.",
    )
    p.add_argument("--quick", action="store_true", help="short runs, no balancing section (about 2 minutes)")
    p.add_argument("--only", default="", help=f"comma-separated sections among {', '.join(SECTIONS)}")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out")
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    p.add_argument("--json", type=Path, help="results file (default: loadtest/results/bench-<UTC time>.json)")
    args = p.parse_args(argv)
    unknown = sorted((set(_names(args.only)) | set(_names(args.skip))) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections: {', '.join(unknown)} (choose among {', '.join(SECTIONS)})")
    return args


def chosen_sections(args: argparse.Namespace) -> list[str]:
    only = _names(args.only)
    skip = set(_names(args.skip))
    if not only and args.quick:
        skip |= set(QUICK_SKIPS)
    return [s for s in SECTIONS if (not only or s in only) and s not in skip]


def header(machine: dict[str, Any], command: str, sections: list[str], quick: bool) -> str:
    return "\n".join(
        [
            "# Gateway benchmarks" + (" (quick)" if quick else ""),
            "",
            f"- Date: {machine['date_utc']}",
            f"- Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['platform']}",
            f"- Python {machine['python']}, Envoy {machine['envoy']}, load generator: "
            + (
                "`wrk` (one thread)"
                if wrk_binary()
                else "Python asyncio (wrk not installed: it bounds the figures)"
            ),
            f"- Command: `{command}`",
            f"- Sections: {', '.join(sections)}",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sections = chosen_sections(args)
    raw = list(argv if argv is not None else sys.argv[1:])
    command = "python -m loadtest.bench" + (" " + shlex.join(raw) if raw else "")
    machine = machine_info()
    started = time.monotonic()
    parts = [header(machine, command, sections, args.quick)]
    print(parts[0], flush=True)
    results: dict[str, Any] = {}
    failed = []
    for name in sections:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        busy0, total0 = host_cpu_times()
        t0 = time.monotonic()
        try:
            result = RUNNERS[name](args.quick)
        except Exception as exc:  # noqa: BLE001 - report the section, run the others
            failed.append(name)
            trace = traceback.format_exc()
            print(trace, file=sys.stderr)
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": trace}
            part = f"## {name}\n\nFAILED: `{type(exc).__name__}: {exc}` (traceback in the JSON results)\n"
        else:
            busy1, total1 = host_cpu_times()
            host_busy = (busy1 - busy0) / (total1 - total0) if total1 > total0 else math.nan
            result.wall_s = time.monotonic() - t0
            results[name] = {
                "title": result.title,
                "wall_s": result.wall_s,
                "host_busy": host_busy,
                **result.data,
            }
            part = (
                f"## {result.title}\n\n{result.markdown.rstrip()}\n\n"
                f"_Section wall time {result.wall_s:.0f} s; whole host {host_busy:.0%} busy meanwhile._\n"
            )
        parts.append(part)
        print(part, flush=True)
    total = time.monotonic() - started
    footer = f"Total wall time: {total:.0f} s." + (
        f" Failed sections: {', '.join(failed)}." if failed else ""
    )
    parts.append(footer + "\n")
    print(footer)
    payload = {
        "machine": machine,
        "command": command,
        "quick": args.quick,
        "wall_s": total,
        "sections": results,
    }
    path = write_results("bench", payload, args.json)
    print(f"results: {path}", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(parts))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
