"""Fit a conversation into the model's context, oldest first, never silently.

Counting uses llama-server's own tokenizer on each message's text and on the tool
definitions' JSON, but not on what the chat template wraps around them (role markers, the
template's tool preamble), so it runs a few tokens per message low; an overflow that slips
through is llama-server's 400, passed on. It is lazy: a byte-level tokenizer never
produces more tokens than the text has bytes, so when the byte count already fits, no
tokenization is needed at all. Only a conversation near the limit is tokenized.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from ailab.errors import BadRequest

# Role markers and separators that a chat template adds around each message.
PER_MESSAGE_OVERHEAD = 16
TOKEN_CACHE_SIZE = 4096

Message = dict[str, Any]


class ContextOverflow(BadRequest):
    """The newest turn alone does not fit; the message says by how much."""


def message_text(message: Message) -> str:
    text = message.get("content") or ""
    if message.get("tool_calls"):
        text += json.dumps(message["tool_calls"])
    return text


def group_units(messages: list[Message]) -> list[list[Message]]:
    """Split history into units that are dropped whole: a tool call stays with its results."""
    units: list[list[Message]] = []
    for message in messages:
        if message.get("role") == "tool" and units and _unit_takes_tool_results(units[-1]):
            units[-1].append(message)
        else:
            units.append([message])
    return units


def _unit_takes_tool_results(unit: list[Message]) -> bool:
    return bool(unit[0].get("role") == "assistant" and unit[0].get("tool_calls"))


def _protected_from(units: list[list[Message]]) -> int:
    """Index of the unit holding the newest user message: it and all after it stay."""
    for index in range(len(units) - 1, -1, -1):
        if units[index][0].get("role") == "user":
            return index
    return max(len(units) - 1, 0)


class TokenCounter:
    """Counts tokens with llama-server's /tokenize, remembering recent answers."""

    def __init__(self, tokenize: Callable[[str], Awaitable[int]]) -> None:
        self._tokenize = tokenize
        self._cache: OrderedDict[str, int] = OrderedDict()

    async def count(self, text: str) -> int:
        if not text:
            return 0
        if text in self._cache:
            self._cache.move_to_end(text)
            return self._cache[text]
        tokens = await self._tokenize(text)
        self._cache[text] = tokens
        if len(self._cache) > TOKEN_CACHE_SIZE:
            self._cache.popitem(last=False)
        return tokens

    def clear(self) -> None:
        """Forget counts (another model has another tokenizer)."""
        self._cache.clear()


def _upper_bound(text: str) -> int:
    return len(text.encode()) + PER_MESSAGE_OVERHEAD


async def fit_messages(
    history: list[Message],
    fixed_text: str,
    budget: int,
    counter: TokenCounter,
) -> tuple[list[Message], int]:
    """Drop the oldest units until history plus fixed text (system prompt, tool schemas)
    fits in ``budget`` tokens. Returns the kept messages and how many were dropped."""
    units = group_units(history)
    fixed_bound = _upper_bound(fixed_text)
    if fixed_bound + sum(_upper_bound(message_text(m)) for m in history) <= budget:
        return history, 0
    fixed = await counter.count(fixed_text) + PER_MESSAGE_OVERHEAD
    costs = [
        sum([await counter.count(message_text(m)) + PER_MESSAGE_OVERHEAD for m in unit])
        for unit in units
    ]
    first_protected = _protected_from(units)
    total = fixed + sum(costs)
    start = 0
    while total > budget and start < first_protected:
        total -= costs[start]
        start += 1
    if total > budget:
        raise ContextOverflow(
            f"the newest message needs about {total} tokens but only {budget} are available "
            "(context size minus max_tokens); shorten the message, lower max_tokens or raise "
            "the context with /command ctx"
        )
    kept = [message for unit in units[start:] for message in unit]
    return kept, len(history) - len(kept)
