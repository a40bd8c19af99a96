"""`POST /command`: one small handler per command, looked up in a table.

A handler takes the gateway, the value (None means "get") and the conversation id, and
returns (message, value). A bad value raises CommandError, which becomes a 400.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from ailab import tools
from ailab.agent.token_budget import message_text
from ailab.api import security
from ailab.bench import model_speed as model_bench
from ailab.errors import BadRequest
from ailab.finetune.service import gather_records
from ailab.finetune.spec import parse_spec
from ailab.gateway import Gateway
from ailab.mcp.config import McpConfigError
from ailab.storage import AuditRecord

log = logging.getLogger("ailab.commands")

CommandResult = tuple[str, Any]
Handler = Callable[[Gateway, str | None, str], Awaitable[CommandResult]]


class CommandError(BadRequest):
    """A command got a value it cannot use; the message says what is accepted."""


def _parse_int(value: str, what: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise CommandError(f"{what} must be an integer, got {value!r}") from None
    if number < minimum:
        raise CommandError(f"{what} must be at least {minimum}, got {number}")
    return number


async def system_command(gw: Gateway, value: str | None, _: str) -> CommandResult:
    if value is None:
        return f"System prompt: {gw.system_prompt}", gw.system_prompt
    if not value.strip():
        raise CommandError("the system prompt cannot be empty")
    gw.system_prompt = value
    await gw.store.set_setting("system_prompt", value)
    return "System prompt updated", value


async def layers_command(gw: Gateway, value: str | None, _: str) -> CommandResult:
    if value is None:
        layers = gw.manager.n_gpu_layers
        return f"GPU layers: {layers} ({gw.manager.device})", layers
    layers = _parse_int(value, "layers", -1)
    await gw.restart_llama(n_gpu_layers=layers)
    return f"GPU layers set to {layers}; llama-server restarted ({gw.manager.device})", layers


async def ctx_command(gw: Gateway, value: str | None, _: str) -> CommandResult:
    if value is None:
        return f"Context size: {gw.manager.n_ctx} tokens", gw.manager.n_ctx
    size = _parse_int(value, "ctx", 256)
    await gw.restart_llama(n_ctx_limit=size)
    return f"Context size set to {gw.manager.n_ctx}; llama-server restarted", gw.manager.n_ctx


def _memory_snapshot(llama_pid: int | None, gpu_in_use: bool) -> dict[str, Any]:
    mb = 1024 * 1024
    llama_rss = None
    if llama_pid:
        try:
            llama_rss = round(psutil.Process(llama_pid).memory_info().rss / mb, 1)
        except psutil.Error:
            llama_rss = None
    system = psutil.virtual_memory()
    return {
        "gateway_rss_mb": round(psutil.Process(os.getpid()).memory_info().rss / mb, 1),
        "llama_rss_mb": llama_rss,
        "system_total_mb": round(system.total / mb),
        "system_available_mb": round(system.available / mb),
        "gpu": _gpu_memory() if gpu_in_use else None,
    }


def _gpu_memory() -> list[dict[str, Any]] | None:
    """Used and total memory per NVIDIA GPU from nvidia-smi; None where it cannot say."""
    if not shutil.which("nvidia-smi"):
        return None
    query = [
        "nvidia-smi",
        "--query-gpu=name,memory.used,memory.total",
        "--format=csv,noheader,nounits",
    ]
    try:
        output = subprocess.run(query, capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = []
    for line in output.strip().splitlines():
        name, used, total = (part.strip() for part in line.rsplit(",", 2))
        gpus.append({"name": name, "used_mb": int(used), "total_mb": int(total)})
    return gpus


async def mem_command(gw: Gateway, value: str | None, _: str) -> CommandResult:
    in_use = gw.manager.device != "CPU"
    snapshot = await asyncio.to_thread(_memory_snapshot, gw.manager.pid, in_use)
    message = (
        f"gateway {snapshot['gateway_rss_mb']} MB, llama-server {snapshot['llama_rss_mb']} MB, "
        f"system {snapshot['system_available_mb']} of {snapshot['system_total_mb']} MB free"
    )
    return message, snapshot


async def tools_command(gw: Gateway, value: str | None, _: str) -> CommandResult:
    if value is not None:
        if value.lower() not in {"on", "off"}:
            raise CommandError(f"tools takes 'on' or 'off', got {value!r}")
        gw.tools_enabled = value.lower() == "on"
        await gw.store.set_setting("tools_enabled", gw.tools_enabled)
    state = "on" if gw.tools_enabled else "off"
    return f"Tools are {state} ({len(tools.tool_names())} available)", gw.tools_enabled


async def history_command(gw: Gateway, value: str | None, conversation_id: str) -> CommandResult:
    messages = await gw.store.get_messages(conversation_id)
    tokens = 0
    if gw.manager.health_status == "ok":
        tokens = sum([await gw.engine.counter.count(message_text(m)) for m in messages])
    return (
        f"Conversation {conversation_id!r}: {len(messages)} messages, about {tokens} tokens",
        {"messages": len(messages), "tokens": tokens},
    )


async def reset_command(gw: Gateway, value: str | None, conversation_id: str) -> CommandResult:
    await gw.reset_conversation(conversation_id)
    return f"Conversation {conversation_id!r} cleared", None


async def model_command(gw: Gateway, value: str | None, _: str) -> CommandResult:
    if value is None:
        return f"Current model: {gw.default_model}", gw.default_model
    previous, seconds = await gw.switch_model(value)
    return f"Switched from {previous} to {value} in {seconds:.1f} s", value


async def roots_command(gw: Gateway, value: str | None, _: str) -> CommandResult:
    """A change is recorded in the tool audit log with who asked, refused or not: widening
    the roots is what an attacker driving the gateway would do first."""
    if value is not None:
        requested = [p for p in value.split(os.pathsep) if p]
        caller = security.current_caller()
        record = AuditRecord(
            tool="/command roots",
            arguments={
                "roots": requested,
                "previous": [str(p) for p in gw.tool_policy.roots],
                "origin": caller.origin,
                "client": caller.client,
            },
            status="success",
            approval="not_needed",
        )
        try:
            gw.tool_policy = await asyncio.to_thread(
                gw.tool_policy.with_runtime_roots, requested, gw.settings.tool_roots
            )
        except ValueError as exc:
            await gw.store.record_tool_calls(
                [record.model_copy(update={"status": "refused", "error": str(exc)})]
            )
            raise CommandError(str(exc)) from None
        await gw.store.record_tool_calls([record])
        await gw.store.set_setting("tool_roots", [str(p) for p in gw.tool_policy.roots])
        log.info("tool roots set to %s by %s (origin %s)", requested, caller.client, caller.origin)
    roots = [str(p) for p in gw.tool_policy.roots]
    return "Tool roots: " + os.pathsep.join(roots), roots


async def bench_command(gw: Gateway, value: str | None, _: str) -> CommandResult:
    """Measure the current model (or several, switching between them and back)."""
    original = gw.default_model
    keys = [k.strip() for k in value.split(",") if k.strip()] if value else [original]
    for key in keys:
        await asyncio.to_thread(gw.model_source, str(key))  # unknown keys fail before a switch
    results = []
    try:
        for key in keys:
            if key != gw.default_model:
                await gw.switch_model(str(key))
            async with gw.gate.exclusive():  # chats must not share llama-server meanwhile
                result = await model_bench.measure_model(
                    gw.default_instance.http,
                    gw.manager.base_url,
                    str(key),
                    gw.manager.n_gpu_layers,
                    gw.manager.n_ctx,
                )
            results.append(result)
    finally:
        if gw.default_model != original:
            await gw.switch_model(original)
    previous = [
        model_bench.ModelBenchResult.model_validate(row)
        for row in await gw.store.list_benchmarks(200)
    ]
    for result in results:
        await gw.store.record_benchmark(result.model_dump(mode="json"))
    table = model_bench.format_bench_table(results, previous)
    return table, [r.model_dump(mode="json") for r in results]


async def mcp_command(gw: Gateway, value: str | None, _: str) -> CommandResult:
    """The MCP servers with their state and tools; ``reload`` re-reads AILAB_MCP_CONFIG."""
    if value is not None:
        if value.strip().lower() != "reload":
            raise CommandError(f"mcp takes no value or 'reload', got {value!r}")
        try:
            await gw.mcp.reload()
        except McpConfigError as exc:
            raise CommandError(f"AILAB_MCP_CONFIG: {exc}; the running servers were kept") from None
    servers = gw.mcp.describe()
    lines = [
        f"{s['name']} ({s['transport']}): {s['state']}"
        + (f" after {s['restarts']} restarts" if s["restarts"] else "")
        + (f", {s['error']}" if s["error"] and s["state"] != "ready" else "")
        + f"; tools: {', '.join(s['tools']) or 'none'}"
        for s in servers
    ]
    if gw.mcp.error:
        lines.insert(0, f"AILAB_MCP_CONFIG could not be used: {gw.mcp.error}")
    return "\n".join(lines) or "No MCP servers (set AILAB_MCP_CONFIG to a mcpServers file)", {
        "servers": servers,
        "error": gw.mcp.error,
    }


async def finetune_command(gw: Gateway, value: str | None, _: str) -> CommandResult:
    """`status` (the default), `cancel`, or a spec (JSON or key=value words) to start one."""
    word = (value or "status").strip()
    if word.lower() in {"status", "cancel"}:
        status = await (gw.finetune.status() if word.lower() == "status" else gw.finetune.cancel())
        return status.summary(), status.model_dump()
    spec = parse_spec(word)
    if spec.base_model is None:
        current = gw.manager.model_key or gw.settings.default_model
        spec = spec.model_copy(update={"base_model": current})
    records, kind = await gather_records(gw.store, spec, gw.system_prompt)
    status = await gw.finetune.start(spec, records, kind)
    message = (
        f"Fine-tuning {spec.name} from {spec.base_model} on {len(records)} conversations "
        f"(about {status.memory_estimate_mb:,} MB); `/command finetune` shows progress"
    )
    return message, status.model_dump()


COMMANDS: dict[str, Handler] = {
    "system": system_command,
    "layers": layers_command,
    "ctx": ctx_command,
    "mem": mem_command,
    "tools": tools_command,
    "history": history_command,
    "reset": reset_command,
    "model": model_command,
    "roots": roots_command,
    "bench": bench_command,
    "mcp": mcp_command,
    "finetune": finetune_command,
}
