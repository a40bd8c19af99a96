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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

from pydantic import AfterValidator, BaseModel, Field

TITLE_MAX_CHARS = 60

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
    message_count: int
    created_at: UtcDatetime
    updated_at: UtcDatetime


class AuditRecord(BaseModel):
    id: int | None = None
    timestamp: UtcDatetime = Field(default_factory=utc_now)
    conversation_id: str | None = None
    tool: str
    # A string when the model produced arguments that are not a JSON object.
    arguments: dict[str, Any] | str
    status: Literal["success", "error", "refused", "pending"]
    duration_ms: float = 0.0
    approval: Literal["not_needed", "approved", "denied", "auto", "policy_denied"]
    error: str | None = None


class PendingApproval(BaseModel):
    approval_id: str
    conversation_id: str
    tool_call_id: str
    tool: str
    arguments: dict[str, Any]
    description: str
    created_at: UtcDatetime = Field(default_factory=utc_now)
    # Opaque to storage: whatever the server needs to resume its agent loop.
    state: dict[str, Any] = Field(default_factory=dict)


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
        db_path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (see _transaction), never implicit.
        self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode = WAL")
        # With WAL, NORMAL never corrupts and survives an application crash; only a power
        # cut can lose the last commits. FULL would cost an fsync on every chat message.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._migrate()

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

    def get_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT payload FROM messages WHERE conversation_id = ? ORDER BY position",
                (conversation_id,),
            ).fetchall()
        return [json.loads(row["payload"]) for row in rows]

    def append_messages(self, conversation_id: str, messages: list[dict[str, Any]]) -> None:
        now = _iso(utc_now())
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO conversations (id, created_at, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET updated_at = excluded.updated_at",
                (conversation_id, now, now),
            )
            start = conn.execute(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()[0]
            conn.executemany(
                "INSERT INTO messages (conversation_id, position, role, payload, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (conversation_id, start + i, m["role"], json.dumps(m), now)
                    for i, m in enumerate(messages)
                ],
            )

    def reset_conversation(self, conversation_id: str) -> None:
        """Empty the conversation but keep its id; pending approvals for it are dropped."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            conn.execute(
                "DELETE FROM pending_approvals WHERE conversation_id = ?", (conversation_id,)
            )
            conn.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?",
                (_iso(utc_now()), conversation_id),
            )

    def delete_conversation(self, conversation_id: str) -> bool:
        with self._transaction() as conn:
            conn.execute(
                "DELETE FROM pending_approvals WHERE conversation_id = ?", (conversation_id,)
            )
            deleted = conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        return deleted.rowcount > 0

    def list_conversations(self, text: str | None = None) -> list[ConversationSummary]:
        """Newest first; with `text`, only those whose title, id or a message's content
        contains it (case-insensitive for ASCII letters, as SQLite's LIKE)."""
        where, params = ("WHERE " + _SEARCH_MATCH, (_like_pattern(text),)) if text else ("", ())
        with self._lock:
            rows = self._conn.execute(
                f"""
                SELECT c.id, c.title, c.created_at, c.updated_at,
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

    def record_tool_call(self, record: AuditRecord) -> int:
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO tool_audit (timestamp, conversation_id, tool, arguments, status, "
                "duration_ms, approval, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _iso(record.timestamp),
                    record.conversation_id,
                    record.tool,
                    json.dumps(record.arguments),
                    record.status,
                    record.duration_ms,
                    record.approval,
                    record.error,
                ),
            )
        return int(cursor.lastrowid or 0)

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

    # --- pending approvals --------------------------------------------------------------

    def save_pending_approval(self, approval: PendingApproval) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO pending_approvals (conversation_id, approval_id, payload) "
                "VALUES (?, ?, ?)",
                (approval.conversation_id, approval.approval_id, approval.model_dump_json()),
            )

    def get_pending_approval(
        self, conversation_id: str, approval_id: str
    ) -> PendingApproval | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT payload FROM pending_approvals WHERE conversation_id = ? "
                "AND approval_id = ?",
                (conversation_id, approval_id),
            ).fetchone()
        return None if row is None else PendingApproval.model_validate_json(row["payload"])

    def delete_pending_approval(self, conversation_id: str, approval_id: str) -> bool:
        """False when it was already gone, so two racing approvals resolve only once."""
        with self._transaction() as conn:
            deleted = conn.execute(
                "DELETE FROM pending_approvals WHERE conversation_id = ? AND approval_id = ?",
                (conversation_id, approval_id),
            )
        return deleted.rowcount > 0

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


P = ParamSpec("P")
T = TypeVar("T")


class AsyncStore:
    """Async facade: every call runs on one dedicated thread, so the event loop never blocks
    on SQLite and database access is serialised in arrival order."""

    def __init__(self, db_path: Path) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ailab-store")
        self._store = Store(db_path)

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))

    async def close(self) -> None:
        await self._run(self._store.close)
        self._executor.shutdown(wait=True)

    async def conversation_exists(self, conversation_id: str) -> bool:
        return await self._run(self._store.conversation_exists, conversation_id)

    async def get_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        return await self._run(self._store.get_messages, conversation_id)

    async def append_messages(self, conversation_id: str, messages: list[dict[str, Any]]) -> None:
        await self._run(self._store.append_messages, conversation_id, messages)

    async def reset_conversation(self, conversation_id: str) -> None:
        await self._run(self._store.reset_conversation, conversation_id)

    async def delete_conversation(self, conversation_id: str) -> bool:
        return await self._run(self._store.delete_conversation, conversation_id)

    async def list_conversations(self, text: str | None = None) -> list[ConversationSummary]:
        return await self._run(self._store.list_conversations, text)

    async def rename_conversation(self, conversation_id: str, title: str | None) -> bool:
        return await self._run(self._store.rename_conversation, conversation_id, title)

    async def get_setting(self, key: str, default: Any = None) -> Any:
        return await self._run(self._store.get_setting, key, default)

    async def set_setting(self, key: str, value: Any) -> None:
        await self._run(self._store.set_setting, key, value)

    async def record_tool_call(self, record: AuditRecord) -> int:
        return await self._run(self._store.record_tool_call, record)

    async def list_tool_audit(
        self, limit: int = 100, conversation_id: str | None = None
    ) -> list[AuditRecord]:
        return await self._run(self._store.list_tool_audit, limit, conversation_id)

    async def save_pending_approval(self, approval: PendingApproval) -> None:
        await self._run(self._store.save_pending_approval, approval)

    async def get_pending_approval(
        self, conversation_id: str, approval_id: str
    ) -> PendingApproval | None:
        return await self._run(self._store.get_pending_approval, conversation_id, approval_id)

    async def delete_pending_approval(self, conversation_id: str, approval_id: str) -> bool:
        return await self._run(self._store.delete_pending_approval, conversation_id, approval_id)

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
