"""LoRA adapters served by their base model's llama-server through the gateway: found in
models/custom/ with their base named in a sidecar, applied per request without a reload,
listed under their base, refused at registration when they do not fit, and gone when
their file is."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import GEMMA, SMOLLM, GatewayProcess

from ailab import config
from ailab.gateway import SOURCE_FRESH_S
from ailab.gguf_meta import read_info
from tests.lora_fixture import build_lora

BASE = "smollm2-135m"
PROMPT = "The capital of France is a city where people live and work every day. Its name is"
OTHER_PROMPT = "My favourite colour is"


def models_dir(root: Path) -> Path:
    """The bundled models (linked) and an empty models/custom/."""
    folder = root / "models"
    (folder / "custom").mkdir(parents=True)
    for model in (SMOLLM, GEMMA):
        (folder / model.name).symlink_to(model.resolve())
    return folder


def add_adapter(folder: Path, key: str, base: str | None = BASE, **build: int) -> Path:
    """An adapter built for SmolLM2 in models/custom/, its base named in the sidecar."""
    path = build_lora(read_info(SMOLLM), folder / "custom" / f"{key}.gguf", **build)
    if base is not None:
        (folder / "custom" / f"{key}.json").write_text(json.dumps({"base": base}))
    return path


@pytest.fixture(scope="module")
def lora_gateway(
    llama_server_binary: Path, real_models: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """One slot, so consecutive requests meet the same slot and its prompt cache."""
    root = tmp_path_factory.mktemp("lora-gateway")
    folder = models_dir(root)
    add_adapter(folder, "smol-lora")
    add_adapter(folder, "wrong-shape", widen=1)
    add_adapter(folder, "no-base", base=None)
    (root / "data").mkdir()
    server = GatewayProcess(
        llama_server_binary,
        root / "data",
        {"AILAB_MODELS_DIR": str(folder), "AILAB_PARALLEL": "1"},
    )
    server.start()
    yield server
    server.stop()


def complete(url: str, model: str, prompt: str = PROMPT) -> requests.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    return requests.post(f"{url}/v1/completions", json=body, timeout=300)


def answer(url: str, model: str, prompt: str = PROMPT) -> str:
    response = complete(url, model, prompt)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def streamed(url: str, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    pieces = []
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=300) as reply:
        assert reply.status_code == 200, reply.text
        for line in reply.iter_lines():
            if line.startswith(b"data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(pieces)


def base_info(url: str) -> dict:
    models = requests.get(f"{url}/models", timeout=30).json()["models"]
    return next(model for model in models if model["key"] == BASE)


def listed(url: str) -> dict[str, dict]:
    return {m["id"]: m for m in requests.get(f"{url}/v1/models", timeout=30).json()["data"]}


def test_alternating_base_and_adapter_keys_are_served_by_one_process_with_different_answers(
    lora_gateway: GatewayProcess,
) -> None:
    url = lora_gateway.url
    answers = [answer(url, key) for key in (BASE, "smol-lora", BASE, "smol-lora")]
    pid = base_info(url)["pid"]
    assert "Paris" in answers[0]
    assert answers[1] != answers[0]
    assert answers == [answers[0], answers[1]] * 2
    assert answer(url, BASE) == answers[0]
    assert streamed(url, "smol-lora") == answers[1]
    assert base_info(url)["pid"] == pid and pid is not None
    adapters = {a["key"]: a for a in base_info(url)["adapters"]}
    assert adapters["smol-lora"]["state"] == "ready"
    assert listed(url)["smol-lora"]["parent"] == BASE


def test_chat_with_the_adapter_key_uses_the_adapter_and_remembers_it(
    lora_gateway: GatewayProcess,
) -> None:
    def chat(model: str, conversation: str) -> dict:
        body = {
            "model": model,
            "conversation_id": conversation,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 12,
            "enable_tools": False,
        }
        response = requests.post(f"{lora_gateway.url}/chat", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()

    pid = base_info(lora_gateway.url)["pid"]
    base, adapted = chat(BASE, "lora-chat-base"), chat("smol-lora", "lora-chat-adapter")
    assert "Paris" in base["response"] and "Paris" not in adapted["response"]
    assert adapted["model_key"] == "smol-lora"
    # Regenerated without naming a model: the conversation's own, the adapter, answers.
    again = requests.post(
        f"{lora_gateway.url}/conversations/lora-chat-adapter/regenerate",
        json={"temperature": 0, "max_tokens": 12, "enable_tools": False},
        timeout=300,
    ).json()
    # (Not the same words: the adapter's answer is noise, and a prompt read again from the
    # slot's cache is batched differently, which flips near-ties.)
    assert again["model_key"] == "smol-lora" and "Paris" not in again["response"]
    assert base_info(lora_gateway.url)["pid"] == pid


def test_a_prompt_computed_under_the_adapter_is_not_reused_for_the_base(
    lora_gateway: GatewayProcess,
) -> None:
    """llama-server's host prompt cache keys saved prompts by tokens only: with it on, the
    last request here gets the adapter's cached state and a mixed answer."""
    url = lora_gateway.url
    fresh = answer(url, BASE)
    answer(url, "smol-lora")
    answer(url, BASE, OTHER_PROMPT)  # the slot's adapter prompt goes to the prompt cache
    assert answer(url, BASE) == fresh


def test_adapters_that_do_not_fit_are_refused_at_registration(
    lora_gateway: GatewayProcess,
) -> None:
    url = lora_gateway.url
    adapters = {a["key"]: a for a in base_info(url)["adapters"]}
    assert adapters["wrong-shape"]["state"] == "refused"
    assert "blk.0.attn_q.weight is [576, 576]" in adapters["wrong-shape"]["message"]
    refused = requests.get(f"{url}/models", timeout=30).json()["refused_adapters"]
    assert [a["key"] for a in refused] == ["no-base"]
    assert '"base": "<model key>"' in refused[0]["message"]
    response = complete(url, "wrong-shape")
    assert response.status_code == 400
    assert "made for another base model" in response.json()["error"]["message"]
    assert complete(url, "no-base").status_code == 400
    assert "LoRA adapter wrong-shape refused: wrong-shape.gguf" in lora_gateway.output()
    # The base was started with the adapter that fits only.
    log = (lora_gateway.data_dir / "logs" / f"llama-server-{BASE}.log").read_text()
    assert "smol-lora.gguf" in log and "wrong-shape.gguf" not in log


def test_a_registered_adapter_for_another_base_stops_the_start(tmp_path: Path) -> None:
    folder = models_dir(tmp_path)
    (folder / "loras").mkdir()
    build_lora(read_info(SMOLLM), folder / "loras" / "for-smollm.gguf")
    extra = tmp_path / "extra.json"
    entry = {"kind": "lora", "base": "gemma3-270m", "filename": "loras/for-smollm.gguf"}
    extra.write_text(json.dumps({"for-smollm-on-gemma": entry}))
    env = {"AILAB_DATA_DIR": str(tmp_path), "AILAB_MODELS_DIR": str(folder)}
    with pytest.raises(config.ConfigError, match="is for 'llama' models; gemma3-270m"):
        config.load_settings({**env, "AILAB_EXTRA_MODELS": str(extra)})
    entry["base"] = BASE
    extra.write_text(json.dumps({"for-smollm-on-smol": entry}))
    settings = config.load_settings({**env, "AILAB_EXTRA_MODELS": str(extra)})
    source = config.get_model_source(settings, "for-smollm-on-smol")
    assert (source.key, source.adapter) == (BASE, "for-smollm-on-smol")


def test_adapters_come_and_go_with_their_files(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = models_dir(tmp_path)
    server: GatewayProcess = make_gateway(
        {"AILAB_MODELS_DIR": str(folder), "AILAB_DEFAULT_MODEL": "gemma3-270m"}
    )
    url = server.url
    adapter = add_adapter(folder, "smol-lora")
    assert listed(url)["smol-lora"]["state"] == "unloaded"
    assert base_info(url)["state"] == "unloaded"
    adapted = answer(url, "smol-lora")  # its base is loaded for it
    pid = base_info(url)["pid"]
    assert pid is not None and listed(url)["smol-lora"]["state"] == "ready"

    add_adapter(folder, "second-lora", seed=1)  # the running base does not have it yet
    assert listed(url)["second-lora"]["state"] == "unloaded"
    second = answer(url, "second-lora")
    reloaded = base_info(url)["pid"]
    assert reloaded != pid  # reloaded once, with both adapters
    assert [answer(url, key) for key in ("smol-lora", BASE, "second-lora")] == [
        adapted,
        answer(url, BASE),
        second,
    ]
    assert base_info(url)["pid"] == reloaded

    adapter.unlink()
    assert "smol-lora" not in listed(url)
    time.sleep(SOURCE_FRESH_S)  # requests reuse a model's resolved source that long
    response = complete(url, "smol-lora")
    assert response.status_code == 404
    assert "unknown model 'smol-lora'" in response.json()["error"]["message"]
    assert answer(url, "second-lora") == second  # its id in the running process is unchanged
    assert base_info(url)["pid"] == reloaded
