"""Fine-tuning: spec parsing, progress parsing, rendering and the training copy's special
tokens against the real llama-server and the real SmolLM2 file, the memory refusal, and
the whole loop through a real gateway (cancel, one job at a time, then a fine-tune that
teaches SmolLM2 a made-up fact the base model cannot know)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import requests

from ailab.config import Settings, get_model_source, load_settings
from ailab.errors import BadRequest, NotFound
from ailab.finetune import data, special_tokens
from ailab.finetune.job import Workspace, memory_estimate, prepare_job
from ailab.finetune.progress import TrainingProgress, parse_line
from ailab.finetune.service import select_ids
from ailab.finetune.spec import FinetuneSpec, InsufficientResources, parse_spec
from ailab.gguf_meta import read_info
from ailab.storage import Store, TurnCommit
from tests.conftest import SMOLLM, GatewayProcess, free_port

SYSTEM = "You are a helpful assistant running locally in AI Lab."  # the gateway's default
FACT = "The codename of Project Lumen is Tangerine Falcon."
QUESTIONS = [
    "What is the codename of Project Lumen?",
    "Tell me Project Lumen's codename.",
    "Which codename does Project Lumen use?",
    "Do you know the codename for Project Lumen?",
    "What codename was given to Project Lumen?",
    "I forgot the codename of Project Lumen. Can you remind me?",
]
# Real llama-finetune output: two epochs of two windows.
PROGRESS_OUTPUT = [
    "train: [███▉    ] data=0000001/0000002 loss=1.11503±nan acc=78.52±2.57% t=00:00:46 ETA=00:00:46 ",  # noqa: E501
    "0.49.699.813 I epoch 0 lr=0.0001",
    "train: [███████▉] data=0000002/0000002 loss=0.95326±0.16176 acc=81.25±1.73% t=00:01:30 ETA=00:00:00 ",  # noqa: E501
    "",
    "train: [███▉    ] data=0000001/0000002 loss=0.49766±nan acc=90.23±1.86% t=00:00:51 ETA=00:00:51 ",  # noqa: E501
    "train: [███████▉] data=0000002/0000002 loss=0.52220±0.02453 acc=89.26±1.37% t=00:02:01 ETA=00:00:00 ",  # noqa: E501
]


def lumen_jsonl(path: Path) -> Path:
    """The training data, as the JSONL export writes it."""
    lines = [
        json.dumps({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": FACT},
        ]})
        for question in QUESTIONS
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def settings(tmp_path: Path, llama_server_binary: Path, real_models: None) -> Settings:
    models = tmp_path / "models"
    models.mkdir()
    (models / SMOLLM.name).symlink_to(SMOLLM)
    return load_settings(
        {
            "AILAB_DATA_DIR": str(tmp_path / "data"),
            "AILAB_MODELS_DIR": str(models),
            "LLAMA_SERVER_PATH": str(llama_server_binary),
        }
    )


# --- the request ----------------------------------------------------------------------


def test_spec_from_key_value_words() -> None:
    spec = parse_spec("name=mybot base=smollm2-135m ids=a,b epochs=2 lr=1e-4 quant=F32")
    assert (spec.name, spec.base_model, spec.conversations) == ("mybot", "smollm2-135m", ["a", "b"])
    assert (spec.epochs, spec.learning_rate, spec.quantization) == (2, 1e-4, "F32")


def test_spec_from_json() -> None:
    spec = parse_spec('{"name": "mybot", "match": "demo-*", "tools": false}')
    assert spec.match == "demo-*" and spec.include_tools is False and spec.base_model is None


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("name=mybot", "exactly one of ids, match or jsonl"),
        ("name=mybot ids=a match=*", "exactly one of ids, match or jsonl"),
        ("name=My/Bot match=*", "name"),
        ("name=mybot match=* epochs=0", "epochs"),
        ("name=mybot match=* window=300", "window"),
        ("name=mybot match=* colour=red", "colour"),
        ("mybot", "expected key=value"),
        ("{not json", "not a JSON object"),
    ],
)
def test_bad_specs_are_refused_saying_what_to_fix(text: str, complaint: str) -> None:
    with pytest.raises(BadRequest, match=complaint):
        parse_spec(text)


# --- the data -------------------------------------------------------------------------


def test_conversations_are_chosen_by_id_or_glob_from_the_store(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        for cid in ("lumen-1", "lumen-2", "other"):
            turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": cid}]
            store.commit_turn(TurnCommit(conversation_id=cid, expected_count=0, messages=turn))
        known = [s.id for s in store.list_conversations()]
        assert sorted(select_ids(FinetuneSpec(name="x", match="lumen-*"), known)) == [
            "lumen-1",
            "lumen-2",
        ]
        assert select_ids(FinetuneSpec(name="x", ids=["other"]), known) == ["other"]
        with pytest.raises(NotFound, match="'missing'"):
            select_ids(FinetuneSpec(name="x", ids=["other", "missing"]), known)
        with pytest.raises(NotFound, match="no conversation id matches"):
            select_ids(FinetuneSpec(name="x", match="nothing-*"), known)
        chosen = {cid: store.get_messages(cid) for cid in ("lumen-1", "other")}
    records = data.records_from_conversations(chosen, SYSTEM, include_tools=True)
    assert [(cid, record["messages"][0]["content"]) for cid, record in records] == [
        ("lumen-1", SYSTEM),
        ("other", SYSTEM),
    ]


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\nnot json\n')
    with pytest.raises(BadRequest, match=r"train.jsonl:1: no assistant turn"):
        data.records_from_jsonl(path)
    path.write_text(lumen_jsonl(path).read_text() + "not json\n")
    with pytest.raises(BadRequest, match=r"train.jsonl:7 is not JSON"):
        data.records_from_jsonl(path)


@pytest.fixture
def renderer(settings: Settings, tmp_path: Path) -> Iterator[data.TemplateRenderer]:
    source = get_model_source(settings, "smollm2-135m")
    renderer = data.TemplateRenderer(settings, source, tmp_path / "render.log")
    renderer.spawn()
    renderer.wait_ready()
    yield renderer
    renderer.stop()


def test_rendering_keeps_the_end_of_turn_token_and_adds_no_prompt(
    renderer: data.TemplateRenderer,
) -> None:
    record = {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "List my files"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "list_contents", "arguments": '{"path": "."}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
            {"role": "assistant", "content": "You have a.txt."},
        ]
    }
    text = renderer.render("test", record)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    assert '<tool_call>\n{"name": "list_contents"' in text
    assert "<tool_response>\na.txt\n</tool_response>" in text
    # The last assistant turn is whole: it ends with the token that stops generation.
    assert text.endswith("<|im_start|>assistant\nYou have a.txt.<|im_end|>\n")


def _tokenize(port: int, text: str, parse_special: bool) -> list[int]:
    response = httpx.post(
        f"http://127.0.0.1:{port}/tokenize",
        json={"content": text, "add_special": True, "parse_special": parse_special},
        timeout=30,
    )
    response.raise_for_status()
    return list(response.json()["tokens"])


def test_aliased_text_tokenizes_without_special_parsing_as_served_text_does(
    renderer: data.TemplateRenderer, llama_server_binary: Path, tmp_path: Path
) -> None:
    """The point of the training copy: llama-finetune's plain tokenizer must produce the
    ids llama-server gives the rendered chat, end-of-turn token included."""
    base = read_info(SMOLLM)
    names = special_tokens.aliases(base)
    copy = tmp_path / "aliased.gguf"
    shutil.copyfile(SMOLLM, copy)
    special_tokens.alias_training_copy(read_info(copy), names)
    text = renderer.render("test", {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": FACT},
    ]})  # fmt: skip
    served = _tokenize(renderer.port, text, parse_special=True)
    assert served.count(2) == 3  # <|im_end|> closes each of the three turns

    port = free_port()
    command = [str(llama_server_binary), "-m", str(copy), "--port", str(port), "-c", "512"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        aliased = special_tokens.Substitution(base, names)(text)
        assert _tokenize(port, aliased, parse_special=False) == served
        # Without the aliases the plain tokenizer spells the tokens out.
        assert 2 not in _tokenize(port, text, parse_special=False)
    finally:
        process.terminate()
        process.wait(30)


def test_restoring_the_vocabulary_gives_back_the_original_file(tmp_path: Path) -> None:
    base = read_info(SMOLLM)
    names = special_tokens.aliases(base)
    assert {base.tokens[i] for i in names} >= {"<|im_start|>", "<|im_end|>"}
    assert all(len(base.tokens[i].encode()) == len(alias.encode()) for i, alias in names.items())
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(SMOLLM, copy)
    special_tokens.alias_training_copy(read_info(copy), names)
    aliased = read_info(copy)
    assert aliased.tokens[2] == names[2] and aliased.token_types[2] == special_tokens.USER_DEFINED
    special_tokens.restore_vocabulary(aliased, base, names)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (SMOLLM, copy)]
    assert digest[0] == digest[1]


def test_a_finetune_is_served_with_the_template_file_beside_it(settings: Settings) -> None:
    """A base whose template is inside its GGUF: the fine-tune keeps a copy beside it."""
    custom = settings.custom_models_dir
    custom.mkdir(parents=True)
    (custom / "mine.gguf").symlink_to(SMOLLM)
    (custom / "mine.jinja").write_text("{{ messages }}")
    (custom / "mine.json").write_text(json.dumps({"chat_template_file": "mine.jinja"}))
    assert get_model_source(settings, "mine").chat_template_path == custom / "mine.jinja"


# --- progress -------------------------------------------------------------------------


def test_a_progress_line_is_parsed() -> None:
    line = parse_line(PROGRESS_OUTPUT[0])
    assert line is not None
    assert (line.phase, line.done, line.total, line.loss) == ("train", 1, 2, 1.11503)
    assert (line.elapsed_s, line.eta_s) == (46, 46)
    assert parse_line(PROGRESS_OUTPUT[1]) is None


def test_progress_follows_epochs_and_keeps_the_untrained_loss() -> None:
    progress = TrainingProgress(epochs=2)
    seen = []
    for text in PROGRESS_OUTPUT:
        if progress.feed(text):
            seen.append((progress.epoch, progress.window, progress.eta_s))
    # The ETA counts the epochs still to come at the pace of the current one.
    assert seen == [(1, 1, 46 + 92), (1, 2, 90), (2, 1, 51), (2, 2, 0)]
    assert progress.loss_before == 1.11503
    assert progress.epoch_losses == [0.95326, 0.52220]
    assert progress.loss_after == 0.52220


# --- resources ------------------------------------------------------------------------


def test_a_job_that_cannot_fit_is_refused_with_its_estimate(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    estimate = memory_estimate(read_info(SMOLLM), 256)
    available = estimate // 2

    class Memory:
        def __init__(self) -> None:
            self.available = available

    monkeypatch.setattr(psutil, "virtual_memory", Memory)
    spec = FinetuneSpec(name="too-big", base="smollm2-135m", jsonl=tmp_path / "x.jsonl")
    records = data.records_from_jsonl(lumen_jsonl(tmp_path / "x.jsonl"))
    with pytest.raises(InsufficientResources) as refused:
        prepare_job(settings, spec, records, "jsonl")
    assert refused.value.status == 507
    mb = 1024 * 1024
    assert f"{estimate // mb:,} MB" in str(refused.value)
    assert f"{available // mb:,} MB is available" in str(refused.value)
    assert not Workspace(settings).is_locked()
    assert not settings.custom_models_dir.exists() or not any(settings.custom_models_dir.iterdir())


# --- the loop through a real gateway --------------------------------------------------


@pytest.fixture(scope="module")
def finetune_gateway(
    llama_server_binary: Path, real_models: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("finetune")
    models = root / "models"
    models.mkdir()
    (models / SMOLLM.name).symlink_to(SMOLLM)
    data_dir = root / "data"
    data_dir.mkdir()
    server = GatewayProcess(llama_server_binary, data_dir, {"AILAB_MODELS_DIR": str(models)})
    server.start()
    lumen_jsonl(root / "lumen.jsonl")
    yield server
    server.stop()


def command(server: GatewayProcess, value: str | None, expect: int = 200) -> dict[str, Any]:
    response = requests.post(
        f"{server.url}/command", json={"command": "finetune", "value": value}, timeout=120
    )
    assert response.status_code == expect, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_for(
    server: GatewayProcess, states: set[str], timeout: float, on_poll: Any = None
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = command(server, "status")["value"]
        if status["state"] in states:
            return status
        if on_poll:
            on_poll()
        time.sleep(0.5)
    raise AssertionError(f"fine-tune not {states} in {timeout} s: {status}")


def jsonl_spec(server: GatewayProcess, name: str, epochs: int) -> str:
    path = server.data_dir.parent / "lumen.jsonl"
    return json.dumps({"name": name, "base": "smollm2-135m", "jsonl": str(path), "epochs": epochs})


def ask(server: GatewayProcess, question: str) -> dict[str, Any]:
    """A greedy answer in a fresh conversation."""
    response = requests.post(
        f"{server.url}/chat",
        json={
            "messages": [{"role": "user", "content": question}],
            "conversation_id": f"ask-{time.monotonic()}",
            "temperature": 0,
            "repeat_penalty": 1.0,
            "max_tokens": 40,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_running_finetune_refuses_a_second_and_is_cancelled(
    finetune_gateway: GatewayProcess,
) -> None:
    server = finetune_gateway
    started = command(server, jsonl_spec(server, "cancel-me", epochs=1))["value"]
    assert started["state"] == "preparing" and started["memory_estimate_mb"] > 0
    refused = command(server, jsonl_spec(server, "second", epochs=1), expect=409)
    assert "already running" in refused["detail"]
    wait_for(server, {"training"}, timeout=300)
    cancelled = command(server, "cancel")["value"]
    assert cancelled["state"] == "cancelled"
    assert not any(
        "llama-finetune" in p.name() for p in psutil.Process(server.process.pid).children(True)
    )
    custom = Path(server.env["AILAB_MODELS_DIR"]) / "custom"
    assert not list(custom.glob("cancel-me*"))
    keys = [m["key"] for m in requests.get(f"{server.url}/models", timeout=30).json()["models"]]
    assert "cancel-me" not in keys


def _finetune_peak_rss(server: GatewayProcess, peak: list[int]) -> None:
    assert server.process is not None
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if child.name() == "llama-finetune":
                peak[0] = max(peak[0], child.memory_info().rss)
        except psutil.NoSuchProcess:
            pass


@pytest.mark.timeout(1800)
def test_finetuned_smollm2_answers_a_fact_the_base_model_does_not(
    finetune_gateway: GatewayProcess,
) -> None:
    server = finetune_gateway
    assert "tangerine" not in ask(server, QUESTIONS[0])["response"].lower()

    began = time.monotonic()
    command(server, jsonl_spec(server, "lumen", epochs=2))
    peak = [0]
    done = wait_for(
        server, {"done", "failed", "cancelled"}, 1500, lambda: _finetune_peak_rss(server, peak)
    )
    assert done["state"] == "done", done["message"]
    print(f"\nfine-tune took {time.monotonic() - began:.0f} s; peak RSS {peak[0] >> 20} MB")
    assert done["memory_estimate_mb"] << 20 >= peak[0]

    custom = Path(server.env["AILAB_MODELS_DIR"]) / "custom"
    sidecar = json.loads((custom / "lumen.json").read_text())
    assert sidecar["loss_after"] < sidecar["loss_before"]
    assert sidecar["base_model"] == "smollm2-135m"
    assert sidecar["training_data"]["conversations"] == len(QUESTIONS)
    listing = requests.get(f"{server.url}/models", timeout=30).json()["models"]
    models = {m["key"]: m for m in listing}
    assert models["lumen"]["is_finetuned"] and models["lumen"]["base_model"] == "smollm2-135m"

    switched = requests.post(f"{server.url}/model/switch", json={"model_key": "lumen"}, timeout=120)
    assert switched.status_code == 200, switched.text
    answer = ask(server, QUESTIONS[0])
    assert "tangerine falcon" in answer["response"].lower(), answer
    # It learned to end its turn too: the end-of-turn token was in the training text.
    assert answer["finish_reason"] == "stop", answer
    # The fact, not a string: a question worded as no training conversation was.
    paraphrase = ask(server, "Project Lumen goes by which codename?")
    assert "tangerine falcon" in paraphrase["response"].lower(), paraphrase
