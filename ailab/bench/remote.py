"""Remote-upstream figures for `make bench`: the bench's bare llama-server registered as a
remote upstream (with its key) in a gateway of the bench's own, and the same requests sent
to it directly and through that gateway, alternating. The difference is what routing a
model to another machine through AI Lab adds (on loopback: the gateway's hop alone).

A script's phase, never a test: nothing here asserts on time. Every loop is bounded by its
count and by the plan's time limit.
"""

from __future__ import annotations

import json
from pathlib import Path

from ailab.bench.gateway import (
    TTFT_MAX_TOKENS,
    Bench,
    console,
    interleaved,
    keyed_client,
    latency_rows,
    started_gateway,
    timed_post,
    timed_stream,
    v1_body,
    warm_up,
)

REMOTE_KEY = "bench-remote"  # the remote upstream's key in the bench gateway's registry


def _registry(bench: Bench, log_dir: Path) -> Path:
    entry: dict[str, object] = {"url": bench.bare_url}
    if bench.bare_key:
        entry["api_key"] = bench.bare_key
    path = log_dir / "remote-models.json"
    path.write_text(json.dumps({REMOTE_KEY: entry}))
    return path


def phase_remote(bench: Bench, log_dir: Path) -> None:
    """Non-streamed latency and time to first token, direct against through the gateway;
    the "bare" column is the direct call."""
    if bench.binary is None:
        console.print("[yellow]no llama-server binary: the remote upstream is not measured")
        return
    env = {"AILAB_EXTRA_MODELS": str(_registry(bench, log_dir))}
    direct_url = f"{bench.bare_url}/v1/chat/completions"
    with (
        started_gateway(bench.binary, bench.model_key, log_dir / "remote", env) as (url, _),
        keyed_client(None) as client,
    ):
        via_url = f"{url}/v1/chat/completions"

        def direct() -> float:
            return timed_post(bench.bare_client, direct_url, v1_body(TTFT_MAX_TOKENS))

        def via() -> float:
            return timed_post(client, via_url, v1_body(TTFT_MAX_TOKENS, model=REMOTE_KEY))

        def direct_ttft() -> float:
            body = v1_body(TTFT_MAX_TOKENS, stream=True)
            return timed_stream(bench.bare_client, direct_url, body).ttft_ms

        def via_ttft() -> float:
            body = v1_body(TTFT_MAX_TOKENS, stream=True, model=REMOTE_KEY)
            return timed_stream(client, via_url, body).ttft_ms

        warm_up(bench, direct, via)
        latency = interleaved(bench, bench.plan.latency_rounds, direct, via)
        ttft = interleaved(bench, bench.plan.ttft_rounds, direct_ttft, via_ttft)
    bench.raw["remote upstream"] = {
        "direct_ms": latency[0],
        "through_gateway_ms": latency[1],
        "direct_ttft_ms": ttft[0],
        "through_gateway_ttft_ms": ttft[1],
    }
    bench.rows += latency_rows("remote upstream, non-streamed", *latency, None)[:2]
    bench.rows += latency_rows("remote upstream, TTFT stream", *ttft, None)[:2]
