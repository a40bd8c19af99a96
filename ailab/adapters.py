"""LoRA adapter files checked against their base model before they are registered, with
llama.cpp's own rules (src/llama-adapter.cpp), so that a wrong base or a bad file is
refused at once with a clear message, never when a request first uses the adapter.

The registry (ailab/config.py) asks on every listing; ``gguf_type`` and ``checked_lora``
remember their answer per file version (path, size, mtime), so only a new or changed file
is read.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import BaseModel

from ailab.errors import BadRequest
from ailab.gguf_meta import GgufError, GgufInfo, read_info


class AdapterMismatch(BadRequest):
    """The file is not a LoRA adapter for this base model; the message says why."""


class LoraInfo(BaseModel):
    """What a checked adapter is."""

    architecture: str
    alpha: float
    rank: int
    tensors: int  # base tensors it changes


def _pairs(adapter: GgufInfo, where: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """Base tensor name -> {"a": shape, "b": shape}."""
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, tensor in adapter.tensors.items():
        base, _, part = name.rpartition(".lora_")
        if part not in ("a", "b") or not base:
            raise AdapterMismatch(f"{where}: tensor {name!r} is not a lora_a or lora_b tensor")
        pairs.setdefault(base, {})[part] = tensor.shape
    for base, parts in pairs.items():
        if len(parts) != 2:
            raise AdapterMismatch(f"{where}: {base!r} has lora_a or lora_b but not both")
    if not pairs:
        raise AdapterMismatch(f"{where}: the adapter has no tensors")
    return pairs


def _check_shapes(
    where: str, name: str, model: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...]
) -> None:
    # Token embeddings are looked up, not multiplied: llama.cpp flips A and B for them.
    if name == "token_embd.weight":
        fits = model[0] == b[1] and model[1] == a[1]
    else:
        fits = model[0] == a[0] and model[1] == b[1] and a[1] == b[0]
    if len(model) < 2 or len(a) < 2 or len(b) < 2 or not fits:
        raise AdapterMismatch(
            f"{where}: {name} is {list(model)} in the base model, the adapter's A and B are "
            f"{list(a)} and {list(b)}; it was made for another base model"
        )


def check_lora(adapter_path: Path, base_path: Path, base_key: str) -> LoraInfo:
    """Check a LoRA GGUF against its base model's file; raises AdapterMismatch (400)."""
    where = adapter_path.name
    try:
        adapter, base = read_info(adapter_path), read_info(base_path)
    except (GgufError, OSError) as exc:
        raise AdapterMismatch(f"{where}: cannot be read as GGUF ({exc})") from None
    meta = adapter.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        kind = f"{meta.get('general.type')}/{meta.get('adapter.type')}"
        raise AdapterMismatch(f"{where} is not a LoRA adapter (general.type/adapter.type: {kind})")
    architecture = base.metadata.get("general.architecture")
    if meta.get("general.architecture") != architecture:
        raise AdapterMismatch(
            f"{where} is for {meta.get('general.architecture')!r} models; "
            f"{base_key} is {architecture!r}"
        )
    ranks = set()
    for name, parts in _pairs(adapter, where).items():
        if name not in base.tensors:
            raise AdapterMismatch(f"{where}: {base_key} has no tensor {name!r}; wrong base model")
        _check_shapes(where, name, base.tensors[name].shape, parts["a"], parts["b"])
        ranks.add(parts["b"][0] if name != "token_embd.weight" else parts["a"][0])
    if truncated := adapter.truncated_tensors():
        raise AdapterMismatch(f"{where} is cut short: the data of {truncated[0]} is missing")
    return LoraInfo(
        architecture=str(architecture),
        alpha=float(meta.get("adapter.lora.alpha", 0.0)),
        rank=max(ranks),
        tensors=len(adapter.tensors) // 2,
    )


def _version(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def gguf_type(path: Path) -> str | None:
    """A GGUF file's general.type ("model", "adapter"); None when it cannot be read."""
    try:
        return _gguf_type(_version(path))
    except OSError:
        return None


@functools.lru_cache(maxsize=256)
def _gguf_type(version: tuple[str, int, int]) -> str | None:
    try:
        kind = read_info(Path(version[0])).metadata.get("general.type")
    except (GgufError, OSError):
        return None
    return kind if isinstance(kind, str) else None


def checked_lora(adapter_path: Path, base_path: Path, base_key: str) -> str | None:
    """`check_lora`'s verdict as a message (None: the adapter fits its base)."""
    try:
        return _checked(_version(adapter_path), _version(base_path), base_key)
    except OSError as exc:
        return f"{adapter_path.name}: cannot be read ({exc})"


@functools.lru_cache(maxsize=256)
def _checked(
    adapter: tuple[str, int, int], base: tuple[str, int, int], base_key: str
) -> str | None:
    try:
        check_lora(Path(adapter[0]), Path(base[0]), base_key)
    except AdapterMismatch as exc:
        return str(exc)
    return None
