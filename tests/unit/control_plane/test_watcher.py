"""The file watcher: an undecodable file is an invalid file (reported with its path and position, the
last good config kept); an unexpected error is reported and counted, and watching goes on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from control_plane.config import Registry, load_registry
from control_plane.errors import ConfigError
from control_plane.metrics import ControlPlaneMetrics
from control_plane.watcher import ConfigWatcher

pytestmark = pytest.mark.unit

GOOD = "models:\n  - id: {name}\n    engine: tgi\n    endpoints: [{{url: 'http://127.0.0.1:9000'}}]\n"


def reloads(metrics: ControlPlaneMetrics, result: str) -> float:
    return metrics.registry.get_sample_value("llm_gateway_config_reloads_total", {"result": result}) or 0.0


def test_a_latin1_byte_is_reported_with_path_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_bytes(b"# caf\xe9\n" + GOOD.format(name="a").encode())
    with pytest.raises(ConfigError) as info:
        load_registry(path)
    assert str(path) in str(info.value)
    assert info.value.problems == ["line 1, column 6: byte 0xe9 is not UTF-8 (save the file as UTF-8)"]


def test_the_watcher_survives_bad_bytes_and_unexpected_errors(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "models.yaml"
        path.write_text(GOOD.format(name="a"))
        applied: list[str] = []

        async def apply(registry: Registry) -> None:
            if registry.models[0].id == "boom":
                raise RuntimeError("unexpected")  # a bug somewhere below the watcher
            applied.append(registry.models[0].id)

        metrics = ControlPlaneMetrics.create()
        watcher = ConfigWatcher(path, apply, metrics, interval_s=0.05)
        task = asyncio.create_task(watcher.run())

        async def until(check: object, what: str) -> None:
            for _ in range(400):
                if callable(check) and check():
                    return
                await asyncio.sleep(0.025)
            raise AssertionError(f"timed out waiting for {what}")

        path.write_bytes(b"# caf\xe9\n" + GOOD.format(name="b").encode())
        await until(lambda: reloads(metrics, "failure") == 1, "the bad bytes to be refused")
        assert watcher.last_error is not None and "line 1, column 6" in watcher.last_error

        path.write_text(GOOD.format(name="boom"))
        await until(lambda: reloads(metrics, "error") == 1, "the unexpected error to be counted")
        assert "RuntimeError" in (watcher.last_error or "")

        path.write_text(GOOD.format(name="c"))
        await until(lambda: applied == ["c"], "the next good file to be applied")
        assert watcher.last_error is None and not task.done()

        # SIGHUP's path (request_reload) still works too.
        watcher.request_reload()
        await until(lambda: applied == ["c", "c"], "a forced reload")
        task.cancel()

    asyncio.run(scenario())


def test_a_round_that_raises_is_counted_and_watching_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        path = tmp_path / "models.yaml"
        path.write_text(GOOD.format(name="a"))
        seen: list[str] = []

        async def apply(registry: Registry) -> None:
            seen.append(registry.models[0].id)

        metrics = ControlPlaneMetrics.create()
        watcher = ConfigWatcher(path, apply, metrics, interval_s=0.05)
        calls = {"n": 0}
        original = watcher.reload

        async def flaky() -> bool:
            calls["n"] += 1
            if calls["n"] == 1:
                raise MemoryError("outside reload's own handling")
            return await original()

        monkeypatch.setattr(watcher, "reload", flaky)
        task = asyncio.create_task(watcher.run())
        path.write_text(GOOD.format(name="b"))
        for _ in range(400):
            if seen == ["b"]:
                break
            await asyncio.sleep(0.025)
        assert seen == ["b"] and reloads(metrics, "error") == 1 and not task.done()
        task.cancel()

    asyncio.run(scenario())
