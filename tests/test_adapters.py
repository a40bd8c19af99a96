"""LoRA adapters checked against their base model (ailab.adapters), with a real adapter
built for SmolLM2, and that adapter served by the real llama-server per request."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ailab.adapters import AdapterMismatch, check_lora
from ailab.gguf_meta import read_info
from tests.conftest import GEMMA, SMOLLM, free_port
from tests.lora_fixture import TARGETS, build_lora


@pytest.fixture(scope="module")
def lora(real_models: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora(read_info(SMOLLM), tmp_path_factory.mktemp("lora") / "smollm2-lora.gguf")


def test_an_adapter_built_for_smollm2_is_accepted(lora: Path) -> None:
    info = check_lora(lora, SMOLLM, "smollm2-135m")
    assert (info.architecture, info.rank, info.alpha) == ("llama", 4, 4.0)
    assert info.tensors == 30 * len(TARGETS)


def test_an_adapter_for_another_architecture_is_refused(lora: Path) -> None:
    with pytest.raises(AdapterMismatch, match="is for 'llama' models; gemma3-270m is 'gemma3'"):
        check_lora(lora, GEMMA, "gemma3-270m")


def test_a_model_is_not_an_adapter() -> None:
    with pytest.raises(AdapterMismatch, match="is not a LoRA adapter"):
        check_lora(SMOLLM, SMOLLM, "smollm2-135m")


def test_an_adapter_shaped_for_another_base_is_refused(tmp_path: Path) -> None:
    wide = build_lora(read_info(SMOLLM), tmp_path / "wide.gguf", widen=1)
    with pytest.raises(AdapterMismatch, match=r"blk\.0\.attn_q\.weight is \[576, 576\]"):
        check_lora(wide, SMOLLM, "smollm2-135m")
    assert wide.exists() and SMOLLM.exists()


def test_a_cut_short_or_garbage_file_is_refused(lora: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.gguf"
    short.write_bytes(lora.read_bytes()[:-1000])
    with pytest.raises(AdapterMismatch, match="is cut short"):
        check_lora(short, SMOLLM, "smollm2-135m")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all")
    with pytest.raises(AdapterMismatch, match="cannot be read as GGUF"):
        check_lora(garbage, SMOLLM, "smollm2-135m")


@pytest.fixture
def lora_server(llama_server_binary: Path, lora: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    command = [
        str(llama_server_binary), "-m", str(SMOLLM), "--lora", str(lora),
        "--lora-init-without-apply", "--port", str(port), "-c", "1024", "--parallel", "1",
    ]  # fmt: skip
    with (tmp_path / "server.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert process.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        yield url
    finally:
        process.terminate()
        process.wait(30)


def complete(url: str, scale: float | None) -> str:
    body: dict[str, object] = {
        "prompt": "The capital of France is",
        "n_predict": 8,
        "temperature": 0,
    }
    if scale is not None:
        body["lora"] = [{"id": 0, "scale": scale}]
    response = httpx.post(f"{url}/completion", json=body, timeout=120)
    response.raise_for_status()
    return str(response.json()["content"])


def test_the_adapter_changes_greedy_answers_per_request_in_one_process(lora_server: str) -> None:
    answers = [complete(lora_server, scale) for scale in (0.0, 1.0, 0.0, 1.0)]
    assert "Paris" in answers[0]
    assert answers[1] != answers[0]
    assert answers == [answers[0], answers[1]] * 2


def test_a_request_without_a_lora_list_gets_the_adapter_at_its_loaded_scale(
    lora_server: str,
) -> None:
    """Even with --lora-init-without-apply, the adapter's scale stays 1.0 for requests that
    name no adapters: whoever serves a base and its adapters must always send the list."""
    listed = httpx.get(f"{lora_server}/lora-adapters", timeout=30).json()
    assert [adapter["scale"] for adapter in listed] == [1.0]
    assert complete(lora_server, None) != complete(lora_server, 0.0)
