"""Measure how fast a model runs on this machine: prompt processing and generation speed.

The gateway's `/command bench` switches to each model in turn, calls `measure_model` against
llama-server directly (the gateway would only add noise) and shows `format_bench_table`.
Prompts, token budget and seed are fixed so that results from different days compare.
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime

import httpx
from pydantic import BaseModel, Field

from ailab.errors import AilabError

BENCH_MAX_TOKENS = 64
BENCH_SEED = 42
BENCH_TIMEOUT_S = 300.0

_LONG_CONTEXT = (
    "A lighthouse keeper kept a logbook for forty years. Each entry noted the weather, the "
    "ships that passed, the state of the lamp and the oil that remained. In winter the "
    "storms came from the north-west and the keeper wrote of waves breaking over the gallery "
    "rail. In summer the entries grew short: calm sea, two fishing boats, lamp trimmed at "
    "dusk. When the light was automated the logbook went to the county archive, where a "
    "historian used it to date the arrival of a new kind of steamship, the last wreck on the "
    "reef and the slow change of the coastline as the dunes moved east. "
)

# Short, medium and long prompts, so prompt processing is measured over more than one size.
BENCH_PROMPTS: tuple[str, ...] = (
    "Write one sentence about the sea.",
    "Explain in simple words why the sky is blue during the day and red at sunset, "
    "and what that tells us about the size of the particles in the air.",
    _LONG_CONTEXT * 3 + "\nSummarise what the logbook recorded and why it was useful.",
)


class ModelBenchError(AilabError):
    """llama-server did not answer a benchmark request usefully; the message says why."""

    status = 502


class ModelBenchResult(BaseModel):
    """One benchmark of one model with one GPU layer setting."""

    model_key: str
    n_gpu_layers: int
    n_ctx: int
    prompt_tokens_per_second: float = Field(description="mean of llama-server prompt_per_second")
    generation_tokens_per_second: float = Field(
        description="mean of llama-server predicted_per_second"
    )
    prompt_tokens: int = Field(description="prompt tokens processed, over all prompts")
    generated_tokens: int = Field(description="tokens generated, over all prompts")
    wall_time_s: float
    timestamp: datetime


def _bench_request(prompt: str, max_tokens: int) -> dict[str, object]:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": BENCH_SEED,
        # Without this a repeated prompt comes from the KV cache and prompt speed means nothing.
        "cache_prompt": False,
        # A fixed number of generated tokens, however early the model would stop.
        "ignore_eos": True,
        "stream": False,
    }


async def _timed_completion(
    client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int
) -> dict[str, float]:
    try:
        response = await client.post(
            url, json=_bench_request(prompt, max_tokens), timeout=BENCH_TIMEOUT_S
        )
    except httpx.HTTPError as exc:
        raise ModelBenchError(f"llama-server at {url} did not answer: {exc}") from exc
    if response.status_code != 200:
        raise ModelBenchError(
            f"llama-server answered {response.status_code} to a benchmark request: "
            f"{response.text[:300]}"
        )
    timings = response.json().get("timings")
    if not isinstance(timings, dict):
        raise ModelBenchError("llama-server's answer carries no 'timings'; is it llama.cpp's?")
    return timings


async def measure_model(
    client: httpx.AsyncClient,
    llama_base_url: str,
    model_key: str,
    n_gpu_layers: int,
    n_ctx: int,
) -> ModelBenchResult:
    """Run BENCH_PROMPTS against the model llama-server has loaded and average its timings.

    `model_key`, `n_gpu_layers` and `n_ctx` only label the result: the caller has already
    loaded that model with those settings.
    """
    url = f"{llama_base_url.rstrip('/')}/v1/chat/completions"
    # The first request after a load pays for page faults and thread start-up; not counted.
    await _timed_completion(client, url, BENCH_PROMPTS[0], 1)
    started = time.perf_counter()
    timings = [await _timed_completion(client, url, p, BENCH_MAX_TOKENS) for p in BENCH_PROMPTS]
    wall_time_s = time.perf_counter() - started
    return ModelBenchResult(
        model_key=model_key,
        n_gpu_layers=n_gpu_layers,
        n_ctx=n_ctx,
        prompt_tokens_per_second=statistics.fmean(t["prompt_per_second"] for t in timings),
        generation_tokens_per_second=statistics.fmean(t["predicted_per_second"] for t in timings),
        prompt_tokens=sum(int(t["prompt_n"]) for t in timings),
        generated_tokens=sum(int(t["predicted_n"]) for t in timings),
        wall_time_s=round(wall_time_s, 3),
        timestamp=datetime.now(UTC),
    )


def _change(now: float, before: float) -> str:
    if before <= 0:
        return "n/a"
    return f"{(now - before) / before * 100:+.1f}%"


def _latest_previous(
    result: ModelBenchResult, previous: list[ModelBenchResult]
) -> ModelBenchResult | None:
    same = [
        p
        for p in previous
        if p.model_key == result.model_key and p.n_gpu_layers == result.n_gpu_layers
    ]
    return max(same, key=lambda p: p.timestamp, default=None)


def format_bench_table(
    results: list[ModelBenchResult], previous: list[ModelBenchResult] | None = None
) -> str:
    """A plain-text table of the results, with the change against the latest earlier run of
    the same model and layer setting when `previous` is given."""
    header = ["model", "layers", "pp tok/s", "tg tok/s"]
    rows: list[list[str]] = []
    for result in results:
        row = [
            result.model_key,
            str(result.n_gpu_layers),
            f"{result.prompt_tokens_per_second:.1f}",
            f"{result.generation_tokens_per_second:.1f}",
        ]
        if previous is not None:
            before = _latest_previous(result, previous)
            row += (
                ["(first run)", ""]
                if before is None
                else [
                    _change(result.prompt_tokens_per_second, before.prompt_tokens_per_second),
                    _change(
                        result.generation_tokens_per_second, before.generation_tokens_per_second
                    ),
                ]
            )
        rows.append(row)
    if previous is not None:
        header += ["pp change", "tg change"]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
