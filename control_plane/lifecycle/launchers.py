"""Engine launchers: how to start one replica of a model on each engine, their command lines as data.

A launcher's command line is a list of argument groups (templates with ``{placeholder}`` fields filled from
the `LaunchSpec`); a group whose placeholder has no value (no GPUs: no ``--num-shard``) is left out whole.
Operators may replace the executable and append arguments; the spec's own `extra_args` come last, so an
engine that keeps the last of a repeated flag (argparse, clap's overrides) lets them win.

Placeholders: ``{python}`` ``{model_id}`` ``{served_name}`` ``{host}`` ``{port}`` ``{path}`` ``{engine}``
``{endpoint_id}`` ``{memory_mb}`` ``{gpus}`` ``{num_gpus}`` ``{tensor_parallel}`` ``{num_shard}``
``{gpu_memory_utilization}`` ``{cuda_memory_fraction}`` ``{ctx_size}`` ``{load_time_s}`` ``{profile}``.
"""

from __future__ import annotations

import math
import os
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from control_plane.lifecycle.types import Launcher, LaunchSpec, ModelKind

ArgGroup = tuple[str, ...]

# Where `python -m backends.simulator` is importable from: the repository (or site-packages) root.
_CODE_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own default for --gpu-memory-utilization
# Bounds of a fraction derived from a budget: a tiny budget still gets a usable share, and a model given a
# whole card leaves the CUDA context and activations some room (what vLLM's 0.9 default leaves).
_MIN_FRACTION, _MAX_FRACTION = 0.05, 0.95


class LauncherError(ValueError):
    """A launch that cannot be rendered: unknown launcher, a kind the engine does not serve, no weights."""


class UnknownLauncher(LauncherError):
    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown launcher {name!r}; known launchers: {', '.join(known)}")
        self.name = name
        self.known = tuple(known)


class UnsupportedKind(LauncherError):
    def __init__(self, launcher: str, kind: ModelKind, supported: Sequence[ModelKind]) -> None:
        served = ", ".join(k.value for k in supported)
        super().__init__(f"launcher {launcher!r} cannot serve {kind.value} models (it serves: {served})")
        self.launcher = launcher
        self.kind = kind


class MissingWeights(LauncherError):
    def __init__(self, launcher: str, model_id: str) -> None:
        super().__init__(
            f"launcher {launcher!r} needs the weights of {model_id!r} (a path), and none was given"
        )


def _fraction(memory_mb: int, gpu_total_mb: int | None, num_gpus: int) -> float | None:
    """The share of each card the replica may use: its budget split over its GPUs, over one card's size.
    Floored to 0.01 so the engine stays within its budget; None when the budget or the card is unknown."""
    if memory_mb <= 0 or not gpu_total_mb:
        return None
    share = memory_mb / max(1, num_gpus) / gpu_total_mb
    return min(_MAX_FRACTION, max(_MIN_FRACTION, math.floor(share * 100) / 100))


class TemplateLauncher:
    """A launcher whose command line is `template` (argument groups) plus `kind_args[spec.kind]`."""

    name = "template"
    default_executable = ""
    template: tuple[ArgGroup, ...] = ()
    kind_args: Mapping[ModelKind, tuple[ArgGroup, ...]] = {}  # the kinds served, and their extra arguments
    engines: Mapping[ModelKind, str] = {}  # the registry engine the started server speaks, per kind
    needs_weights = True
    alias_flag: str | None = None  # repeated once per alias; None: the engine does not check `model`

    def __init__(
        self,
        *,
        executable: str | None = None,
        extra_args: Sequence[str] = (),
        gpu_total_mb: int | None = None,
    ) -> None:
        self.executable = executable or self.default_executable
        self.extra_args = tuple(extra_args)
        self.gpu_total_mb = gpu_total_mb  # one card's memory, when known: turns a budget into a fraction

    def engine(self, spec: LaunchSpec) -> str:
        self._check_kind(spec)
        return self.engines[spec.kind]

    def command(self, spec: LaunchSpec) -> list[str]:
        self._check_kind(spec)
        if self.needs_weights and spec.path is None:
            raise MissingWeights(self.name, spec.model_id)
        values = self.values(spec)
        argv = [self.executable]
        for group in (*self.template, *self.kind_args[spec.kind]):
            argv += _render(group, values, self.name)
        return [*argv, *self.alias_args(spec), *self.extra_args, *spec.extra_args]

    def alias_args(self, spec: LaunchSpec) -> list[str]:
        """The arguments that make the engine answer to the model's aliases too."""
        if self.alias_flag is None:
            return []
        return [arg for alias in spec.aliases for arg in (self.alias_flag, alias)]

    def environment(self, spec: LaunchSpec) -> dict[str, str]:
        """Environment additions: the spec's, plus the GPUs the replica may see."""
        env = dict(spec.env)
        if spec.gpus:
            # Every CUDA engine (vLLM, TGI, TEI, llama.cpp's CUDA build) numbers the visible cards from 0.
            env.setdefault("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in spec.gpus))
        return env

    def values(self, spec: LaunchSpec) -> dict[str, str | None]:
        """The placeholders' values for `spec`; None leaves out the groups that use it."""
        num_gpus = len(spec.gpus)
        fraction = _fraction(spec.memory_mb, self.gpu_total_mb, num_gpus)
        return {
            "python": sys.executable,
            "model_id": spec.model_id,
            "served_name": spec.served_name,
            "host": spec.host,
            "port": str(spec.port),
            "path": str(spec.path) if spec.path is not None else None,
            "endpoint_id": f"{spec.model_id}-{spec.port}",
            "memory_mb": str(spec.memory_mb),
            "gpus": ",".join(str(g) for g in spec.gpus) or None,
            "num_gpus": str(num_gpus) if num_gpus else None,
            "num_shard": str(num_gpus) if num_gpus else None,
            "tensor_parallel": str(num_gpus) if num_gpus > 1 else None,
            "gpu_memory_utilization": f"{DEFAULT_GPU_MEMORY_UTILIZATION if fraction is None else fraction:g}",
            "cuda_memory_fraction": f"{fraction:g}" if fraction is not None else None,
        }

    def _check_kind(self, spec: LaunchSpec) -> None:
        if spec.kind not in self.kind_args:
            raise UnsupportedKind(self.name, spec.kind, list(self.kind_args))


def _render(group: ArgGroup, values: Mapping[str, str | None], launcher: str) -> list[str]:
    """The group's arguments with their placeholders filled, or [] when one of them has no value."""
    rendered = []
    for arg in group:
        fields = [name for _, name, _, _ in string.Formatter().parse(arg) if name is not None]
        for name in fields:
            if name not in values:
                raise LauncherError(f"launcher {launcher!r}: unknown placeholder {{{name}}} in {arg!r}")
            if values[name] is None:
                return []
        rendered.append(arg.format_map(values))
    return rendered


class SimulatorLauncher(TemplateLauncher):
    """The simulated engine of backends/simulator (the default): no weights needed, a configurable load time
    and memory footprint, so the whole lifecycle runs on a machine without a GPU."""

    name = "simulator"
    template = (
        ("-m", "backends.simulator"),
        ("--engine", "{engine}"),
        ("--model-id", "{served_name}"),
        ("--endpoint-id", "{endpoint_id}"),
        ("--host", "{host}"),
        ("--port", "{port}"),
        ("--load-time-s", "{load_time_s}"),
        ("--memory-mb", "{memory_mb}"),
        ("--profile", "{profile}"),
    )
    kind_args = {kind: () for kind in ModelKind}
    engines = {ModelKind.CHAT: "vllm", ModelKind.EMBEDDING: "tei", ModelKind.RERANK: "tei"}
    needs_weights = False
    alias_flag = "--served-name"

    def __init__(
        self,
        *,
        executable: str | None = None,
        extra_args: Sequence[str] = (),
        gpu_total_mb: int | None = None,
        load_time_s: float = 0.0,
        profile: str | None = None,
    ) -> None:
        super().__init__(
            executable=executable or sys.executable, extra_args=extra_args, gpu_total_mb=gpu_total_mb
        )
        self.load_time_s = load_time_s
        self.profile = profile

    def values(self, spec: LaunchSpec) -> dict[str, str | None]:
        values = super().values(spec)
        values.update(
            engine=self.engines[spec.kind], load_time_s=f"{self.load_time_s:g}", profile=self.profile
        )
        return values

    def environment(self, spec: LaunchSpec) -> dict[str, str]:
        # `python -m backends.simulator` from any working directory: the code root on the import path.
        return {"PYTHONPATH": str(_CODE_ROOT), **super().environment(spec)}


class VllmLauncher(TemplateLauncher):
    """vLLM's OpenAI-compatible server. Flags per https://docs.vllm.ai/en/v0.8.5/serving/engine_args.html
    (`vllm serve` usage): the model path is positional; --served-model-name, --host, --port,
    --gpu-memory-utilization (a per-GPU fraction, default 0.9), --tensor-parallel-size."""

    name = "vllm"
    default_executable = "vllm"
    template = (
        ("serve", "{path}"),
        ("--served-model-name", "{served_name}"),
        ("--host", "{host}"),
        ("--port", "{port}"),
        ("--gpu-memory-utilization", "{gpu_memory_utilization}"),
        ("--tensor-parallel-size", "{tensor_parallel}"),
    )
    kind_args = {ModelKind.CHAT: ()}
    engines = {ModelKind.CHAT: "vllm"}

    def alias_args(self, spec: LaunchSpec) -> list[str]:
        return []  # vLLM takes every name after --served-model-name (the first is the one it reports)

    def command(self, spec: LaunchSpec) -> list[str]:
        argv = super().command(spec)
        if spec.aliases:
            at = argv.index("--served-model-name") + 2
            argv[at:at] = list(spec.aliases)
        return argv


class TgiLauncher(TemplateLauncher):
    """Hugging Face text-generation-inference. Flags per
    https://huggingface.co/docs/text-generation-inference/reference/launcher: --model-id (a hub id or a local
    folder), --hostname, --port, --num-shard (with CUDA_VISIBLE_DEVICES naming the cards),
    --cuda-memory-fraction (default 1.0; set only when the budget and the card size are known)."""

    name = "tgi"
    default_executable = "text-generation-launcher"
    template = (
        ("--model-id", "{path}"),
        ("--hostname", "{host}"),
        ("--port", "{port}"),
        ("--num-shard", "{num_shard}"),
        ("--cuda-memory-fraction", "{cuda_memory_fraction}"),
    )
    kind_args = {ModelKind.CHAT: ()}
    engines = {ModelKind.CHAT: "tgi"}


class TeiLauncher(TemplateLauncher):
    """Hugging Face text-embeddings-inference, for embedding models and rerankers (it picks the task from the
    model's config). Flags per https://huggingface.co/docs/text-embeddings-inference/cli_arguments:
    --model-id (a hub id or a local folder), --hostname, --port. TEI has no memory-fraction flag."""

    name = "tei"
    default_executable = "text-embeddings-router"
    template = (
        ("--model-id", "{path}"),
        ("--hostname", "{host}"),
        ("--port", "{port}"),
    )
    kind_args = {ModelKind.EMBEDDING: (), ModelKind.RERANK: ()}
    engines = {ModelKind.EMBEDDING: "tei", ModelKind.RERANK: "tei"}


class LlamaCppLauncher(TemplateLauncher):
    """llama.cpp's `llama-server` for GGUF files: a real engine on CPU. It speaks the OpenAI API (chat,
    completions, /v1/models, /health: 503 while loading, 200 once loaded), so it is routed and probed as a
    vLLM endpoint; its /metrics names differ (``llamacpp:*``, enabled by --metrics), so load-aware weights
    and engine dashboards see no vLLM series from it. Flags per llama.cpp's tools/server/README.md:
    -m/--model, --host, --port, -a/--alias (the name in responses and /v1/models), -c/--ctx-size, --metrics.
    """

    name = "llamacpp"
    default_executable = "llama-server"
    template = (
        ("-m", "{path}"),
        ("--host", "{host}"),
        ("--port", "{port}"),
        ("--alias", "{served_name}"),
        ("--ctx-size", "{ctx_size}"),
        ("--metrics",),
    )
    kind_args = {ModelKind.CHAT: ()}
    engines = {ModelKind.CHAT: "vllm"}

    def __init__(
        self,
        *,
        executable: str | None = None,
        extra_args: Sequence[str] = (),
        gpu_total_mb: int | None = None,
        ctx_size: int = 4096,
    ) -> None:
        super().__init__(
            executable=executable or llama_server_binary(), extra_args=extra_args, gpu_total_mb=gpu_total_mb
        )
        self.ctx_size = ctx_size  # llama.cpp's 0 means the model's trained context, often far too large

    def values(self, spec: LaunchSpec) -> dict[str, str | None]:
        values = super().values(spec)
        values["ctx_size"] = str(self.ctx_size)
        return values


def llama_server_binary() -> str:
    """llama.cpp's server when no executable is configured: $LLAMA_SERVER, else the one `make llamacpp`
    builds into the virtual environment (<venv>/llama.cpp/bin/llama-server), else `llama-server` on PATH."""
    explicit = os.environ.get("LLAMA_SERVER")
    if explicit:
        return explicit
    built = Path(sys.prefix) / "llama.cpp" / "bin" / "llama-server"
    if os.access(built, os.X_OK):
        return str(built)
    return LlamaCppLauncher.default_executable


LAUNCHERS: Mapping[str, type[TemplateLauncher]] = {
    cls.name: cls for cls in (SimulatorLauncher, VllmLauncher, TgiLauncher, TeiLauncher, LlamaCppLauncher)
}
DEFAULT_LAUNCHER = SimulatorLauncher.name


def launcher_for(
    name: str,
    *,
    executable: str | None = None,
    extra_args: Sequence[str] = (),
    gpu_total_mb: int | None = None,
) -> TemplateLauncher:
    """The launcher called `name`, with the operator's executable and appended arguments; `UnknownLauncher`
    (listing the known ones) otherwise. Launcher-specific settings: construct the class from LAUNCHERS."""
    try:
        cls = LAUNCHERS[name]
    except KeyError:
        raise UnknownLauncher(name, sorted(LAUNCHERS)) from None
    return cls(executable=executable, extra_args=extra_args, gpu_total_mb=gpu_total_mb)


def environment_for(launcher: Launcher, spec: LaunchSpec) -> dict[str, str]:
    """The environment additions for a launch: the launcher's own (GPU selection) when it has them, else
    the spec's. (The `Launcher` protocol only requires `command`; these launchers add `environment`.)"""
    environment = getattr(launcher, "environment", None)
    if callable(environment):
        return dict(environment(spec))
    return dict(spec.env)
