"""RPC figures for `make bench`: the model split across two ggml-rpc-server workers on
loopback against the same model local, through one gateway: streamed tokens per second and
time to first token, so the cost of the RPC hop shows without a network's own.

A script's phase, never a test: nothing here asserts on time. Every series is bounded by
its count and by the plan's time limit (`interleaved`).
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import psutil

from ailab import config
from ailab.bench.gateway import (
    LONG_PROMPT,
    READY_TIMEOUT_S,
    TTFT_MAX_TOKENS,
    Bench,
    console,
    free_port,
    interleaved,
    keyed_client,
    started_gateway,
    stop_process,
    timed_stream,
    v1_body,
)
from ailab.bench.pool import PoolRow

WORKERS = 2


def _listening(port: int) -> bool:
    # A bare connection is safe: the worker reads no command from it and writes nothing.
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


@contextlib.contextmanager
def started_workers(binary: Path, log_dir: Path) -> Iterator[list[str]]:
    """ggml-rpc-server processes on loopback ports; their host:port addresses. Each gets
    the threads a local llama-server takes by default (one per physical core; the workers
    compute their layers one after the other), so the two sides differ by the RPC hop."""
    threads = config.load_settings().n_threads or psutil.cpu_count(logical=False) or 1
    processes: list[subprocess.Popen[bytes]] = []
    addresses: list[str] = []
    try:
        for n in range(WORKERS):
            port = free_port()
            with (log_dir / f"rpc-worker-{n}.log").open("wb") as log:
                command = [str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)]
                processes.append(subprocess.Popen(command, stdout=log, stderr=log))
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not _listening(port):
                if processes[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ggml-rpc-server on port {port} did not start")
                time.sleep(0.05)
            addresses.append(f"127.0.0.1:{port}")
        yield addresses
    finally:
        for process in processes:
            stop_process(process)


def split_entry(model_key: str, workers: list[str]) -> dict[str, object]:
    """The registry entry of `model_key` with its file and template absolute and `rpc` set."""
    settings = config.load_settings()
    entry = dict(config.get_all_models(settings)[model_key])
    source = config.get_model_source(settings, model_key)
    entry.pop("is_finetuned", None)
    entry["filename"] = str(source.path)
    if source.chat_template_path:
        entry["chat_template_file"] = str(source.chat_template_path)
    return {**entry, "rpc": workers}


def phase_rpc(bench: Bench, log_dir: Path) -> list[PoolRow]:
    """One gateway serving the model local and split across the workers, measured in turn."""
    if bench.binary is None:
        console.print("[yellow]no llama-server binary: RPC is not measured[/yellow]")
        return []
    local, split = bench.model_key, f"{bench.model_key}-rpc"
    plan = bench.plan
    rpc_server = bench.binary.parent / "ggml-rpc-server"
    # The gateway below is started without a key (started_gateway drops them).
    with keyed_client(None) as client, started_workers(rpc_server, log_dir) as workers:
        extra = log_dir / "rpc-models.json"
        extra.write_text(json.dumps({split: split_entry(local, workers)}))
        env = {"AILAB_EXTRA_MODELS": str(extra)}
        with started_gateway(bench.binary, local, log_dir / "rpc", env) as (url, _):
            endpoint = f"{url}/v1/chat/completions"
            stream = {
                **v1_body(plan.stream_tokens, stream=True, ignore_eos=True),
                "messages": [{"role": "user", "content": LONG_PROMPT}],
            }

            def rate(model: str) -> float:
                return timed_stream(client, endpoint, {**stream, "model": model}).tokens_per_second

            def ttft(model: str) -> float:
                body = v1_body(TTFT_MAX_TOKENS, stream=True, model=model)
                return timed_stream(client, endpoint, body).ttft_ms

            ttft(split)  # loads it: the load is not what is measured
            local_rates, split_rates = interleaved(
                bench, plan.stream_rounds, lambda: rate(local), lambda: rate(split)
            )
            local_ttft, split_ttft = interleaved(
                bench, plan.ttft_rounds, lambda: ttft(local), lambda: ttft(split)
            )
            placement = next(
                m["placement"] for m in client.get(f"{url}/models").json()["models"]
                if m["key"] == split
            )  # fmt: skip
    where = f"RPC, {WORKERS} workers on loopback"
    rows = [
        PoolRow(
            f"streamed tok/s ({plan.stream_tokens} tokens, median)",
            "tok/s",
            "local",
            statistics.median(local_rates),
            where,
            statistics.median(split_rates),
        ),
        PoolRow(
            "time to first token (median)",
            "ms",
            "local",
            statistics.median(local_ttft),
            where,
            statistics.median(split_ttft),
        ),
    ]
    bench.raw["rpc"] = {
        "workers": WORKERS,
        "placement": placement,
        "local_tok_s": local_rates,
        "rpc_tok_s": split_rates,
        "local_ttft_ms": local_ttft,
        "rpc_ttft_ms": split_ttft,
        "rows": [asdict(row) for row in rows],
    }
    return rows
