"""Scan a model directory: what each immediate entry is, whether it can be served, and what it will cost.

`scan(directory)` lists every immediate entry, sorted by name:
- a folder with `config.json`: a Hugging Face model (format "hf"), kind by the rules in model_rules.py;
- a `*.gguf` file, or a folder without config.json holding exactly one `*.gguf` (besides `mmproj*` vision
  projectors): a GGUF model (format "gguf", `path` the file), kind from its header's `general.architecture`
  and `general.name`;
- anything else: format "unknown" with `problem` saying why. So is a model that cannot be served (unknown
  architecture, bad config.json, split GGUF ...): its entry keeps what was learnt and says why.
Hidden entries (`.git`, `.cache`) and README / LICENSE files are skipped: they document the directory.

It never raises: an unreadable entry, a symlink loop, a FIFO or a corrupt file becomes a problem entry; a
directory that cannot be listed becomes one problem entry. The work is bounded: at most `max_entries`
entries (then one entry says the listing was cut), at most MAX_FOLDER_FILES files looked at per folder,
config.json at most MAX_CONFIG_BYTES, GGUF headers read only as far as the keys wanted (gguf_header.py).

`size_bytes` counts weights only: `*.safetensors` if the folder has any, else `*.bin` (not
`training_args.bin` and the like), else `*.pt` / `*.pth`; a GGUF model's size is its file's.
`memory_mb` is model_rules.estimate_memory_mb of that size, or of the weights config.json implies when the
folder holds none (a simulator folder).

`id`: the entry's name (without `.gguf`), lower-cased, any character but letters, digits, `.`, `_` and `-`
replaced by `-`, so it passes the registry's model id rule; `-2`, `-3` ... on a clash within the scan.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_plane.lifecycle import model_rules
from control_plane.lifecycle.gguf_header import GGUFError, read_metadata
from control_plane.lifecycle.types import DiscoveredModel, ModelKind

MAX_ENTRIES = 1000
MAX_FOLDER_FILES = 10_000
MAX_CONFIG_BYTES = 4 << 20
UNKNOWN = "unknown"
_SPLIT_GGUF = re.compile(r".*-\d{5}-of-\d{5}\.gguf", re.IGNORECASE)
_DOC_FILE = re.compile(r"(readme|license|licence)(\..*)?", re.IGNORECASE)
_NOT_WEIGHTS_BIN = re.compile(r"(training_args|optimizer|scheduler|rng_state.*)\.bin")
_UNFIT = re.compile(r"[^a-z0-9._-]+")


@dataclass(frozen=True)
class _Found:
    """One entry's findings before it gets its unique id."""

    name: str
    path: Path
    format: str = UNKNOWN
    size_bytes: int = 0
    kind: ModelKind | None = None
    architecture: str | None = None
    memory_mb: int = 0
    problem: str | None = None


def scan(directory: Path, max_entries: int = MAX_ENTRIES) -> list[DiscoveredModel]:
    """Every immediate entry of `directory` as a DiscoveredModel (module docstring); never raises."""
    try:
        names, cut = _list(directory, max_entries)
    except OSError as exc:
        return _with_ids(
            [_Found(directory.name or "models", directory, problem=f"cannot list the directory: {_why(exc)}")]
        )
    found = [_examine(directory / name) for name in sorted(names)]
    if cut:
        found.append(
            _Found(
                "more-entries",
                directory,
                problem=f"the directory has more than {max_entries} entries: only {max_entries} were scanned",
            )
        )
    return _with_ids(found)


def model_id(name: str) -> str:
    """A registry-valid id from a folder or file name (module docstring)."""
    base = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    cleaned = _UNFIT.sub("-", base.lower()).lstrip("._-")[:190].rstrip("._-")
    return cleaned or "model"


def _with_ids(found: list[_Found]) -> list[DiscoveredModel]:
    taken: set[str] = set()
    out = []
    for f in found:
        base = model_id(f.name)
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            candidate = f"{base}-{n}"
        taken.add(candidate)
        out.append(
            DiscoveredModel(
                id=candidate, path=f.path, format=f.format, size_bytes=f.size_bytes, kind=f.kind,
                architecture=f.architecture, memory_mb=f.memory_mb, problem=f.problem,
            )
        )  # fmt: skip
    return out


def _list(directory: Path, limit: int) -> tuple[list[str], bool]:
    """Up to `limit` entry names (hidden and documentation files left out) and whether there were more."""
    names: list[str] = []
    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith(".") or (_DOC_FILE.fullmatch(entry.name) and not entry.is_dir()):
                continue
            if len(names) == limit:
                return names, True
            names.append(entry.name)
    return names, False


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _examine(path: Path) -> _Found:
    try:
        mode = path.stat().st_mode  # follows symlinks; a loop or a dangling link raises
    except OSError as exc:
        return _Found(path.name, path, problem=f"cannot read: {_why(exc)}")
    try:
        if stat.S_ISDIR(mode):
            return _examine_folder(path)
        if stat.S_ISREG(mode) and path.name.lower().endswith(".gguf"):
            return _examine_gguf(path.name, path, path.stat().st_size)
        if stat.S_ISREG(mode):
            return _Found(path.name, path, problem="not a model: a file other than .gguf")
        return _Found(path.name, path, problem="not a model: neither a folder nor a regular file")
    except OSError as exc:
        return _Found(path.name, path, problem=f"cannot read: {_why(exc)}")


def _folder_files(folder: Path) -> tuple[dict[str, int], set[str]]:
    """Regular files directly in the folder (symlinks followed, as the Hugging Face cache uses them) with
    their sizes, and the names of the other entries; at most MAX_FOLDER_FILES looked at."""
    files: dict[str, int] = {}
    others: set[str] = set()
    with os.scandir(folder) as it:
        for i, entry in enumerate(it):
            if i >= MAX_FOLDER_FILES:
                break
            try:
                if entry.is_file():
                    files[entry.name] = entry.stat().st_size
                    continue
            except OSError:
                pass  # a dangling or looping link is not a weights file
            others.add(entry.name)
    return files, others


def _weights_bytes(files: dict[str, int]) -> int:
    def total(*suffixes: str) -> int:
        return sum(
            size for name, size in files.items()
            if name.lower().endswith(suffixes) and not _NOT_WEIGHTS_BIN.fullmatch(name)
        )  # fmt: skip

    return total(".safetensors") or total(".bin") or total(".pt", ".pth")


def _examine_folder(folder: Path) -> _Found:
    files, others = _folder_files(folder)
    if "config.json" in others:  # a folder, a FIFO (opening it would block) or a broken link
        return _Found(folder.name, folder, format="hf", problem="cannot read config.json: not a regular file")
    if "config.json" in files:
        return _examine_hf(folder, files)
    ggufs = sorted(n for n in files if n.lower().endswith(".gguf") and not n.lower().startswith("mmproj"))
    if len(ggufs) == 1:
        return _examine_gguf(folder.name, folder / ggufs[0], files[ggufs[0]])
    if ggufs and all(_SPLIT_GGUF.fullmatch(n) for n in ggufs):
        return _Found(
            folder.name, folder, format="gguf", size_bytes=sum(files[n] for n in ggufs), problem=_SPLIT
        )
    if ggufs:
        return _Found(
            folder.name, folder, problem=f"holds {len(ggufs)} .gguf files: put each model in its own folder"
        )
    return _Found(folder.name, folder, problem="no config.json or .gguf file")


_SPLIT = "split GGUF files are not supported: merge them into one (llama-gguf-split --merge)"


def _read_config(folder: Path, size: int) -> dict[str, Any] | str:
    """config.json as a dict, or the problem with it."""
    if size > MAX_CONFIG_BYTES:
        return f"config.json is larger than {MAX_CONFIG_BYTES >> 20} MiB"
    try:
        text = (folder / "config.json").read_text(encoding="utf-8")
    except OSError as exc:
        return f"cannot read config.json: {_why(exc)}"
    except UnicodeDecodeError:
        return "config.json is not valid JSON: not UTF-8 text"
    try:
        config = json.loads(text)
    except ValueError as exc:  # JSONDecodeError and RecursionError-free ValueErrors
        return f"config.json is not valid JSON: {exc}"
    except RecursionError:
        return "config.json is not valid JSON: nested too deep"
    if not isinstance(config, dict):
        return "config.json is not valid JSON: not an object"
    return config


def _examine_hf(folder: Path, files: dict[str, int]) -> _Found:
    weights = _weights_bytes(files)
    config = _read_config(folder, files["config.json"])
    if isinstance(config, str):
        return _Found(folder.name, folder, format="hf", size_bytes=weights, problem=config)
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    labels = config.get("num_labels")
    if not isinstance(labels, int) and isinstance(config.get("id2label"), dict):
        labels = len(config["id2label"])
    evidence = model_rules.Evidence(
        names=(folder.name.lower(),),
        architecture=arch,
        sentence_transformers=any(n in files for n in model_rules.SENTENCE_TRANSFORMERS_FILES),
        labels=labels if isinstance(labels, int) else None,
    )
    kind, why = model_rules.classify(evidence)
    estimate_from = weights or model_rules.weights_from_config(config, kind)
    return _Found(
        folder.name, folder, format="hf", size_bytes=weights, kind=kind, architecture=arch,
        memory_mb=model_rules.estimate_memory_mb(estimate_from, kind), problem=None if kind else why,
    )  # fmt: skip


def _examine_gguf(name: str, file: Path, size: int) -> _Found:
    if _SPLIT_GGUF.fullmatch(file.name):
        return _Found(name, file, format="gguf", size_bytes=size, problem=_SPLIT)
    try:
        meta = read_metadata(
            file,
            ("general.architecture", "general.name", "split.count"),
            enough=("general.architecture", "general.name"),
        )
    except GGUFError as exc:
        return _Found(name, file, format="gguf", size_bytes=size, problem=str(exc))
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) and arch else None
    split = meta.get("split.count")
    if isinstance(split, int) and split > 1:
        return _Found(name, file, format="gguf", size_bytes=size, architecture=arch, problem=_SPLIT)
    if arch is None:
        return _Found(
            name, file, format="gguf", size_bytes=size, problem="the GGUF header has no general.architecture"
        )
    gname = meta.get("general.name")
    names = (name.lower(),) + ((gname.lower(),) if isinstance(gname, str) else ())
    kind, why = model_rules.classify(model_rules.Evidence(names=names, architecture=arch))
    return _Found(
        name, file, format="gguf", size_bytes=size, kind=kind, architecture=arch,
        memory_mb=model_rules.estimate_memory_mb(size, kind), problem=None if kind else why,
    )  # fmt: skip
