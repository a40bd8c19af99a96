"""AI Lab's terminal chat client: a Rich front end for the gateway's HTTP API.

``python ai_client.py`` (or ``ailab-chat``) opens an interactive chat;
``python ai_client.py -m "question"`` prints one answer and exits.

``GatewayClient`` does the HTTP calls and SSE parsing; ``ChatUI`` draws and reads the
terminal; slash commands are plain functions registered in ``COMMANDS`` with ``@command``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import json
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.prompt import Confirm
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

JSON = dict[str, Any]

DEFAULT_SERVER = "http://127.0.0.1:8080"
HISTORY_FILE = "~/.ailab_history"
PROMPT = "you> "
CONTINUATION_PROMPT = "...> "
BLOCK_QUOTE = '"""'
CONNECT_TIMEOUT_S = 5.0
QUICK_READ_TIMEOUT_S = 30.0
# Generating, switching models and benchmarking legitimately take minutes on a CPU.
SLOW_READ_TIMEOUT_S = 900.0
LIVE_UPDATES_PER_S = 15

EXIT_OK, EXIT_ERROR, EXIT_NO_SERVER, EXIT_NOT_READY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class GatewayError(Exception):
    """The gateway answered with an error, or could not be talked to."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerUnavailable(GatewayError):
    """Nothing answers at the server URL."""


class NotReady(GatewayError):
    """The server answers but did not become ready in time."""


class UsageError(Exception):
    """A slash command got a bad argument; the message is the hint for the user."""


# --- Server-Sent Events ----------------------------------------------------------------


def split_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """The lines of a byte stream, whatever the chunk boundaries.

    requests' ``iter_lines()`` yields a phantom empty line whenever a chunk ends on a
    line break, and an empty line ends an SSE event, so the splitting is done here.
    """
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode("utf-8", errors="replace")
    if pending:
        yield pending.removesuffix(b"\r").decode("utf-8", errors="replace")


def _decode_event_data(event: str, raw: str) -> JSON:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise GatewayError(f"malformed {event!r} event from the server: {raw[:80]!r}")
    return data


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, JSON]]:
    """(event name, JSON data) for each complete event; comments (pings) are skipped."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, _decode_event_data(event, "\n".join(data))
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)


class EventStream:
    """The events of one streamed answer; ``close()`` drops the connection, which makes
    the gateway cancel the generation upstream."""

    def __init__(self, response: requests.Response) -> None:
        self._response = response

    def __iter__(self) -> Iterator[tuple[str, JSON]]:
        try:
            yield from parse_sse(split_lines(self._response.iter_content(chunk_size=None)))
        except requests.RequestException as exc:
            raise GatewayError(f"the answer stream broke off: {exc}") from exc

    def close(self) -> None:
        self._response.close()


# --- HTTP -------------------------------------------------------------------------------


def error_detail(response: requests.Response) -> str:
    """The gateway's ``detail`` message, or the status line when the body has none."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if detail is None:
        return f"HTTP {response.status_code} {response.reason}: {response.text[:200]}"
    return detail if isinstance(detail, str) else json.dumps(detail)


def chat_payload(
    text: str,
    conversation_id: str,
    *,
    system_prompt: str | None = None,
    enable_tools: bool = False,
    stream: bool = False,
) -> JSON:
    """A /chat request carrying only the new user message (the server keeps history)."""
    payload: JSON = {
        "messages": [{"role": "user", "content": text}],
        "conversation_id": conversation_id,
        "enable_tools": enable_tools,
        "stream": stream,
    }
    if system_prompt is not None:
        payload["system_prompt"] = system_prompt
    return payload


class GatewayClient:
    """The gateway's HTTP API over one pooled ``requests.Session``."""

    def __init__(
        self, base_url: str, session: requests.Session | None = None, api_key: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._session = session or requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def request(
        self,
        method: str,
        path: str,
        *,
        body: JSON | None = None,
        params: dict[str, str] | None = None,
        read_timeout: float = QUICK_READ_TIMEOUT_S,
        stream: bool = False,
        accept: tuple[int, ...] = (),
    ) -> requests.Response:
        """Send a request; raise GatewayError with the server's detail on 4xx/5xx."""
        try:
            response = self._session.request(
                method,
                self.base_url + path,
                json=body,
                params=params,
                timeout=(CONNECT_TIMEOUT_S, read_timeout),
                stream=stream,
            )
        except requests.ConnectionError as exc:
            raise ServerUnavailable(
                f"No AI Lab server at {self.base_url}. Start it with `make run`."
            ) from exc
        except requests.RequestException as exc:
            raise GatewayError(f"{method} {path} failed: {exc}") from exc
        if response.status_code >= 400 and response.status_code not in accept:
            detail = error_detail(response)
            response.close()
            raise GatewayError(detail, response.status_code)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> JSON:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise GatewayError(f"{method} {path}: the server sent no JSON") from exc

    def health(self) -> JSON:
        """The /health body; 503 (loading) is an answer here, not an error."""
        return self._json("GET", "/health", accept=(503,))

    def wait_until_ready(
        self,
        timeout_s: float,
        on_status: Callable[[JSON], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> JSON:
        """Poll /health with exponential backoff until the status is ok."""
        deadline = clock() + timeout_s
        delay = 0.25
        while True:
            health = self.health()
            if health.get("status") == "ok":
                return health
            if on_status is not None:
                on_status(health)
            remaining = deadline - clock()
            if remaining <= 0:
                raise NotReady(
                    f"The AI Lab server at {self.base_url} is not ready after "
                    f"{timeout_s:g} s ({describe_health(health)})."
                )
            sleep(min(delay, remaining))
            delay = min(delay * 2, 4.0)

    def models(self) -> JSON:
        return self._json("GET", "/models")

    def switch_model(self, model_key: str) -> JSON:
        body = {"model_key": model_key}
        return self._json("POST", "/model/switch", body=body, read_timeout=SLOW_READ_TIMEOUT_S)

    def chat(self, payload: JSON) -> JSON:
        body = {**payload, "stream": False}
        return self._json("POST", "/chat", body=body, read_timeout=SLOW_READ_TIMEOUT_S)

    def chat_stream(self, payload: JSON) -> EventStream:
        body = {**payload, "stream": True}
        return self._stream("/chat", body)

    def approve(self, conversation_id: str, approval_id: str, approve: bool) -> JSON:
        body = self._approval(conversation_id, approval_id, approve, stream=False)
        return self._json("POST", "/chat/approve", body=body, read_timeout=SLOW_READ_TIMEOUT_S)

    def approve_stream(self, conversation_id: str, approval_id: str, approve: bool) -> EventStream:
        return self._stream(
            "/chat/approve", self._approval(conversation_id, approval_id, approve, stream=True)
        )

    @staticmethod
    def _approval(conversation_id: str, approval_id: str, approve: bool, stream: bool) -> JSON:
        return {
            "conversation_id": conversation_id,
            "approval_id": approval_id,
            "approve": approve,
            "stream": stream,
        }

    def _stream(self, path: str, body: JSON) -> EventStream:
        response = self.request(
            "POST", path, body=body, read_timeout=SLOW_READ_TIMEOUT_S, stream=True
        )
        return EventStream(response)

    def command(
        self, name: str, value: str | None = None, conversation_id: str = "default"
    ) -> JSON:
        body = {"command": name, "value": value, "conversation_id": conversation_id}
        return self._json("POST", "/command", body=body, read_timeout=SLOW_READ_TIMEOUT_S)

    def conversations(self) -> list[JSON]:
        return self._json("GET", "/conversations").get("conversations", [])

    def conversation(self, conversation_id: str) -> JSON:
        return self._json("GET", f"/conversations/{quote(conversation_id, safe='')}")

    def export(self, conversation_id: str | None, fmt: str, tools: bool = True) -> bytes:
        """One conversation's export, or every conversation's when the id is None."""
        path = (
            "/conversations/export"
            if conversation_id is None
            else f"/conversations/{quote(conversation_id, safe='')}/export"
        )
        params = {"format": fmt, "tools": "true" if tools else "false"}
        return self.request("GET", path, params=params, read_timeout=SLOW_READ_TIMEOUT_S).content


# --- Rendering helpers ---------------------------------------------------------------------


def describe_health(health: JSON) -> str:
    """One line: status, message and download progress of a /health body."""
    parts = [str(health.get("status") or "unknown")]
    if health.get("message"):
        parts.append(str(health["message"]))
    download = health.get("download")
    if isinstance(download, dict) and not download.get("done"):
        parts.append(
            f"downloading {download.get('filename') or 'model'}: "
            f"{download.get('percent') or 0:.0f}% "
            f"({format_size(download.get('downloaded_bytes'))} of "
            f"{format_size(download.get('total_bytes'))})"
        )
        if download.get("error"):
            parts.append(f"download error: {download['error']}")
    return " - ".join(parts)


def format_size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "?"
    size = float(size_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit in ("B", "KB") else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def as_json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def model_state(model: JSON) -> str:
    """The pool's state of a model as one short word (plus progress or the reason)."""
    state = str(model.get("state") or "unloaded")
    download = model.get("download")
    if state == "downloading" and isinstance(download, dict):
        return f"downloading {download.get('percent') or 0:.0f}%"
    if state == "failed":
        return f"failed: {shorten(str(model.get('message') or '?'), 60)}"
    if state == "unloaded" and not model.get("exists"):
        return "download on use" if model.get("hf_repo") else "no file"
    return state


def model_memory(model: JSON) -> str:
    """Measured memory of a loaded model, else the estimate (marked ~)."""
    if model.get("memory_measured_mb") is not None:
        return f"{model['memory_measured_mb']:.0f} MB"
    if model.get("memory_estimate_mb") is not None:
        return f"~{model['memory_estimate_mb']:.0f} MB"
    return ""


def models_table(listing: JSON) -> Table:
    budget = listing.get("memory_budget_mb")
    title = "Models (● default, ★ recommended"
    title += f"; memory budget {budget:.0f} MB)" if budget else ")"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("#", no_wrap=True, min_width=2, justify="right")
    table.add_column("key", no_wrap=True, min_width=14)
    table.add_column("name", ratio=1)
    for column in ("size", "state", "memory", "busy"):
        table.add_column(column, no_wrap=True, min_width=len(column))
    for number, model in enumerate(listing.get("models", []), start=1):
        marks = ("●" if model.get("current") else "") + ("★" if model.get("recommended") else "")
        name = model.get("name", "") + (" (fine-tuned)" if model.get("is_finetuned") else "")
        table.add_row(
            str(number),
            f"{model.get('key', '?')} {marks}".strip(),
            name,
            format_size(model.get("size_bytes")),
            model_state(model),
            model_memory(model),
            str(model.get("in_flight") or ""),
        )
    return table


def tool_call_panel(data: JSON) -> Panel:
    call = f"{data.get('name', '?')}({shorten(as_json_text(data.get('arguments', {})))})"
    return Panel(
        Text(call), title="tool call", title_align="left", border_style="cyan", expand=False
    )


def tool_result_panel(data: JSON) -> Panel:
    result = data.get("result")
    failed = isinstance(result, dict) and bool(result.get("error"))
    return Panel(
        Text(shorten(as_json_text(result), 300)),
        title=f"{data.get('name', 'tool')} result",
        title_align="left",
        border_style="red" if failed else "green",
        expand=False,
    )


def footer_text(done: JSON) -> Text:
    """tokens · tok/s · time · device, plus notes the user should know about."""
    parts = [
        f"{done.get('tokens_generated') or 0} tokens ({done.get('tokens_input') or 0} in)",
        f"{done.get('tokens_per_second') or 0:.1f} tok/s",
        f"{done.get('generation_time') or 0:.2f} s",
        str(done.get("device") or "?"),
    ]
    if done.get("tools_used"):
        parts.append("tools: " + ", ".join(done["tools_used"]))
    if done.get("tool_cap_hit"):
        parts.append("tool-call limit reached")
    if done.get("trimmed_messages"):
        parts.append(f"{done['trimmed_messages']} old messages trimmed to fit the context")
    return Text(" · ".join(parts), style="dim")


def export_format_for(path: Path) -> str:
    """The export format a file name asks for: .json, .jsonl, anything else text."""
    return {".json": "json", ".jsonl": "jsonl"}.get(path.suffix.lower(), "text")


def read_message(read_line: Callable[[str], str]) -> str:
    """One message from the prompt; raises EOFError/KeyboardInterrupt like input().

    A line ending in a backslash continues on the next line. A message that starts with
    three double quotes runs until a line that ends with three double quotes.
    """
    first = read_line(PROMPT)
    if first.lstrip().startswith(BLOCK_QUOTE):
        return _read_block(first.lstrip()[len(BLOCK_QUOTE) :], read_line)
    lines = []
    line = first
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read_line(CONTINUATION_PROMPT)
    lines.append(line)
    return "\n".join(lines)


def _read_block(rest: str, read_line: Callable[[str], str]) -> str:
    lines = []
    line = rest
    while not line.rstrip().endswith(BLOCK_QUOTE):
        lines.append(line)
        line = read_line(CONTINUATION_PROMPT)
    lines.append(line.rstrip()[: -len(BLOCK_QUOTE)])
    return "\n".join(lines).strip("\n")


def resolve_choice(choice: str, keys: list[str]) -> str | None:
    """The model key a picker answer names: a 1-based number or the key itself."""
    if choice.isdigit():
        return keys[int(choice) - 1] if 0 < int(choice) <= len(keys) else None
    return choice if choice in keys else None


def completions(buffer: str, model_keys: Callable[[], list[str]]) -> list[str]:
    """Tab completions for the line typed so far: command names, model keys after /model."""
    if buffer.startswith("/model "):
        typed = buffer[len("/model ") :]
        return [key for key in model_keys() if key.startswith(typed)]
    if buffer.startswith("/") and " " not in buffer:
        return [f"/{name}" for name in sorted(COMMANDS) if f"/{name}".startswith(buffer)]
    return []


# --- Streamed answers ---------------------------------------------------------------------


@dataclass
class TurnResult:
    """How one streamed request ended."""

    done: JSON | None = None
    approval: JSON | None = None
    error: str | None = None
    interrupted: bool = False


class StreamView:
    """An answer as it arrives: Markdown text segments with tool panels between them."""

    def __init__(self) -> None:
        self.blocks: list[str | Panel] = []

    def add_text(self, text: str) -> None:
        if self.blocks and isinstance(self.blocks[-1], str):
            self.blocks[-1] += text
        else:
            self.blocks.append(text)

    def add_panel(self, panel: Panel) -> None:
        self.blocks.append(panel)

    def has_text(self) -> bool:
        return any(isinstance(block, str) and block.strip() for block in self.blocks)

    def renderable(self) -> RenderableType:
        if not self.blocks:
            return Spinner("dots", Text("thinking…", style="dim"))
        return self.final_renderable()

    def final_renderable(self) -> RenderableType:
        return Group(*(Markdown(b) if isinstance(b, str) else b for b in self.blocks))


def apply_event(event: str, data: JSON, view: StreamView, result: TurnResult) -> None:
    """Fold one SSE event into the view and the result; unknown events are ignored so a
    newer gateway can add some."""
    if event == "delta":
        view.add_text(str(data.get("content") or ""))
    elif event == "tool_call":
        view.add_panel(tool_call_panel(data))
    elif event == "tool_result":
        view.add_panel(tool_result_panel(data))
    elif event == "approval_required":
        result.approval = data
    elif event == "error":
        result.error = str(data.get("error") or data)
    elif event == "done":
        result.done = data
        if not view.has_text() and data.get("response"):
            view.add_text(str(data["response"]))
        if result.approval is None and data.get("pending_approval"):
            result.approval = data["pending_approval"]


def _follow(stream: EventStream, live: Live, view: StreamView, result: TurnResult) -> None:
    last_update = 0.0
    for event, data in stream:
        apply_event(event, data, view, result)
        # Re-parsing the Markdown on every token would be wasted work.
        if time.monotonic() - last_update >= 1 / LIVE_UPDATES_PER_S:
            live.update(view.renderable())
            last_update = time.monotonic()


# --- The interactive UI ---------------------------------------------------------------------


CommandHandler = Callable[["ChatUI", str], None]


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    summary: str
    handler: CommandHandler


COMMANDS: dict[str, Command] = {}


def command(name: str, usage: str, summary: str) -> Callable[[CommandHandler], CommandHandler]:
    """Register a slash command; the handler gets the UI and the text after the name."""

    def register(handler: CommandHandler) -> CommandHandler:
        COMMANDS[name] = Command(name, usage, summary, handler)
        return handler

    return register


class ChatUI:
    """The terminal side: prompt, streamed rendering, approvals and slash commands."""

    def __init__(
        self,
        client: GatewayClient,
        console: Console | None = None,
        *,
        conversation_id: str = "default",
        system_prompt: str | None = None,
        enable_tools: bool = False,
        read_line: Callable[[str], str] = input,
        confirm: Callable[[str], bool] | None = None,
    ) -> None:
        self.client = client
        self.console = console or Console()
        self.conversation_id = conversation_id
        self.system_prompt = system_prompt
        self.enable_tools = enable_tools
        self.read_line = read_line
        self.confirm = confirm or (
            lambda question: Confirm.ask(question, console=self.console, default=False)
        )
        self.running = True
        self._model_keys: list[str] | None = None

    # Messages -----------------------------------------------------------------------------

    def hint(self, message: str) -> None:
        self.console.print(Text(message, style="yellow"))

    def error(self, message: str) -> None:
        self.console.print(Text.assemble(("Error: ", "bold red"), message))

    def say(self, message: str) -> None:
        self.console.print(Text(message))

    # Main loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Read and handle input until /quit, Ctrl-D or Ctrl-C at the prompt."""
        readline = self._setup_readline()
        try:
            while self.running:
                try:
                    line = read_message(self.read_line)
                except (EOFError, KeyboardInterrupt):
                    self.console.print()
                    break
                self.handle_line(line)
        finally:
            if readline is not None:
                _save_history(readline)
        return EXIT_OK

    def handle_line(self, line: str) -> None:
        """A message or a slash command; nothing that goes wrong here ends the client."""
        if not line.strip():
            return
        try:
            if line.startswith("/"):
                self.dispatch(line)
            else:
                self.ask(line)
        except GatewayError as exc:
            self.error(str(exc))
        except OSError as exc:
            self.error(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        except KeyboardInterrupt:
            self.hint("Interrupted.")
        except Exception as exc:  # a bug or odd server reply must not end the session
            self.error(f"unexpected {type(exc).__name__}: {exc}")

    def dispatch(self, line: str) -> None:
        name, _, arg = line.strip().partition(" ")
        entry = COMMANDS.get(name[1:].lower())
        if entry is None:
            close = difflib.get_close_matches(name[1:].lower(), COMMANDS, n=1)
            suggestion = f" Did you mean /{close[0]}?" if close else ""
            self.hint(f"Unknown command {name}.{suggestion} /help lists the commands.")
            return
        try:
            entry.handler(self, arg.strip())
        except UsageError as exc:
            self.hint(f"{exc} Usage: {entry.usage}")

    # Chat -----------------------------------------------------------------------------------

    def ask(self, text: str) -> None:
        payload = chat_payload(
            text,
            self.conversation_id,
            system_prompt=self.system_prompt,
            enable_tools=self.enable_tools,
            stream=True,
        )
        self.run_turns(functools.partial(self.client.chat_stream, payload))

    def run_turns(self, open_stream: Callable[[], EventStream]) -> None:
        """Render streamed answers, asking about each tool call that needs approval."""
        while True:
            result = self.render_stream(open_stream)
            if result.approval is None or result.interrupted or result.error:
                return
            approved = self.ask_approval(result.approval)
            open_stream = functools.partial(
                self.client.approve_stream,
                self.conversation_id,
                str(result.approval.get("approval_id")),
                approved,
            )

    def render_stream(self, open_stream: Callable[[], EventStream]) -> TurnResult:
        """Show one streamed answer live; Ctrl-C closes the stream and keeps the client."""
        view, result = StreamView(), TurnResult()
        stream: EventStream | None = None
        try:
            with Live(
                view.renderable(),
                console=self.console,
                refresh_per_second=LIVE_UPDATES_PER_S,
                vertical_overflow="visible",
            ) as live:
                try:
                    stream = open_stream()
                    _follow(stream, live, view, result)
                finally:
                    # Whatever happened, the spinner must not stay on the screen.
                    live.update(view.final_renderable(), refresh=True)
        except KeyboardInterrupt:
            result.interrupted = True
        finally:
            if stream is not None:
                stream.close()
        self._report_turn(result)
        return result

    def _report_turn(self, result: TurnResult) -> None:
        if result.interrupted:
            self.hint("Stopped.")
        elif result.error:
            self.error(result.error)
        elif result.approval is None and result.done is not None:
            self.console.print(footer_text(result.done))
        elif result.approval is None:
            self.error("the answer stream ended without a 'done' event")

    def ask_approval(self, approval: JSON) -> bool:
        """Show the exact tool call and ask; Ctrl-C or Ctrl-D at the question means no."""
        arguments = json.dumps(approval.get("arguments", {}), indent=2, ensure_ascii=False)
        body = Text.assemble(
            ("tool: ", "bold"),
            str(approval.get("tool", "?")),
            "\n",
            ("what: ", "bold"),
            str(approval.get("description") or ""),
            "\n",
            ("arguments:\n", "bold"),
            arguments,
        )
        self.console.print(Panel(body, title="approval needed", border_style="magenta"))
        try:
            return bool(self.confirm("Run this tool call?"))
        except (KeyboardInterrupt, EOFError):
            self.console.print()
            return False

    # Server state ---------------------------------------------------------------------------

    def wait_for_server(self, timeout_s: float) -> JSON:
        with self.console.status("Connecting to AI Lab…") as status:
            return self.client.wait_until_ready(
                timeout_s,
                on_status=lambda health: status.update(f"Server: {describe_health(health)}"),
            )

    def model_keys(self) -> list[str]:
        """Model keys for completion, fetched once; empty when the server can't say."""
        if self._model_keys is None:
            try:
                self._model_keys = [m["key"] for m in self.client.models().get("models", [])]
            except GatewayError:
                return []
        return self._model_keys

    def show_models(self) -> JSON:
        listing = self.client.models()
        self._model_keys = [m.get("key", "") for m in listing.get("models", [])]
        self.console.print(models_table(listing))
        return listing

    def pick_model(self) -> None:
        """Show the models and switch to the one chosen by number or key."""
        listing = self.show_models()
        keys = self.model_keys()
        while True:
            try:
                choice = self.read_line("Model number or key (Enter keeps current): ").strip()
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return
            if not choice:
                return
            key = resolve_choice(choice, keys)
            if key is not None:
                break
            self.hint(f"No model {choice!r}; type a number from 1 to {len(keys)} or a key.")
        if key != listing.get("current"):
            self.switch_model(key)

    def switch_model(self, key: str) -> None:
        """Switch with a spinner that shows what the server reports (e.g. download %)."""
        outcome: JSON = {}

        def work() -> None:
            # A separate client: requests sessions are not meant to be shared by threads.
            try:
                outcome["result"] = GatewayClient(
                    self.client.base_url, api_key=self.client.api_key
                ).switch_model(key)
            except GatewayError as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            with self.console.status(f"Switching to {key}…") as status:
                while worker.is_alive():
                    worker.join(timeout=1.0)
                    if worker.is_alive():
                        status.update(self._switch_status(key))
        except KeyboardInterrupt:
            self.hint("The server finishes the switch on its own; /models shows when.")
            return
        self._model_keys = None
        if "error" in outcome:
            raise outcome["error"]
        result = outcome["result"]
        self.say(result.get("message") or f"Now using {key} ({result.get('load_time_s')} s).")

    def _switch_status(self, key: str) -> str:
        try:
            return f"Switching to {key}… {describe_health(self.client.health())}"
        except GatewayError:
            return f"Switching to {key}…"

    def run_command(self, name: str, value: str | None = None, busy: str | None = None) -> JSON:
        """POST /command and print its message; ``busy`` shows a spinner meanwhile."""
        if busy:
            with self.console.status(busy):
                result = self.client.command(name, value, self.conversation_id)
        else:
            result = self.client.command(name, value, self.conversation_id)
        message = result.get("message")
        self.say(str(message if message is not None else as_json_text(result.get("value"))))
        return result

    def _setup_readline(self) -> Any:
        """Line editing, history and tab completion; None where readline is missing."""
        try:
            # Imported here: absent on Windows, and importing it changes input() everywhere.
            import readline
        except ImportError:
            return None
        with contextlib.suppress(OSError):
            readline.read_history_file(os.path.expanduser(HISTORY_FILE))
        readline.set_history_length(2000)
        readline.set_completer_delims(" \t\n")
        readline.set_completer(functools.partial(_complete, self, readline))
        if "libedit" in (readline.__doc__ or ""):
            readline.parse_and_bind("bind ^I rl_complete")
        else:
            readline.parse_and_bind("tab: complete")
        return readline


def _complete(ui: ChatUI, readline: Any, text: str, state: int) -> str | None:
    options = completions(readline.get_line_buffer(), ui.model_keys)
    return options[state] if state < len(options) else None


def _save_history(readline: Any) -> None:
    with contextlib.suppress(OSError):
        readline.write_history_file(os.path.expanduser(HISTORY_FILE))


# --- Slash commands -----------------------------------------------------------------------


def _int_argument(text: str, minimum: int, what: str) -> str:
    try:
        number = int(text)
    except ValueError:
        raise UsageError(f"{what} must be a whole number, not {text!r}.") from None
    if number < minimum:
        raise UsageError(f"{what} must be at least {minimum}.")
    return str(number)


def _no_argument(arg: str) -> None:
    if arg:
        raise UsageError("This command takes no argument.")


@command("help", "/help", "list the commands")
def _cmd_help(ui: ChatUI, arg: str) -> None:
    table = Table(show_header=False, box=None, padding=(0, 2))
    for entry in COMMANDS.values():
        table.add_row(entry.usage, entry.summary)
    ui.console.print(table)
    ui.say(
        'Multi-line: end a line with \\ to continue it, or start with """ and end with """. '
        "Ctrl-C stops an answer; Ctrl-D or Ctrl-C at the prompt quits."
    )


@command("models", "/models", "list the models, their state and memory (● default, ★ recommended)")
def _cmd_models(ui: ChatUI, arg: str) -> None:
    _no_argument(arg)
    ui.show_models()


@command("model", "/model [KEY]", "show the current model, or switch to KEY")
def _cmd_model(ui: ChatUI, arg: str) -> None:
    if not arg:
        ui.run_command("model")
    elif " " in arg:
        raise UsageError("Give one model key; /models lists them.")
    else:
        ui.switch_model(arg)


@command("system", "/system [TEXT]", "show or set the default system prompt")
def _cmd_system(ui: ChatUI, arg: str) -> None:
    ui.run_command("system", arg or None)


@command("layers", "/layers [N]", "GPU layers: -1 all, 0 CPU only, N hybrid (restarts)")
def _cmd_layers(ui: ChatUI, arg: str) -> None:
    if not arg:
        ui.run_command("layers")
        return
    value = _int_argument(arg, -1, "The number of GPU layers")
    ui.run_command("layers", value, busy="Restarting llama-server…")


@command("ctx", "/ctx [N]", "show or set the context size in tokens (restarts)")
def _cmd_ctx(ui: ChatUI, arg: str) -> None:
    if not arg:
        ui.run_command("ctx")
        return
    value = _int_argument(arg, 1, "The context size")
    ui.run_command("ctx", value, busy="Restarting llama-server…")


@command("mem", "/mem", "memory used by the gateway, llama-server and the GPU")
def _cmd_mem(ui: ChatUI, arg: str) -> None:
    _no_argument(arg)
    ui.run_command("mem")


@command("tools", "/tools [on|off]", "show or switch tool use (server and this chat)")
def _cmd_tools(ui: ChatUI, arg: str) -> None:
    choice = arg.lower()
    if choice not in ("", "on", "off"):
        raise UsageError(f"Say on or off, not {arg!r}.")
    ui.run_command("tools", choice or None)
    if choice:
        ui.enable_tools = choice == "on"
    ui.say(f"Tools in this chat's requests: {'on' if ui.enable_tools else 'off'}.")


@command("mcp", "/mcp [reload]", "MCP servers with their state and tools; reload restarts them")
def _cmd_mcp(ui: ChatUI, arg: str) -> None:
    choice = arg.lower()
    if choice not in ("", "reload"):
        raise UsageError(f"Say reload, or nothing, not {arg!r}.")
    busy = "Restarting the MCP servers…" if choice else None
    ui.run_command("mcp", choice or None, busy=busy)


@command("clear", "/clear", "start this conversation afresh")
def _cmd_clear(ui: ChatUI, arg: str) -> None:
    _no_argument(arg)
    ui.run_command("reset")


@command("history", "/history", "this conversation's messages and token count")
def _cmd_history(ui: ChatUI, arg: str) -> None:
    _no_argument(arg)
    ui.run_command("history")
    try:
        messages = ui.client.conversation(ui.conversation_id).get("messages", [])
    except GatewayError as exc:
        if exc.status == 404:
            return
        raise
    for message in messages:
        content = " ".join(str(message.get("content") or "").split())
        line = Text.assemble((f"{message.get('role', '?'):>9}: ", "bold"), shorten(content, 100))
        ui.console.print(line)


@command("conversation", "/conversation [ID]", "switch to conversation ID, or list them")
def _cmd_conversation(ui: ChatUI, arg: str) -> None:
    if not arg:
        _show_conversations(ui)
        return
    if any(ch.isspace() for ch in arg):
        raise UsageError("A conversation id has no spaces.")
    ui.conversation_id = arg
    ui.say(f"Now in conversation {arg!r}.")


def _show_conversations(ui: ChatUI) -> None:
    table = Table(title="Conversations", title_justify="left")
    for column in ("", "id", "title", "messages", "updated"):
        table.add_column(column)
    for conv in ui.client.conversations():
        marker = "●" if conv.get("id") == ui.conversation_id else ""
        table.add_row(
            marker,
            str(conv.get("id")),
            shorten(str(conv.get("title") or ""), 50),
            str(conv.get("message_count", "")),
            str(conv.get("updated_at") or ""),
        )
    ui.console.print(table)


def _split_arguments(arg: str) -> list[str]:
    try:
        return shlex.split(arg)
    except ValueError as exc:
        raise UsageError(f"Cannot read the arguments: {exc}.") from None


def _write_export(ui: ChatUI, path: Path, body: bytes, what: str) -> None:
    path.write_bytes(body)
    ui.say(f"Wrote {what} to {path} ({format_size(len(body))}).")


@command("export", "/export FILE", "save this conversation: FILE.json, FILE.jsonl or text")
def _cmd_export(ui: ChatUI, arg: str) -> None:
    words = _split_arguments(arg)
    if len(words) != 1:
        raise UsageError("Give one file name.")
    path = Path(words[0]).expanduser()
    fmt = export_format_for(path)
    body = ui.client.export(ui.conversation_id, fmt)
    _write_export(ui, path, body, f"conversation {ui.conversation_id!r} as {fmt}")


@command("export-ft", "/export-ft FILE [--no-tools]", "save all conversations as fine-tuning JSONL")
def _cmd_export_ft(ui: ChatUI, arg: str) -> None:
    words = _split_arguments(arg)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    if any(flag != "--no-tools" for flag in flags) or len(paths) != 1:
        raise UsageError("Give one file name, optionally --no-tools.")
    path = Path(paths[0]).expanduser()
    body = ui.client.export(None, "jsonl", tools="--no-tools" not in flags)
    examples = sum(1 for line in body.splitlines() if line.strip())
    _write_export(ui, path, body, f"{examples} training examples")


@command(
    "bench",
    "/bench [KEYS]",
    "measure generation speed (the current model, or each of the KEYS given)",
)
def _cmd_bench(ui: ChatUI, arg: str) -> None:
    keys = ",".join(k for k in re.split(r"[,\s]+", arg) if k) or None
    ui.run_command("bench", keys, busy="Benchmarking (each model is loaded in turn)…")


@command(
    "finetune",
    "/finetune [cancel | name=NAME match=GLOB|ids=A,B|jsonl=FILE [epochs=N lr=X base=KEY]]",
    "fine-tune a model on conversations; alone, show the running fine-tune's progress",
)
def _cmd_finetune(ui: ChatUI, arg: str) -> None:
    word = arg.strip()
    if word.lower() in ("", "status"):
        ui.run_command("finetune")
    elif word.lower() == "cancel":
        ui.run_command("finetune", "cancel", busy="Cancelling the fine-tune…")
    elif "=" in word or word.startswith("{"):
        ui.run_command("finetune", word)
    else:
        raise UsageError("Say cancel, or give key=value settings such as name=mybot match='*'.")


@command("quit", "/quit", "leave (Ctrl-D does too)")
def _cmd_quit(ui: ChatUI, arg: str) -> None:
    _no_argument(arg)
    ui.running = False


# --- Entry points -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ailab-chat",
        description="Chat with the AI Lab gateway. Without -m it opens an interactive chat.",
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("AILAB_SERVER") or DEFAULT_SERVER,
        help="gateway URL (default: $AILAB_SERVER or %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("AILAB_API_KEY"),
        help="the gateway's API key (default: $AILAB_API_KEY, which unlike this option "
        "is not visible to other users in `ps`)",
    )
    parser.add_argument("-m", "--message", help="ask one question, print the answer, exit")
    parser.add_argument("--json", action="store_true", help="with -m: print the whole response")
    parser.add_argument("--conversation", default="default", help="conversation id")
    parser.add_argument("--system", help="system prompt for this client's requests")
    parser.add_argument("--tools", action="store_true", help="let the model use tools")
    parser.add_argument("--model", help="model key to use (switches if needed)")
    parser.add_argument("--no-picker", action="store_true", help="skip the model picker")
    parser.add_argument(
        "--wait", type=float, default=120.0, help="seconds to wait for a loading server"
    )
    return parser


def _approve_without_ui(pending: JSON) -> bool:
    """Scripting mode asks on a terminal; with no one to ask, the call is denied."""
    description = f"{pending.get('tool')} {as_json_text(pending.get('arguments', {}))}"
    if sys.stdin.isatty():
        console = Console(stderr=True)
        console.print(Text(f"Approval needed: {description}\n{pending.get('description', '')}"))
        return Confirm.ask("Run this tool call?", console=console, default=False)
    print(f"Denied tool call {description}: no terminal to ask.", file=sys.stderr)
    return False


def run_once(client: GatewayClient, args: argparse.Namespace) -> int:
    """Scripting mode: one question, the answer (or the JSON) on stdout."""
    client.wait_until_ready(args.wait)
    if args.model and args.model != client.models().get("current"):
        client.switch_model(args.model)
    payload = chat_payload(
        args.message, args.conversation, system_prompt=args.system, enable_tools=args.tools
    )
    response = client.chat(payload)
    while pending := response.get("pending_approval"):
        approved = _approve_without_ui(pending)
        response = client.approve(args.conversation, str(pending.get("approval_id")), approved)
    if args.json:
        print(json.dumps(response, indent=2, ensure_ascii=False))
    else:
        print(response.get("response", ""))
    return EXIT_OK


def run_interactive(client: GatewayClient, args: argparse.Namespace) -> int:
    console = Console()
    ui = ChatUI(
        client,
        console,
        conversation_id=args.conversation,
        system_prompt=args.system,
        enable_tools=args.tools,
    )
    health = ui.wait_for_server(args.wait)
    try:
        if args.model and args.model != health.get("model_key"):
            ui.switch_model(args.model)
        elif not args.model and not args.no_picker:
            ui.pick_model()
        health = client.health()
    except GatewayError as exc:
        ui.error(str(exc))
    console.print(
        Text.assemble(
            ("AI Lab", "bold"),
            f" at {client.base_url}: {health.get('model_key')} on {health.get('device')}. "
            '/help lists commands; """ starts a multi-line message; Ctrl-D quits.',
        )
    )
    return ui.run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json and args.message is None:
        build_parser().error("--json needs -m/--message")
    client = GatewayClient(args.server, api_key=args.api_key)
    try:
        return run_once(client, args) if args.message is not None else run_interactive(client, args)
    except ServerUnavailable as exc:
        print(exc, file=sys.stderr)
        return EXIT_NO_SERVER
    except NotReady as exc:
        print(exc, file=sys.stderr)
        return EXIT_NOT_READY
    except GatewayError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
