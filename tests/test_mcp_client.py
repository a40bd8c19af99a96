"""AI Lab as an MCP client: real MCP servers from npm (installed by `make mcp-servers` from
tests/mcp_servers/package-lock.json) used by the real model through the gateway, and a
tiny Python server that crashes or hangs mid-call.

The gateway here runs with MAX_TOOL_ITERATIONS=1: each turn is the one forced tool call
and no follow-up answer (test_chat.py covers those), which keeps a turn to one short
model call on a small machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import PROJECT_DIR, GatewayProcess, free_port

from ailab.config import ConfigError, load_settings
from ailab.mcp.client import McpHub

MCP_DIR = PROJECT_DIR / "tests" / "mcp_servers"
NODE_MODULES = MCP_DIR / "node_modules" / "@modelcontextprotocol"
FILESYSTEM = NODE_MODULES / "server-filesystem" / "dist" / "index.js"
EVERYTHING = NODE_MODULES / "server-everything" / "dist" / "index.js"
CRASHING = MCP_DIR / "crashing_server.py"


@pytest.fixture(scope="session")
def npm_servers() -> None:
    """The project's own set-up step, run here too so `pytest` alone works."""
    subprocess.run(["make", "--quiet", "mcp-servers"], cwd=PROJECT_DIR, check=True)
    assert FILESYSTEM.is_file() and EVERYTHING.is_file()


@pytest.fixture(scope="module")
def everything_url(npm_servers: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """server-everything in its streamable HTTP mode on a free loopback port."""
    port = free_port()
    log = (tmp_path_factory.mktemp("everything") / "out.log").open("wb")
    process = subprocess.Popen(
        ["node", str(EVERYTHING), "streamableHttp"],
        env={**os.environ, "PORT": str(port)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert process.poll() is None and time.monotonic() < deadline, "everything did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/mcp"
    process.terminate()
    process.wait(10)
    log.close()


def write_config(path: Path, servers: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


def command(server: GatewayProcess, name: str, value: str | None = None) -> requests.Response:
    return requests.post(
        f"{server.url}/command", json={"command": name, "value": value}, timeout=120
    )


def mcp_servers(server: GatewayProcess) -> dict[str, dict[str, Any]]:
    reply = command(server, "mcp")
    assert reply.status_code == 200, reply.text
    return {s["name"]: s for s in reply.json()["value"]["servers"]}


def wait_for_server(server: GatewayProcess, name: str, restarts: int = 0) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = mcp_servers(server)[name]
        if state["state"] == "ready" and state["restarts"] >= restarts:
            return state
        time.sleep(0.2)
    raise AssertionError(f"MCP server {name} not ready: {mcp_servers(server)[name]}")


@pytest.fixture(scope="module")
def fs_root() -> Iterator[Path]:
    """The filesystem server's root: a short, fixed absolute path, which the tiny model
    copies right (it invents a home folder for a bare file name, garbles pytest's long
    ones, and a random name changes its tokens, so its answer, from run to run)."""
    root = Path("/tmp/ailab-mcp-root")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def mcp_gateway(
    llama_server_binary: Path,
    real_models: None,
    npm_servers: None,
    everything_url: str,
    fs_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    data_dir = tmp_path_factory.mktemp("mcp-gateway")
    config = write_config(
        data_dir / "mcp.json",
        {
            "fs": {
                "command": "node",
                "args": [str(FILESYSTEM), str(fs_root)],
                "allow": ["read_text_file", "write_file"],
            },
            "everything": {"url": everything_url, "allow": ["echo"]},
            "crashing": {"command": sys.executable, "args": [str(CRASHING)], "approval": "auto"},
            "broken": {"command": str(data_dir / "no-such-server")},
        },
    )
    server = GatewayProcess(
        llama_server_binary,
        data_dir,
        {"AILAB_MCP_CONFIG": str(config), "MAX_TOOL_ITERATIONS": "1"},
    )
    server.start()
    for name in ("fs", "everything", "crashing"):
        wait_for_server(server, name)
    yield server
    server.stop()


def forced_turn(server: GatewayProcess, text: str, tool: str, conversation: str) -> dict:
    reply = requests.post(
        f"{server.url}/chat",
        json={
            "messages": [{"role": "user", "content": text}],
            "conversation_id": conversation,
            "enable_tools": True,
            "temperature": 0,
            "max_tokens": 48,
            "tool_choice": {"type": "function", "function": {"name": tool}},
        },
        timeout=300,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def decide(server: GatewayProcess, conversation: str, approval_id: str, approve: bool) -> dict:
    reply = requests.post(
        f"{server.url}/chat/approve",
        json={"conversation_id": conversation, "approval_id": approval_id, "approve": approve},
        timeout=300,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def audit(server: GatewayProcess, conversation: str) -> list[dict[str, Any]]:
    reply = requests.get(
        f"{server.url}/tools/audit", params={"conversation_id": conversation}, timeout=10
    )
    return list(reversed(reply.json()["records"]))


# --- through the gateway, with the real model ------------------------------------------------


def test_mcp_lists_servers_with_state_and_only_the_allowed_tools(
    mcp_gateway: GatewayProcess,
) -> None:
    servers = mcp_servers(mcp_gateway)
    assert servers["fs"]["tools"] == ["fs__read_text_file", "fs__write_file"]
    assert servers["everything"]["tools"] == ["everything__echo"]
    assert servers["everything"]["transport"] == "http"
    assert servers["crashing"]["tools"] == [
        "crashing__crash",
        "crashing__freeze",
        "crashing__greet",
    ]
    # A server that cannot start is retried; the gateway serves on.
    assert servers["broken"]["state"] in {"starting", "restarting"}
    assert "no-such-server" in servers["broken"]["error"]
    assert servers["broken"]["tools"] == []
    assert requests.get(f"{mcp_gateway.url}/health", timeout=5).json()["status"] == "ok"


def test_the_model_reads_a_file_through_the_filesystem_server(
    mcp_gateway: GatewayProcess, fs_root: Path
) -> None:
    notes = fs_root / "notes.txt"
    notes.write_text("The secret word is pumpkin.")
    body = forced_turn(mcp_gateway, f"Read the file {notes}", "fs__read_text_file", "mcp-read")
    call = body["tool_calls"][0]
    assert call["name"] == "fs__read_text_file"
    assert call["result"] == {"status": "success", "content": "The secret word is pumpkin."}
    assert body["pending_approval"] is None  # readOnlyHint: no approval under "ask"
    (record,) = audit(mcp_gateway, "mcp-read")
    assert (record["server"], record["tool"]) == ("fs", "read_text_file")
    assert (record["status"], record["approval"]) == ("success", "not_needed")
    assert record["result_chars"] > len("The secret word is pumpkin.")


def test_a_write_waits_for_approval_and_lands_when_approved(
    mcp_gateway: GatewayProcess, fs_root: Path
) -> None:
    target = fs_root / "out.txt"
    first = forced_turn(
        mcp_gateway, f"Write the word hello to the file {target}", "fs__write_file", "mcp-write"
    )
    pending = first["pending_approval"]
    assert pending is not None and pending["tool"] == "fs__write_file", first
    assert not target.exists()  # nothing ran before the decision
    done = decide(mcp_gateway, "mcp-write", pending["approval_id"], approve=True)
    (call,) = done["tool_calls"]
    assert call["result"]["status"] == "success", call
    assert call["arguments"]["path"] == str(target)
    assert target.read_text() == call["arguments"]["content"]
    (record,) = audit(mcp_gateway, "mcp-write")
    assert (record["server"], record["tool"]) == ("fs", "write_file")
    assert record["approval"] == "approved"


def test_declining_a_write_leaves_the_file_untouched(
    mcp_gateway: GatewayProcess, fs_root: Path
) -> None:
    target = fs_root / "keep.txt"
    target.write_text("keep me")
    first = forced_turn(
        mcp_gateway, f"Write the word gone to the file {target}", "fs__write_file", "mcp-decline"
    )
    pending = first["pending_approval"]
    assert pending is not None and pending["tool"] == "fs__write_file", first
    done = decide(mcp_gateway, "mcp-decline", pending["approval_id"], approve=False)
    assert target.read_text() == "keep me"
    assert done["tool_calls"][0]["result"]["error"] == "The user declined this operation."
    (record,) = audit(mcp_gateway, "mcp-decline")
    assert (record["status"], record["approval"]) == ("refused", "denied")


def test_a_streamable_http_server_answers_a_call(mcp_gateway: GatewayProcess) -> None:
    body = forced_turn(mcp_gateway, "Echo the words blue sky", "everything__echo", "mcp-echo")
    call = body["tool_calls"][0]
    assert call["result"] == {
        "status": "success",
        "content": f"Echo: {call['arguments']['message']}",
    }


def test_a_server_that_exits_mid_call_gives_a_tool_error_and_is_restarted(
    mcp_gateway: GatewayProcess,
) -> None:
    body = forced_turn(mcp_gateway, "Start the job", "crashing__crash", "mcp-crash")
    result = body["tool_calls"][0]["result"]
    assert result["status"] == "error"
    assert "Connection closed" in result["error"]
    wait_for_server(mcp_gateway, "crashing", restarts=1)
    # The next turn works, against the restarted server.
    again = forced_turn(mcp_gateway, "Greet Ada", "crashing__greet", "mcp-crash")
    call = again["tool_calls"][0]
    greeting = f"Hello, {call['arguments']['name']}!"
    assert call["result"] == {"status": "success", "content": greeting}


def test_reload_reads_the_file_again_and_a_bad_file_keeps_the_servers(
    mcp_gateway: GatewayProcess,
) -> None:
    config = Path(mcp_gateway.env["AILAB_MCP_CONFIG"])
    good = config.read_text()
    config.write_text('{"mcpServers": {"fs": {"comand": "node"}}}')
    refused = command(mcp_gateway, "mcp", "reload")
    assert refused.status_code == 400
    assert "mcpServers.fs.comand" in refused.json()["detail"]
    assert mcp_servers(mcp_gateway)["fs"]["state"] == "ready"

    servers = json.loads(good)["mcpServers"]
    write_config(config, {"fs": {**servers["fs"], "allow": None, "deny": ["write_file"]}})
    reloaded = command(mcp_gateway, "mcp", "reload")
    assert reloaded.status_code == 200, reloaded.text
    listed = {s["name"]: s for s in reloaded.json()["value"]["servers"]}
    assert set(listed) == {"fs"}
    assert "fs__read_file" in listed["fs"]["tools"]
    assert "fs__write_file" not in listed["fs"]["tools"]


# --- the hub on its own: approval rules and a hung server ------------------------------------


def fs_server(root: Path, **rules: Any) -> dict[str, Any]:
    return {"command": "node", "args": [str(FILESYSTEM), str(root)], **rules}


def run_hub(tmp_path: Path, servers: dict[str, Any], scenario: Any, **timeouts: float) -> Any:
    config = write_config(tmp_path / "mcp.json", servers)

    async def main() -> Any:
        hub = McpHub(config, tmp_path / "logs", **{"call_timeout_s": 60.0, **timeouts})
        await hub.start()
        await hub.wait_started(60)
        try:
            return await scenario(hub)
        finally:
            await hub.close()

    return asyncio.run(main())


def test_readonly_tools_run_under_ask_and_a_server_rule_replaces_the_policy_but_deny_holds(
    npm_servers: None, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    servers = {
        "plain": fs_server(root),
        "trusted": fs_server(root, approval="auto"),
        "locked": fs_server(root, approval="deny"),
        "narrow": fs_server(root, deny=["write_file"]),
    }
    write = {"path": str(root / "new.txt"), "content": "x"}

    async def scenario(hub: McpHub) -> dict[str, Any]:
        return {
            "read": hub.approval("plain__read_text_file", "ask"),
            "write": hub.approval("plain__write_file", "ask"),
            "trusted": hub.approval("trusted__write_file", "ask"),
            "trusted under deny": hub.approval("trusted__write_file", "deny"),
            "locked under auto": hub.approval("locked__write_file", "auto"),
            "unapproved": await hub.call("plain__write_file", write, "ask", approved=False),
            "locked call": await hub.call("locked__write_file", write, "auto", approved=True),
            "narrow call": await hub.call("narrow__write_file", write, "auto", approved=True),
            "narrow tools": [s["function"]["name"] for s in hub.schemas() if "narrow" in str(s)],
        }

    seen = run_hub(tmp_path, servers, scenario)
    assert seen["read"] == (False, "ask")
    assert seen["write"] == (True, "ask")
    assert seen["trusted"] == (True, "auto")
    assert seen["trusted under deny"] == (True, "deny")
    assert seen["locked under auto"] == (True, "deny")
    assert "approval, which was not given" in seen["unapproved"]["error"]
    assert "approval policy for MCP server 'locked' is deny" in seen["locked call"]["error"]
    assert "offers no tool 'narrow__write_file'" in seen["narrow call"]["error"]
    assert "narrow__write_file" not in seen["narrow tools"]
    assert "narrow__read_text_file" in seen["narrow tools"]
    assert not (root / "new.txt").exists()


def test_a_hung_server_times_out_the_call_and_is_restarted(tmp_path: Path) -> None:
    servers = {"crashing": {"command": sys.executable, "args": [str(CRASHING)]}}

    async def scenario(hub: McpHub) -> dict[str, Any]:
        frozen = await hub.call("crashing__freeze", {}, "auto", approved=False)
        connection = hub.connections["crashing"]
        deadline = time.monotonic() + 60
        while not (connection.state == "ready" and connection.restarts >= 1):
            assert time.monotonic() < deadline, connection.describe()
            await asyncio.sleep(0.2)
        greeted = await hub.call("crashing__greet", {"name": "Ada"}, "auto", approved=False)
        return {"frozen": frozen, "greeted": greeted, "error": connection.error}

    seen = run_hub(tmp_path, servers, scenario, call_timeout_s=2.0, answer_timeout_s=2.0)
    assert seen["frozen"]["status"] == "error"
    assert "got no answer within 2 s" in seen["frozen"]["error"]
    assert seen["greeted"] == {"status": "success", "content": "Hello, Ada!"}


def test_a_call_to_a_server_that_is_down_is_an_error_the_model_can_read(tmp_path: Path) -> None:
    servers = {"gone": {"command": str(tmp_path / "no-such-server")}}

    async def scenario(hub: McpHub) -> dict[str, Any]:
        return await hub.call("gone__anything", {}, "auto", approved=True)

    result = run_hub(tmp_path, servers, scenario)
    assert result["status"] == "error"
    assert "MCP server 'gone' is " in result["error"]  # restarting, or starting again
    assert "no-such-server" in result["error"]


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("not json", "is not JSON"),
        ('{"servers": {}}', "mcpServers: Field required"),
        ('{"mcpServers": {"a__b": {"command": "x"}}}', "server name 'a__b'"),
        ('{"mcpServers": {"fs": {"command": "x", "aproval": "auto"}}}', "fs.aproval"),
        ('{"mcpServers": {"fs": {"command": "x", "approval": "maybe"}}}', "fs.approval"),
        ('{"mcpServers": {"fs": {"command": "x", "url": "http://h"}}}', "either `command`"),
        ('{"mcpServers": {"fs": {"url": "ftp://h"}}}', "fs.url"),
        ('{"mcpServers": {"fs": {"url": "http://h", "args": ["a"]}}}', "for stdio servers"),
    ],
)
def test_a_bad_mcp_config_file_is_refused_at_start_up_naming_what_to_fix(
    tmp_path: Path, content: str, named: str
) -> None:
    config = tmp_path / "mcp.json"
    config.write_text(content)
    with pytest.raises(ConfigError) as refused:
        load_settings({"AILAB_DATA_DIR": str(tmp_path), "AILAB_MCP_CONFIG": str(config)})
    assert str(refused.value).startswith("AILAB_MCP_CONFIG: ")
    assert named in str(refused.value)
