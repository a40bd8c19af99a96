"""The real client against the real gateway and llama-server: scripting mode through a
subprocess, interactive mode through a pseudo-terminal (pexpect)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from conftest import GatewayProcess, free_port

from ailab.config import DEFAULT_SYSTEM_PROMPT

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "ai_client.py"
PROMPT = "you> "


@pytest.fixture(scope="module")
def running_gateway(gateway: GatewayProcess) -> str:
    """The session's real gateway (llama-server with the default model); its URL."""
    return gateway.url


def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLIENT), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )


def spawn_chat(url: str, home: Path, *args: str) -> pexpect.spawn:
    """The interactive client on a pseudo-terminal, with history kept under ``home``."""
    env = {**os.environ, "HOME": str(home), "TERM": "xterm-256color"}
    return pexpect.spawn(
        sys.executable,
        [str(CLIENT), "--server", url, *args],
        cwd=str(REPO),
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        dimensions=(50, 140),
        timeout=180,
        # As a terminal starts it: a suite run in the background (`make test &`) inherits
        # Ctrl-C ignored, which the client would inherit too.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


# --- Scripting mode ---------------------------------------------------------------------------


def test_message_mode_prints_an_answer_and_exits_0(running_gateway: str) -> None:
    result = run_client("--server", running_gateway, "-m", "Say hello", "--conversation", "cli")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_json_mode_prints_the_whole_response(running_gateway: str) -> None:
    result = run_client("--server", running_gateway, "-m", "Say hello", "--json")
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    assert response["conversation_id"] == "default"
    assert response["tokens_generated"] > 0
    assert isinstance(response["response"], str) and response["response"].strip()
    assert response["pending_approval"] is None


def test_a_url_without_a_server_exits_2_with_a_message() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_client("--server", url, "-m", "Say hello")
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"No AI Lab server at {url}. Start it with `make run`." in result.stderr


# --- Interactive mode -------------------------------------------------------------------------


def test_an_interactive_session_chats_runs_commands_and_exports_fine_tuning_data(
    running_gateway: str, tmp_path: Path
) -> None:
    chat = spawn_chat(running_gateway, tmp_path)
    try:
        chat.expect("Model number or key")
        chat.sendline("")
        chat.expect_exact(PROMPT)
        chat.sendline("Say hello")
        chat.expect("tok/s")
        chat.expect_exact(PROMPT)
        chat.sendline("/system You are terse.")
        chat.expect_exact(PROMPT)
        chat.sendline("/system")
        chat.expect_exact("You are terse.")
        chat.expect_exact(PROMPT)
        chat.sendline("/history")
        chat.expect(r"\d+ messages")
        chat.expect_exact(PROMPT)
        chat.sendline(f"/export-ft {tmp_path / 'ft.jsonl'}")
        chat.expect("training examples")
        chat.expect_exact(PROMPT)
        chat.sendline(f"/system {DEFAULT_SYSTEM_PROMPT}")
        chat.expect_exact(PROMPT)
        chat.sendline("/quit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0
    records = [json.loads(line) for line in (tmp_path / "ft.jsonl").read_text().splitlines()]
    assert records
    for record in records:
        roles = {message["role"] for message in record["messages"]}
        assert {"user", "assistant"} <= roles
    assert (tmp_path / ".ailab_history").read_text().count("Say hello") == 1


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(running_gateway: str, tmp_path: Path) -> None:
    chat = spawn_chat(running_gateway, tmp_path, "--no-picker", "--conversation", "long")
    try:
        chat.expect_exact(PROMPT)
        chat.sendline("Count from 1 to 1000, one number per line.")
        chat.expect("thinking")
        chat.sendintr()
        chat.expect_exact("Stopped.")
        chat.expect_exact(PROMPT)
        # Start afresh: the next answer should not continue the stopped story.
        chat.sendline("/clear")
        chat.expect_exact(PROMPT)
        chat.sendline("Say hello")
        chat.expect("tok/s")
        chat.expect_exact(PROMPT)
        chat.sendeof()
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0


def test_an_unknown_command_gets_a_hint_and_the_chat_goes_on(
    running_gateway: str, tmp_path: Path
) -> None:
    chat = spawn_chat(running_gateway, tmp_path, "--no-picker")
    try:
        chat.expect_exact(PROMPT)
        chat.sendline("/layers lots")
        chat.expect_exact("must be a whole number")
        chat.expect_exact(PROMPT)
        chat.sendline("/conversation")
        chat.expect_exact("Conversations")
        chat.expect_exact(PROMPT)
        chat.sendline("/nonsense")
        chat.expect_exact("Unknown command /nonsense")
        chat.expect_exact(PROMPT)
        chat.sendeof()
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0
