"""Remote upstreams: real llama-servers on other loopback ports, each with its own API key,
and a second AI Lab gateway, registered in AILAB_EXTRA_MODELS by `url` and served through
the gateway by name."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import GatewayProcess, free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_chat import sse_events

from ailab import config
from ailab.upstream import binaries

REMOTE_KEY = "remote-" + secrets.token_urlsafe(24)
LAB_KEY = "lab-" + secrets.token_urlsafe(24)
SMALL = {"max_tokens": 4, "temperature": 0}


class RemoteLlama:
    """A llama-server started as another machine would run it, checking REMOTE_KEY."""

    def __init__(self, binary: Path, data_dir: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RemoteLlama:
        settings = config.load_settings(
            {"AILAB_DATA_DIR": str(self.data_dir), "AILAB_PARALLEL": "2", "AILAB_CTX": "4096"}
        )
        source = config.get_model_source(settings, "smollm2-135m")
        assert source.path is not None
        command = binaries.llama_server_command(
            self.binary, source, source.path, settings=settings, port=self.port, n_ctx=4096,
            n_gpu_layers=0,
        )  # fmt: skip
        with (self.data_dir / f"remote-{self.port}.log").open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=log,
                env={**os.environ, "LLAMA_API_KEY": REMOTE_KEY},
            )
        wait_for(lambda: self._healthy(), timeout=90)
        return self

    def _healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def predicted_tokens(self) -> float:
        """The remote's own count of generated tokens: proof that a request reached it."""
        reply = requests.get(
            f"{self.url}/metrics", headers={"Authorization": f"Bearer {REMOTE_KEY}"}, timeout=5
        )
        reply.raise_for_status()
        return sum(
            sample.value
            for family in text_string_to_metric_families(reply.text)
            for sample in family.samples
            if sample.name.startswith("llamacpp:tokens_predicted_total")
        )


class Setup:
    def __init__(
        self, gateway: GatewayProcess, far: RemoteLlama, doomed: RemoteLlama, lab: GatewayProcess
    ) -> None:
        self.gateway, self.far, self.doomed, self.lab = gateway, far, doomed, lab

    def models(self) -> dict[str, dict]:
        listing = requests.get(f"{self.gateway.url}/models", timeout=10).json()["models"]
        return {m["key"]: m for m in listing}

    def state(self, key: str) -> str:
        return self.models()[key]["state"]


@pytest.fixture(scope="module")
def setup(
    llama_server_binary: Path, real_models: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    data_dir = tmp_path_factory.mktemp("remote")
    far = RemoteLlama(llama_server_binary, data_dir).start()
    doomed = RemoteLlama(llama_server_binary, data_dir).start()
    # Another AI Lab, which (unlike llama-server) refuses a model name it does not know.
    (data_dir / "lab").mkdir()
    lab = GatewayProcess(llama_server_binary, data_dir / "lab", {"AILAB_API_KEYS": LAB_KEY})
    lab.start()
    extra = data_dir / "extra.json"
    remote = {"api_key": REMOTE_KEY, "context_length": 4096}
    extra.write_text(
        json.dumps(
            {
                "far-smol": {"url": far.url, **remote},
                "far-narrow": {"url": far.url, **remote, "max_concurrency": 1},
                "doomed": {"url": doomed.url + "/", **remote},
                "far-wrong-key": {"url": far.url, "api_key": "not-" + REMOTE_KEY},
                "far-lab": {"url": lab.url, "api_key": LAB_KEY, "model": "smollm2-135m"},
                "far-lab-unnamed": {"url": lab.url, "api_key": LAB_KEY},
            }
        )
    )
    workspace = data_dir / "workspace"
    workspace.mkdir()
    gateway = GatewayProcess(
        llama_server_binary,
        data_dir / "gateway",
        {
            "AILAB_EXTRA_MODELS": str(extra),
            "AILAB_TOOL_ROOTS": str(workspace),
            "AILAB_SWITCH_WAIT": "1",  # how long a request waits for a max_concurrency place
            # Room for one local model: the remotes, all ready beside it, take none.
            "AILAB_MAX_LOADED_MODELS": "1",
        },
    )
    gateway.data_dir.mkdir()
    gateway.start()
    ready = Setup(gateway, far, doomed, lab)
    try:
        remotes = ("far-smol", "doomed", "far-lab")
        wait_for(lambda: all(ready.state(key) == "ready" for key in remotes))
        yield ready
    finally:
        gateway.stop()
        lab.stop()
        far.stop()
        doomed.stop()


def post(setup: Setup, path: str, body: dict, status: int = 200) -> dict:
    reply = requests.post(f"{setup.gateway.url}{path}", json=body, timeout=120)
    assert reply.status_code == status, reply.text
    return reply.json()


def test_a_remote_model_is_listed_with_its_state_and_address(setup: Setup) -> None:
    models = setup.models()
    far = models["far-smol"]
    assert (far["state"], far["url"], far["exists"]) == ("ready", setup.far.url, True)
    assert far["memory_estimate_mb"] is None and far["pid"] is None
    # Several remotes ready and the local default still loaded, with room for one model.
    assert models["smollm2-135m"]["state"] == "ready"
    health = requests.get(f"{setup.gateway.url}/health", timeout=10).json()
    assert [m["id"] for m in health["models"]] == ["smollm2-135m"]
    v1 = requests.get(f"{setup.gateway.url}/v1/models", timeout=10).json()["data"]
    assert {m["id"]: m["state"] for m in v1}["far-smol"] == "ready"


def test_a_remote_that_refuses_the_key_is_failed_with_that_reason(setup: Setup) -> None:
    wrong = wait_for(lambda: (m := setup.models()["far-wrong-key"])["state"] == "failed" and m)
    assert "refused the api_key" in wrong["message"]
    reply = requests.post(
        f"{setup.gateway.url}/v1/chat/completions",
        json={"model": "far-wrong-key", "messages": [{"role": "user", "content": "Hi"}], **SMALL},
        timeout=30,
    )
    assert reply.status_code == 503
    assert "refused the api_key" in reply.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi."}]}),
        ("/v1/completions", {"prompt": "The sea is"}),
        ("/v1/messages", {"messages": [{"role": "user", "content": "Say hi."}]}),
        ("/v1/responses", {"input": "Say hi.", "max_output_tokens": 4}),
    ],
)
def test_v1_requests_naming_a_remote_model_are_answered_by_the_remote(
    setup: Setup, path: str, body: dict
) -> None:
    before = setup.far.predicted_tokens()
    post(setup, path, {"model": "far-smol", **SMALL, **body})
    assert setup.far.predicted_tokens() > before


def test_another_ai_lab_as_upstream_is_sent_the_name_it_knows_the_model_by(
    setup: Setup,
) -> None:
    ask = {"messages": [{"role": "user", "content": "Say hi."}], **SMALL}
    assert post(setup, "/v1/chat/completions", {"model": "far-lab", **ask})["choices"]
    chat = post(setup, "/chat", {"conversation_id": "lab-talk", "model": "far-lab", **ask})
    assert chat["response"] and chat["model_key"] == "far-lab"
    # Without `model` in its entry the remote is sent the local key, which it does not know.
    refused = post(setup, "/v1/chat/completions", {"model": "far-lab-unnamed", **ask}, 404)
    assert "unknown model 'far-lab-unnamed'" in refused["error"]["message"]


def test_a_chat_turn_a_remote_refuses_names_the_remote_not_llama_server(setup: Setup) -> None:
    ask = {"messages": [{"role": "user", "content": "Say hi."}], "model": "far-lab-unnamed"}
    refused = post(setup, "/chat", {"conversation_id": "lab-refuses", **ask, **SMALL}, 404)
    where = f"remote upstream far-lab-unnamed ({setup.lab.url})"
    assert refused["detail"].startswith(f"{where}: unknown model 'far-lab-unnamed'")
    with requests.post(
        f"{setup.gateway.url}/chat",
        json={"conversation_id": "lab-refuses-stream", "stream": True, **ask, **SMALL},
        stream=True,
        timeout=120,
    ) as reply:
        errors = [data for name, data in sse_events(reply) if name == "error"]
    assert errors and where in errors[0]["error"]


def test_a_streamed_v1_request_to_a_remote_relays_its_chunks(setup: Setup) -> None:
    body = {
        "model": "far-smol",
        "messages": [{"role": "user", "content": "Write a sentence about the sea."}],
        "max_tokens": 16,
        "stream": True,
    }
    with requests.post(
        f"{setup.gateway.url}/v1/chat/completions", json=body, stream=True, timeout=120
    ) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines(decode_unicode=True) if line]
    chunks = [json.loads(line[5:]) for line in lines if line.startswith("data:") and "{" in line]
    assert lines[-1] == "data: [DONE]"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_a_chat_conversation_on_a_remote_model_stays_on_it(setup: Setup) -> None:
    before = setup.far.predicted_tokens()
    message = {"role": "user", "content": "My name is Ada. Say hi."}
    first = post(
        setup,
        "/chat",
        {"messages": [message], "conversation_id": "remote-talk", "model": "far-smol", **SMALL},
    )
    after_first = setup.far.predicted_tokens()
    message = {"role": "user", "content": "What is my name?"}
    # No model named: the conversation's own (the remote) answers again.
    second = post(
        setup, "/chat", {"messages": [message], "conversation_id": "remote-talk", **SMALL}
    )
    assert (first["model_key"], second["model_key"]) == ("far-smol", "far-smol")
    assert first["device"] == "remote (127.0.0.1)"
    assert before < after_first < setup.far.predicted_tokens()
    assert second["tokens_input"] > first["tokens_input"]
    stored = requests.get(f"{setup.gateway.url}/conversations/remote-talk", timeout=5).json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "user", "assistant"]


def test_a_tool_calling_turn_on_a_remote_model_runs_the_tool_here(setup: Setup) -> None:
    body = {
        "messages": [{"role": "user", "content": "Which folder are you working in?"}],
        "conversation_id": "remote-tool",
        "model": "far-smol",
        "enable_tools": True,
        "max_tokens": 48,
        "temperature": 0,
        "tool_choice": {"type": "function", "function": {"name": "get_current_directory"}},
    }
    with requests.post(
        f"{setup.gateway.url}/chat", json={**body, "stream": True}, stream=True, timeout=180
    ) as reply:
        assert reply.status_code == 200
        events = sse_events(reply)
    names = [name for name, _ in events]
    assert names.index("tool_call") < names.index("tool_result") < names.index("done")
    result = next(data for name, data in events if name == "tool_result")
    # The tool ran in this gateway's sandbox, on its workspace, not on the remote.
    workspace = setup.gateway.data_dir.parent / "workspace"
    assert str(workspace) in json.dumps(result)
    done = events[-1][1]
    assert done["iterations"] >= 2 and done["tools_used"][0] == "get_current_directory()"
    audit = requests.get(
        f"{setup.gateway.url}/tools/audit", params={"conversation_id": "remote-tool"}, timeout=5
    ).json()["records"]
    assert audit and audit[-1]["tool"] == "get_current_directory"


def test_a_remote_with_max_concurrency_makes_the_next_request_wait_then_refuses_it(
    setup: Setup,
) -> None:
    long = {
        "model": "far-narrow",
        "messages": [{"role": "user", "content": "Tell a very long story."}],
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    # The first request holds the one place while it streams: thousands of tokens take far
    # longer than the 1 s AILAB_SWITCH_WAIT the second one waits (checked below).
    with requests.post(
        f"{setup.gateway.url}/v1/chat/completions", json=long, stream=True, timeout=120
    ) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        next(lines)
        second = requests.post(
            f"{setup.gateway.url}/v1/chat/completions",
            json={**long, "stream": False, "max_tokens": 4},
            timeout=60,
        )
        still_streaming = next(line for line in lines if line)
    assert still_streaming != b"data: [DONE]"
    assert second.status_code == 503
    assert "max_concurrency" in second.json()["error"]["message"]
    # The place comes back when the first stream is gone.
    wait_for(lambda: setup.models()["far-narrow"]["in_flight"] == 0, timeout=30)
    short = {"model": "far-narrow", "messages": long["messages"], **SMALL}
    post(setup, "/v1/chat/completions", short)


def _everything_shown(setup: Setup) -> str:
    """Every answer a client can get that could carry a remote's settings."""
    url = setup.gateway.url
    texts = [
        requests.get(f"{url}{path}", timeout=30).text
        for path in (
            "/models",
            "/v1/models",
            "/health",
            "/metrics",
            "/conversations",
            "/conversations/export",
            "/conversations/remote-talk/export",
        )
    ]
    for command in ("model", "mem", "tools", "history", "layers", "ctx"):
        texts.append(requests.post(f"{url}/command", json={"command": command}, timeout=30).text)
    texts.append(requests.post(f"{url}/models/load", json={"model": "far-smol"}, timeout=30).text)
    texts.append(
        requests.post(f"{url}/models/load", json={"model": "far-wrong-key"}, timeout=30).text
    )
    bad = {"model": "far-smol", "messages": "not a list"}
    texts.append(requests.post(f"{url}/v1/chat/completions", json=bad, timeout=30).text)
    return "\n".join(texts)


def test_the_remote_key_is_never_returned_or_logged(setup: Setup) -> None:
    shown = _everything_shown(setup)
    assert "far-smol" in shown and setup.far.url in shown  # the answers are about the remote
    assert REMOTE_KEY not in shown and LAB_KEY not in shown
    logs = [setup.gateway.output()] + [
        p.read_text(errors="replace") for p in setup.gateway.data_dir.rglob("*.log")
    ]
    assert "far-smol" in "".join(logs)
    assert all(REMOTE_KEY not in text and LAB_KEY not in text for text in logs)


def test_a_remote_taken_down_gives_503_with_the_reason_and_local_models_keep_working(
    setup: Setup,
) -> None:
    ask = {"messages": [{"role": "user", "content": "Say hi."}], **SMALL}
    setup.doomed.stop()
    # Whether the gateway has noticed yet or this request is the one that finds out.
    answer = post(setup, "/v1/chat/completions", {"model": "doomed", **ask}, status=503)
    assert "is not reachable" in answer["error"]["message"]
    failed = wait_for(lambda: (m := setup.models()["doomed"])["state"] == "failed" and m)
    assert setup.doomed.url in failed["message"] and "not reachable" in failed["message"]
    answer = post(setup, "/v1/chat/completions", {"model": "doomed", **ask}, status=503)
    assert "doomed failed" in answer["error"]["message"]
    assert setup.doomed.url in answer["error"]["message"]
    chat = {"conversation_id": "doomed-talk", "model": "doomed", **ask}
    assert "not reachable" in post(setup, "/chat", chat, status=503)["detail"]
    # Local models and the other remote are untouched.
    assert post(setup, "/v1/chat/completions", {"model": "smollm2-135m", **ask})["choices"]
    assert post(setup, "/v1/chat/completions", {"model": "far-smol", **ask})["choices"]
    assert setup.state("smollm2-135m") == "ready"
    # Back on its port, it is found by the background checks and serves again.
    setup.doomed.start()
    wait_for(lambda: setup.state("doomed") == "ready", timeout=60)
    assert post(setup, "/v1/chat/completions", {"model": "doomed", **ask})["choices"]


def test_parallel_requests_to_a_remote_and_a_local_model_both_answer(setup: Setup) -> None:
    ask = {"messages": [{"role": "user", "content": "Say hi."}], **SMALL}
    results: dict[str, int] = {}

    def call(model: str) -> None:
        reply = requests.post(
            f"{setup.gateway.url}/v1/chat/completions", json={"model": model, **ask}, timeout=120
        )
        results[model] = reply.status_code

    threads = [threading.Thread(target=call, args=(m,)) for m in ("far-smol", "smollm2-135m")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {"far-smol": 200, "smollm2-135m": 200}


def test_a_gateway_whose_default_model_is_remote_starts_no_llama_server(
    setup: Setup, make_gateway, tmp_path: Path
) -> None:
    extra = tmp_path / "remote-default.json"
    entry = {"url": setup.far.url, "api_key": REMOTE_KEY, "context_length": 4096}
    extra.write_text(json.dumps({"far-smol": entry}))
    thin: GatewayProcess = make_gateway(
        {"AILAB_EXTRA_MODELS": str(extra), "AILAB_DEFAULT_MODEL": "far-smol"}
    )
    health = requests.get(f"{thin.url}/health", timeout=10).json()
    assert (health["status"], health["model_key"]) == ("ok", "far-smol")
    assert health["device"] == "remote (127.0.0.1)" and health["pid"] is None
    assert thin.llama_pids() == []
    before = setup.far.predicted_tokens()
    ask = {"messages": [{"role": "user", "content": "Say hi."}], **SMALL}
    reply = requests.post(f"{thin.url}/v1/chat/completions", json=ask, timeout=120)
    assert reply.status_code == 200, reply.text
    chat = requests.post(f"{thin.url}/chat", json={"conversation_id": "thin", **ask}, timeout=120)
    assert chat.status_code == 200 and chat.json()["model_key"] == "far-smol"
    assert setup.far.predicted_tokens() > before


# --- the registry entry ---------------------------------------------------------------


def _settings_with(tmp_path: Path, entries: dict) -> config.Settings:
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(entries))
    return config.load_settings({"AILAB_DATA_DIR": str(tmp_path), "AILAB_EXTRA_MODELS": str(extra)})


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("ftp://box:8080", "http:// or https://"),
        ("box:8080", "http:// or https://"),
        ("http://user:secret@box:8080", "no user, password"),
        ("http://box:8080/v1", "without /v1"),
        ("http://box:99999", "http:// or https://"),
    ],
)
def test_a_remote_entry_with_a_bad_url_is_refused_at_start(
    tmp_path: Path, url: str, complaint: str
) -> None:
    with pytest.raises(config.ConfigError, match=complaint):
        _settings_with(tmp_path, {"box": {"url": url}})


def test_a_remote_entry_keeps_its_key_out_of_every_dump(tmp_path: Path) -> None:
    settings = _settings_with(
        tmp_path, {"box": {"url": "https://box.lan:8443", "api_key": REMOTE_KEY, "model": "big"}}
    )
    source = config.get_model_source(settings, "box")
    assert (source.kind, source.remote_name) == ("remote", "big")
    assert source.url == "https://box.lan:8443"
    assert source.api_key is not None and source.api_key.get_secret_value() == REMOTE_KEY
    assert REMOTE_KEY not in repr(source) + source.model_dump_json() + str(source.model_dump())
