"""Command line: `python -m control_plane {serve,validate,bootstrap,devstack}`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
from pathlib import Path

from pydantic import SecretStr

from control_plane.errors import ConfigError


def _serve(args: argparse.Namespace) -> int:
    from control_plane.app import ServeSettings, serve

    token = os.environ.get("ADMIN_TOKEN", "")
    if not token:
        token = secrets.token_urlsafe(24)
        print(
            f"warning: ADMIN_TOKEN is not set; this run's admin token is {token}", file=sys.stderr, flush=True
        )
    settings = ServeSettings(
        config_path=Path(args.config),
        admin_token=SecretStr(token),
        state_db=Path(args.state_db),
        prometheus_url=args.prometheus_url,
        file_sd_dir=Path(args.file_sd_dir) if args.file_sd_dir else None,
        xds_host=args.xds_host,
        xds_port=args.xds_port,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
    )
    try:
        asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _validate(args: argparse.Namespace) -> int:
    from control_plane.config.loader import load_registry

    try:
        registry = load_registry(Path(args.config))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK ({len(registry.models)} models)")
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from control_plane.envoy_bootstrap import BootstrapParams, render_bootstrap

    print(
        render_bootstrap(
            BootstrapParams(
                node_id=args.node_id,
                xds_host=args.xds_host,
                xds_port=args.xds_port,
                admin_port=args.envoy_admin_port,
                listen_port=args.listen_port,
            )
        )
    )
    return 0


def _devstack(args: argparse.Namespace) -> int:
    from control_plane.devstack.run import DevStackSettings, run_devstack

    return run_devstack(
        DevStackSettings(
            config_path=Path(args.config),
            listen_port=args.listen_port,
            admin_port=args.admin_port,
            xds_port=args.xds_port,
            envoy_admin_port=args.envoy_admin_port,
            state_dir=Path(args.state_dir),
            admin_token=os.environ.get("ADMIN_TOKEN") or None,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="control_plane", description="LLM gateway control plane")
    parser.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve xDS to Envoy and the admin API")
    serve.add_argument("--config", default=env("GATEWAY_CONFIG", "models.yaml"))
    serve.add_argument("--xds-host", default=env("XDS_HOST", "127.0.0.1"))
    serve.add_argument("--xds-port", type=int, default=int(env("XDS_PORT", "18000")))
    serve.add_argument("--admin-host", default=env("ADMIN_HOST", "127.0.0.1"))
    serve.add_argument("--admin-port", type=int, default=int(env("ADMIN_PORT", "8081")))
    serve.add_argument(
        "--file-sd-dir",
        default=env("FILE_SD_DIR") or None,
        help="write Prometheus file-SD target files of every model server into this directory",
    )
    serve.add_argument(
        "--prometheus-url",
        default=env("PROMETHEUS_URL") or None,
        help="a Prometheus that scrapes the Envoys: P50/P99 latency on the status page (optional)",
    )
    serve.add_argument(
        "--state-db", default=env("STATE_DB", "var/gateway.db"), help="SQLite file of admin changes"
    )
    serve.set_defaults(func=_serve)

    validate = sub.add_parser("validate", help="check a registry file and exit")
    validate.add_argument("--config", default=env("GATEWAY_CONFIG", "models.yaml"))
    validate.set_defaults(func=_validate)

    boot = sub.add_parser("bootstrap", help="print the Envoy bootstrap for one gateway node")
    boot.add_argument("--node-id", default=env("ENVOY_NODE_ID", "gateway-0"))
    boot.add_argument("--xds-host", default=env("XDS_HOST", "127.0.0.1"))
    boot.add_argument("--xds-port", type=int, default=int(env("XDS_PORT", "18000")))
    boot.add_argument("--envoy-admin-port", type=int, default=int(env("ENVOY_ADMIN_PORT", "9901")))
    boot.add_argument("--listen-port", type=int, default=None)
    boot.set_defaults(func=_bootstrap)

    dev = sub.add_parser("devstack", help="run Envoy, the control plane and simulated backends (make run)")
    dev.add_argument("--config", default=env("GATEWAY_CONFIG", "models.yaml"))
    gateway_port = env("GATEWAY_PORT")
    dev.add_argument(
        "--listen-port",
        type=int,
        default=int(gateway_port) if gateway_port else None,
        help="default: the registry's gateway.listen_port",
    )
    dev.add_argument("--admin-port", type=int, default=int(env("ADMIN_PORT", "8081")))
    dev.add_argument("--xds-port", type=int, default=int(env("XDS_PORT", "18000")))
    dev.add_argument("--envoy-admin-port", type=int, default=int(env("ENVOY_ADMIN_PORT", "9901")))
    dev.add_argument("--state-dir", default=env("STATE_DIR", "var"))
    dev.set_defaults(func=_devstack)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args))
