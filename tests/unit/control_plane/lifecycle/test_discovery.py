"""Discovery of a model directory: each recognition rule on real folders and GGUF files written here, bad and
unreadable entries listed with why (never raised), weights sizes and memory estimates, ids, the caps, and
the simulator's shipped directory."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from control_plane.config.names import check_model_name
from control_plane.lifecycle import discovery, gguf_header, model_rules
from control_plane.lifecycle.discovery import model_id, scan
from control_plane.lifecycle.types import DiscoveredModel, ModelKind

pytestmark = pytest.mark.unit

CHAT, EMBEDDING, RERANK = ModelKind.CHAT, ModelKind.EMBEDDING, ModelKind.RERANK
MIB = 1 << 20
REPO = Path(__file__).resolve().parents[4]


# --- a GGUF writer (the format of https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) ---

U16, U32, F32, BOOL, STR, ARR = 2, 4, 6, 7, 8, 9


def _gstr(s: str | bytes, wide: bool = True) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q" if wide else "<I", len(raw)) + raw


def _gvalue(vtype: int, value: Any, wide: bool) -> bytes:
    if vtype == U16:
        return struct.pack("<H", value)
    if vtype == U32:
        return struct.pack("<I", value)
    if vtype == F32:
        return struct.pack("<f", value)
    if vtype == BOOL:
        return struct.pack("<?", value)
    if vtype == STR:
        return _gstr(value, wide)
    if vtype == ARR:
        etype, items = value
        return (
            struct.pack("<I", etype)
            + struct.pack("<Q" if wide else "<I", len(items))
            + b"".join(_gvalue(etype, v, wide) for v in items)
        )
    raise AssertionError(vtype)


def gguf(kvs: list[tuple[str, int, Any]], version: int = 3) -> bytes:
    wide = version >= 2
    count = "<Q" if wide else "<I"
    head = b"GGUF" + struct.pack("<I", version) + struct.pack(count, 0) + struct.pack(count, len(kvs))
    return head + b"".join(_gstr(k, wide) + struct.pack("<I", t) + _gvalue(t, v, wide) for k, t, v in kvs)


def model_kvs(arch: str | None, name: str | None = None) -> list[tuple[str, int, Any]]:
    """A header shaped like llama.cpp's: version and alignment keys first, the tokenizer's array last."""
    kvs: list[tuple[str, int, Any]] = [("general.quantization_version", U32, 2)]
    if arch is not None:
        kvs.append(("general.architecture", STR, arch))
    kvs += [("general.alignment", U32, 32), ("general.tags", ARR, (STR, ["a", "b"]))]
    if name is not None:
        kvs.append(("general.name", STR, name))
    kvs += [("llama.rope.freq_base", F32, 10000.0), ("tokenizer.ggml.tokens", ARR, (STR, ["x"] * 50))]
    return kvs


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def hf(root: Path, name: str, config: Any, files: dict[str, bytes] | None = None) -> Path:
    folder = root / name
    write(folder / "config.json", config if isinstance(config, str) else json.dumps(config))
    for fname, data in (files or {}).items():
        write(folder / fname, data)
    return folder


def only(models: list[DiscoveredModel]) -> DiscoveredModel:
    assert len(models) == 1, models
    return models[0]


# --- recognition rules ---

ST = {"modules.json": b"[]"}
HF_CASES = [
    # folder name, architectures, extra config, extra files, expected kind
    ("my-llm", ["Qwen2ForCausalLM"], {}, {}, CHAT),
    ("paligemma-3b", ["PaliGemmaForConditionalGeneration"], {}, {}, CHAT),
    ("gpt2", ["GPT2LMHeadModel"], {}, {}, CHAT),
    ("bge-reranker-v2-m3", ["XLMRobertaForSequenceClassification"], {}, {}, RERANK),
    # one label beats the embedding-family name `minilm`: a cross-encoder scores pairs
    ("ms-marco-minilm-l-6-v2", ["BertForSequenceClassification"], {"id2label": {"0": "LABEL_0"}}, {}, RERANK),
    ("scorer", ["BertForSequenceClassification"], {"num_labels": 1}, {}, RERANK),
    ("qwen3-reranker-0.6b", ["Qwen3ForCausalLM"], {}, {}, RERANK),
    ("qwen3-embedding-0.6b", ["Qwen3ForCausalLM"], {}, ST, EMBEDDING),
    ("gte-qwen2-1.5b-instruct", ["Qwen2ForCausalLM"], {}, {}, EMBEDDING),
    ("multilingual-e5-large", ["XLMRobertaModel"], {}, {}, EMBEDDING),
    ("bge-m3", ["XLMRobertaModel"], {}, {}, EMBEDDING),
    ("qwen2.5-7b-instruct", ["Qwen2ForCausalLM"], {}, {}, CHAT),  # `e5` is not a token of qwen2.5
    ("custom-encoder", ["BertModel"], {}, {}, EMBEDDING),
    ("my-st-model", ["BertForMaskedLM"], {}, ST, EMBEDDING),
    ("my-st-model-2", ["BertForMaskedLM"], {}, {"sentence_bert_config.json": b"{}"}, EMBEDDING),
    ("mystery-chat", None, {}, {}, CHAT),
    ("gemma-2b-it", None, {}, {}, CHAT),
]


@pytest.mark.parametrize(("name", "archs", "extra", "files", "kind"), HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hf_recognition_rules(
    tmp_path: Path,
    name: str,
    archs: list[str] | None,
    extra: dict[str, Any],
    files: dict[str, bytes],
    kind: ModelKind,
) -> None:
    config: dict[str, Any] = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, **extra}
    if archs is not None:
        config["architectures"] = archs
    hf(tmp_path, name, config, files)
    m = only(scan(tmp_path))
    assert (m.kind, m.problem, m.format, m.id) == (kind, None, "hf", name)
    assert m.architecture == (archs[0] if archs else None)
    assert m.path == tmp_path / name


@pytest.mark.parametrize(
    ("name", "config", "problem"),
    [
        ("sentiment",
         {"architectures": ["DistilBertForSequenceClassification"], "id2label": {"0": "n", "1": "p"}},
         "architecture DistilBertForSequenceClassification is a classifier with 2 labels, not a reranker"),
        ("bert-mlm", {"architectures": ["BertForMaskedLM"]},
         "architecture BertForMaskedLM is not a chat, embedding or rerank model"),
        ("vit", {"architectures": ["ViTForImageClassification"]},
         "architecture ViTForImageClassification is not a chat, embedding or rerank model"),
        ("mystery", {"model_type": "x"}, "no architecture stated and the name gives no hint"),
        ("broken", "{", "config.json is not valid JSON: Expecting property name"),
        ("listed", "[1, 2]", "config.json is not valid JSON: not an object"),
        ("deep", "[" * 100_000, "config.json is not valid JSON"),
    ],
)  # fmt: skip
def test_unrecognised_hf_folders_say_why(tmp_path: Path, name: str, config: Any, problem: str) -> None:
    hf(tmp_path, name, config)
    m = only(scan(tmp_path))
    assert m.kind is None and m.format == "hf" and m.id == name
    assert m.problem is not None and m.problem.startswith(problem), m.problem


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    write(tmp_path / "latin" / "config.json", b'{"architectures": ["\xff"]}')
    assert only(scan(tmp_path)).problem == "config.json is not valid JSON: not UTF-8 text"


def test_unreadable_entries_are_listed_not_raised(tmp_path: Path) -> None:
    (tmp_path / "cfg-dir" / "config.json").mkdir(parents=True)  # config.json that is a folder
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "config.json")  # opening it would block the scan forever
    os.mkfifo(tmp_path / "pipe.gguf")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    (tmp_path / "parent").symlink_to(tmp_path)  # a folder holding the directory itself: not recursed into
    write(tmp_path / "weights.safetensors", b"0" * 10)
    got = {m.id: m.problem for m in scan(tmp_path)}
    assert got == {
        "cfg-dir": "cannot read config.json: not a regular file",
        "fifo": "cannot read config.json: not a regular file",
        "pipe": "not a model: neither a folder nor a regular file",
        "dangling": "cannot read: No such file or directory",
        "loop-a": "cannot read: Too many levels of symbolic links",
        "loop-b": "cannot read: Too many levels of symbolic links",
        "parent": "no config.json or .gguf file",
        "weights.safetensors": "not a model: a file other than .gguf",
    }


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_config_without_read_permission(tmp_path: Path) -> None:
    cfg = write(tmp_path / "locked" / "config.json", "{}")
    cfg.chmod(0)
    try:
        assert only(scan(tmp_path)).problem == "cannot read config.json: Permission denied"
    finally:
        cfg.chmod(0o600)


def test_oversized_config_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "MAX_CONFIG_BYTES", 1 << 20)
    write(tmp_path / "big" / "config.json", " " * ((1 << 20) + 1) + "{}")
    assert only(scan(tmp_path)).problem == "config.json is larger than 1 MiB"


def test_a_directory_that_cannot_be_listed(tmp_path: Path) -> None:
    m = only(scan(tmp_path / "missing"))
    assert (m.id, m.problem) == ("missing", "cannot list the directory: No such file or directory")
    write(tmp_path / "file", "x")
    assert only(scan(tmp_path / "file")).problem == "cannot list the directory: Not a directory"


# --- GGUF ---


@pytest.mark.parametrize(
    ("fname", "arch", "gname", "kind"),
    [
        ("tiny-llama.gguf", "llama", "TinyLlama", CHAT),
        ("Qwen2.5-0.5B-Q4_K_M.gguf", "qwen2", None, CHAT),
        ("phi.gguf", "phi3", "Phi 3 mini", CHAT),
        ("nomic.gguf", "nomic-bert", "nomic-embed-text-v1.5", EMBEDDING),
        ("encoder.gguf", "bert", None, EMBEDDING),
        ("bge-reranker-v2-m3-f16.gguf", "bert", None, RERANK),
        ("scores.gguf", "bert", "bge-reranker-base", RERANK),  # the header's name gives the hint
        ("qwen3-emb.gguf", "qwen3", "Qwen3 Embedding 0.6B", EMBEDDING),
    ],
)
def test_gguf_recognition(tmp_path: Path, fname: str, arch: str, gname: str | None, kind: ModelKind) -> None:
    path = write(tmp_path / fname, gguf(model_kvs(arch, gname)))
    m = only(scan(tmp_path))
    assert (m.kind, m.architecture, m.format, m.problem, m.path) == (kind, arch, "gguf", None, path)
    assert m.id == model_id(fname) and not m.id.endswith("gguf")
    assert m.size_bytes == path.stat().st_size


def test_gguf_header_reader_reads_values_and_stops_when_it_has_enough(tmp_path: Path) -> None:
    kvs = [*model_kvs("llama", "Tiny"), ("bad", 99, None)]  # a key of an unknown type after them
    data = gguf(kvs[:-1]) + _gstr("bad") + struct.pack("<I", 99)
    data = data[:16] + struct.pack("<Q", len(kvs)) + data[24:]
    path = write(tmp_path / "m.gguf", data)
    got = gguf_header.read_metadata(path, ("general.architecture", "general.name", "general.tags"))
    assert got == {"general.architecture": "llama", "general.name": "Tiny", "general.tags": ["a", "b"]}
    with pytest.raises(gguf_header.GGUFError, match="unknown GGUF value type 99"):
        gguf_header.read_metadata(path, ("general.architecture", "split.count"))
    # found both before the bad key: stops without reaching it
    assert gguf_header.read_metadata(path, ("general.name", "split.count"), enough=("general.name",)) == {
        "general.name": "Tiny"
    }


def test_gguf_version_1_layout(tmp_path: Path) -> None:
    write(tmp_path / "old.gguf", gguf(model_kvs("llama", "old"), version=1))
    assert only(scan(tmp_path)).kind is CHAT


def _header(version: int, kv_count: int) -> bytes:
    return b"GGUF" + struct.pack("<I", version) + struct.pack("<Q", 0) + struct.pack("<Q", kv_count)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"PK\x03\x04 not a gguf", "not a GGUF file (no GGUF magic at its start)"),
        (b"GG", "not a GGUF file (no GGUF magic at its start)"),
        (_header(99, 0), "GGUF version 99 is not supported (1 to 3 are)"),
        (b"GGUF" + struct.pack(">I", 3) + bytes(16), "big-endian GGUF files are not supported"),
        (gguf(model_kvs("llama", "x"))[:40], "the GGUF header is truncated"),
        (gguf(model_kvs("llama"))[:-40], "the GGUF header is truncated"),  # no general.name: reads on
        (_header(3, 1 << 40), "1099511627776 GGUF metadata keys is implausible (corrupt file?)"),
        (_header(3, 1) + struct.pack("<Q", 1 << 40), "a GGUF string of 1099511627776 bytes is implausible"),
        # an array of 2**40 strings: refused before any loop over it
        (_header(3, 1) + _gstr("k") + struct.pack("<IIQ", ARR, STR, 1 << 40),
         "a GGUF array of 1099511627776"),
        (_header(3, 1) + _gstr("general.architecture") + struct.pack("<IIQ", ARR, STR, 1 << 30),
         "the GGUF metadata is too large to read"),
        (gguf(model_kvs(None, "nameless")), "the GGUF header has no general.architecture"),
        (gguf(model_kvs("clip", "vision")), "architecture clip is not a chat, embedding or rerank model"),
        # a later shard of llama-gguf-split: the split keys only (the first shard is known by its name)
        (gguf([("split.no", U16, 1), ("split.count", U16, 3)]), "split GGUF files are not supported"),
    ],
)  # fmt: skip
def test_bad_gguf_files_say_why(tmp_path: Path, data: bytes, problem: str) -> None:
    write(tmp_path / "bad.gguf", data)
    m = only(scan(tmp_path))
    assert m.kind is None and m.format == "gguf" and m.id == "bad"
    assert m.problem is not None and m.problem.startswith(problem), m.problem


def test_gguf_folders(tmp_path: Path) -> None:
    one = write(tmp_path / "Llama-Folder" / "model-q4.gguf", gguf(model_kvs("llama", "x")))
    write(tmp_path / "Llama-Folder" / "mmproj-f16.gguf", gguf(model_kvs("clip")))  # a vision projector
    write(tmp_path / "Llama-Folder" / "README.md", "weights")
    write(tmp_path / "two" / "a.gguf", gguf(model_kvs("llama")))
    write(tmp_path / "two" / "b.gguf", gguf(model_kvs("llama")))
    for i in (1, 2):
        write(tmp_path / "shards" / f"big-0000{i}-of-00002.gguf", gguf(model_kvs("llama")))
    write(tmp_path / "loose-00001-of-00003.gguf", gguf(model_kvs("llama")))
    got = {m.id: m for m in scan(tmp_path)}
    assert (got["llama-folder"].kind, got["llama-folder"].path) == (CHAT, one)
    assert got["llama-folder"].size_bytes == one.stat().st_size
    assert got["two"].problem == "holds 2 .gguf files: put each model in its own folder"
    assert got["shards"].problem is not None and got["shards"].problem.startswith("split GGUF files")
    assert got["loose-00001-of-00003"].problem is not None
    assert got["loose-00001-of-00003"].problem.startswith("split GGUF files are not supported")


# --- sizes and estimates ---


def test_weights_size_counts_weights_only(tmp_path: Path) -> None:
    cfg = {"architectures": ["LlamaForCausalLM"]}
    hf(tmp_path, "st", cfg, {"model-1.safetensors": b"0" * 300, "model-2.safetensors": b"0" * 200,
                             "pytorch_model.bin": b"0" * 999, "tokenizer.json": b"0" * 5000})  # fmt: skip
    hf(
        tmp_path,
        "bin",
        cfg,
        {"pytorch_model.bin": b"0" * 70, "training_args.bin": b"0" * 9, "vocab.txt": b"0"},
    )
    hf(tmp_path, "pt", cfg, {"model.pt": b"0" * 11, "extra.pth": b"0" * 4})
    blob = write(tmp_path / "blobs" / "abc", b"0" * 123)
    (tmp_path / "linked").mkdir()
    write(tmp_path / "linked" / "config.json", json.dumps(cfg))
    (tmp_path / "linked" / "model.safetensors").symlink_to(blob)  # as in the Hugging Face cache
    sizes = {m.id: m.size_bytes for m in scan(tmp_path)}
    assert sizes == {"st": 500, "bin": 70, "pt": 15, "linked": 123, "blobs": 0}


def test_memory_estimate_rule() -> None:
    est = model_rules.estimate_memory_mb
    assert est(1000 * MIB, EMBEDDING) == 1200
    assert est(1000 * MIB, RERANK) == 1200
    assert est(1000 * MIB, CHAT) == 1200 + 512  # KV headroom: at least 512 MiB
    assert est(10_000 * MIB, CHAT) == 12_000 + 2_000  # ... or 20 % of the weights
    assert est(1, EMBEDDING) == 1  # rounded up
    assert est(0, CHAT) == 0  # unknown


def test_memory_estimate_from_weights_on_disk(tmp_path: Path) -> None:
    hf(tmp_path, "chat", {"architectures": ["LlamaForCausalLM"], "num_parameters": 10**12},
       {"model.safetensors": b"0" * MIB})  # fmt: skip
    m = only(scan(tmp_path))
    assert m.memory_mb == math.ceil(1.2) + 512  # the weights win over the config's numbers


@pytest.mark.parametrize(
    ("config", "kind", "weights"),
    [
        ({"num_parameters": 1000, "torch_dtype": "float32"}, EMBEDDING, 4000),
        ({"num_parameters": 1000, "dtype": "bfloat16"}, CHAT, 2000),
        ({"num_parameters": 1000}, CHAT, 2000),  # unstated: half precision
        ({"num_parameters": 1000, "torch_dtype": "float16", "quantization_config": {"bits": 4}}, CHAT, 500),
        # shape fields, generator with a gated MLP, tied embeddings
        ({"hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 10, "intermediate_size": 16,
          "tie_word_embeddings": True}, CHAT, 2 * (2 * (4 * 64 + 3 * 8 * 16) + 80)),
        # untied: a second vocabulary matrix
        ({"hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 10, "intermediate_size": 16}, CHAT,
         2 * (2 * (4 * 64 + 3 * 8 * 16) + 160)),
        # encoder: plain MLP, one embedding matrix
        ({"hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 10, "intermediate_size": 16,
          "torch_dtype": "float32"}, EMBEDDING, 4 * (2 * (4 * 64 + 2 * 8 * 16) + 80)),
        # no intermediate size: the classic 12 x layers x hidden^2 + vocab x hidden
        ({"hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 10}, RERANK, 2 * (12 * 2 * 64 + 80)),
        ({"text_config": {"hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 10},
          "tie_word_embeddings": True}, CHAT, 2 * (12 * 2 * 64 + 80)),
        ({"hidden_size": 8, "num_hidden_layers": 2}, CHAT, 0),  # not enough to say
        ({"hidden_size": "8", "num_hidden_layers": True, "vocab_size": -1}, CHAT, 0),
    ],
)  # fmt: skip
def test_weights_estimated_from_config(config: dict[str, Any], kind: ModelKind, weights: int) -> None:
    assert model_rules.weights_from_config(config, kind) == weights


# --- ids and caps ---


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Qwen2.5 7B Instruct (GPTQ)", "qwen2.5-7b-instruct-gptq"),
        ("Llama-3.1-8B.Q4_K_M.GGUF", "llama-3.1-8b.q4_k_m"),
        ("__hidden_like", "hidden_like"),
        ("模型", "model"),
        ("org@name+v1:2", "org-name-v1-2"),
        ("x" * 300, "x" * 190),
    ],
)
def test_model_id_sanitising(name: str, expected: str) -> None:
    assert model_id(name) == expected
    assert check_model_name(expected) == expected


def test_ids_are_unique_and_valid(tmp_path: Path) -> None:
    for name in ("Model", "model", "MODEL.gguf", "model-2", "模型", "å"):
        (tmp_path / name).mkdir()
    ids = [m.id for m in scan(tmp_path)]
    assert len(set(ids)) == len(ids) == 6
    assert {"model", "model-2", "model-3", "model-2-2"} <= set(ids)
    for i in ids:
        check_model_name(i)


def test_entry_cap_and_skipped_entries(tmp_path: Path) -> None:
    for i in range(8):
        (tmp_path / f"m{i}").mkdir()
    (tmp_path / ".git").mkdir()
    write(tmp_path / "README.md", "about")
    write(tmp_path / "LICENSE", "terms")
    models = scan(tmp_path, max_entries=5)
    assert len(models) == 6
    assert all(m.problem == "no config.json or .gguf file" for m in models[:5])
    assert (models[5].id, models[5].path) == ("more-entries", tmp_path)
    assert models[5].problem == "the directory has more than 5 entries: only 5 were scanned"
    assert len(scan(tmp_path)) == 8  # hidden and documentation files are not entries
    assert discovery.MAX_ENTRIES == 1000


def test_files_looked_at_per_folder_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "MAX_FOLDER_FILES", 3)
    for i in range(10):
        write(tmp_path / "crowded" / f"f{i}.txt", "x")
    assert only(scan(tmp_path)).problem == "no config.json or .gguf file"


# --- the simulator's directory ---


def _chat_mb(params: int) -> int:
    mb = params * 2 / MIB  # bfloat16
    return math.ceil(mb * 1.2) + max(math.ceil(mb * 0.2), 512)


def test_the_shipped_simulator_directory() -> None:
    models = scan(REPO / "deploy" / "models-sim")
    got = [(m.id, m.kind, m.format, m.architecture, m.size_bytes, m.problem) for m in models]
    assert got == [
        ("bge-reranker-base", RERANK, "hf", "XLMRobertaForSequenceClassification", 0, None),
        ("bge-small-en-v1.5", EMBEDDING, "hf", "BertModel", 0, None),
        ("llama-3.2-1b-instruct", CHAT, "hf", "LlamaForCausalLM", 0, None),
        ("notes", None, "unknown", None, 0, "no config.json or .gguf file"),
        ("qwen2-0.5b-instruct", CHAT, "hf", "Qwen2ForCausalLM", 0, None),
    ]
    memory = {m.id: m.memory_mb for m in models}
    # parameters from the shipped configs' shapes (layers x (4h^2 + 3hI) + vocab x h, tied embeddings)
    assert memory["qwen2-0.5b-instruct"] == _chat_mb(24 * (4 * 896**2 + 3 * 896 * 4864) + 151936 * 896)
    assert memory["llama-3.2-1b-instruct"] == _chat_mb(16 * (4 * 2048**2 + 3 * 2048 * 8192) + 128256 * 2048)
    # float32 encoders, plain MLP, no KV headroom: about the published 33M and 278M parameters
    assert memory["bge-small-en-v1.5"] == math.ceil(
        (12 * (4 * 384**2 + 2 * 384 * 1536) + 30522 * 384) * 4 / MIB * 1.2
    )
    assert memory["bge-reranker-base"] == math.ceil(
        (12 * (4 * 768**2 + 2 * 768 * 3072) + 250002 * 768) * 4 / MIB * 1.2
    )
    assert memory["notes"] == 0
