"""Shared fixtures: the real llama-server binary, the real models, and real gateways.

A gateway here is `python ai_server.py` started as a subprocess on free ports with its
own data directory, exactly as a user runs it, and stopped (with its llama-server) after.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ailab.upstream import binaries

PROJECT_DIR = Path(__file__).resolve().parent.parent
MODELS_DIR = PROJECT_DIR / "models"
SMOLLM = MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = MODELS_DIR / "gemma-3-270m-q4_k_m.gguf"


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    """Poll until ``predicate`` returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """The real llama-server, built from source by the project's own script."""
    explicit = os.environ.get("LLAMA_SERVER_PATH")
    if explicit:
        return Path(explicit)
    built = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "scripts" / "build_llama_server.py")],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(built.stdout.strip().splitlines()[-1])


def llama_server_busy(server: GatewayProcess) -> bool:
    """llama-server is working on a request: its own gauge, relayed by the gateway's
    /metrics (its port needs the gateway's key, which no one else has)."""
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    return any(
        sample.value > 0
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llamacpp_requests_processing"
    )


@pytest.fixture(scope="session")
def expected_device(llama_server_binary: Path) -> str:
    """What /health should call the device: the binary's own device list decides."""
    listed = subprocess.run(
        [str(llama_server_binary), "--list-devices"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "GPU" if binaries.parse_device_list(listed.stdout) else "CPU"


@pytest.fixture(scope="session")
def real_models() -> None:
    subprocess.run([sys.executable, str(PROJECT_DIR / "scripts" / "fetch_models.py")], check=True)


class GatewayProcess:
    """One `ai_server.py` subprocess with its own ports and data directory."""

    def __init__(self, binary: Path, data_dir: Path, extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.llama_port = free_port()
        self.data_dir = data_dir
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "AILAB_PORT": str(self.port),
            "AILAB_LLAMA_PORT": str(self.llama_port),
            "AILAB_DATA_DIR": str(data_dir),
            "LLAMA_SERVER_PATH": str(binary),
            "AILAB_PARALLEL": "2",
            "AILAB_CTX": "4096",
            **(extra_env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, timeout: float = 90.0) -> GatewayProcess:
        log = (self.data_dir / "gateway.out").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, str(PROJECT_DIR / "ai_server.py")],
            cwd=PROJECT_DIR,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_healthy(timeout)
        return self

    def output(self) -> str:
        path = self.data_dir / "gateway.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_healthy(self, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited early:\n{self.output()[-3000:]}")
            try:
                response = requests.get(f"{self.url}/health", timeout=2)
                if response.status_code == 200 and response.json()["status"] == "ok":
                    return response.json()
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway not healthy within {timeout} s:\n{self.output()[-3000:]}")

    def llama_pids(self) -> list[int]:
        if self.process is None:
            return []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [c.pid for c in children if "llama-server" in c.name()]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        children = self.llama_pids()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pid in children:  # never leave a llama-server behind, even if a test failed
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


@pytest.fixture(scope="session")
def gateway(
    llama_server_binary: Path, real_models: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """A gateway shared by tests that neither switch models nor kill processes."""
    data_dir = tmp_path_factory.mktemp("gateway")
    workspace = data_dir / "workspace"
    server = GatewayProcess(llama_server_binary, data_dir, {"AILAB_TOOL_ROOTS": str(workspace)})
    workspace.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_gateway(llama_server_binary: Path, real_models: None, tmp_path: Path) -> Iterator[object]:
    """Factory for a private gateway (for tests that switch, kill or restart)."""
    started: list[GatewayProcess] = []

    def factory(extra_env: dict[str, str] | None = None, wait: bool = True) -> GatewayProcess:
        data_dir = tmp_path / f"gw{len(started)}"
        data_dir.mkdir()
        server = GatewayProcess(llama_server_binary, data_dir, extra_env)
        started.append(server)
        return server.start(wait=wait)

    yield factory
    for server in started:
        server.stop()
