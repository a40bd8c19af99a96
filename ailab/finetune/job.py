"""One fine-tuning job from start to finish: the up-front memory check, the training text,
the cached F32 training copy, llama-finetune under supervision, and the served result
with its sidecar in models/custom/.

Blocking: the gateway runs `FinetuneJob.run` in a worker thread, `ailab-finetune` in the
foreground. One job at a time per data directory (a lock file), whichever runs it; the
job's status is also written to `<data>/finetune/status.json` so the other can show it,
and a `cancel` file there stops it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import selectors
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import psutil

from ailab import config
from ailab.config import ModelSource, Settings
from ailab.errors import AilabError, BadRequest, NotFound
from ailab.finetune import data, special_tokens
from ailab.finetune.progress import TrainingProgress
from ailab.finetune.spec import (
    FinetuneConflict,
    FinetuneRecord,
    FinetuneSpec,
    FinetuneStatus,
    InsufficientResources,
    TrainingData,
)
from ailab.gguf_meta import GgufError, GgufInfo, read_info
from ailab.upstream import binaries

log = logging.getLogger("ailab.finetune")

MB = 1024 * 1024
PROCESS_OVERHEAD = 256 * MB  # llama-finetune's code, threads, buffers, and a margin
BYTES_PER_PARAMETER = {"F32": 4.0, "F16": 2.0, "Q8_0": 34 / 32}
STATUS_INTERVAL_S = 1.0
LineHandler = Callable[[str], None]


class JobCancelled(Exception):
    """The job was asked to stop."""


class JobFailed(AilabError):
    """A program the job ran failed; the message has the end of its output."""


class Workspace:
    """`<data>/finetune/`: the lock, status and cancel files, cached copies, job folders."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.data_dir / "finetune"
        self.status_file = self.root / "status.json"
        self.cancel_file = self.root / "cancel"
        self.lock_file = self.root / "lock"
        self.cache_dir = self.root / "cache"

    def job_dir(self, name: str) -> Path:
        return self.root / "jobs" / name

    def read_status(self) -> FinetuneStatus:
        try:
            return FinetuneStatus.model_validate_json(self.status_file.read_text())
        except (OSError, ValueError):
            return FinetuneStatus()

    def write_status(self, status: FinetuneStatus) -> None:
        partial = self.status_file.with_suffix(".partial")
        partial.write_text(status.model_dump_json(indent=2))
        os.replace(partial, self.status_file)

    def lock(self) -> IO[bytes]:
        """Hold the one-job lock (the returned file) or raise FinetuneConflict."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = self.lock_file.open("wb")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            running = self.read_status()
            raise FinetuneConflict(
                f"a fine-tune is already running ({running.summary()}); wait for it or "
                "cancel it with `/command finetune cancel`"
            ) from None
        return handle

    def is_locked(self) -> bool:
        try:
            self.lock().close()
        except FinetuneConflict:
            return True
        return False


def memory_estimate(info: GgufInfo, window: int) -> int:
    """Bytes llama-finetune needs at its peak: the F32 weights four times over (weights,
    gradients and AdamW's two moments), plus one window's activations (logits over the
    vocabulary and each layer's states), plus the process and a margin. For SmolLM2-135M
    at 256 tokens this says 2,722 MB; the largest resident size measured was 2,446 MB."""
    embd, ff = info.hparam("embedding_length"), info.hparam("feed_forward_length")
    per_token = 4 * (3 * len(info.tokens) + info.hparam("block_count") * (8 * embd + 3 * ff))
    return 4 * 4 * info.parameters + window * per_token + PROCESS_OVERHEAD


def _check_free_memory(estimate: int) -> None:
    available = psutil.virtual_memory().available
    if estimate > available:
        raise InsufficientResources(
            f"this fine-tune needs about {estimate // MB:,} MB of memory and "
            f"{available // MB:,} MB is available; free memory, pick a smaller base model "
            "or a smaller window"
        )


def _check_free_disk(settings: Settings, info: GgufInfo, spec: FinetuneSpec, cached: bool) -> None:
    f32 = 4 * info.parameters
    needed = (
        (0 if cached else f32) + f32 + int(BYTES_PER_PARAMETER[spec.quantization] * info.parameters)
    )
    for folder in (settings.data_dir, settings.custom_models_dir):
        folder.mkdir(parents=True, exist_ok=True)
    free = min(
        shutil.disk_usage(settings.data_dir).free,
        shutil.disk_usage(settings.custom_models_dir).free,
    )
    if needed > free:
        raise InsufficientResources(
            f"this fine-tune writes about {needed // MB:,} MB and {free // MB:,} MB of disk "
            "is free; make room in the data and models folders"
        )


def _base_source(settings: Settings, key: str) -> ModelSource:
    models = config.get_all_models(settings)
    if key not in models:
        raise NotFound(f"unknown base model {key!r}; known models: {', '.join(sorted(models))}")
    source = config.get_model_source(settings, key)
    if source.adapter is not None:
        raise BadRequest(f"{key!r} is a LoRA adapter; fine-tune its base {source.key!r}")
    if source.path is None or not source.path.is_file():
        raise BadRequest(
            f"base model {key!r} has no local file yet; switch to it once to download it"
        )
    return source


def _training_copy_path(workspace: Workspace, base: Path) -> Path:
    stat = base.stat()
    key = f"{base.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{special_tokens.ALIAS_SCHEME}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return workspace.cache_dir / f"{base.stem}-{digest}.train-f32.gguf"


def prepare_job(
    settings: Settings, spec: FinetuneSpec, records: list[data.Record], source_kind: str
) -> FinetuneJob:
    """Check everything that can be checked before starting (blocking: run in a thread):
    the base model, the name, memory and disk; then take the one-job lock."""
    if not records:
        raise BadRequest("no conversation with an assistant turn was selected; nothing to learn")
    assert spec.base_model is not None
    source = _base_source(settings, spec.base_model)
    if spec.name in config.get_all_models(settings):
        raise FinetuneConflict(f"a model named {spec.name!r} already exists; choose another name")
    assert source.path is not None
    try:
        info = read_info(source.path)
    except GgufError as exc:
        raise BadRequest(f"base model {spec.base_model!r}: {exc}") from None
    workspace = Workspace(settings)
    estimate = memory_estimate(info, spec.window)
    _check_free_memory(estimate)
    _check_free_disk(settings, info, spec, _training_copy_path(workspace, source.path).exists())
    lock = workspace.lock()
    try:
        return FinetuneJob(settings, spec, records, source_kind, source, info, estimate, lock)
    except BaseException:
        lock.close()
        raise


class FinetuneJob:
    """A prepared job; `run()` does the work, `cancel()` (any thread) stops it."""

    def __init__(
        self,
        settings: Settings,
        spec: FinetuneSpec,
        records: list[data.Record],
        source_kind: str,
        source: ModelSource,
        info: GgufInfo,
        estimate: int,
        lock: IO[bytes],
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.records = records
        self.source_kind = source_kind
        self.source = source
        self.base_info = info
        self.workspace = Workspace(settings)
        self.job_dir = self.workspace.job_dir(spec.name)
        self.names = special_tokens.aliases(info)
        self.progress = TrainingProgress(epochs=spec.epochs)
        self._lock = lock
        self._cancelled = threading.Event()
        self._child: subprocess.Popen[bytes] | None = None
        self._status_lock = threading.Lock()
        self._status = FinetuneStatus(
            state="preparing",
            name=spec.name,
            base_model=spec.base_model,
            message="starting",
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            epochs=spec.epochs,
            conversations=len(records),
            memory_estimate_mb=estimate // MB,
            pid=os.getpid(),
        )
        self._started = time.monotonic()
        self._finished: float | None = None
        self._last_write = 0.0
        self.on_update: Callable[[FinetuneStatus], None] | None = None
        self.workspace.cancel_file.unlink(missing_ok=True)
        self.workspace.write_status(self._status)

    # --- status and cancel -----------------------------------------------------------

    @property
    def status(self) -> FinetuneStatus:
        with self._status_lock:
            return self._status.model_copy(update={"elapsed_s": self._elapsed()})

    def _elapsed(self) -> float:
        return round((self._finished or time.monotonic()) - self._started, 1)

    def _update(self, force: bool = True, **changes: Any) -> None:
        with self._status_lock:
            self._status = self._status.model_copy(update={**changes, "elapsed_s": self._elapsed()})
            status = self._status
        now = time.monotonic()
        if force or now - self._last_write >= STATUS_INTERVAL_S:
            self._last_write = now
            self.workspace.write_status(status)
            if self.on_update:
                self.on_update(status)

    def cancel(self) -> None:
        self._cancelled.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()

    def _check_cancel(self) -> None:
        if self.workspace.cancel_file.exists():
            self.cancel()
        if self._cancelled.is_set():
            raise JobCancelled

    # --- the run ---------------------------------------------------------------------

    def run(self) -> FinetuneStatus:
        """Do the whole job; the final status says how it ended (it never raises)."""
        try:
            shutil.rmtree(self.job_dir, ignore_errors=True)
            self.job_dir.mkdir(parents=True)
            text_path, training = self._write_training_text()
            copy = self._training_copy()
            trained = self._train(copy, text_path)
            key = self._save(trained, training)
            self._update(
                state="done", model_key=key, message=f"{key} is ready: /command model {key}"
            )
        except JobCancelled:
            self._update(state="cancelled", message="cancelled; nothing was saved")
        except Exception as exc:  # the job reports every failure in its status
            if self._cancelled.is_set():
                self._update(state="cancelled", message="cancelled; nothing was saved")
            else:
                if not isinstance(exc, AilabError):
                    log.exception("fine-tune %s failed", self.spec.name)
                self._update(state="failed", message=str(exc) or type(exc).__name__)
        finally:
            self._clean_up()
        return self.status

    def _clean_up(self) -> None:
        self._finished = time.monotonic()
        custom = self.settings.custom_models_dir
        (custom / f"{self.spec.name}.gguf.partial").unlink(missing_ok=True)
        (self.job_dir / "trained-f32.gguf").unlink(missing_ok=True)
        self.workspace.cancel_file.unlink(missing_ok=True)
        self._lock.close()

    def _write_training_text(self) -> tuple[Path, TrainingData]:
        self._update(
            state="rendering", message="rendering the conversations with the chat template"
        )
        renderer = data.TemplateRenderer(self.settings, self.source, self.job_dir / "render.log")
        try:
            renderer.spawn()
            self._child = renderer.process
            renderer.wait_ready()
            rendered = []
            for where, record in self.records:
                self._check_cancel()
                rendered.append(renderer.render(where, record))
            text = "".join(rendered)
            tokens = renderer.count_tokens(text)
        finally:
            renderer.stop()
        # Too little text for a few windows is repeated whole: every token is then trained
        # on, and each epoch passes over the data more than once.
        minimum = 3 * self.spec.window + 1
        repeats = math.ceil(minimum / tokens) if tokens < minimum else 1
        path = self.job_dir / "train.txt"
        path.write_text(special_tokens.Substitution(self.base_info, self.names)(text) * repeats)
        training = TrainingData(
            source="jsonl" if self.source_kind == "jsonl" else "conversations",
            ids=[where for where, _ in self.records],
            sha256=data.records_sha256(self.records),
            conversations=len(self.records),
            tokens=tokens,
            repeats=repeats,
        )
        self._update(tokens=tokens * repeats)
        return path, training

    def _training_copy(self) -> Path:
        """The base model in F32 with aliased special tokens, made once and cached."""
        self._check_cancel()
        assert self.source.path is not None
        copy = _training_copy_path(self.workspace, self.source.path)
        if copy.exists():
            return copy
        self._update(state="converting", message="making the F32 training copy of the base model")
        self.workspace.cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.workspace.cache_dir.glob(f"{self.source.path.stem}-*.train-f32.gguf"):
            stale.unlink()  # an older copy of a replaced base file
        partial = copy.with_suffix(".partial")
        quantize = binaries.find_program(self.settings, "llama-quantize")
        self._run(
            [str(quantize), "--allow-requantize", str(self.source.path), str(partial), "F32"],
            self.job_dir / "convert.log",
        )
        special_tokens.alias_training_copy(read_info(partial), self.names)
        os.replace(partial, copy)
        return copy

    def _train(self, copy: Path, text_path: Path) -> Path:
        self._check_cancel()
        self._update(state="training", message="training")
        window = str(self.spec.window)
        out = self.job_dir / "trained-f32.gguf"
        command = [
            str(binaries.find_program(self.settings, "llama-finetune")),
            "-m", str(copy), "-f", str(text_path),
            "-c", window, "-b", window, "-ub", window,
            "-epochs", str(self.spec.epochs), "-lr", str(self.spec.learning_rate),
            # Small data sets have no windows to spare for validation.
            "-val-split", "0",
            "-ngl", "0",  # training runs on the CPU (the estimate is of system memory)
            "-o", str(out),
        ]  # fmt: skip
        if self.settings.n_threads:
            command += ["-t", str(self.settings.n_threads)]
        self._run(command, self.job_dir / "finetune.log", self._on_output)
        if not out.is_file() or self.progress.loss_after is None:
            raise JobFailed(f"llama-finetune wrote no model; see {self.job_dir / 'finetune.log'}")
        return out

    def _on_output(self, line: str) -> None:
        if self.progress.feed(line):
            p = self.progress
            self._update(
                force=False,
                epoch=p.epoch,
                window=p.window,
                windows=p.windows,
                loss=p.loss,
                loss_before=p.loss_before,
                eta_s=p.eta_s,
            )

    def _run(
        self, command: list[str], log_path: Path, on_line: Callable[[str], None] | None = None
    ) -> None:
        """Run a program to the end, its output to `log_path` and, line by line (carriage
        returns count), to `on_line`; cancellable at any moment."""
        with log_path.open("wb", buffering=0) as log_file:
            child = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
            )
            self._child = child
            assert child.stdout is not None
            try:
                self._pump(child, log_file, on_line)
            finally:
                if child.poll() is None:
                    child.kill()
                child.wait()
                self._child = None
        self._check_cancel()
        if child.returncode != 0:
            tail = log_path.read_text(errors="replace")[-1500:]
            raise JobFailed(f"{Path(command[0]).name} failed (exit {child.returncode}):\n{tail}")

    def _pump(
        self,
        child: subprocess.Popen[bytes],
        log_file: IO[bytes],
        on_line: Callable[[str], None] | None,
    ) -> None:
        assert child.stdout is not None
        pending = b""
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            while True:
                self._check_cancel()
                if not selector.select(timeout=0.5):
                    continue
                chunk = os.read(child.stdout.fileno(), 65536)
                if not chunk:
                    return
                log_file.write(chunk)
                *lines, pending = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
                for line in lines:
                    if on_line:
                        on_line(line.decode(errors="replace"))

    def _save(self, trained: Path, training: TrainingData) -> str:
        """Quantize the result into models/custom/ with its sidecar; returns its key."""
        self._check_cancel()
        self._update(state="saving", message=f"saving models/custom/{self.spec.name}.gguf")
        special_tokens.restore_vocabulary(read_info(trained), self.base_info, self.names)
        custom = self.settings.custom_models_dir
        custom.mkdir(parents=True, exist_ok=True)
        partial = custom / f"{self.spec.name}.gguf.partial"
        if self.spec.quantization == "F32":
            os.replace(trained, partial)
        else:
            quantize = binaries.find_program(self.settings, "llama-quantize")
            self._run(
                [str(quantize), str(trained), str(partial), self.spec.quantization],
                self.job_dir / "quantize.log",
            )
        record = self._record(training)
        sidecar = custom / f"{self.spec.name}.json"
        sidecar.with_suffix(".json.partial").write_text(record.model_dump_json(indent=2))
        os.replace(sidecar.with_suffix(".json.partial"), sidecar)
        # Last: the GGUF appearing is what lists the model, complete with its sidecar.
        os.replace(partial, custom / f"{self.spec.name}.gguf")
        return self.spec.name

    def _chat_template(self) -> str | None:
        """The template the result is served with: the base's file, or its built-in one
        (llama-finetune does not copy that into the file it writes)."""
        entry = config.get_all_models(self.settings)[self.source.key]
        if entry.get("chat_template_file"):
            return str(entry["chat_template_file"])
        builtin = self.base_info.chat_template
        if builtin is None:
            return None
        name = f"{self.spec.name}.jinja"
        (self.settings.custom_models_dir / name).write_text(builtin)
        return name

    def _record(self, training: TrainingData) -> FinetuneRecord:
        p = self.progress
        assert p.loss_before is not None and p.loss_after is not None
        return FinetuneRecord(
            name=self.spec.name,
            description=(
                f"Fine-tuned from {self.source.key} on {training.conversations} conversations, "
                f"{self.spec.epochs} epochs (loss {p.loss_before:.2f} -> {p.loss_after:.2f})"
            ),
            base_model=self.source.key,
            chat_template_file=self._chat_template(),
            context_length=self.source.context_length,
            training_data=training,
            epochs=self.spec.epochs,
            learning_rate=self.spec.learning_rate,
            window=self.spec.window,
            loss_before=p.loss_before,
            loss_after=p.loss_after,
            epoch_losses=p.epoch_losses,
            quantization=self.spec.quantization,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            duration_s=self._elapsed(),
            llama_cpp=binaries.SDIST_VERSION,
        )
