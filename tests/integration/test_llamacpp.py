"""llama.cpp's server as a real engine: a tiny llama GGUF with random weights (written here with the `gguf`
package) is loaded by `llama-server`, started by the llama.cpp launcher, and generates through its real
load and decode path; then the same model, declared `launch: {launcher: llamacpp}`, is loaded by the
activator on its first request and answers the official OpenAI SDK through Envoy, streams included.

Needs `make llamacpp` (llama-server in the venv, and the `gguf` package); skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from control_plane.devstack.procs import free_port
from control_plane.lifecycle.launchers import LlamaCppLauncher, llama_server_binary
from control_plane.lifecycle.process import EngineProcess
from control_plane.lifecycle.types import LaunchSpec, ModelKind
from tests.integration.conftest import StackFactory
from tests.support.gateway import admin_client
from tests.support.registries import model

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
READY_TIMEOUT_S = 120.0  # generous: a loaded machine; the model itself loads in well under a second
MAX_TOKENS = 8
# Random weights write random text; ignore_eos (a llama.cpp sampling field) makes every answer exactly
# MAX_TOKENS long, so the tests can tell that tokens were generated.
SAMPLING: dict[str, Any] = {"ignore_eos": True, "seed": 7}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()}


def _binary() -> str:
    binary = llama_server_binary()
    if shutil.which(binary) is None:
        pytest.skip(f"llama.cpp's server is not built ({binary}): run `make llamacpp`")
    if not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU lacks AVX2/FMA, which the portable llama.cpp build (GGML_NATIVE=OFF) uses")
    return binary


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    _binary()
    pytest.importorskip("gguf", reason="the gguf package is not installed: run `make llamacpp`")
    from tests.support.tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(tmp_path / "tiny-llama.gguf")


def _logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in log_dir.glob("*.log"))


def test_the_launcher_starts_llama_server_on_a_gguf_and_it_generates(gguf_file: Path, tmp_path: Path) -> None:
    port = free_port()
    spec = LaunchSpec(model_id=MODEL, served_name=MODEL, kind=ModelKind.CHAT, port=port, path=gguf_file)
    engine = EngineProcess(spec, LlamaCppLauncher(ctx_size=512), tmp_path / "logs")
    assert engine.argv[0] == _binary()

    async def body() -> None:
        await engine.start()
        try:
            await engine.wait_ready(READY_TIMEOUT_S)
            async with httpx.AsyncClient(base_url=engine.url, timeout=60) as client:
                models = (await client.get("/v1/models")).json()
                assert MODEL in [m["id"] for m in models["data"]]  # --alias
                request = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Hello there!"}],
                    "max_tokens": MAX_TOKENS,
                    **SAMPLING,
                }
                response = await client.post("/v1/chat/completions", json=request)
                assert response.status_code == 200, response.text
                answer = response.json()
                assert answer["choices"][0]["finish_reason"] == "length"
                assert isinstance(answer["choices"][0]["message"]["content"], str)
                assert answer["usage"]["completion_tokens"] == MAX_TOKENS
                assert answer["usage"]["prompt_tokens"] > len("Hello there!")  # bytes, template and all
                metrics = (await client.get("/metrics")).text  # --metrics
                assert "llamacpp:tokens_predicted_total" in metrics
        finally:
            code = await engine.stop(grace_s=10)
        assert code is not None and not engine.running
        assert "starting:" in engine.log_path.read_text()

    asyncio.run(body())


def test_a_launched_gguf_loads_on_first_use_and_answers_the_openai_sdk_through_envoy(
    make_stack: StackFactory, gguf_file: Path, tmp_path: Path
) -> None:
    log_dir = tmp_path / "engine-logs"
    tiny = model(MODEL, "vllm", [], launch={"launcher": "llamacpp", "path": str(gguf_file)})
    tiny.pop("endpoints")
    doc = {
        "gateway": {"expose_upstream_host": True},
        "lifecycle": {"log_dir": str(log_dir)},
        "models": [tiny],
    }
    stack = make_stack(doc)
    with admin_client(stack) as admin:
        assert admin.get(f"/admin/models/{MODEL}").json()["state"] == "cold"
    client = openai.OpenAI(base_url=f"{stack.envoys[0].url}/v1", api_key="unused", timeout=READY_TIMEOUT_S)
    messages: Any = [{"role": "user", "content": "Say something."}]

    # Cold: held by the activator while llama-server loads the GGUF, then answered.
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, extra_body=SAMPLING
    )
    assert chat.choices[0].finish_reason == "length", _logs(log_dir)
    assert chat.usage is not None and chat.usage.completion_tokens == MAX_TOKENS
    with admin_client(stack) as admin:
        status = admin.get(f"/admin/models/{MODEL}").json()
    assert status["state"] == "ready", status
    replica = status["lifecycle"]["replicas"][0]["address"]

    # Warm, streamed: Envoy goes to llama-server itself; the SDK reads its SSE to the end.
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, stream=True, extra_body=SAMPLING
    )
    assert raw.headers["x-served-by"] == replica
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"], chunks
    assert isinstance(text, str) and len(chunks) > 2  # tokens arrive as they are sampled

    with admin_client(stack) as admin:
        assert admin.post(f"/admin/models/{MODEL}/unload").json()["state"] == "cold"
    assert "llama" in _logs(log_dir)  # the engine's own log was kept
