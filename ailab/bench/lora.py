"""LoRA figures for `make bench`: requests alternating between a base model and its adapter
(one process, scales set per request) against requests alternating between two full
models with room for one (a swap each time); the ratio of the two is the figure. Also the
bench's adapter itself, which the tests build too (tests/lora_fixture.py).

A script's phase, never a test: nothing here asserts on time. Every loop is bounded by its
count and by the plan's time limit.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
from gguf import GGUFWriter

from ailab import config
from ailab.bench.gateway import Bench, console, keyed_client, started_gateway
from ailab.bench.pool import PoolRow, _median, alternate
from ailab.gguf_meta import GgufInfo, read_info

TARGETS = ("attn_q", "attn_v")
SCALE = 0.5  # B·A entries of about 0.5: enough to change greedy answers
ADAPTER_KEY = "bench-lora"


def build_lora(base: GgufInfo, out: Path, rank: int = 4, widen: int = 0, seed: int = 0) -> Path:
    """A rank-`rank` LoRA GGUF for `base`: random (seeded), non-zero A and B for every
    layer's attention query and value projections, named and shaped as llama.cpp expects.
    `widen` makes A that many columns too wide: an adapter for some other base."""
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


def _models_with_adapter(base_key: str, folder: Path) -> Path:
    """A models folder of links to the configured models, plus the adapter in custom/."""
    settings = config.load_settings()
    (folder / "custom").mkdir(parents=True)
    for model in settings.models_dir.glob("*.gguf"):
        (folder / model.name).symlink_to(model.resolve())
    entry = config.get_all_models(settings)[base_key]
    base_path = config.model_path(settings, entry)
    if base_path is None or not base_path.is_file():
        raise SystemExit(f"{base_key} has no local file; `make models` fetches it")
    build_lora(read_info(base_path), folder / "custom" / f"{ADAPTER_KEY}.gguf")
    (folder / "custom" / f"{ADAPTER_KEY}.json").write_text(f'{{"base": "{base_key}"}}')
    return folder


def phase_lora(bench: Bench, log_dir: Path) -> list[PoolRow]:
    """One gateway with room for one model: base <-> adapter, then base <-> other model."""
    if bench.binary is None:
        console.print("[yellow]no llama-server binary: LoRA switching is not measured[/yellow]")
        return []
    base, other = bench.model_key, bench.switch_model_key
    folder = _models_with_adapter(base, log_dir / "lora-models")
    env = {"AILAB_MAX_LOADED_MODELS": "1", "AILAB_MODELS_DIR": str(folder)}
    with (
        keyed_client(None) as client,
        started_gateway(bench.binary, base, log_dir / "lora", env) as (url, _),
    ):
        pid = _base_pid(client, url, base)
        adapter = alternate(client, url, (base, ADAPTER_KEY), bench)
        one_process = _base_pid(client, url, base) == pid
        swapping = alternate(client, url, (base, other), bench)
    adapter_ms, swap_ms = _median(adapter), _median(swapping)
    ratio = swap_ms / adapter_ms if adapter_ms and swap_ms else None
    rows = [
        PoolRow(
            "switching per request (median)",
            "ms",
            f"{base} <-> its adapter",
            adapter_ms,
            f"{base} <-> {other}, room for one",
            swap_ms,
        ),
        PoolRow("model swap / adapter switch", "x", "ratio", ratio, "", None),
    ]
    bench.raw["lora"] = {
        "adapter_ms": adapter,
        "swapping_ms": swapping,
        "base_process_unchanged": one_process,
        "ratio": ratio,
    }
    return rows


def _base_pid(client: httpx.Client, url: str, base: str) -> int | None:
    models = client.get(f"{url}/models").json()["models"]
    return next((m["pid"] for m in models if m["key"] == base), None)
