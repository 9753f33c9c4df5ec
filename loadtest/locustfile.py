"""Locust load test of the gateway's OpenAI chat API (streaming and not).

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 60s \\
        --host http://127.0.0.1:8080 --csv loadtest/results/run --html loadtest/results/run.html

Options (each also read from the environment variable in brackets, or a locust.conf file):

  --scenario mixed|seeds    [LOCUST_SCENARIO]      presets below; explicit options override them
  --model-mix qwen2=1,llama3=1  [LOCUST_MODEL_MIX] weighted choice of the model per request
  --prompt-tokens SPEC      [LOCUST_PROMPT_TOKENS] prompt length in tokens (about 4 characters each)
  --max-tokens SPEC         [LOCUST_MAX_TOKENS]    max_tokens of each request (= the output length)
  --stream-ratio 0.5        [LOCUST_STREAM_RATIO]  share of streamed requests
  --wait none|constant:S|between:A:B|pacing:S  [LOCUST_WAIT]  time between a user's requests
  --seed 0                  [LOCUST_SEED]          seeds every user's choices (user i: seed and i)
  --temperature 0.7, --api-key KEY (sent as a bearer token), --request-timeout 300

SPEC: N | fixed:N | uniform:LO:HI | normal:MEAN:SD[:MIN:MAX] | lognormal:MEDIAN:SIGMA[:MIN:MAX].

Scenarios: ``mixed`` (default): lognormal prompts (median 200 tokens), max_tokens uniform 16-256, half
streamed, closed loop. ``seeds``: the seeds' claim (P99 < 1.5 s at 128 new tokens, 8-12 QPS on two
models, 50+ concurrent): max_tokens 128 and one request per user every 5 s; run it with ``-u 50``.

Locust's statistics, CSV, charts and HTML report hold only the real requests,
``POST /v1/chat/completions [model(, stream)]`` (whose response time is the whole request, the stream
included). The LLM samples are kept apart, in statistics of their own (so they never inflate the request
rate, response times or totals), written to ``PREFIX_llm_stats.csv`` and added as a section at the end
of the ``--html`` report:

  E2E      <model> and "all models": end-to-end time of every chat request (failures included)
  TTFT     <model>: time to the first content chunk of a streamed request
  ITL      <model>: gap between consecutive content chunks (one sample per gap)
  TPOT     <model>: (end - first token) / (output tokens - 1), one sample per streamed request
  TOKENS/S <model> (tok/s, not ms): output tokens / end-to-end seconds per request; the "response time"
           column carries tokens/s and the content size column the output tokens

Each entry carries its value where locust puts a response time (ms, except TOKENS/S). When the test
stops, a summary table (and with ``--scenario seeds`` the comparison with the seeds' claims) is printed
and, with ``--csv PREFIX``, written to ``PREFIX_llm_summary.md``.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # locust puts only this file's folder on sys.path
    sys.path.insert(0, str(_REPO_ROOT))

from locust import FastHttpUser, events, task  # noqa: E402
from locust.contrib.fasthttp import FAILURE_EXCEPTIONS  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.runners import WorkerRunner  # noqa: E402
from locust.stats import RequestStats, StatsEntry, StatsError  # noqa: E402

from loadtest.locust_llm import (  # noqa: E402
    CHAT_PATH,
    SCENARIOS,
    SEEDS_USERS,
    LoadSettings,
    PromptFactory,
    StreamMeter,
    chat_body,
    completion_tokens,
    error_message,
    resolve_settings,
)
from loadtest.locust_report import (  # noqa: E402
    E2E_NAME,
    E2E_TYPE,
    ITL_TYPE,
    LLM_CSV_SUFFIX,
    TPOT_TYPE,
    TPS_SUFFIX,
    TPS_TYPE,
    TTFT_TYPE,
    add_section_to_html,
    html_section,
    render,
    rows_from_stats,
    write_csv,
)

log = logging.getLogger("loadtest")

SETTINGS = LoadSettings()
"""Replaced in the ``init`` listener by the settings resolved from the command line."""
_PROMPTS: PromptFactory | None = None
_PEAK_USERS = 0
_E2E_SAMPLES: dict[tuple[str, str], list[float]] = {}
"""Every end-to-end time (ms) of this process, for exact percentiles in the summary (locust rounds)."""
_MAX_SAMPLES = 2_000_000
LLM_STATS = RequestStats(use_response_times_cache=False)
"""The LLM samples: locust's statistics machinery, but not locust's statistics (environment.stats), whose
totals, request rate and charts must count only real requests."""
_HTML_SECTION = ""
"""Rendered when the test stops; added to the HTML report once locust has written it (``quitting``)."""


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    def add(flag: str, help_text: str, **kwargs: Any) -> None:
        env = "LOCUST_" + flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, env_var=env, help=f"{help_text} [env {env}]", **kwargs)

    add("--scenario", f"workload preset: {' | '.join(SCENARIOS)} (default mixed)", choices=SCENARIOS)
    add("--model-mix", "weighted models, e.g. qwen2=1,llama3=1", default=None)
    add("--prompt-tokens", "prompt length distribution, e.g. lognormal:200:0.8:16:2048", default=None)
    add("--max-tokens", "max_tokens distribution, e.g. uniform:16:256 or 128", default=None)
    add("--stream-ratio", "share of streamed requests, 0..1", default=None)
    add("--wait", "between a user's requests: none | constant:S | between:A:B | pacing:S", default=None)
    add("--seed", "seed of every random choice", type=int, default=0)
    add("--temperature", "sampling temperature", type=float, default=0.7)
    add("--api-key", "bearer token to send (the local gateway needs none)", default="", is_secret=True)
    add("--request-timeout", "seconds without progress before a request fails", type=float, default=300.0)


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    global SETTINGS, _PROMPTS
    options = environment.parsed_options
    try:
        SETTINGS = resolve_settings(options)
    except ValueError as exc:
        log.error("%s", exc)
        sys.exit(2)
    _PROMPTS = PromptFactory(SETTINGS.seed)
    timeout = float(getattr(options, "request_timeout", 300.0) or 300.0)
    ChatUser.network_timeout = timeout
    ChatUser.connection_timeout = min(timeout, 10.0)
    users = getattr(options, "num_users", None)
    if SETTINGS.scenario == "seeds" and users is not None and users < SEEDS_USERS:
        log.warning("the seeds scenario claims %d+ concurrent users; this run has -u %s", SEEDS_USERS, users)
    log.info("LLM load test: %s", SETTINGS.describe())


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    global _PEAK_USERS, _HTML_SECTION
    _PEAK_USERS = 0
    _HTML_SECTION = ""
    _E2E_SAMPLES.clear()
    LLM_STATS.reset_all()


@events.report_to_master.add_listener
def _send_llm_stats(client_id: str, data: dict[str, Any]) -> None:
    """A worker ships its LLM samples with each report, as locust does its request statistics."""
    data["llm_stats"] = LLM_STATS.serialize_stats()
    data["llm_errors"] = LLM_STATS.serialize_errors()
    LLM_STATS.errors = {}


@events.worker_report.add_listener
def _merge_llm_stats(client_id: str, data: dict[str, Any]) -> None:
    """The master adds up its workers' LLM samples (as locust's own distributed statistics do)."""
    for serialized in data.get("llm_stats", ()):
        entry = StatsEntry.unserialize(serialized, LLM_STATS)
        LLM_STATS.get(entry.name, entry.method).extend(entry)
    for key, error in data.get("llm_errors", {}).items():
        if key in LLM_STATS.errors:
            LLM_STATS.errors[key].occurrences += error["occurrences"]
        else:
            LLM_STATS.errors[key] = StatsError.unserialize(error)


@events.spawning_complete.add_listener
def _on_spawned(user_count: int, **_: Any) -> None:
    global _PEAK_USERS
    _PEAK_USERS = max(_PEAK_USERS, user_count)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if runner is None or isinstance(runner, WorkerRunner):
        return  # with --processes / workers, the master has the statistics and prints the summary
    global _HTML_SECTION
    if LLM_STATS.get(E2E_NAME, E2E_TYPE).num_requests == 0:
        return
    users = max(_PEAK_USERS, runner.user_count) or None
    title = f"LLM load test summary ({SETTINGS.describe()}; peak users {users})"
    rows = rows_from_stats(LLM_STATS, _E2E_SAMPLES)
    text = render(rows, users, seeds=SETTINGS.scenario == "seeds", title=title)
    print("\n" + text + "\n", flush=True)
    _HTML_SECTION = html_section(rows, text)
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix:
        path = Path(f"{prefix}_llm_summary.md")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        write_csv(Path(f"{prefix}{LLM_CSV_SUFFIX}"), rows)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    """Locust writes the --html report after the test stops, before it quits: add the LLM section."""
    html_file = getattr(environment.parsed_options, "html_file", None)
    if _HTML_SECTION and html_file and not add_section_to_html(Path(html_file), _HTML_SECTION):
        log.warning("could not add the LLM metrics to %s", html_file)


class ChatUser(FastHttpUser):
    """One chat client: picks a model, a prompt length and max_tokens from the seeded distributions,
    streams or not, and reports the LLM metrics."""

    network_timeout = 300.0
    connection_timeout = 10.0
    _numbers = itertools.count()

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.index = next(ChatUser._numbers)
        worker = getattr(environment.runner, "worker_index", 0)  # distinct sequences per worker process
        key = f"{SETTINGS.seed}:{self.index}" if not worker else f"{SETTINGS.seed}:{worker}:{self.index}"
        self.rng = random.Random(key)
        self.last_request_s = 0.0
        self.headers = {"Accept-Encoding": "identity"}
        if SETTINGS.api_key:
            self.headers["Authorization"] = f"Bearer {SETTINGS.api_key}"

    def wait_time(self) -> float:
        return SETTINGS.wait.seconds(self.rng, self.last_request_s)

    @task
    def chat(self) -> None:
        settings, rng = SETTINGS, self.rng
        model = settings.models.pick(rng)
        prompts = _PROMPTS or PromptFactory(settings.seed)
        prompt = prompts.make(rng, settings.prompt_tokens.sample(rng))
        max_tokens = settings.max_tokens.sample(rng)
        stream = rng.random() < settings.stream_ratio
        body = chat_body(model, prompt, max_tokens, stream, settings.temperature)
        started = time.perf_counter()
        try:
            if stream:
                self._streamed(model, body, started)
            else:
                self._complete(model, body, started)
        finally:
            self.last_request_s = time.perf_counter() - started

    # ------------------------------------------------------------------ requests
    def _complete(self, model: str, body: dict[str, Any], started: float) -> None:
        with self.client.post(
            CHAT_PATH, json=body, headers=self.headers, name=f"{CHAT_PATH} [{model}]", catch_response=True
        ) as response:
            elapsed_ms = (time.perf_counter() - started) * 1000
            problem, tokens = "", 0
            if response.status_code != 200:
                problem = error_message(response.status_code, _body(response), _exception_text(response))
            else:
                try:
                    doc = json.loads(response.content or b"")
                except (*FAILURE_EXCEPTIONS, ValueError):
                    doc = None
                if isinstance(doc, dict):
                    tokens, problem = completion_tokens(doc)
                else:
                    problem = "answer is not a JSON object"
            response.request_meta["response_time"] = elapsed_ms
            if problem:
                response.failure(problem)
            else:
                response.success()
        self._report(model, elapsed_ms, problem, tokens, None)

    def _streamed(self, model: str, body: dict[str, Any], started: float) -> None:
        with self.client.post(
            CHAT_PATH,
            json=body,
            headers={**self.headers, "Accept": "text/event-stream"},
            name=f"{CHAT_PATH} [{model}, stream]",
            stream=True,
            catch_response=True,
        ) as response:
            meter = StreamMeter(started)
            if response.status_code != 200:
                problem = error_message(response.status_code, _body(response), _exception_text(response))
            else:
                try:
                    source = response.stream
                    while True:
                        line = source.readline(b"\n")
                        if not line:
                            break
                        meter.feed(line, time.perf_counter())
                except FAILURE_EXCEPTIONS as exc:  # a broken stream: reset, timeout, bad chunking
                    meter.error = meter.error or f"stream broken: {type(exc).__name__}: {exc}"[:300]
                problem = meter.problem()
            elapsed_ms = (time.perf_counter() - started) * 1000
            response.request_meta["response_time"] = elapsed_ms
            response.request_meta["response_length"] = meter.bytes_read
            if problem:
                response.failure(problem)
            else:
                response.success()
        self._report(model, elapsed_ms, problem, meter.output_tokens, meter)

    # ------------------------------------------------------------------ custom entries
    def _metric(self, kind: str, name: str, value: float, length: int = 0, problem: str = "") -> None:
        # Not a locust request event: that would count each sample as a request in locust's totals,
        # request rate and charts (a streamed answer gives dozens of ITL samples).
        # A float, as locust's own request events pass (its annotation says int): averages stay exact.
        LLM_STATS.log_request(kind, name, value, length)  # type: ignore[arg-type]
        if problem:
            LLM_STATS.log_error(kind, name, problem)

    def _report(
        self, model: str, elapsed_ms: float, problem: str, tokens: int, meter: StreamMeter | None
    ) -> None:
        for name in (model, E2E_NAME):
            self._metric(E2E_TYPE, name, elapsed_ms, problem=problem)
            samples = _E2E_SAMPLES.setdefault((E2E_TYPE, name), [])
            if len(samples) < _MAX_SAMPLES:
                samples.append(elapsed_ms)
        if problem:
            return
        if tokens > 0 and elapsed_ms > 0:
            self._metric(TPS_TYPE, model + TPS_SUFFIX, tokens / (elapsed_ms / 1000), length=tokens)
        if meter is None or meter.ttft is None:
            return
        self._metric(TTFT_TYPE, model, meter.ttft * 1000)
        for gap in meter.gaps:
            self._metric(ITL_TYPE, model, gap * 1000)
        if tokens > 1 and meter.first_content_at is not None:
            finished = meter.started + elapsed_ms / 1000
            self._metric(TPOT_TYPE, model, (finished - meter.first_content_at) * 1000 / (tokens - 1))


def _body(response: Any) -> bytes:
    try:
        content = response.content
    except FAILURE_EXCEPTIONS:  # the connection died before the body
        return b""
    return content if isinstance(content, bytes) else b""


def _exception_text(response: Any) -> str:
    error = getattr(response, "error", None)
    return f"{type(error).__name__}: {error}" if error is not None else ""
