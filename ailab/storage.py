"""SQLite persistence for AI Lab: conversations, settings, tool audit, approvals, benchmarks.

`Store` is the synchronous core; `AsyncStore` is what the async server uses. All SQL lives in
this module. The schema is a list of numbered migrations; `PRAGMA user_version` records how many
have been applied, so opening a database brings it up to date and reopening changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

from pydantic import AfterValidator, BaseModel, Field

from ailab.errors import AilabError, Unavailable

TITLE_MAX_CHARS = 60
CACHED_CONVERSATIONS = 64  # kept in memory by AsyncStore

# Append only: a released migration is never edited, a schema change is a new entry.
# Statements are split on ";", so none may contain one (no triggers or literal semicolons).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        role TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (conversation_id, position)
    );
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    """,
    """
    CREATE TABLE tool_audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        timestamp TEXT NOT NULL,
        conversation_id TEXT,
        tool TEXT NOT NULL,
        arguments TEXT NOT NULL,
        status TEXT NOT NULL,
        duration_ms REAL NOT NULL,
        approval TEXT NOT NULL,
        error TEXT
    );
    CREATE INDEX tool_audit_by_conversation ON tool_audit (conversation_id, id);
    CREATE TABLE pending_approvals (
        conversation_id TEXT NOT NULL,
        approval_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        PRIMARY KEY (conversation_id, approval_id)
    );
    """,
    """
    CREATE TABLE benchmarks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        model_key TEXT NOT NULL,
        timestamp TEXT NOT NULL,
        payload TEXT NOT NULL
    );
    """,
    """
    ALTER TABLE conversations ADD COLUMN system_prompt TEXT;
    ALTER TABLE conversations ADD COLUMN used_system_prompt TEXT;
    ALTER TABLE tool_audit ADD COLUMN tool_call_id TEXT;
    """,
    """
    ALTER TABLE tool_audit ADD COLUMN server TEXT;
    ALTER TABLE tool_audit ADD COLUMN result_chars INTEGER;
    """,
    # The model a conversation runs on; NULL (older conversations) means the default.
    "ALTER TABLE conversations ADD COLUMN model_key TEXT",
    # A title the user gave; NULL means "the first user message, shortened".
    """
    ALTER TABLE conversations ADD COLUMN title TEXT;
    """,
)


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer AI Lab; refusing to guess at its schema."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    # Naive datetimes are taken to be UTC so every stored timestamp compares on one clock.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]


class ConversationSummary(BaseModel):
    id: str
    title: str | None
    model_key: str | None = None  # the model its last turn ran on
    message_count: int
    created_at: UtcDatetime
    updated_at: UtcDatetime


AuditStatus = Literal[
    "pending", "running", "success", "error", "refused", "superseded", "cancelled"
]
Approval = Literal["undecided", "not_needed", "approved", "denied", "auto", "policy_denied"]


class AuditRecord(BaseModel):
    """A tool call as the audit log keeps it: written when the model proposes the call
    (pending), updated when it is decided and started (running) and with its result."""

    id: int | None = None
    timestamp: UtcDatetime = Field(default_factory=utc_now)
    conversation_id: str | None = None
    tool_call_id: str | None = None
    tool: str
    server: str | None = None  # the MCP server a tool came from; None for a built-in
    # A string when the model produced arguments that are not a JSON object.
    arguments: dict[str, Any] | str
    status: AuditStatus
    duration_ms: float = 0.0
    approval: Approval
    error: str | None = None
    result_chars: int | None = None  # the whole result's length, before the model's cap


class AuditUpdate(BaseModel):
    """A later state of an audit row: its decision, or its outcome."""

    id: int
    status: AuditStatus
    approval: Approval | None = None  # None keeps the recorded decision
    duration_ms: float | None = None
    error: str | None = None
    result_chars: int | None = None  # the whole result's length, before the model's cap


class PendingApproval(BaseModel):
    approval_id: str
    conversation_id: str
    tool_call_id: str
    tool: str
    arguments: dict[str, Any]
    description: str
    created_at: UtcDatetime = Field(default_factory=utc_now)
    # The audit rows of this call and of the turn's later calls, still undecided.
    audit_ids: list[int] = Field(default_factory=list)
    # Opaque to storage: whatever the server needs to resume its agent loop.
    state: dict[str, Any] = Field(default_factory=dict)


class TurnCommit(BaseModel):
    """Everything one turn changes in a conversation, written in one transaction."""

    conversation_id: str
    # How many messages were stored when the turn read the history; a different count at
    # commit time means something else wrote meanwhile, and the commit is refused.
    expected_count: int
    # Stored messages that stay; the rest is replaced by ``messages`` (a regenerated
    # answer). None keeps them all.
    keep: int | None = None
    messages: list[dict[str, Any]]
    system_prompt: str | None = None  # the conversation's own prompt (None: the default)
    used_system_prompt: str | None = None  # the prompt this turn was generated with
    model_key: str | None = None  # the model the turn ran on: the conversation's from now on
    pending: PendingApproval | None = None
    dropped_approvals: list[str] = Field(default_factory=list)
    audit: list[AuditUpdate] = Field(default_factory=list)


@dataclass(frozen=True)
class StoredConversation:
    exists: bool
    messages: list[dict[str, Any]]
    system_prompt: str | None
    used_system_prompt: str | None
    model_key: str | None  # None: never answered yet, or older than the model pool
    pending: list[PendingApproval]


def describe_failure(db_path: Path, exc: BaseException) -> str:
    """What went wrong with the database file, and what to do about it."""
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        hint = "the file is damaged: move it away to start afresh, or restore a backup"
    elif "full" in text:
        hint = "the disk is full: free some space"
    else:
        hint = "check that the data directory (AILAB_DATA_DIR) exists and is writable"
    return f"the database {db_path} cannot be used ({text}); {hint}"


_ABSENT = StoredConversation(
    exists=False,
    messages=[],
    system_prompt=None,
    used_system_prompt=None,
    model_key=None,
    pending=[],
)


class ConversationChanged(AilabError):
    """The conversation changed under a turn that was about to commit."""

    status = 409


class StorageError(Unavailable):
    """The database cannot be opened, read or written; the message names it and why."""


def _iso(value: datetime) -> str:
    return _as_utc(value).isoformat()


# ?1 is a LIKE pattern (see _like_pattern); a message matches on its text, not its JSON.
_SEARCH_MATCH = (
    "c.title LIKE ?1 ESCAPE '\\' OR c.id LIKE ?1 ESCAPE '\\' OR EXISTS ("
    "SELECT 1 FROM messages m WHERE m.conversation_id = c.id "
    "AND json_extract(m.payload, '$.content') LIKE ?1 ESCAPE '\\')"
)


def _like_pattern(text: str) -> str:
    """`text` anywhere, with LIKE's wildcards in it taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _title(content: Any) -> str | None:
    if not isinstance(content, str) or not content.strip():
        return None
    text = " ".join(content.split())
    return text if len(text) <= TITLE_MAX_CHARS else text[: TITLE_MAX_CHARS - 1] + "…"


class Store:
    """Synchronous SQLite store; safe to share between threads (calls are serialised)."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path
        self._lock = threading.RLock()
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (see _transaction).
            self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode = WAL")
            # With WAL, NORMAL never corrupts and survives an application crash; only a
            # power cut can lose the last commits. FULL would cost an fsync per turn.
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
            with self._transaction() as conn:
                _close_abandoned_audit(conn)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(describe_failure(db_path, exc)) from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._conn.execute("PRAGMA user_version").fetchone()[0]

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _migrate(self) -> None:
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise SchemaTooNewError(
                f"database schema version {current} is newer than this code "
                f"({len(MIGRATIONS)}); upgrade AI Lab or use another database file"
            )
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            # Each migration and its version bump commit together or not at all.
            # Statement by statement: executescript() would COMMIT before the version bump.
            with self._transaction() as conn:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")

    # --- conversations ------------------------------------------------------------------

    def conversation_exists(self, conversation_id: str) -> bool:
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
        return row is not None

    def conversation_ids(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self._conn.execute("SELECT id FROM conversations")]

    def get_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT payload FROM messages WHERE conversation_id = ? ORDER BY position",
                (conversation_id,),
            ).fetchall()
        return [json.loads(row["payload"]) for row in rows]

    def load_conversation(self, conversation_id: str) -> StoredConversation:
        """Everything a turn starts from, read at once."""
        with self._lock:
            row = self._conn.execute(
                "SELECT system_prompt, used_system_prompt, model_key FROM conversations "
                "WHERE id = ?",
                (conversation_id,),
            ).fetchone()
            pending = self._conn.execute(
                "SELECT payload FROM pending_approvals WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchall()
            messages = self.get_messages(conversation_id)
        return StoredConversation(
            exists=row is not None,
            messages=messages,
            system_prompt=row["system_prompt"] if row else None,
            used_system_prompt=row["used_system_prompt"] if row else None,
            model_key=row["model_key"] if row else None,
            pending=[PendingApproval.model_validate_json(p["payload"]) for p in pending],
        )

    def commit_turn(self, commit: TurnCommit) -> None:
        """Write a turn whole: its messages, the conversation's prompts, its approvals and
        audit updates. Raises ConversationChanged (writing nothing) when the stored history
        is no longer the one the turn was built on."""
        cid, now = commit.conversation_id, _iso(utc_now())
        keep = commit.expected_count if commit.keep is None else commit.keep
        with self._transaction() as conn:
            count = conn.execute(
                "SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (cid,)
            ).fetchone()[0]
            if count != commit.expected_count:
                raise ConversationChanged(
                    f"conversation {cid!r} holds {count} messages, the turn expected "
                    f"{commit.expected_count}"
                )
            conn.execute(
                "INSERT INTO conversations (id, created_at, updated_at, system_prompt, "
                "used_system_prompt, model_key) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET updated_at = excluded.updated_at, "
                "system_prompt = excluded.system_prompt, "
                "used_system_prompt = excluded.used_system_prompt, "
                "model_key = COALESCE(excluded.model_key, model_key)",
                (cid, now, now, commit.system_prompt, commit.used_system_prompt, commit.model_key),
            )
            conn.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND position >= ?", (cid, keep)
            )
            conn.executemany(
                "INSERT INTO messages (conversation_id, position, role, payload, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (cid, keep + i, m["role"], json.dumps(m), now)
                    for i, m in enumerate(commit.messages)
                ],
            )
            conn.executemany(
                "DELETE FROM pending_approvals WHERE conversation_id = ? AND approval_id = ?",
                [(cid, approval_id) for approval_id in commit.dropped_approvals],
            )
            if commit.pending is not None:
                _insert_pending(conn, commit.pending)
            _update_audit(conn, commit.audit)

    def reset_conversation(self, conversation_id: str) -> None:
        """Empty the conversation but keep its id; pending approvals for it are dropped."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            _retire_pending(conn, conversation_id, "the conversation was reset")
            conn.execute(
                "UPDATE conversations SET updated_at = ?, system_prompt = NULL, "
                "used_system_prompt = NULL WHERE id = ?",
                (_iso(utc_now()), conversation_id),
            )

    def delete_conversation(self, conversation_id: str) -> bool:
        with self._transaction() as conn:
            _retire_pending(conn, conversation_id, "the conversation was deleted")
            deleted = conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        return deleted.rowcount > 0

    def list_conversations(self, text: str | None = None) -> list[ConversationSummary]:
        """Newest first; with `text`, only those whose title, id or a message's content
        contains it (case-insensitive for ASCII letters, as SQLite's LIKE)."""
        where, params = ("WHERE " + _SEARCH_MATCH, (_like_pattern(text),)) if text else ("", ())
        with self._lock:
            rows = self._conn.execute(
                f"""
                SELECT c.id, c.title, c.model_key, c.created_at, c.updated_at,
                       (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id)
                           AS message_count,
                       (SELECT m.payload FROM messages m
                         WHERE m.conversation_id = c.id AND m.role = 'user'
                         ORDER BY m.position LIMIT 1) AS first_user
                FROM conversations c
                {where}
                ORDER BY c.updated_at DESC, c.rowid DESC
                """,
                params,
            ).fetchall()
        return [
            ConversationSummary(
                id=row["id"],
                title=row["title"]
                or (
                    _title(json.loads(row["first_user"]).get("content"))
                    if row["first_user"]
                    else None
                ),
                model_key=row["model_key"],
                message_count=row["message_count"],
                created_at=row["created_at"],
                updated_at=row["updated_at"],
            )
            for row in rows
        ]

    def rename_conversation(self, conversation_id: str, title: str | None) -> bool:
        """Give the conversation a title (None goes back to the derived one); False if it
        does not exist. The time it was last updated is left alone: renaming is no turn."""
        with self._transaction() as conn:
            changed = conn.execute(
                "UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id)
            )
        return changed.rowcount > 0

    # --- settings -----------------------------------------------------------------------

    def get_setting(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    def set_setting(self, key: str, value: Any) -> None:
        """Store any JSON-serialisable value; raises TypeError for anything else."""
        encoded = json.dumps(value)
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at",
                (key, encoded, _iso(utc_now())),
            )

    # --- tool audit ---------------------------------------------------------------------

    def record_tool_calls(self, records: list[AuditRecord]) -> list[int]:
        """Insert audit rows (one transaction) and return their ids, in order."""
        with self._transaction() as conn:
            return [
                int(
                    conn.execute(
                        "INSERT INTO tool_audit (timestamp, conversation_id, tool_call_id, tool, "
                        "server, arguments, status, duration_ms, approval, error, result_chars) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            _iso(record.timestamp),
                            record.conversation_id,
                            record.tool_call_id,
                            record.tool,
                            record.server,
                            json.dumps(record.arguments),
                            record.status,
                            record.duration_ms,
                            record.approval,
                            record.error,
                            record.result_chars,
                        ),
                    ).lastrowid
                    or 0
                )
                for record in records
            ]

    def update_tool_calls(self, updates: list[AuditUpdate]) -> None:
        with self._transaction() as conn:
            _update_audit(conn, updates)

    def list_tool_audit(
        self, limit: int = 100, conversation_id: str | None = None
    ) -> list[AuditRecord]:
        """Most recently recorded first, optionally for one conversation."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM tool_audit WHERE ? IS NULL OR conversation_id = ? "
                "ORDER BY id DESC LIMIT ?",
                (conversation_id, conversation_id, limit),
            ).fetchall()
        return [
            AuditRecord.model_validate({**dict(row), "arguments": json.loads(row["arguments"])})
            for row in rows
        ]

    # --- benchmarks ---------------------------------------------------------------------

    def record_benchmark(self, result: dict[str, Any]) -> int:
        """Store a benchmark result; it must carry a "model_key", "timestamp" defaults to now."""
        model_key = result.get("model_key")
        if not isinstance(model_key, str) or not model_key:
            raise ValueError("benchmark result needs a non-empty 'model_key'")
        timestamp = str(result.get("timestamp") or _iso(utc_now()))
        payload = json.dumps(result)
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO benchmarks (model_key, timestamp, payload) VALUES (?, ?, ?)",
                (model_key, timestamp, payload),
            )
        return int(cursor.lastrowid or 0)

    def list_benchmarks(self, limit: int = 50) -> list[dict[str, Any]]:
        """Most recently recorded first: the stored result plus its id and timestamp."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM benchmarks ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [
            {
                **json.loads(row["payload"]),
                "id": row["id"],
                "model_key": row["model_key"],
                "timestamp": row["timestamp"],
            }
            for row in rows
        ]


def _insert_pending(conn: sqlite3.Connection, approval: PendingApproval) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO pending_approvals (conversation_id, approval_id, payload) "
        "VALUES (?, ?, ?)",
        (approval.conversation_id, approval.approval_id, approval.model_dump_json()),
    )


def _update_audit(conn: sqlite3.Connection, updates: list[AuditUpdate]) -> None:
    conn.executemany(
        "UPDATE tool_audit SET status = ?, approval = COALESCE(?, approval), "
        "duration_ms = COALESCE(?, duration_ms), error = COALESCE(?, error), "
        "result_chars = COALESCE(?, result_chars) WHERE id = ?",
        [(u.status, u.approval, u.duration_ms, u.error, u.result_chars, u.id) for u in updates],
    )


def _retire_pending(conn: sqlite3.Connection, conversation_id: str, reason: str) -> None:
    """Drop a conversation's pending approvals; their calls never run, and the audit says
    why."""
    rows = conn.execute(
        "SELECT payload FROM pending_approvals WHERE conversation_id = ?", (conversation_id,)
    ).fetchall()
    ids = [i for row in rows for i in PendingApproval.model_validate_json(row[0]).audit_ids]
    _update_audit(conn, [AuditUpdate(id=i, status="superseded", error=reason) for i in ids])
    conn.execute("DELETE FROM pending_approvals WHERE conversation_id = ?", (conversation_id,))


def _close_abandoned_audit(conn: sqlite3.Connection) -> None:
    """Audit rows a stopped gateway left open: a call that was running has an unknown
    outcome; one that was proposed but is in no pending approval will never run."""
    waiting = {
        i
        for (payload,) in conn.execute("SELECT payload FROM pending_approvals").fetchall()
        for i in PendingApproval.model_validate_json(payload).audit_ids
    }
    conn.execute(
        "UPDATE tool_audit SET status = 'error', error = 'the gateway stopped while this "
        "call ran; its effect is unknown' WHERE status = 'running'"
    )
    open_rows = conn.execute("SELECT id FROM tool_audit WHERE status = 'pending'").fetchall()
    conn.executemany(
        "UPDATE tool_audit SET status = 'cancelled', error = 'the gateway stopped before "
        "this call ran' WHERE id = ?",
        [(row[0],) for row in open_rows if row[0] not in waiting],
    )


P = ParamSpec("P")
T = TypeVar("T")


class AsyncStore:
    """Async facade: every call runs on one dedicated thread, so the event loop never blocks
    on SQLite and database access is serialised in arrival order.

    It also keeps the conversations it last read or wrote, and the ids of all of them, so
    that a turn on a recent or a new conversation awaits nothing from the disk before its
    first token. Only this object writes the database, and it updates its copy after every
    write that succeeded. Reads and writes run in arrival order on the one thread and finish
    in that order, so a read is kept before any later write is applied to the copy."""

    def __init__(self, db_path: Path) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ailab-store")
        self._store = Store(db_path)
        self._known = set(self._store.conversation_ids())
        self._cache: OrderedDict[str, StoredConversation] = OrderedDict()

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))
        except sqlite3.Error as exc:
            raise StorageError(describe_failure(self._store.path, exc)) from exc

    async def close(self) -> None:
        await self._run(self._store.close)
        self._executor.shutdown(wait=True)

    # --- conversations, with the copy kept in memory ---------------------------------------

    def conversation_exists(self, conversation_id: str) -> bool:
        return conversation_id in self._known

    async def get_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        return (await self.load_conversation(conversation_id)).messages

    async def load_conversation(self, conversation_id: str) -> StoredConversation:
        """The conversation (an empty one when it does not exist); callers must not
        change what they get."""
        if conversation_id not in self._known:
            return _ABSENT
        cached = self._cache.get(conversation_id)
        if cached is not None:
            self._cache.move_to_end(conversation_id)
            return cached
        loaded = await self._run(self._store.load_conversation, conversation_id)
        self._keep(conversation_id, loaded)
        return loaded

    async def commit_turn(self, commit: TurnCommit) -> None:
        cid = commit.conversation_id
        before = self._cache.get(cid) if cid in self._known else _ABSENT
        await self._run(self._store.commit_turn, commit)
        self._known.add(cid)
        if before is None or len(before.messages) != commit.expected_count:
            self._cache.pop(cid, None)  # read again when next needed
            return
        keep = commit.expected_count if commit.keep is None else commit.keep
        pending = [p for p in before.pending if p.approval_id not in commit.dropped_approvals]
        after = StoredConversation(
            exists=True,
            messages=[*before.messages[:keep], *commit.messages],
            system_prompt=commit.system_prompt,
            used_system_prompt=commit.used_system_prompt,
            model_key=commit.model_key or before.model_key,
            pending=pending + ([commit.pending] if commit.pending else []),
        )
        self._keep(cid, after)

    async def reset_conversation(self, conversation_id: str) -> None:
        await self._run(self._store.reset_conversation, conversation_id)
        self._cache.pop(conversation_id, None)  # read again when next needed

    async def delete_conversation(self, conversation_id: str) -> bool:
        deleted = await self._run(self._store.delete_conversation, conversation_id)
        self._known.discard(conversation_id)
        self._cache.pop(conversation_id, None)
        return deleted

    def _keep(self, conversation_id: str, conversation: StoredConversation) -> None:
        self._cache[conversation_id] = conversation
        self._cache.move_to_end(conversation_id)
        while len(self._cache) > CACHED_CONVERSATIONS:
            self._cache.popitem(last=False)

    async def list_conversations(self, text: str | None = None) -> list[ConversationSummary]:
        return await self._run(self._store.list_conversations, text)

    async def rename_conversation(self, conversation_id: str, title: str | None) -> bool:
        return await self._run(self._store.rename_conversation, conversation_id, title)

    async def get_setting(self, key: str, default: Any = None) -> Any:
        return await self._run(self._store.get_setting, key, default)

    async def set_setting(self, key: str, value: Any) -> None:
        await self._run(self._store.set_setting, key, value)

    async def record_tool_calls(self, records: list[AuditRecord]) -> list[int]:
        return await self._run(self._store.record_tool_calls, records)

    async def update_tool_calls(self, updates: list[AuditUpdate]) -> None:
        await self._run(self._store.update_tool_calls, updates)

    async def list_tool_audit(
        self, limit: int = 100, conversation_id: str | None = None
    ) -> list[AuditRecord]:
        return await self._run(self._store.list_tool_audit, limit, conversation_id)

    async def record_benchmark(self, result: dict[str, Any]) -> int:
        return await self._run(self._store.record_benchmark, result)

    async def list_benchmarks(self, limit: int = 50) -> list[dict[str, Any]]:
        return await self._run(self._store.list_benchmarks, limit)


# --- history merging ----------------------------------------------------------------------


@dataclass(frozen=True)
class MergeResult:
    new_messages: list[dict[str, Any]]
    system_prompt: str | None


def _message_key(message: dict[str, Any]) -> tuple[Any, ...]:
    # Clients echo assistant tool-call turns back with content "" or null interchangeably.
    calls = tuple(
        (
            call.get("id"),
            call.get("function", {}).get("name"),
            call.get("function", {}).get("arguments"),
        )
        for call in message.get("tool_calls") or ()
    )
    return (message.get("role"), message.get("content") or "", calls, message.get("tool_call_id"))


def merge_messages(stored: list[dict[str, Any]], incoming: list[dict[str, Any]]) -> MergeResult:
    """Decide which of a request's messages are new to the stored history.

    System messages are never history: the last one in `incoming` becomes `system_prompt`.
    If the non-system `incoming` starts with the whole non-system stored history (a client
    resending everything), only the tail beyond it is new, so an identical resend adds nothing.
    Otherwise the client is sending just its new turns and all of them are appended.
    """
    systems = [m for m in incoming if m.get("role") == "system"]
    system_prompt = systems[-1].get("content") if systems else None
    history = [_message_key(m) for m in stored if m.get("role") != "system"]
    turns = [m for m in incoming if m.get("role") != "system"]
    resent = [_message_key(m) for m in turns[: len(history)]]
    new = turns[len(history) :] if resent == history else turns
    return MergeResult(new_messages=new, system_prompt=system_prompt)
