"""A tiny llama-architecture GGUF with random weights, for running llama.cpp's server for real in tests.

Two layers, hidden size 64, 4 heads, F32 tensors (about 0.5 MB): llama.cpp loads it, tokenizes, runs the
graph and samples like any model; the text it writes is random. The tokenizer is SentencePiece-style
(``tokenizer.ggml.model = "llama"``) because it needs no merges: the three special tokens, the 256 byte
tokens ``<0x00>``..``<0xFF>`` (so any input falls back to bytes) and the printable ASCII characters.
Tensor names and metadata keys are the `gguf` package's (llama.cpp's gguf-py); numpy arrays are in
row-major order, the reverse of ggml's dimensions (token_embd is ggml {n_embd, n_vocab}: (n_vocab, n_embd)).

Needs the `gguf` package (`make llamacpp` installs it); imported lazily so test collection never does.
"""

from __future__ import annotations

from pathlib import Path

ARCH = "llama"
N_LAYERS, N_EMBD, N_HEAD, N_FF, N_CTX = 2, 64, 4, 128, 512
# A simple template (the model's own, in tokenizer.chat_template) so the server needs no built-in one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def _vocab() -> tuple[list[str], list[float], list[int]]:
    import gguf

    types = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    kinds = [types.UNKNOWN, types.CONTROL, types.CONTROL]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    kinds += [types.BYTE] * 256
    # SentencePiece writes a space as U+2581; printable ASCII (no space) plus it as ordinary tokens.
    tokens += ["\u2581", *(chr(c) for c in range(33, 127))]
    kinds += [types.NORMAL] * (len(tokens) - len(kinds))
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, [int(kind) for kind in kinds]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """Write the model to `path` (a .gguf file) and return it."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens, scores, token_types = _vocab()
    n_vocab = len(tokens)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name("tiny-random-llama")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)  # the template writes it
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.TENSOR_NAMES
    key = gguf.MODEL_TENSOR
    writer.add_tensor(names[key.TOKEN_EMBD] + ".weight", weights(n_vocab, N_EMBD))
    writer.add_tensor(names[key.OUTPUT_NORM] + ".weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor(names[key.OUTPUT] + ".weight", weights(n_vocab, N_EMBD))
    for layer in range(N_LAYERS):
        block = {
            key.ATTN_NORM: np.ones(N_EMBD, dtype=np.float32),
            key.ATTN_Q: weights(N_EMBD, N_EMBD),
            key.ATTN_K: weights(N_EMBD, N_EMBD),
            key.ATTN_V: weights(N_EMBD, N_EMBD),
            key.ATTN_OUT: weights(N_EMBD, N_EMBD),
            key.FFN_NORM: np.ones(N_EMBD, dtype=np.float32),
            key.FFN_GATE: weights(N_FF, N_EMBD),
            key.FFN_UP: weights(N_FF, N_EMBD),
            key.FFN_DOWN: weights(N_EMBD, N_FF),
        }
        for tensor, data in block.items():
            writer.add_tensor(names[tensor].format(bid=layer) + ".weight", data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
