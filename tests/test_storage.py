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
    AuditUpdate,
    ConversationChanged,
    PendingApproval,
    SchemaTooNewError,
    StorageError,
    Store,
    TurnCommit,
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


def append(store: Store, conversation_id: str, messages: list[dict], **extra: object) -> None:
    """One turn's worth of messages, committed the way the gateway commits a turn."""
    expected = len(store.get_messages(conversation_id))
    store.commit_turn(
        TurnCommit.model_validate(
            {
                "conversation_id": conversation_id,
                "expected_count": expected,
                "messages": messages,
                **extra,
            }
        )
    )


def record(store: Store, entry: AuditRecord) -> int:
    return store.record_tool_calls([entry])[0]


def pending_ids(store: Store, conversation_id: str) -> list[str]:
    return [p.approval_id for p in store.load_conversation(conversation_id).pending]


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
        append(store, "c1", [USER, ASSISTANT])
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
        record(store, audit("read_file"))


def test_database_from_newer_code_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(SchemaTooNewError):
        Store(db_path)


# --- conversations ------------------------------------------------------------------------


def test_messages_keep_their_order_across_appends(store: Store) -> None:
    append(store, "c1", [USER, CALL])
    append(store, "c1", [RESULT, ASSISTANT])
    assert store.get_messages("c1") == [USER, CALL, RESULT, ASSISTANT]


def test_messages_round_trip_every_field(store: Store) -> None:
    odd = {"role": "assistant", "content": "ok", "reasoning_content": "thinking", "name": "bot"}
    append(store, "c1", [odd, RESULT])
    assert store.get_messages("c1") == [odd, RESULT]


def test_conversations_are_isolated(store: Store) -> None:
    append(store, "c1", [USER])
    append(store, "c2", [ASSISTANT])
    assert store.get_messages("c1") == [USER]
    assert store.get_messages("c2") == [ASSISTANT]


def test_unknown_conversation_has_no_messages_and_does_not_exist(store: Store) -> None:
    assert store.get_messages("nope") == []
    assert not store.conversation_exists("nope")


def test_append_creates_the_conversation(store: Store) -> None:
    append(store, "c1", [])
    assert store.conversation_exists("c1")


def test_reset_empties_but_keeps_the_conversation(store: Store) -> None:
    append(store, "c1", [USER, ASSISTANT])
    store.reset_conversation("c1")
    assert store.get_messages("c1") == []
    assert store.conversation_exists("c1")
    append(store, "c1", [USER])
    assert store.get_messages("c1") == [USER]


def test_delete_removes_the_conversation_and_its_messages(store: Store) -> None:
    append(store, "c1", [USER, ASSISTANT])
    assert store.delete_conversation("c1") is True
    assert not store.conversation_exists("c1")
    assert store.get_messages("c1") == []  # removed by the foreign-key cascade
    assert store.delete_conversation("c1") is False


def test_list_conversations_is_newest_first_with_titles_and_counts(store: Store) -> None:
    append(store, "old", [USER, ASSISTANT])
    append(store, "new", [{"role": "user", "content": "x" * 100}])
    append(store, "empty", [])
    append(store, "old", [USER])  # activity moves it to the top

    summaries = store.list_conversations()

    assert [s.id for s in summaries] == ["old", "empty", "new"]
    by_id = {s.id: s for s in summaries}
    assert by_id["old"].title == "What is 2+2?"
    assert by_id["old"].message_count == 3
    assert by_id["empty"].title is None
    assert by_id["empty"].message_count == 0
    assert len(by_id["new"].title or "") == 60


def test_title_skips_leading_assistant_and_collapses_whitespace(store: Store) -> None:
    append(store, "c1", [ASSISTANT, {"role": "user", "content": " two\n  lines "}])
    assert store.list_conversations()[0].title == "two lines"


def test_summary_timestamps_are_utc(store: Store) -> None:
    append(store, "c1", [USER])
    summary = store.list_conversations()[0]
    assert summary.created_at.utcoffset() == timedelta(0)
    assert summary.updated_at >= summary.created_at
    assert summary.model_dump(mode="json")["created_at"].endswith("Z")


def test_reset_clears_the_title(store: Store) -> None:
    append(store, "c1", [USER])
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
    first = record(store, audit("read_file"))
    second = record(store, audit("write_file"))
    records = store.list_tool_audit()
    assert [(r.id, r.tool) for r in records] == [(second, "write_file"), (first, "read_file")]


def test_audit_filters_by_conversation_and_limits(store: Store) -> None:
    for i in range(3):
        record(store, audit(f"t{i}", conversation_id="c1"))
    record(store, audit("other", conversation_id="c2"))
    record(store, audit("global", conversation_id=None))

    assert [r.tool for r in store.list_tool_audit(conversation_id="c1")] == ["t2", "t1", "t0"]
    assert [r.tool for r in store.list_tool_audit(limit=2)] == ["global", "other"]
    assert len(store.list_tool_audit()) == 5


def test_audit_round_trips_every_field(store: Store) -> None:
    when = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    entry = audit(
        "run_command",
        arguments="{not json",
        status="refused",
        approval="policy_denied",
        error="outside tool roots",
        duration_ms=0.25,
        timestamp=when,
        server="fs",
        result_chars=42,
    )
    record_id = record(store, entry)
    (stored,) = store.list_tool_audit()
    assert stored == entry.model_copy(update={"id": record_id})
    assert stored.timestamp == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert stored.arguments == "{not json"


def test_audit_rejects_unknown_status() -> None:
    with pytest.raises(ValueError):
        audit("x", status="maybe")


# --- pending approvals --------------------------------------------------------------------


def test_pending_approval_round_trips_including_state(store: Store) -> None:
    saved = approval()
    append(store, "c1", [USER, CALL], pending=saved)
    assert store.load_conversation("c1").pending == [saved]


def test_pending_approval_is_scoped_to_its_conversation(store: Store) -> None:
    append(store, "c1", [USER, CALL], pending=approval())
    assert pending_ids(store, "c2") == []


def test_a_turn_drops_the_approvals_it_decides(store: Store) -> None:
    append(store, "c1", [USER, CALL], pending=approval())
    append(store, "c1", [RESULT, ASSISTANT], dropped_approvals=["a1"])
    assert pending_ids(store, "c1") == []
    assert store.get_messages("c1") == [USER, CALL, RESULT, ASSISTANT]


def test_pending_approval_survives_reopen(db_path: Path) -> None:
    saved = approval()
    with Store(db_path) as store:
        append(store, "c1", [USER, CALL], pending=saved)
    with Store(db_path) as store:
        assert store.load_conversation("c1").pending == [saved]


@pytest.mark.parametrize("operation", ["reset_conversation", "delete_conversation"])
def test_clearing_a_conversation_drops_its_pending_approvals(store: Store, operation: str) -> None:
    append(store, "c1", [USER, CALL], pending=approval("a1", "c1"))
    append(store, "c2", [USER, CALL], pending=approval("a2", "c2"))
    getattr(store, operation)("c1")
    assert pending_ids(store, "c1") == []
    assert pending_ids(store, "c2") == ["a2"]


@pytest.mark.parametrize(
    ("operation", "reason"),
    [("reset_conversation", "reset"), ("delete_conversation", "deleted")],
)
def test_calls_of_a_dropped_approval_are_marked_superseded_in_the_audit(
    store: Store, operation: str, reason: str
) -> None:
    row = record(store, audit("write_file", status="pending", approval="undecided"))
    waiting = approval().model_copy(update={"audit_ids": [row]})
    append(store, "c1", [USER, CALL], pending=waiting)
    getattr(store, operation)("c1")
    (entry,) = store.list_tool_audit()
    assert (entry.status, entry.approval) == ("superseded", "undecided")
    assert reason in (entry.error or "")


# --- turns --------------------------------------------------------------------------------


def test_a_turn_commits_its_messages_prompts_approval_and_audit_together(store: Store) -> None:
    row = record(store, audit("write_file", status="running", approval="approved"))
    append(
        store,
        "c1",
        [USER, CALL, RESULT, ASSISTANT],
        system_prompt="Be a pirate.",
        used_system_prompt="Be a pirate.",
        audit=[AuditUpdate(id=row, status="success", duration_ms=3.0)],
    )
    stored = store.load_conversation("c1")
    assert stored.messages == [USER, CALL, RESULT, ASSISTANT]
    assert (stored.system_prompt, stored.used_system_prompt) == ("Be a pirate.", "Be a pirate.")
    (entry,) = store.list_tool_audit()
    assert (entry.status, entry.approval, entry.duration_ms) == ("success", "approved", 3.0)


def test_a_turn_that_fails_while_writing_leaves_nothing_behind(store: Store) -> None:
    append(store, "c1", [USER, CALL], pending=approval())
    unwritable = {"role": "assistant", "content": object()}  # not JSON: fails mid-commit
    with pytest.raises(TypeError):
        append(store, "c1", [RESULT, unwritable], dropped_approvals=["a1"], system_prompt="x")
    stored = store.load_conversation("c1")
    assert stored.messages == [USER, CALL]
    assert [p.approval_id for p in stored.pending] == ["a1"]
    assert stored.system_prompt is None


def test_a_turn_built_on_an_outdated_history_is_refused(store: Store) -> None:
    append(store, "c1", [USER, ASSISTANT])
    with pytest.raises(ConversationChanged):
        store.commit_turn(TurnCommit(conversation_id="c1", expected_count=0, messages=[USER]))
    assert store.get_messages("c1") == [USER, ASSISTANT]


def test_a_regenerated_answer_replaces_everything_after_the_kept_messages(store: Store) -> None:
    append(store, "c1", [USER, CALL, RESULT, ASSISTANT])
    again = {"role": "assistant", "content": "Four."}
    append(store, "c1", [again], keep=1)
    assert store.get_messages("c1") == [USER, again]
    append(store, "c1", [USER])
    assert store.get_messages("c1") == [USER, again, USER]


def test_reset_forgets_the_conversation_prompt(store: Store) -> None:
    append(store, "c1", [USER], system_prompt="Be a pirate.", used_system_prompt="Be a pirate.")
    store.reset_conversation("c1")
    stored = store.load_conversation("c1")
    assert (stored.exists, stored.system_prompt, stored.used_system_prompt) == (True, None, None)


def test_opening_closes_audit_rows_a_killed_gateway_left_open(db_path: Path) -> None:
    with Store(db_path) as store:
        ran = record(store, audit("write_file", status="running", approval="approved"))
        never = record(store, audit("read_file", status="pending", approval="undecided"))
        asked = record(store, audit("delete_file", status="pending", approval="undecided"))
        waiting = approval().model_copy(update={"audit_ids": [asked]})
        append(store, "c1", [USER, CALL], pending=waiting)
    with Store(db_path) as store:
        rows = {r.id: r for r in store.list_tool_audit()}
    assert rows[ran].status == "error" and "unknown" in (rows[ran].error or "")
    assert rows[never].status == "cancelled"
    assert rows[asked].status == "pending"


def test_a_damaged_database_file_is_refused_naming_the_file(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not a database, just some bytes" * 100)
    with pytest.raises(StorageError, match=str(db_path)) as caught:
        Store(db_path)
    assert "damaged" in str(caught.value)


def test_a_database_on_a_read_only_file_system_is_refused_clearly() -> None:
    # /proc takes no new files from anybody, root included.
    target = Path("/proc/ailab-test/ailab.sqlite3")
    with pytest.raises(StorageError, match="/proc/ailab-test") as caught:
        Store(target)
    assert "writable" in str(caught.value)


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
                    store.commit_turn(
                        TurnCommit(
                            conversation_id="c1",
                            expected_count=i,
                            messages=[{"role": "user", "content": str(i)}],
                        )
                    )
                    for i in range(20)
                )
            )
            assert [m["content"] for m in await store.get_messages("c1")] == [
                str(i) for i in range(20)
            ]
            await store.set_setting("n_gpu_layers", 0)
            assert await store.get_setting("n_gpu_layers") == 0
            assert store.conversation_exists("c1")
            assert [s.id for s in await store.list_conversations()] == ["c1"]
            await store.record_tool_calls([audit("read_file")])
            assert len(await store.list_tool_audit(conversation_id="c1")) == 1
            await store.commit_turn(
                TurnCommit(conversation_id="c1", expected_count=20, messages=[], pending=approval())
            )
            assert len((await store.load_conversation("c1")).pending) == 1
            await store.record_benchmark({"model_key": "m"})
            assert len(await store.list_benchmarks()) == 1
            await store.reset_conversation("c1")
            assert await store.delete_conversation("c1")
        finally:
            await store.close()

    asyncio.run(scenario())
    with Store(db_path) as reopened:
        assert reopened.get_setting("n_gpu_layers") == 0


def test_the_conversations_kept_in_memory_always_match_the_database(db_path: Path) -> None:
    """Whatever the order of reads and writes, what AsyncStore hands out from memory is
    what a fresh read of the file says."""
    with Store(db_path) as seed:
        append(seed, "c1", [USER, CALL], pending=approval())

    def on_disk(conversation_id: str) -> object:
        with Store(db_path) as fresh:
            return fresh.load_conversation(conversation_id)

    async def turn(store: AsyncStore, messages: list[dict], expected: int, **extra: object) -> None:
        fields = {"conversation_id": "c1", "expected_count": expected, "messages": messages}
        await store.commit_turn(TurnCommit.model_validate(fields | extra))

    async def scenario() -> None:
        store = AsyncStore(db_path)
        try:
            # A read and a write on the same conversation at once.
            await asyncio.gather(
                store.load_conversation("c1"),
                turn(store, [RESULT, ASSISTANT], 2, dropped_approvals=["a1"]),
            )
            assert await store.load_conversation("c1") == on_disk("c1")
            await turn(store, [{"role": "assistant", "content": "again"}], 4, keep=1)
            assert await store.load_conversation("c1") == on_disk("c1")
            await turn(store, [USER], 2, system_prompt="p", used_system_prompt="p")
            assert await store.load_conversation("c1") == on_disk("c1")
            await store.reset_conversation("c1")
            assert await store.load_conversation("c1") == on_disk("c1")
            await store.delete_conversation("c1")
            assert await store.load_conversation("c1") == on_disk("c1")
            assert not store.conversation_exists("c1")
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_recent_or_new_conversation_is_read_without_touching_the_database(
    db_path: Path,
) -> None:
    async def scenario() -> None:
        store = AsyncStore(db_path)
        try:
            commit = TurnCommit(conversation_id="c1", expected_count=0, messages=[USER])
            await store.commit_turn(commit)
            real_run = store._run

            async def no_database(*args: object, **kwargs: object) -> object:
                raise AssertionError("the database was read")

            store._run = no_database  # type: ignore[method-assign]
            assert (await store.load_conversation("c1")).messages == [USER]
            assert (await store.load_conversation("new")).exists is False
            store._run = real_run  # type: ignore[method-assign]
        finally:
            await store.close()

    asyncio.run(scenario())


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
    append(store, "c1", [USER, ASSISTANT])
    assert store.rename_conversation("c1", "Arithmetic") is True
    assert store.list_conversations()[0].title == "Arithmetic"
    assert store.rename_conversation("c1", None) is True
    assert store.list_conversations()[0].title == "What is 2+2?"
    assert store.rename_conversation("missing", "x") is False


def test_search_finds_text_in_titles_and_messages_but_not_in_json_keys(store: Store) -> None:
    append(store, "math", [USER, ASSISTANT])
    append(store, "greeting", [{"role": "user", "content": "Grüße, 100% sure_x"}])
    store.rename_conversation("greeting", "Hello there")
    assert [s.id for s in store.list_conversations("2+2")] == ["math"]
    assert [s.id for s in store.list_conversations("GRÜSSE")] == []  # LIKE folds ASCII only
    assert [s.id for s in store.list_conversations("Grüße")] == ["greeting"]
    assert [s.id for s in store.list_conversations("HELLO")] == ["greeting"]
    assert [s.id for s in store.list_conversations("100%")] == ["greeting"]
    assert store.list_conversations("0%s") == []  # % and _ are not wildcards
    assert store.list_conversations("hell_ there") == []
    assert store.list_conversations("role") == []
