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


def _admin_token() -> str:
    """$ADMIN_TOKEN, else the file $ADMIN_TOKEN_FILE names (a compose secret), else a new one."""
    from control_plane.secret_files import read_secret

    token = os.environ.get("ADMIN_TOKEN", "")
    token_file = os.environ.get("ADMIN_TOKEN_FILE", "")
    if not token and token_file:
        token = read_secret(Path(token_file))
    if not token:
        token = secrets.token_urlsafe(24)
        print(
            f"warning: ADMIN_TOKEN is not set; this run's admin token is {token}", file=sys.stderr, flush=True
        )
    return token


def _xds_secret(args: argparse.Namespace, create: bool) -> str:
    """$XDS_SECRET, else the file --xds-secret-file names (created with a new secret when `create`).
    Never taken from the command line, where `ps` would show it."""
    from control_plane.secret_files import load_or_create_secret, read_secret
    from control_plane.xds.auth import check_secret

    value = os.environ.get("XDS_SECRET", "")
    if value:
        return check_secret(value)
    path = Path(args.xds_secret_file)
    if create:
        value, new = load_or_create_secret(path)
        if new:
            print(f"generated a new xDS secret in {path} (mode 0600)", file=sys.stderr, flush=True)
        return check_secret(value)
    return check_secret(read_secret(path))


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: must be 1 or more")
    return number


def _serve(args: argparse.Namespace) -> int:
    from control_plane.app import ServeSettings, serve

    try:
        token = _admin_token()
        xds_secret = _xds_secret(args, create=True)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = ServeSettings(
        config_path=Path(args.config),
        admin_token=SecretStr(token),
        xds_secret=SecretStr(xds_secret),
        state_db=Path(args.state_db),
        prometheus_url=args.prometheus_url,
        alertmanager_url=args.alertmanager_url,
        file_sd_dir=Path(args.file_sd_dir) if args.file_sd_dir else None,
        xds_host=args.xds_host,
        xds_port=args.xds_port,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        allow_empty=args.allow_empty,
        usage_retention_days=args.usage_retention_days,
        usage_key_labels=args.usage_key_labels,
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
        registry = load_registry(Path(args.config), allow_empty=args.allow_empty)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK ({len(registry.models)} models)")
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from control_plane.envoy_bootstrap import BootstrapParams, render_bootstrap
    from control_plane.secret_files import write_private
    from control_plane.xds.auth import node_token

    try:
        xds_secret = _xds_secret(args, create=False)
    except (OSError, ValueError) as exc:
        print(
            f"error: no xDS secret ({exc}): set XDS_SECRET or --xds-secret-file to the control plane's",
            file=sys.stderr,
        )
        return 2
    text = render_bootstrap(
        BootstrapParams(
            node_id=args.node_id,
            xds_host=args.xds_host,
            xds_port=args.xds_port,
            admin_port=args.envoy_admin_port,
            listen_port=args.listen_port,
            xds_token=node_token(xds_secret, args.node_id),
        )
    )
    if args.output:
        write_private(Path(args.output), text)  # it holds the node's credential: 0600
    else:
        print(text)
    return 0


# devstack ports: (flag, environment variable, default). With --free-ports, any not set is a free one.
_DEVSTACK_PORTS = {
    "admin_port": ("ADMIN_PORT", 8081),
    "xds_port": ("XDS_PORT", 18000),
    "envoy_admin_port": ("ENVOY_ADMIN_PORT", 9901),
    "prometheus_port": ("PROMETHEUS_PORT", 9090),
    "alertmanager_port": ("ALERTMANAGER_PORT", 9093),
}


def _devstack(args: argparse.Namespace) -> int:
    from control_plane.devstack.run import DevStackSettings, run_devstack

    env = os.environ.get
    ports: dict[str, int] = {}
    try:
        for name, (variable, default) in _DEVSTACK_PORTS.items():
            chosen = getattr(args, name)
            from_env = env(variable)
            if chosen is None:
                chosen = int(from_env) if from_env else (0 if args.free_ports else default)
            ports[name] = chosen
        gateway_port = env("GATEWAY_PORT")
        listen_port = args.listen_port
        if listen_port is None and gateway_port:
            listen_port = int(gateway_port)
    except ValueError as exc:
        print(f"error: a port must be a number: {exc}", file=sys.stderr)
        return 2
    if listen_port is None and args.free_ports:
        listen_port = 0
    sim_ports = args.sim_ports or env("SIM_PORTS") or ("auto" if args.free_ports else "registry")
    return run_devstack(
        DevStackSettings(
            config_path=Path(args.config),
            listen_port=listen_port,
            sim_ports=sim_ports,
            state_dir=Path(args.state_dir),
            admin_token=os.environ.get("ADMIN_TOKEN") or None,
            admin_port=ports["admin_port"],
            xds_port=ports["xds_port"],
            envoy_admin_port=ports["envoy_admin_port"],
            prometheus_port=ports["prometheus_port"],
            alertmanager_port=ports["alertmanager_port"],
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
        "--alertmanager-url",
        default=env("ALERTMANAGER_URL") or None,
        help="the Alertmanager notifying this control plane: linked from the status page (optional)",
    )
    serve.add_argument(
        "--state-db", default=env("STATE_DB", "var/gateway.db"), help="SQLite file of admin changes"
    )
    serve.add_argument(
        "--xds-secret-file",
        default=env("XDS_SECRET_FILE", "var/xds-secret"),
        help="the secret Envoys' xDS credentials derive from (created, 0600, if missing; $XDS_SECRET wins)",
    )
    serve.add_argument(
        "--allow-empty",
        action="store_true",
        default=env("ALLOW_EMPTY_REGISTRY", "") == "1",
        help="serve a registry without models (every request 404) instead of refusing it at start and "
        "on reload; a file can say the same with a top-level `allow_empty: true`",
    )
    serve.add_argument(
        "--usage-retention-days",
        type=_positive_int,
        default=int(env("USAGE_RETENTION_DAYS", "35")),
        help="how long usage per API key and minute is kept (GET /admin/keys/{id}/usage)",
    )
    serve.add_argument(
        "--usage-key-labels",
        type=_positive_int,
        default=int(env("USAGE_KEY_LABELS", "1000")),
        help="API key names in the usage metrics' `key` label; further keys are labelled (other)",
    )
    serve.set_defaults(func=_serve)

    validate = sub.add_parser("validate", help="check a registry file and exit")
    validate.add_argument("--config", default=env("GATEWAY_CONFIG", "models.yaml"))
    validate.add_argument("--allow-empty", action="store_true", help="accept a registry without models")
    validate.set_defaults(func=_validate)

    boot = sub.add_parser("bootstrap", help="print the Envoy bootstrap for one gateway node")
    boot.add_argument("--node-id", default=env("ENVOY_NODE_ID", "gateway-0"))
    boot.add_argument("--xds-host", default=env("XDS_HOST", "127.0.0.1"))
    boot.add_argument("--xds-port", type=int, default=int(env("XDS_PORT", "18000")))
    boot.add_argument("--envoy-admin-port", type=int, default=int(env("ENVOY_ADMIN_PORT", "9901")))
    boot.add_argument("--listen-port", type=int, default=None)
    boot.add_argument(
        "--xds-secret-file",
        default=env("XDS_SECRET_FILE", "var/xds-secret"),
        help="the control plane's xDS secret, to derive this node's credential ($XDS_SECRET wins)",
    )
    boot.add_argument("--output", default=None, help="write the bootstrap here (mode 0600), not to stdout")
    boot.set_defaults(func=_bootstrap)

    dev = sub.add_parser("devstack", help="run Envoy, the control plane and simulated backends (make run)")
    dev.add_argument("--config", default=env("GATEWAY_CONFIG", "models.yaml"))
    # Ports: the flag, else the environment variable of the same name, else the default (or, with
    # --free-ports, a free one). 0 always means a free one.
    dev.add_argument("--listen-port", type=int, default=None, help="$GATEWAY_PORT; default: the registry's")
    dev.add_argument("--admin-port", type=int, default=None, help="$ADMIN_PORT; default 8081")
    dev.add_argument("--xds-port", type=int, default=None, help="$XDS_PORT; default 18000")
    dev.add_argument("--envoy-admin-port", type=int, default=None, help="$ENVOY_ADMIN_PORT; default 9901")
    dev.add_argument("--prometheus-port", type=int, default=None, help="$PROMETHEUS_PORT; default 9090")
    dev.add_argument("--alertmanager-port", type=int, default=None, help="$ALERTMANAGER_PORT; default 9093")
    dev.add_argument(
        "--sim-ports",
        default=None,
        help="$SIM_PORTS: the simulators' ports: 'registry' (the URLs in the config; default), 'auto' (free "
        "ones) or '+N' (the registry's plus N)",
    )
    dev.add_argument(
        "--free-ports",
        action="store_true",
        default=env("FREE_PORTS", "") not in ("", "0"),
        help="$FREE_PORTS: every port not set otherwise is a free one, simulators included (a second stack)",
    )
    dev.add_argument("--state-dir", default=env("STATE_DIR", "var"))
    dev.set_defaults(func=_devstack)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args))
