"""The registry's model lifecycle settings (docs/lifecycle.md): directories the control plane scans for
models, the GPU memory budget they share, and per model how its engine is launched (`launch`).

A model with `launch` has no endpoints in the file: its replicas are engines the control plane starts on
demand (control_plane/lifecycle). Models found in `model_dirs` become such models; a model of the file with
the same id gives them aliases, limits and launch settings.
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelDirectory(_Frozen):
    path: str = Field(
        description="A directory of model folders and GGUF files (relative: to the registry file)."
    )
    launcher: str = Field(
        default="simulator",
        description="How models found here are served: simulator, vllm, tgi, tei or llamacpp (GGUF files "
        "always use llamacpp unless this is simulator).",
    )


class AutoscaleSettings(_Frozen):
    """When a launched model gets another replica, and when it gives one back (docs/lifecycle.md,
    "Replicas and autoscaling"). A target left unset is not used; at least one must be set."""

    target_queue_depth: float | None = Field(
        default=4,
        gt=0,
        le=100_000,
        description="Requests waiting in the engines' queues, per ready replica (vLLM's "
        "num_requests_waiting and its equivalents).",
    )
    target_ttft_s: float | None = Field(
        default=None, gt=0, le=3600, description="Mean time to first token the replicas report."
    )
    target_in_flight: float | None = Field(
        default=None,
        gt=0,
        le=100_000,
        description="Requests in flight per ready replica, as Envoy's load reports and the activator count.",
    )
    scale_up_after_s: float = Field(
        default=15,
        ge=0,
        le=86_400,
        description="How long a signal stays above target before a replica is added.",
    )
    scale_down_cooldown_s: float = Field(
        default=120,
        ge=0,
        le=86_400,
        description="How long the load stays low enough for one replica fewer (and since the last change) "
        "before a replica is drained and stopped.",
    )

    @model_validator(mode="after")
    def _some_target(self) -> Self:
        if self.target_queue_depth is None and self.target_ttft_s is None and self.target_in_flight is None:
            raise ValueError("set at least one of target_queue_depth, target_ttft_s, target_in_flight")
        return self


class LaunchSettings(_Frozen):
    """How the control plane starts this model's engines."""

    launcher: str = Field(default="simulator", description="simulator, vllm, tgi, tei or llamacpp.")
    path: str | None = Field(default=None, description="Weights: a model folder or a GGUF file.")
    memory_mb: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Accelerator memory one replica needs; default: "
        "the estimate from its weights (discovery), else 1024.",
    )
    pinned: bool = Field(default=False, description="Never unloaded to make room for another model.")
    idle_unload_s: float = Field(
        default=0, ge=0, le=30 * 86_400, description="Unload after this long without a request; 0: never."
    )
    activation_timeout_s: float = Field(
        default=120,
        gt=0,
        le=3600,
        description="How long a request is held while the model loads, before 503 model_loading_timeout.",
    )
    load_time_s: float = Field(
        default=2, ge=0, le=3600, description="Simulator only: how long it takes to load."
    )
    extra_args: tuple[str, ...] = Field(default=(), description="Appended to the engine's command line.")
    gpus: tuple[int, ...] = Field(default=(), description="Accelerator indexes its replicas may use.")
    min_replicas: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Replicas loaded at start and kept: never evicted, idle-unloaded or scaled below it "
        "(0: loaded on the first request, unloaded when idle).",
    )
    max_replicas: int = Field(
        default=1, ge=1, le=64, description="The most replicas autoscaling starts; each holds memory_mb."
    )
    autoscale: AutoscaleSettings = Field(
        default_factory=AutoscaleSettings, description="Targets for adding and removing replicas."
    )

    @model_validator(mode="after")
    def _replica_bounds(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class LifecycleSettings(_Frozen):
    model_dirs: tuple[ModelDirectory, ...] = ()
    scan_interval_s: float = Field(default=30, gt=0, le=86_400, description="Rescan of model_dirs.")
    gpu_memory_mb: int | None = Field(
        default=None,
        ge=1,
        le=100_000_000,
        description="Memory the launched models may use together; loading past it unloads the least "
        "recently used idle models first. None: no budget.",
    )
    log_dir: str | None = Field(
        default=None, description="Engines' logs; default: beside the state database."
    )
