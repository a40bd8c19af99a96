"""Download GGUF models from the Hugging Face Hub into a local cache.

``download_gguf`` is blocking: run it in a thread (``asyncio.to_thread``). It reports progress
through a callback, gives up when no bytes arrive for ``stall_timeout_s``, and turns every
failure into ``DownloadError`` with a message that says what to check.

This module never reads ``os.environ``: the caller passes the Hub endpoint, and ``None`` means
huggingface_hub's own default (``huggingface_hub.constants.ENDPOINT``).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    CacheNotFound,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

DEFAULT_QUANT = "Q4_K_M"
ACCEPTED_FORMS = (
    "org/repo, org/repo:QUANT (e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M), "
    "org/repo:file.gguf or org/repo/file.gguf"
)
_METADATA_TIMEOUT_S = 30.0
_REPORT_INTERVAL_S = 0.5

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_QUANT = re.compile(r"[\w.-]+")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)

# huggingface_hub writes (and reports) HTTP downloads in chunks of this size; its 10 MiB default
# makes progress jumpy and makes a slow-but-alive link look stalled. Applies to every download in
# this process, which is what we want.
hf_constants.DOWNLOAD_CHUNK_SIZE = 1024 * 1024


class HfSpec(BaseModel):
    """A parsed model reference: a repo plus at most one of quant or filename."""

    model_config = ConfigDict(frozen=True)

    repo_id: str
    quant: str | None = None
    filename: str | None = None


class DownloadProgress(BaseModel):
    """One progress report. Terminal states: ``done`` (success) or ``error`` set (failure)."""

    repo_id: str
    filename: str
    downloaded_bytes: int
    total_bytes: int | None
    percent: float | None
    started_at: datetime
    updated_at: datetime
    done: bool = False
    error: str | None = None


class DownloadError(RuntimeError):
    """The model could not be resolved or downloaded; the message says what to check."""


class DownloadStalled(DownloadError):
    """No bytes arrived for longer than the stall timeout."""


def parse_hf_repo(spec: str) -> HfSpec:
    """Parse ``org/repo``, ``org/repo:QUANT``, ``org/repo:file.gguf`` or ``org/repo/file.gguf``."""
    text = spec.strip()
    repo_part, colon, suffix = text.partition(":")
    owner, _, rest = repo_part.partition("/")
    name, _, path = rest.partition("/")
    repo_id = f"{owner}/{name}"
    if not _REPO_ID.fullmatch(repo_id) or (colon and (path or not suffix)):
        raise ValueError(f"Bad Hugging Face model spec {spec!r}; accepted forms: {ACCEPTED_FORMS}")
    if path:
        return HfSpec(repo_id=repo_id, filename=_checked_filename(path, spec))
    if suffix.lower().endswith(".gguf"):
        return HfSpec(repo_id=repo_id, filename=_checked_filename(suffix, spec))
    if suffix and not _QUANT.fullmatch(suffix):
        raise ValueError(f"Bad quant in {spec!r}; accepted forms: {ACCEPTED_FORMS}")
    return HfSpec(repo_id=repo_id, quant=suffix or None)


def _checked_filename(filename: str, spec: str) -> str:
    parts = filename.split("/")
    if not filename.lower().endswith(".gguf") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"Bad GGUF file name in {spec!r}; accepted forms: {ACCEPTED_FORMS}")
    return filename


def choose_gguf(spec: HfSpec, files: list[str]) -> str:
    """The file ``spec`` designates among ``files``; DownloadError if none or several match."""
    if spec.filename is not None:
        if spec.filename not in files:
            raise DownloadError(
                f"{spec.repo_id} has no file {spec.filename!r}; GGUF files: {_listing(files)}"
            )
        return _reject_split(spec.filename)
    candidates = _model_ggufs(files)
    if not candidates:
        raise DownloadError(f"{spec.repo_id} contains no GGUF model file; files: {_listing(files)}")
    if spec.quant is None and len(candidates) == 1:
        return _reject_split(candidates[0])
    quant = spec.quant or DEFAULT_QUANT
    matches = [f for f in candidates if _has_quant(f, quant)]
    if len(matches) == 1:
        return _reject_split(matches[0])
    problem = "several files match" if matches else "no file matches"
    hint = "" if spec.quant else f" (no quant given, so {DEFAULT_QUANT} was tried)"
    raise DownloadError(
        f"{spec.repo_id}: {problem} quant {quant!r}{hint}; choose one with "
        f"{spec.repo_id}:QUANT or {spec.repo_id}:FILE.gguf from: {_listing(matches or candidates)}"
    )


def _model_ggufs(files: list[str]) -> list[str]:
    """GGUF language models, without vision projectors and without follow-up split shards."""
    result = []
    for name in files:
        base = name.rsplit("/", 1)[-1].lower()
        shard = _SHARD.search(base)
        if (
            base.endswith(".gguf")
            and not base.startswith("mmproj")
            and not (shard and int(shard.group(1)) != 1)
        ):
            result.append(name)
    return sorted(result)


def _has_quant(filename: str, quant: str) -> bool:
    # "Q4_K" must not match "Q4_K_M" and "Q4_XS" must not match "IQ4_XS".
    pattern = rf"(?<![a-z0-9]){re.escape(quant.lower())}(?![a-z0-9_])"
    return re.search(pattern, filename.rsplit("/", 1)[-1].lower()) is not None


def _reject_split(filename: str) -> str:
    if _SHARD.search(filename):
        raise DownloadError(
            f"{filename!r} is part of a split GGUF; split models are not supported yet, "
            "pick a quant that is a single file"
        )
    return filename


def _listing(files: list[str]) -> str:
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    return ", ".join(sorted(ggufs)) if ggufs else "(none)"


def resolve_filename(spec: HfSpec | str, endpoint: str | None = None) -> str:
    """Ask the Hub for the repo's files and return the GGUF that ``spec`` designates."""
    if isinstance(spec, str):
        spec = parse_hf_repo(spec)
    try:
        info = huggingface_hub.HfApi(endpoint=endpoint).model_info(
            spec.repo_id, timeout=_METADATA_TIMEOUT_S
        )
    except Exception as exc:
        raise _download_error(exc, spec, None, endpoint) from exc
    return choose_gguf(spec, [s.rfilename for s in info.siblings or []])


def download_gguf(
    spec: str,
    cache_dir: Path,
    on_progress: Callable[[DownloadProgress], None],
    *,
    stall_timeout_s: float = 300,
    endpoint: str | None = None,
) -> Path:
    """Download the GGUF for ``spec`` into the HF cache at ``cache_dir`` and return its path.

    A file already in the cache is returned without touching the network (explicit file or quant
    specs only: a bare ``org/repo`` asks the Hub which file is current). Raises DownloadError,
    or DownloadStalled when no bytes arrive for ``stall_timeout_s``; split GGUFs are refused.
    """
    parsed = parse_hf_repo(spec)
    started = datetime.now(UTC)
    cached = _find_in_cache(parsed, cache_dir)
    if cached is not None:
        filename, path = cached
        size = path.stat().st_size
        on_progress(_progress(parsed.repo_id, filename, started, size, size, done=True))
        return path
    filename = resolve_filename(parsed, endpoint)
    tracker = _Tracker()

    def report(*, done: bool = False, error: str | None = None) -> None:
        downloaded, total = tracker.counts()
        on_progress(_progress(parsed.repo_id, filename, started, downloaded, total, done, error))

    future = _start_in_thread(
        lambda: huggingface_hub.hf_hub_download(
            parsed.repo_id,
            filename,
            cache_dir=cache_dir,
            endpoint=endpoint,
            tqdm_class=_tqdm_class_for(tracker),
        )
    )
    try:
        _watch(future, tracker, report, stall_timeout_s)
    except DownloadStalled as exc:
        report(error=str(exc))
        raise
    if (exc := future.exception()) is not None:
        error = _download_error(exc, parsed, filename, endpoint)
        report(error=str(error))
        raise error from exc
    path = Path(future.result())
    tracker.finish(path.stat().st_size)
    report(done=True)
    return path


def _progress(
    repo_id: str,
    filename: str,
    started: datetime,
    downloaded: int,
    total: int | None,
    done: bool = False,
    error: str | None = None,
) -> DownloadProgress:
    percent = min(100.0, 100.0 * downloaded / total) if total else None
    return DownloadProgress(
        repo_id=repo_id,
        filename=filename,
        downloaded_bytes=downloaded,
        total_bytes=total,
        percent=percent,
        started_at=started,
        updated_at=datetime.now(UTC),
        done=done,
        error=error,
    )


def _find_in_cache(spec: HfSpec, cache_dir: Path) -> tuple[str, Path] | None:
    """(filename, path) of the cached file for an explicit file or quant spec, else None.

    Only the snapshot that ``main`` points to counts, so a stale revision is never picked.
    """
    if spec.filename is None and spec.quant is None:
        return None
    try:
        cache = huggingface_hub.scan_cache_dir(cache_dir)
    except CacheNotFound:
        return None
    for repo in cache.repos:
        if repo.repo_id != spec.repo_id or repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            if "main" not in revision.refs:
                continue
            snapshot = revision.snapshot_path
            files = [f.file_path.relative_to(snapshot).as_posix() for f in revision.files]
            try:
                filename = choose_gguf(spec, files)
            except DownloadError:
                return None
            return filename, snapshot / filename
    return None


class _Tracker:
    """Byte counts shared between the hub's download thread and the watching thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._downloaded = 0
        self._total: int | None = None
        self._last_activity = time.monotonic()
        self.cancelled = threading.Event()

    def start_file(self, total: int | None) -> None:
        with self._lock:
            self._total = total
            self._last_activity = time.monotonic()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._downloaded += nbytes
            self._last_activity = time.monotonic()

    def touch(self) -> None:
        with self._lock:
            self._last_activity = time.monotonic()

    def finish(self, size: int) -> None:
        with self._lock:
            self._downloaded = self._total = size

    def counts(self) -> tuple[int, int | None]:
        with self._lock:
            return self._downloaded, self._total

    def idle_s(self) -> float:
        with self._lock:
            return time.monotonic() - self._last_activity


class _Cancelled(Exception):
    """Raised inside the hub's download loop to make an abandoned download stop."""


def _tqdm_class_for(tracker: _Tracker) -> type[tqdm]:
    """A silent tqdm that forwards huggingface_hub's byte counts to ``tracker``.

    The hub calls ``update`` with bytes written to the file and, when the class has it,
    ``update_transfer`` with bytes received (only different for Xet downloads), so bytes are
    counted in ``update`` alone and both count as activity. Each call is also the one place
    where the abandoned download thread can be told to stop.
    """

    class _ReportingTqdm(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Progress goes to the callback; bars would only clutter the server log.
            super().__init__(*args, **{**kwargs, "disable": True})
            tracker.start_file(kwargs.get("total"))

        def update(self, n: float | None = 1) -> bool | None:
            if tracker.cancelled.is_set():
                raise _Cancelled
            tracker.add(int(n or 0))
            return super().update(n)

        def update_transfer(self, n: int) -> None:
            if tracker.cancelled.is_set():
                raise _Cancelled
            tracker.touch()

        def set_transfer_postfix_str(self, s: str = "", refresh: bool = True) -> None:
            """Required by the hub next to ``update_transfer``; there is no bar to label."""

    return _ReportingTqdm


def _start_in_thread(fetch: Callable[[], str]) -> Future[str]:
    """Run ``fetch`` in a daemon thread, so that a stalled download can be abandoned."""
    future: Future[str] = Future()

    def target() -> None:
        try:
            future.set_result(fetch())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name="hf-download", daemon=True).start()
    return future


def _watch(
    future: Future[str],
    tracker: _Tracker,
    report: Callable[[], None],
    stall_timeout_s: float,
) -> None:
    """Report progress until ``future`` ends; raise DownloadStalled when bytes stop coming.

    A hub download cannot be interrupted, so on any way out but success the thread is told to
    stop, which it does at its next chunk (``_Cancelled``) or when the hub's read timeout fires.
    """
    try:
        while not wait([future], timeout=_REPORT_INTERVAL_S).done:
            report()
            if tracker.idle_s() > stall_timeout_s:
                downloaded, _ = tracker.counts()
                raise DownloadStalled(
                    f"Download stalled: no data for {stall_timeout_s:g} s after {downloaded} bytes"
                    " (check the network, HF_ENDPOINT, or retry later)"
                )
    except BaseException:
        tracker.cancelled.set()
        raise


def _download_error(
    exc: BaseException, spec: HfSpec, filename: str | None, endpoint: str | None
) -> DownloadError:
    """Translate a huggingface_hub, network or disk failure into a message saying what to check."""
    where = endpoint or hf_constants.ENDPOINT
    repo = spec.repo_id
    if isinstance(exc, DownloadError):
        return exc
    if isinstance(exc, GatedRepoError):
        return DownloadError(f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadError(
            f"Repository {repo} not found at {where}: check the repo name (org/repo), HF_ENDPOINT, "
            "and HF_TOKEN if it is private"
        )
    if isinstance(exc, RevisionNotFoundError):
        return DownloadError(f"{repo} has no 'main' revision at {where}")
    if isinstance(exc, RemoteEntryNotFoundError):
        return DownloadError(f"{repo} has no file {filename!r} at {where}: check the quant or file")
    if isinstance(exc, HfHubHTTPError):
        return DownloadError(f"The Hub at {where} refused {repo}: {exc}")
    if isinstance(exc, OSError) and not isinstance(exc, LocalEntryNotFoundError | ConnectionError):
        return DownloadError(f"Downloading {repo}/{filename} failed: {exc}")
    return DownloadError(
        f"Could not reach the Hub at {where} for {repo} ({type(exc).__name__}: {exc}): "
        "check the network connection and HF_ENDPOINT"
    )
