"""One turn of a conversation: kept in memory, written whole, ended by one rule.

The rule. A turn rejected before generation stores nothing. A turn that fails or is
stopped after output began (a streamed token, a model reply, a tool result) stores what
it produced, its last message marked ``"interrupted": true`` and every tool call of it
answered. A failure before any output stores nothing. Whatever is stored of a turn is
written in one transaction, so a half-written turn cannot exist.

``RunningTurn`` runs the agent loop as a task of its own and hands its events over a
queue: a client that goes away, a DELETE or a shutdown stops the task, and the task
still ends the turn by the rule before it lets go of the conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ailab.agent.token_budget import Message
from ailab.errors import AilabError
from ailab.storage import (
    AsyncStore,
    AuditUpdate,
    ConversationChanged,
    PendingApproval,
    StorageError,
    TurnCommit,
)

Event = tuple[str, dict[str, Any]]

NOT_RUN_INTERRUPTED = "Not run: the turn was interrupted before this call."
SUPERSEDED_BY_MESSAGE = "Declined: superseded by a new message."
SUPERSEDED_BY_REGENERATION = "Declined: the answer was regenerated."
_END = object()


class TurnStopped(AilabError):
    """The turn was stopped from outside (client gone, conversation deleted, shutdown)."""

    status = 409


@dataclass
class TurnRecord:
    """What a turn started from and what it has added so far."""

    conversation_id: str
    stored: list[Message]  # the history as read when the turn began
    keep: int  # stored messages that stay; fewer when an answer is regenerated
    system_prompt: str  # the prompt this turn is generated with
    own_prompt: str | None  # the conversation's own prompt (None: the default applies)
    model_key: str | None = None  # the model generating this turn
    messages: list[Message] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)  # the current model call's deltas
    pending: PendingApproval | None = None
    dropped_approvals: list[str] = field(default_factory=list)
    audit: list[AuditUpdate] = field(default_factory=list)
    # Calls proposed but not run yet: their ids and audit rows.
    open_calls: dict[str, int] = field(default_factory=dict)
    produced: bool = False  # a model reply or a tool result was added

    @property
    def output_began(self) -> bool:
        return self.produced or bool(self.partial)

    @property
    def history(self) -> list[Message]:
        """The conversation as the model sees it now (stored part plus this turn)."""
        return [*self.stored[: self.keep], *self.messages]

    def add_input(self, messages: list[Message]) -> None:
        self.messages.extend(messages)

    def add_output(self, message: Message) -> None:
        self.messages.append(message)
        self.partial = []
        self.produced = True

    def retire(self, approvals: list[PendingApproval], reason: str, answer: bool) -> None:
        """Drop approvals that will never be decided; with ``answer``, their calls get a
        declined result (their assistant message stays in the history)."""
        for approval in approvals:
            if answer:
                calls = approval.state.get("remaining") or []
                self.add_input([_tool_message(call, reason) for call in calls])
            self.dropped_approvals.append(approval.approval_id)
            self.audit += [
                AuditUpdate(id=i, status="superseded", error=reason) for i in approval.audit_ids
            ]

    def interrupt(self) -> None:
        """End the turn early by the rule: keep the partial answer, answer every call
        left without a result, mark the last message."""
        if self.partial:
            self.messages.append({"role": "assistant", "content": "".join(self.partial)})
            self.partial = []
        answered = {m.get("tool_call_id") for m in self.history if m.get("role") == "tool"}
        last_call = next((m for m in reversed(self.history) if m.get("tool_calls")), None)
        for call in (last_call or {}).get("tool_calls") or []:
            if call.get("id") not in answered:
                self.messages.append(_tool_message(call, NOT_RUN_INTERRUPTED))
        self.audit += [
            AuditUpdate(id=i, status="cancelled", error=NOT_RUN_INTERRUPTED)
            for i in self.open_calls.values()
        ]
        self.open_calls = {}
        if self.messages:
            self.messages[-1] = {**self.messages[-1], "interrupted": True}

    def commit(self) -> TurnCommit:
        return TurnCommit(
            conversation_id=self.conversation_id,
            expected_count=len(self.stored),
            keep=self.keep,
            messages=self.messages,
            system_prompt=self.own_prompt,
            used_system_prompt=self.system_prompt,
            model_key=self.model_key,
            pending=self.pending,
            dropped_approvals=self.dropped_approvals,
            audit=self.audit,
        )


def _tool_message(call: dict[str, Any], text: str) -> Message:
    name = (call.get("function") or {}).get("name", "")
    content = json.dumps({"status": "error", "error": text})
    return {"role": "tool", "tool_call_id": call.get("id", ""), "name": name, "content": content}


class RunningTurn:
    """A turn running as its own task; its events are read with ``events()``."""

    def __init__(
        self,
        record: TurnRecord,
        events: AsyncIterator[Event],
        store: AsyncStore,
        resources: contextlib.AsyncExitStack,
        on_end: Callable[[], None],
    ) -> None:
        self.record = record
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stop_reason: str | None = None
        self._keep = True
        self._finished = False
        self.task = asyncio.get_running_loop().create_task(
            self._drive(events, store, resources, on_end)
        )

    def stop(self, reason: str, keep: bool = True) -> None:
        """Stop the turn; with ``keep=False`` nothing of it is stored (its conversation
        is being deleted). Only the first call cancels: the turn's clean-up must run."""
        self._keep = self._keep and keep
        if self._stop_reason is None and not self._finished:
            self._stop_reason = reason
            self.task.cancel()

    async def events(self) -> AsyncIterator[Event]:
        """The turn's events, ending with ``done``; a failure is raised. Leaving early
        (a client that went away) stops the turn."""
        try:
            while (item := await self._queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop("the client went away")

    async def _drive(
        self,
        events: AsyncIterator[Event],
        store: AsyncStore,
        resources: contextlib.AsyncExitStack,
        on_end: Callable[[], None],
    ) -> None:
        try:
            # The conversation's lock and the admission place are held until the turn is
            # stored, so the next turn reads it.
            async with resources:
                await self._run(events, store)
        finally:
            on_end()
            self._queue.put_nowait(_END)

    async def _run(self, events: AsyncIterator[Event], store: AsyncStore) -> None:
        done: Event | None = None
        try:
            async for event in events:
                if event[0] == "done":
                    done = event  # sent once the turn is stored
                else:
                    self._queue.put_nowait(event)
            await _commit_despite_stop(store, self.record.commit())
        except asyncio.CancelledError:
            await self._end_early(store, TurnStopped(self._stop_reason or "stopped"))
        except Exception as exc:  # every failure ends the turn by the rule
            await self._end_early(store, exc)
        else:
            assert done is not None, "the agent loop always ends with done"
            self._finish(done)

    async def _end_early(self, store: AsyncStore, error: Exception) -> None:
        unwritable = isinstance(error, (StorageError, ConversationChanged))
        if self._keep and self.record.output_began and not unwritable:
            self.record.interrupt()
            try:
                await _commit_despite_stop(store, self.record.commit())
            except (StorageError, ConversationChanged) as exc:
                error = exc
        self._finish(error)

    def _finish(self, item: Event | Exception | None) -> None:
        self._finished = True
        self._queue.put_nowait(item)


async def _commit_despite_stop(store: AsyncStore, commit: TurnCommit) -> None:
    """A commit under way is on its way to the disk: a stop meanwhile waits for it, so the
    turn is either stored whole or not at all, never stored twice."""
    writing = asyncio.ensure_future(store.commit_turn(commit))
    try:
        await asyncio.shield(writing)
    except asyncio.CancelledError:
        await writing
