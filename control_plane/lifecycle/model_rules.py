"""How discovery tells a chat model from an embedder or a reranker, and how much memory it will need.

The rules are data, read top to bottom, the first that matches wins, so an operator can read why a folder
was taken for what it is (`describe_rules()` prints them). Name hints come first because seed 003 names
models that way and because an architecture alone is ambiguous: Qwen3-Reranker and gte-Qwen2-instruct are
`*ForCausalLM` checkpoints that serve as a reranker and an embedder.

Memory estimate (MiB = 2**20 bytes), `estimate_memory_mb`:
    weights  = bytes of weights on disk, or, without weights, parameters x bytes per parameter
               (config.json's `torch_dtype`/`dtype`; `quantization_config.bits`; 2 bytes if unstated)
    memory   = ceil(weights x 1.2)                      (runtime buffers, activations, CUDA context)
             + max(ceil(weights x 0.2), 512)             (chat models only: the KV cache)
Parameters without weights: `num_parameters` if config.json states it, otherwise
    layers x (4 x hidden^2 + mlp) + vocab x hidden x (1 if tie_word_embeddings else 2)
with mlp = 3 x hidden x intermediate_size for chat models (gated MLP), 2 x hidden x intermediate_size
otherwise, and 8 x hidden^2 when intermediate_size is absent (the classic 12 x layers x hidden^2).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from control_plane.lifecycle.types import ModelKind

MIB = 1 << 20
RUNTIME_FACTOR = 1.2  # weights x this: buffers, activations and the engine's own allocations
KV_CACHE_FACTOR = 0.2  # chat models: this share of the weights again for the KV cache ...
KV_CACHE_MIN_MB = 512  # ... but never less than this

# Sentence-transformers files: a folder carrying one is packaged to produce embeddings.
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def _word(*words: str) -> re.Pattern[str]:
    """Any of the words as a whole token of a name (`e5` in `multilingual-e5-large`, not in `qwen2.5`)."""
    return re.compile(r"(?<![a-z0-9])(?:" + "|".join(words) + r")(?![a-z0-9])")


@dataclass(frozen=True)
class Rule:
    """Every stated condition must hold. `name` is searched in the lower-cased folder or file name (and a
    GGUF file's `general.name`); `architecture` is full-matched against config.json's `architectures[0]`
    or a GGUF file's `general.architecture`."""

    kind: ModelKind
    why: str  # what an operator reads
    name: re.Pattern[str] | None = None
    architecture: re.Pattern[str] | None = None
    sentence_transformers: bool = False  # the folder holds one of SENTENCE_TRANSFORMERS_FILES
    single_label: bool = False  # config.json's classifier head has one output (a relevance score)


CHAT, EMBEDDING, RERANK = ModelKind.CHAT, ModelKind.EMBEDDING, ModelKind.RERANK

# GGUF `general.architecture` values (llama.cpp's names) of generative and of encoder models.
GGUF_CHAT_ARCHITECTURES = (
    "llama|llama4|qwen|qwen2|qwen2moe|qwen2vl|qwen3|qwen3moe|mistral|mistral3|mixtral|phi2|phi3|phimoe|gemma|gemma2"
    "|gemma3|gemma3n|falcon|gpt2|gptj|gptneox|starcoder|starcoder2|command-r|cohere2|deepseek|deepseek2|olmo"
    "|olmo2|stablelm|internlm2|chatglm|glm4|granite|granitemoe|exaone|mpt|bloom|baichuan|minicpm|minicpm3"
    "|smollm3|orion|plamo|codeshell|dbrx|arctic|jais|nemotron|rwkv6|rwkv7|mamba|mamba2|t5|bitnet|hunyuan-moe"
)
GGUF_EMBEDDING_ARCHITECTURES = (
    "bert|nomic-bert|nomic-bert-moe|jina-bert-v2|jina-bert-v3|t5encoder|modern-bert|neo-bert"
)

RULES: tuple[Rule, ...] = (
    Rule(RERANK, "the name says rerank", name=re.compile(r"rerank")),
    Rule(
        RERANK,
        "a sequence-classification head with one label (a relevance score)",
        architecture=re.compile(r"\w+ForSequenceClassification"),
        single_label=True,
    ),
    Rule(EMBEDDING, "the name says embed", name=re.compile(r"embed")),
    Rule(
        EMBEDDING,
        "the name is an embedding family (bge, e5, gte, minilm, mpnet, stella, jina-embeddings, nomic-embed)",
        name=_word("bge", "e5", "gte", "minilm", "mpnet", "stella", "sentence-t5", "instructor"),
    ),
    Rule(EMBEDDING, "sentence-transformers files (modules.json ...)", sentence_transformers=True),
    Rule(
        CHAT,
        "a generative head (*ForCausalLM, *ForConditionalGeneration, *LMHeadModel)",
        architecture=re.compile(r"\w+(ForCausalLM|ForConditionalGeneration|LMHeadModel)"),
    ),
    Rule(
        CHAT, "a llama.cpp generative architecture (GGUF)", architecture=re.compile(GGUF_CHAT_ARCHITECTURES)
    ),
    Rule(
        EMBEDDING,
        "an encoder without a head (BertModel, XLMRobertaModel, *Model) or a llama.cpp encoder (GGUF)",
        architecture=re.compile(r"[A-Z]\w*Model|" + GGUF_EMBEDDING_ARCHITECTURES),
    ),
    Rule(CHAT, "the name says instruct or chat", name=_word("instruct", "chat", "it")),
)


@dataclass(frozen=True)
class Evidence:
    """What a rule is matched against."""

    names: tuple[str, ...]  # lower-cased
    architecture: str | None
    sentence_transformers: bool = False
    labels: int | None = None  # the classifier head's outputs, when config.json says


def _matches(rule: Rule, ev: Evidence) -> bool:
    if rule.name is not None and not any(rule.name.search(n) for n in ev.names):
        return False
    if rule.architecture is not None and not (
        ev.architecture and rule.architecture.fullmatch(ev.architecture)
    ):
        return False
    if rule.sentence_transformers and not ev.sentence_transformers:
        return False
    return not (rule.single_label and ev.labels != 1)


def classify(ev: Evidence) -> tuple[ModelKind | None, str]:
    """The kind and the rule's `why`, or None and the problem an operator reads."""
    for rule in RULES:
        if _matches(rule, ev):
            return rule.kind, rule.why
    if ev.architecture is None:
        return None, "no architecture stated and the name gives no hint (rerank, embed, instruct, chat)"
    if ev.architecture.endswith("ForSequenceClassification") and ev.labels not in (None, 1):
        return None, (
            f"architecture {ev.architecture} is a classifier with {ev.labels} labels, not a reranker "
            "(a reranker has one)"
        )
    return None, f"architecture {ev.architecture} is not a chat, embedding or rerank model"


def describe_rules() -> list[str]:
    """The table as an operator reads it, in the order it is applied."""
    lines = []
    for i, rule in enumerate(RULES, 1):
        conds = []
        if rule.name is not None:
            conds.append(f"name ~ /{rule.name.pattern}/")
        if rule.architecture is not None:
            conds.append(f"architecture = /{rule.architecture.pattern}/")
        if rule.sentence_transformers:
            conds.append("has " + " or ".join(SENTENCE_TRANSFORMERS_FILES))
        if rule.single_label:
            conds.append("one label")
        lines.append(f"{i}. {rule.kind.value}: {rule.why} [{'; '.join(conds)}]")
    return lines


# --- the memory estimate ---

_DTYPE_BYTES = {
    "float32": 4.0, "fp32": 4.0, "float": 4.0, "float64": 8.0,
    "float16": 2.0, "fp16": 2.0, "half": 2.0, "bfloat16": 2.0, "bf16": 2.0,
    "int8": 1.0, "uint8": 1.0, "float8_e4m3fn": 1.0, "float8_e5m2": 1.0, "fp8": 1.0,
}  # fmt: skip
DEFAULT_BYTES_PER_PARAMETER = 2.0  # engines serve in half precision unless told otherwise


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def bytes_per_parameter(config: dict[str, Any]) -> float:
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        bits = _positive_int(quant.get("bits")) or _positive_int(quant.get("w_bit"))
        if bits is not None and bits <= 32:
            return bits / 8
    dtype = config.get("torch_dtype", config.get("dtype"))
    if isinstance(dtype, str):
        return _DTYPE_BYTES.get(dtype.lower().removeprefix("torch."), DEFAULT_BYTES_PER_PARAMETER)
    return DEFAULT_BYTES_PER_PARAMETER


def parameter_count(config: dict[str, Any], kind: ModelKind | None) -> int | None:
    """Stated, or estimated from the shape fields (see the module docstring); None if they are missing."""
    stated = _positive_int(config.get("num_parameters"))
    if stated is not None:
        return stated
    shape = config
    if _positive_int(config.get("hidden_size")) is None and isinstance(config.get("text_config"), dict):
        shape = config["text_config"]  # multimodal checkpoints keep the language model's shape there

    def field(*names: str) -> int | None:
        return next((v for n in names if (v := _positive_int(shape.get(n))) is not None), None)

    hidden = field("hidden_size", "n_embd", "d_model")
    layers = field("num_hidden_layers", "n_layer", "num_layers")
    vocab = field("vocab_size")
    if hidden is None or layers is None or vocab is None:
        return None
    inter = field("intermediate_size", "n_inner", "ffn_dim", "d_ff")
    mlp = 8 * hidden * hidden if inter is None else (3 if kind is CHAT else 2) * hidden * inter
    tied = shape.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    # Encoders have no output projection over the vocabulary; an untied generator has a second matrix.
    embeddings = vocab * hidden * (2 if kind is CHAT and not tied else 1)
    return layers * (4 * hidden * hidden + mlp) + embeddings


def weights_from_config(config: dict[str, Any], kind: ModelKind | None) -> int:
    """Estimated bytes of weights when none are on disk (a simulator folder); 0 when unknown."""
    params = parameter_count(config, kind)
    return 0 if params is None else math.ceil(params * bytes_per_parameter(config))


def estimate_memory_mb(weights_bytes: int, kind: ModelKind | None) -> int:
    """Accelerator memory to serve the model, by the rule in the module docstring; 0 when unknown."""
    if weights_bytes <= 0:
        return 0
    weights_mb = weights_bytes / MIB
    memory = math.ceil(weights_mb * RUNTIME_FACTOR)
    if kind is CHAT:
        memory += max(math.ceil(weights_mb * KV_CACHE_FACTOR), KV_CACHE_MIN_MB)
    return memory
