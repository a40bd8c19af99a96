"""The agent loop: model call, tool calls, tool results, again; as a stream of events.

``/chat`` (streamed or not) and ``/chat/approve`` all consume ``ChatEngine.run``. It
yields ``(event, data)`` pairs: ``delta``, ``tool_call``, ``tool_result``,
``approval_required``, ``done``. Failures raise; the caller turns them into an HTTP
error or an SSE ``error`` event.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from ailab import tools
from ailab.agent.token_budget import Message, TokenCounter, fit_messages
from ailab.errors import NotFound
from ailab.storage import AsyncStore, AuditRecord, PendingApproval
from ailab.upstream import proxy

Event = tuple[str, dict[str, Any]]

FORCED_CALL_TOKENS = 256


class ApprovalGone(NotFound):
    """The approval was decided (or dropped with its conversation) meanwhile."""


class ExtraTools(Protocol):
    """Tools from outside the built-in catalogue (MCP servers'), offered next to them."""

    def schemas(self) -> list[dict[str, Any]]: ...

    def owns(self, name: str) -> bool: ...

    def origin(self, name: str) -> tuple[str | None, str]: ...

    def approval(self, name: str, policy_mode: str) -> tuple[bool, str]: ...

    async def call(
        self, name: str, arguments: dict[str, Any] | str, policy_mode: str, approved: bool
    ) -> dict[str, Any]: ...


@dataclass
class TurnOptions:
    """What one request asked for, resolved against the server's defaults."""

    conversation_id: str
    system_prompt: str
    sampling: dict[str, Any]
    tools_enabled: bool
    tool_choice: str | dict[str, Any]
    stream: bool

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, dict)

    @property
    def named_tool(self) -> str | None:
        if isinstance(self.tool_choice, dict):
            return str(self.tool_choice["function"]["name"])
        return None


@dataclass
class TurnStats:
    """What one turn has done so far; kept in a pending approval to resume later."""

    tokens_input: int = 0
    tokens_generated: int = 0
    model_time_s: float = 0.0
    predicted_ms: float = 0.0
    iterations: int = 0
    tools_used: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    trimmed_messages: int = 0
    finish_reason: str | None = None
    tool_cap_hit: bool = False
    content: str = ""

    def add_usage(self, reply: dict[str, Any], elapsed_s: float) -> None:
        usage = reply.get("usage") or {}
        self.tokens_input += int(usage.get("prompt_tokens") or 0)
        self.tokens_generated += int(usage.get("completion_tokens") or 0)
        self.predicted_ms += float((reply.get("timings") or {}).get("predicted_ms") or 0.0)
        self.model_time_s += elapsed_s

    def summary(self) -> dict[str, Any]:
        seconds = self.predicted_ms / 1000 or self.model_time_s
        return {
            "response": self.content,
            "tokens_input": self.tokens_input,
            "tokens_generated": self.tokens_generated,
            "tokens_total": self.tokens_input + self.tokens_generated,
            "generation_time": round(self.model_time_s, 3),
            "tokens_per_second": round(self.tokens_generated / seconds, 2) if seconds else 0.0,
            "tools_used": self.tools_used,
            "tool_calls": self.tool_calls,
            "iterations": self.iterations,
            "tool_cap_hit": self.tool_cap_hit,
            "trimmed_messages": self.trimmed_messages,
            "finish_reason": self.finish_reason,
        }


@dataclass
class ModelReply:
    message: Message
    finish_reason: str | None
    streamed: list[str] = field(default_factory=list)  # content so far, kept if stopped


class ChatEngine:
    def __init__(
        self,
        http: httpx.AsyncClient,
        store: AsyncStore,
        llama_url: str,
        max_iterations: int,
        tool_policy: Callable[[], tools.ToolPolicy],
        extra_tools: ExtraTools | None = None,
    ) -> None:
        self.http = http
        self.store = store
        self.llama_url = llama_url
        self.max_iterations = max_iterations
        self.tool_policy = tool_policy  # the gateway's current one, read per batch of calls
        self.extra_tools = extra_tools
        self.counter = TokenCounter(self._tokenize)
        self._background: set[asyncio.Task[None]] = set()

    async def _tokenize(self, text: str) -> int:
        body = await proxy.post_json(
            self.http, f"{self.llama_url}/tokenize", {"content": text, "add_special": False}
        )
        return len(body.get("tokens", []))

    # --- the loop ------------------------------------------------------------------

    async def run(
        self,
        opts: TurnOptions,
        stats: TurnStats,
        budget: int,
        calls: list[dict[str, Any]] | None = None,
    ) -> AsyncIterator[Event]:
        """Call the model until it answers without tool calls, or the cap is reached.
        ``calls`` are the current turn's tool calls still to run (when resuming)."""
        while True:
            if calls is not None:
                pending: dict[str, Any] | None = None
                async for event in self.run_tool_calls(opts, stats, calls):
                    pending = event[1] if event[0] == "approval_required" else pending
                    yield event
                if pending:
                    yield "done", {**stats.summary(), "pending_approval": pending}
                    return
                if stats.iterations >= self.max_iterations:
                    stats.tool_cap_hit = True
                    break
            history = await self.store.get_messages(opts.conversation_id)
            system, schemas = self._prompt_parts(opts)
            fixed = system + (json.dumps(schemas) if schemas else "")
            kept, trimmed = await fit_messages(history, fixed, budget, self.counter)
            stats.trimmed_messages = max(stats.trimmed_messages, trimmed)
            messages = [{"role": "system", "content": system}, *kept]
            forced = bool(schemas) and opts.forces_tool_call and stats.iterations == 0
            stats.iterations += 1
            reply = ModelReply({}, None)
            try:
                async for event in self._call_model(opts, messages, schemas, forced, stats, reply):
                    yield event
            except (asyncio.CancelledError, GeneratorExit):
                self._keep_stopped_answer(opts.conversation_id, reply)
                raise
            stats.finish_reason = reply.finish_reason
            await self.store.append_messages(opts.conversation_id, [reply.message])
            calls = reply.message.get("tool_calls")
            stats.content = reply.message.get("content") or ""
            if not calls:
                break
        yield "done", stats.summary()

    def _keep_stopped_answer(self, conversation_id: str, reply: ModelReply) -> None:
        """A client that hangs up mid-answer keeps what was generated, so the history still
        alternates. Written from a task of its own: this one is being cancelled."""
        if not reply.streamed:
            return
        message = {"role": "assistant", "content": "".join(reply.streamed)}
        task = asyncio.get_running_loop().create_task(
            self.store.append_messages(conversation_id, [message])
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _prompt_parts(self, opts: TurnOptions) -> tuple[str, list[dict[str, Any]] | None]:
        if not opts.tools_enabled or opts.tool_choice == "none":
            return opts.system_prompt, None
        return opts.system_prompt, self._tool_schemas()

    def _tool_schemas(self) -> list[dict[str, Any]]:
        extra = self.extra_tools.schemas() if self.extra_tools else []
        return [*tools.get_available_tools(), *extra]

    # --- one model call --------------------------------------------------------------

    @staticmethod
    def _payload(
        opts: TurnOptions, messages: list[Message], schemas: list[dict[str, Any]] | None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"messages": messages, **opts.sampling}
        if schemas:
            # A forced choice was served by _forced_call on the first call; after it, and
            # for "auto", the model decides.
            payload["tools"] = schemas
            payload["tool_choice"] = "auto"
        if opts.stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return payload

    async def _call_model(
        self,
        opts: TurnOptions,
        messages: list[Message],
        schemas: list[dict[str, Any]] | None,
        forced: bool,
        stats: TurnStats,
        reply: ModelReply,
    ) -> AsyncIterator[Event]:
        started = time.perf_counter()
        if forced:
            body = await self._forced_call(opts, messages)
        elif opts.stream:
            payload = self._payload(opts, messages, schemas)
            body = {}
            async for event in self._stream_call(payload, body, reply.streamed):
                yield event
        else:
            payload = self._payload(opts, messages, schemas)
            body = await proxy.post_json(
                self.http, f"{self.llama_url}/v1/chat/completions", payload
            )
        stats.add_usage(body, time.perf_counter() - started)
        choice = (body.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        reply.message = _clean_assistant_message(message)
        reply.finish_reason = choice.get("finish_reason")

    async def _forced_call(self, opts: TurnOptions, messages: list[Message]) -> dict:
        """A forced tool call ("required" or a named function), built by the gateway.

        llama-server rejects a named tool_choice and does not enforce "required" with every
        chat template, so the model is asked for JSON under a schema that admits only what
        the choice allows, and the tool call is made from that."""
        available = {t["function"]["name"]: t["function"] for t in self._tool_schemas()}
        name = opts.named_tool
        if name is not None and name not in available:
            raise proxy.UpstreamError(f"tool_choice names an unknown tool {name!r}", 400)
        schema, instruction = _forced_schema(name, available)
        payload: dict[str, Any] = {
            **opts.sampling,
            # Arguments (a file's content, say) may need more room than the answer.
            "max_tokens": max(int(opts.sampling.get("max_tokens") or 0), FORCED_CALL_TOKENS),
            "messages": [*messages, {"role": "user", "content": instruction}],
            "response_format": {"type": "json_object", "schema": schema},
        }
        body = await proxy.post_json(self.http, f"{self.llama_url}/v1/chat/completions", payload)
        choice = (body.get("choices") or [{}])[0]
        call = _call_from_json((choice.get("message") or {}).get("content") or "", name)
        choice["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
        choice["finish_reason"] = "tool_calls"
        body["choices"] = [choice]
        return body

    async def _stream_call(
        self, payload: dict[str, Any], body: dict[str, Any], content: list[str]
    ) -> AsyncIterator[Event]:
        """Stream one completion, yielding content deltas and filling ``body`` like a
        non-streamed response (message, finish_reason, usage, timings)."""
        request = self.http.build_request(
            "POST", f"{self.llama_url}/v1/chat/completions", json=payload
        )
        calls: dict[int, dict[str, Any]] = {}
        finish: str | None = None
        try:
            async with proxy.stream(self.http, request) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise proxy.UpstreamError(
                        f"llama-server: {proxy.error_message(response)}",
                        response.status_code if response.status_code < 500 else 502,
                    )
                async for chunk in _sse_json(response):
                    for key in ("usage", "timings"):
                        if chunk.get(key):
                            body[key] = chunk[key]
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if delta.get("content"):
                            content.append(delta["content"])
                            yield "delta", {"content": delta["content"]}
                        _merge_tool_call_deltas(calls, delta.get("tool_calls") or [])
                        finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as exc:
            raise proxy.UpstreamError(f"llama-server stream failed: {exc}", 502) from exc
        message: Message = {"role": "assistant", "content": "".join(content) or None}
        if calls:
            message["tool_calls"] = [calls[index] for index in sorted(calls)]
        body["choices"] = [{"message": message, "finish_reason": finish}]

    # --- tools -------------------------------------------------------------------------

    async def run_tool_calls(
        self, opts: TurnOptions, stats: TurnStats, calls: list[dict[str, Any]]
    ) -> AsyncIterator[Event]:
        """Run a turn's tool calls: independent ones concurrently, stopping before the
        first that needs a person's approval."""
        for call in calls:
            yield "tool_call", _call_event(call)
        policy = self.tool_policy()
        # Deciding what is destructive resolves paths: file system work, so not on the loop.
        decisions = await asyncio.to_thread(
            lambda: [self._approval(policy, call) for call in calls]
        )
        first_asking = next(
            (i for i, (need, mode) in enumerate(decisions) if need and mode == "ask"), len(calls)
        )
        results = await asyncio.gather(
            *(
                self._execute(opts, stats, call, policy, approval=None, decision=decision)
                for call, decision in zip(calls[:first_asking], decisions, strict=False)
            )
        )
        for event in results:
            yield event
        if first_asking < len(calls):
            yield await self._pause_for_approval(opts, stats, calls[first_asking:])

    async def _execute(
        self,
        opts: TurnOptions,
        stats: TurnStats,
        call: dict[str, Any],
        policy: tools.ToolPolicy,
        approval: bool | None,
        decision: tuple[bool, str] | None = None,
    ) -> Event:
        """Run (or, when refused, answer for) one tool call and store its result."""
        name, arguments = _call_parts(call)
        started = time.perf_counter()
        if approval is False:
            result = {"status": "error", "error": "The user declined this operation."}
        else:
            result = await self._run_tool(policy, name, arguments, bool(approval))
        duration_ms = (time.perf_counter() - started) * 1000
        extra = self._extra(name)
        server, tool_name = extra.origin(name) if extra else (None, name)
        await self.store.append_messages(
            opts.conversation_id,
            [
                {
                    "role": "tool",
                    "tool_call_id": call.get("id", ""),
                    "name": name,
                    "content": tools.format_result_for_model(result),
                }
            ],
        )
        await self.store.record_tool_call(
            AuditRecord(
                conversation_id=opts.conversation_id,
                tool=tool_name,
                server=server,
                arguments=arguments,
                status=result.get("status", "error") if approval is not False else "refused",
                duration_ms=duration_ms,
                approval=_approval_label(approval, *(decision or (True, policy.approval))),
                error=result.get("error"),
                result_chars=len(json.dumps(result, ensure_ascii=False, default=str)),
            )
        )
        stats.tools_used.append(tools.describe_call(name, arguments))
        stats.tool_calls.append(
            {"id": call.get("id", ""), "name": name, "arguments": arguments, "result": result}
        )
        return "tool_result", {"id": call.get("id", ""), "name": name, "result": result}

    def _extra(self, name: str) -> ExtraTools | None:
        """The extra tools that own this name, if any does."""
        owns = self.extra_tools is not None and self.extra_tools.owns(name)
        return self.extra_tools if owns else None

    def _approval(self, policy: tools.ToolPolicy, call: dict[str, Any]) -> tuple[bool, str]:
        """(whether the call needs a person's approval, the approval mode for it)."""
        name, arguments = _call_parts(call)
        extra = self._extra(name)
        if extra is not None:
            return extra.approval(name, policy.approval)
        return tools.approval_needed(policy, name, arguments), policy.approval

    async def _run_tool(
        self,
        policy: tools.ToolPolicy,
        name: str,
        arguments: dict[str, Any] | str,
        approved: bool,
    ) -> dict[str, Any]:
        extra = self._extra(name)
        if extra is not None:
            return await extra.call(name, arguments, policy.approval, approved)
        return await asyncio.to_thread(
            tools.execute_tool, policy, name, arguments, approved=approved
        )

    async def _pause_for_approval(
        self, opts: TurnOptions, stats: TurnStats, remaining: list[dict[str, Any]]
    ) -> Event:
        name, arguments = _call_parts(remaining[0])
        pending = PendingApproval(
            approval_id=uuid.uuid4().hex[:12],
            conversation_id=opts.conversation_id,
            tool_call_id=remaining[0].get("id", ""),
            tool=name,
            arguments=arguments if isinstance(arguments, dict) else {"raw": arguments},
            description=tools.describe_call(name, arguments),
            state={"remaining": remaining, "stats": stats.__dict__, "options": opts.__dict__},
        )
        await self.store.save_pending_approval(pending)
        info = {
            "approval_id": pending.approval_id,
            "tool": name,
            "arguments": arguments,
            "description": pending.description,
        }
        stats.content = ""
        return "approval_required", info

    async def resume(
        self, pending: PendingApproval, approve: bool, stream: bool, budget: int
    ) -> AsyncIterator[Event]:
        """Continue a paused loop: the decided call, the rest of its turn, then the model."""
        opts = TurnOptions(**{**pending.state["options"], "stream": stream})
        stats = TurnStats(**pending.state["stats"])
        remaining: list[dict[str, Any]] = pending.state["remaining"]
        # Deleting is the claim: of two concurrent decisions on one approval, one runs.
        if not await self.store.delete_pending_approval(
            pending.conversation_id, pending.approval_id
        ):
            raise ApprovalGone(f"approval {pending.approval_id!r} was already decided")
        yield await self._execute(opts, stats, remaining[0], self.tool_policy(), approval=approve)
        async for event in self.run(opts, stats, budget, calls=remaining[1:]):
            yield event


# --- helpers ---------------------------------------------------------------------------


def _clean_assistant_message(message: dict[str, Any]) -> Message:
    cleaned: Message = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        cleaned["tool_calls"] = [
            {
                "id": call.get("id") or f"call_{uuid.uuid4().hex[:16]}",
                "type": "function",
                "function": {
                    "name": (call.get("function") or {}).get("name", ""),
                    "arguments": (call.get("function") or {}).get("arguments", "{}"),
                },
            }
            for call in message["tool_calls"]
        ]
    return cleaned


def _forced_schema(
    name: str | None, available: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], str]:
    """The JSON schema and instruction for a forced call: a named function's arguments
    alone (short, so small models finish it), or {"name", "arguments"} for "required"."""
    if name is not None:
        spec = available[name]
        return spec["parameters"], (
            f"Call the function `{name}` ({spec.get('description', '')}). "
            "Reply with its arguments as a JSON object only."
        )
    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": key}, "arguments": spec["parameters"]},
                "required": ["name", "arguments"],
            }
            for key, spec in available.items()
        ]
    }
    listing = "; ".join(
        f"`{key}`: {spec.get('description', '')}" for key, spec in available.items()
    )
    return schema, (
        f"Call one of these functions: {listing}. "
        'Reply only with a JSON object {"name": ..., "arguments": {...}}.'
    )


def _call_from_json(content: str, named: str | None) -> dict[str, Any]:
    """A tool call from the forced JSON; unparsable arguments are passed on as text so the
    tool answers with a readable error instead of the turn failing."""
    name, arguments = named or "", content
    if named is None:
        try:
            parsed = json.loads(content)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            name = str(parsed.get("name") or "")
            if isinstance(parsed.get("arguments"), dict):
                arguments = json.dumps(parsed["arguments"])
    return {
        "id": f"call_{uuid.uuid4().hex[:16]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _merge_tool_call_deltas(calls: dict[int, dict[str, Any]], deltas: list[dict]) -> None:
    for delta in deltas:
        entry = calls.setdefault(
            int(delta.get("index", 0)),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        entry["id"] = delta.get("id") or entry["id"]
        function = delta.get("function") or {}
        entry["function"]["name"] += function.get("name") or ""
        arguments = function.get("arguments") or ""
        entry["function"]["arguments"] += (
            arguments if isinstance(arguments, str) else json.dumps(arguments)
        )


def _call_parts(call: dict[str, Any]) -> tuple[str, dict[str, Any] | str]:
    function = call.get("function") or {}
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
            arguments = parsed if isinstance(parsed, dict) else arguments
        except json.JSONDecodeError:
            pass  # left as a string: execute_tool answers with a readable error
    return str(function.get("name", "")), arguments


def _call_event(call: dict[str, Any]) -> dict[str, Any]:
    name, arguments = _call_parts(call)
    return {"id": call.get("id", ""), "name": name, "arguments": arguments}


def _approval_label(approval: bool | None, needed: bool, policy: str) -> str:
    if approval is not None:
        return "approved" if approval else "denied"
    if not needed:
        return "not_needed"
    return "auto" if policy == "auto" else "policy_denied"


async def _sse_json(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            continue
        if isinstance(chunk, dict) and chunk.get("error"):
            raise proxy.UpstreamError(f"llama-server: {chunk['error']}", 502)
        if isinstance(chunk, dict):
            yield chunk
