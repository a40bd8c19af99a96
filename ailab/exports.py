"""Turn stored conversations into fine-tuning data or readable transcripts.

Pure functions: callers fetch conversations from storage and write the returned text.
Every format is built from the same training record, so a conversation skipped in one
format (nothing to train on) is skipped in all of them. Each conversation goes out with
the system prompt it was generated with (``prompts``, by conversation id).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

EXPORT_FORMATS = ("jsonl", "json", "text")

Conversations = dict[str, list[dict[str, Any]]]
Prompts = Mapping[str, str | None]


def _tool_turn(message: dict[str, Any]) -> dict[str, Any] | None:
    role = message.get("role")
    content = message.get("content")
    if role == "tool":
        return {"role": "tool", "tool_call_id": message.get("tool_call_id"), "content": content}
    turn: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant" and message.get("tool_calls"):
        turn["tool_calls"] = message["tool_calls"]
    elif not content:
        return None
    return turn


def _plain_turn(message: dict[str, Any]) -> dict[str, Any] | None:
    content = message.get("content")
    if message.get("role") == "tool" or not content:
        return None
    return {"role": message["role"], "content": content}


def _merge_assistant_runs(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Without tool traffic, "let me check" and the final answer become adjacent assistant
    # turns; many chat templates reject non-alternating roles, so they are joined.
    merged: list[dict[str, Any]] = []
    for turn in turns:
        if merged and turn["role"] == "assistant" == merged[-1]["role"]:
            merged[-1] = {
                "role": "assistant",
                "content": f"{merged[-1]['content']}\n\n{turn['content']}",
            }
        else:
            merged.append(turn)
    return merged


def _without_interrupted(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop every exchange (a user message and all that answered it) that holds a message
    marked interrupted: a cut-off answer is nothing to train on."""
    exchanges: list[list[dict[str, Any]]] = []
    for message in messages:
        if message.get("role") == "user" or not exchanges:
            exchanges.append([])
        exchanges[-1].append(message)
    return [m for ex in exchanges if not any(x.get("interrupted") for x in ex) for m in ex]


def to_training_record(
    messages: list[dict[str, Any]],
    system_prompt: str | None,
    include_tools: bool = True,
    include_interrupted: bool = False,
) -> dict[str, Any] | None:
    """One conversation as `{"messages": [...]}` in OpenAI chat fine-tuning form.

    System messages inside `messages` are ignored in favour of `system_prompt`. Empty turns
    are dropped, and so is anything after the last assistant turn (nothing learns from it).
    With `include_tools=False`, tool results and tool-call-only assistant turns disappear.
    Interrupted exchanges are left out unless `include_interrupted`.
    Returns None when no assistant turn remains.
    """
    if not include_interrupted:
        messages = _without_interrupted(messages)
    to_turn = _tool_turn if include_tools else _plain_turn
    turns = [t for m in messages if m.get("role") != "system" and (t := to_turn(m))]
    if not include_tools:
        turns = _merge_assistant_runs(turns)
    last_assistant = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=-1)
    if last_assistant < 0:
        return None
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return {"messages": system + turns[: last_assistant + 1]}


def _records(
    conversations: Conversations, prompts: Prompts, include_tools: bool, include_interrupted: bool
) -> list[tuple[str, dict[str, Any]]]:
    records = (
        (cid, to_training_record(messages, prompts.get(cid), include_tools, include_interrupted))
        for cid, messages in conversations.items()
    )
    return [(cid, record) for cid, record in records if record is not None]


def export_jsonl(
    conversations: Conversations,
    prompts: Prompts,
    include_tools: bool = True,
    include_interrupted: bool = False,
) -> str:
    """One training record per line; conversations with nothing to train on are skipped."""
    return "".join(
        json.dumps(record, ensure_ascii=False) + "\n"
        for _, record in _records(conversations, prompts, include_tools, include_interrupted)
    )


def export_json(
    conversations: Conversations,
    prompts: Prompts,
    include_tools: bool = True,
    include_interrupted: bool = False,
) -> str:
    """A pretty-printed list of `{"id", "messages"}`."""
    items = [
        {"id": cid, "messages": record["messages"]}
        for cid, record in _records(conversations, prompts, include_tools, include_interrupted)
    ]
    return json.dumps(items, ensure_ascii=False, indent=2) + "\n"


def _tool_names(turns: list[dict[str, Any]]) -> dict[str, str]:
    return {
        call.get("id"): call.get("function", {}).get("name", "?")
        for turn in turns
        for call in turn.get("tool_calls") or ()
    }


def _transcript_lines(turns: list[dict[str, Any]]) -> list[str]:
    names = _tool_names(turns)
    lines: list[str] = []
    for turn in turns:
        role, content = turn["role"], turn.get("content")
        if role == "tool":
            lines.append(f"Tool {names.get(turn.get('tool_call_id'), '?')}: {content or ''}")
            continue
        if content:
            lines.append(f"{role.capitalize()}: {content}")
        for call in turn.get("tool_calls") or ():
            function = call.get("function", {})
            lines.append(f"Assistant calls {function.get('name')}({function.get('arguments')})")
    return lines


def export_text(
    conversations: Conversations,
    prompts: Prompts,
    include_tools: bool = True,
    include_interrupted: bool = False,
) -> str:
    """A human-readable transcript: a `### conversation <id>` header, then one line per turn."""
    blocks = [
        "\n".join([f"### conversation {cid}", *_transcript_lines(record["messages"])])
        for cid, record in _records(conversations, prompts, include_tools, include_interrupted)
    ]
    return "".join(block + "\n\n" for block in blocks)


EXPORTERS: dict[str, Callable[[Conversations, Prompts, bool, bool], str]] = {
    "jsonl": export_jsonl,
    "json": export_json,
    "text": export_text,
}


def export_conversations(
    fmt: str,
    conversations: Conversations,
    prompts: Prompts,
    include_tools: bool = True,
    include_interrupted: bool = False,
) -> str:
    """Render in one of EXPORT_FORMATS; raises ValueError for any other format."""
    if fmt not in EXPORTERS:
        raise ValueError(
            f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}"
        )
    return EXPORTERS[fmt](conversations, prompts, include_tools, include_interrupted)


def format_for_filename(path: str | Path) -> str:
    """`.jsonl` -> jsonl, `.json` -> json, anything else -> text (case-insensitive)."""
    suffix = Path(path).suffix.lower()
    return {".jsonl": "jsonl", ".json": "json"}.get(suffix, "text")
