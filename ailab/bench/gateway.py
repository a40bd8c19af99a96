"""What the gateway costs: the same requests sent to a bare llama-server and to the gateway.

Run with `make bench` (about 3-4 minutes on 2 cores) or `bench/gateway_bench.py --quick`
(about a minute). Starts its own llama-server ("bare") and its own gateway (which starts its
own llama-server with the same flags) on free ports, unless --bare-url / --gateway-url name
running ones. Both llama-servers check an API key given through their environment, as the
gateway's always does; the bench's own gateway runs in the default configuration (loopback,
no gateway key). Requests alternate bare/gateway one by one so that noise hits both alike; the
throughput phase runs bare and gateway one after the other, alternating which goes first.
Prints a table with PASS/MISS against the targets and writes it as JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from ailab import config
from ailab.upstream import binaries

PROJECT_DIR = config.PROJECT_DIR

RESULTS_DIR = PROJECT_DIR / "bench" / "results"
REQUEST_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 120.0
SYSTEM_PROMPT = "You are a helpful assistant."
USER_PROMPT = "Name three primary colours."
LONG_PROMPT = "Write a long story about a lighthouse keeper and the sea."
# Passed to both sides: the gateway's /chat would otherwise apply its own defaults.
SAMPLING: dict[str, Any] = {"temperature": 0, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1}
THROUGHPUT_MAX_TOKENS = 32
TTFT_MAX_TOKENS = 4
MIN_ROUNDS = 3  # a phase cut short by its time limit still gets this many pairs

# Piped output (make bench | tee) would otherwise be squeezed into 80 columns.
console = Console(width=None if sys.stdout.isatty() else 150)
T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """How much to measure. Every series of requests is bounded by its count and stops early
    (after MIN_ROUNDS pairs) once it has run for series_time_s."""

    latency_rounds: int
    ttft_rounds: int
    stream_rounds: int
    stream_tokens: int
    throughput_requests: int
    throughput_rounds: int
    switch_rounds: int
    series_time_s: float


FULL_PLAN = Plan(300, 300, 8, 256, 32, 2, 2, 45.0)
QUICK_PLAN = Plan(15, 8, 1, 128, 8, 1, 1, 12.0)


@dataclass(frozen=True)
class Target:
    kind: Literal["max_delta_ms", "min_ratio", "max_gateway"]
    limit: float

    def describe(self) -> str:
        if self.kind == "max_delta_ms":
            return f"<= +{self.limit:g} ms"
        if self.kind == "min_ratio":
            return f">= {self.limit:.0%} of bare"
        return f"<= {self.limit:g}"

    def met(self, bare: float | None, gateway: float | None) -> bool | None:
        if gateway is None:
            return None
        if self.kind == "max_gateway":
            return gateway <= self.limit
        if bare is None:
            return None
        if self.kind == "max_delta_ms":
            return gateway - bare <= self.limit
        return bare > 0 and gateway / bare >= self.limit


@dataclass
class Row:
    metric: str
    unit: str
    bare: float | None
    gateway: float | None
    target: Target | None = None

    @property
    def ratio(self) -> float | None:
        if self.bare is None or self.gateway is None or self.bare == 0:
            return None
        return self.gateway / self.bare

    @property
    def delta_ms(self) -> float | None:
        if self.unit != "ms" or self.bare is None or self.gateway is None:
            return None
        return self.gateway - self.bare

    @property
    def status(self) -> str | None:
        met = self.target.met(self.bare, self.gateway) if self.target else None
        return None if met is None else ("PASS" if met else "MISS")

    def as_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "unit": self.unit,
            "bare": self.bare,
            "gateway": self.gateway,
            "ratio": self.ratio,
            "delta_ms": self.delta_ms,
            "target": self.target.describe() if self.target else None,
            "status": self.status,
        }


@dataclass
class Bench:
    """Everything the phases share."""

    bare_url: str
    gateway_url: str
    plan: Plan
    model_key: str
    switch_model_key: str
    binary: Path | None
    gateway_process: psutil.Process | None
    bare_key: str | None
    gateway_key: str | None
    bare_client: httpx.Client = field(init=False)
    gateway_client: httpx.Client = field(init=False)
    rows: list[Row] = field(default_factory=list)
    cpu_rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    rss_samples_mb: list[float] = field(default_factory=list)
    pool_rows: list[Any] = field(default_factory=list)  # bench/pool.py's PoolRow
    rpc_rows: list[Any] = field(default_factory=list)  # bench/rpc.py's, PoolRow too
    kv_rows: list[Any] = field(default_factory=list)  # bench/kv_cache.py's KvRow

    def __post_init__(self) -> None:
        self.bare_client = keyed_client(self.bare_key)
        self.gateway_client = keyed_client(self.gateway_key)

    def close(self) -> None:
        self.bare_client.close()
        self.gateway_client.close()

    def sample_rss(self) -> None:
        if self.gateway_process is not None:
            self.rss_samples_mb.append(self.gateway_process.memory_info().rss / 2**20)

    def gateway_cpu_s(self) -> float:
        if self.gateway_process is None:
            return 0.0
        times = self.gateway_process.cpu_times()
        return times.user + times.system


def keyed_client(api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return httpx.Client(timeout=REQUEST_TIMEOUT_S, headers=headers)


# --- process handling ---------------------------------------------------------------


def llama_env(api_key: str) -> dict[str, str]:
    """The environment the gateway gives its llama-server: the key is never an argument."""
    return {**os.environ, "LLAMA_API_KEY": api_key}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def llama_command(binary: Path, settings: config.Settings, model_key: str, port: int) -> list[str]:
    """The command the gateway's supervisor runs, so bare and gateway run the same server."""
    source = config.get_model_source(settings, model_key)
    if source.path is None or not source.path.is_file():
        raise SystemExit(f"model file for {model_key!r} is missing: run `make models`")
    n_ctx = min(settings.n_ctx, source.context_length)
    slots = settings.kv_cache_dir if settings.kv_cache_mb else None
    if slots is not None:
        slots.mkdir(parents=True, exist_ok=True)  # llama-server refuses a missing one
    return binaries.llama_server_command(
        binary, source, source.path, settings=settings, port=port, n_ctx=n_ctx,
        n_gpu_layers=settings.n_gpu_layers, slot_save_path=slots,
    )  # fmt: skip


def wait_ready(url: str, process: subprocess.Popen[bytes] | None, timeout_s: float) -> float:
    """Poll `url` until it answers 200; return the seconds that took."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} at start")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return time.perf_counter() - started
        time.sleep(0.01)
    raise RuntimeError(f"{url} not ready within {timeout_s:.0f} s")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def started_llama(
    binary: Path, settings: config.Settings, model_key: str, log_path: Path, api_key: str
) -> Iterator[str]:
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            llama_command(binary, settings, model_key, port),
            stdout=log,
            stderr=log,
            env=llama_env(api_key),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/health", process, READY_TIMEOUT_S)
        yield url
    finally:
        stop_process(process)


@contextlib.contextmanager
def started_gateway(
    binary: Path,
    model_key: str,
    data_dir: Path,
    extra_env: dict[str, str] | None = None,
    checkout: Path = PROJECT_DIR,
) -> Iterator[tuple[str, int]]:
    """A gateway from `checkout` (another one: scripts/compare_gateways.py), its URL and pid."""
    port = free_port()
    inherited = {
        name: value
        for name, value in os.environ.items()
        if name not in {"AILAB_API_KEYS", "AILAB_API_KEY_FILE"}
    }
    env = {
        **inherited,
        "AILAB_PORT": str(port),
        "AILAB_LLAMA_PORT": str(free_port()),
        "AILAB_DATA_DIR": str(data_dir),
        "LLAMA_SERVER_PATH": str(binary),
        "AILAB_DEFAULT_MODEL": model_key,
        **(extra_env or {}),
    }
    python = PROJECT_DIR / ".venv" / "bin" / "python"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "gateway-bench.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(python if python.exists() else sys.executable), "ai_server.py"],
            cwd=checkout, env=env, stdout=log, stderr=log,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(f"{url}/health", process, READY_TIMEOUT_S)
        except RuntimeError:
            console.print(f"[red]gateway did not start; last log lines:[/red]\n{tail(log_path)}")
            raise
        yield url, process.pid
    finally:
        stop_gateway(url, process)


def stop_gateway(url: str, process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        children = psutil.Process(process.pid).children(recursive=True)
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{url}/shutdown", timeout=5.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(15)
    stop_process(process)
    for child in children:  # a gateway that died uncleanly must not leave llama-server behind
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def pid_listening_on(url: str) -> int | None:
    port = httpx.URL(url).port
    with contextlib.suppress(psutil.AccessDenied):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                return conn.pid
    return None


# --- single requests ----------------------------------------------------------------


def v1_body(max_tokens: int, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT},
        ],
        "max_tokens": max_tokens,
        "stream": stream,
        **SAMPLING,
        **extra,
    }


def chat_body(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    """The gateway's /chat request that reaches llama-server as v1_body(max_tokens)."""
    return {
        "messages": [{"role": "user", "content": USER_PROMPT}],
        "conversation_id": f"bench-{uuid.uuid4().hex}",  # fresh, so history never grows
        "system_prompt": SYSTEM_PROMPT,
        "enable_tools": False,
        "max_tokens": max_tokens,
        "stream": stream,
        **SAMPLING,
    }


def retry_stale(measure: Callable[[], T]) -> T:
    """Measure again when a kept-alive connection turns out closed before any answer.

    llama-server (cpp-httplib) closes a kept-alive connection after a number of requests;
    the client only notices on its next request, which then got no response at all.
    """
    try:
        return measure()
    except httpx.RemoteProtocolError as exc:
        if "without sending a response" not in str(exc):
            raise
    return measure()


def timed_post(client: httpx.Client, url: str, body: dict[str, Any]) -> float:
    return retry_stale(partial(_timed_post, client, url, body))


def _timed_post(client: httpx.Client, url: str, body: dict[str, Any]) -> float:
    """Milliseconds from sending the request to having the whole response."""
    started = time.perf_counter()
    response = client.post(url, json=body)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"POST {url} -> {response.status_code}: {response.text[:300]}")
    return elapsed_ms


@dataclass
class StreamTiming:
    ttft_ms: float
    first_s: float
    last_s: float
    tokens: int

    @property
    def tokens_per_second(self) -> float:
        span = self.last_s - self.first_s
        return (self.tokens - 1) / span if span > 0 and self.tokens > 1 else 0.0


def _content_of(event: str | None, data: dict[str, Any]) -> str:
    """Token text in one SSE message, from llama-server's format or the gateway's /chat."""
    if event is None:
        choices = data.get("choices") or [{}]
        return (choices[0].get("delta") or {}).get("content") or ""
    if event == "error":
        raise RuntimeError(f"stream error: {data.get('error')}")
    return data.get("content") or "" if event == "delta" else ""


def _token_count(data: dict[str, Any]) -> int | None:
    timings = data.get("timings") or {}
    return data.get("tokens_generated") or timings.get("predicted_n")


def timed_stream(client: httpx.Client, url: str, body: dict[str, Any]) -> StreamTiming:
    return retry_stale(partial(_timed_stream, client, url, body))


def _timed_stream(client: httpx.Client, url: str, body: dict[str, Any]) -> StreamTiming:
    """Time to the first content delta, and when the first and last deltas arrived."""
    started = time.perf_counter()
    first = last = 0.0
    deltas, counted, event = 0, None, None
    with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"POST {url} -> {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            data = json.loads(line[5:])
            if _content_of(event, data):
                last = time.perf_counter()
                first = first or last
                deltas += 1
            counted = _token_count(data) or counted
    if not deltas:
        raise RuntimeError(f"POST {url} streamed no content")
    return StreamTiming((first - started) * 1000, first, last, counted or deltas)


# --- measuring ----------------------------------------------------------------------


def percentile(values: list[float], pct: int) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def interleaved(
    bench: Bench, rounds: int, bare: Callable[[], float], gateway: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Alternate which side goes first, so drift and warm caches favour neither."""
    bare_values: list[float] = []
    gateway_values: list[float] = []
    deadline = time.monotonic() + bench.plan.series_time_s
    for i in range(rounds):
        if i >= MIN_ROUNDS and time.monotonic() > deadline:
            break
        pair = [(bare, bare_values), (gateway, gateway_values)]
        for measure, into in pair if i % 2 == 0 else pair[::-1]:
            into.append(measure())
    return bare_values, gateway_values


def latency_rows(
    name: str, bare: list[float], gateway: list[float], target: Target | None
) -> list[Row]:
    return [
        Row(f"{name} p50", "ms", percentile(bare, 50), percentile(gateway, 50), target),
        Row(f"{name} p95", "ms", percentile(bare, 95), percentile(gateway, 95)),
        Row(f"{name} p99", "ms", percentile(bare, 99), percentile(gateway, 99)),
    ]


@contextlib.contextmanager
def gateway_cpu(bench: Bench, label: str, requests: Callable[[], int]) -> Iterator[None]:
    """Record the gateway's own CPU time per request over the block."""
    before = bench.gateway_cpu_s()
    yield
    if bench.gateway_process is not None and requests():
        per_request_ms = (bench.gateway_cpu_s() - before) * 1000 / requests()
        bench.cpu_rows.append(Row(f"gateway CPU per {label} request", "ms", None, per_request_ms))
    bench.sample_rss()


def warm_up(bench: Bench, bare: Callable[[], object], gateway: Callable[[], object]) -> None:
    for _ in range(2):
        bare()
        gateway()


def _non_streamed(
    bench: Bench,
    label: str,
    gateway_url: str,
    make_body: Callable[[int], dict[str, Any]],
    target: Target,
) -> None:
    bare_v1 = f"{bench.bare_url}/v1/chat/completions"

    def bare(max_tokens: int) -> float:
        return timed_post(bench.bare_client, bare_v1, v1_body(max_tokens))

    def gateway(max_tokens: int) -> float:
        return timed_post(bench.gateway_client, gateway_url, make_body(max_tokens))

    warm_up(bench, partial(bare, 16), partial(gateway, 16))
    sent: list[int] = []
    with gateway_cpu(bench, f"non-streamed {label}", lambda: sum(sent)):
        for max_tokens in (1, 16):
            bare_ms, gateway_ms = interleaved(
                bench,
                bench.plan.latency_rounds,
                partial(bare, max_tokens),
                partial(gateway, max_tokens),
            )
            sent.append(len(gateway_ms))
            name = f"{label} max_tokens={max_tokens}"
            bench.raw[name] = {"bare_ms": bare_ms, "gateway_ms": gateway_ms}
            bench.rows += latency_rows(name, bare_ms, gateway_ms, target)


def phase_non_streamed(bench: Bench) -> None:
    _non_streamed(
        bench,
        "/v1/chat/completions",
        f"{bench.gateway_url}/v1/chat/completions",
        v1_body,
        Target("max_delta_ms", 1.0),
    )
    # /chat also keeps the conversation: one transaction per turn, after the answer.
    _non_streamed(
        bench, "/chat", f"{bench.gateway_url}/chat", chat_body, Target("max_delta_ms", 3.0)
    )


def _ttft(
    bench: Bench,
    label: str,
    gateway_url: str,
    make_body: Callable[..., dict[str, Any]],
    target: Target,
) -> None:
    bare_v1 = f"{bench.bare_url}/v1/chat/completions"

    def bare() -> float:
        body = v1_body(TTFT_MAX_TOKENS, stream=True)
        return timed_stream(bench.bare_client, bare_v1, body).ttft_ms

    def gateway() -> float:
        body = make_body(TTFT_MAX_TOKENS, stream=True)
        return timed_stream(bench.gateway_client, gateway_url, body).ttft_ms

    warm_up(bench, bare, gateway)
    bare_ms, gateway_ms = interleaved(bench, bench.plan.ttft_rounds, bare, gateway)
    name = f"TTFT stream {label}"
    bench.raw[name] = {"bare_ms": bare_ms, "gateway_ms": gateway_ms}
    bench.rows += latency_rows(name, bare_ms, gateway_ms, target)[:2]


def phase_metrics_cost(bench: Bench, log_dir: Path) -> None:
    """The gateway with metrics and access log on (the one measured above) against a second
    gateway with AILAB_METRICS=0, same model and flags, request by request. In this row the
    "bare" column is the gateway with metrics off."""
    if bench.binary is None:
        return
    body = v1_body(1)
    on_url = f"{bench.gateway_url}/v1/chat/completions"
    with started_gateway(
        bench.binary, bench.model_key, log_dir / "metrics-off", {"AILAB_METRICS": "0"}
    ) as (off_base, _):
        off_url = f"{off_base}/v1/chat/completions"
        with keyed_client(None) as off_client:

            def metrics_on() -> float:
                return timed_post(bench.gateway_client, on_url, body)

            def metrics_off() -> float:
                return timed_post(off_client, off_url, body)

            warm_up(bench, metrics_off, metrics_on)
            off_ms, on_ms = interleaved(bench, bench.plan.latency_rounds, metrics_off, metrics_on)
    bench.raw["metrics on vs off"] = {"off_ms": off_ms, "on_ms": on_ms}
    bench.rows.append(
        Row(
            "metrics on (gateway) vs off (bare column): /v1 max_tokens=1 p50",
            "ms",
            percentile(off_ms, 50),
            percentile(on_ms, 50),
            Target("max_delta_ms", 0.5),
        )
    )


def phase_ttft(bench: Bench) -> None:
    _ttft(
        bench,
        "/v1/chat/completions",
        f"{bench.gateway_url}/v1/chat/completions",
        v1_body,
        Target("max_delta_ms", 1.5),
    )
    _ttft(bench, "/chat", f"{bench.gateway_url}/chat", chat_body, Target("max_delta_ms", 4.0))
    bench.sample_rss()


def phase_stream_rate(bench: Bench) -> None:
    plan = bench.plan
    body = {
        **v1_body(plan.stream_tokens, stream=True, ignore_eos=True),
        "messages": [{"role": "user", "content": LONG_PROMPT}],
    }
    relayed: list[int] = []  # tokens of each gateway stream
    cpu_spent: list[float] = []  # the gateway's CPU seconds during each of its streams

    def bare() -> float:
        url = f"{bench.bare_url}/v1/chat/completions"
        return timed_stream(bench.bare_client, url, body).tokens_per_second

    def gateway() -> float:
        url = f"{bench.gateway_url}/v1/chat/completions"
        cpu_before = bench.gateway_cpu_s()
        timing = timed_stream(bench.gateway_client, url, body)
        cpu_spent.append(bench.gateway_cpu_s() - cpu_before)
        relayed.append(timing.tokens)
        return timing.tokens_per_second

    with gateway_cpu(bench, f"{plan.stream_tokens}-token stream", lambda: len(relayed)):
        bare_rates, gateway_rates = interleaved(bench, plan.stream_rounds, bare, gateway)
    bench.raw["stream tok/s"] = {"bare": bare_rates, "gateway": gateway_rates}
    bench.rows.append(
        Row(
            f"streamed tok/s ({plan.stream_tokens} tokens)",
            "tok/s",
            statistics.median(bare_rates),
            statistics.median(gateway_rates),
            Target("min_ratio", 0.99),
        )
    )
    if bench.gateway_process is not None and sum(relayed):
        # Over the gateway's streams only (its idle work, a few ms a second, counts too).
        per_token_ms = sum(cpu_spent) * 1000 / sum(relayed)
        bench.cpu_rows.append(
            Row(
                "gateway CPU per relayed token",
                "ms",
                None,
                per_token_ms,
                Target("max_gateway", 0.15),
            )
        )


def throughput_run(
    url: str, api_key: str | None, clients: int, requests_per_client: int, time_limit_s: float
) -> tuple[float, float, float]:
    """Requests done, completion tokens and wall seconds with `clients` concurrent clients.

    Each client stops early (after at least one request) once time_limit_s has passed.
    """
    body = v1_body(THROUGHPUT_MAX_TOKENS, ignore_eos=True)
    deadline = time.monotonic() + time_limit_s

    def client_loop() -> tuple[int, int]:
        done = tokens = 0
        with keyed_client(api_key) as client:
            while done < requests_per_client and (done == 0 or time.monotonic() < deadline):
                response = client.post(f"{url}/v1/chat/completions", json=body)
                response.raise_for_status()
                tokens += response.json()["usage"]["completion_tokens"]
                done += 1
        return done, tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        counts = list(pool.map(lambda _: client_loop(), range(clients)))
    wall = time.perf_counter() - started
    return sum(c[0] for c in counts), sum(c[1] for c in counts), wall


def phase_throughput(bench: Bench) -> None:
    plan = bench.plan
    for clients in (1, 4, 8):
        per_client = max(2, plan.throughput_requests // clients)
        totals = {"bare": [0.0, 0.0, 0.0], "gateway": [0.0, 0.0, 0.0]}
        sides = [
            ("bare", bench.bare_url, bench.bare_key),
            ("gateway", bench.gateway_url, bench.gateway_key),
        ]
        for round_ in range(plan.throughput_rounds):
            for side, url, key in sides if round_ % 2 == 0 else sides[::-1]:
                run = throughput_run(url, key, clients, per_client, plan.series_time_s)
                totals[side] = [a + b for a, b in zip(totals[side], run, strict=True)]
        bare, gw = totals["bare"], totals["gateway"]
        bench.raw[f"throughput {clients} clients"] = totals
        target = Target("min_ratio", 0.98) if clients == 8 else None
        bench.rows += [
            Row(f"throughput {clients} clients", "req/s", bare[0] / bare[2], gw[0] / gw[2], target),
            Row(f"throughput {clients} clients", "tok/s", bare[1] / bare[2], gw[1] / gw[2], target),
        ]
        bench.sample_rss()


def switch_gateway(bench: Bench, model_key: str) -> float:
    url = f"{bench.gateway_url}/model/switch"
    return timed_post(bench.gateway_client, url, {"model_key": model_key})


def start_bare(bench: Bench, model_key: str, log_dir: Path) -> float:
    """Milliseconds from starting a fresh llama-server to its first 200 on /health."""
    assert bench.binary is not None
    settings = config.load_settings()
    port = free_port()
    with (log_dir / f"start-{model_key}.log").open("wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            llama_command(bench.binary, settings, model_key, port),
            stdout=log,
            stderr=log,
            env=llama_env(secrets.token_urlsafe(32)),
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", process, READY_TIMEOUT_S)
        return (time.perf_counter() - started) * 1000
    finally:
        stop_process(process)


def phase_switch(bench: Bench, log_dir: Path) -> None:
    if bench.binary is None:
        console.print("[yellow]no llama-server binary: model switch not measured[/yellow]")
        return
    there, back = bench.switch_model_key, bench.model_key
    results: dict[str, dict[str, list[float]]] = {
        key: {"bare_ms": [], "gateway_ms": []} for key in (there, back)
    }
    for _ in range(bench.plan.switch_rounds):
        for key in (there, back):
            results[key]["gateway_ms"].append(switch_gateway(bench, key))
            results[key]["bare_ms"].append(start_bare(bench, key, log_dir))
    bench.raw["model switch"] = results
    for key, values in results.items():
        bench.rows.append(
            Row(
                f"switch to {key} (bare: cold start)",
                "ms",
                statistics.median(values["bare_ms"]),
                statistics.median(values["gateway_ms"]),
                Target("max_delta_ms", 150.0),
            )
        )
    bench.sample_rss()


def memory_rows(bench: Bench) -> None:
    if bench.gateway_process is None:
        console.print("[yellow]gateway pid unknown: memory and CPU not measured[/yellow]")
        return
    bench.rows += bench.cpu_rows
    peak_rss = max(bench.rss_samples_mb)
    bench.rows.append(Row("gateway RSS (peak)", "MB", None, peak_rss, Target("max_gateway", 120)))
    bare_pid = pid_listening_on(bench.bare_url)
    children = bench.gateway_process.children(recursive=True)
    llama_children = [p for p in children if "llama-server" in p.name()]
    if bare_pid and llama_children:
        bench.rows.append(
            Row(
                "llama-server RSS (sanity: same model)",
                "MB",
                psutil.Process(bare_pid).memory_info().rss / 2**20,
                llama_children[0].memory_info().rss / 2**20,
            )
        )


# --- reporting ----------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits if abs(value) >= 1 else max(digits, 3)}f}"  # CPU per token


def print_table(rows: list[Row], title: str) -> None:
    table = Table(title=title)
    for column in ("metric", "unit", "bare", "gateway", "gw/bare", "delta ms", "target", ""):
        table.add_column(column, justify="left" if column in {"metric", "target"} else "right")
    for row in rows:
        status = row.status or ""
        colour = {"PASS": "green", "MISS": "red"}.get(status, "white")
        table.add_row(
            row.metric,
            row.unit,
            _fmt(row.bare),
            _fmt(row.gateway),
            _fmt(row.ratio, 3),
            _fmt(row.delta_ms, 2),
            row.target.describe() if row.target else "",
            f"[{colour}]{status}[/{colour}]",
        )
    console.print(table)


def warn_if_busy() -> float:
    """The 1-minute load average before we start anything; warn when others use the CPU."""
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) / 2:
        console.print(
            f"[yellow]load average {load:.1f} on {os.cpu_count()} CPUs: other processes are "
            "busy, so figures will be noisy (llama.cpp threads slow down badly when the "
            "CPU is oversubscribed)[/yellow]"
        )
    return load


def machine_info() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_total_mb": round(psutil.virtual_memory().total / 2**20),
    }


def llama_version(binary: Path | None) -> str | None:
    if binary is None:
        return None
    result = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    return (result.stdout + result.stderr).strip() or None


def write_json(bench: Bench, started: datetime, quick: bool, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    payload = {
        "timestamp": started.isoformat(),
        "quick": quick,
        "plan": asdict(bench.plan),
        "model": bench.model_key,
        "switch_model": bench.switch_model_key,
        "llama_cpp_version": llama_version(bench.binary),
        "machine": machine_info(),
        "bare_url": bench.bare_url,
        "gateway_url": bench.gateway_url,
        "rows": [row.as_json() for row in bench.rows],
        "raw": bench.raw,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# --- main ---------------------------------------------------------------------------

# The phases `--skip` and `--only` name, in the order they run.
PHASE_GROUPS = ("proxy", "switch", "pool", "kv", "lora", "remote", "rpc")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about one minute, fewer samples")
    parser.add_argument("--bare-url", help="use this running llama-server instead of one's own")
    parser.add_argument("--bare-key", help="API key of the llama-server named by --bare-url")
    parser.add_argument("--gateway-url", help="use this running gateway instead of one's own")
    parser.add_argument("--gateway-key", help="API key of the gateway named by --gateway-url")
    parser.add_argument("--model", default="smollm2-135m", help="model key for both sides")
    parser.add_argument("--switch-model", default="gemma3-270m", help="model key to switch to")
    parser.add_argument("--llama-server", type=Path, help="llama-server binary to use")
    parser.add_argument(
        "--skip", nargs="+", default=[], choices=PHASE_GROUPS, help="phases to leave out"
    )
    parser.add_argument(
        "--only", nargs="+", default=[], choices=PHASE_GROUPS, help="run only these phases"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    return parser.parse_args(argv)


def run_phases(bench: Bench, args: argparse.Namespace, log_dir: Path) -> None:
    from ailab.bench.kv_cache import phase_kv_cache
    from ailab.bench.lora import phase_lora
    from ailab.bench.pool import phase_pool
    from ailab.bench.remote import phase_remote
    from ailab.bench.rpc import phase_rpc

    groups: dict[str, list[tuple[str, Callable[[], None]]]] = {
        "proxy": [
            ("non-streamed latency", lambda: phase_non_streamed(bench)),
            ("time to first token", lambda: phase_ttft(bench)),
            ("streamed tokens/s", lambda: phase_stream_rate(bench)),
            ("throughput", lambda: phase_throughput(bench)),
            ("metrics on vs off", lambda: phase_metrics_cost(bench, log_dir)),
        ],
        "switch": [("model switch", lambda: phase_switch(bench, log_dir))],
        "pool": [("model pool", lambda: bench.pool_rows.extend(phase_pool(bench, log_dir)))],
        "kv": [
            (
                "KV cache",
                lambda: bench.kv_rows.extend(phase_kv_cache(bench, log_dir, args.quick)),
            )
        ],
        "lora": [("LoRA switch", lambda: bench.pool_rows.extend(phase_lora(bench, log_dir)))],
        "remote": [("remote upstream", lambda: phase_remote(bench, log_dir))],
        "rpc": [("RPC workers", lambda: bench.rpc_rows.extend(phase_rpc(bench, log_dir)))],
    }
    chosen = args.only or [group for group in PHASE_GROUPS if group not in args.skip]
    phases = [phase for group in PHASE_GROUPS if group in chosen for phase in groups[group]]
    for name, phase in phases:
        started = time.perf_counter()
        with console.status(f"measuring {name}..."):
            phase()
        console.print(f"{name}: {time.perf_counter() - started:.1f} s")
    memory_rows(bench)


def start_sides(
    args: argparse.Namespace,
    binary: Path | None,
    bare_key: str | None,
    stack: contextlib.ExitStack,
    log_dir: Path,
) -> tuple[str, str, int | None]:
    """Bare and gateway URLs (started here unless given) and the gateway's pid if known."""
    settings = config.load_settings()
    if args.bare_url:
        bare_url = args.bare_url.rstrip("/")
    else:
        assert binary is not None and bare_key is not None
        bare_url = stack.enter_context(
            started_llama(binary, settings, args.model, log_dir / "bare.log", bare_key)
        )
    if args.gateway_url:
        return bare_url, args.gateway_url.rstrip("/"), pid_listening_on(args.gateway_url)
    assert binary is not None
    # Room for one model: the switch phase measures a swap against a bare cold start, as
    # before the pool (with room for two, a switch back would find the model loaded).
    one_model = {"AILAB_MAX_LOADED_MODELS": "1"}
    gateway_url, pid = stack.enter_context(
        started_gateway(binary, args.model, log_dir / "data", one_model)
    )
    return bare_url, gateway_url, pid


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    binary = args.llama_server
    if binary is None and not (args.bare_url and args.gateway_url):
        try:
            binary = binaries.find_llama_server(config.load_settings())
        except config.ConfigError as exc:
            raise SystemExit(f"{exc} (or pass --llama-server)") from None
    started_at = datetime.now(UTC)
    load_before = warn_if_busy()
    with tempfile.TemporaryDirectory(prefix="ailab-bench-") as tmp, contextlib.ExitStack() as stack:
        log_dir = Path(tmp)
        bare_key = args.bare_key if args.bare_url else secrets.token_urlsafe(32)
        bare_url, gateway_url, pid = start_sides(args, binary, bare_key, stack, log_dir)
        bench = Bench(
            bare_url=bare_url,
            gateway_url=gateway_url,
            plan=QUICK_PLAN if args.quick else FULL_PLAN,
            model_key=args.model,
            switch_model_key=args.switch_model,
            binary=binary,
            gateway_process=psutil.Process(pid) if pid else None,
            bare_key=bare_key,
            gateway_key=args.gateway_key,
        )
        stack.callback(bench.close)
        bench.sample_rss()
        run_phases(bench, args, log_dir)
        bench.raw["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    from ailab.bench.kv_cache import print_kv_table
    from ailab.bench.pool import print_pool_table

    print_table(bench.rows, f"AI Lab gateway vs bare llama-server ({args.model})")
    if bench.pool_rows:
        print_pool_table(bench.pool_rows)
    if bench.rpc_rows:
        print_pool_table(bench.rpc_rows, f"RPC workers ({args.model})")
    if bench.kv_rows:
        print_kv_table(bench.kv_rows)
    path = write_json(bench, started_at, args.quick, args.out)
    console.print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: bench/pool.py imports it, and the
    # two would otherwise be two modules with two consoles.
    from ailab.bench import gateway

    sys.exit(gateway.main())
