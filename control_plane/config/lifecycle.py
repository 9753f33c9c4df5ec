"""The registry's model lifecycle settings (docs/lifecycle.md): directories the control plane scans for
models, the GPU memory budget they share, and per model how its engine is launched (`launch`).

A model with `launch` has no endpoints in the file: its replicas are engines the control plane starts on
demand (control_plane/lifecycle). Models found in `model_dirs` become such models; a model of the file with
the same id gives them aliases, limits and launch settings.
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from control_plane.config.base import Frozen


class ModelDirectory(Frozen):
    path: str = Field(
        description="A directory of model folders and GGUF files (relative: to the registry file)."
    )
    launcher: str = Field(
        default="simulator",
        description="How models found here are served: simulator, vllm, tgi, tei or llamacpp (GGUF files "
        "always use llamacpp unless this is simulator).",
    )


class AutoscaleSettings(Frozen):
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
    target_gpu_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Mean GPU utilisation of the ready replicas, 0..1 (DCGM_FI_DEV_GPU_UTIL / 100 from the "
        "engine's or its DCGM exporter's /metrics; NVML on the GPUs a launched replica was given).",
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
        targets = (self.target_queue_depth, self.target_ttft_s, self.target_in_flight)
        if all(t is None for t in (*targets, self.target_gpu_utilization)):
            raise ValueError(
                "set at least one of target_queue_depth, target_ttft_s, target_in_flight, "
                "target_gpu_utilization"
            )
        return self


class RestartSettings(Frozen):
    """How a launched replica that exits or fails its health probes is replaced (docs/lifecycle.md,
    "Replacing a replica")."""

    unhealthy_after_s: float = Field(
        default=30,
        ge=0,
        le=86_400,
        description="A ready replica the health probes mark unhealthy for this long is stopped and started "
        "anew (0: at the probes' verdict).",
    )
    drain_s: float = Field(
        default=10,
        ge=0,
        le=3600,
        description="How long requests in flight on an unhealthy replica may finish before it is stopped.",
    )
    max_restarts: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="Replacements allowed within window_s; the next failure marks the model failed.",
    )
    window_s: float = Field(default=600, gt=0, le=7 * 86_400, description="The window of max_restarts.")
    backoff_s: float = Field(
        default=1,
        ge=0,
        le=3600,
        description="Wait before the nth replacement of the window: backoff_s * 2^(n-1), at most "
        "backoff_max_s.",
    )
    backoff_max_s: float = Field(default=60, ge=0, le=3600)

    def backoff(self, nth: int) -> float:
        """The wait before the `nth` (1, 2, ...) replacement of the window."""
        return float(min(self.backoff_s * 2 ** max(nth - 1, 0), self.backoff_max_s))


class ScalingSettings(Frozen):
    """For a model with fixed `endpoints` (engines someone else runs, e.g. a Deployment that Kubernetes
    HPA or KEDA scales): the bounds and targets from which the control plane computes the replica count
    it should have, exported as `llm_gateway_model_desired_replicas` (docs/lifecycle.md)."""

    min_replicas: int = Field(default=1, ge=1, le=10_000, description="The fewest replicas to ask for.")
    max_replicas: int = Field(default=1, ge=1, le=10_000, description="The most replicas to ask for.")
    autoscale: AutoscaleSettings = Field(
        default_factory=AutoscaleSettings, description="Targets for asking for more or fewer replicas."
    )

    @model_validator(mode="after")
    def _replica_bounds(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class LaunchSettings(Frozen):
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
    restart: RestartSettings = Field(
        default_factory=RestartSettings,
        description="Replacing a replica that exits or fails its health probes, with bounded restarts.",
    )

    @model_validator(mode="after")
    def _replica_bounds(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class LifecycleSettings(Frozen):
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
