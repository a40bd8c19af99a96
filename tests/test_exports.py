"""Conversation export for fine-tuning and reading."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ailab.exports import (
    EXPORT_FORMATS,
    EXPORTERS,
    export_conversations,
    export_json,
    export_jsonl,
    export_text,
    format_for_filename,
    to_training_record,
)

USER = {"role": "user", "content": "List my files"}
CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "list_dir", "arguments": "{}"}}
    ],
}
RESULT = {"role": "tool", "tool_call_id": "call_1", "name": "list_dir", "content": "a.txt"}
ANSWER = {"role": "assistant", "content": "You have a.txt."}
TOOL_CONVERSATION = [USER, CALL, RESULT, ANSWER]
PLAIN_CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def roles(record: dict[str, Any] | None) -> list[str]:
    assert record is not None
    return [m["role"] for m in record["messages"]]


# --- to_training_record -------------------------------------------------------------------


def test_record_starts_with_the_given_system_prompt() -> None:
    record = to_training_record(PLAIN_CONVERSATION, "Be kind.")
    assert record == {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }


def test_record_without_system_prompt_has_no_system_message() -> None:
    assert roles(to_training_record(PLAIN_CONVERSATION, None)) == ["user", "assistant"]


def test_stored_system_messages_are_replaced_by_the_given_prompt() -> None:
    messages = [{"role": "system", "content": "old"}, *PLAIN_CONVERSATION]
    record = to_training_record(messages, "new")
    assert record is not None
    assert [m["content"] for m in record["messages"] if m["role"] == "system"] == ["new"]


def test_tool_calls_are_kept_in_openai_form() -> None:
    record = to_training_record(TOOL_CONVERSATION, None, include_tools=True)
    assert record == {
        "messages": [
            USER,
            {"role": "assistant", "content": None, "tool_calls": CALL["tool_calls"]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"},
            ANSWER,
        ]
    }


def test_tool_traffic_is_stripped_without_tools() -> None:
    record = to_training_record(TOOL_CONVERSATION, None, include_tools=False)
    assert record == {"messages": [USER, ANSWER]}


def test_stripping_tools_keeps_assistant_text_and_joins_adjacent_turns() -> None:
    chatty_call = CALL | {"content": "Let me look."}
    record = to_training_record([USER, chatty_call, RESULT, ANSWER], None, include_tools=False)
    assert record == {
        "messages": [USER, {"role": "assistant", "content": "Let me look.\n\nYou have a.txt."}]
    }


def test_empty_assistant_messages_are_dropped() -> None:
    messages = [*PLAIN_CONVERSATION, {"role": "user", "content": "?"}]
    messages += [{"role": "assistant", "content": ""}, {"role": "assistant", "content": "Yes"}]
    assert roles(to_training_record(messages, None)) == ["user", "assistant", "user", "assistant"]


def test_conversation_without_assistant_reply_has_no_record() -> None:
    assert to_training_record([USER], "sys") is None
    assert to_training_record([], None) is None


def test_tool_call_only_conversation_has_no_record_without_tools() -> None:
    assert to_training_record([USER, CALL, RESULT], None, include_tools=False) is None


def test_record_ends_with_the_last_assistant_turn() -> None:
    record = to_training_record(
        [*PLAIN_CONVERSATION, {"role": "user", "content": "unanswered"}], None
    )
    assert roles(record) == ["user", "assistant"]


def test_an_interrupted_exchange_is_left_out_unless_asked_for() -> None:
    cut = {"role": "assistant", "content": "Once upon a", "interrupted": True}
    messages = [*PLAIN_CONVERSATION, {"role": "user", "content": "A story?"}, cut]
    assert to_training_record(messages, None) == {"messages": PLAIN_CONVERSATION}
    kept = to_training_record(messages, None, include_interrupted=True)
    assert roles(kept) == ["user", "assistant", "user", "assistant"]


def test_an_interrupted_tool_exchange_goes_out_whole_or_not_at_all() -> None:
    stopped = RESULT | {"interrupted": True}
    messages = [*PLAIN_CONVERSATION, USER, CALL, stopped]
    assert to_training_record(messages, None) == {"messages": PLAIN_CONVERSATION}


# --- formats ------------------------------------------------------------------------------


CONVERSATIONS = {
    "tools": TOOL_CONVERSATION,
    "plain": PLAIN_CONVERSATION,
    "unanswered": [{"role": "user", "content": "hello?"}],
}


def test_jsonl_has_one_valid_json_line_per_trainable_conversation() -> None:
    out = export_jsonl(CONVERSATIONS, dict.fromkeys(CONVERSATIONS, "sys"), include_tools=True)
    lines = out.splitlines()
    assert out.endswith("\n")
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert records[0] == to_training_record(TOOL_CONVERSATION, "sys")
    assert records[1] == to_training_record(PLAIN_CONVERSATION, "sys")


def test_jsonl_keeps_non_ascii_and_newlines_on_one_line() -> None:
    conversation = [
        {"role": "user", "content": "héllo\nworld"},
        {"role": "assistant", "content": "ça va"},
    ]
    out = export_jsonl({"c": conversation}, {})
    assert len(out.splitlines()) == 1
    assert "ça va" in out
    assert json.loads(out)["messages"][0]["content"] == "héllo\nworld"


def test_jsonl_without_tools_has_no_tool_traffic() -> None:
    out = export_jsonl(CONVERSATIONS, {}, include_tools=False)
    for line in out.splitlines():
        for message in json.loads(line)["messages"]:
            assert message["role"] != "tool"
            assert "tool_calls" not in message


def test_jsonl_of_nothing_is_empty() -> None:
    assert export_jsonl({}, {}) == ""


def test_json_is_a_list_of_ids_and_messages() -> None:
    out = json.loads(export_json(CONVERSATIONS, {}))
    assert [item["id"] for item in out] == ["tools", "plain"]
    assert out[1]["messages"] == PLAIN_CONVERSATION


def test_text_transcript_labels_every_turn() -> None:
    out = export_text(CONVERSATIONS, {"tools": "Be kind.", "plain": "Be brief."})
    assert out == (
        "### conversation tools\n"
        "System: Be kind.\n"
        "User: List my files\n"
        "Assistant calls list_dir({})\n"
        "Tool list_dir: a.txt\n"
        "Assistant: You have a.txt.\n"
        "\n"
        "### conversation plain\n"
        "System: Be brief.\n"
        "User: Hi\n"
        "Assistant: Hello\n"
        "\n"
    )


def test_text_without_tools_has_no_tool_lines() -> None:
    out = export_text({"tools": TOOL_CONVERSATION}, {}, include_tools=False)
    assert "Tool " not in out
    assert "calls" not in out


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_export_conversations_dispatches_each_format(fmt: str) -> None:
    assert export_conversations(fmt, CONVERSATIONS, {}) == EXPORTERS[fmt](
        CONVERSATIONS, {}, True, False
    )


def test_export_formats_and_exporters_agree() -> None:
    assert tuple(EXPORTERS) == EXPORT_FORMATS


def test_unknown_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="csv"):
        export_conversations("csv", CONVERSATIONS, {})


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        ("train.jsonl", "jsonl"),
        ("out/Train.JSONL", "jsonl"),
        ("data.json", "json"),
        ("notes.txt", "text"),
        ("transcript", "text"),
        ("archive.json.gz", "text"),
    ],
)
def test_format_follows_the_file_extension(path: str, fmt: str) -> None:
    assert format_for_filename(path) == fmt
