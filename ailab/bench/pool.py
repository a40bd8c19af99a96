"""Model-pool figures for `make bench`: two models alternating request by request while both
are resident against the same alternation with room for one (a swap each time), the cold
load's time to first token through the pool against a bare llama-server start, and each
model's memory estimate against its measured RSS.

A script's phase, never a test: nothing here asserts on time. Every loop is bounded by its
count and by the plan's time limit.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from rich.table import Table

from ailab import config
from ailab.bench import gateway as bench_gateway
from ailab.bench.gateway import (
    READY_TIMEOUT_S,
    TTFT_MAX_TOKENS,
    Bench,
    console,
    free_port,
    llama_command,
    started_gateway,
    stop_process,
    timed_post,
    timed_stream,
    v1_body,
    wait_ready,
)


@dataclass
class PoolRow:
    """One figure measured two ways, each way named."""

    metric: str
    unit: str
    left_label: str
    left: float | None
    right_label: str
    right: float | None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def alternate(client: httpx.Client, url: str, models: tuple[str, str], bench: Bench) -> list[float]:
    """Milliseconds per request, the two models taking turns."""
    deadline = time.monotonic() + bench.plan.series_time_s
    values: list[float] = []
    for i in range(bench.plan.switch_rounds * 2):
        if i >= 2 and time.monotonic() > deadline:
            break
        for model in models:
            values.append(
                timed_post(
                    client, f"{url}/v1/chat/completions", v1_body(TTFT_MAX_TOKENS, model=model)
                )
            )
    return values


def pool_cold_ttft(client: httpx.Client, url: str, model: str) -> float:
    """Unload the model, then time a streamed request to its first token (load included)."""
    reply = client.post(f"{url}/models/unload", json={"model": model})
    reply.raise_for_status()
    body = v1_body(TTFT_MAX_TOKENS, stream=True, model=model)
    return timed_stream(client, f"{url}/v1/chat/completions", body).ttft_ms


def bare_cold_ttft(client: httpx.Client, binary: Path, model: str, log_dir: Path) -> float:
    """Start a bare llama-server with the pool's flags and time its first streamed token."""
    settings = config.load_settings()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (log_dir / f"cold-{model}.log").open("wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            llama_command(binary, settings, model, port), stdout=log, stderr=log
        )
    try:
        wait_ready(f"{url}/health", process, READY_TIMEOUT_S)
        body = v1_body(TTFT_MAX_TOKENS, stream=True)
        first = timed_stream(client, f"{url}/v1/chat/completions", body)
        return (first.first_s - started) * 1000
    finally:
        stop_process(process)


def memory_rows(client: httpx.Client, url: str, models: tuple[str, str]) -> list[PoolRow]:
    listing = {m["key"]: m for m in client.get(f"{url}/models").json()["models"]}
    return [
        PoolRow(
            f"memory of {key}",
            "MB",
            "estimate",
            listing[key]["memory_estimate_mb"],
            "measured RSS",
            listing[key]["memory_measured_mb"],
        )
        for key in models
    ]


def phase_pool(bench: Bench, log_dir: Path) -> list[PoolRow]:
    """Two gateways of our own: both models resident, and room for one model only."""
    if bench.binary is None:
        console.print("[yellow]no llama-server binary: the pool is not measured[/yellow]")
        return []
    models = (bench.model_key, bench.switch_model_key)
    client = bench.gateway_client  # the pool's gateways have no key; a key header is ignored
    resident_env = {"AILAB_PRELOAD": models[1]}
    with started_gateway(bench.binary, models[0], log_dir / "pool-two", resident_env) as (url, _):
        resident = alternate(client, url, models, bench)
        memory = memory_rows(client, url, models)
        pool_cold = [
            pool_cold_ttft(client, url, models[1]) for _ in range(bench.plan.switch_rounds)
        ]
    one_env = {"AILAB_MAX_LOADED_MODELS": "1"}
    with started_gateway(bench.binary, models[0], log_dir / "pool-one", one_env) as (url, _):
        swapping = alternate(client, url, models, bench)
    bare_cold = [
        bare_cold_ttft(client, bench.binary, models[1], log_dir)
        for _ in range(bench.plan.switch_rounds)
    ]
    rows = [
        PoolRow(
            "two models alternating, per request (median)",
            "ms",
            "both resident",
            _median(resident),
            "room for one (swap)",
            _median(swapping),
        ),
        PoolRow(
            f"cold load to first token, {models[1]} (median)",
            "ms",
            "through the pool",
            _median(pool_cold),
            "bare start",
            _median(bare_cold),
        ),
        *memory,
    ]
    bench.raw["pool"] = {
        "resident_ms": resident,
        "swapping_ms": swapping,
        "pool_cold_ttft_ms": pool_cold,
        "bare_cold_ttft_ms": bare_cold,
        "rows": [asdict(row) for row in rows],
    }
    return rows


def print_pool_table(rows: list[PoolRow], title: str = "Model pool") -> None:
    table = Table(title=title)
    for column in ("metric", "unit", "", "value", "", "value"):
        table.add_column(column, justify="right" if column in {"value", "unit"} else "left")
    for row in rows:
        table.add_row(
            row.metric,
            row.unit,
            row.left_label,
            bench_gateway._fmt(row.left),
            row.right_label,
            bench_gateway._fmt(row.right),
        )
    console.print(table)
