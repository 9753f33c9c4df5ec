"""The LLM summary of a locust run and its comparison with the seeds' claims.

The LLM samples (TTFT, ITL, ...) are not requests: the locustfile keeps them in statistics of their own,
apart from locust's, so the request rate, response times, totals and charts of locust's report, CSV and
console count only the real requests. This module renders them: the summary the locustfile prints when
the test stops, ``PREFIX_llm_stats.csv`` (locust's CSV columns), and a section added to the end of the
``--html`` report. A finished run can be read again from the CSV:

    python -m loadtest.locust_report loadtest/results/run_llm_stats.csv [--seeds] [--users 50]

Entries (see ``loadtest/locustfile.py``): ``E2E`` per model and ``E2E / all models`` (every chat request,
streamed or not: end-to-end latency), ``TTFT``, ``ITL``, ``TPOT`` and ``TOKENS/S`` per model. The peak
user count comes from locust's ``PREFIX_stats_history.csv`` next to it, or ``--users``.
"""

from __future__ import annotations

import argparse
import csv
import html
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loadtest._common import percentile
from loadtest.locust_llm import SEEDS_MAX_TOKENS, SEEDS_P99_MS, SEEDS_QPS, SEEDS_USERS

if TYPE_CHECKING:
    from locust.stats import RequestStats

E2E_TYPE, E2E_NAME = "E2E", "all models"
TTFT_TYPE, ITL_TYPE, TPOT_TYPE, TPS_TYPE = "TTFT", "ITL", "TPOT", "TOKENS/S"
TPS_SUFFIX = " (tok/s, not ms)"
LLM_CSV_SUFFIX = "_llm_stats.csv"
HTML_SECTION_ID = "llm-metrics"
CSV_COLUMNS = (
    "Type",
    "Name",
    "Request Count",
    "Failure Count",
    "Requests/s",
    "Failures/s",
    "Average Response Time",
    "50%",
    "95%",
    "99%",
    "Average Content Size",
)


@dataclass(frozen=True, slots=True)
class Row:
    """One entry of locust's statistics (values in ms, except for ``TOKENS/S`` rows)."""

    type: str
    name: str
    requests: int
    failures: int
    rps: float
    fail_rps: float
    avg: float
    p50: float
    p95: float
    p99: float
    total_length: float
    exact: bool = False
    """Percentiles from the client's own samples; otherwise locust's, rounded to 2 significant digits
    (to 10 ms from 100 ms, to 100 ms from 1 s)."""

    @property
    def ok_rps(self) -> float:
        return self.rps - self.fail_rps


def rows_from_stats(
    stats: RequestStats, exact: Mapping[tuple[str, str], Sequence[float]] | None = None
) -> list[Row]:
    """Rows of locust's live statistics; ``exact`` maps (type, name) to every sample of an entry, whose
    percentiles then replace locust's rounded ones (used only when the counts agree)."""
    rows = []
    for entry in stats.entries.values():
        samples = (exact or {}).get((str(entry.method), str(entry.name)))
        is_exact = samples is not None and len(samples) == entry.num_requests and bool(samples)
        if is_exact:
            assert samples is not None
            p50, p95, p99 = (percentile(samples, q) for q in (50, 95, 99))
        elif entry.num_requests:
            p50, p95, p99 = (float(entry.get_response_time_percentile(q)) for q in (0.5, 0.95, 0.99))
        else:
            p50 = p95 = p99 = math.nan
        rows.append(
            Row(
                type=str(entry.method),
                name=str(entry.name),
                requests=entry.num_requests,
                failures=entry.num_failures,
                rps=float(entry.total_rps),
                fail_rps=float(entry.total_fail_per_sec),
                avg=float(entry.avg_response_time),
                p50=p50,
                p95=p95,
                p99=p99,
                total_length=float(entry.total_content_length),
                exact=is_exact,
            )
        )
    return rows


def _number(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "", "N/A") else math.nan
    except ValueError:
        return math.nan


def rows_from_csv(path: Path) -> list[Row]:
    rows = []
    with path.open(newline="") as handle:
        for record in csv.DictReader(handle):
            if record.get("Name") == "Aggregated":
                continue  # not an LLM entry (older runs kept these samples among locust's requests)
            requests = int(_number(record.get("Request Count")) or 0)
            rows.append(
                Row(
                    type=record.get("Type", ""),
                    name=record.get("Name", ""),
                    requests=requests,
                    failures=int(_number(record.get("Failure Count")) or 0),
                    rps=_number(record.get("Requests/s")),
                    fail_rps=_number(record.get("Failures/s")),
                    avg=_number(record.get("Average Response Time")),
                    p50=_number(record.get("50%")),
                    p95=_number(record.get("95%")),
                    p99=_number(record.get("99%")),
                    total_length=_number(record.get("Average Content Size")) * requests,
                )
            )
    return rows


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    """The LLM entries in locust's CSV columns (``PREFIX_llm_stats.csv``), readable by rows_from_csv."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            size = r.total_length / r.requests if r.requests else 0.0
            values = (r.rps, r.fail_rps, r.avg, r.p50, r.p95, r.p99, size)
            writer.writerow([r.type, r.name, r.requests, r.failures, *(f"{v:.6g}" for v in values)])


def llm_csv_path(stats_csv: Path) -> Path:
    """``PREFIX_llm_stats.csv`` for locust's ``PREFIX_stats.csv`` (or itself)."""
    if stats_csv.name.endswith(LLM_CSV_SUFFIX):
        return stats_csv
    return stats_csv.with_name(stats_csv.name.removesuffix("_stats.csv") + LLM_CSV_SUFFIX)


def html_section(rows: Sequence[Row], summary: str) -> str:
    """The LLM samples as a section of locust's HTML report, below (and apart from) its own tables."""
    cells = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (r.type, r.name, r.requests, r.failures, _ms(r.avg), _ms(r.p50), _ms(r.p95), _ms(r.p99))
        )
        + "</tr>"
        for r in sorted(rows, key=lambda r: (r.type, r.name))
    )
    head = "".join(
        f"<th>{h}</th>" for h in ("type", "name", "samples", "failures", "avg", "P50", "P95", "P99")
    )
    return (
        f'<section id="{HTML_SECTION_ID}" style="font-family:sans-serif;margin:2em">'
        "<h2>LLM metrics</h2><p>Samples taken by the clients (ms, except TOKENS/S), kept apart from the "
        "requests: the statistics and charts above count only real HTTP requests.</p>"
        f'<table border="1" cellpadding="4" style="border-collapse:collapse"><tr>{head}</tr>{cells}</table>'
        f"<pre>{html.escape(summary)}</pre></section>"
    )


def add_section_to_html(path: Path, section: str) -> bool:
    """Put ``section`` at the end of the body of locust's HTML report (once); False if there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return False
    if f'id="{HTML_SECTION_ID}"' in text:
        return True
    at = text.rfind("</body>")
    text = text[:at] + section + "\n" + text[at:] if at >= 0 else text + section
    path.write_text(text, encoding="utf-8")
    return True


def peak_users_from_history(stats_csv: Path) -> int | None:
    """The largest ``User Count`` of ``PREFIX_stats_history.csv`` next to ``PREFIX_(llm_)stats.csv``."""
    name = stats_csv.name.replace(LLM_CSV_SUFFIX, "_stats.csv")
    history = stats_csv.with_name(name.replace("_stats.csv", "_stats_history.csv"))
    if history == stats_csv or not history.exists():
        return None
    peak = 0
    with history.open(newline="") as handle:
        for record in csv.DictReader(handle):
            peak = max(peak, int(_number(record.get("User Count")) or 0))
    return peak or None


# --------------------------------------------------------------------------- tables


def _find(rows: Iterable[Row], type_: str, name: str) -> Row | None:
    return next((r for r in rows if r.type == type_ and r.name == name), None)


def _ms(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:,.0f}"


def _models(rows: Sequence[Row]) -> list[str]:
    return [r.name for r in rows if r.type == E2E_TYPE and r.name != E2E_NAME]


def model_table(rows: Sequence[Row]) -> str:
    """Per model and in all: requests, failures, QPS, end-to-end latency, TTFT, ITL, TPOT, tokens/s."""
    lines = [
        "| model | requests | failures | QPS | E2E P50 / P95 / P99 ms | TTFT P50 / P99 ms "
        "| ITL P50 / P99 ms | TPOT avg ms | output tok/s per request (avg) | output tok/s (total) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    duration = _duration(rows)
    total_tokens_per_s = 0.0
    for model in [*_models(rows), E2E_NAME]:
        e2e = _find(rows, E2E_TYPE, model)
        if e2e is None:
            continue
        if model == E2E_NAME:
            label, ttft, itl, tpot, tps = "**all**", None, None, None, None
            tokens_text = f"{total_tokens_per_s:,.0f}"
        else:
            label = model
            ttft, itl = _find(rows, TTFT_TYPE, model), _find(rows, ITL_TYPE, model)
            tpot, tps = _find(rows, TPOT_TYPE, model), _find(rows, TPS_TYPE, model + TPS_SUFFIX)
            tokens_s = tps.total_length / duration if tps and duration > 0 else math.nan
            total_tokens_per_s += tokens_s if math.isfinite(tokens_s) else 0.0
            tokens_text = "-" if not math.isfinite(tokens_s) else f"{tokens_s:,.0f}"
        lines.append(
            f"| {label} | {e2e.requests} | {e2e.failures} | {e2e.ok_rps:.2f} "
            f"| {_ms(e2e.p50)} / {_ms(e2e.p95)} / {_ms(e2e.p99)} "
            f"| {_pair(ttft)} | {_pair(itl)} | {_ms(tpot.avg) if tpot else '-'} "
            f"| {f'{tps.avg:,.1f}' if tps else '-'} | {tokens_text} |"
        )
    return "\n".join(lines)


def _pair(row: Row | None) -> str:
    return "-" if row is None else f"{_ms(row.p50)} / {_ms(row.p99)}"


def _duration(rows: Sequence[Row]) -> float:
    """Seconds from the start of the run to its last request (locust's denominator of Requests/s)."""
    for row in rows:
        if row.rps > 0 and row.requests:
            return row.requests / row.rps
    return math.nan


def seeds_table(rows: Sequence[Row], users: int | None) -> str:
    """The seeds' claims next to the measured figures."""
    e2e = _find(rows, E2E_TYPE, E2E_NAME)
    models = _models(rows)
    p99 = e2e.p99 if e2e else math.nan
    if not math.isfinite(p99):
        p99_verdict = "no data"
    elif e2e is not None and not e2e.exact and abs(p99 - SEEDS_P99_MS) <= _rounding(SEEDS_P99_MS) / 2:
        p99_verdict = "at the limit (locust rounds P99 to 100 ms)"
    else:
        p99_verdict = "meets it" if p99 < SEEDS_P99_MS else "misses it"
    qps = e2e.ok_rps if e2e else math.nan
    low, high = SEEDS_QPS
    if not math.isfinite(qps):
        qps_verdict = "no data"
    elif qps < low:
        qps_verdict = "below the range"
    elif qps > high:
        qps_verdict = "above the range"
    else:
        qps_verdict = "within the range"
    lines = [
        "| seeds' claim | claimed | measured | reading |",
        "|---|---|---|---|",
        f"| P99 end-to-end latency at {SEEDS_MAX_TOKENS} new tokens | < {SEEDS_P99_MS:,.0f} ms "
        f"| {_ms(p99)} ms | {p99_verdict} |",
        f"| throughput on two models | {low:g}-{high:g} QPS | {qps:.2f} QPS (successful) "
        f"over {len(models)} model(s) | {qps_verdict} |",
        f"| concurrency | {SEEDS_USERS}+ concurrent users | {users if users is not None else '?'} users "
        f"| {_verdict(users is not None and users >= SEEDS_USERS, users is not None)} |",
        f"| errors | (none stated) | {e2e.failures if e2e else 0} failed of {e2e.requests if e2e else 0} | |",
    ]
    return "\n".join(lines)


def _rounding(value_ms: float) -> float:
    """The bucket width locust rounds a response time of this size to."""
    return 1.0 if value_ms < 100 else 10.0 if value_ms < 1000 else 100.0 if value_ms < 10_000 else 1000.0


def _verdict(ok: bool, known: bool) -> str:
    return "no data" if not known else ("meets it" if ok else "misses it")


def render(rows: Sequence[Row], users: int | None, *, seeds: bool, title: str = "") -> str:
    parts = [title or "LLM load test summary", "", model_table(rows)]
    if seeds:
        parts += [
            "",
            "Seeds' claims (simulated backends: see docs/loadtest.md)",
            "",
            seeds_table(rows, users),
        ]
    e2e = _find(rows, E2E_TYPE, E2E_NAME)
    precision = (
        "E2E percentiles are exact (the client's own samples); the others are locust's"
        if e2e is not None and e2e.exact
        else "E2E percentiles are locust's"
    )
    parts += [
        "",
        f"QPS counts successful requests over the run; TTFT/ITL/TPOT come from streamed requests only. "
        f"{precision}, rounded to 2 significant digits (10 ms steps from 100 ms, 100 ms steps from 1 s). "
        "These samples are kept apart from locust's requests (PREFIX_llm_stats.csv).",
    ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "stats_csv", type=Path, help="PREFIX_llm_stats.csv (or locust's PREFIX_stats.csv next to it)"
    )
    parser.add_argument("--seeds", action="store_true", help="add the comparison with the seeds' claims")
    parser.add_argument("--users", type=int, default=None, help="peak users (default: from the history CSV)")
    args = parser.parse_args(argv)
    path = llm_csv_path(args.stats_csv)
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    rows = rows_from_csv(path)
    if _find(rows, E2E_TYPE, E2E_NAME) is None:
        print(f"error: {path} has no '{E2E_TYPE} {E2E_NAME}' row: not a run of loadtest/locustfile.py")
        return 2
    users = args.users if args.users is not None else peak_users_from_history(args.stats_csv)
    print(render(rows, users, seeds=args.seeds, title=f"LLM load test summary of {path}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
