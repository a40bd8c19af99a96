"""Saved KV caches with the real llama-server and the real models: a conversation's cache
survives a swap to another model and a gateway restart, a /v1 client's too, and a damaged
file is detected and recomputed. Greedy answers are compared like with like: a turn served
from a restored cache against the same turn on a gateway whose cache was never lost."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import GatewayProcess

from ailab.config import AdapterFile, ConfigError, ModelSource, get_model_source, load_settings
from ailab.upstream.kv_cache import MB, Entry, KvCache
from ailab.upstream.pool import ModelPool, Purpose

pytestmark = pytest.mark.timeout(900)  # several gateways and a model swap each
SMOL, GEMMA = "smollm2-135m", "gemma3-270m"
SYSTEM = "You are a helpful assistant. Answer in one short sentence."
QUESTIONS = [
    "What colour is the sky on a clear day?",
    "Why does it look that colour?",
    "And at sunset?",
    "Name one planet with a thin atmosphere.",
    "What is its colour?",
]
GREEDY = {"temperature": 0, "max_tokens": 16}
ONE_MODEL = {"AILAB_MAX_LOADED_MODELS": "1"}


def chat(server: GatewayProcess, conversation: str, content: str, **extra: Any) -> dict:
    body = {
        "conversation_id": conversation,
        "messages": [{"role": "user", "content": content}],
        "model": SMOL,
        "system_prompt": SYSTEM,
        **GREEDY,
        **extra,
    }
    reply = requests.post(f"{server.url}/chat", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()


def kv_status(server: GatewayProcess) -> dict:
    return requests.get(f"{server.url}/health", timeout=10).json()["kv_cache"]


def swap_to_gemma_and_back(server: GatewayProcess) -> None:
    """With room for one model, loading Gemma stops SmolLM2 (its slots are saved first)."""
    for model in (GEMMA, SMOL):
        reply = requests.post(f"{server.url}/models/load", json={"model": model}, timeout=300)
        assert reply.status_code == 200, reply.text


def index(server: GatewayProcess) -> list[dict]:
    path = server.data_dir / "kv-cache" / "index.json"
    return json.loads(path.read_text())["entries"]


def restart(server: GatewayProcess) -> None:
    server.stop()  # SIGTERM: the gateway shuts down, saving every slot first
    server.start()


def assert_same_turn(restored: dict, kept: dict, previous_input: int) -> None:
    """The same answer from the same cached prefix, and nothing before the new message
    evaluated again."""
    assert restored["response"] == kept["response"]
    assert restored["tokens_input"] == kept["tokens_input"]
    assert restored["tokens_cached"] == kept["tokens_cached"]
    assert restored["tokens_cached"] >= previous_input


def test_a_conversation_keeps_its_kv_cache_across_a_swap_and_a_restart(make_gateway) -> None:  # type: ignore[no-untyped-def]
    kept: GatewayProcess = make_gateway()  # never loses its cache: the reference
    swapped: GatewayProcess = make_gateway(ONE_MODEL)
    for question in QUESTIONS[:3]:
        previous = chat(kept, "c", question)
        assert chat(swapped, "c", question)["response"] == previous["response"]

    swap_to_gemma_and_back(swapped)
    assert [e["owner"] for e in index(swapped)] == ["c"]
    after_swap = chat(swapped, "c", QUESTIONS[3])
    reference = chat(kept, "c", QUESTIONS[3])
    assert_same_turn(after_swap, reference, previous["tokens_input"])
    assert kv_status(swapped)["restored"] == 1

    restart(swapped)
    after_restart = chat(swapped, "c", QUESTIONS[4])
    assert_same_turn(after_restart, chat(kept, "c", QUESTIONS[4]), reference["tokens_input"])
    status = kv_status(swapped)
    assert status["restored"] == 1 and status["rejected"] == 0 and status["used_mb"] > 0

    reply = requests.delete(f"{swapped.url}/conversations/c", timeout=30)
    assert reply.status_code == 200
    assert index(swapped) == []
    swapped.stop()  # its slot was emptied too: nothing of it is saved again
    assert index(swapped) == []
    assert not list((swapped.data_dir / "kv-cache").glob("*.bin"))


def test_alternating_conversations_each_keep_their_cache(gateway: GatewayProcess) -> None:
    first = {
        c: chat(gateway, c, QUESTIONS[0], system_prompt=f"{SYSTEM} ({c})") for c in ("kv-a", "kv-b")
    }
    for c in first:  # each conversation's slot still holds its first turn
        second = chat(gateway, c, QUESTIONS[1], system_prompt=f"{SYSTEM} ({c})")
        assert second["tokens_cached"] >= first[c]["tokens_input"]


def v1_turn(server: GatewayProcess, messages: list[dict]) -> dict:
    body = {"model": SMOL, "messages": messages, **GREEDY}
    reply = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_v1_client_sending_its_history_keeps_its_cache_across_a_swap(make_gateway) -> None:  # type: ignore[no-untyped-def]
    kept: GatewayProcess = make_gateway()
    swapped: GatewayProcess = make_gateway(ONE_MODEL)
    histories: dict[str, list[dict]] = {"kept": [], "swapped": []}
    servers = {"kept": kept, "swapped": swapped}
    answers: dict[str, dict] = {}
    for n, question in enumerate(QUESTIONS[:3]):
        if n == 2:
            swap_to_gemma_and_back(swapped)
        for name, server in servers.items():
            messages = histories[name]
            messages.append({"role": "user", "content": question})
            answers[name] = v1_turn(server, [{"role": "system", "content": SYSTEM}, *messages])
            messages.append(answers[name]["choices"][0]["message"])
            if n == 1:
                before_swap = answers[name]["usage"]["prompt_tokens"]

    restored, reference = answers["swapped"], answers["kept"]
    assert restored["choices"][0]["message"] == reference["choices"][0]["message"]
    assert restored["timings"]["prompt_n"] == reference["timings"]["prompt_n"]
    assert restored["timings"]["cache_n"] >= before_swap
    assert kv_status(swapped)["restored"] == 1


def test_a_damaged_cache_file_is_detected_and_the_turn_recomputed(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway()
    for question in QUESTIONS[:2]:
        chat(server, "flipped", question)
        chat(server, "truncated", question, system_prompt=SYSTEM + " Be kind.")
    histories = {
        c: requests.get(f"{server.url}/conversations/{c}", timeout=10).json()["messages"]
        for c in ("flipped", "truncated")
    }
    server.stop()
    files = {e["owner"]: server.data_dir / "kv-cache" / e["file"] for e in index(server)}
    data = bytearray(files["flipped"].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of KV data: llama-server would load it
    files["flipped"].write_bytes(bytes(data))
    with files["truncated"].open("r+b") as handle:
        handle.truncate(files["truncated"].stat().st_size // 2)

    server.start()
    answers = {
        "flipped": chat(server, "flipped", QUESTIONS[2]),
        "truncated": chat(server, "truncated", QUESTIONS[2], system_prompt=SYSTEM + " Be kind."),
    }
    status = kv_status(server)
    assert status["rejected"] == 2 and status["restored"] == 0
    assert all(answer["tokens_cached"] == 0 for answer in answers.values())
    assert not files["flipped"].exists() and not files["truncated"].exists()

    # The right answer: the same history recomputed by a gateway that never saved anything.
    fresh: GatewayProcess = make_gateway()
    for conversation, answer in answers.items():
        system = SYSTEM + (" Be kind." if conversation == "truncated" else "")
        history = [{k: m[k] for k in ("role", "content")} for m in histories[conversation]]
        body = {
            "conversation_id": conversation,
            "messages": [*history, {"role": "user", "content": QUESTIONS[2]}],
            "model": SMOL,
            "system_prompt": system,
            **GREEDY,
        }
        reply = requests.post(f"{fresh.url}/chat", json=body, timeout=300)
        assert reply.status_code == 200, reply.text
        assert reply.json()["response"] == answer["response"]
        assert reply.json()["tokens_input"] == answer["tokens_input"]


# --- the disk budget and the setting (no model needed) --------------------------------


def _entry(directory: Path, name: str, size_mb: float, last_used: float) -> Entry:
    (directory / name).write_bytes(b"\0" * int(size_mb * MB))
    return Entry(name, "chat", name, SMOL, "id", 10, int(size_mb * MB), "sha", last_used)


def test_the_least_recently_used_files_go_first_past_the_budget(tmp_path: Path) -> None:
    settings = load_settings({"AILAB_DATA_DIR": str(tmp_path), "AILAB_KV_CACHE_MB": "2.5"})

    async def scenario() -> tuple[list[str], list[str]]:
        cache = KvCache(settings)
        await cache.start()
        now = time.time()
        for name, age in (("old.bin", 30), ("middle.bin", 20), ("new.bin", 10)):
            cache.entries[name] = _entry(settings.kv_cache_dir, name, 1.0, now - age)
        await cache._trim_and_write()
        again = KvCache(settings)  # what the index on disk says after a restart
        await again.start()
        return sorted(cache.entries), sorted(again.entries)

    kept, after_restart = asyncio.run(scenario())
    assert kept == after_restart == ["middle.bin", "new.bin"]
    assert not (settings.kv_cache_dir / "old.bin").exists()


def test_zero_turns_saving_off_and_a_negative_budget_is_refused(tmp_path: Path) -> None:
    off = load_settings({"AILAB_DATA_DIR": str(tmp_path), "AILAB_KV_CACHE_MB": "0"})
    assert KvCache(off).status()["enabled"] is False
    with pytest.raises(ConfigError, match="AILAB_KV_CACHE_MB"):
        load_settings({"AILAB_DATA_DIR": str(tmp_path), "AILAB_KV_CACHE_MB": "-1"})


def test_only_local_generation_slots_without_adapters_are_pinned_and_kept(tmp_path: Path) -> None:
    """A LoRA base's slot holds KV computed under some adapter's scales, a remote upstream's
    cache lives on its own machine: neither is pinned, saved or restored."""
    settings = load_settings({"AILAB_DATA_DIR": str(tmp_path)})
    base = get_model_source(settings, SMOL)
    adapter = AdapterFile(key="smol-lora", path=tmp_path / "smol-lora.gguf", stamp=(1, 1))
    with_adapter = base.model_copy(update={"key": "smol-with-lora", "adapters": (adapter,)})
    remote = ModelSource(kind="remote", key="far", name="far", url="http://127.0.0.1:9")

    async def fields_for(source: ModelSource, purpose: Purpose) -> dict[str, Any]:
        pool = ModelPool(settings, Path("/bin/true"), "key")
        cache = KvCache(settings)
        try:
            async with cache.hold(pool.instance(source, purpose), "c1", {}) as fields:
                return fields
        finally:
            await pool.close()

    assert asyncio.run(fields_for(base, "generate")) == {"id_slot": 0}
    assert asyncio.run(fields_for(with_adapter, "generate")) == {}
    assert asyncio.run(fields_for(remote, "generate")) == {}
    assert asyncio.run(fields_for(base, "embed")) == {}
