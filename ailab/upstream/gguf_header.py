"""A model's shape (layers, KV heads, head size, vocabulary) from its GGUF header, for the
memory estimate: the header is read by ``gguf_meta`` without the vocabulary's texts."""

from __future__ import annotations

from pathlib import Path

from gguf import Keys

from ailab.gguf_meta import GgufError, read_info
from ailab.upstream.budget import ModelShape


def read_shape(path: Path) -> ModelShape:
    """The numbers the memory estimate needs; raise GgufError when they are missing."""
    info = read_info(path, vocabulary=False)
    arch = info.metadata.get(Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise GgufError(f"{path}: the header names no architecture")

    def number(key: str, default: int | None = None) -> int:
        name = key.format(arch=arch)
        value = info.metadata.get(name, default)
        if isinstance(value, list) and value:  # per-layer: the largest layer counts
            value = max(value)
        if not isinstance(value, int | float):
            raise GgufError(f"{path}: the header has no {name}")
        return int(value)

    n_embd = number(Keys.LLM.EMBEDDING_LENGTH)
    n_head = number(Keys.Attention.HEAD_COUNT)
    head_dim = n_embd // max(n_head, 1)
    return ModelShape(
        architecture=arch,
        n_layers=number(Keys.LLM.BLOCK_COUNT),
        n_kv_heads=number(Keys.Attention.HEAD_COUNT_KV, n_head),
        key_length=number(Keys.Attention.KEY_LENGTH, head_dim),
        value_length=number(Keys.Attention.VALUE_LENGTH, head_dim),
        n_embd=n_embd,
        n_vocab=number(Keys.LLM.VOCAB_SIZE, info.n_tokens),
    )
