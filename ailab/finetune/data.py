"""Training data: conversations (stored or exported) to records, and records to the text
the base model would see, rendered by llama-server with the model's own chat template.

Why llama-server's `/apply-template` rather than a Jinja library: it is the exact engine
and template (the registry's file, or the one inside the GGUF) that will serve the
fine-tuned model, so the training text matches what the model sees at chat time byte for
byte, tool calls included, for every model; and the project needs no second template
engine. It is started with `--no-prefill-assistant` and asked for no generation prompt,
so a conversation's last assistant turn is rendered whole, end-of-turn token included.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from ailab import exports
from ailab.config import ModelSource, Settings
from ailab.errors import BadRequest, Unavailable
from ailab.upstream import binaries

Record = tuple[str, dict[str, Any]]  # (where it came from, {"messages": [...]})
RENDER_CTX = 512  # the renderer generates nothing; its context only has to exist


def records_from_conversations(
    conversations: dict[str, list[dict[str, Any]]], system_prompt: str | None, include_tools: bool
) -> list[Record]:
    """Stored conversations as training records, as the JSONL export makes them."""
    records = []
    for conversation_id, messages in conversations.items():
        record = exports.to_training_record(messages, system_prompt, include_tools)
        if record is not None:
            records.append((conversation_id, record))
    return records


def _checked_record(where: str, record: Any) -> dict[str, Any]:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise BadRequest(f'{where}: expected {{"messages": [...]}} as the export writes it')
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"{where}: every message needs a role")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRequest(f"{where}: no assistant turn to learn from")
    return {"messages": messages}


def records_from_jsonl(path: Path) -> list[Record]:
    """Records from an exported JSONL file (one `{"messages": [...]}` per line)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"cannot read {path}: {exc}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"{where} is not JSON ({exc.msg})") from None
        records.append((where, _checked_record(where, record)))
    return records


def records_sha256(records: list[Record]) -> str:
    """The hash of the training data, recorded in the sidecar (ids do not change it)."""
    digest = hashlib.sha256()
    for _, record in records:
        digest.update(json.dumps(record, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


class TemplateRenderer:
    """A short-lived llama-server with the base model that renders and counts tokens.

    Blocking: use it from a worker thread. `stop()` may be called from another thread.
    """

    def __init__(self, settings: Settings, source: ModelSource, log_path: Path) -> None:
        self.settings = settings
        self.source = source
        self.log_path = log_path
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(timeout=60.0)

    def spawn(self) -> None:
        assert self.source.path is not None
        with socket.socket() as probe:
            probe.bind((self.settings.llama_host, 0))
            port = int(probe.getsockname()[1])
        self.port = port
        server = binaries.find_llama_server(self.settings)
        # Never on the model's RPC workers: each serves one llama-server, the loaded model's.
        local = self.source.model_copy(update={"rpc": ()})
        command = [
            *binaries.llama_server_command(
                server, local, self.source.path, settings=self.settings, port=port,
                n_ctx=RENDER_CTX, n_gpu_layers=0,
            ),
            "--no-prefill-assistant",
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.load_timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-1500:]
                raise Unavailable(f"llama-server could not load the base model:\n{tail}")
            try:
                if self.client.get(self._url("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise Unavailable(
            f"llama-server did not load the base model in {self.settings.load_timeout_s} s"
        )

    def _url(self, path: str) -> str:
        return f"http://{self.settings.llama_host}:{self.port}{path}"

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post(self._url(path), json=body)
        if response.status_code != 200:
            raise BadRequest(f"llama-server refused {path}: {response.text[:500]}")
        result: dict[str, Any] = response.json()
        return result

    def render(self, where: str, record: dict[str, Any]) -> str:
        """One conversation as the template writes it, its end-of-turn tokens included."""
        body = {"messages": record["messages"], "add_generation_prompt": False}
        try:
            return str(self._post("/apply-template", body)["prompt"])
        except BadRequest as exc:
            raise BadRequest(f"{where}: the chat template cannot render it ({exc})") from None

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` as llama-finetune will see it (special tokens parsed, BOS added)."""
        body = {"content": text, "add_special": True, "parse_special": True}
        return len(self._post("/tokenize", body)["tokens"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.client.close()
