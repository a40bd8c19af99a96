"""Storage against a real SQLite file in a temporary directory."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from ailab.storage import (
    MIGRATIONS,
    AsyncStore,
    AuditRecord,
    PendingApproval,
    SchemaTooNewError,
    Store,
    merge_messages,
)

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "4"}
CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": '{"x":2}'}}
    ],
}
RESULT = {"role": "tool", "tool_call_id": "call_1", "name": "calc", "content": "4"}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "ailab.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store(db_path) as opened:
        yield opened


def audit(tool: str, conversation_id: str | None = "c1", **overrides: object) -> AuditRecord:
    fields: dict[str, object] = {
        "conversation_id": conversation_id,
        "tool": tool,
        "arguments": {"path": "a.txt"},
        "status": "success",
        "duration_ms": 1.5,
        "approval": "not_needed",
    }
    return AuditRecord.model_validate(fields | overrides)


def approval(approval_id: str = "a1", conversation_id: str = "c1") -> PendingApproval:
    return PendingApproval(
        approval_id=approval_id,
        conversation_id=conversation_id,
        tool_call_id="call_1",
        tool="write_file",
        arguments={"path": "x.txt", "content": "hi"},
        description="Write 2 bytes to x.txt",
        state={"remaining": [CALL], "stats": {"tokens": 12}, "options": {"temperature": 0.2}},
    )


# --- opening and migrations ---------------------------------------------------------------


def test_opening_creates_parent_directory_and_applies_every_migration(db_path: Path) -> None:
    with Store(db_path) as store:
        assert db_path.exists()
        assert store.schema_version == len(MIGRATIONS)


def test_database_uses_wal_journal(store: Store, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_reopening_is_idempotent_and_keeps_data(db_path: Path) -> None:
    with Store(db_path) as store:
        store.append_messages("c1", [USER, ASSISTANT])
        store.set_setting("system_prompt", "Be brief.")
    with Store(db_path) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert store.get_messages("c1") == [USER, ASSISTANT]
        assert store.get_setting("system_prompt") == "Be brief."


def test_opening_a_partially_migrated_database_applies_only_the_rest(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path)
    conn.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    conn.execute("INSERT INTO settings VALUES ('kept', 'true', '2024-01-01T00:00:00+00:00')")
    conn.commit()
    conn.close()
    with Store(db_path) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert store.get_setting("kept") is True
        store.record_tool_call(audit("read_file"))


def test_database_from_newer_code_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(SchemaTooNewError):
        Store(db_path)


# --- conversations ------------------------------------------------------------------------


def test_messages_keep_their_order_across_appends(store: Store) -> None:
    store.append_messages("c1", [USER, CALL])
    store.append_messages("c1", [RESULT, ASSISTANT])
    assert store.get_messages("c1") == [USER, CALL, RESULT, ASSISTANT]


def test_messages_round_trip_every_field(store: Store) -> None:
    odd = {"role": "assistant", "content": "ok", "reasoning_content": "thinking", "name": "bot"}
    store.append_messages("c1", [odd, RESULT])
    assert store.get_messages("c1") == [odd, RESULT]


def test_conversations_are_isolated(store: Store) -> None:
    store.append_messages("c1", [USER])
    store.append_messages("c2", [ASSISTANT])
    assert store.get_messages("c1") == [USER]
    assert store.get_messages("c2") == [ASSISTANT]


def test_unknown_conversation_has_no_messages_and_does_not_exist(store: Store) -> None:
    assert store.get_messages("nope") == []
    assert not store.conversation_exists("nope")


def test_append_creates_the_conversation(store: Store) -> None:
    store.append_messages("c1", [])
    assert store.conversation_exists("c1")


def test_reset_empties_but_keeps_the_conversation(store: Store) -> None:
    store.append_messages("c1", [USER, ASSISTANT])
    store.reset_conversation("c1")
    assert store.get_messages("c1") == []
    assert store.conversation_exists("c1")
    store.append_messages("c1", [USER])
    assert store.get_messages("c1") == [USER]


def test_delete_removes_the_conversation_and_its_messages(store: Store) -> None:
    store.append_messages("c1", [USER, ASSISTANT])
    assert store.delete_conversation("c1") is True
    assert not store.conversation_exists("c1")
    assert store.get_messages("c1") == []  # removed by the foreign-key cascade
    assert store.delete_conversation("c1") is False


def test_list_conversations_is_newest_first_with_titles_and_counts(store: Store) -> None:
    store.append_messages("old", [USER, ASSISTANT])
    store.append_messages("new", [{"role": "user", "content": "x" * 100}])
    store.append_messages("empty", [])
    store.append_messages("old", [USER])  # activity moves it to the top

    summaries = store.list_conversations()

    assert [s.id for s in summaries] == ["old", "empty", "new"]
    by_id = {s.id: s for s in summaries}
    assert by_id["old"].title == "What is 2+2?"
    assert by_id["old"].message_count == 3
    assert by_id["empty"].title is None
    assert by_id["empty"].message_count == 0
    assert len(by_id["new"].title or "") == 60


def test_title_skips_leading_assistant_and_collapses_whitespace(store: Store) -> None:
    store.append_messages("c1", [ASSISTANT, {"role": "user", "content": " two\n  lines "}])
    assert store.list_conversations()[0].title == "two lines"


def test_summary_timestamps_are_utc(store: Store) -> None:
    store.append_messages("c1", [USER])
    summary = store.list_conversations()[0]
    assert summary.created_at.utcoffset() == timedelta(0)
    assert summary.updated_at >= summary.created_at
    assert summary.model_dump(mode="json")["created_at"].endswith("Z")


def test_reset_clears_the_title(store: Store) -> None:
    store.append_messages("c1", [USER])
    store.reset_conversation("c1")
    assert store.list_conversations()[0].title is None


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["prompt", True, 35, 0.5, None, ["/srv/a", "/srv/b"], {"n_ctx": 4096, "gpu": [1, 2]}]
)
def test_settings_round_trip_json_values(store: Store, value: object) -> None:
    store.set_setting("key", value)
    assert store.get_setting("key", default="missing") == value


def test_missing_setting_returns_the_default(store: Store) -> None:
    assert store.get_setting("absent") is None
    assert store.get_setting("absent", 42) == 42


def test_setting_again_overwrites(store: Store) -> None:
    store.set_setting("tools_enabled", True)
    store.set_setting("tools_enabled", False)
    assert store.get_setting("tools_enabled") is False


def test_unserialisable_setting_is_rejected_and_nothing_stored(store: Store) -> None:
    with pytest.raises(TypeError):
        store.set_setting("bad", object())
    assert store.get_setting("bad", "absent") == "absent"


# --- tool audit ---------------------------------------------------------------------------


def test_audit_lists_newest_first_with_ids(store: Store) -> None:
    first = store.record_tool_call(audit("read_file"))
    second = store.record_tool_call(audit("write_file"))
    records = store.list_tool_audit()
    assert [(r.id, r.tool) for r in records] == [(second, "write_file"), (first, "read_file")]


def test_audit_filters_by_conversation_and_limits(store: Store) -> None:
    for i in range(3):
        store.record_tool_call(audit(f"t{i}", conversation_id="c1"))
    store.record_tool_call(audit("other", conversation_id="c2"))
    store.record_tool_call(audit("global", conversation_id=None))

    assert [r.tool for r in store.list_tool_audit(conversation_id="c1")] == ["t2", "t1", "t0"]
    assert [r.tool for r in store.list_tool_audit(limit=2)] == ["global", "other"]
    assert len(store.list_tool_audit()) == 5


def test_audit_round_trips_every_field(store: Store) -> None:
    when = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    record = audit(
        "run_command",
        arguments="{not json",
        status="refused",
        approval="policy_denied",
        error="outside tool roots",
        duration_ms=0.25,
        timestamp=when,
    )
    record_id = store.record_tool_call(record)
    (stored,) = store.list_tool_audit()
    assert stored == record.model_copy(update={"id": record_id})
    assert stored.timestamp == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert stored.arguments == "{not json"


def test_audit_rejects_unknown_status() -> None:
    with pytest.raises(ValueError):
        audit("x", status="maybe")


# --- pending approvals --------------------------------------------------------------------


def test_pending_approval_round_trips_including_state(store: Store) -> None:
    saved = approval()
    store.save_pending_approval(saved)
    assert store.get_pending_approval("c1", "a1") == saved


def test_pending_approval_is_scoped_to_its_conversation(store: Store) -> None:
    store.save_pending_approval(approval())
    assert store.get_pending_approval("c2", "a1") is None


def test_pending_approval_deleted_once(store: Store) -> None:
    store.save_pending_approval(approval())
    assert store.delete_pending_approval("c1", "a1") is True
    assert store.get_pending_approval("c1", "a1") is None
    assert store.delete_pending_approval("c1", "a1") is False


def test_pending_approval_survives_reopen(db_path: Path) -> None:
    saved = approval()
    with Store(db_path) as store:
        store.save_pending_approval(saved)
    with Store(db_path) as store:
        assert store.get_pending_approval("c1", "a1") == saved


@pytest.mark.parametrize("operation", ["reset_conversation", "delete_conversation"])
def test_clearing_a_conversation_drops_its_pending_approvals(store: Store, operation: str) -> None:
    store.append_messages("c1", [USER, CALL])
    store.save_pending_approval(approval("a1", "c1"))
    store.save_pending_approval(approval("a2", "c2"))
    getattr(store, operation)("c1")
    assert store.get_pending_approval("c1", "a1") is None
    assert store.get_pending_approval("c2", "a2") is not None


# --- benchmarks ---------------------------------------------------------------------------


def test_benchmarks_list_newest_first_with_payload(store: Store) -> None:
    first = store.record_benchmark({"model_key": "m1", "tokens_per_s": 10.5})
    second = store.record_benchmark(
        {"model_key": "m2", "timestamp": "2024-01-01T00:00:00+00:00", "runs": [1, 2]}
    )
    results = store.list_benchmarks()
    assert [r["id"] for r in results] == [second, first]
    assert results[0] == {
        "id": second,
        "model_key": "m2",
        "timestamp": "2024-01-01T00:00:00+00:00",
        "runs": [1, 2],
    }
    assert results[1]["tokens_per_s"] == 10.5
    assert datetime.fromisoformat(results[1]["timestamp"]).utcoffset() == timedelta(0)
    assert len(store.list_benchmarks(limit=1)) == 1


def test_benchmark_without_model_key_is_rejected(store: Store) -> None:
    with pytest.raises(ValueError, match="model_key"):
        store.record_benchmark({"tokens_per_s": 1.0})
    assert store.list_benchmarks() == []


# --- async facade -------------------------------------------------------------------------


def test_async_store_works_from_an_event_loop(db_path: Path) -> None:
    async def scenario() -> None:
        store = AsyncStore(db_path)
        try:
            await asyncio.gather(
                *(
                    store.append_messages("c1", [{"role": "user", "content": str(i)}])
                    for i in range(20)
                )
            )
            assert [m["content"] for m in await store.get_messages("c1")] == [
                str(i) for i in range(20)
            ]
            await store.set_setting("n_gpu_layers", 0)
            assert await store.get_setting("n_gpu_layers") == 0
            assert await store.conversation_exists("c1")
            assert [s.id for s in await store.list_conversations()] == ["c1"]
            await store.record_tool_call(audit("read_file"))
            assert len(await store.list_tool_audit(conversation_id="c1")) == 1
            await store.save_pending_approval(approval())
            assert await store.get_pending_approval("c1", "a1") is not None
            assert await store.delete_pending_approval("c1", "a1")
            await store.record_benchmark({"model_key": "m"})
            assert len(await store.list_benchmarks()) == 1
            await store.reset_conversation("c1")
            assert await store.delete_conversation("c1")
        finally:
            await store.close()

    asyncio.run(scenario())
    with Store(db_path) as reopened:
        assert reopened.get_setting("n_gpu_layers") == 0


def test_async_store_runs_everything_on_one_worker_thread(db_path: Path) -> None:
    async def scenario() -> set[str]:
        store = AsyncStore(db_path)
        names = await asyncio.gather(
            *(store._run(lambda: threading.current_thread().name) for _ in range(10))
        )
        await store.close()
        return set(names)

    names = asyncio.run(scenario())
    assert len(names) == 1
    assert names != {threading.current_thread().name}


# --- merge_messages -----------------------------------------------------------------------


def test_merge_full_history_resend_returns_only_the_tail() -> None:
    follow_up = {"role": "user", "content": "and 3+3?"}
    result = merge_messages([USER, ASSISTANT], [SYSTEM, USER, ASSISTANT, follow_up])
    assert result.new_messages == [follow_up]
    assert result.system_prompt == "You are terse."


def test_merge_append_only_request_appends_everything() -> None:
    follow_up = {"role": "user", "content": "and 3+3?"}
    result = merge_messages([USER, ASSISTANT], [follow_up])
    assert result.new_messages == [follow_up]
    assert result.system_prompt is None


def test_merge_identical_resend_adds_nothing() -> None:
    assert merge_messages([USER, ASSISTANT], [USER, ASSISTANT]).new_messages == []


def test_merge_into_empty_history_takes_all_non_system_messages() -> None:
    result = merge_messages([], [SYSTEM, USER])
    assert result.new_messages == [USER]


def test_merge_uses_the_last_system_message_and_never_stores_system() -> None:
    result = merge_messages(
        [SYSTEM, USER], [SYSTEM, USER, {"role": "system", "content": "Now verbose."}]
    )
    assert result.system_prompt == "Now verbose."
    assert result.new_messages == []


def test_merge_diverging_history_appends_all_incoming() -> None:
    edited = {"role": "user", "content": "What is 5+5?"}
    result = merge_messages([USER, ASSISTANT], [edited, ASSISTANT])
    assert result.new_messages == [edited, ASSISTANT]


def test_merge_recognises_tool_traffic_in_resent_history() -> None:
    echoed_call = CALL | {"content": ""}  # clients echo null content back as ""
    stored = [USER, CALL, RESULT, ASSISTANT]
    follow_up = {"role": "user", "content": "thanks"}
    result = merge_messages(stored, [USER, echoed_call, RESULT, ASSISTANT, follow_up])
    assert result.new_messages == [follow_up]


def test_merge_distinguishes_different_tool_call_ids() -> None:
    other_result = RESULT | {"tool_call_id": "call_2"}
    result = merge_messages([USER, CALL, RESULT], [USER, CALL, other_result])
    assert result.new_messages == [USER, CALL, other_result]


def test_a_given_title_replaces_the_derived_one_until_cleared(store: Store) -> None:
    store.append_messages("c1", [USER, ASSISTANT])
    assert store.rename_conversation("c1", "Arithmetic") is True
    assert store.list_conversations()[0].title == "Arithmetic"
    assert store.rename_conversation("c1", None) is True
    assert store.list_conversations()[0].title == "What is 2+2?"
    assert store.rename_conversation("missing", "x") is False


def test_search_finds_text_in_titles_and_messages_but_not_in_json_keys(store: Store) -> None:
    store.append_messages("math", [USER, ASSISTANT])
    store.append_messages("greeting", [{"role": "user", "content": "Grüße, 100% sure_x"}])
    store.rename_conversation("greeting", "Hello there")
    assert [s.id for s in store.list_conversations("2+2")] == ["math"]
    assert [s.id for s in store.list_conversations("GRÜSSE")] == []  # LIKE folds ASCII only
    assert [s.id for s in store.list_conversations("Grüße")] == ["greeting"]
    assert [s.id for s in store.list_conversations("HELLO")] == ["greeting"]
    assert [s.id for s in store.list_conversations("100%")] == ["greeting"]
    assert store.list_conversations("0%s") == []  # % and _ are not wildcards
    assert store.list_conversations("hell_ there") == []
    assert store.list_conversations("role") == []
