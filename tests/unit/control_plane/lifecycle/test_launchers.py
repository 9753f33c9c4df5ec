"""Engine launchers render the real engines' command lines from a LaunchSpec: every launcher and kind, GPU
selection and memory settings, operator overrides, and typed errors for what cannot be launched."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from control_plane.lifecycle.launchers import (
    LAUNCHERS,
    LauncherError,
    LlamaCppLauncher,
    MissingWeights,
    SimulatorLauncher,
    UnknownLauncher,
    UnsupportedKind,
    environment_for,
    launcher_for,
    llama_server_binary,
)
from control_plane.lifecycle.types import Launcher, LaunchSpec, ModelKind

pytestmark = pytest.mark.unit

WEIGHTS = Path("/models/qwen2-7b")
H100_MB = 81_559


def spec(kind: ModelKind = ModelKind.CHAT, **overrides: object) -> LaunchSpec:
    values: dict[str, object] = {
        "model_id": "qwen2",
        "served_name": "Qwen/Qwen2-7B-Instruct",
        "kind": kind,
        "port": 21001,
        "path": WEIGHTS,
    }
    values.update(overrides)
    return LaunchSpec(**values)  # type: ignore[arg-type]


def flag(argv: list[str], name: str) -> str:
    """The value following `name` (which must appear exactly once)."""
    assert argv.count(name) == 1, f"{name} appears {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


# --- the simulator -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "engine"),
    [(ModelKind.CHAT, "vllm"), (ModelKind.EMBEDDING, "tei"), (ModelKind.RERANK, "tei")],
)
def test_simulator_command_per_kind(kind: ModelKind, engine: str) -> None:
    launcher = SimulatorLauncher(load_time_s=2.5)
    s = spec(kind, path=None, memory_mb=9000)
    argv = launcher.command(s)
    assert argv[:3] == [sys.executable, "-m", "backends.simulator"]
    assert launcher.engine(s) == engine
    assert flag(argv, "--engine") == engine
    assert flag(argv, "--model-id") == "Qwen/Qwen2-7B-Instruct"  # answers to the served name
    assert flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--port") == "21001"
    assert flag(argv, "--load-time-s") == "2.5"
    assert flag(argv, "--memory-mb") == "9000"
    assert "--profile" not in argv  # no profile set: the group is left out


def test_simulator_profile_extra_args_and_pythonpath() -> None:
    launcher = SimulatorLauncher(profile="fast", extra_args=["--max-batch", "4"])
    s = spec(path=None, extra_args=("--load-time-s", "7"), env=(("SIM_X", "1"),))
    argv = launcher.command(s)
    assert flag(argv, "--profile") == "fast"
    # Operator's arguments, then the spec's, last: argparse keeps the last --load-time-s.
    assert argv[-4:] == ["--max-batch", "4", "--load-time-s", "7"]
    env = environment_for(launcher, s)
    assert env["SIM_X"] == "1"
    assert (Path(env["PYTHONPATH"]) / "backends" / "simulator" / "cli.py").is_file()


def test_simulator_is_the_default_and_needs_no_weights() -> None:
    from control_plane.lifecycle.launchers import DEFAULT_LAUNCHER

    assert DEFAULT_LAUNCHER == "simulator"
    assert launcher_for("simulator").command(spec(path=None))  # renders without a path


# --- vLLM --------------------------------------------------------------------------------------------------


def test_vllm_command_with_budget_and_gpus() -> None:
    launcher = launcher_for("vllm", gpu_total_mb=H100_MB)
    s = spec(gpus=(2, 3), memory_mb=40_000)
    argv = launcher.command(s)
    assert argv[:3] == ["vllm", "serve", str(WEIGHTS)]
    assert flag(argv, "--served-model-name") == "Qwen/Qwen2-7B-Instruct"
    assert flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--port") == "21001"
    # 40 000 MB over two cards of 81 559 MB: 0.245 each, floored to stay within the budget.
    assert flag(argv, "--gpu-memory-utilization") == "0.24"
    assert flag(argv, "--tensor-parallel-size") == "2"
    assert launcher.engine(s) == "vllm"
    assert environment_for(launcher, s) == {"CUDA_VISIBLE_DEVICES": "2,3"}


def test_vllm_fraction_defaults_and_bounds() -> None:
    unknown_card = launcher_for("vllm").command(spec(gpus=(0,), memory_mb=20_000))
    assert flag(unknown_card, "--gpu-memory-utilization") == "0.9"  # vLLM's own default
    assert "--tensor-parallel-size" not in unknown_card  # one GPU: no tensor parallelism flag
    no_budget = launcher_for("vllm", gpu_total_mb=H100_MB).command(spec(gpus=(0,)))
    assert flag(no_budget, "--gpu-memory-utilization") == "0.9"
    whole_card = launcher_for("vllm", gpu_total_mb=24_000).command(spec(gpus=(0,), memory_mb=30_000))
    assert flag(whole_card, "--gpu-memory-utilization") == "0.95"  # capped: CUDA context headroom
    tiny = launcher_for("vllm", gpu_total_mb=H100_MB).command(spec(gpus=(0,), memory_mb=100))
    assert flag(tiny, "--gpu-memory-utilization") == "0.05"
    assert environment_for(launcher_for("vllm"), spec()) == {}  # no GPUs named: CUDA's own default


def test_vllm_serves_chat_only() -> None:
    with pytest.raises(UnsupportedKind, match=r"vllm.*embedding.*serves: chat"):
        launcher_for("vllm").command(spec(ModelKind.EMBEDDING))


# --- TGI ---------------------------------------------------------------------------------------------------


def test_tgi_command_with_shards_and_memory_fraction() -> None:
    launcher = launcher_for("tgi", gpu_total_mb=H100_MB)
    s = spec(gpus=(0, 1, 2, 3), memory_mb=160_000)
    argv = launcher.command(s)
    assert argv[0] == "text-generation-launcher"
    assert flag(argv, "--model-id") == str(WEIGHTS)
    assert flag(argv, "--hostname") == "127.0.0.1"
    assert flag(argv, "--port") == "21001"
    assert flag(argv, "--num-shard") == "4"
    assert flag(argv, "--cuda-memory-fraction") == "0.49"
    assert launcher.engine(s) == "tgi"
    assert environment_for(launcher, s)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_tgi_leaves_out_what_it_does_not_know() -> None:
    argv = launcher_for("tgi").command(spec(memory_mb=16_000))
    assert "--num-shard" not in argv and "--cuda-memory-fraction" not in argv
    with pytest.raises(UnsupportedKind):
        launcher_for("tgi").engine(spec(ModelKind.RERANK))


# --- TEI ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [ModelKind.EMBEDDING, ModelKind.RERANK])
def test_tei_command_for_embeddings_and_rerankers(kind: ModelKind) -> None:
    launcher = launcher_for("tei")
    s = spec(kind, path=Path("/models/bge-m3"), gpus=(1,), port=21002)
    argv = launcher.command(s)
    assert argv == [
        "text-embeddings-router",
        "--model-id",
        "/models/bge-m3",
        "--hostname",
        "127.0.0.1",
        "--port",
        "21002",
    ]
    assert launcher.engine(s) == "tei"
    assert environment_for(launcher, s) == {"CUDA_VISIBLE_DEVICES": "1"}
    with pytest.raises(UnsupportedKind, match="serves: embedding, rerank"):
        launcher.command(spec(ModelKind.CHAT))


# --- llama.cpp ---------------------------------------------------------------------------------------------


def test_llamacpp_command() -> None:
    gguf = Path("/models/tiny.Q4_K_M.gguf")
    launcher = LlamaCppLauncher(ctx_size=2048)
    s = spec(path=gguf, host="127.0.0.1", port=21003)
    argv = launcher.command(s)
    assert argv[0] == llama_server_binary()  # tests/unit/.../test_llama_server_binary.py
    assert flag(argv, "-m") == str(gguf)
    assert flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--port") == "21003"
    assert flag(argv, "--alias") == "Qwen/Qwen2-7B-Instruct"
    assert flag(argv, "--ctx-size") == "2048"
    assert "--metrics" in argv
    assert launcher.engine(s) == "vllm"  # it speaks the OpenAI API
    assert flag(launcher_for("llamacpp").command(s), "--ctx-size") == "4096"


# --- overrides, errors, the registry -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_every_launcher_takes_executable_and_appended_args(name: str) -> None:
    launcher = launcher_for(name, executable="/opt/engine/bin/run", extra_args=["--op", "1"])
    kind = ModelKind.EMBEDDING if name == "tei" else ModelKind.CHAT
    argv = launcher.command(spec(kind, extra_args=("--spec-flag",)))
    assert argv[0] == "/opt/engine/bin/run"
    assert argv[-3:] == ["--op", "1", "--spec-flag"]
    assert all("{" not in arg for arg in argv), argv  # every placeholder filled
    typed: Launcher = launcher  # satisfies the shared protocol
    assert typed.name == name


@pytest.mark.parametrize("name", ["vllm", "tgi", "tei", "llamacpp"])
def test_real_engines_need_weights(name: str) -> None:
    kind = ModelKind.EMBEDDING if name == "tei" else ModelKind.CHAT
    with pytest.raises(MissingWeights, match="needs the weights of 'qwen2'"):
        launcher_for(name).command(spec(kind, path=None))


def test_unknown_launcher_lists_the_known_ones() -> None:
    with pytest.raises(UnknownLauncher) as info:
        launcher_for("ollama")
    message = str(info.value)
    assert "'ollama'" in message
    for name in ("llamacpp", "simulator", "tei", "tgi", "vllm"):
        assert name in message
    assert isinstance(info.value, LauncherError) and isinstance(info.value, ValueError)


def test_unknown_placeholder_is_a_launcher_error() -> None:
    class Broken(SimulatorLauncher):
        name = "broken"
        template = (("--port", "{no_such_field}"),)

    with pytest.raises(LauncherError, match=r"unknown placeholder \{no_such_field\}"):
        Broken().command(spec(path=None))


def test_aliases_are_names_the_engine_answers_to() -> None:
    named = spec(aliases=("Qwen2-7B-Instruct", "qwen"), extra_args=("--x",))
    simulator = SimulatorLauncher().command(named)
    assert simulator[-5:] == ["--served-name", "Qwen2-7B-Instruct", "--served-name", "qwen", "--x"]
    vllm = launcher_for("vllm").command(named)
    at = vllm.index("--served-model-name")
    assert vllm[at : at + 4] == ["--served-model-name", "Qwen/Qwen2-7B-Instruct", "Qwen2-7B-Instruct", "qwen"]
    assert "--served-model-name" not in vllm[at + 1 :]
    # TGI, TEI and llama.cpp do not refuse a `model` they were not told: nothing to add.
    for name in ("tgi", "llamacpp"):
        assert launcher_for(name).command(named) == launcher_for(name).command(spec(extra_args=("--x",)))
    assert "--served-name" not in SimulatorLauncher().command(spec())
