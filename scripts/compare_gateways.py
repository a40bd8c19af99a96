#!/usr/bin/env python3
"""Two checkouts' gateways side by side: what a change to the gateway costs or saves.

`make bench` compares the gateway with a bare llama-server, and two runs of it minutes
apart differ by more than a change to the gateway does (on 2 cores the bare figures
themselves move by 20%). This starts a gateway from each checkout at once, each with its
own llama-server (same binary, model and flags), and sends them the same requests in
turn, alternating which goes first, so drift favours neither:

    git worktree add /tmp/before HEAD~1
    .venv/bin/python scripts/compare_gateways.py /tmp/before

It prints, for each side, streamed tokens/s and the gateway's CPU per relayed token over
256-token streams, the p50 of 1-token `/v1` requests and the gateway's CPU per request
(psutil, as `make bench` measures them), and the p50 time to a stream's first token.
Both use this checkout's models.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from ailab import config
from ailab.bench import gateway as bench
from ailab.upstream import binaries

MODEL = "smollm2-135m"
STREAM = {
    "messages": [{"role": "user", "content": bench.LONG_PROMPT}],
    "max_tokens": 256,
    "stream": True,
    "ignore_eos": True,
    "temperature": 0,
}
ONE_TOKEN = {
    "messages": [
        {"role": "system", "content": bench.SYSTEM_PROMPT},
        {"role": "user", "content": bench.USER_PROMPT},
    ],
    "max_tokens": 1,
    "temperature": 0,
}


@dataclass
class Side:
    name: str
    url: str
    process: psutil.Process
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=300))
    rates: list[float] = field(default_factory=list)
    stream_cpu_s: float = 0.0
    tokens: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    ttfts_ms: list[float] = field(default_factory=list)
    request_cpu_s: float = 0.0

    def cpu_s(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def stream(self) -> None:
        before, first, last, tokens = self.cpu_s(), 0.0, 0.0, 0
        with self.client.stream("POST", f"{self.url}/v1/chat/completions", json=STREAM) as reply:
            for line in reply.iter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    choice = (json.loads(line[5:]).get("choices") or [{}])[0]
                    if (choice.get("delta") or {}).get("content"):
                        last = time.perf_counter()
                        first, tokens = first or last, tokens + 1
        self.stream_cpu_s += self.cpu_s() - before
        self.tokens += tokens
        self.rates.append((tokens - 1) / (last - first))

    def first_token(self) -> None:
        started = time.perf_counter()
        body = {**ONE_TOKEN, "max_tokens": 2, "stream": True}
        with self.client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as reply:
            for line in reply.iter_lines():
                if line.startswith("data:") and '"content":"' in line:
                    self.ttfts_ms.append((time.perf_counter() - started) * 1000)
                    break

    def one_token(self) -> None:
        before, started = self.cpu_s(), time.perf_counter()
        self.client.post(f"{self.url}/v1/chat/completions", json=ONE_TOKEN).raise_for_status()
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        self.request_cpu_s += self.cpu_s() - before


def in_turns(sides: list[Side], rounds: int, measure: Callable[[Side], None]) -> None:
    for i in range(rounds):
        for side in sides if i % 2 == 0 else sides[::-1]:
            measure(side)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="a checkout of the commit to compare with")
    parser.add_argument("--streams", type=int, default=12, help="256-token streams per side")
    parser.add_argument("--requests", type=int, default=400, help="1-token requests per side")
    parser.add_argument("--ttft", type=int, default=200, help="time-to-first-token samples")
    args = parser.parse_args()
    settings = config.load_settings()
    binary = binaries.find_llama_server(settings)
    here = Path(__file__).resolve().parent.parent
    with contextlib.ExitStack() as stack:
        sides = []
        # Both use this checkout's models, and have room for one model, as the bench's has.
        env = {"AILAB_MODELS_DIR": str(settings.models_dir), "AILAB_MAX_LOADED_MODELS": "1"}
        for name, tree in (("other", args.other.resolve()), ("this", here)):
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "data"
            url, pid = stack.enter_context(
                bench.started_gateway(binary, MODEL, data_dir, env, checkout=tree)
            )
            sides.append(Side(name, url, psutil.Process(pid)))
        in_turns(sides, 2, Side.stream)  # warm both: prompt caches, first connections
        for side in sides:
            side.rates, side.stream_cpu_s, side.tokens = [], 0.0, 0
        in_turns(sides, args.streams, Side.stream)
        in_turns(sides, args.requests, Side.one_token)
        in_turns(sides, args.ttft, Side.first_token)
    for side in sides:
        print(
            f"{side.name:>5}: {statistics.median(side.rates):6.1f} tok/s, "
            f"{side.stream_cpu_s * 1000 / side.tokens:.3f} ms CPU per relayed token; "
            f"1-token p50 {statistics.median(side.latencies_ms):.2f} ms, "
            f"{side.request_cpu_s * 1000 / len(side.latencies_ms):.3f} ms CPU per request; "
            f"time to first token p50 {statistics.median(side.ttfts_ms):.2f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
