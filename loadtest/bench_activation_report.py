"""The activation benchmark's report (loadtest/bench_activation.py): its runs' figures as markdown tables."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loadtest._common import fmt_ms, fmt_x, markdown_table, percentile, ratio

if TYPE_CHECKING:
    from loadtest.bench_activation import ActivationSettings


def _summary(runs: list[dict[str, Any]], key: str) -> list[str]:
    values = [r[key] * 1000 for r in runs]
    return [fmt_ms(percentile(values, 50), 1), fmt_ms(percentile(values, 90), 1), fmt_ms(max(values), 1)]


def render(
    singles: list[dict[str, Any]],
    bursts: list[dict[str, Any]],
    warm: dict[str, Any],
    settings: ActivationSettings,
    client: str,
    *,
    launched: str,
    static: str,
    load_times: tuple[float, float],
) -> str:
    """The section's markdown: the cold-request table (single requests, bursts), the warm path's."""
    keys = [
        ("total_s", "cold request, start to answer"),
        ("engine_load_s", "engine's own load (spawn → /health 200)"),
        ("loaded_in_s", "manager's `loaded_in_s`"),
        ("warm_s", "same request, warm"),
        ("overhead_s", "**activation overhead**"),
        ("before_spawn_s", "of which: request → engine spawn"),
        ("after_ready_s", "of which: engine ready → answer (less warm time)"),
        ("overhead_vs_manager_s", "overhead vs `loaded_in_s`"),
    ]
    rows = []
    for key, label in keys:
        row = [label, *_summary(singles, key)]
        row += _summary(bursts, key) if bursts else ["-"] * 3
        rows.append(row)
    cold = markdown_table(
        [
            "",
            "p50 (1 req)",
            "p90 (1 req)",
            "max (1 req)",
            f"p50 ({settings.burst_size} at once)",
            f"p90 ({settings.burst_size})",
            f"max ({settings.burst_size})",
        ],
        rows,
        "lrrrrrr",
    )
    errors = sum(r["errors"] for r in singles + bursts)
    loads = sorted({r["loads"] for r in singles + bursts})
    by = {r["model"]: r for r in warm["rows"]}
    warm_rows = [
        [
            "launched (warm)" if r["model"] == launched else "static",
            f"{r['rps']:,.0f}",
            fmt_ms(r["p50_ms"]),
            fmt_ms(r["p99_ms"]),
            r["errors"],
            f"{r['control_plane_cores']:.3f}",
            f"{r['held_max']:g}",
            f"{r['through_activator']:g}",
            ", ".join(r["x_served_by"]),
        ]
        for r in warm["rows"]
    ]
    warm_launched, warm_static = by.get(launched), by.get(static)
    ratios = (
        f"launched / static: req/s {fmt_x(ratio(warm_launched['rps'], warm_static['rps']))}, "
        f"p50 {fmt_x(ratio(warm_launched['p50_ms'], warm_static['p50_ms']))}, "
        f"p99 {fmt_x(ratio(warm_launched['p99_ms'], warm_static['p99_ms']))}."
        if warm_launched and warm_static
        else ""
    )
    loads_seen = ", ".join(f"{x:g}" for x in loads)
    head = (
        f"Simulated engine (`fast` profile), `load_time_s` {load_times[0]:g} to "
        f"{load_times[1]:g} s over {settings.models} launched models; "
        f"{len(singles)} single cold requests and {len(bursts)} burst(s) of {settings.burst_size}, the "
        f"model unloaded between runs; engine side polled every {settings.poll_s * 1000:g} ms; warm "
        f"reference: median of {settings.warm_repeats}. Errors: {errors}; loads per run: {loads_seen}."
    )
    warm_head = (
        f"Warm path (`{client}`, {settings.warm_connections} connections, {settings.warm_duration_s:g} s "
        f"after {settings.warmup_s:g} s of warm-up, one run each; the replica is `{warm['replica']}`):"
    )
    warm_table = markdown_table(
        [
            "model",
            "req/s",
            "p50",
            "p99",
            "errors",
            "control-plane cores",
            "held (max)",
            "through the activator",
            "x-served-by",
        ],
        warm_rows,
        "lrrrrrrrl",
    )
    return f"{head}\n\n{cold}\n\n{warm_head}\n\n{warm_table}\n\n{ratios}\n"
