"""RPC workers (llama.cpp's ggml-rpc-server): the probes before and after a model loads on
them, the watch on a loaded model's connections to them, and where its weights went.

Two facts of ggml-rpc-server shape this module. It serves one client at a time (the next
connection waits in its listen queue until the current one closes), so a worker serving a
llama-server answers nobody else. And it does not ignore SIGPIPE: writing its answer to a
connection the client already closed kills it, so a probe that sent HELLO waits for the
answer however long the worker takes (see ``Prober``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import psutil

# RPC_PROTO_MAJOR/MINOR_VERSION of the pinned llama.cpp (ggml/include/ggml-rpc.h): llama-server
# refuses a worker with another major version or a newer minor one.
PROTOCOL_MAJOR = 7
PROTOCOL_MINOR = 0
_HELLO = 14  # RPC_CMD_HELLO, the same number in every protocol version
_CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE: the HELLO request's body (transport capabilities)
_HELLO_ANSWER = struct.Struct("<QBBBB24s")  # size, major, minor, patch, padding, caps
CONNECT_TIMEOUT_S = 3.0
HELLO_TIMEOUT_S = 3.0
_RUN_START = "\n--- "  # the supervisor's marker line before each start in a model's log
_OFFLOADED = re.compile(r"load_tensors: offloaded (\d+)/(\d+) layers")
_BUFFER = re.compile(
    r"(?:load_tensors|llama_kv_cache):\s+(?P<buffer>\S+) (?P<kind>model|KV) buffer size "
    r"=\s*(?P<mib>[\d.]+) MiB"
)
_RPC_BUFFER = re.compile(r"^RPC\d+\[(?P<worker>[^\]]+)\]$")


def address(worker: str) -> tuple[str, int]:
    """host:port (as config.check_rpc_workers accepts it) to host and port."""
    host, _, port = worker.rpartition(":")
    return host, int(port)


async def _connect(worker: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An open connection; TimeoutError or OSError when there is none."""
    return await asyncio.wait_for(asyncio.open_connection(*address(worker)), CONNECT_TIMEOUT_S)


def _unreachable(worker: str, exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return f"RPC worker {worker} did not accept a connection within {CONNECT_TIMEOUT_S:.0f} s"
    return f"RPC worker {worker} is unreachable ({exc.strerror or exc})"


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def refused(worker: str) -> str | None:
    """Why a worker is certainly down (nothing listens, no route), else None. Sends nothing:
    a live worker busy with a llama-server answers no HELLO, so a connection that opens or
    times out proves nothing either way, and an empty one costs the worker nothing."""
    try:
        _, writer = await _connect(worker)
    except TimeoutError:
        return None
    except OSError as exc:
        return _unreachable(worker, exc)
    await _close(writer)
    return None


class Prober:
    """HELLO probes of workers before a model loads on them.

    A probe whose answer does not come in time is parked: its connection stays open until
    the worker answers (when its current client leaves) and is closed only then, because
    ggml-rpc-server dies writing to a closed connection. ``close`` drops the parked ones.
    """

    def __init__(self) -> None:
        self._parked: set[asyncio.Task[None]] = set()

    async def check(self, workers: tuple[str, ...]) -> str | None:
        """None when every worker answers HELLO in a protocol llama-server accepts; else
        the first problem, naming the worker and what to do."""
        for worker in workers:
            problem = await self.hello(worker)
            if problem:
                return problem
        return None

    async def hello(self, worker: str) -> str | None:
        try:
            reader, writer = await _connect(worker)
        except OSError as exc:
            return f"{_unreachable(worker, exc)}; start its ggml-rpc-server"
        writer.write(struct.pack("<BQ", _HELLO, _CONN_CAPS) + bytes(_CONN_CAPS))
        read = asyncio.ensure_future(reader.readexactly(_HELLO_ANSWER.size))
        try:
            answer = await asyncio.wait_for(asyncio.shield(read), HELLO_TIMEOUT_S)
        except TimeoutError:
            self._park(read, writer)
            return (
                f"RPC worker {worker} accepted the connection but did not answer within "
                f"{HELLO_TIMEOUT_S:.0f} s: a ggml-rpc-server serves one llama-server at a "
                "time, and another one (another gateway or llama-server) is using it"
            )
        except (asyncio.IncompleteReadError, OSError):
            await _close(writer)
            return (
                f"RPC worker {worker} closed the connection during the handshake: it is not "
                f"a ggml-rpc-server of RPC protocol {PROTOCOL_MAJOR}.x; run the one built "
                "with the gateway's llama-server (make setup)"
            )
        await _close(writer)
        size, major, minor, patch, _, _ = _HELLO_ANSWER.unpack(answer)
        if size != _HELLO_ANSWER.size - 8 or major != PROTOCOL_MAJOR or minor > PROTOCOL_MINOR:
            return (
                f"RPC worker {worker} speaks RPC protocol {major}.{minor}.{patch}; this "
                f"llama-server speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}: run the "
                "ggml-rpc-server built with the gateway's llama-server (make setup)"
            )
        return None

    def _park(self, read: asyncio.Future[bytes], writer: asyncio.StreamWriter) -> None:
        async def close_after_answer() -> None:
            try:
                with contextlib.suppress(asyncio.IncompleteReadError, OSError):
                    await read
            finally:
                await _close(writer)

        task = asyncio.create_task(close_after_answer())
        self._parked.add(task)
        task.add_done_callback(self._parked.discard)

    async def close(self) -> None:
        for task in list(self._parked):
            task.cancel()
        await asyncio.gather(*self._parked, return_exceptions=True)


def _established(pid: int) -> set[tuple[str, int]]:
    """The remote addresses of a process's open TCP connections (blocking)."""
    return {
        (conn.raddr.ip, conn.raddr.port)
        for conn in psutil.Process(pid).net_connections(kind="tcp4")
        if conn.raddr and conn.status == psutil.CONN_ESTABLISHED
    }


@dataclass(frozen=True)
class WorkerWatch:
    """The connections one llama-server process holds to its workers, taken once it is
    ready. While a model is loaded, llama-server keeps one connection per worker that holds
    part of it; the worker's end closing (its process died, it restarted and lost the
    weights) means the model is broken, though llama-server notices only at its next
    request, by aborting. A worker machine that vanishes without closing its connections
    is not seen here."""

    pid: int
    links: dict[str, tuple[str, int]]  # worker -> the address llama-server is connected to

    @classmethod
    def take(cls, pid: int, workers: tuple[str, ...]) -> WorkerWatch:
        """Blocking (name resolution, /proc): run it in a thread."""
        try:
            established = _established(pid)
        except psutil.Error:
            return cls(pid, {})
        links = {}
        for worker in workers:
            host, port = address(worker)
            with contextlib.suppress(OSError):
                resolved = (socket.gethostbyname(host), port)  # llama.cpp resolves the same way
                if resolved in established:
                    links[worker] = resolved
        return cls(pid, links)

    def lost(self) -> str | None:
        """The first worker whose connection is gone (blocking). None also when the process
        itself is gone: the supervisor handles that."""
        try:
            established = _established(self.pid)
        except psutil.Error:
            return None
        return next((w for w, a in self.links.items() if a not in established), None)


@dataclass(frozen=True)
class Placement:
    """Where a loaded model went, from llama-server's load log: offloaded layers, and MiB of
    weights and KV cache per buffer (an RPC buffer by its worker's host:port, the others by
    llama.cpp's name: CPU_Mapped or CPU is this machine's memory, CUDA0 its first GPU)."""

    offloaded_layers: int
    total_layers: int
    weights_mib: dict[str, float]
    kv_cache_mib: dict[str, float]


def read_placement(log_path: Path) -> Placement | None:
    """The placement of the latest run in a model's log (blocking); None when the log does
    not say (llama-server prints it at --log-verbosity 4, which RPC models get)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    text = text[text.rfind(_RUN_START) + 1 :]
    offloaded = _OFFLOADED.search(text)
    if offloaded is None:
        return None
    buffers: dict[str, dict[str, float]] = {"model": {}, "KV": {}}
    for match in _BUFFER.finditer(text):
        rpc_buffer = _RPC_BUFFER.match(match["buffer"])
        where = rpc_buffer["worker"] if rpc_buffer else match["buffer"]
        buffers[match["kind"]][where] = float(match["mib"])
    return Placement(
        offloaded_layers=int(offloaded.group(1)),
        total_layers=int(offloaded.group(2)),
        weights_mib=buffers["model"],
        kv_cache_mib=buffers["KV"],
    )
