"""model_bench against a real llama-server running SmolLM2, and its table formatting."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from conftest import free_port

from ailab import config
from ailab.bench.model_speed import (
    BENCH_MAX_TOKENS,
    BENCH_PROMPTS,
    ModelBenchError,
    ModelBenchResult,
    format_bench_table,
    measure_model,
)
from ailab.storage import Store

TEST_CTX = 2048
# The chat template wraps each prompt in a few role tokens; generous, but finite.
TEMPLATE_TOKENS_PER_PROMPT = 32


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"llama-server exited with {process.returncode} while loading")
        try:
            if httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    pytest.fail(f"llama-server not ready within {timeout_s} s")


@pytest.fixture(scope="module")
def llama_url(llama_server_binary: Path) -> Iterator[str]:
    source = config.get_model_source(config.load_settings(), "smollm2-135m")
    assert source.path is not None and source.chat_template_path is not None
    port = free_port()
    command = [
        str(llama_server_binary),
        "--model", str(source.path),
        "--chat-template-file", str(source.chat_template_path),
        "--host", "127.0.0.1",
        "--port", str(port),
        "-c", str(TEST_CTX),
        "--parallel", "1",
        "--no-webui",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, base_url, timeout_s=60)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _measure(base_url: str) -> ModelBenchResult:
    async with httpx.AsyncClient() as client:
        return await measure_model(client, base_url, "smollm2-135m", 0, TEST_CTX)


@pytest.fixture(scope="module")
def measured(llama_url: str) -> ModelBenchResult:
    return asyncio.run(_measure(llama_url))


def _tokens_in(base_url: str, text: str) -> int:
    response = httpx.post(f"{base_url}/tokenize", json={"content": text}, timeout=10)
    response.raise_for_status()
    return len(response.json()["tokens"])


def test_measure_model_reports_positive_prompt_and_generation_speeds(
    measured: ModelBenchResult,
) -> None:
    assert measured.prompt_tokens_per_second > 0
    assert measured.generation_tokens_per_second > 0
    assert measured.wall_time_s > 0


def test_measure_model_generates_the_fixed_budget_for_every_prompt(
    measured: ModelBenchResult,
) -> None:
    assert measured.generated_tokens == len(BENCH_PROMPTS) * BENCH_MAX_TOKENS


def test_measure_model_processes_every_prompt_token_without_the_cache(
    measured: ModelBenchResult, llama_url: str
) -> None:
    content_tokens = sum(_tokens_in(llama_url, prompt) for prompt in BENCH_PROMPTS)
    assert content_tokens <= measured.prompt_tokens
    assert measured.prompt_tokens <= content_tokens + TEMPLATE_TOKENS_PER_PROMPT * len(
        BENCH_PROMPTS
    )


def test_measure_model_labels_the_result_with_the_given_model_and_settings(
    measured: ModelBenchResult,
) -> None:
    assert (measured.model_key, measured.n_gpu_layers, measured.n_ctx) == (
        "smollm2-135m",
        0,
        TEST_CTX,
    )
    assert measured.timestamp.tzinfo is not None


def test_measure_model_raises_a_clear_error_when_llama_server_is_unreachable() -> None:
    closed_port_url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ModelBenchError, match="did not answer"):
        asyncio.run(_measure(closed_port_url))


def test_a_result_survives_the_store_round_trip(tmp_path: Path) -> None:
    result = _result("smollm2-135m", -1, 100.0, 50.0, datetime(2025, 1, 1, tzinfo=UTC))
    with Store(tmp_path / "bench.sqlite3") as store:
        store.record_benchmark(result.model_dump(mode="json"))
        stored = store.list_benchmarks()
    assert ModelBenchResult.model_validate(stored[0]) == result


def _result(
    key: str, layers: int, pp: float, tg: float, when: datetime | None = None
) -> ModelBenchResult:
    return ModelBenchResult(
        model_key=key,
        n_gpu_layers=layers,
        n_ctx=8192,
        prompt_tokens_per_second=pp,
        generation_tokens_per_second=tg,
        prompt_tokens=300,
        generated_tokens=192,
        wall_time_s=3.0,
        timestamp=when or datetime.now(UTC),
    )


def _row(table: str, model_key: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(model_key))


def test_format_bench_table_lists_model_layers_and_both_speeds() -> None:
    table = format_bench_table([_result("smollm2-135m", -1, 812.34, 95.67)])
    assert table.splitlines()[0].split() == ["model", "layers", "pp", "tok/s", "tg", "tok/s"]
    assert _row(table, "smollm2-135m").split() == ["smollm2-135m", "-1", "812.3", "95.7"]


def test_format_bench_table_shows_change_against_the_latest_previous_run() -> None:
    now = datetime.now(UTC)
    previous = [
        _result("smollm2-135m", -1, 50.0, 50.0, now - timedelta(days=2)),
        _result("smollm2-135m", -1, 100.0, 80.0, now - timedelta(days=1)),
    ]
    table = format_bench_table([_result("smollm2-135m", -1, 110.0, 60.0, now)], previous)
    assert _row(table, "smollm2-135m").split()[-2:] == ["+10.0%", "-25.0%"]


def test_format_bench_table_compares_only_with_the_same_model_and_layers() -> None:
    previous = [
        _result("smollm2-135m", 0, 10.0, 10.0),
        _result("gemma3-270m", -1, 10.0, 10.0),
    ]
    table = format_bench_table([_result("smollm2-135m", -1, 100.0, 50.0)], previous)
    assert "(first run)" in _row(table, "smollm2-135m")
    assert "%" not in _row(table, "smollm2-135m")


def test_format_bench_table_without_previous_results_has_no_change_columns() -> None:
    table = format_bench_table([_result("gemma3-270m", 0, 100.0, 50.0)])
    assert "change" not in table
