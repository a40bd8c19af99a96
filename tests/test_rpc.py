"""Models split across llama.cpp RPC workers: two real ggml-rpc-server processes on
loopback, the real llama-server started with --rpc across them, through a real gateway."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import SMOLLM, GatewayProcess, free_port, wait_for

from ailab.config import ConfigError, load_settings

LOCAL, SPLIT, SPLIT_TOO = "smollm2-135m", "smol-rpc", "smol-rpc-too"
PROMPT = "List three colours of the rainbow."


def _listening(port: int) -> bool:
    # A bare connection is safe: the worker reads no command from it and writes nothing.
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


class Worker:
    """One ggml-rpc-server on a loopback port, started and killed at will."""

    def __init__(self, binary: Path, log: Path) -> None:
        self.binary, self.log = binary, log
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(self.binary), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: _listening(self.port), timeout=30)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def workers(llama_server_binary: Path, tmp_path: Path) -> Iterator[list[Worker]]:
    pair = [
        Worker(llama_server_binary.parent / "ggml-rpc-server", tmp_path / f"w{n}.log")
        for n in (1, 2)
    ]
    for worker in pair:
        worker.start()
    yield pair
    for worker in pair:
        worker.kill()


def _gateway(make_gateway, tmp_path: Path, models: dict[str, list[str]]) -> GatewayProcess:  # type: ignore[no-untyped-def]
    extra = tmp_path / "extra.json"
    entry = {"filename": str(SMOLLM), "chat_template_file": "chatml-tools.jinja"}
    extra.write_text(json.dumps({key: {**entry, "rpc": rpc} for key, rpc in models.items()}))
    return make_gateway({"AILAB_EXTRA_MODELS": str(extra)})


def _answer(server: GatewayProcess, model: str) -> requests.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": 24,
    }
    return requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=180)


def _listed(server: GatewayProcess, key: str) -> dict:
    models = requests.get(f"{server.url}/models", timeout=10).json()["models"]
    return next(m for m in models if m["key"] == key)


def test_a_model_split_across_two_workers_answers_as_it_does_locally(  # type: ignore[no-untyped-def]
    make_gateway, workers: list[Worker], tmp_path: Path
) -> None:
    addresses = [w.address for w in workers]
    server = _gateway(make_gateway, tmp_path, {SPLIT: addresses, SPLIT_TOO: addresses[:1]})
    local = _answer(server, LOCAL)
    split = _answer(server, SPLIT)
    assert local.status_code == split.status_code == 200, split.text
    assert split.json()["model"] == SPLIT
    text = split.json()["choices"][0]["message"]["content"]
    assert text and text == local.json()["choices"][0]["message"]["content"]

    listed = _listed(server, SPLIT)
    assert listed["state"] == "ready" and listed["rpc_workers"] == addresses
    placement = listed["placement"]
    assert placement["offloaded_layers"] == placement["total_layers"] > 0
    assert all(placement["weights_mib"][a] > 0 for a in addresses)
    assert all(placement["kv_cache_mib"][a] > 0 for a in addresses)
    assert _listed(server, LOCAL)["placement"] is None  # a local model has no RPC split

    # A worker serves one llama-server at a time: a second model wanting it is told so.
    busy = requests.post(f"{server.url}/models/load", json={"model": SPLIT_TOO}, timeout=60)
    assert busy.status_code == 503
    assert f"RPC worker {addresses[0]} is serving {SPLIT}" in busy.json()["detail"]
    assert _answer(server, SPLIT).status_code == 200  # and the first one still serves


def test_a_dead_worker_fails_the_model_with_its_name_and_a_load_brings_it_back(  # type: ignore[no-untyped-def]
    make_gateway, workers: list[Worker], tmp_path: Path
) -> None:
    addresses = [w.address for w in workers]
    server = _gateway(make_gateway, tmp_path, {SPLIT: addresses})
    before = _answer(server, SPLIT)
    assert before.status_code == 200, before.text

    workers[1].kill()
    failed = wait_for(lambda: (m := _listed(server, SPLIT))["state"] == "failed" and m, 30)
    assert f"RPC worker {addresses[1]} closed its connection" in failed["message"]
    refused = _answer(server, SPLIT)
    assert refused.status_code == 503
    assert f"RPC worker {addresses[1]}" in refused.json()["error"]["message"]
    assert _answer(server, LOCAL).status_code == 200  # the local model is not affected

    down = requests.post(f"{server.url}/models/load", json={"model": SPLIT}, timeout=60)
    assert down.status_code == 503  # a load while the worker is down says so at once
    assert f"RPC worker {addresses[1]} is unreachable" in down.json()["detail"]

    workers[1].start()
    loaded = requests.post(f"{server.url}/models/load", json={"model": SPLIT}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    after = _answer(server, SPLIT)
    assert after.status_code == 200
    assert after.json()["choices"][0]["message"] == before.json()["choices"][0]["message"]


def test_a_worker_nobody_runs_fails_the_load_at_once_naming_it(
    make_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    nobody = f"127.0.0.1:{free_port()}"
    server = _gateway(make_gateway, tmp_path, {SPLIT: [nobody]})
    reply = requests.post(f"{server.url}/models/load", json={"model": SPLIT}, timeout=60)
    assert reply.status_code == 503
    assert f"RPC worker {nobody} is unreachable" in reply.json()["detail"]
    assert _listed(server, SPLIT)["state"] == "failed"


def test_workers_on_other_machines_need_the_trusted_network_flag(tmp_path: Path) -> None:
    env = {"AILAB_DATA_DIR": str(tmp_path), "AILAB_RPC_WORKERS": "192.0.2.10:50052"}
    with pytest.raises(ConfigError, match="AILAB_RPC_TRUSTED_NETWORK=1") as refused:
        load_settings(env)
    assert "no authentication" in str(refused.value)
    trusted = load_settings({**env, "AILAB_RPC_TRUSTED_NETWORK": "1"})
    assert trusted.rpc_workers == ("192.0.2.10:50052",)

    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"far": {"filename": "x.gguf", "rpc": ["gpu-box:50052"]}}))
    with pytest.raises(ConfigError, match="model 'far': RPC worker gpu-box:50052"):
        load_settings({"AILAB_DATA_DIR": str(tmp_path), "AILAB_EXTRA_MODELS": str(extra)})
    for local in ("127.0.0.1:50052", "localhost:50052"):
        assert load_settings({**env, "AILAB_RPC_WORKERS": local}).rpc_workers == (local,)


@pytest.mark.parametrize("bad", ["[::1]:50052", "127.0.0.1", "127.0.0.1:0", "host:99999"])
def test_a_malformed_worker_address_names_the_variable(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AILAB_RPC_WORKERS: RPC worker"):
        load_settings({"AILAB_DATA_DIR": str(tmp_path), "AILAB_RPC_WORKERS": bad})


def _hello(port: int) -> socket.socket:
    """A client of the worker's own protocol that holds it: HELLO answered, then idle."""
    sock = socket.create_connection(("127.0.0.1", port), 5)
    sock.sendall(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))
    answer = b""
    while len(answer) < 36:
        answer += sock.recv(36 - len(answer))
    assert answer[8] == 7  # protocol major version
    return sock


def test_a_worker_busy_with_another_client_is_named_and_survives_the_probe(  # type: ignore[no-untyped-def]
    make_gateway, workers: list[Worker], tmp_path: Path
) -> None:
    worker = workers[0]
    server = _gateway(make_gateway, tmp_path, {SPLIT: [worker.address]})
    holder = _hello(worker.port)
    busy = requests.post(f"{server.url}/models/load", json={"model": SPLIT}, timeout=60)
    assert busy.status_code == 503
    assert (
        f"RPC worker {worker.address} accepted the connection but did not answer"
        in (busy.json()["detail"])
    )
    holder.close()
    # The gateway's probe waited for its answer instead of dropping it, which would have
    # killed the worker (it dies writing to a closed connection).
    loaded = requests.post(f"{server.url}/models/load", json={"model": SPLIT}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    assert worker.process is not None and worker.process.poll() is None
    assert _answer(server, SPLIT).status_code == 200
