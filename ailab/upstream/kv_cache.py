"""Saved KV caches: each llama-server slot written to a file before its model stops, and
restored, verified, before the conversation's next request reaches the model again.

One file per conversation and model (``/v1`` clients, who send their whole history, get one
per saved prefix), named by model, owner and a hash of the exact tokens the slot held, under
``<data>/kv-cache/`` with ``index.json`` (sizes, SHA-256, last use). Least recently used files
go first when the total passes ``AILAB_KV_CACHE_MB``.

The protocol with llama-server (``--slot-save-path``): ``GET /slots`` says which slots hold
tokens; ``POST /slots/{id}?action=save`` writes one (llama.cpp's state file: magic, version,
the slot's tokens, then its KV data); ``action=restore`` reads one into a slot. A file is
restored only when the new prompt (rendered by ``/apply-template``, counted by
``/tokenize``) begins with at least ``MIN_TOKENS`` of its tokens, and only after its size
and SHA-256 match what was recorded when it was written; llama-server then keeps exactly the
common prefix and evaluates the rest. Anything else falls back to recomputing, logged.

Conversations are pinned to slots (``id_slot``) while they fit, so they do not evict each
other's cache and a slot's owner is known when it is saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from ailab.config import Settings
from ailab.upstream import proxy
from ailab.upstream.pool import Instance

log = logging.getLogger("ailab.kv_cache")

MB = 1024 * 1024
MIN_TOKENS = 32  # fewer common tokens are quicker to recompute than a file is to restore
SAVE_TIMEOUT_S = 60.0  # for all slots of one model: a stop never waits longer
RESTORE_TIMEOUT_S = 60.0
V1_CHECKS = 16  # /v1 requests after a load that look for a saved prefix, then none do
STATE_MAGIC = 0x67677371  # "ggsq", llama_state_seq_save_file
PACKED_MARK = -1  # llama-server's packed token list starts with LLAMA_TOKEN_NULL
INDEX = "index.json"
TMP_PREFIX = "tmp-"
CHUNK = 4 * MB
# What a restore may meet (an odd answer from llama-server too); the turn then recomputes.
RESTORE_ERRORS = (
    TimeoutError,
    OSError,
    httpx.HTTPError,
    proxy.UpstreamError,
    ValueError,
    KeyError,
    TypeError,
)

Kind = Literal["chat", "v1"]
Owner = tuple[Kind, str]  # ("chat", conversation id) or ("v1", the file it came from)


class CacheFileError(ValueError):
    """A slot file that cannot be read as llama-server's state file (or holds media)."""


@dataclass
class Entry:
    """One saved slot."""

    file: str
    kind: Kind
    owner: str  # the conversation id; "" for a /v1 prefix
    model: str  # the instance's model key
    model_id: str  # the model file and flags it was computed with
    n_tokens: int
    size: int
    sha256: str
    last_used: float  # Unix time
    # Not stored: the llama-server process that already had its chance to restore it.
    considered_pid: int | None = field(default=None, compare=False)

    def stored(self) -> dict[str, Any]:
        data = asdict(self)
        del data["considered_pid"]
        return data


@dataclass
class SlotTable:
    """Which owner each slot of one llama-server process holds, and which are busy."""

    instance: Instance
    pid: int | None
    owners: list[Owner | None]
    last_used: list[float]
    busy: list[int]

    @classmethod
    def empty(cls, instance: Instance, n_slots: int) -> SlotTable:
        pid = instance.manager.pid
        return cls(instance, pid, [None] * n_slots, [0.0] * n_slots, [0] * n_slots)

    def acquire(self, owner: Owner) -> int | None:
        """The owner's slot, else the least recently used free one (empty ones first);
        None when every slot is busy (llama-server then picks)."""
        if owner in self.owners:
            slot = self.owners.index(owner)
        else:
            free = [i for i, n in enumerate(self.busy) if n == 0]
            if not free:
                return None
            slot = min(free, key=lambda i: (self.owners[i] is not None, self.last_used[i]))
            self.owners[slot] = owner
        self.busy[slot] += 1
        self.last_used[slot] = time.monotonic()
        return slot

    def release(self, slot: int | None) -> None:
        if slot is not None:
            self.busy[slot] -= 1


# --- files (blocking: run in a thread) -----------------------------------------------


def read_tokens(path: Path) -> list[int]:
    """The tokens a slot file holds (the part before the KV data)."""
    with path.open("rb") as handle:
        head = handle.read(12)
        if len(head) < 12:
            raise CacheFileError("shorter than its header")
        magic, _version, n_words = struct.unpack("<III", head)
        if magic != STATE_MAGIC:
            raise CacheFileError("not a llama.cpp sequence state file")
        raw = handle.read(4 * n_words)
    if len(raw) != 4 * n_words:
        raise CacheFileError("cut short in its token list")
    words = list(struct.unpack(f"<{n_words}i", raw))
    if not words or words[0] != PACKED_MARK:
        return words  # a plain token list, as older llama-servers write
    if len(words) < 3 or words[2] < 0 or len(words) < 4 + words[2]:
        raise CacheFileError("a malformed packed token list")
    n_tokens = words[2]
    if words[3 + n_tokens] != 0:
        raise CacheFileError("it holds media tokens")
    return words[3 : 3 + n_tokens]


def tokens_hash(tokens: list[int]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:80]


def _finish_file(directory: Path, tmp: str, model: str, owner: Owner) -> tuple[str, int, int, str]:
    """Name a file llama-server just wrote by model, owner and token hash; returns (name,
    tokens, size, SHA-256). A file that cannot be used is deleted."""
    path = directory / tmp
    try:
        tokens = read_tokens(path)
        sha = file_sha256(path)
    except (OSError, CacheFileError):
        path.unlink(missing_ok=True)
        raise
    who = hashlib.sha256(owner[1].encode()).hexdigest()[:16] if owner[0] == "chat" else ""
    name = f"{_slug(model)}--{owner[0]}{who}--{tokens_hash(tokens)[:24]}.bin"
    os.replace(path, directory / name)
    return name, len(tokens), (directory / name).stat().st_size, sha


def _check_file(path: Path, entry: Entry, prompt: list[int]) -> tuple[str, int]:
    """("ok", common tokens), ("short", common tokens) or ("bad", 0): a file whose size,
    tokens or SHA-256 differ from what was recorded when it was written is bad."""
    try:
        if path.stat().st_size != entry.size:
            return "bad", 0
        tokens = read_tokens(path)
        common = common_prefix(tokens, prompt)
        if common < MIN_TOKENS:
            return "short", common
        if len(tokens) != entry.n_tokens or file_sha256(path) != entry.sha256:
            return "bad", 0
    except (OSError, CacheFileError):
        return "bad", 0
    return "ok", common


def _owner_of(entry: Entry) -> Owner:
    """A conversation owns its file; a /v1 slot restored from a file is owned by that file."""
    return ("chat", entry.owner) if entry.kind == "chat" else ("v1", entry.file)


def _model_id(instance: Instance) -> str:
    """What a saved cache is only valid with: the model file (path, size, time) and flags."""
    path = instance.source.path
    stat = path.stat() if path is not None and path.is_file() else None
    facts = [instance.key, str(path), stat and stat.st_size, stat and stat.st_mtime_ns]
    facts.append(instance.source.extra_args)
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:16]


def _load_index(directory: Path) -> list[Entry]:
    """The recorded entries whose files are still there; stray files are deleted."""
    try:
        raw = json.loads((directory / INDEX).read_text())
        entries = [Entry(**item) for item in raw["entries"]]
    except FileNotFoundError:
        entries = []
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("%s unreadable (%s): starting with no saved KV caches", directory / INDEX, exc)
        entries = []
    present = {e.file: e for e in entries if (directory / e.file).is_file()}
    for path in directory.iterdir():
        if path.suffix == ".bin" and path.name not in present:
            path.unlink(missing_ok=True)  # a save cut short, or a file the index lost
    return list(present.values())


def _write_index(directory: Path, entries: list[dict[str, Any]]) -> None:
    tmp = directory / f"{INDEX}.tmp"
    tmp.write_text(json.dumps({"version": 1, "entries": entries}))
    os.replace(tmp, directory / INDEX)


# --- the store -------------------------------------------------------------------------


class KvCache:
    """The gateway's saved KV caches and the slots its conversations are pinned to."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.kv_cache_mb > 0
        self.dir = settings.kv_cache_dir
        self.budget_bytes = int(settings.kv_cache_mb * MB)
        self.n_slots = settings.parallel
        self.entries: dict[str, Entry] = {}  # by file name
        self.restored = 0
        self.rejected = 0  # files found damaged (and deleted)
        self._tables: dict[str, SlotTable] = {}  # by instance id
        self._v1_checks: dict[str, int] = {}  # by instance id
        self._index_lock = asyncio.Lock()

    async def start(self) -> None:
        """Create the directory (llama-server needs it) and read the index."""
        if not self.enabled:
            return
        await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)
        for entry in await asyncio.to_thread(_load_index, self.dir):
            self.entries[entry.file] = entry
            if entry.kind == "v1":
                self._v1_checks[entry.model] = V1_CHECKS
        await self._trim_and_write()

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "budget_mb": self.budget_bytes / MB,
            "used_mb": round(sum(e.size for e in self.entries.values()) / MB, 1),
            "files": len(self.entries),
            "restored": self.restored,
            "rejected": self.rejected,
        }

    def _applies(self, instance: Instance) -> bool:
        """Only local llama-servers' generation slots are kept, and not a LoRA base's: its
        slots' KV depends on the adapter scales of the request that filled them."""
        return (
            self.enabled
            and instance.purpose == "generate"
            and not instance.remote
            and not instance.source.adapters
        )

    def for_instance(self, instance: Instance) -> InstanceSlots:
        return InstanceSlots(self, instance)

    def _table(self, instance: Instance) -> SlotTable:
        """The slot table of the instance's current process (a new process: empty)."""
        table = self._tables.get(instance.id)
        if table is None or table.pid != instance.manager.pid:
            table = SlotTable.empty(instance, self.n_slots)
            self._tables[instance.id] = table
        return table

    # --- conversations (/chat) ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def hold(
        self, instance: Instance, conversation_id: str, request: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """Pin the conversation to a slot for one model call; before its first call on a
        new process, restore its saved cache. Yields the fields to add to the request."""
        if not self._applies(instance):
            yield {}
            return
        table = self._table(instance)
        slot = table.acquire(("chat", conversation_id))
        try:
            entry = self._unconsidered(instance, "chat", conversation_id)
            if entry is not None and slot is not None:
                await self._restore(instance, [entry], slot, request)
            yield {} if slot is None else {"id_slot": slot}
        finally:
            table.release(slot)

    def _unconsidered(self, instance: Instance, kind: Kind, owner: str) -> Entry | None:
        pid = instance.manager.pid
        for entry in self.entries.values():
            if (entry.model, entry.kind, entry.owner) == (instance.key, kind, owner):
                if entry.considered_pid == pid:
                    return None
                entry.considered_pid = pid
                return entry
        return None

    async def forget(self, conversation_id: str) -> None:
        """Delete a conversation's saved caches and empty its slot (it was deleted or
        emptied, and its turn is over), so nothing of it is saved again."""
        owner: Owner = ("chat", conversation_id)
        doomed = [e for e in self.entries.values() if _owner_of(e) == owner]
        if doomed:
            await self._drop(doomed)
        for table in self._tables.values():
            if owner in table.owners:
                slot = table.owners.index(owner)
                table.owners[slot] = None
                await _erase(table.instance, slot)

    # --- /v1 clients ---------------------------------------------------------------------

    def waiting(self, instance: Instance, path: str) -> bool:
        """Whether a /v1 request may find a saved prefix to restore (a dict lookup)."""
        return path == "/v1/chat/completions" and self._v1_checks.get(instance.id, 0) > 0

    async def restore_for_client(
        self, instance: Instance, payload: dict[str, Any], body: bytes
    ) -> bytes:
        """Restore the saved prefix this request continues, if any, into a slot, and send
        the request to that slot; otherwise the body is passed on unchanged."""
        self._v1_checks[instance.id] -= 1
        pid = instance.manager.pid
        candidates = [
            e
            for e in self.entries.values()
            if e.model == instance.key and e.kind == "v1" and e.considered_pid != pid
        ]
        if not candidates:
            self._v1_checks.pop(instance.id, None)
            return body
        table = self._table(instance)
        asked = payload.get("id_slot")
        if isinstance(asked, int):
            slot: int | None = asked
        else:
            slot = table.acquire(("v1", ""))
            table.release(slot)  # llama-server holds it for the request, not the gateway
        if slot is None:
            return body
        request = {k: v for k, v in payload.items() if k not in {"stream", "stream_options"}}
        entry = await self._restore(instance, candidates, slot, request)
        if entry is None:
            return body
        if 0 <= slot < self.n_slots:
            table.owners[slot] = _owner_of(entry)
        return json.dumps({**payload, "id_slot": slot}).encode()

    # --- restoring -------------------------------------------------------------------------

    async def _restore(
        self, instance: Instance, candidates: list[Entry], slot: int, request: dict[str, Any]
    ) -> Entry | None:
        """Restore the candidate sharing the longest verified prefix with the request's
        prompt into the slot; None (and a log line) when none is used."""
        try:
            async with asyncio.timeout(RESTORE_TIMEOUT_S):
                usable = await self._same_model(instance, candidates)
                prompt = await self._prompt_tokens(instance, request) if usable else []
                entry, common = await self._best(usable, prompt) if usable else (None, 0)
                if entry is None:
                    return None
                entry.considered_pid = instance.manager.pid
                await self._load_into(instance, entry, slot)
        except RESTORE_ERRORS as exc:
            log.warning("%s: KV cache not restored, recomputing: %s", instance.id, exc)
            return None
        self.restored += 1
        entry.last_used = time.time()
        log.info(
            "%s: restored %s into slot %d: %d of %d prompt tokens from the file",
            instance.id, entry.file, slot, common, len(prompt),
        )  # fmt: skip
        await self._trim_and_write()
        return entry

    async def _same_model(self, instance: Instance, entries: list[Entry]) -> list[Entry]:
        """The entries computed with the instance's model file and flags; others go."""
        model_id = await asyncio.to_thread(_model_id, instance)
        stale = [e for e in entries if e.model_id != model_id]
        if stale:
            log.info("%s changed since %d KV caches were saved: deleted", instance.id, len(stale))
            await self._drop(stale)
        return [e for e in entries if e.model_id == model_id]

    async def _best(self, entries: list[Entry], prompt: list[int]) -> tuple[Entry | None, int]:
        """The verified file with the longest common prefix (damaged files are dropped)."""
        checked = [
            (entry, *await asyncio.to_thread(_check_file, self.dir / entry.file, entry, prompt))
            for entry in entries
        ]
        bad = [entry for entry, verdict, _ in checked if verdict == "bad"]
        if bad:
            self.rejected += len(bad)
            log.warning("damaged KV cache files deleted, recomputing: %s", [e.file for e in bad])
            await self._drop(bad)
        usable = [(common, entry) for entry, verdict, common in checked if verdict == "ok"]
        if not usable:
            if len(bad) < len(entries):
                log.info("no saved KV cache shares %d tokens with the prompt", MIN_TOKENS)
            return None, 0
        common, entry = max(usable, key=lambda pair: pair[0])
        return entry, common

    async def _prompt_tokens(self, instance: Instance, request: dict[str, Any]) -> list[int]:
        """The request's prompt as llama-server will tokenize it."""
        base = instance.manager.base_url
        rendered = await proxy.post_json(instance.http, f"{base}/apply-template", request)
        tokens = await proxy.post_json(
            instance.http,
            f"{base}/tokenize",
            {"content": rendered["prompt"], "add_special": True, "parse_special": True},
        )
        return [int(t) for t in tokens["tokens"]]

    async def _load_into(self, instance: Instance, entry: Entry, slot: int) -> None:
        url = f"{instance.manager.base_url}/slots/{slot}?action=restore"
        reply = await proxy.post_json(instance.http, url, {"filename": entry.file})
        if reply.get("n_restored") != entry.n_tokens:
            await _erase(instance, slot)
            raise ValueError(f"{entry.file}: {reply.get('n_restored')} tokens restored")

    # --- saving ----------------------------------------------------------------------------

    async def save_instance(self, instance: Instance) -> None:
        """The pool's hook before an instance stops: save every slot holding enough tokens.
        Never raises and never takes longer than SAVE_TIMEOUT_S: the stop goes on."""
        if not self._applies(instance):
            return
        table = self._tables.pop(instance.id, None)
        try:
            async with asyncio.timeout(SAVE_TIMEOUT_S):
                await self._save_slots(instance, table)
        except Exception as exc:  # whatever failed, the model must still stop
            log.warning("%s: KV caches not all saved: %s", instance.id, exc)
        if any(e.model == instance.key and e.kind == "v1" for e in self.entries.values()):
            self._v1_checks[instance.id] = V1_CHECKS
        try:
            await self._trim_and_write()
        except OSError as exc:
            log.warning("KV cache index not written (%s): unlisted files go at the next start", exc)

    async def _save_slots(self, instance: Instance, table: SlotTable | None) -> None:
        reply = await instance.http.get(f"{instance.manager.base_url}/slots", timeout=10)
        reply.raise_for_status()
        model_id = await asyncio.to_thread(_model_id, instance)
        for slot in reply.json():
            if int(slot.get("n_prompt_tokens") or 0) < MIN_TOKENS:
                continue  # empty, short, or restored and not used since (its file stays)
            owner: Owner = ("v1", "")
            if table is not None and table.pid == instance.manager.pid:
                owner = table.owners[slot["id"]] or owner
            await self._save_slot(instance, int(slot["id"]), owner, model_id)

    async def _save_slot(self, instance: Instance, slot: int, owner: Owner, model_id: str) -> None:
        tmp = f"{TMP_PREFIX}{uuid.uuid4().hex}.bin"
        url = f"{instance.manager.base_url}/slots/{slot}?action=save"
        try:
            await proxy.post_json(instance.http, url, {"filename": tmp})
            name, n_tokens, size, sha = await asyncio.to_thread(
                _finish_file, self.dir, tmp, instance.key, owner
            )
        finally:
            await asyncio.to_thread((self.dir / tmp).unlink, missing_ok=True)
        # The file this slot was restored from (or the conversation's last one) is replaced.
        replaced = [
            e
            for e in self.entries.values()
            if e.file != name and e.model == instance.key and _owner_of(e) == owner
        ]
        await self._drop(replaced, write=False)
        self.entries[name] = Entry(
            file=name,
            kind=owner[0],
            owner=owner[1] if owner[0] == "chat" else "",
            model=instance.key,
            model_id=model_id,
            n_tokens=n_tokens,
            size=size,
            sha256=sha,
            last_used=time.time(),
        )
        log.info(
            "%s: saved slot %d (%d tokens, %.1f MB) as %s",
            instance.id, slot, n_tokens, size / MB, name,
        )  # fmt: skip

    # --- the index and the budget ----------------------------------------------------------

    async def _drop(self, entries: list[Entry], write: bool = True) -> None:
        for entry in entries:
            self.entries.pop(entry.file, None)
            await asyncio.to_thread((self.dir / entry.file).unlink, missing_ok=True)
        if write:
            await self._trim_and_write()

    async def _trim_and_write(self) -> None:
        """Delete the least recently used files past the budget, then write the index."""
        by_age = sorted(self.entries.values(), key=lambda e: e.last_used)
        total = sum(e.size for e in by_age)
        doomed = []
        while by_age and total > self.budget_bytes:
            oldest = by_age.pop(0)
            total -= oldest.size
            doomed.append(oldest)
        for entry in doomed:
            self.entries.pop(entry.file, None)
            await asyncio.to_thread((self.dir / entry.file).unlink, missing_ok=True)
        snapshot = [e.stored() for e in self.entries.values()]
        async with self._index_lock:
            await asyncio.to_thread(_write_index, self.dir, snapshot)


async def _erase(instance: Instance, slot: int) -> None:
    """Empty a slot of a serving instance (best effort: a stopped one holds nothing)."""
    if not instance.serving:
        return
    url = f"{instance.manager.base_url}/slots/{slot}?action=erase"
    with contextlib.suppress(httpx.HTTPError, proxy.UpstreamError):
        await proxy.post_json(instance.http, url, {})


class InstanceSlots:
    """The engine's ``SlotCache`` for one model instance."""

    def __init__(self, cache: KvCache, instance: Instance) -> None:
        self._cache = cache
        self._instance = instance

    def hold(
        self, conversation_id: str, request: dict[str, Any]
    ) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
        return self._cache.hold(self._instance, conversation_id, request)
