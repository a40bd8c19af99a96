"""The model pool's memory policy as pure functions: what a model costs, what fits, what to
evict, what has idled long enough. No processes, no clocks, no I/O: the pool passes in
numbers and acts on the answers, and tests check the rules with plain values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

MB = 1024 * 1024
# Default budget: this share of the RAM available at start-up, or of the free VRAM summed
# over the GPUs when layers are offloaded (the rest is left to the OS, the gateway and
# everything else running).
RAM_SHARE = 0.75
VRAM_SHARE = 0.9
# Process baseline of a llama-server (binary, libraries, threads, vocabulary tables):
# what remained of the measured RSS after weights, KV cache and logits for the bundled
# models on CPU (39 MB for SmolLM2, 46 MB for Gemma 3 270M, at 4096 tokens and 2 slots).
PROCESS_OVERHEAD_MB = 40.0
KV_BYTES_PER_ELEMENT = 2  # f16, llama-server's default cache type
LOGIT_BYTES = 4  # f32


@dataclass(frozen=True)
class ModelShape:
    """What the GGUF header says about a model's size-relevant dimensions."""

    architecture: str
    n_layers: int
    n_kv_heads: int
    key_length: int
    value_length: int
    n_embd: int
    n_vocab: int


def kv_cache_mb(shape: ModelShape, n_ctx: int) -> float:
    """Keys and values for every layer over the whole (unified) context."""
    per_token = shape.n_layers * shape.n_kv_heads * (shape.key_length + shape.value_length)
    return per_token * n_ctx * KV_BYTES_PER_ELEMENT / MB


def estimate_mb(file_bytes: int, shape: ModelShape | None, n_ctx: int, outputs: int) -> float:
    """A model's memory before it runs: the weights (the file, mapped), the KV cache, the
    logits of ``outputs`` tokens at once (one per slot when generating), and the process
    baseline. Without a readable header (not a GGUF, or an unknown layout) only the
    weights and the baseline are counted."""
    total = file_bytes / MB + PROCESS_OVERHEAD_MB
    if shape is not None:
        total += kv_cache_mb(shape, n_ctx)
        total += shape.n_vocab * outputs * LOGIT_BYTES / MB
    return round(total, 1)


def effective_cost_mb(estimate: float, measured_peak: float | None) -> float:
    """What a resident model counts against the budget: its measured peak once it has one.
    Pages of the KV cache count only when touched, so a fresh process measures below what
    it will use; the estimate stands until the measurement passes it."""
    return max(estimate, measured_peak or 0.0)


def default_budget_mb(
    available_ram_mb: float, free_vram_mb: Sequence[float], offloaded: bool
) -> float:
    """The budget when AILAB_MEMORY_BUDGET_MB is not set."""
    if offloaded and free_vram_mb:
        return round(sum(free_vram_mb) * VRAM_SHARE, 1)
    return round(available_ram_mb * RAM_SHARE, 1)


@dataclass(frozen=True)
class Resident:
    """A model instance that holds (or is about to hold) memory."""

    key: str
    cost_mb: float
    in_flight: int
    pinned: bool
    last_used: float  # monotonic seconds
    ttl_s: float  # 0 = never unloaded for idling
    settled: bool  # ready or failed; one loading or unloading cannot be evicted now

    @property
    def evictable(self) -> bool:
        return self.settled and self.in_flight == 0 and not self.pinned


@dataclass(frozen=True)
class Plan:
    """What to do about a model that wants to load.

    load: unload ``evict`` (least recently used first), then load.
    wait: room appears only when busy models finish; try again when one does.
    refuse: it can never fit (``status`` 400 when the model alone is too big, 503 when
    pinned models hold the room)."""

    action: Literal["load", "wait", "refuse"]
    evict: tuple[str, ...] = ()
    reason: str = ""
    status: int = 503


def plan_room(
    key: str,
    need_mb: float,
    budget_mb: float,
    max_models: int,
    residents: Iterable[Resident],
) -> Plan:
    """Decide how ``key`` (estimated at ``need_mb``) gets its room among ``residents``."""
    others = [r for r in residents if r.key != key]
    if need_mb > budget_mb:
        return Plan(
            "refuse",
            reason=f"{key} needs an estimated {need_mb:.0f} MB, more than the whole memory "
            f"budget of {budget_mb:.0f} MB; raise AILAB_MEMORY_BUDGET_MB or lower AILAB_CTX",
            status=400,
        )
    used = sum(r.cost_mb for r in others)
    count = len(others)
    evict: list[str] = []
    for victim in sorted((r for r in others if r.evictable), key=lambda r: r.last_used):
        if used + need_mb <= budget_mb and count < max_models:
            break
        evict.append(victim.key)
        used -= victim.cost_mb
        count -= 1
    if used + need_mb <= budget_mb and count < max_models:
        return Plan("load", evict=tuple(evict))
    pinned = [r for r in others if r.pinned]
    pinned_mb = sum(r.cost_mb for r in pinned)
    if pinned_mb + need_mb > budget_mb or len(pinned) >= max_models:
        names = ", ".join(r.key for r in pinned)
        return Plan(
            "refuse",
            reason=f"{key} needs {need_mb:.0f} MB but pinned models ({names}) hold "
            f"{pinned_mb:.0f} MB of the {budget_mb:.0f} MB budget and "
            f"{len(pinned)} of {max_models} places; unload one with POST /models/unload",
        )
    busy = ", ".join(f"{r.key} ({r.in_flight} in flight)" for r in others if not r.evictable)
    return Plan(
        "wait",
        reason=f"{key} needs {need_mb:.0f} MB; {used:.0f} of {budget_mb:.0f} MB and "
        f"{count} of {max_models} places are held by models that are busy or loading: {busy}",
    )


def idle_expired(residents: Iterable[Resident], now: float) -> list[str]:
    """Models idle for at least their TTL; never a pinned or busy one."""
    return [
        r.key for r in residents if r.evictable and r.ttl_s > 0 and now - r.last_used >= r.ttl_s
    ]
