"""Read a model's shape (layers, KV heads, head size, vocabulary) from its GGUF header.

Only the header's key-value section is read, with the `gguf` package's names and value
types. `gguf.GGUFReader` would parse every tensor and the whole vocabulary into numpy
objects first, which takes 5 to 17 s for the bundled 135M/270M models on a small CPU;
the few numbers needed here sit in the first kilobytes, and arrays are skipped unread.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from gguf import GGUF_MAGIC, GGUFValueType, Keys

from ailab.upstream.budget import ModelShape

SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


class GGUFHeaderError(ValueError):
    """The file is not a GGUF this reader understands; the message says what was wrong."""


class _Cursor:
    """Little-endian reads over the mapped file."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.offset = 0

    def unpack(self, fmt: str) -> int | float | bool:
        try:
            (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        except struct.error:
            raise GGUFHeaderError("the header ends early (truncated file?)") from None
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = int(self.unpack("Q"))
        raw = self.data[self.offset : self.offset + length]
        self.offset += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> int | float | bool | str:
        """A scalar or string; an array is skipped and stands for its length."""
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            item_kind = int(self.unpack("I"))
            count = int(self.unpack("Q"))
            self.skip_array(item_kind, count)
            return count
        try:
            return self.unpack(SCALAR_FORMATS[GGUFValueType(kind)])
        except (ValueError, KeyError):
            raise GGUFHeaderError(f"unknown GGUF value type {kind}") from None

    def skip_array(self, item_kind: int, count: int) -> None:
        if item_kind == GGUFValueType.STRING:
            for _ in range(count):
                length = int(self.unpack("Q"))  # read first: it moves the offset
                self.offset += length
            return
        if item_kind == GGUFValueType.ARRAY:
            for _ in range(count):
                self.value(GGUFValueType.ARRAY)
            return
        try:
            self.offset += struct.calcsize(SCALAR_FORMATS[GGUFValueType(item_kind)]) * count
        except (ValueError, KeyError):
            raise GGUFHeaderError(f"unknown GGUF array item type {item_kind}") from None


def read_metadata(path: Path) -> dict[str, object]:
    """The header's key-values; an array stands for its length."""
    with path.open("rb") as handle:
        try:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise GGUFHeaderError("the file is empty") from None
    with data:
        cursor = _Cursor(data)
        if cursor.unpack("I") != GGUF_MAGIC:
            raise GGUFHeaderError("no GGUF magic at the start of the file")
        version = cursor.unpack("I")
        if version not in (2, 3):
            raise GGUFHeaderError(f"GGUF version {version} is not supported")
        cursor.unpack("Q")  # tensor count
        n_kv = int(cursor.unpack("Q"))
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = cursor.string()
            metadata[key] = cursor.value(int(cursor.unpack("I")))
        return metadata


def read_shape(path: Path) -> ModelShape:
    """The numbers the memory estimate needs; raise GGUFHeaderError when they are missing."""
    meta = read_metadata(path)
    arch = meta.get(Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise GGUFHeaderError("the header names no architecture")

    def number(key: str, default: int | None = None) -> int:
        value = meta.get(key.format(arch=arch), default)
        if not isinstance(value, int | float):
            raise GGUFHeaderError(f"the header has no {key.format(arch=arch)}")
        return int(value)

    n_embd = number(Keys.LLM.EMBEDDING_LENGTH)
    n_head = number(Keys.Attention.HEAD_COUNT)
    head_dim = n_embd // max(n_head, 1)
    vocab = meta.get(Keys.LLM.VOCAB_SIZE.format(arch=arch), meta.get(Keys.Tokenizer.LIST, 0))
    return ModelShape(
        architecture=arch,
        n_layers=number(Keys.LLM.BLOCK_COUNT),
        n_kv_heads=number(Keys.Attention.HEAD_COUNT_KV, n_head),
        key_length=number(Keys.Attention.KEY_LENGTH, head_dim),
        value_length=number(Keys.Attention.VALUE_LENGTH, head_dim),
        n_embd=n_embd,
        n_vocab=int(vocab) if isinstance(vocab, int) else 0,
    )
