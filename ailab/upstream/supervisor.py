"""Supervise one llama-server subprocess: start, stop, restart, health, crash recovery.

The supervisor is a small state machine. Every transition goes through
``_set_state`` (which logs it), and ``/health`` reports the current state instead of
guessing from the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

import httpx
import psutil

from ailab.config import ModelSource, Settings
from ailab.errors import AilabError, Unavailable
from ailab.upstream import binaries
from ailab.upstream import download as hf_download

log = logging.getLogger("ailab.llama")

HEALTH_POLL_INTERVAL_S = 0.01
STOP_GRACE_S = 5.0
TAIL_LINES = 15
LOG_MAX_BYTES = 5 * 1024 * 1024
LOG_BACKUPS = 3
LOG_CHECK_INTERVAL_S = 60.0
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
# Marks the llama-server processes this gateway started, so stale ones can be found
# after a crash of the gateway without ever touching anybody else's process.
OWNER_ENV = "AILAB_LLAMA_OWNER"
# llama-server reads its API key from here; only holders of the key may use its port.
LLAMA_KEY_ENV = "LLAMA_API_KEY"


class ManagerState(StrEnum):
    STOPPED = "stopped"
    DOWNLOADING = "downloading"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    FAILED = "failed"


ALLOWED_TRANSITIONS: dict[ManagerState, set[ManagerState]] = {
    # STOPPED -> FAILED: `fail`, for a model stopped because something it needs is gone.
    ManagerState.STOPPED: {ManagerState.DOWNLOADING, ManagerState.STARTING, ManagerState.FAILED},
    ManagerState.DOWNLOADING: {ManagerState.STARTING, ManagerState.FAILED, ManagerState.STOPPING},
    ManagerState.STARTING: {ManagerState.READY, ManagerState.FAILED, ManagerState.STOPPING},
    ManagerState.READY: {ManagerState.STOPPING, ManagerState.RESTARTING},
    ManagerState.RESTARTING: {
        ManagerState.DOWNLOADING,
        ManagerState.STARTING,
        ManagerState.FAILED,
        ManagerState.STOPPING,
    },
    ManagerState.STOPPING: {ManagerState.STOPPED},
    ManagerState.FAILED: {
        ManagerState.DOWNLOADING,
        ManagerState.STARTING,
        ManagerState.RESTARTING,
        ManagerState.STOPPING,
    },
}

SETTLED_STATES = {ManagerState.READY, ManagerState.FAILED, ManagerState.STOPPED}

HEALTH_STATUS = {
    ManagerState.READY: "ok",
    ManagerState.STARTING: "loading",
    ManagerState.DOWNLOADING: "loading",
    ManagerState.RESTARTING: "restarting",
}


class LlamaUnavailable(Unavailable):
    """llama-server cannot take a request now; the message says why."""


class LlamaStartError(AilabError):
    """llama-server could not be brought up; the message says why and what to do."""


class DownloadFailed(LlamaStartError):
    """A model's download failed; the message says why."""

    status = 502


def _port_owner(port: int) -> str | None:
    """Describe the process listening on a local port, or None if the port is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return None
        except OSError:
            pass
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            listening = conn.status == psutil.CONN_LISTEN
            if conn.laddr and conn.laddr.port == port and listening and conn.pid:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    return "another process"


def _rotate_log(path: Path, copy_truncate: bool) -> None:
    """Keep LOG_BACKUPS old logs. While llama-server writes (O_APPEND) the file is copied
    and truncated in place; between runs it is renamed."""
    if not path.exists() or path.stat().st_size < LOG_MAX_BYTES:
        return
    for index in range(LOG_BACKUPS - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{index + 1}"))
    if copy_truncate:
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
        os.truncate(path, 0)
    else:
        path.replace(path.with_name(f"{path.name}.1"))


def _log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines llama-server wrote: they say why it failed."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 16384))
            text = handle.read().decode(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:])


class LlamaServerManager:
    """Owns the llama-server subprocess for one gateway."""

    def __init__(
        self,
        settings: Settings,
        binary: Path,
        http: httpx.AsyncClient,
        transport: httpx.AsyncHTTPTransport,
        api_key: str,
        port: int | None = None,
        log_name: str = "llama-server.log",
        clean_stale: bool = True,
    ) -> None:
        self.settings = settings
        self._api_key = api_key
        self.port = port or settings.llama_port
        self.binary = binary
        self.http = http
        self.transport = transport
        # Other clients' idle connections to drop at a stop (the pool's pass-through relay).
        self.drop_idle: list[Callable[[], None]] = []
        self.state = ManagerState.STOPPED
        self.model: ModelSource | None = None
        self.n_gpu_layers = settings.n_gpu_layers
        self.n_ctx_limit = settings.n_ctx
        self.restarts = 0
        self.message: str | None = None
        self.download: hf_download.DownloadProgress | None = None
        self.gpu_devices: list[str] = []
        self._process: asyncio.subprocess.Process | None = None
        self._started_at: float | None = None
        self._log_keeper: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()  # set in a state that will not change by itself
        self._settled.set()
        # A pool cleans up once for all its processes, before any of them starts.
        self._stale_checked = not clean_stale
        self._watchdog: asyncio.Task[None] | None = None
        self._lifecycle = asyncio.Lock()
        self.log_path = settings.log_dir / log_name
        self.on_state: Callable[[], None] | None = None  # told after every transition

    # --- reporting -----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process and self._process.returncode is None else None

    @property
    def uptime_s(self) -> float | None:
        if self.state != ManagerState.READY or self._started_at is None:
            return None
        return round(time.monotonic() - self._started_at, 1)

    @property
    def model_key(self) -> str | None:
        return self.model.key if self.model else None

    @property
    def n_ctx(self) -> int:
        """The context actually given to llama-server: the limit, capped by the model's."""
        model_ctx = self.model.context_length if self.model else self.n_ctx_limit
        return min(self.n_ctx_limit, model_ctx)

    @property
    def device(self) -> str:
        if self.n_gpu_layers == 0 or not self.gpu_devices:
            return "CPU"
        if self.n_gpu_layers < 0:
            return "GPU (all layers)"
        return f"Hybrid ({self.n_gpu_layers} layers on GPU)"

    @property
    def health_status(self) -> str:
        return HEALTH_STATUS.get(self.state, "error")

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.llama_host}:{self.port}"

    def _set_state(self, new: ManagerState, message: str | None = None) -> None:
        if new != self.state and new not in ALLOWED_TRANSITIONS[self.state]:
            raise RuntimeError(f"illegal supervisor transition {self.state} -> {new}")
        name = self.model.key if self.model else "llama-server"
        log.info("%s %s -> %s%s", name, self.state, new, f": {message}" if message else "")
        self.state = new
        self.message = message
        if new in SETTLED_STATES:
            self._settled.set()
        else:
            self._settled.clear()
        if self.on_state is not None:
            self.on_state()

    # --- public lifecycle ------------------------------------------------------------

    async def detect_devices(self) -> None:
        """Ask the binary which GPUs it can use; a CPU-only build lists none."""
        self.gpu_devices = await binaries.list_devices(self.binary)

    async def start(self, source: ModelSource) -> None:
        """Bring llama-server up with a model; raise LlamaStartError with the reason."""
        async with self._lifecycle:
            await self._start_locked(source)

    async def stop(self) -> None:
        async with self._lifecycle:
            await self._stop_locked()

    async def restart(self, source: ModelSource | None = None) -> None:
        """Stop, then start with a new model (or the same one)."""
        async with self._lifecycle:
            target = source or self.model
            if target is None:
                raise LlamaStartError("no model to restart with")
            await self._stop_locked()
            await self._start_locked(target)

    async def fail(self, message: str) -> None:
        """Stop llama-server for good with a reason (an RPC worker it needs is gone): no
        crash restart; requests get the reason until a start tries again."""
        async with self._lifecycle:
            await self._stop_locked()
            self._set_state(ManagerState.FAILED, message)

    async def wait_until_serving(self, timeout_s: float) -> None:
        """Return once llama-server is ready; wait while it loads or restarts, but fail at
        once (LlamaUnavailable) when it is down for good."""
        if self.state == ManagerState.READY:
            return  # the usual case, without the timer task wait_for makes
        try:
            await asyncio.wait_for(self._settled.wait(), timeout_s)
        except TimeoutError:
            raise LlamaUnavailable(
                f"llama-server is still {self.state} after {timeout_s:.0f} s: {self.message}"
            ) from None
        if self.state != ManagerState.READY:
            raise LlamaUnavailable(f"llama-server is not running: {self.message or self.state}")

    async def is_healthy(self) -> bool:
        try:
            response = await self.http.get(f"{self.base_url}/health", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def close(self) -> None:
        await self.stop()
        if self._log_keeper:
            self._log_keeper.cancel()

    # --- internals -------------------------------------------------------------------

    async def _start_locked(self, source: ModelSource) -> None:
        self.model = source
        path = await self._ensure_local_file(source)
        self._set_state(ManagerState.STARTING, f"loading {source.key}")
        if not self._stale_checked:
            await asyncio.to_thread(
                cleanup_stale_processes, self.settings.data_dir, {self.pid} - {None}
            )
            self._stale_checked = True
        owner = await asyncio.to_thread(_port_owner, self.port)
        if owner:
            self._fail(
                f"port {self.port} is already in use by {owner}; "
                "set AILAB_LLAMA_PORT to a free port or stop that process"
            )
        await self._spawn(path, source)
        await self._wait_until_ready()

    def _fail(self, message: str) -> None:
        self._set_state(ManagerState.FAILED, message)
        raise LlamaStartError(message)

    async def _ensure_local_file(self, source: ModelSource) -> Path:
        if source.kind != "huggingface":
            assert source.path is not None
            if not source.path.is_file():
                self._set_state(ManagerState.STARTING)
                self._fail(f"model file {source.path} does not exist")
            return source.path
        self._set_state(ManagerState.DOWNLOADING, f"downloading {source.hf_repo}")
        try:
            return await self._download(source)
        except DownloadFailed as exc:
            self._fail(str(exc))
            raise  # _fail raised already; this line only tells type checkers

    async def download_ahead(self, source: ModelSource) -> ModelSource:
        """Download a Hugging Face model while the running one keeps serving (progress in
        ``download``); the source returned loads from the downloaded file."""
        path = await self._download(source)
        return source.model_copy(update={"kind": "local", "path": path})

    async def _download(self, source: ModelSource) -> Path:
        assert source.hf_repo is not None

        def on_progress(progress: hf_download.DownloadProgress) -> None:
            self.download = progress

        try:
            path = await asyncio.to_thread(
                hf_download.download_gguf,
                source.hf_repo,
                self.settings.llama_cache,
                on_progress,
                stall_timeout_s=self.settings.download_stall_timeout_s,
                endpoint=self.settings.hf_endpoint,
            )
        except (hf_download.DownloadError, ValueError, RuntimeError) as exc:
            raise DownloadFailed(f"download of {source.hf_repo} failed: {exc}") from exc
        finally:
            self.download = None
        return path

    def _command(self, path: Path, source: ModelSource) -> list[str]:
        """The command line (blocking: it creates the directory for saved slots, which
        llama-server refuses to start without)."""
        slots = self.settings.kv_cache_dir if self.settings.kv_cache_mb else None
        if slots is not None:
            slots.mkdir(parents=True, exist_ok=True)
        return binaries.llama_server_command(
            self.binary,
            source,
            path,
            settings=self.settings,
            port=self.port,
            n_ctx=self.n_ctx,
            n_gpu_layers=self.n_gpu_layers,
            slot_save_path=slots,
        )

    async def _spawn(self, path: Path, source: ModelSource) -> None:
        command = await asyncio.to_thread(self._command, path, source)
        log_file = await asyncio.to_thread(self._open_log, command)
        # The key goes through the environment: a command line is visible to every local
        # user in `ps`, and it is written to the log above.
        env = {
            **os.environ,
            OWNER_ENV: str(self.settings.data_dir.resolve()),
            LLAMA_KEY_ENV: self._api_key,
        }
        try:
            # llama-server writes its own log: no line of it passes through Python.
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=env,
                start_new_session=True,  # a Ctrl-C in the gateway's terminal is ours to handle
            )
        finally:
            log_file.close()
        if self._log_keeper is None:
            self._log_keeper = asyncio.create_task(self._keep_log_small())

    def _open_log(self, command: list[str]) -> BinaryIO:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        _rotate_log(self.log_path, copy_truncate=False)
        log_file = self.log_path.open("ab")
        log_file.write(f"--- {time.strftime('%F %T')} starting: {' '.join(command)}\n".encode())
        log_file.flush()
        return log_file

    async def _keep_log_small(self) -> None:
        while True:
            await asyncio.sleep(LOG_CHECK_INTERVAL_S)
            await asyncio.to_thread(_rotate_log, self.log_path, True)

    async def _wait_until_ready(self) -> None:
        assert self._process is not None
        process = self._process
        deadline = time.monotonic() + self.settings.load_timeout_s
        while time.monotonic() < deadline:
            if process.returncode is not None:
                tail = await asyncio.to_thread(_log_tail, self.log_path)
                self._fail(
                    f"llama-server exited with code {process.returncode} while loading "
                    f"{self.model_key or '?'}:\n{tail}"
                )
            if await self.is_healthy():
                self._started_at = time.monotonic()
                self._set_state(ManagerState.READY)
                self._watchdog = asyncio.create_task(self._watch(process))
                return
            await asyncio.sleep(HEALTH_POLL_INTERVAL_S)
        await self._terminate(process)
        tail = await asyncio.to_thread(_log_tail, self.log_path)
        self._fail(
            f"llama-server did not become ready within {self.settings.load_timeout_s:.0f} s; "
            f"last output:\n{tail}"
        )

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Restart llama-server with backoff if it dies while it should be running."""
        code = await process.wait()
        if self.state != ManagerState.READY or process is not self._process:
            return
        self.restarts += 1
        self._set_state(ManagerState.RESTARTING, f"llama-server exited unexpectedly (code {code})")
        delay = BACKOFF_START_S
        while True:
            await asyncio.sleep(delay)
            async with self._lifecycle:
                if self.state not in (ManagerState.RESTARTING, ManagerState.FAILED):
                    return  # someone else stopped or restarted it meanwhile
                try:
                    assert self.model is not None
                    await self._start_locked(self.model)
                    return
                except LlamaStartError as exc:
                    self._set_state(ManagerState.RESTARTING, f"restart failed: {exc}")
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _stop_locked(self) -> None:
        if self._watchdog and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
        process = self._process
        if self.state == ManagerState.STOPPED:
            self._process = None
            return
        self._set_state(ManagerState.STOPPING)  # also a FAILED one whose process is gone
        if process is not None:
            # llama-server lingers ~150 ms on SIGTERM while a kept-alive connection is
            # open; nothing is in flight here (switches hold the gate): drop the idle ones.
            await self.transport.aclose()
            for drop in self.drop_idle:
                drop()
            await self._terminate(process)
        self._process = None
        self._set_state(ManagerState.STOPPED)

    @staticmethod
    async def _terminate(process: asyncio.subprocess.Process) -> None:
        """Terminate, wait, then kill."""
        if process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            process.kill()
            await process.wait()


def cleanup_stale_processes(data_dir: Path, keep: set[int]) -> None:
    """Kill llama-servers that an earlier run of *this* gateway (same data directory)
    left behind; never one in ``keep`` or anybody else's."""
    owner = str(data_dir.resolve())
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.pid in keep:
            continue
        try:
            if "llama-server" not in (proc.info["name"] or ""):
                continue
            if proc.environ().get(OWNER_ENV) != owner:
                continue
            log.warning("stopping stale llama-server pid %s left by an earlier run", proc.pid)
            proc.terminate()
            try:
                proc.wait(STOP_GRACE_S)
            except psutil.TimeoutExpired:
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
