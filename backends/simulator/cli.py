"""Command line: ``python -m backends.simulator --engine vllm --model-id qwen2 --endpoint-id qwen2-0 ...``.

Prints ``READY http://HOST:PORT`` (the bound port, also when ``--port 0``) on stdout once listening,
then serves until SIGTERM or SIGINT, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TextIO

from .app import build_app, start_server
from .config import PROFILES, EngineKind, GpuSettings, SimConfig, make_config

log = logging.getLogger("backends.simulator")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m backends.simulator",
        description="A simulated TGI / vLLM / SGLang / TEI model server (real HTTP APIs, fake GPU).",
    )
    p.add_argument("--engine", required=True, choices=[k.value for k in EngineKind])
    p.add_argument("--model-id", required=True, help="model id reported by the server")
    p.add_argument(
        "--endpoint-id", help="replica id: system_fingerprint and x-sim-endpoint-id (default: model id)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (see the READY line)")
    p.add_argument(
        "--served-name",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME",
        help="extra model names accepted in requests (repeatable; the model id is always accepted)",
    )
    p.add_argument("--profile", default="default", choices=list(PROFILES))
    p.add_argument("--prefill-base-ms", type=float)
    p.add_argument("--prefill-per-token-ms", type=float)
    p.add_argument("--decode-ms-per-token", type=float)
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--default-max-tokens", type=int, default=32)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--slowdown", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=32768, help="context window in tokens")
    p.add_argument("--kv-cache-tokens", type=int, default=65536, help="fake KV-cache capacity in tokens")
    p.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=65536,
        help="prefix cache capacity in tokens (cached prompt blocks skip their prefill); 0 turns it off",
    )
    p.add_argument(
        "--load-time-s",
        type=float,
        default=0.0,
        help="seconds after start answering 503 'model loading' (health included), like an engine loading",
    )
    p.add_argument(
        "--memory-mb",
        type=int,
        default=0,
        help="fixed GPU memory footprint in MiB reported in the GPU metrics (0: follows the load)",
    )
    p.add_argument("--log-level", default="WARNING")
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return make_config(
        args.engine,
        args.model_id,
        args.endpoint_id or args.model_id,
        profile=args.profile,
        prefill_base_ms=args.prefill_base_ms,
        prefill_per_token_ms=args.prefill_per_token_ms,
        decode_ms_per_token=args.decode_ms_per_token,
        max_batch=args.max_batch,
        served_names=tuple(args.served_name),
        max_queue=args.max_queue,
        default_max_tokens=args.default_max_tokens,
        error_rate=args.error_rate,
        slowdown=args.slowdown,
        seed=args.seed,
        max_model_len=args.max_model_len,
        kv_cache_tokens=args.kv_cache_tokens,
        prefix_cache_tokens=args.prefix_cache_tokens,
        load_time_s=args.load_time_s,
        gpu=gpu_settings(args.memory_mb),
    )


def gpu_settings(memory_mb: int) -> GpuSettings:
    """The fake GPU; with a footprint, one at least that large (a model needing 40 GiB gets a big card)."""
    default = GpuSettings()
    if memory_mb <= 0:
        return replace(default, reserved_mib=memory_mb)  # a negative value is refused by SimConfig
    return replace(default, reserved_mib=memory_mb, total_mib=max(default.total_mib, memory_mb))


async def serve(config: SimConfig, host: str, port: int, out: TextIO) -> None:
    """Run until SIGTERM/SIGINT; announce readiness on ``out``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await start_server(build_app(config), host, port)
    try:
        print(f"READY {server.url}", file=out, flush=True)
        log.info(
            "%s simulator for %s (%s) on %s", config.engine, config.model_id, config.endpoint_id, server.url
        )
        await stop.wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(serve(config, args.host, args.port, out or sys.stdout))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
