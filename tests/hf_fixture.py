"""A fake Hugging Face Hub on 127.0.0.1, serving one model repo, for tests.

It implements what huggingface_hub 2.4 calls to list and download files:

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model info with siblings
- ``GET /api/models/{repo}/tree/{rev}``: the file tree (``list_repo_files``)
- ``HEAD``/``GET /{repo}/resolve/{rev}/{filename}``: file metadata and body, with Range support

Errors carry the ``X-Error-Code`` header the client uses to tell a missing repo from a
missing file. Usage::

    with FakeHfHub({"model-Q4_K_M.gguf": b"..."}) as hub:
        hf_hub_download(hub.repo_id, "model-Q4_K_M.gguf", endpoint=hub.endpoint, ...)
        assert hub.count("GET", "/resolve/") == 1
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from huggingface_hub import constants as hf_constants

DEFAULT_REPO_ID = "test-org/test-model-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
_CHUNK = 64 * 1024

_MODEL_API = re.compile(
    r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+))?"
)
_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def point_hub_client_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Make ``endpoint`` huggingface_hub's default, for calls that pass no ``endpoint=``.

    The library reads HF_ENDPOINT once, at import, into two constants; ``hf_hub_url`` honours an
    explicit ``endpoint=`` only while they agree, so they must be patched together.
    """
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        hf_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )


class _File:
    """A file body held in memory or on disk, with the etag the Hub would give it."""

    def __init__(self, source: bytes | Path) -> None:
        self.source = source
        self.size = len(source) if isinstance(source, bytes) else source.stat().st_size
        digest = hashlib.sha256()
        for chunk in self.chunks(0, self.size, 1024 * 1024):
            digest.update(chunk)
        self.etag = digest.hexdigest()

    def chunks(self, start: int, end: int, size: int) -> Iterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive), ``size`` at a time."""
        if isinstance(self.source, bytes):
            view = memoryview(self.source)
            for offset in range(start, end, size):
                yield bytes(view[offset : min(offset + size, end)])
            return
        with self.source.open("rb") as f:
            f.seek(start)
            for offset in range(start, end, size):
                yield f.read(min(size, end - offset))


class FakeHfHub:
    """Serves ``files`` as the ``main`` branch of ``repo_id`` until the context exits.

    ``throttle_bytes_per_s`` limits each file body's rate. With ``stall_after_bytes`` set, every
    file body stops after that many bytes for ``stall_s`` seconds. Closing the hub ends stalls and
    throttling, and bodies in flight finish at full speed, so that a client which abandoned its
    download sees data again and can stop cleanly. ``requests`` logs (method, path) per request.
    """

    def __init__(
        self,
        files: Mapping[str, bytes | Path],
        *,
        repo_id: str = DEFAULT_REPO_ID,
        throttle_bytes_per_s: int | None = None,
        stall_after_bytes: int | None = None,
        stall_s: float = 0.0,
    ) -> None:
        self.repo_id = repo_id
        self.files = {name: _File(source) for name, source in files.items()}
        self.throttle_bytes_per_s = throttle_bytes_per_s
        self.stall_after_bytes = stall_after_bytes
        self.stall_s = stall_s
        self.requests: list[tuple[str, str]] = []
        self.closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def count(self, method: str, path_contains: str = "") -> int:
        """How many ``method`` requests had ``path_contains`` in their path."""
        return sum(1 for m, p in list(self.requests) if m == method and path_contains in p)

    def __enter__(self) -> FakeHfHub:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def model_info(self) -> dict[str, Any]:
        siblings = [{"rfilename": name} for name in self.files]
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": COMMIT, "siblings": siblings}

    def tree(self) -> list[dict[str, Any]]:
        return [
            {"type": "file", "path": name, "size": f.size, "oid": f.etag[:40]}
            for name, f in self.files.items()
        ]

    def pause_s(self, nbytes: int) -> float:
        """Seconds to wait after sending ``nbytes`` to honour the throttle."""
        return nbytes / self.throttle_bytes_per_s if self.throttle_bytes_per_s else 0.0


def _handler_for(hub: FakeHfHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    hub: FakeHfHub

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean."""

    def do_GET(self) -> None:
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def _route(self, send_body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append((self.command, path))
        if match := _MODEL_API.fullmatch(path):
            self._api(match, send_body)
        elif match := _RESOLVE.fullmatch(path):
            self._resolve(match, send_body)
        else:
            self._error(404, "RepoNotFound", send_body)

    def _api(self, match: re.Match[str], send_body: bool) -> None:
        if match["repo"] != self.hub.repo_id:
            return self._error(404, "RepoNotFound", send_body)
        if match["rev"] not in (None, "main", COMMIT):
            return self._error(404, "RevisionNotFound", send_body)
        body = self.hub.tree() if match["kind"] == "tree" else self.hub.model_info()
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def _resolve(self, match: re.Match[str], send_body: bool) -> None:
        if match["repo"] != self.hub.repo_id:
            return self._error(404, "RepoNotFound", send_body)
        if match["rev"] not in ("main", COMMIT):
            return self._error(404, "RevisionNotFound", send_body)
        file = self.hub.files.get(match["file"])
        if file is None:
            return self._error(404, "EntryNotFound", send_body)
        start, end = 0, file.size
        range_match = _RANGE.fullmatch(self.headers.get("Range", ""))
        if range_match and send_body:
            start = int(range_match[1])
            end = int(range_match[2]) + 1 if range_match[2] else file.size
        self.send_response(206 if start or end != file.size else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{file.etag}"')
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if start or end != file.size:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{file.size}")
        self.end_headers()
        if send_body:
            self._send_body(file, start, end)

    def _send_body(self, file: _File, start: int, end: int) -> None:
        hub = self.hub
        chunk_size = min(_CHUNK, max(1, (hub.throttle_bytes_per_s or _CHUNK) // 10))
        stall_at = hub.stall_after_bytes
        sent = 0
        try:
            for chunk in file.chunks(start, end, chunk_size):
                if stall_at is not None and sent >= stall_at:
                    hub.closing.wait(hub.stall_s)
                    stall_at = None
                self.wfile.write(chunk)
                sent += len(chunk)
                if not hub.closing.is_set():
                    time.sleep(hub.pause_s(len(chunk)))
        except (BrokenPipeError, ConnectionResetError):
            pass  # The client gave up; that is what several tests provoke.

    def _error(self, status: int, code: str, send_body: bool) -> None:
        data = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)
