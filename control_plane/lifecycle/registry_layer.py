"""Models found in the registry's `lifecycle.model_dirs`, added to the file's models (a ControlPlane layer).

A recognised entry becomes a launched model (`launch` set, no endpoints) unless the file has a model of that
id: then the file's model wins, and if it is a launched model without weights of its own it gets the
entry's path and memory estimate. That is how an operator gives a discovered model aliases, limits or
launch settings: a file model with the same id and a `launch` section.

The id is the entry's name lower-cased (discovery.py); the name as spelt on disk (`Qwen2.5-0.5B-Instruct`,
`llama-3.1-8b.Q4_K_M` without `.gguf`), when it differs and no other model uses it, is an alias: clients
copy names from the hub or the file listing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_plane.config.lifecycle import LaunchSettings
from control_plane.config.names import MODEL_ID
from control_plane.config.schema import Registry
from control_plane.lifecycle.types import DiscoveredModel, ModelKind

log = logging.getLogger(__name__)

Scanner = Callable[[Path], list[DiscoveredModel]]


def engine_for(launcher: str, kind: ModelKind) -> str:
    """The API a launched server speaks, as the registry names engines."""
    if kind in (ModelKind.EMBEDDING, ModelKind.RERANK):
        return "tei"
    return {"tgi": "tgi", "sglang": "sglang"}.get(launcher, "vllm")  # vLLM, llama.cpp, the simulator: OpenAI


@dataclass(frozen=True)
class Found:
    """One scanned entry with the directory's launcher."""

    model: DiscoveredModel
    launcher: str


class DiscoveredModels:
    """The last scan of every model directory, and the layer that adds its models to a registry."""

    def __init__(self, base_dir: Path, scanner: Scanner) -> None:
        self._base = base_dir
        self._scan = scanner
        self._found: tuple[Found, ...] = ()

    @property
    def found(self) -> tuple[Found, ...]:
        return self._found

    def directories(self, registry: Registry) -> list[tuple[Path, str]]:
        return [((self._base / d.path).resolve(), d.launcher) for d in registry.lifecycle.model_dirs]

    def rescan(self, registry: Registry) -> bool:
        """Scan every directory again; True if what was found changed."""
        found: list[Found] = []
        for path, launcher in self.directories(registry):
            try:
                entries: Sequence[DiscoveredModel] = self._scan(path)
            except OSError as exc:
                log.warning("model directory %s cannot be scanned: %s", path, exc)
                entries = ()
            for entry in entries:
                # A GGUF file needs llama.cpp, whatever the directory's engine (the simulator serves all).
                chosen = "llamacpp" if entry.format == "gguf" and launcher != "simulator" else launcher
                found.append(Found(entry, chosen))
        changed = tuple(found) != self._found
        self._found = tuple(found)
        return changed

    def layer(self, registry: Registry) -> Registry:
        recognised = [f for f in self._found if f.model.kind is not None and f.model.problem is None]
        if not recognised:
            return registry
        taken = {name for model in registry.models for name in model.names}
        doc: dict[str, Any] = registry.model_dump(mode="json", exclude_defaults=True)
        models: list[dict[str, Any]] = list(doc.get("models", []))
        for found in recognised:
            entry = found.model
            if entry.id in taken:
                self._fill_file_model(models, found)
                continue
            taken.add(entry.id)
            assert entry.kind is not None
            memory = entry.memory_mb or None
            launch = LaunchSettings(launcher=found.launcher, path=str(entry.path), memory_mb=memory)
            model: dict[str, Any] = {
                "id": entry.id,
                "engine": engine_for(found.launcher, entry.kind),
                "launch": launch.model_dump(mode="json", exclude_defaults=True),
            }
            spelt = _spelling(entry)
            if spelt is not None and spelt not in taken:
                taken.add(spelt)
                model["aliases"] = [spelt]
            models.append(model)
        doc["models"] = models
        return Registry.model_validate(doc)

    @staticmethod
    def _fill_file_model(models: list[dict[str, Any]], found: Found) -> None:
        for model in models:
            launch = model.get("launch")
            if model.get("id") == found.model.id and isinstance(launch, dict):
                launch.setdefault("path", str(found.model.path))
                if found.model.memory_mb:
                    launch.setdefault("memory_mb", found.model.memory_mb)


def _spelling(entry: DiscoveredModel) -> str | None:
    """The entry's name as spelt on disk, if it is a valid name other than the id."""
    name = entry.path.name
    name = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    return name if name != entry.id and MODEL_ID.fullmatch(name) else None
