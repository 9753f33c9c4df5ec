"""The prefix-cache hit rate signal: vLLM's token counters as a ratio between scrapes, SGLang's gauge, and
the simulators' /metrics read by the real parser."""

from __future__ import annotations

import pytest

from backends.simulator.config import make_config
from backends.simulator.context import ServerContext
from backends.simulator.engine import Engine
from backends.simulator.errors import ErrorStyle
from backends.simulator.metrics import render_metrics
from control_plane.telemetry.errors import MetricMapError
from control_plane.telemetry.metric_map import default_metric_map, parse_metric_map
from control_plane.telemetry.parse import signals_from_text

pytestmark = pytest.mark.unit

MAP = default_metric_map()


def _vllm(hits: float, queries: float, *, legacy: bool = False) -> str:
    prefix = "vllm:gpu_prefix_cache" if legacy else "vllm:prefix_cache"
    return (
        f"# TYPE {prefix}_hits counter\n"
        f'{prefix}_hits_total{{model_name="m",engine="0"}} {hits / 2}\n'
        f'{prefix}_hits_total{{model_name="m",engine="1"}} {hits / 2}\n'
        f"# TYPE {prefix}_queries counter\n"
        f'{prefix}_queries_total{{model_name="m",engine="0"}} {queries}\n'
    )


@pytest.mark.parametrize("legacy", [False, True])
def test_vllm_hit_rate_is_the_ratio_of_counter_deltas(legacy):
    first = signals_from_text(_vllm(100, 1000, legacy=legacy), "vllm", MAP, now=1.0)
    assert first.prefix_cache_hit_rate is None  # totals only: a rate needs two scrapes
    second = signals_from_text(_vllm(400, 1500, legacy=legacy), "vllm", MAP, now=3.0, previous=first)
    assert second.prefix_cache_hit_rate == pytest.approx(300 / 500)
    # No new query: the last rate is carried.
    third = signals_from_text(_vllm(400, 1500, legacy=legacy), "vllm", MAP, now=5.0, previous=second)
    assert third.prefix_cache_hit_rate == pytest.approx(0.6)
    # Counters went back (engine restarted): unknown until the next scrape.
    fourth = signals_from_text(_vllm(0, 10, legacy=legacy), "vllm", MAP, now=7.0, previous=third)
    assert fourth.prefix_cache_hit_rate is None


def test_sglang_hit_rate_is_its_gauge_and_tgi_has_none():
    text = '# TYPE sglang:cache_hit_rate gauge\nsglang:cache_hit_rate{model_name="m"} 0.25\n'
    assert signals_from_text(text, "sglang", MAP, now=1.0).prefix_cache_hit_rate == 0.25
    assert signals_from_text("", "tgi", MAP, now=1.0).prefix_cache_hit_rate is None


def test_metric_map_accepts_a_gauge_or_a_ratio_and_names_bad_ones():
    parsed = parse_metric_map(
        {
            "engines": {
                "x": {"prefix_cache_hit_rate": ["x:hit_rate"]},
                "y": {"prefix_cache_hit_rate": {"hits": ["a"], "queries": ["b"]}},
            }
        }
    )
    x, y = parsed.engine("x"), parsed.engine("y")
    assert x is not None and y is not None
    assert getattr(x.prefix_cache_hit_rate, "aggregate", None) == "mean"
    assert getattr(y.prefix_cache_hit_rate, "hits", None) == ("a",)
    with pytest.raises(MetricMapError, match="prefix_cache_hit_rate"):
        parse_metric_map({"engines": {"x": {"prefix_cache_hit_rate": {"hits": ["a"]}}}})


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_the_simulators_metrics_give_the_signal(engine):
    ctx = ServerContext(
        config=make_config(engine, "m", "m-0"),
        engine=Engine(make_config(engine, "m", "m-0")),
        style=ErrorStyle.OPENAI,
    )
    cache = ctx.engine.prefix_cache
    cache.queries, cache.hits = 200, 50
    first = signals_from_text(render_metrics(ctx), engine, MAP, now=1.0)
    cache.queries, cache.hits = 400, 200
    second = signals_from_text(render_metrics(ctx), engine, MAP, now=2.0, previous=first)
    expected = 150 / 200 if engine == "vllm" else 200 / 400
    assert second.prefix_cache_hit_rate == pytest.approx(expected)
