"""The lifecycle's shared vocabulary: what discovery finds, what a launcher is asked to start, the states a
managed model goes through. Small frozen types, so discovery, launchers and the manager stay apart."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol


class ModelKind(StrEnum):
    CHAT = "chat"  # chat / instruct / base generators: OpenAI chat and completions, /v1/generate
    EMBEDDING = "embedding"
    RERANK = "rerank"


class LifecycleState(StrEnum):
    COLD = "cold"  # known, no engine running: a request loads it
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"  # finishing its requests before it is unloaded
    UNLOADING = "unloading"
    FAILED = "failed"  # the last load failed (reason kept); a request tries again


@dataclass(frozen=True)
class DiscoveredModel:
    """One entry of a scanned model directory: a Hugging Face folder or a GGUF file."""

    id: str  # a registry-valid model id derived from the folder or file name
    path: Path
    format: str  # "hf" or "gguf"
    size_bytes: int  # weights on disk
    kind: ModelKind | None = None  # None: not recognised (see `problem`)
    architecture: str | None = None  # config.json's architectures[0], or GGUF's general.architecture
    memory_mb: int = 0  # estimated accelerator memory to serve it (weights plus headroom)
    problem: str | None = None  # why it cannot be served, for the admin API


@dataclass(frozen=True)
class LaunchSpec:
    """What a launcher is asked to start: one replica of one model."""

    model_id: str
    served_name: str  # the model name the engine must answer to (its `model` field)
    kind: ModelKind
    port: int
    host: str = "127.0.0.1"
    path: Path | None = None  # weights (folder or GGUF file); None for the simulator without weights
    gpus: tuple[int, ...] = ()  # accelerator indexes this replica may use
    memory_mb: int = 0  # the memory budgeted for it (the engine is told to stay within it where it can)
    extra_args: tuple[str, ...] = ()  # operator's additional command-line arguments
    # More names the engine must answer to: the model's aliases (Envoy routes them unchanged, and engines
    # that check `model` refuse a name they do not serve).
    aliases: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=())


class Launcher(Protocol):
    """Turns a LaunchSpec into a command line (data, unit-testable) and says which engine API the started
    server speaks, so the gateway routes, probes and scrapes it like any endpoint of that engine."""

    name: str

    def engine(self, spec: LaunchSpec) -> str:
        """The registry engine kind of the started server: tgi, vllm, sglang or tei."""

    def command(self, spec: LaunchSpec) -> list[str]:
        """The argv to run (argv[0] an executable); environment additions come from `spec.env`."""
