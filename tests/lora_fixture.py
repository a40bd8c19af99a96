"""A small LoRA adapter GGUF for a real base model, built with the `gguf` package.

Rank-4 A and B matrices, random (seeded) and non-zero, for every layer's attention query
and value projections, named and shaped as llama.cpp expects for the base model's
tensors. `widen` makes A one column too wide: an adapter for some other base.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from ailab.gguf_meta import GgufInfo

TARGETS = ("attn_q", "attn_v")
SCALE = 0.5  # B·A entries of about 0.5: enough to change greedy answers


def build_lora(base: GgufInfo, out: Path, rank: int = 4, widen: int = 0, seed: int = 0) -> Path:
    writer = GGUFWriter(str(out), arch=str(base.metadata["general.architecture"]))
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(seed)
    for layer in range(base.hparam("block_count")):
        for target in TARGETS:
            name = f"blk.{layer}.{target}.weight"
            n_in, n_out = base.tensors[name].shape[:2]
            # numpy shapes are ggml's reversed: A is ne=[n_in, rank], B is ne=[rank, n_out].
            a = rng.standard_normal((rank, n_in + widen)).astype(np.float32) * SCALE
            b = rng.standard_normal((n_out, rank)).astype(np.float32) * SCALE
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
