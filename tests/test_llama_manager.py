"""The supervisor against the real llama-server: start, crash recovery, ports, stale processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import psutil
import pytest
import requests
from conftest import SMOLLM, GatewayProcess, free_port, wait_for


def test_health_reports_the_default_model_ready_on_its_device(
    gateway: GatewayProcess, expected_device: str
) -> None:
    health = requests.get(f"{gateway.url}/health", timeout=5).json()
    assert health["status"] == "ok"
    assert health["model_key"] == "smollm2-135m"
    assert health["device"] == expected_device
    assert health["pid"] in gateway.llama_pids()
    assert health["message"] is None


def test_llama_server_killed_with_sigkill_is_restarted(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway()
    first_pid = requests.get(f"{server.url}/health", timeout=5).json()["pid"]
    os.kill(first_pid, signal.SIGKILL)
    seen = wait_for(lambda: _not_ok_health(server), timeout=10, interval=0.02)
    assert seen["status"] == "restarting"
    assert "exited unexpectedly" in seen["message"]
    # A request sent while it restarts waits for it instead of failing.
    reply = requests.post(
        f"{server.url}/chat",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    health = requests.get(f"{server.url}/health", timeout=5).json()
    assert (health["status"], health["restarts"]) == ("ok", 1)
    assert health["pid"] != first_pid


def test_a_port_in_use_is_reported_and_the_gateway_stays_up(make_gateway) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server: GatewayProcess = make_gateway({"AILAB_LLAMA_PORT": str(port)}, wait=False)
        health = wait_for(lambda: _error_health(server), timeout=60)
    assert f"port {port} is already in use" in health["message"]
    assert "AILAB_LLAMA_PORT" in health["message"]


def _not_ok_health(server: GatewayProcess) -> dict | None:
    body = requests.get(f"{server.url}/health", timeout=5).json()
    return body if body["status"] != "ok" else None


def _error_health(server: GatewayProcess) -> dict | None:
    try:
        body = requests.get(f"{server.url}/health", timeout=2).json()
    except requests.ConnectionError:
        return None
    return body if body["status"] == "error" else None


def test_a_stale_llama_server_of_this_gateway_is_cleaned_up(make_gateway) -> None:  # type: ignore[no-untyped-def]
    first: GatewayProcess = make_gateway()
    orphan = first.llama_pids()[0]
    assert first.process is not None
    first.process.kill()  # the gateway dies without stopping its llama-server
    first.process.wait()
    assert psutil.pid_exists(orphan)
    second = GatewayProcess(
        Path(first.env["LLAMA_SERVER_PATH"]),
        first.data_dir,
        {"AILAB_LLAMA_PORT": str(first.llama_port)},
    )
    try:
        second.start()
        assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == "zombie"
    finally:
        second.stop()


def test_somebody_elses_llama_server_is_never_killed(make_gateway, llama_server_binary) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    foreign = subprocess.Popen(
        [str(llama_server_binary), "-m", str(SMOLLM), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _port_open(port), timeout=60)
        server: GatewayProcess = make_gateway({"AILAB_LLAMA_PORT": str(port)}, wait=False)
        health = wait_for(lambda: _error_health(server), timeout=60)
        assert "already in use" in health["message"]
        assert foreign.poll() is None
    finally:
        foreign.kill()
        foreign.wait()


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_each_models_llama_server_output_goes_to_its_own_log(gateway: GatewayProcess) -> None:
    log = gateway.data_dir / "logs" / "llama-server-smollm2-135m.log"
    text = wait_for(lambda: log.exists() and "starting:" in log.read_text() and log.read_text())
    assert "--metrics" in text and "-ngl" in text


def test_a_bad_environment_value_stops_start_up_naming_the_variable(
    llama_server_binary: Path, tmp_path: Path
) -> None:
    server = GatewayProcess(llama_server_binary, tmp_path, {"AILAB_PORT": "not-a-port"})
    server.start(wait=False)
    assert server.process is not None
    assert server.process.wait(30) == 2
    assert "AILAB_PORT" in server.output()


def test_a_missing_default_model_file_is_reported_on_health(make_gateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"ghost": {"filename": "ghost.gguf"}}))
    server: GatewayProcess = make_gateway(
        {"AILAB_EXTRA_MODELS": str(extra), "AILAB_DEFAULT_MODEL": "ghost"}, wait=False
    )
    health = wait_for(lambda: _error_health(server), timeout=60)
    assert "ghost.gguf" in health["message"] and "does not exist" in health["message"]
    chat = requests.post(
        f"{server.url}/chat", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10
    )
    assert chat.status_code == 503
    assert "ghost.gguf" in chat.json()["detail"]
    switched = requests.post(
        f"{server.url}/model/switch", json={"model_key": "smollm2-135m"}, timeout=120
    )
    assert switched.status_code == 200, switched.text
    assert requests.get(f"{server.url}/health", timeout=5).json()["status"] == "ok"


def hf_models(tmp_path: Path) -> dict[str, str]:
    """Gateway settings with two Hugging Face models at a local hub: one that exists."""
    extra = tmp_path / "extra.json"
    extra.write_text(
        json.dumps(
            {
                "hf-smol": {"hf_repo": "test-org/smol-GGUF:Q4_1"},
                "hf-absent": {"hf_repo": "test-org/absent-GGUF:Q4_1"},
            }
        )
    )
    return {"AILAB_EXTRA_MODELS": str(extra), "LLAMA_CACHE": str(tmp_path / "hf-cache")}


def slow_hub():  # type: ignore[no-untyped-def]
    """A hub that sends the model at 4 MB/s (about 25 s), at full speed once closed."""
    from hf_fixture import FakeHfHub

    files = {"smol-Q4_1.gguf": SMOLLM, "smol-Q8_0.gguf": b"not this one"}
    return FakeHfHub(files, repo_id="test-org/smol-GGUF", throttle_bytes_per_s=4_000_000)


def test_a_switch_downloads_first_while_the_current_model_keeps_serving(
    make_gateway,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    with slow_hub() as hub:
        server: GatewayProcess = make_gateway({**hf_models(tmp_path), "HF_ENDPOINT": hub.endpoint})
        outcome: dict[str, requests.Response] = {}
        switching = threading.Thread(
            target=lambda: outcome.update(
                switch=requests.post(
                    f"{server.url}/model/switch", json={"model_key": "hf-smol"}, timeout=300
                )
            )
        )
        switching.start()
        progress = wait_for(lambda: _download_progress(server, "ok"), timeout=30, interval=0.05)
        listed = wait_for(lambda: _listed_progress(server), timeout=30, interval=0.05)
        assert listed["filename"] == "smol-Q4_1.gguf"  # /models shows it under the model
        chat = requests.post(
            f"{server.url}/chat",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=120,
        )
        assert chat.status_code == 200 and chat.json()["model_key"] == "smollm2-135m"
    switching.join()  # closing the hub let the download finish
    assert progress["filename"] == "smol-Q4_1.gguf"
    assert progress["total_bytes"] == SMOLLM.stat().st_size
    assert outcome["switch"].status_code == 200, outcome["switch"].text
    health = requests.get(f"{server.url}/health", timeout=5).json()
    assert (health["status"], health["model_key"], health["download"]) == ("ok", "hf-smol", None)
    cached = list((tmp_path / "hf-cache").rglob("smol-Q4_1.gguf"))
    assert cached and cached[0].stat().st_size == SMOLLM.stat().st_size


def test_a_failed_download_leaves_the_current_model_serving(
    make_gateway,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    with slow_hub() as hub:
        server: GatewayProcess = make_gateway({**hf_models(tmp_path), "HF_ENDPOINT": hub.endpoint})
        reply = requests.post(
            f"{server.url}/model/switch", json={"model_key": "hf-absent"}, timeout=120
        )
    assert reply.status_code == 502
    detail = reply.json()["detail"]
    assert "test-org/absent-GGUF" in detail and "smollm2-135m is still serving" in detail
    health = requests.get(f"{server.url}/health", timeout=5).json()
    assert (health["status"], health["model_key"]) == ("ok", "smollm2-135m")


def test_the_port_opens_while_the_first_model_downloads(
    make_gateway,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    with slow_hub() as hub:
        env = {**hf_models(tmp_path), "HF_ENDPOINT": hub.endpoint}
        server: GatewayProcess = make_gateway(
            {**env, "AILAB_DEFAULT_MODEL": "hf-smol", "AILAB_SWITCH_WAIT": "1"}, wait=False
        )
        progress = wait_for(lambda: _download_progress(server, "loading"), timeout=60)
        assert progress["filename"] == "smol-Q4_1.gguf"
        waited = requests.post(
            f"{server.url}/chat",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=30,
        )
        assert waited.status_code == 503
        assert "still downloading" in waited.json()["detail"]
    health = server.wait_healthy(120)
    assert health["model_key"] == "hf-smol"


def _listed_progress(server: GatewayProcess) -> dict | None:
    models = requests.get(f"{server.url}/models", timeout=2).json()["models"]
    download = next(m for m in models if m["key"] == "hf-smol")["download"]
    return download if download and download["downloaded_bytes"] > 0 else None


def _download_progress(server: GatewayProcess, status: str) -> dict | None:
    try:
        body = requests.get(f"{server.url}/health", timeout=2).json()
    except requests.ConnectionError:
        return None
    download = body.get("download")
    if body["status"] == status and download and download["downloaded_bytes"] > 0:
        return download
    return None


def test_a_big_log_is_rotated_keeping_a_bounded_number_of_backups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ailab.upstream import supervisor as llama_manager

    monkeypatch.setattr(llama_manager, "LOG_MAX_BYTES", 10)
    log = tmp_path / "llama-server.log"
    for run in range(5):
        log.write_text(f"run {run} " * 5)
        llama_manager._rotate_log(log, copy_truncate=run % 2 == 0)
    backups = sorted(p.name for p in tmp_path.iterdir())
    assert backups == [
        "llama-server.log",
        "llama-server.log.1",
        "llama-server.log.2",
        "llama-server.log.3",
    ]
    assert (tmp_path / "llama-server.log.1").read_text().startswith("run 4")
    assert log.read_text() == ""  # the last run was copy-truncated in place
    log.write_text("small")
    llama_manager._rotate_log(log, copy_truncate=False)
    assert log.read_text() == "small"
