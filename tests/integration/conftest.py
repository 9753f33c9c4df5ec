"""Fixtures that start the real parts on loopback: simulated model servers, the control plane, Envoy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from control_plane.devstack.procs import free_port
from control_plane.devstack.stack import LocalStack, StackSettings
from tests.support.echo import EchoServer
from tests.support.registries import model, registry, write

StackFactory = Callable[..., LocalStack]


@pytest.fixture
def make_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StackFactory]:
    """Build and start a stack from a registry document; everything is stopped by PID afterwards."""
    stacks: list[LocalStack] = []

    def make(
        doc: dict[str, Any],
        *,
        start: bool = True,
        sim_profile: str = "fast",
        sim_extra_args: dict[str, list[str]] | None = None,
    ) -> LocalStack:
        config = write(tmp_path / "models.yaml", doc)
        stack = LocalStack(
            StackSettings(
                config_path=config,
                work_dir=tmp_path / f"stack{len(stacks)}",
                sim_profile=sim_profile,
                sim_extra_args=sim_extra_args or {},
            )
        )
        stacks.append(stack)
        if start:
            stack.start()
        return stack

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for stack in stacks:
        if failed:
            for log in sorted((stack.settings.work_dir / "logs").glob("*.log")):
                print(f"----- {log.name} (tail) -----\n{log.read_text(errors='replace')[-2500:]}")
        stack.stop()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    """A model server that answers with what it received (headers included), for a model "echo"."""
    with EchoServer("echo", free_port()).running() as server:
        yield server


@pytest.fixture
def two_models() -> dict[str, Any]:
    """The seeds' two models: qwen2 on two TGI endpoints, llama3 on two vLLM endpoints."""
    return registry(
        model("qwen2", "tgi", [free_port(), free_port()], aliases=["qwen"]),
        model("llama3", "vllm", [free_port(), free_port()], aliases=["Llama-3.1-8B-Instruct"]),
    )


def write_config(stack: LocalStack, doc: dict[str, Any]) -> None:
    write(stack.settings.config_path, doc)
