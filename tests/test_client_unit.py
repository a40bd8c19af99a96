"""ai_client against a scripted HTTP server on 127.0.0.1: SSE parsing, command dispatch,
approvals, exports and scripting mode, including the edge cases a real gateway rarely
produces (500s, malformed events, cut-off streams)."""

from __future__ import annotations

import io
import itertools
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from ailab import client as ai_client
from ailab.client import (
    ChatUI,
    GatewayClient,
    GatewayError,
    NotReady,
    ServerUnavailable,
    TurnResult,
    completions,
    export_format_for,
    parse_sse,
    read_message,
    resolve_choice,
    split_lines,
)

# --- A scripted gateway ---------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    content_type: str = "application/json"
    chunks: list[bytes] | None = None


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


def sse_bytes(*events: tuple[str, Any]) -> bytes:
    return b"".join(
        f"event: {name}\r\ndata: {json.dumps(data)}\r\n\r\n".encode() for name, data in events
    )


def sse(*events: tuple[str, Any]) -> Reply:
    """A streamed reply cut into small chunks, so lines straddle chunk boundaries."""
    raw = sse_bytes(*events)
    return Reply(
        content_type="text/event-stream", chunks=[raw[i : i + 7] for i in range(0, len(raw), 7)]
    )


@dataclass
class FakeGateway:
    url: str = ""
    routes: dict[tuple[str, str], list[Reply]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)

    def on(self, method: str, path: str, *replies: Reply) -> None:
        """Answer with the replies in turn; the last one repeats."""
        self.routes[(method, path)] = list(replies)

    def sent(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if (r.method, r.path) == (method, path)]

    def next_reply(self, method: str, path: str) -> Reply:
        replies = self.routes.get((method, path))
        if not replies:
            return Reply(404, {"detail": f"fake has no route {method} {path}"})
        return replies.pop(0) if len(replies) > 1 else replies[0]


def _handler_for(fake: FakeGateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def _answer(self, method: str) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            fake.requests.append(Recorded(method, url.path, parse_qs(url.query), body))
            reply = fake.next_reply(method, url.path)
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            if reply.chunks is None:
                payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body)
                data = payload if isinstance(payload, bytes) else payload.encode()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.end_headers()
            for chunk in reply.chunks:
                self.wfile.write(chunk)
                self.wfile.flush()

    return Handler


@pytest.fixture
def fake() -> Iterator[FakeGateway]:
    gateway = FakeGateway()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(gateway))
    gateway.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield gateway
    server.shutdown()
    server.server_close()


@pytest.fixture
def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


HEALTH_OK = {"status": "ok", "model_key": "smollm2-135m", "device": "CPU", "download": None}
DONE = {
    "response": "Hello there!",
    "conversation_id": "default",
    "model_key": "smollm2-135m",
    "tokens_generated": 3,
    "tokens_per_second": 42.5,
    "generation_time": 0.07,
    "device": "CPU",
    "tools_used": [],
    "tool_calls": [],
    "pending_approval": None,
}
APPROVAL = {
    "approval_id": "ap-1",
    "tool": "delete_file",
    "arguments": {"path": "notes.txt"},
    "description": "Delete notes.txt from the workspace",
}
MODELS = {
    "current": "smollm2-135m",
    "models": [
        {
            "key": "smollm2-135m",
            "name": "SmolLM2",
            "exists": True,
            "size_bytes": 95_000_000,
            "is_finetuned": False,
            "recommended": True,
            "current": True,
            "state": "ready",
            "memory_measured_mb": 221.4,
            "in_flight": 2,
        },
        {
            "key": "gemma3-270m",
            "name": "Gemma 3",
            "exists": True,
            "size_bytes": 250_000_000,
            "is_finetuned": False,
            "recommended": False,
            "current": False,
            "state": "downloading",
            "download": {"percent": 42.0},
            "memory_estimate_mb": 355.4,
        },
        {
            "key": "broken",
            "name": "Broken",
            "exists": True,
            "state": "failed",
            "message": "llama-server exited with code 1",
        },
    ],
}


@dataclass
class Screen:
    ui: ChatUI
    buffer: io.StringIO
    answers: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.buffer.getvalue()


def make_screen(url: str, confirm: bool = True, answers: list[str] | None = None) -> Screen:
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, color_system=None)
    screen = Screen(ChatUI(GatewayClient(url), console), buffer, answers or [])

    def read_line(prompt: str) -> str:
        if not screen.answers:
            raise EOFError
        return screen.answers.pop(0)

    def ask(question: str) -> bool:
        screen.questions.append(question)
        return confirm

    screen.ui.read_line = read_line
    screen.ui.confirm = ask
    return screen


# --- SSE parsing -----------------------------------------------------------------------------


def test_parse_sse_yields_named_events_with_json_data() -> None:
    lines = ["event: delta", 'data: {"content": "Hi"}', "", "event: done", "data: {}", ""]
    assert list(parse_sse(lines)) == [("delta", {"content": "Hi"}), ("done", {})]


def test_parse_sse_skips_comments_and_joins_multiline_data() -> None:
    lines = [": ping", "event: done", 'data: {"a":', "data: 1}", ""]
    assert list(parse_sse(lines)) == [("done", {"a": 1})]


def test_parse_sse_names_an_unnamed_event_message() -> None:
    assert list(parse_sse(['data: {"x": 1}', ""])) == [("message", {"x": 1})]


def test_parse_sse_ignores_blank_lines_between_events() -> None:
    lines = ["", "", "event: delta", 'data: {"content": "a"}', "", "", ""]
    assert list(parse_sse(lines)) == [("delta", {"content": "a"})]


@pytest.mark.parametrize("data", ["{not json", "[1, 2]", '"text"'])
def test_parse_sse_rejects_data_that_is_not_a_json_object(data: str) -> None:
    with pytest.raises(GatewayError, match="malformed 'delta' event"):
        list(parse_sse(["event: delta", f"data: {data}", ""]))


def test_parse_sse_drops_an_event_cut_off_before_its_blank_line() -> None:
    lines = ["event: delta", 'data: {"content": "a"}', "", "event: done", 'data: {"x"']
    assert list(parse_sse(lines)) == [("delta", {"content": "a"})]


def test_split_lines_strips_crlf_and_keeps_multibyte_characters_split_across_chunks() -> None:
    raw = "héllo\r\nwörld\n".encode()
    chunks = [raw[:2], raw[2:9], raw[9:]]
    assert list(split_lines(chunks)) == ["héllo", "wörld"]


EVENTS = [
    ("delta", {"content": "Hel"}),
    ("delta", {"content": "lo ✓"}),
    ("tool_call", {"id": "1", "name": "read_file", "arguments": {"path": "a"}}),
    ("done", DONE),
]


@given(st.lists(st.integers(min_value=0, max_value=len(sse_bytes(*EVENTS))), max_size=30))
def test_any_chunking_of_a_stream_gives_the_same_events(cuts: list[int]) -> None:
    raw = sse_bytes(*EVENTS)
    bounds = [0, *sorted(cuts), len(raw)]
    chunks = [raw[a:b] for a, b in itertools.pairwise(bounds)]
    assert list(parse_sse(split_lines(chunks))) == EVENTS


# --- GatewayClient ---------------------------------------------------------------------------


def test_client_raises_the_server_detail_on_500(fake: FakeGateway) -> None:
    fake.on("GET", "/models", Reply(500, {"detail": "llama-server crashed; restarting"}))
    with pytest.raises(GatewayError, match="llama-server crashed") as caught:
        GatewayClient(fake.url).models()
    assert caught.value.status == 500


def test_client_reports_the_status_when_the_error_body_is_not_json(fake: FakeGateway) -> None:
    fake.on("GET", "/models", Reply(502, b"Bad Gateway", content_type="text/plain"))
    with pytest.raises(GatewayError, match="HTTP 502"):
        GatewayClient(fake.url).models()


def test_client_says_no_server_when_nothing_listens(refused_url: str) -> None:
    with pytest.raises(ServerUnavailable, match=r"No AI Lab server at .*make run"):
        GatewayClient(refused_url).health()


def test_wait_until_ready_backs_off_until_health_is_ok(fake: FakeGateway) -> None:
    loading = Reply(503, {"status": "loading", "message": "loading model", "download": None})
    fake.on("GET", "/health", loading, loading, loading, Reply(200, HEALTH_OK))
    seen: list[str] = []
    delays: list[float] = []
    health = GatewayClient(fake.url).wait_until_ready(
        60, on_status=lambda h: seen.append(h["status"]), sleep=delays.append
    )
    assert health["status"] == "ok"
    assert seen == ["loading"] * 3
    assert delays == [0.25, 0.5, 1.0]


def test_wait_until_ready_gives_up_after_the_timeout_naming_the_status(fake: FakeGateway) -> None:
    download = {
        "filename": "q.gguf",
        "percent": 40.0,
        "downloaded_bytes": 4_000_000,
        "total_bytes": 10_000_000,
        "done": False,
        "error": None,
    }
    fake.on(
        "GET", "/health", Reply(503, {"status": "loading", "message": None, "download": download})
    )
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(NotReady, match=r"not ready after 3 s \(loading - downloading q.gguf: 40%"):
        GatewayClient(fake.url).wait_until_ready(3, sleep=sleep, clock=lambda: now[0])


def test_chat_stream_sends_stream_true_and_yields_the_events(fake: FakeGateway) -> None:
    fake.on("POST", "/chat", sse(*EVENTS))
    stream = GatewayClient(fake.url).chat_stream({"messages": [], "conversation_id": "c"})
    assert list(stream) == EVENTS
    assert fake.sent("POST", "/chat")[0].body["stream"] is True


# --- Chatting ------------------------------------------------------------------------------


def test_a_streamed_answer_shows_its_text_and_a_footer(fake: FakeGateway) -> None:
    fake.on(
        "POST",
        "/chat",
        sse(("delta", {"content": "Hello "}), ("delta", {"content": "there!"}), ("done", DONE)),
    )
    screen = make_screen(fake.url)
    screen.ui.handle_line("Hi")
    assert "Hello there!" in screen.text
    assert "3 tokens (0 in) · 42.5 tok/s · 0.07 s · CPU" in screen.text
    sent = fake.sent("POST", "/chat")[0].body
    assert sent["messages"] == [{"role": "user", "content": "Hi"}]
    assert sent["conversation_id"] == "default"


def test_tool_calls_and_results_show_as_panels(fake: FakeGateway) -> None:
    fake.on(
        "POST",
        "/chat",
        sse(
            ("tool_call", {"id": "1", "name": "read_file", "arguments": {"path": "notes.txt"}}),
            ("tool_result", {"id": "1", "name": "read_file", "result": {"content": "buy milk"}}),
            ("delta", {"content": "You need milk."}),
            ("done", {**DONE, "tools_used": ["read_file(notes.txt)"]}),
        ),
    )
    screen = make_screen(fake.url)
    screen.ui.handle_line("What do I need?")
    assert 'read_file({"path": "notes.txt"})' in screen.text
    assert "read_file result" in screen.text and "buy milk" in screen.text
    assert "tools: read_file(notes.txt)" in screen.text


def test_an_approval_event_shows_the_call_asks_and_continues_the_stream(fake: FakeGateway) -> None:
    fake.on(
        "POST",
        "/chat",
        sse(
            ("approval_required", APPROVAL),
            ("done", {**DONE, "response": "", "pending_approval": APPROVAL}),
        ),
    )
    fake.on("POST", "/chat/approve", sse(("delta", {"content": "Deleted it."}), ("done", DONE)))
    screen = make_screen(fake.url, confirm=True)
    screen.ui.handle_line("Delete my notes")
    assert screen.questions == ["Run this tool call?"]
    assert "delete_file" in screen.text and '"path": "notes.txt"' in screen.text
    assert "Delete notes.txt from the workspace" in screen.text
    approve = fake.sent("POST", "/chat/approve")[0].body
    assert approve == {
        "conversation_id": "default",
        "approval_id": "ap-1",
        "approve": True,
        "stream": True,
    }
    assert "Deleted it." in screen.text and "tok/s" in screen.text


def test_an_approval_event_is_asked_even_when_the_stream_ends_there(fake: FakeGateway) -> None:
    fake.on("POST", "/chat", sse(("approval_required", APPROVAL)))
    fake.on("POST", "/chat/approve", sse(("delta", {"content": "Done."}), ("done", DONE)))
    screen = make_screen(fake.url, confirm=True)
    screen.ui.handle_line("Delete my notes")
    assert fake.sent("POST", "/chat/approve")[0].body["approval_id"] == "ap-1"
    assert "Done." in screen.text


def test_a_pending_approval_in_the_done_event_alone_is_asked_too(fake: FakeGateway) -> None:
    fake.on("POST", "/chat", sse(("done", {**DONE, "response": "", "pending_approval": APPROVAL})))
    fake.on("POST", "/chat/approve", sse(("delta", {"content": "Kept it."}), ("done", DONE)))
    screen = make_screen(fake.url, confirm=False)
    screen.ui.handle_line("Delete my notes")
    assert fake.sent("POST", "/chat/approve")[0].body["approve"] is False
    assert "Kept it." in screen.text


def test_a_server_error_during_chat_prints_the_detail_and_the_client_goes_on(
    fake: FakeGateway,
) -> None:
    fake.on("POST", "/chat", Reply(500, {"detail": "Model failed to load: out of memory"}))
    screen = make_screen(fake.url)
    screen.ui.handle_line("Hi")
    assert "Error: Model failed to load: out of memory" in screen.text
    assert screen.ui.running


def test_a_malformed_event_is_reported_not_raised(fake: FakeGateway) -> None:
    raw = b"event: delta\r\ndata: {oops\r\n\r\n"
    fake.on("POST", "/chat", Reply(content_type="text/event-stream", chunks=[raw]))
    screen = make_screen(fake.url)
    screen.ui.handle_line("Hi")
    assert "malformed 'delta' event" in screen.text


def test_an_error_event_is_shown_without_a_footer(fake: FakeGateway) -> None:
    fake.on(
        "POST", "/chat", sse(("delta", {"content": "Par"}), ("error", {"error": "upstream died"}))
    )
    screen = make_screen(fake.url)
    screen.ui.handle_line("Hi")
    assert "Error: upstream died" in screen.text
    assert "tok/s" not in screen.text


def test_a_stream_that_ends_without_done_is_reported(fake: FakeGateway) -> None:
    fake.on("POST", "/chat", sse(("delta", {"content": "Half an ans"})))
    screen = make_screen(fake.url)
    screen.ui.handle_line("Hi")
    assert "ended without a 'done' event" in screen.text


class InterruptedStream:
    """Yields one token, then behaves as if the user pressed Ctrl-C."""

    def __init__(self) -> None:
        self.closed = False

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        yield "delta", {"content": "Once upon"}
        raise KeyboardInterrupt

    def close(self) -> None:
        self.closed = True


def test_ctrl_c_during_an_answer_closes_the_stream_and_keeps_the_client() -> None:
    screen = make_screen("http://127.0.0.1:9")
    stream = InterruptedStream()
    result = screen.ui.render_stream(lambda: stream)  # type: ignore[arg-type, return-value]
    assert result == TurnResult(interrupted=True)
    assert stream.closed
    assert "Stopped." in screen.text


# --- Slash commands ---------------------------------------------------------------------------


def test_an_unknown_command_gets_a_hint_with_the_closest_name(fake: FakeGateway) -> None:
    screen = make_screen(fake.url)
    screen.ui.handle_line("/modle gemma3-270m")
    assert "Unknown command /modle. Did you mean /model?" in screen.text
    assert fake.requests == []


@pytest.mark.parametrize(
    "line",
    [
        "/layers lots",
        "/layers -2",
        "/ctx 0",
        "/tools maybe",
        "/export",
        "/export a.txt b.txt",
        "/export-ft",
        "/export-ft ft.jsonl --with-tools",
        "/mem now",
        "/conversation a b",
        "/clear all",
        "/quit now",
        '/export "unclosed',
        "/model a b",
        "/finetune now",
        "/mcp restart",
    ],
)
def test_a_bad_command_value_gets_a_usage_hint_and_sends_nothing(
    fake: FakeGateway, line: str
) -> None:
    screen = make_screen(fake.url)
    screen.ui.handle_line(line)
    assert "Usage: /" in screen.text
    assert fake.requests == []
    assert screen.ui.running


@pytest.mark.parametrize(
    ("line", "command", "value"),
    [
        ("/layers 12", "layers", "12"),
        ("/layers", "layers", None),
        ("/ctx 4096", "ctx", "4096"),
        ("/system You are terse.", "system", "You are terse."),
        ("/system", "system", None),
        ("/mem", "mem", None),
        ("/clear", "reset", None),
        ("/history", "history", None),
        ("/bench smollm2-135m gemma3-270m", "bench", "smollm2-135m,gemma3-270m"),
        ("/bench", "bench", None),
        ("/model", "model", None),
        ("/tools OFF", "tools", "off"),
        ("/finetune", "finetune", None),
        ("/finetune cancel", "finetune", "cancel"),
        ("/finetune name=mybot match=demo-*", "finetune", "name=mybot match=demo-*"),
        ("/mcp", "mcp", None),
        ("/mcp Reload", "mcp", "reload"),
    ],
)
def test_server_commands_post_the_command_and_print_its_message(
    fake: FakeGateway, line: str, command: str, value: str | None
) -> None:
    fake.on(
        "POST",
        "/command",
        Reply(
            body={"status": "ok", "command": command, "message": f"did {command}", "value": None}
        ),
    )
    fake.on("GET", "/conversations/default", Reply(404, {"detail": "no such conversation"}))
    screen = make_screen(fake.url)
    screen.ui.handle_line(line)
    sent = fake.sent("POST", "/command")[0].body
    assert sent == {"command": command, "value": value, "conversation_id": "default"}
    assert f"did {command}" in screen.text


def test_tools_on_switches_the_server_and_this_chats_requests(fake: FakeGateway) -> None:
    fake.on("POST", "/command", Reply(body={"status": "ok", "message": "tools on", "value": "on"}))
    fake.on("POST", "/chat", sse(("done", DONE)))
    screen = make_screen(fake.url)
    screen.ui.handle_line("/tools on")
    screen.ui.handle_line("Read notes.txt")
    assert fake.sent("POST", "/chat")[0].body["enable_tools"] is True


def test_history_lists_the_messages_of_the_conversation(fake: FakeGateway) -> None:
    fake.on("POST", "/command", Reply(body={"status": "ok", "message": "2 messages, 20 tokens"}))
    fake.on(
        "GET",
        "/conversations/default",
        Reply(
            body={
                "id": "default",
                "messages": [
                    {"role": "user", "content": "Say hello"},
                    {"role": "assistant", "content": "Hello!"},
                ],
            }
        ),
    )
    screen = make_screen(fake.url)
    screen.ui.handle_line("/history")
    assert "2 messages, 20 tokens" in screen.text
    assert "user: Say hello" in screen.text and "assistant: Hello!" in screen.text


def test_conversation_with_an_id_switches_the_conversation_chat_uses(fake: FakeGateway) -> None:
    fake.on("POST", "/chat", sse(("done", DONE)))
    screen = make_screen(fake.url)
    screen.ui.handle_line("/conversation work")
    screen.ui.handle_line("Hi")
    assert fake.sent("POST", "/chat")[0].body["conversation_id"] == "work"


def test_conversation_without_an_id_lists_the_conversations(fake: FakeGateway) -> None:
    fake.on(
        "GET",
        "/conversations",
        Reply(
            body={
                "conversations": [
                    {
                        "id": "default",
                        "title": "Greetings",
                        "message_count": 4,
                        "created_at": "x",
                        "updated_at": "2025-01-01",
                    }
                ]
            }
        ),
    )
    screen = make_screen(fake.url)
    screen.ui.handle_line("/conversation")
    assert "Greetings" in screen.text and "default" in screen.text


def test_quit_ends_the_loop() -> None:
    screen = make_screen("http://127.0.0.1:9", answers=["/quit", "never read"])
    assert screen.ui.run() == 0
    assert screen.answers == ["never read"]


def test_help_lists_every_command() -> None:
    screen = make_screen("http://127.0.0.1:9")
    screen.ui.handle_line("/help")
    for name in ai_client.COMMANDS:
        assert f"/{name}" in screen.text


def test_a_model_switch_posts_the_key_and_prints_the_message(fake: FakeGateway) -> None:
    fake.on(
        "POST",
        "/model/switch",
        Reply(
            body={
                "status": "ok",
                "model_key": "gemma3-270m",
                "message": "Switched to gemma3-270m in 0.8 s",
            }
        ),
    )
    screen = make_screen(fake.url)
    screen.ui.handle_line("/model gemma3-270m")
    assert fake.sent("POST", "/model/switch")[0].body == {"model_key": "gemma3-270m"}
    assert "Switched to gemma3-270m in 0.8 s" in screen.text


def test_switching_to_an_unknown_model_prints_the_detail(fake: FakeGateway) -> None:
    fake.on("POST", "/model/switch", Reply(404, {"detail": "Unknown model 'nope'"}))
    screen = make_screen(fake.url)
    screen.ui.handle_line("/model nope")
    assert "Error: Unknown model 'nope'" in screen.text


# --- Exports --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("talk.json", "json"),
        ("talk.jsonl", "jsonl"),
        ("TALK.JSONL", "jsonl"),
        ("talk.txt", "text"),
        ("talk.md", "text"),
        ("talk", "text"),
    ],
)
def test_the_export_format_follows_the_file_extension(name: str, fmt: str) -> None:
    assert export_format_for(Path(name)) == fmt


def test_export_writes_the_servers_body_in_the_format_of_the_extension(
    fake: FakeGateway, tmp_path: Path
) -> None:
    body = b'{"messages": [{"role": "user", "content": "Hi"}]}\n'
    fake.on("GET", "/conversations/default/export", Reply(body=body))
    screen = make_screen(fake.url)
    screen.ui.handle_line(f"/export {tmp_path / 'talk.jsonl'}")
    assert (tmp_path / "talk.jsonl").read_bytes() == body
    assert fake.sent("GET", "/conversations/default/export")[0].query["format"] == ["jsonl"]


def test_export_ft_fetches_all_conversations_and_honours_no_tools(
    fake: FakeGateway, tmp_path: Path
) -> None:
    body = b'{"messages": []}\n{"messages": []}\n'
    fake.on("GET", "/conversations/export", Reply(body=body))
    screen = make_screen(fake.url)
    screen.ui.handle_line(f"/export-ft {tmp_path / 'ft.jsonl'} --no-tools")
    query = fake.sent("GET", "/conversations/export")[0].query
    assert query == {"format": ["jsonl"], "tools": ["false"]}
    assert (tmp_path / "ft.jsonl").read_bytes() == body
    assert "2 training examples" in screen.text


def test_export_into_a_missing_folder_prints_an_error(fake: FakeGateway, tmp_path: Path) -> None:
    fake.on("GET", "/conversations/default/export", Reply(body=b"text"))
    screen = make_screen(fake.url)
    screen.ui.handle_line(f"/export {tmp_path / 'missing' / 'talk.txt'}")
    assert "Error: No such file or directory" in screen.text


# --- Input, completion, picker ------------------------------------------------------------------


def lines_from(*lines: str) -> Any:
    queue = list(lines)
    return lambda prompt: queue.pop(0)


def test_a_trailing_backslash_continues_the_message() -> None:
    assert read_message(lines_from("first \\", "second\\", "third")) == "first \nsecond\nthird"


def test_triple_quotes_open_and_close_a_block() -> None:
    message = read_message(lines_from('"""', "def f():", "    return 1", '"""'))
    assert message == "def f():\n    return 1"


def test_a_block_may_start_and_end_on_text_lines() -> None:
    assert read_message(lines_from('"""one', 'two"""')) == "one\ntwo"
    assert read_message(lines_from('"""single"""')) == "single"


def test_completion_offers_command_names_then_model_keys() -> None:
    assert completions("/mo", lambda: []) == ["/model", "/models"]
    assert completions("/export", lambda: []) == ["/export", "/export-ft"]
    assert completions("/model ge", lambda: ["gemma3-270m", "smollm2-135m"]) == ["gemma3-270m"]
    assert completions("hello", lambda: ["x"]) == []


def test_picker_answers_resolve_by_number_or_key() -> None:
    keys = ["smollm2-135m", "gemma3-270m"]
    assert resolve_choice("2", keys) == "gemma3-270m"
    assert resolve_choice("smollm2-135m", keys) == "smollm2-135m"
    assert resolve_choice("3", keys) is None
    assert resolve_choice("0", keys) is None
    assert resolve_choice("llama", keys) is None


def test_the_picker_shows_the_models_and_switches_to_the_choice(fake: FakeGateway) -> None:
    fake.on("GET", "/models", Reply(body=MODELS))
    fake.on("POST", "/model/switch", Reply(body={"status": "ok", "message": "switched"}))
    screen = make_screen(fake.url, answers=["9", "2"])
    screen.ui.pick_model()
    assert "SmolLM2" in screen.text and "95.0 MB" in screen.text
    assert "ready" in screen.text and "221 MB" in screen.text  # measured
    assert "downloading 42%" in screen.text and "~355 MB" in screen.text  # estimated
    assert "failed: llama-server exited with code 1" in screen.text
    assert "No model '9'" in screen.text
    assert fake.sent("POST", "/model/switch")[0].body == {"model_key": "gemma3-270m"}


def test_enter_in_the_picker_keeps_the_current_model(fake: FakeGateway) -> None:
    fake.on("GET", "/models", Reply(body=MODELS))
    screen = make_screen(fake.url, answers=[""])
    screen.ui.pick_model()
    assert fake.sent("POST", "/model/switch") == []


# --- Scripting mode --------------------------------------------------------------------------


def test_message_mode_prints_just_the_answer(
    fake: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.on("GET", "/health", Reply(body=HEALTH_OK))
    fake.on("POST", "/chat", Reply(body=DONE))
    assert ai_client.main(["--server", fake.url, "-m", "Say hello", "--tools"]) == 0
    assert capsys.readouterr().out == "Hello there!\n"
    sent = fake.sent("POST", "/chat")[0].body
    assert sent["stream"] is False and sent["enable_tools"] is True
    assert sent["conversation_id"] == "default" and "system_prompt" not in sent


def test_json_mode_prints_the_whole_response(
    fake: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.on("GET", "/health", Reply(body=HEALTH_OK))
    fake.on("POST", "/chat", Reply(body=DONE))
    args = ["--server", fake.url, "-m", "Hi", "--json", "--conversation", "c1", "--system", "S"]
    assert ai_client.main(args) == 0
    assert json.loads(capsys.readouterr().out) == DONE
    sent = fake.sent("POST", "/chat")[0].body
    assert sent["conversation_id"] == "c1" and sent["system_prompt"] == "S"


def test_message_mode_without_a_server_exits_2_with_a_message(
    refused_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ai_client.main(["--server", refused_url, "-m", "Hi"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"No AI Lab server at {refused_url}. Start it with `make run`." in captured.err


def test_message_mode_prints_a_server_error_on_stderr_and_exits_1(
    fake: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.on("GET", "/health", Reply(body=HEALTH_OK))
    fake.on("POST", "/chat", Reply(400, {"detail": "Conversation too long for the context"}))
    assert ai_client.main(["--server", fake.url, "-m", "Hi"]) == 1
    assert "Error: Conversation too long for the context" in capsys.readouterr().err


def test_message_mode_denies_a_tool_call_when_no_terminal_can_ask(
    fake: FakeGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO())
    fake.on("GET", "/health", Reply(body=HEALTH_OK))
    fake.on("POST", "/chat", Reply(body={**DONE, "pending_approval": APPROVAL}))
    fake.on("POST", "/chat/approve", Reply(body={**DONE, "response": "I did not delete it."}))
    assert ai_client.main(["--server", fake.url, "-m", "Delete notes"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "I did not delete it.\n"
    assert "Denied tool call delete_file" in captured.err
    assert fake.sent("POST", "/chat/approve")[0].body["approve"] is False


def test_message_mode_switches_to_the_model_asked_for(
    fake: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.on("GET", "/health", Reply(body=HEALTH_OK))
    fake.on("GET", "/models", Reply(body=MODELS))
    fake.on("POST", "/model/switch", Reply(body={"status": "ok"}))
    fake.on("POST", "/chat", Reply(body=DONE))
    assert ai_client.main(["--server", fake.url, "-m", "Hi", "--model", "gemma3-270m"]) == 0
    assert fake.sent("POST", "/model/switch")[0].body == {"model_key": "gemma3-270m"}
