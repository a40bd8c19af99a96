"""The agent loop's edge cases, driven by a scripted llama-server stand-in.

Each behaviour here also has a test against the real llama-server in test_chat.py; the
script only makes the rare cases (a model that never stops calling tools, malformed
calls, an upstream 500, a hang-up mid-stream) happen on demand.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
from conftest import PROJECT_DIR, GatewayProcess, wait_for

FAKE = PROJECT_DIR / "tests" / "fake_llama_server.py"


def tool_call(name: str, arguments: str, call_id: str = "c1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def scripted_gateway(
    make_gateway, tmp_path: Path, replies: list[dict], **env: str
) -> GatewayProcess:  # type: ignore[no-untyped-def]
    script = tmp_path / "script.json"
    script.write_text(json.dumps(replies))
    return make_gateway({"LLAMA_SERVER_PATH": str(FAKE), "FAKE_LLAMA_SCRIPT": str(script), **env})


def requests_seen(tmp_path: Path) -> list[dict]:
    log = tmp_path / "script.json.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def stored(server: GatewayProcess, conversation: str = "default") -> list[dict]:
    """The stored messages ([] while the conversation does not exist)."""
    reply = requests.get(f"{server.url}/conversations/{conversation}", timeout=5)
    return reply.json()["messages"] if reply.status_code == 200 else []


def decide(server: GatewayProcess, approval_id: str, approve: bool) -> requests.Response:
    return requests.post(
        f"{server.url}/chat/approve",
        json={"conversation_id": "default", "approval_id": approval_id, "approve": approve},
        timeout=30,
    )


def chat(server: GatewayProcess, text: str, **extra: object) -> requests.Response:
    body = {"messages": [{"role": "user", "content": text}], "enable_tools": True, **extra}
    return requests.post(f"{server.url}/chat", json=body, timeout=60)


def test_a_model_that_keeps_calling_tools_stops_at_the_cap(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = scripted_gateway(
        make_gateway,
        tmp_path,
        [{"content": None, "tool_calls": [tool_call("get_current_directory", "{}")]}],
    )
    body = chat(server, "loop forever").json()
    assert body["iterations"] == 5
    assert body["tool_cap_hit"] is True
    assert body["tools_used"] == ["get_current_directory()"] * 5
    assert body["tokens_input"] == 50 and body["tokens_generated"] == 25
    assert len(requests_seen(tmp_path)) == 5


def test_malformed_and_unknown_tool_calls_go_back_to_the_model_as_errors(
    make_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server = scripted_gateway(
        make_gateway,
        tmp_path,
        [
            {
                "content": None,
                "tool_calls": [
                    tool_call("read_file", "{not json", "bad"),
                    tool_call("launch_rockets", "{}", "unknown"),
                    tool_call("read_file", '{"wrong_arg": 1}', "wrongargs"),
                ],
            },
            {"content": "Sorry, those failed."},
        ],
    )
    reply = chat(server, "try tools")
    assert reply.status_code == 200
    body = reply.json()
    assert body["response"] == "Sorry, those failed."
    assert [c["result"]["status"] for c in body["tool_calls"]] == ["error"] * 3
    second_request = requests_seen(tmp_path)[1]
    tool_messages = [m for m in second_request["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["bad", "unknown", "wrongargs"]
    assert "launch_rockets" in tool_messages[1]["content"]


def test_parallel_tool_calls_all_run_and_all_results_are_kept(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = scripted_gateway(
        make_gateway,
        tmp_path,
        [
            {
                "content": None,
                "tool_calls": [
                    tool_call("get_current_directory", "{}", "a"),
                    tool_call("get_system_info", "{}", "b"),
                ],
            },
            {"content": "done"},
        ],
    )
    body = chat(server, "two at once").json()
    assert body["tools_used"] == ["get_current_directory()", "get_system_info()"]
    history = requests.get(f"{server.url}/conversations/default", timeout=5).json()["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "tool", "assistant"]


def test_an_upstream_500_mid_loop_is_a_clear_error_and_nothing_is_lost(
    make_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server = scripted_gateway(
        make_gateway,
        tmp_path,
        [
            {"content": None, "tool_calls": [tool_call("get_current_directory", "{}")]},
            {"status": 500, "error": "out of memory"},
        ],
    )
    reply = chat(server, "hello")
    assert reply.status_code == 502
    assert "out of memory" in reply.json()["detail"]
    history = requests.get(f"{server.url}/conversations/default", timeout=5).json()["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]
    assert requests.get(f"{server.url}/health", timeout=5).json()["status"] == "ok"


def test_an_upstream_500_mid_stream_becomes_an_error_event(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = scripted_gateway(make_gateway, tmp_path, [{"status": 500, "error": "boom"}])
    reply = chat(server, "hello", stream=True)
    events = [line for line in reply.text.splitlines() if line.startswith("event:")]
    assert events == ["event: error"]
    assert "boom" in reply.text


def test_a_client_that_hangs_up_mid_stream_cancels_the_generation(
    make_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server = scripted_gateway(
        make_gateway, tmp_path, [{"stream_chunks": [f"tok{i} " for i in range(40)], "delay": 0.1}]
    )
    with requests.post(
        f"{server.url}/chat",
        json={"messages": [{"role": "user", "content": "long"}], "stream": True},
        stream=True,
        timeout=30,
    ) as reply:
        for line in reply.iter_lines():
            if line.startswith(b"event: delta"):
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and {"cancelled": True} not in requests_seen(tmp_path):
        time.sleep(0.1)
    assert {"cancelled": True} in requests_seen(tmp_path)
    history = wait_for(lambda: stored(server))
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[1]["content"].startswith("tok0 ")
    assert history[1]["interrupted"] is True


def delete_scenario(make_gateway, tmp_path: Path, answer: str, **env: str):  # type: ignore[no-untyped-def]
    """A model that asks to delete workspace/keep.txt, then answers ``answer``."""
    server = scripted_gateway(
        make_gateway,
        tmp_path,
        [
            {"content": None, "tool_calls": [tool_call("delete_file", '{"path": "keep.txt"}')]},
            {"content": answer},
        ],
        **env,
    )
    keep = server.data_dir / "workspace" / "keep.txt"
    keep.write_text("stay")
    return server, keep


def test_a_destructive_call_waits_for_approval_then_runs(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, victim = delete_scenario(make_gateway, tmp_path, "Deleted.")
    body = chat(server, "delete keep.txt").json()
    pending = body["pending_approval"]
    assert pending["tool"] == "delete_file" and pending["arguments"] == {"path": "keep.txt"}
    assert victim.exists()
    approved = decide(server, pending["approval_id"], True).json()
    assert approved["response"] == "Deleted."
    assert not victim.exists()
    again = decide(server, pending["approval_id"], True)
    assert again.status_code == 404
    audit = requests.get(f"{server.url}/tools/audit", timeout=5).json()["records"]
    assert audit[0]["tool"] == "delete_file" and audit[0]["approval"] == "approved"


def test_a_refused_call_is_reported_to_the_model_and_nothing_happens(
    make_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server, keep = delete_scenario(make_gateway, tmp_path, "Okay, I left it.")
    pending = chat(server, "delete keep.txt").json()["pending_approval"]
    refused = decide(server, pending["approval_id"], False).json()
    assert refused["response"] == "Okay, I left it."
    assert keep.read_text() == "stay"
    tool_message = next(m for m in requests_seen(tmp_path)[1]["messages"] if m["role"] == "tool")
    assert "declined" in tool_message["content"]


def test_the_deny_policy_refuses_destructive_calls_without_asking(
    make_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server, keep = delete_scenario(
        make_gateway, tmp_path, "Not allowed.", AILAB_TOOL_APPROVAL="deny"
    )
    body = chat(server, "delete keep.txt").json()
    assert body["pending_approval"] is None
    assert body["tool_calls"][0]["result"]["status"] == "error"
    assert keep.exists()


def test_a_forced_call_the_model_garbles_becomes_a_readable_tool_error(
    make_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server = scripted_gateway(
        make_gateway, tmp_path, [{"content": '{"name": "read_file", "argu'}, {"content": "Sorry."}]
    )
    reply = chat(server, "read it", tool_choice="required")
    assert reply.status_code == 200
    body = reply.json()
    assert body["tool_calls"][0]["result"]["status"] == "error"
    assert body["response"] == "Sorry."
    forced_request = requests_seen(tmp_path)[0]
    assert forced_request["response_format"]["type"] == "json_object"
    assert "tools" not in forced_request


def test_naming_an_unknown_tool_is_a_400(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = scripted_gateway(make_gateway, tmp_path, [{"content": "unused"}])
    reply = chat(server, "hi", tool_choice={"type": "function", "function": {"name": "nuke"}})
    assert reply.status_code == 400
    assert "nuke" in reply.json()["detail"]


def test_each_destructive_call_of_a_turn_is_asked_for_in_turn(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = scripted_gateway(
        make_gateway,
        tmp_path,
        [
            {
                "content": None,
                "tool_calls": [
                    tool_call("delete_file", '{"path": "a.txt"}', "first"),
                    tool_call("get_current_directory", "{}", "safe"),
                    tool_call("delete_file", '{"path": "b.txt"}', "second"),
                ],
            },
            {"content": "Both gone."},
        ],
    )
    workspace = server.data_dir / "workspace"
    for name in ("a.txt", "b.txt"):
        (workspace / name).write_text("x")
    first = chat(server, "delete both").json()["pending_approval"]
    assert first["arguments"] == {"path": "a.txt"}
    second = decide(server, first["approval_id"], True).json()
    assert second["pending_approval"]["arguments"] == {"path": "b.txt"}
    assert not (workspace / "a.txt").exists() and (workspace / "b.txt").exists()
    final = decide(server, second["pending_approval"]["approval_id"], True).json()
    assert final["response"] == "Both gone."
    assert final["pending_approval"] is None
    assert not (workspace / "b.txt").exists()
    tool_ids = [
        m["tool_call_id"] for m in requests_seen(tmp_path)[1]["messages"] if m["role"] == "tool"
    ]
    assert tool_ids == ["first", "safe", "second"]


def test_the_calls_of_one_answer_run_in_order_so_a_read_sees_the_write(
    make_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server = scripted_gateway(
        make_gateway,
        tmp_path,
        [
            {
                "content": None,
                "tool_calls": [
                    tool_call("write_file", '{"path": "notes.txt", "content": "draft 1"}', "w"),
                    tool_call("read_file", '{"path": "notes.txt"}', "r"),
                ],
            },
            {"content": "Written and read."},
        ],
    )
    body = chat(server, "write then read").json()
    assert [c["id"] for c in body["tool_calls"]] == ["w", "r"]
    assert body["tool_calls"][1]["result"]["content"] == "draft 1"


def test_a_new_message_declines_the_calls_waiting_for_approval(
    make_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server, keep = delete_scenario(make_gateway, tmp_path, "Fine, I will not.")
    pending = chat(server, "delete keep.txt").json()["pending_approval"]
    reply = chat(server, "No, leave it.")
    assert reply.status_code == 200 and reply.json()["response"] == "Fine, I will not."
    roles = [m["role"] for m in stored(server)]
    assert roles == ["user", "assistant", "tool", "user", "assistant"]
    assert "superseded by a new message" in stored(server)[2]["content"]
    assert keep.read_text() == "stay"
    assert decide(server, pending["approval_id"], True).status_code == 404
    assert keep.exists()
    audit = requests.get(f"{server.url}/tools/audit", timeout=5).json()["records"]
    assert [(r["tool"], r["status"]) for r in audit] == [("delete_file", "superseded")]


def test_the_audit_follows_a_call_from_proposal_to_its_result(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, _ = delete_scenario(make_gateway, tmp_path, "Deleted.")
    pending = chat(server, "delete keep.txt").json()["pending_approval"]
    (proposed,) = requests.get(f"{server.url}/tools/audit", timeout=5).json()["records"]
    assert (proposed["status"], proposed["approval"]) == ("pending", "undecided")
    decide(server, pending["approval_id"], True)
    (decided,) = requests.get(f"{server.url}/tools/audit", timeout=5).json()["records"]
    assert decided["id"] == proposed["id"]
    assert (decided["status"], decided["approval"]) == ("success", "approved")
    assert decided["tool_call_id"] == "c1"


class SlowHttp(ThreadingHTTPServer):
    """Answers GET after ``delay`` seconds; ``started`` is set when a request arrives."""

    def __init__(self, delay: float) -> None:
        started = self.started = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                started.set()
                time.sleep(delay)
                self.send_response(204)
                self.end_headers()

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_call_that_started_is_recorded_when_its_turn_is_stopped(
    make_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    slow = SlowHttp(delay=2.0)
    url = f"http://127.0.0.1:{slow.server_address[1]}/"
    server = scripted_gateway(
        make_gateway,
        tmp_path,
        [
            {
                "content": None,
                "tool_calls": [
                    tool_call("measure_http_latency", json.dumps({"url": url}), "slow"),
                    tool_call("get_current_directory", "{}", "later"),
                ],
            },
            {"content": "unused"},
        ],
        AILAB_NET_ALLOW_PRIVATE="1",
    )
    with requests.post(
        f"{server.url}/chat",
        json={
            "messages": [{"role": "user", "content": "time it"}],
            "enable_tools": True,
            "stream": True,
        },
        stream=True,
        timeout=30,
    ) as reply:
        assert reply.status_code == 200
        assert slow.started.wait(20)  # the tool is running; now the client goes away
    history = wait_for(lambda: stored(server))
    slow.shutdown()
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "tool"]
    assert '"status_code": 204' in history[2]["content"]
    assert "Not run" in history[3]["content"] and history[3]["interrupted"] is True
    audit = requests.get(f"{server.url}/tools/audit", timeout=5).json()["records"]
    statuses = {r["tool_call_id"]: r["status"] for r in audit}
    assert statuses == {"slow": "success", "later": "cancelled"}


def test_a_turn_cut_short_by_shutdown_is_kept_marked_interrupted(
    make_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server = scripted_gateway(
        make_gateway, tmp_path, [{"stream_chunks": [f"w{i} " for i in range(100)], "delay": 0.2}]
    )
    with requests.post(
        f"{server.url}/chat",
        json={"messages": [{"role": "user", "content": "long"}], "stream": True},
        stream=True,
        timeout=60,
    ) as reply:
        for line in reply.iter_lines():
            if line.startswith(b"event: delta"):
                break
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)  # what POST /shutdown does
        server.process.wait(30)
    server.start()
    history = stored(server)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[1]["content"].startswith("w0 ") and history[1]["interrupted"] is True
