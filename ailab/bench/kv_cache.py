"""Saved KV caches for `make bench`: the first turn of a long conversation after its model
was swapped out and back, with the cache restored from disk against recomputed, for
histories of about 500, 2,000 and 4,000 tokens.

Two gateways of our own, each with room for one model: one saves and restores KV caches
(the default), the other has AILAB_KV_CACHE_MB=0. For each history length a conversation is
sent whole in one /chat request, the model is swapped (Gemma loaded, then SmolLM2 again,
both outside the timing), and the next turn is timed. A script's phase, never a test.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

from ailab.bench.gateway import Bench, console, started_gateway

FULL_SIZES = (500, 2000, 4000)
QUICK_SIZES = (500,)
CHARS_PER_TOKEN = 4  # English text in SmolLM2's and Gemma's vocabularies, roughly
PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs at dusk, trimmed the wick, wound the "
    "clockwork that turned the lens, and wrote the weather in the log before the night came. "
)
SIDES = {"restored": {}, "recomputed": {"AILAB_KV_CACHE_MB": "0"}}
# Recomputing 4,000 tokens takes minutes on a busy 2-core machine.
REQUEST_TIMEOUT_S = 900.0
TURN_MAX_TOKENS = 1  # the time is the prompt's: evaluating it, or restoring and evaluating the rest


@dataclass
class KvRow:
    history_tokens: int
    restored_ms: float | None
    recomputed_ms: float | None
    restored_evaluated: int | None
    recomputed_evaluated: int | None

    @property
    def ratio(self) -> float | None:
        if not self.restored_ms or self.recomputed_ms is None:
            return None
        return self.recomputed_ms / self.restored_ms


def history(n_tokens: int) -> list[dict[str, str]]:
    """User and assistant messages of about n_tokens in all, ending with a question (a
    last assistant message would be continued, not answered)."""
    messages: list[dict[str, str]] = []
    per_pair = len(PARAGRAPH) * 2 // CHARS_PER_TOKEN
    for i in range(max(1, n_tokens // per_pair)):
        messages.append({"role": "user", "content": f"Day {i + 1}: what happened?"})
        messages.append({"role": "assistant", "content": PARAGRAPH * 2})
    return [*messages, {"role": "user", "content": "Anything else?"}]


def chat_body(conversation: str, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "conversation_id": conversation,
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": TURN_MAX_TOKENS,
    }


def swap_back(client: httpx.Client, url: str, model: str, other: str) -> None:
    for key in (other, model):
        client.post(f"{url}/models/load", json={"model": key}).raise_for_status()


def first_turn_after_swap(
    client: httpx.Client, url: str, bench: Bench, size: int
) -> tuple[float, int, int]:
    """(ms, history tokens, tokens evaluated) of the turn after a swap-back."""
    conversation = f"kv-{size}"
    built = client.post(f"{url}/chat", json=chat_body(conversation, bench.model_key, history(size)))
    built.raise_for_status()
    swap_back(client, url, bench.model_key, bench.switch_model_key)
    body = chat_body(conversation, bench.model_key, [{"role": "user", "content": "And today?"}])
    started = time.perf_counter()
    reply = client.post(f"{url}/chat", json=body)
    ms = (time.perf_counter() - started) * 1000
    reply.raise_for_status()
    client.delete(f"{url}/conversations/{conversation}").raise_for_status()
    turn = reply.json()
    evaluated = int(turn["tokens_input"]) - int(turn.get("tokens_cached", 0))
    return ms, int(built.json()["tokens_input"]), evaluated


def phase_kv_cache(bench: Bench, log_dir: Path, quick: bool) -> list[KvRow]:
    if bench.binary is None:
        console.print("[yellow]no llama-server binary: KV caches are not measured[/yellow]")
        return []
    sizes = QUICK_SIZES if quick else FULL_SIZES
    measured: dict[str, dict[int, tuple[float, int, int]]] = {}
    for side, env in SIDES.items():
        gateway_env = {"AILAB_MAX_LOADED_MODELS": "1", **env}
        data_dir = log_dir / f"kv-{side}"
        with (
            started_gateway(bench.binary, bench.model_key, data_dir, gateway_env) as (url, _),
            httpx.Client(timeout=REQUEST_TIMEOUT_S) as client,
        ):
            measured[side] = {n: first_turn_after_swap(client, url, bench, n) for n in sizes}
    rows = [
        KvRow(
            history_tokens=measured["restored"][n][1],
            restored_ms=measured["restored"][n][0],
            recomputed_ms=measured["recomputed"][n][0],
            restored_evaluated=measured["restored"][n][2],
            recomputed_evaluated=measured["recomputed"][n][2],
        )
        for n in sizes
    ]
    bench.raw["kv_cache"] = [{**asdict(row), "ratio": row.ratio} for row in rows]
    return rows


def print_kv_table(rows: list[KvRow]) -> None:
    table = Table(title="First turn after a swap-back: KV cache restored vs recomputed")
    for column in ("history tokens", "restored ms", "recomputed ms", "ratio", "evaluated"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row.history_tokens),
            f"{row.restored_ms:.0f}" if row.restored_ms is not None else "-",
            f"{row.recomputed_ms:.0f}" if row.recomputed_ms is not None else "-",
            f"{row.ratio:.1f}x" if row.ratio is not None else "-",
            f"{row.restored_evaluated} vs {row.recomputed_evaluated}",
        )
    console.print(table)
