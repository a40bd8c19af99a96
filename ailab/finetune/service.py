"""The gateway's side of fine-tuning: choosing the conversations, running one job at a
time in a worker thread, its status, and cancelling it (or one `ailab-finetune` runs)."""

from __future__ import annotations

import asyncio
import fnmatch
from pathlib import Path

from ailab.config import Settings
from ailab.errors import NotFound
from ailab.finetune import data
from ailab.finetune.job import FinetuneJob, Workspace, prepare_job
from ailab.finetune.spec import FinetuneConflict, FinetuneSpec, FinetuneStatus
from ailab.storage import AsyncStore


def select_ids(spec: FinetuneSpec, known: list[str]) -> list[str]:
    """The conversation ids a spec names, in the order given (ids) or stored (match)."""
    if spec.conversations is not None:
        missing = [cid for cid in spec.conversations if cid not in set(known)]
        if missing:
            raise NotFound(f"no conversation {', '.join(map(repr, missing))}")
        return list(dict.fromkeys(spec.conversations))
    assert spec.match is not None
    chosen = [cid for cid in known if fnmatch.fnmatchcase(cid, spec.match)]
    if not chosen:
        raise NotFound(f"no conversation id matches {spec.match!r}")
    return chosen


async def gather_records(
    store: AsyncStore, spec: FinetuneSpec, system_prompt: str
) -> tuple[list[data.Record], str]:
    """The training records and where they came from ("jsonl" or "conversations")."""
    if spec.jsonl is not None:
        return await asyncio.to_thread(data.records_from_jsonl, Path(spec.jsonl)), "jsonl"
    known = [summary.id for summary in await store.list_conversations()]
    conversations = {cid: await store.get_messages(cid) for cid in select_ids(spec, known)}
    records = data.records_from_conversations(conversations, system_prompt, spec.include_tools)
    return records, "conversations"


def current_status(workspace: Workspace) -> FinetuneStatus:
    """The status file, marked failed if the process that ran the job is gone."""
    status = workspace.read_status()
    if status.running and not workspace.is_locked():
        return status.model_copy(
            update={"state": "failed", "message": "interrupted: the process running it ended"}
        )
    return status


class FinetuneService:
    """At most one job, run in a worker thread; its status outlives it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workspace = Workspace(settings)
        self._job: FinetuneJob | None = None
        self._task: asyncio.Task[FinetuneStatus] | None = None

    async def start(
        self, spec: FinetuneSpec, records: list[data.Record], source_kind: str
    ) -> FinetuneStatus:
        """Check and start a job; refused (409) while one runs, 507 when it cannot fit."""
        if self._task is not None and not self._task.done():
            raise FinetuneConflict("a fine-tune is already running; cancel it or wait")
        job = await asyncio.to_thread(prepare_job, self.settings, spec, records, source_kind)
        self._job = job
        self._task = asyncio.create_task(asyncio.to_thread(job.run))
        return job.status

    async def status(self) -> FinetuneStatus:
        if self._job is not None and (self._task is None or not self._task.done()):
            return self._job.status
        return await asyncio.to_thread(current_status, self.workspace)

    async def cancel(self) -> FinetuneStatus:
        """Stop the running job, here or in another process; the status says what ended."""
        if self._job is not None and self._task is not None and not self._task.done():
            self._job.cancel()
            return await self._task
        if await asyncio.to_thread(self.workspace.is_locked):
            await asyncio.to_thread(self.workspace.cancel_file.touch)
            return (await self.status()).model_copy(update={"message": "cancel requested"})
        return (await self.status()).model_copy(update={"message": "no fine-tune is running"})

    async def close(self) -> None:
        if self._job is not None and self._task is not None and not self._task.done():
            self._job.cancel()
            await self._task
