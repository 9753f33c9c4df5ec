"""docker-compose hardening: restart policies and health checks everywhere, xDS on an internal network,
admin on the host's loopback, secrets passed as files; the health-check commands work as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
ONE_SHOT = {"envoy-bootstrap"}


class _Loader(yaml.SafeLoader):
    """Compose's `!reset` tag as a plain value."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def services() -> dict[str, Any]:
    return dict(yaml.load((REPO / "docker-compose.yml").read_text(), Loader=_Loader)["services"])


def test_every_long_running_service_restarts_and_has_a_health_check() -> None:
    for name, service in services().items():
        if name in ONE_SHOT:
            assert "restart" not in service, name
            continue
        assert service.get("restart") == "unless-stopped", name
        assert service.get("healthcheck", {}).get("test"), name


def test_admin_and_xds_are_not_published_beyond_loopback() -> None:
    for name, service in services().items():
        for port in service.get("ports", []):
            host_port = str(port)
            assert "18000" not in host_port, (name, port)
            if name != "envoy":  # the OpenAI-style API is the one public port
                assert host_port.startswith("127.0.0.1:"), (name, port)
    doc = yaml.load((REPO / "docker-compose.yml").read_text(), Loader=_Loader)
    assert doc["networks"]["control"]["internal"] is True
    control_plane = doc["services"]["control-plane"]
    command = control_plane["command"]
    assert command[command.index("--xds-host") + 1] == "xds"
    assert control_plane["networks"]["control"]["aliases"] == ["xds"]


def test_secrets_travel_as_files_never_on_a_command_line() -> None:
    doc = yaml.load((REPO / "docker-compose.yml").read_text(), Loader=_Loader)
    control_plane, bootstrap = doc["services"]["control-plane"], doc["services"]["envoy-bootstrap"]
    assert set(control_plane["secrets"]) == {"xds_secret", "admin_token"}
    assert "XDS_SECRET_FILE=/run/secrets/xds_secret" in control_plane["environment"]
    assert "ADMIN_TOKEN_FILE=/run/secrets/admin_token" in control_plane["environment"]
    assert bootstrap["secrets"] == ["xds_secret"]
    assert "--output /bootstrap/envoy.yaml" in bootstrap["entrypoint"][-1]
    for service in doc["services"].values():
        text = yaml.safe_dump(service)
        assert not re.search(r"(XDS_SECRET|ADMIN_TOKEN)=(?!/run/secrets/)", text)
    assert set(doc["secrets"]) == {"xds_secret", "admin_token"}
    ignore = (REPO / "deploy/compose/secrets/.gitignore").read_text().splitlines()
    assert "*" in ignore


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path in ("/ready", "/health") else 503)
        self.end_headers()
        self.wfile.write(b"LIVE\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash health checks need bash")
@pytest.mark.parametrize("name", ["envoy", "tgi-qwen2", "vllm-llama3"])
def test_the_bash_health_checks_work_as_written(name: str, http_port: int) -> None:
    test = services()[name]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "bash", "-c"]
    script = re.sub(r"/dev/tcp/127\.0\.0\.1/\d+", f"/dev/tcp/127.0.0.1/{http_port}", test[3])
    assert subprocess.run(["bash", "-c", script], timeout=10).returncode == 0
    broken = script.replace("/ready", "/nope").replace("/health", "/nope")
    assert subprocess.run(["bash", "-c", broken], timeout=10).returncode != 0
