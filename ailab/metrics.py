"""Observability: the Prometheus metrics the gateway keeps, the ASGI middleware that counts
and times every request, and the one-JSON-line-per-request access log.

The middleware does no parsing: routes put what they know (model, conversation, tokens,
time to first token) into `scope["state"]["metrics"]` via `note()`, and the middleware
reads it when the response ends. Nothing here touches message contents or keys.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SPEED_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
ACCESS_LOG_BYTES = 10 * 1024 * 1024
ACCESS_LOG_BACKUPS = 5
ACCESS_LOG_BATCH_S = 0.25


class Metrics:
    """The gateway's own metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ailab_http_requests",
            "HTTP requests answered",
            ["route", "model", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "ailab_http_request_duration_seconds",
            "Time from request to the end of the response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token_seconds = Histogram(
            "ailab_time_to_first_token_seconds",
            "Time from request to the first streamed token",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "ailab_queue_wait_seconds",
            "Time a request waited for admission (queue place, switch, model load)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "ailab_admission_rejections", "Requests turned away", ["reason"], registry=r
        )
        self.tokens = Counter(
            "ailab_chat_tokens", "Tokens of /chat turns", ["model", "direction"], registry=r
        )
        self.tokens_per_second = Histogram(
            "ailab_chat_generation_tokens_per_second",
            "Generation speed of /chat model calls (llama-server's timings)",
            ["model"],
            buckets=SPEED_BUCKETS,
            registry=r,
        )
        self.tool_calls = Counter(
            "ailab_tool_calls",
            "Tool calls by tool, MCP server (empty for built-ins), decision and outcome",
            ["tool", "server", "decision", "outcome"],
            registry=r,
        )
        self.tool_seconds = Histogram(
            "ailab_tool_duration_seconds",
            "Time a tool call ran",
            ["tool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self.conversations = Gauge("ailab_conversations", "Conversations stored", registry=r)
        self.database_bytes = Gauge(
            "ailab_database_bytes", "Size of the conversation database file", registry=r
        )

    def add_collector(self, collector: Collector) -> None:
        """A collector that reads state at scrape time (models, queue)."""
        self.registry.register(collector)

    def record_tool_call(
        self, tool: str, server: str | None, decision: str, outcome: str, seconds: float
    ) -> None:
        self.tool_calls.labels(tool, server or "", decision, outcome).inc()
        self.tool_seconds.labels(tool).observe(seconds)

    def record_chat_usage(self, model: str, stats: dict[str, Any]) -> None:
        self.tokens.labels(model, "input").inc(stats.get("tokens_input") or 0)
        self.tokens.labels(model, "output").inc(stats.get("tokens_generated") or 0)
        if stats.get("tokens_per_second"):
            self.tokens_per_second.labels(model).observe(stats["tokens_per_second"])


def note(scope: Scope, **facts: Any) -> None:
    """Tell the middleware what the route knows about this request (model, tokens...)."""
    scope.setdefault("state", {}).setdefault("metrics", {}).update(facts)


def first_token(scope: Scope, at: float | None = None) -> None:
    """Mark the first streamed token of this request, now or `at` (`time.perf_counter`);
    only the first mark counts."""
    facts = scope.setdefault("state", {}).setdefault("metrics", {})
    facts.setdefault("first_token_at", at or time.perf_counter())


def _route_of(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class MetricsMiddleware:
    """Counts and times every request, and queues its access-log line when it ends."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: AccessLog) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self._record(scope, status, started, time.perf_counter())

    def _record(self, scope: Scope, status: int, started: float, ended: float) -> None:
        route = _route_of(scope)
        facts = scope.get("state", {}).get("metrics", {})
        model = facts.get("model") or ""
        self.metrics.requests.labels(route, model, str(status)).inc()
        self.metrics.request_seconds.labels(route).observe(ended - started)
        first = facts.get("first_token_at")
        if first is not None:
            self.metrics.first_token_seconds.labels(route, model).observe(first - started)
        if status == 429:
            self.metrics.rejections.labels("overloaded").inc()
        elif status == 503:
            self.metrics.rejections.labels("unavailable").inc()
        self.access_log.write(_access_line(scope, route, status, started, ended, facts))


def _access_line(
    scope: Scope, route: str, status: int, started: float, ended: float, facts: dict[str, Any]
) -> dict[str, Any]:
    line: dict[str, Any] = {
        "time": time.time(),  # formatted by the access log's thread
        "method": scope.get("method"),
        "route": route,
        "status": status,
        "duration_ms": round((ended - started) * 1000, 2),
    }
    if facts.get("first_token_at") is not None:
        line["first_token_ms"] = round((facts["first_token_at"] - started) * 1000, 2)
    for name in ("model", "conversation_id", "tokens_input", "tokens_output", "queue_ms"):
        if facts.get(name) is not None:
            line[name] = facts[name]
    return line


class AccessLog:
    """The access log: JSON lines into a rotating file (and the console if asked). A
    request only queues its line; a thread of its own formats and writes it, so no
    request waits for the disk or pays for the logging machinery. The thread writes what
    gathered over ACCESS_LOG_BATCH_S at once: waking it for every request cost about
    0.1 ms of CPU per request, taken from llama-server's cores."""

    def __init__(self, log_dir: Path, to_console: bool) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self._handlers: list[logging.Handler] = [
            logging.handlers.RotatingFileHandler(
                log_dir / "access.log", maxBytes=ACCESS_LOG_BYTES, backupCount=ACCESS_LOG_BACKUPS
            )
        ]
        if to_console:
            self._handlers.append(logging.StreamHandler())
        self._lines: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_lines, name="access-log", daemon=True)
        self._writer.start()

    def write(self, line: dict[str, Any]) -> None:
        self._lines.put(line)

    def stop(self) -> None:
        """Write what is queued, then close the files."""
        self._lines.put(None)
        self._writer.join()
        for handler in self._handlers:
            handler.close()

    def _write_lines(self) -> None:
        while True:
            batch = [self._lines.get()]  # sleeps until a request ends
            time.sleep(ACCESS_LOG_BATCH_S)  # the requests ending meanwhile join this batch
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._lines.get_nowait())
            lines = [line for line in batch if line is not None]
            if lines:
                self._emit(lines)
            if len(lines) < len(batch):  # stop() was called
                return

    def _emit(self, lines: list[dict[str, Any]]) -> None:
        for line in lines:
            line["time"] = datetime.fromtimestamp(line["time"], UTC).isoformat(
                timespec="milliseconds"
            )
        # One record for the batch: one write and one flush per handler.
        text = "\n".join(json.dumps(line, default=str) for line in lines)
        record = logging.makeLogRecord(
            {"name": "ailab.access", "levelno": logging.INFO, "levelname": "INFO", "msg": text}
        )
        for handler in self._handlers:
            handler.handle(record)


def llama_metrics_text(texts: dict[str, str]) -> str:
    """llama-server's own metrics from each running model, one family at a time with a
    `model` label on every sample (each process reports the same families)."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for model, text in texts.items():
        for family in text_string_to_metric_families(text):
            name = _llama_name(family.name)
            _, _, samples = families.setdefault(name, (family.documentation, family.type, []))
            for sample in family.samples:
                labels = {**sample.labels, "model": model}
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
                samples.append(f"{_llama_name(sample.name)}{{{rendered}}} {sample.value}")
    lines = []
    for name, (documentation, kind, samples) in families.items():
        lines += [f"# HELP {name} {documentation}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(lines) + "\n" if lines else ""


def _llama_name(name: str) -> str:
    # llama-server names its metrics "llamacpp:..."; a colon is for recording rules.
    return "llamacpp_" + name.replace(":", "_").removeprefix("llamacpp_")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


MODEL_STATE = ["model", "state"]
MB = 1024 * 1024


@dataclass(frozen=True)
class ModelFacts:
    """One model instance as the metrics see it."""

    id: str
    state: str
    estimate_mb: float | None
    measured_mb: float | None
    in_flight: int
    loads: int
    last_load_s: float | None
    unloads: dict[str, int]
    restarts: int


@dataclass(frozen=True)
class GatewayState:
    models: list[ModelFacts]
    admitted: int


class StateCollector(Collector):
    """Reads what the gateway holds at scrape time: each model instance's state, memory,
    requests in flight, loads, unloads and restarts, and the admission queue."""

    def __init__(self, read: Callable[[], GatewayState]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        state = self._read()
        families = {
            "state": GaugeMetricFamily(
                "ailab_model_state", "1 for the state a model instance is in", labels=MODEL_STATE
            ),
            "memory": GaugeMetricFamily(
                "ailab_model_memory_bytes",
                "A model instance's memory: the estimate before loading, the measured RSS",
                labels=["model", "kind"],
            ),
            "in_flight": GaugeMetricFamily(
                "ailab_model_requests_in_flight", "Requests a model is serving", labels=["model"]
            ),
            "loads": CounterMetricFamily(
                "ailab_model_loads", "Times a model was loaded", labels=["model"]
            ),
            "load_seconds": GaugeMetricFamily(
                "ailab_model_last_load_seconds", "How long the last load took", labels=["model"]
            ),
            "unloads": CounterMetricFamily(
                "ailab_model_unloads",
                "Times a model was unloaded by the pool, by reason (room, ttl)",
                labels=["model", "reason"],
            ),
            "restarts": CounterMetricFamily(
                "ailab_model_crash_restarts",
                "Times a model's llama-server died and was restarted",
                labels=["model"],
            ),
        }
        for model in state.models:
            for name in ("unloaded", "downloading", "loading", "ready", "unloading", "failed"):
                families["state"].add_metric([model.id, name], float(model.state == name))
            if model.estimate_mb is not None:
                families["memory"].add_metric([model.id, "estimated"], model.estimate_mb * MB)
            if model.measured_mb is not None:
                families["memory"].add_metric([model.id, "measured"], model.measured_mb * MB)
            families["in_flight"].add_metric([model.id], model.in_flight)
            families["loads"].add_metric([model.id], model.loads)
            if model.last_load_s is not None:
                families["load_seconds"].add_metric([model.id], model.last_load_s)
            for reason, count in model.unloads.items():
                families["unloads"].add_metric([model.id, reason], count)
            families["restarts"].add_metric([model.id], model.restarts)
        yield from families.values()
        queue = GaugeMetricFamily(
            "ailab_admission_active", "Requests holding or waiting for an admission place"
        )
        queue.add_metric([], state.admitted)
        yield queue
