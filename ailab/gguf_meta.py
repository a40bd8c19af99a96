"""GGUF headers, read and patched in place: what fine-tuning and adapter checks need from
a model file (metadata, chat template, token list and types, tensor shapes, whether the
tensor data is all there) without loading the weights.

The `gguf` package's reader builds a Python object per array element, which costs
seconds of CPU for a large vocabulary (Gemma 3 has 262,144 tokens); this reader walks the
header once with `struct` and remembers where the two arrays that get patched lie.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
TOKENS_KEY = "tokenizer.ggml.tokens"
TYPES_KEY = "tokenizer.ggml.token_type"
TEMPLATE_KEY = "tokenizer.chat_template"

# GGUF value type -> struct format of one element (8 = string, 9 = array: handled apart).
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY, _INT32 = 8, 9, 5
_KEPT_ARRAY_LENGTH = 1024  # per-layer hyper-parameters are kept; vocabulary-sized arrays not
# ggml type -> (bytes per block, values per block), for the types models and adapters use.
_BLOCKS = {
    0: (4, 1), 1: (2, 1), 30: (2, 1), 2: (18, 32), 3: (20, 32), 6: (22, 32), 7: (24, 32),
    8: (34, 32), 10: (84, 256), 11: (110, 256), 12: (144, 256), 13: (176, 256), 14: (210, 256),
}  # fmt: skip


class GgufError(ValueError):
    """The file is not a GGUF model this reader understands; the message says why."""


@dataclass
class GgufTensor:
    """A tensor's shape in ggml order (ne[0] first), its type and where its data lies."""

    shape: tuple[int, ...]
    kind: int
    offset: int  # from the start of the data section

    def nbytes(self) -> int | None:
        """Its data's size, or None for a type this reader does not know."""
        if self.kind not in _BLOCKS:
            return None
        block_bytes, block_values = _BLOCKS[self.kind]
        return math.prod(self.shape) // block_values * block_bytes


@dataclass
class GgufInfo:
    """One model file's header: scalar metadata, the vocabulary, and the tensors."""

    path: Path
    metadata: dict[str, Any]
    tokens: list[str] = field(default_factory=list)
    n_tokens: int = 0  # the vocabulary's size, also when its texts were not read
    token_types: list[int] = field(default_factory=list)
    tensors: dict[str, GgufTensor] = field(default_factory=dict)
    data_start: int = 0
    file_size: int = 0
    # Byte offsets of each token string and of the first token type, for patching.
    token_offsets: list[int] = field(default_factory=list)
    types_offset: int = 0

    def hparam(self, name: str) -> int:
        """An architecture hyper-parameter such as block_count (the largest, if per-layer)."""
        value = self.metadata.get(f"{self.metadata.get('general.architecture')}.{name}", 0)
        return int(max(value) if isinstance(value, list) else value)

    @property
    def parameters(self) -> int:
        return sum(math.prod(tensor.shape) for tensor in self.tensors.values())

    def truncated_tensors(self) -> list[str]:
        """Tensors whose data would lie (partly) past the end of the file."""
        return [
            name
            for name, tensor in self.tensors.items()
            if (size := tensor.nbytes()) is not None
            and self.data_start + tensor.offset + size > self.file_size
        ]

    @property
    def chat_template(self) -> str | None:
        template = self.metadata.get(TEMPLATE_KEY)
        return template if isinstance(template, str) else None


class _Cursor:
    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        start = self.pos
        self.pos += length
        return self.data[start : self.pos].decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        """The value at the cursor; a long array (scores, merges) is skipped as None."""
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("I"), self.unpack("Q")
            if count <= _KEPT_ARRAY_LENGTH:
                return [self.value(item_kind) for _ in range(count)]
            if item_kind in _SCALARS:
                self.pos += count * struct.calcsize("<" + _SCALARS[item_kind])
            else:
                for _ in range(count):
                    self.value(item_kind)
            return None
        if kind not in _SCALARS:
            raise GgufError(f"unknown GGUF value type {kind} at byte {self.pos}")
        return self.unpack(_SCALARS[kind])


def read_info(path: Path, vocabulary: bool = True) -> GgufInfo:
    """Parse a GGUF file's header; raises GgufError for anything else. Without
    `vocabulary`, the token texts and types are skipped (only their count is kept)."""
    with path.open("rb") as handle:
        try:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise GgufError(f"{path} is empty") from None
        with data:
            try:
                return _parse(path, data, vocabulary)
            except (struct.error, IndexError):
                raise GgufError(f"{path} is not a complete GGUF file") from None


def _parse(path: Path, data: mmap.mmap, vocabulary: bool) -> GgufInfo:
    if data[:4] != MAGIC:
        raise GgufError(f"{path} is not a GGUF file")
    cursor = _Cursor(data)
    cursor.pos = 4
    version = cursor.unpack("I")
    if version < 2:
        raise GgufError(f"{path} is GGUF version {version}; only 2 and later are read")
    n_tensors, n_kv = cursor.unpack("Q"), cursor.unpack("Q")
    info = GgufInfo(path=path, metadata={})
    for _ in range(n_kv):
        key, kind = cursor.string(), cursor.unpack("I")
        if key == TOKENS_KEY and kind == _ARRAY and not vocabulary:
            info.n_tokens = _skip_strings(cursor, info)
        elif key == TOKENS_KEY and kind == _ARRAY:
            _read_tokens(cursor, info)
        elif key == TYPES_KEY and kind == _ARRAY and vocabulary:
            _read_types(cursor, info)
        else:
            info.metadata[key] = cursor.value(kind)
    for _ in range(n_tensors):
        name = cursor.string()
        shape = tuple(cursor.unpack("Q") for _ in range(cursor.unpack("I")))
        info.tensors[name] = GgufTensor(shape, cursor.unpack("I"), cursor.unpack("Q"))
    alignment = int(info.metadata.get("general.alignment", 32))
    info.data_start = -(-cursor.pos // alignment) * alignment
    info.file_size = len(data)
    return info


def _read_tokens(cursor: _Cursor, info: GgufInfo) -> None:
    item_kind, count = cursor.unpack("I"), cursor.unpack("Q")
    if item_kind != _STRING:
        raise GgufError(f"{info.path}: {TOKENS_KEY} is not a string array")
    for _ in range(count):
        info.token_offsets.append(cursor.pos)
        info.tokens.append(cursor.string())
    info.n_tokens = count


def _skip_strings(cursor: _Cursor, info: GgufInfo) -> int:
    item_kind, count = cursor.unpack("I"), cursor.unpack("Q")
    if item_kind != _STRING:
        raise GgufError(f"{info.path}: {TOKENS_KEY} is not a string array")
    for _ in range(count):
        length = cursor.unpack("Q")  # read first: it moves the cursor
        cursor.pos += length
    return int(count)


def _read_types(cursor: _Cursor, info: GgufInfo) -> None:
    item_kind, count = cursor.unpack("I"), cursor.unpack("Q")
    if item_kind != _INT32:
        raise GgufError(f"{info.path}: {TYPES_KEY} is not an int32 array")
    info.types_offset = cursor.pos
    info.token_types = list(struct.unpack_from(f"<{count}i", cursor.data, cursor.pos))
    cursor.pos += 4 * count


def patch_vocabulary(info: GgufInfo, texts: dict[int, str], types: list[int]) -> None:
    """Overwrite token texts (each the same UTF-8 length as before) and all token types of
    the file `info` was read from, in place: the header keeps its size and layout."""
    if len(types) != len(info.token_types):
        raise GgufError(f"{info.path} has {len(info.token_types)} token types, not {len(types)}")
    with info.path.open("r+b") as handle:
        for token_id, text in texts.items():
            encoded = text.encode()
            handle.seek(info.token_offsets[token_id])
            (old_length,) = struct.unpack("<Q", handle.read(8))
            if len(encoded) != old_length:
                raise GgufError(f"token {token_id}: {text!r} is not {old_length} bytes long")
            handle.write(encoded)
        handle.seek(info.types_offset)
        handle.write(struct.pack(f"<{len(types)}i", *types))
