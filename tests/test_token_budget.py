"""Trimming history to the context: oldest first, tool calls kept whole, never silent."""

from __future__ import annotations

import asyncio

import pytest

from ailab.agent.token_budget import ContextOverflow, TokenCounter, fit_messages, group_units


def word_counter() -> TokenCounter:
    async def tokenize(text: str) -> int:
        return len(text.split())

    return TokenCounter(tokenize)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


TOOL_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "x", "arguments": "{}"}}],
}
TOOL_RESULT = {"role": "tool", "tool_call_id": "c1", "content": "result " * 50}


def test_history_that_fits_is_sent_whole_without_tokenizing() -> None:
    calls: list[str] = []

    async def tokenize(text: str) -> int:
        calls.append(text)
        return 1

    history = [user("hi"), assistant("hello")]
    kept, trimmed = asyncio.run(fit_messages(history, "sys", 1000, TokenCounter(tokenize)))
    assert (kept, trimmed, calls) == (history, 0, [])


def test_oldest_messages_are_dropped_first_and_counted() -> None:
    history = [user("old " * 100), assistant("reply " * 100), user("new question")]
    kept, trimmed = asyncio.run(fit_messages(history, "sys", 100, word_counter()))
    assert kept == [user("new question")]
    assert trimmed == 2


def test_a_tool_call_is_never_separated_from_its_results() -> None:
    units = group_units([user("q"), TOOL_CALL, TOOL_RESULT, assistant("a")])
    assert units[1] == [TOOL_CALL, TOOL_RESULT]
    history = [user("q " * 10), TOOL_CALL, TOOL_RESULT, assistant("a"), user("next")]
    # Budgets around the pair's size: the call and its result go (or stay) together.
    outcomes = set()
    for budget in range(55, 200, 5):
        kept, _ = asyncio.run(fit_messages(history, "s", budget, word_counter()))
        outcomes.add((TOOL_CALL in kept, TOOL_RESULT in kept))
    assert outcomes == {(False, False), (True, True)}


def test_the_current_turn_with_its_tool_results_is_protected() -> None:
    history = [user("old " * 300), user("now"), TOOL_CALL, TOOL_RESULT]
    kept, trimmed = asyncio.run(fit_messages(history, "s", 200, word_counter()))
    assert kept == [user("now"), TOOL_CALL, TOOL_RESULT]
    assert trimmed == 1


def test_a_newest_message_too_big_for_the_context_is_an_error_not_a_cut() -> None:
    with pytest.raises(ContextOverflow, match="newest message"):
        asyncio.run(fit_messages([user("word " * 500)], "s", 100, word_counter()))
