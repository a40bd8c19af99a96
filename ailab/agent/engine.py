"""The agent loop: model call, tool calls, tool results, again; as a stream of events.

``/chat``, regenerate and ``/chat/approve`` all run ``ChatEngine.run`` on a
``TurnRecord``: the loop reads the history from it and adds what it produces to it;
storing the turn is the caller's (see ailab/agent/turn.py). It yields ``(event, data)``
pairs: ``delta``, ``tool_call``, ``tool_result``, ``approval_required``, ``done``.
Failures raise. Only the tool audit is written as the loop goes: a row when a call is
proposed, updated when it starts and when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ailab import tools
from ailab.agent.token_budget import Message, TokenCounter, fit_messages
from ailab.agent.turn import Event, TurnRecord
from ailab.errors import NotFound
from ailab.metrics import Metrics
from ailab.storage import AsyncStore, AuditRecord, AuditUpdate, PendingApproval
from ailab.upstream import proxy, relay

FORCED_CALL_TOKENS = 256


class ApprovalGone(NotFound):
    """The approval was decided, superseded or dropped with its conversation."""


class ExtraTools(Protocol):
    """Tools from outside the built-in catalogue (MCP servers'), offered next to them."""

    def schemas(self) -> list[dict[str, Any]]: ...

    def owns(self, name: str) -> bool: ...

    def origin(self, name: str) -> tuple[str | None, str]: ...

    def approval(self, name: str, policy_mode: str) -> tuple[bool, str]: ...

    async def call(
        self, name: str, arguments: dict[str, Any] | str, policy_mode: str, approved: bool
    ) -> dict[str, Any]: ...


class SlotCache(Protocol):
    """Keeps a conversation's KV cache in one llama-server slot (and restores it there
    after the model was reloaded): wraps each model call of the conversation."""

    def hold(
        self, conversation_id: str, request: dict[str, Any]
    ) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
        """Yields the fields to add to the request (its slot)."""
        ...


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
    tokens_cached: int = 0  # prompt tokens llama-server reused instead of evaluating
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
        timings = reply.get("timings") or {}
        self.tokens_input += int(usage.get("prompt_tokens") or 0)
        self.tokens_cached += int(timings.get("cache_n") or 0)
        self.tokens_generated += int(usage.get("completion_tokens") or 0)
        self.predicted_ms += float(timings.get("predicted_ms") or 0.0)
        self.model_time_s += elapsed_s

    def summary(self) -> dict[str, Any]:
        seconds = self.predicted_ms / 1000 or self.model_time_s
        return {
            "response": self.content,
            "tokens_input": self.tokens_input,
            "tokens_cached": self.tokens_cached,
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
        store: AsyncStore,
        llama_url: str,
        max_iterations: int,
        tool_policy: Callable[[], tools.ToolPolicy],
        extra_tools: ExtraTools | None = None,
        metrics: Metrics | None = None,
        request_fields: Callable[[], dict[str, Any]] = dict,
        slot_cache: SlotCache | None = None,
        *,
        streams: relay.Upstream,
        upstream: str = "llama-server",
    ) -> None:
        self.relay = streams
        self.upstream = upstream  # how errors name the server: llama-server, or a remote
        # Added to every request when it is sent: a remote upstream's model name, or a LoRA
        # base's adapter scales.
        self.request_fields = request_fields
        self.slot_cache = slot_cache
        self.metrics = metrics
        self.store = store
        self.llama_url = llama_url
        self.max_iterations = max_iterations
        self.tool_policy = tool_policy  # the gateway's current one, read per batch of calls
        self.extra_tools = extra_tools
        self.counter = TokenCounter(self._tokenize)

    async def _tokenize(self, text: str) -> int:
        body = await self._post(
            "/tokenize", {**self.request_fields(), "content": text, "add_special": False}
        )
        return len(body.get("tokens", []))

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST JSON through the instance's relay client, as streams go (httpx parses in
        Python), and return the JSON answer; a failure as an UpstreamError."""
        try:
            exchange = await self.relay.post(path, json.dumps(payload).encode())
            try:
                content = await exchange.read()
            finally:
                exchange.release()
        except relay.RelayError as exc:
            raise self._relay_failure(exc, "answer") from exc
        if exchange.status >= 400:
            raise self._answered_error(exchange.status, content)
        return json.loads(content)

    def _relay_failure(self, exc: relay.RelayError, what: str) -> proxy.UpstreamError:
        if isinstance(exc, relay.Unreachable):
            return proxy.UpstreamError(f"{self.llama_url} is not reachable: {exc}", 503)
        return proxy.UpstreamError(f"the {what} from {self.llama_url} failed: {exc}", 502)

    def _answered_error(self, status: int, content: bytes) -> proxy.UpstreamError:
        """llama-server's own error, passed on (its 5xx as a 502: the gateway is fine)."""
        message = f"{self.upstream}: {proxy.error_text(status, content)}"
        return proxy.UpstreamError(message, status if status < 500 else 502)

    # --- the loop ------------------------------------------------------------------

    async def run(
        self,
        turn: TurnRecord,
        opts: TurnOptions,
        stats: TurnStats,
        budget: int,
        calls: list[dict[str, Any]] | None = None,
        decision: bool | None = None,
    ) -> AsyncIterator[Event]:
        """Call the model until it answers without tool calls, or the cap is reached.
        ``calls`` are the current turn's tool calls still to run (when resuming), the
        first of them decided by ``decision``."""
        while True:
            if calls is not None:
                async for event in self.run_tool_calls(turn, opts, stats, calls, decision):
                    yield event
                decision = None
                if turn.pending is not None:
                    yield "done", {**stats.summary(), "pending_approval": _pending_info(turn)}
                    return
                if stats.iterations >= self.max_iterations:
                    stats.tool_cap_hit = True
                    break
            messages, schemas = await self.prompt(turn, opts, budget, stats)
            forced = bool(schemas) and opts.forces_tool_call and stats.iterations == 0
            stats.iterations += 1
            reply = ModelReply({}, None)
            turn.partial = reply.streamed  # what the model has said so far, if it stops
            async for event in self._call_model(opts, messages, schemas, forced, stats, reply):
                yield event
            stats.finish_reason = reply.finish_reason
            turn.add_output(reply.message)
            calls = reply.message.get("tool_calls")
            stats.content = reply.message.get("content") or ""
            if not calls:
                break
        yield "done", stats.summary()

    async def prompt(
        self, turn: TurnRecord, opts: TurnOptions, budget: int, stats: TurnStats | None = None
    ) -> tuple[list[Message], list[dict[str, Any]] | None]:
        """The messages and tool schemas of the next model call, fitted to the budget
        (raises ContextOverflow when the newest message alone does not fit)."""
        system, schemas = self._prompt_parts(opts)
        fixed = system + (json.dumps(schemas) if schemas else "")
        history = [_for_model(m) for m in turn.history]
        kept, trimmed = await fit_messages(history, fixed, budget, self.counter)
        if stats is not None:
            stats.trimmed_messages = max(stats.trimmed_messages, trimmed)
        return [{"role": "system", "content": system}, *kept], schemas

    def _prompt_parts(self, opts: TurnOptions) -> tuple[str, list[dict[str, Any]] | None]:
        if not opts.tools_enabled or opts.tool_choice == "none":
            return opts.system_prompt, None
        return opts.system_prompt, self._tool_schemas()

    def _tool_schemas(self) -> list[dict[str, Any]]:
        extra = self.extra_tools.schemas() if self.extra_tools else []
        return [*tools.get_available_tools(), *extra]

    # --- one model call --------------------------------------------------------------

    def _payload(
        self, opts: TurnOptions, messages: list[Message], schemas: list[dict[str, Any]] | None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"messages": messages, **opts.sampling, **self.request_fields()}
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
        payload = self._payload(opts, messages, schemas)
        async with self._slot(opts, payload) as pinned:
            if forced:
                body = await self._forced_call(opts, messages, pinned)
            elif opts.stream:
                body = {}
                stream = self._stream_call({**payload, **pinned}, body, reply.streamed)
                async for event in stream:
                    yield event
            else:
                body = await self._post("/v1/chat/completions", {**payload, **pinned})
        stats.add_usage(body, time.perf_counter() - started)
        choice = (body.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        reply.message = _clean_assistant_message(message)
        reply.finish_reason = choice.get("finish_reason")

    def _slot(
        self, opts: TurnOptions, payload: dict[str, Any]
    ) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
        if self.slot_cache is None:
            return contextlib.nullcontext({})
        rendered = {k: v for k, v in payload.items() if k not in {"stream", "stream_options"}}
        return self.slot_cache.hold(opts.conversation_id, rendered)

    async def _forced_call(
        self, opts: TurnOptions, messages: list[Message], pinned: dict[str, Any]
    ) -> dict:
        """A forced tool call ("required" or a named function), built by the gateway.

        llama-server rejects a named tool_choice and does not enforce "required" with every
        chat template, so the model is asked for JSON under a schema that admits only what
        the choice allows, and the tool call is made from that."""
        available = {t["function"]["name"]: t["function"] for t in self._tool_schemas()}
        name = opts.named_tool
        schema, instruction = _forced_schema(name, available)
        payload: dict[str, Any] = {
            **opts.sampling,
            # Arguments (a file's content, say) may need more room than the answer.
            "max_tokens": max(int(opts.sampling.get("max_tokens") or 0), FORCED_CALL_TOKENS),
            "messages": [*messages, {"role": "user", "content": instruction}],
            "response_format": {"type": "json_object", "schema": schema},
            **self.request_fields(),
            **pinned,
        }
        body = await self._post("/v1/chat/completions", payload)
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
        non-streamed response (message, finish_reason, usage, timings). The stream comes
        through the instance's relay client: its bytes cost no parsing beyond the JSON."""
        calls: dict[int, dict[str, Any]] = {}
        finish: str | None = None
        try:
            exchange = await self.relay.post("/v1/chat/completions", json.dumps(payload).encode())
            try:
                if exchange.status >= 400:
                    raise self._answered_error(exchange.status, await exchange.read())
                async for chunk in _sse_json(exchange.chunks(), self.upstream):
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
            finally:
                exchange.release()
        except relay.RelayError as exc:
            raise self._relay_failure(exc, "stream") from exc
        message: Message = {"role": "assistant", "content": "".join(content) or None}
        if calls:
            message["tool_calls"] = [calls[index] for index in sorted(calls)]
        body["choices"] = [{"message": message, "finish_reason": finish}]

    # --- tools -------------------------------------------------------------------------

    async def run_tool_calls(
        self,
        turn: TurnRecord,
        opts: TurnOptions,
        stats: TurnStats,
        calls: list[dict[str, Any]],
        decision: bool | None = None,
    ) -> AsyncIterator[Event]:
        """Run a turn's tool calls one after another in the model's order, deciding each
        just before it runs; stop before one that needs a person's approval. A resumed
        turn passes the person's ``decision`` on its first call."""
        for call in calls:
            yield "tool_call", _call_event(call)
        await self._propose(turn, calls)
        policy = self.tool_policy()
        for index, call in enumerate(calls):
            # Deciding what is destructive resolves paths: file system work, not on the loop.
            needed, mode = await asyncio.to_thread(self._approval, policy, call)
            approval = decision if index == 0 else None
            if needed and approval is None and mode == "ask":
                yield self._pause_for_approval(turn, opts, stats, calls[index:])
                return
            yield await self._execute(turn, stats, call, policy, approval, (needed, mode))

    async def _propose(self, turn: TurnRecord, calls: list[dict[str, Any]]) -> None:
        """Audit rows for the calls not yet in the audit (a resumed turn's already are)."""
        new = [call for call in calls if call.get("id", "") not in turn.open_calls]
        records = [
            AuditRecord(
                conversation_id=turn.conversation_id,
                tool_call_id=call.get("id", ""),
                tool=self._origin(_call_parts(call)[0])[1],
                server=self._origin(_call_parts(call)[0])[0],
                arguments=_call_parts(call)[1],
                status="pending",
                approval="undecided",
            )
            for call in new
        ]
        ids = await self.store.record_tool_calls(records) if records else []
        turn.open_calls.update(
            {call.get("id", ""): audit_id for call, audit_id in zip(new, ids, strict=True)}
        )

    async def _execute(
        self,
        turn: TurnRecord,
        stats: TurnStats,
        call: dict[str, Any],
        policy: tools.ToolPolicy,
        approval: bool | None,
        decision: tuple[bool, str],
    ) -> Event:
        """Run (or, when refused, answer for) one tool call; its result joins the turn."""
        name, arguments = _call_parts(call)
        audit_id = turn.open_calls[call.get("id", "")]
        label = _approval_label(approval, *decision)
        started = time.perf_counter()
        if approval is False:
            del turn.open_calls[call.get("id", "")]
            result = {"status": "error", "error": "The user declined this operation."}
        else:
            await self.store.update_tool_calls(
                [AuditUpdate(id=audit_id, status="running", approval=label)]
            )
            del turn.open_calls[call.get("id", "")]  # from here on, it has started
            running = asyncio.ensure_future(self._run_tool(policy, name, arguments, bool(approval)))
            try:
                result = await asyncio.shield(running)
            except asyncio.CancelledError:
                # The call has started and cannot be taken back: its result is recorded.
                result = await running
                await self._record(turn, stats, call, audit_id, label, result, started)
                raise
        await self._record(turn, stats, call, audit_id, label, result, started)
        return "tool_result", {"id": call.get("id", ""), "name": name, "result": result}

    async def _record(
        self,
        turn: TurnRecord,
        stats: TurnStats,
        call: dict[str, Any],
        audit_id: int,
        label: str,
        result: dict[str, Any],
        started: float,
    ) -> None:
        name, arguments = _call_parts(call)
        turn.add_output(
            {
                "role": "tool",
                "tool_call_id": call.get("id", ""),
                "name": name,
                "content": tools.format_result_for_model(result),
            }
        )
        refused = label == "denied"
        status = "refused" if refused else result.get("status", "error")
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            server, tool = self._origin(name)
            self.metrics.record_tool_call(tool, server, label, status, seconds)
        await self.store.update_tool_calls(
            [
                AuditUpdate(
                    id=audit_id,
                    status=status,
                    approval=label,  # type: ignore[arg-type]
                    duration_ms=seconds * 1000,
                    error=result.get("error"),
                    result_chars=len(json.dumps(result, ensure_ascii=False, default=str)),
                )
            ]
        )
        stats.tools_used.append(tools.describe_call(name, arguments))
        stats.tool_calls.append(
            {"id": call.get("id", ""), "name": name, "arguments": arguments, "result": result}
        )

    def _origin(self, name: str) -> tuple[str | None, str]:
        """(MCP server, its tool name) for an extra tool; (None, name) for a built-in."""
        extra = self._extra(name)
        return extra.origin(name) if extra else (None, name)

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

    def _pause_for_approval(
        self, turn: TurnRecord, opts: TurnOptions, stats: TurnStats, remaining: list[dict]
    ) -> Event:
        """The turn stops here; it is stored with the approval, to be resumed."""
        name, arguments = _call_parts(remaining[0])
        turn.pending = PendingApproval(
            approval_id=uuid.uuid4().hex[:12],
            conversation_id=turn.conversation_id,
            tool_call_id=remaining[0].get("id", ""),
            tool=name,
            arguments=arguments if isinstance(arguments, dict) else {"raw": arguments},
            description=tools.describe_call(name, arguments),
            audit_ids=[turn.open_calls.pop(call.get("id", "")) for call in remaining],
            state={"remaining": remaining, "stats": stats.__dict__, "options": opts.__dict__},
        )
        stats.content = ""
        return "approval_required", _pending_info(turn)

    async def resume(
        self, turn: TurnRecord, pending: PendingApproval, approve: bool, stream: bool, budget: int
    ) -> AsyncIterator[Event]:
        """Continue a paused loop: the decided call, the rest of its turn, then the model.
        The approval is dropped with the turn's commit, so a resumption that fails before
        the call runs leaves it pending."""
        opts = TurnOptions(**{**pending.state["options"], "stream": stream})
        stats = TurnStats(**pending.state["stats"])
        remaining: list[dict[str, Any]] = pending.state["remaining"]
        turn.dropped_approvals.append(pending.approval_id)
        turn.open_calls.update(
            {c.get("id", ""): i for c, i in zip(remaining, pending.audit_ids, strict=True)}
        )
        async for event in self.run(turn, opts, stats, budget, remaining, decision=approve):
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


def _for_model(message: Message) -> Message:
    """A stored message as llama-server gets it: without the gateway's own marks."""
    return {k: v for k, v in message.items() if k != "interrupted"}


def _pending_info(turn: TurnRecord) -> dict[str, Any]:
    pending = turn.pending
    assert pending is not None
    return {
        "approval_id": pending.approval_id,
        "tool": pending.tool,
        "arguments": pending.arguments,
        "description": pending.description,
    }


def _call_event(call: dict[str, Any]) -> dict[str, Any]:
    name, arguments = _call_parts(call)
    return {"id": call.get("id", ""), "name": name, "arguments": arguments}


def _approval_label(approval: bool | None, needed: bool, policy: str) -> str:
    if approval is not None:
        return "approved" if approval else "denied"
    if not needed:
        return "not_needed"
    return "auto" if policy == "auto" else "policy_denied"


async def _sse_json(chunks: AsyncIterator[bytes], upstream: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of an SSE stream's `data:` lines; a line may span chunks. Read to
    the end (past `[DONE]`), so the connection can be kept alive."""
    pending = b""
    async for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                parsed = json.loads(data)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict) and parsed.get("error"):
                raise proxy.UpstreamError(f"{upstream}: {parsed['error']}", 502)
            if isinstance(parsed, dict):
                yield parsed
