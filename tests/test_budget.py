"""The pool's memory policy as plain values: estimates, what fits, what is evicted, TTLs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import GEMMA, SMOLLM

from ailab.gguf_meta import GgufError
from ailab.upstream.budget import (
    MB,
    PROCESS_OVERHEAD_MB,
    ModelShape,
    Resident,
    default_budget_mb,
    effective_cost_mb,
    estimate_mb,
    idle_expired,
    kv_cache_mb,
    plan_room,
)
from ailab.upstream.gguf_header import read_shape

SHAPE = ModelShape("llama", n_layers=30, n_kv_heads=3, key_length=64, value_length=64,
                   n_embd=576, n_vocab=49152)  # fmt: skip


def resident(key: str, cost: float = 100, in_flight: int = 0, last_used: float = 0,
             pinned: bool = False, ttl: float = 0, settled: bool = True) -> Resident:  # fmt: skip
    return Resident(key, cost, in_flight, pinned, last_used, ttl, settled)


def test_the_header_gives_the_shape_of_both_bundled_models() -> None:
    smollm = read_shape(SMOLLM)
    gemma = read_shape(GEMMA)
    assert (smollm.architecture, smollm.n_layers, smollm.n_kv_heads) == ("llama", 30, 3)
    assert (smollm.key_length, smollm.n_vocab) == (64, 49152)  # from the embedding size
    assert (gemma.architecture, gemma.n_layers, gemma.n_kv_heads) == ("gemma3", 18, 1)
    assert (gemma.key_length, gemma.value_length) == (256, 256)  # stated in the header
    assert gemma.n_vocab == 262144  # the tokenizer's length: gemma3 states no vocab_size


def test_a_file_that_is_not_gguf_is_refused_with_the_reason(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(GgufError, match="is not a GGUF file"):
        read_shape(junk)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(SMOLLM.read_bytes()[:300])
    with pytest.raises(GgufError, match="not a complete GGUF file"):
        read_shape(truncated)


def test_the_kv_cache_grows_with_context_layers_heads_and_head_size() -> None:
    # 30 layers x 3 heads x (64 + 64) x 2 bytes = 23040 bytes per token.
    assert kv_cache_mb(SHAPE, 4096) == pytest.approx(23040 * 4096 / MB)
    assert kv_cache_mb(SHAPE, 8192) == pytest.approx(2 * kv_cache_mb(SHAPE, 4096))


def test_the_estimate_adds_weights_cache_logits_and_baseline() -> None:
    file_bytes = 100 * MB
    alone = estimate_mb(file_bytes, None, 4096, 2)
    assert alone == pytest.approx(100 + PROCESS_OVERHEAD_MB)
    full = estimate_mb(file_bytes, SHAPE, 4096, 2)
    logits = 49152 * 2 * 4 / MB
    assert full == pytest.approx(alone + kv_cache_mb(SHAPE, 4096) + logits, abs=0.1)


def test_a_measured_peak_above_the_estimate_is_what_counts() -> None:
    assert effective_cost_mb(200, None) == 200
    assert effective_cost_mb(200, 150) == 200  # untouched cache pages are not in RSS yet
    assert effective_cost_mb(200, 260) == 260


def test_the_default_budget_is_a_share_of_ram_or_of_free_vram_when_offloading() -> None:
    assert default_budget_mb(1000, [], offloaded=True) == 750  # no GPU: RAM
    assert default_budget_mb(1000, [4000, 2000], offloaded=False) == 750
    assert default_budget_mb(1000, [4000, 2000], offloaded=True) == 5400


def test_a_model_that_fits_loads_without_evicting() -> None:
    plan = plan_room("b", 100, 1000, 3, [resident("a", 300)])
    assert (plan.action, plan.evict) == ("load", ())


def test_the_least_recently_used_idle_model_is_evicted_first() -> None:
    residents = [resident("old", 400, last_used=1), resident("new", 400, last_used=5)]
    plan = plan_room("c", 300, 1000, 3, residents)
    assert (plan.action, plan.evict) == ("load", ("old",))
    bigger = plan_room("c", 700, 1000, 3, residents)
    assert bigger.evict == ("old", "new")


def test_the_model_count_limit_evicts_even_when_memory_is_left() -> None:
    residents = [resident("a", 10, last_used=2), resident("b", 10, last_used=1)]
    plan = plan_room("c", 10, 1000, 2, residents)
    assert plan.evict == ("b",)


def test_a_busy_model_is_never_evicted_the_request_waits() -> None:
    residents = [resident("busy", 800, in_flight=1), resident("idle", 100, last_used=9)]
    plan = plan_room("c", 300, 1000, 3, residents)
    assert plan.action == "wait"
    assert "busy (1 in flight)" in plan.reason
    assert plan.evict == ()  # nothing is unloaded for a load that cannot happen yet


def test_a_loading_model_is_not_evicted() -> None:
    plan = plan_room("c", 300, 1000, 3, [resident("loading", 800, settled=False)])
    assert plan.action == "wait"


def test_a_pinned_model_is_never_evicted_and_blocks_for_good() -> None:
    residents = [resident("pinned", 800, pinned=True, last_used=0), resident("idle", 100)]
    plan = plan_room("c", 300, 1000, 3, residents)
    assert (plan.action, plan.status) == ("refuse", 503)
    assert "pinned" in plan.reason and "POST /models/unload" in plan.reason
    fits = plan_room("c", 150, 1000, 3, residents)
    assert fits.evict == ("idle",)


def test_a_model_alone_over_the_budget_is_refused_with_400_naming_both() -> None:
    plan = plan_room("huge", 1500, 1000, 3, [])
    assert (plan.action, plan.status) == ("refuse", 400)
    assert "1500 MB" in plan.reason and "1000 MB" in plan.reason


def test_the_model_itself_is_not_counted_against_its_own_room() -> None:
    plan = plan_room("a", 600, 1000, 1, [resident("a", 600)])
    assert (plan.action, plan.evict) == ("load", ())


def test_idle_models_past_their_ttl_expire_but_never_busy_pinned_or_ttl_zero() -> None:
    residents = [
        resident("expired", ttl=10, last_used=0),
        resident("recent", ttl=10, last_used=95),
        resident("busy", ttl=10, last_used=0, in_flight=1),
        resident("pinned", ttl=10, last_used=0, pinned=True),
        resident("forever", ttl=0, last_used=0),
    ]
    assert idle_expired(residents, now=100) == ["expired"]
