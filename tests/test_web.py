"""The web page in a real browser: Debian's chromium driven by Playwright, against real
gateways with the real llama-server and models. Nothing in the page is mocked."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import GatewayProcess, free_port, llama_server_busy
from playwright.sync_api import Browser, Page, expect, sync_playwright

# A turn with tools sends every tool's schema (over 2000 tokens of prompt): minutes on a
# busy 2-core machine. Generous bounds, never assertions on time.
TURN_TIMEOUT_MS = 400_000
pytestmark = pytest.mark.timeout(900)
# Every payload logs "xss-..." if it ever runs: a console listener sees it.
XSS_MARK = "xss-ran"


@pytest.fixture(scope="module")  # its event loop must end before other modules' asyncio.run
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium)
        yield launched
        launched.close()


class Watched:
    """A page with everything it said recorded: console lines, page errors, dialogs."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console: list[str] = []
        self.console_errors: list[str] = []  # CSP and Trusted Types violations land here
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("dialog", self._dialog)

    def _console(self, message) -> None:  # type: ignore[no-untyped-def]
        self.console.append(message.text)
        if message.type == "error":
            self.console_errors.append(message.text)

    def _dialog(self, dialog) -> None:  # type: ignore[no-untyped-def]
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def ran_nothing(self) -> None:
        assert self.dialogs == []
        assert [line for line in self.console if XSS_MARK in line] == []
        assert self.errors == []


@contextlib.contextmanager
def open_page(browser: Browser, url: str, **options: object) -> Iterator[Watched]:
    context = browser.new_context(accept_downloads=True, **options)  # type: ignore[arg-type]
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        watched = Watched(page)
        page.goto(url)
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        yield watched
    finally:
        context.close()


def set_options(
    page: Page, max_tokens: int = 24, temperature: float = 0, tool: str | None = None
) -> None:
    """The composer's options; a named tool forces that tool call."""
    if not page.locator("#options").evaluate("details => details.open"):
        page.click("#options summary")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))
    if tool:
        page.check("#use-tools")
        page.select_option("#tool-choice", "named")
        page.fill("#tool-name", tool)


def send(page: Page, text: str, max_tokens: int = 24, tool: str | None = None) -> None:
    set_options(page, max_tokens, tool=tool)
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_turn(page: Page) -> None:
    expect(page.locator("#send")).to_be_enabled(timeout=TURN_TIMEOUT_MS)


def wait_tool_result(page: Page, status: str) -> None:
    """Wait for the tool call's result, then stop the turn: the model's answer after it is
    not what these tests look at (the model may even call again). Stop is tested on its
    own."""
    panel = page.locator("details.tool").first
    expect(panel.locator(".tool-status")).to_have_text(status, timeout=TURN_TIMEOUT_MS)
    page.evaluate("document.getElementById('stop').click()")  # a no-op if already done
    wait_turn(page)


def history(server: GatewayProcess, conversation: str) -> list[dict]:
    reply = requests.get(f"{server.url}/conversations/{conversation}", timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()["messages"]


def current_conversation(page: Page) -> str:
    return page.locator(".conversation[aria-current]").get_attribute("data-id") or ""


def store_turns(server: GatewayProcess, conversation: str, turns: list[dict]) -> None:
    """Store messages as a client resending a history does (the model answers a last,
    short user message)."""
    body = {
        "conversation_id": conversation,
        "messages": [*turns, {"role": "user", "content": "Thanks."}],
        "max_tokens": 8,
    }
    reply = requests.post(f"{server.url}/chat", json=body, timeout=120)
    assert reply.status_code == 200, reply.text


def open_conversation(page: Page, conversation: str) -> None:
    page.locator(f'.conversation[data-id="{conversation}"]').click()
    expect(page.locator(".conversation[aria-current]")).to_have_attribute("data-id", conversation)


# --- the page itself ---------------------------------------------------------------------


def test_the_page_is_served_with_a_strict_content_security_policy(
    gateway: GatewayProcess,
) -> None:
    page = requests.get(f"{gateway.url}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for rule in ("default-src 'self'", "script-src 'self'", "style-src 'self'"):
        assert rule in policy
    assert "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    scripts = re.findall(r"<script\b[^>]*>", page.text)
    assert scripts and all("src=" in tag for tag in scripts)
    assert "<style" not in page.text and "style=" not in page.text
    script = requests.get(f"{gateway.url}/web/app.js", timeout=10)
    assert script.headers["content-type"].startswith("text/javascript")
    for path in ("/web/__init__.py", "/web/vendor/marked/LICENSE", "/web/%2e%2e/storage.py"):
        assert requests.get(f"{gateway.url}{path}", timeout=10).status_code == 404


def test_every_control_has_a_label_and_is_reached_with_the_keyboard(
    browser: Browser, gateway: GatewayProcess
) -> None:
    with open_page(browser, gateway.url) as watched:
        page = watched.page
        unnamed = page.evaluate(
            """() => [...document.querySelectorAll('button, input, select, textarea')]
                .filter((el) => !(el.labels?.length || el.getAttribute('aria-label')
                                  || (el.tagName === 'BUTTON' && el.textContent.trim())))
                .map((el) => el.outerHTML)"""
        )
        assert unnamed == []
        for _ in range(60):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "prompt":
                break
        assert page.evaluate("document.activeElement.id") == "prompt"
        assert watched.console_errors == []
        watched.ran_nothing()


def test_at_phone_width_the_conversations_open_from_a_button(
    browser: Browser, gateway: GatewayProcess
) -> None:
    with open_page(browser, gateway.url, viewport={"width": 390, "height": 844}) as watched:
        page = watched.page
        expect(page.locator("#sidebar")).to_be_hidden()
        expect(page.locator("#prompt")).to_be_visible()
        page.click("#toggle-sidebar")
        expect(page.locator("#new-conversation")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


# --- chat --------------------------------------------------------------------------------

# Every text the first answer shows before it is done: a streamed answer shows several.
RECORD_ANSWER_TEXTS = """() => {
    window.seen = new Set();
    const record = () => {
        const body = document.querySelector('.msg.assistant .body');
        if (body && !document.querySelector('.turn-stats')) window.seen.add(body.textContent);
    };
    new MutationObserver(record).observe(
        document.getElementById('messages'),
        {subtree: true, childList: true, characterData: true},
    );
}"""


def test_a_message_streams_in_and_is_stored(browser: Browser, gateway: GatewayProcess) -> None:
    with open_page(browser, gateway.url) as watched:
        page = watched.page
        # Record every text the answer shows before it is done: a stream shows several.
        page.evaluate(RECORD_ANSWER_TEXTS)
        set_options(page, max_tokens=48)
        page.fill("#prompt", "Tell me about the sea")
        page.press("#prompt", "Shift+Enter")
        page.keyboard.type("in two sentences.")
        page.press("#prompt", "Enter")
        wait_turn(page)
        expect(page.locator(".turn-stats")).to_contain_text("tokens")
        assert page.evaluate("window.seen.size") >= 2
        shown = page.locator(".msg.assistant .body").inner_text()
        stored = history(gateway, current_conversation(page))
        assert [m["role"] for m in stored] == ["user", "assistant"]
        assert stored[0]["content"] == "Tell me about the sea\nin two sentences."
        for word in re.findall(r"\w+", shown):
            assert word in stored[1]["content"]
        watched.ran_nothing()


def test_stop_ends_the_answer_and_llama_server_stops_generating(
    browser: Browser, gateway: GatewayProcess
) -> None:
    with open_page(browser, gateway.url) as watched:
        page = watched.page
        send(page, "Count from 1 to 3000, one number per line.", max_tokens=3000)
        expect(page.locator(".msg.assistant .body")).not_to_be_empty(timeout=TURN_TIMEOUT_MS)
        page.click("#stop")
        expect(page.locator(".notice", has_text="Stopped")).to_be_visible()
        expect(page.locator("#send")).to_be_enabled()
        assert page.locator(".turn-stats").count() == 0  # the answer never finished
        deadline = time.monotonic() + 30
        while llama_server_busy(gateway):
            assert time.monotonic() < deadline, "llama-server kept generating after Stop"
            time.sleep(0.2)
        stored = history(gateway, current_conversation(page))
        assert stored[0]["role"] == "user"
        assert stored[-1]["role"] == "assistant" and stored[-1]["content"]
        watched.ran_nothing()


def test_regenerate_replaces_the_last_answer(browser: Browser, gateway: GatewayProcess) -> None:
    with open_page(browser, gateway.url) as watched:
        page = watched.page
        send(page, "Name a colour.", max_tokens=12)
        wait_turn(page)
        conversation = current_conversation(page)
        with page.expect_request(re.compile(r"/regenerate$")):
            page.click("#regenerate")
        wait_turn(page)
        expect(page.locator("#notice")).to_be_hidden()
        expect(page.locator(".turn-stats")).to_have_count(1)  # the new answer's, streamed
        expect(page.locator(".msg.assistant")).to_have_count(1)
        assert [m["role"] for m in history(gateway, conversation)] == ["user", "assistant"]
        watched.ran_nothing()


def test_stored_markdown_shows_highlighted_code_with_a_copy_button(
    browser: Browser, gateway: GatewayProcess
) -> None:
    answer = "Here:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\n- **bold** item"
    store_turns(
        gateway,
        "web-markdown",
        [{"role": "user", "content": "Add two numbers"}, {"role": "assistant", "content": answer}],
    )
    permissions = ["clipboard-read", "clipboard-write"]
    with open_page(browser, gateway.url, permissions=permissions) as watched:
        page = watched.page
        open_conversation(page, "web-markdown")
        first = page.locator(".msg.assistant").first
        expect(first.locator("strong")).to_have_text("bold")
        expect(first.locator("code.hljs .hljs-keyword").first).to_have_text("def")
        first.get_by_role("button", name="Copy code").click()
        copied = page.evaluate("navigator.clipboard.readText()")
        assert copied == "def add(a, b):\n    return a + b\n"
        assert watched.console_errors == []
        watched.ran_nothing()


# --- conversations -----------------------------------------------------------------------


def test_conversations_are_searched_renamed_and_deleted_after_confirmation(
    browser: Browser, gateway: GatewayProcess
) -> None:
    store_turns(gateway, "web-alpha", [{"role": "user", "content": "Tell me about zebras"}])
    store_turns(gateway, "web-beta", [{"role": "user", "content": "Hello"}])
    with open_page(browser, gateway.url) as watched:
        page = watched.page
        page.fill("#search", "zebra")
        expect(page.locator(".conversation")).to_have_count(1)
        open_conversation(page, "web-alpha")
        page.click("#rename")
        page.fill("#rename-title", "Stripes")
        page.click("#rename-dialog button[type=submit]")
        expect(page.locator(".conversation .title")).to_have_text(["Stripes"])
        titles = {
            c["id"]: c["title"]
            for c in requests.get(f"{gateway.url}/conversations").json()["conversations"]
        }
        assert titles["web-alpha"] == "Stripes"
        page.click("#delete")
        page.keyboard.press("Escape")
        assert requests.get(f"{gateway.url}/conversations/web-alpha").status_code == 200
        page.click("#delete")
        page.click("#delete-dialog button[type=submit]")
        expect(page.locator(".conversation")).to_have_count(0)
        assert requests.get(f"{gateway.url}/conversations/web-alpha").status_code == 404
        assert requests.get(f"{gateway.url}/conversations/web-beta").status_code == 200
        watched.ran_nothing()


def test_a_new_conversation_sends_its_system_prompt(
    browser: Browser, gateway: GatewayProcess
) -> None:
    with open_page(browser, gateway.url) as watched:
        page = watched.page
        page.click("#new-conversation")
        page.fill("#new-system", "Answer like a pirate.")
        page.click("#new-dialog button[type=submit]")
        with page.expect_request(re.compile(r"/chat$")) as sent:
            send(page, "Hello")
        wait_turn(page)
        assert json.loads(sent.value.post_data or "{}")["system_prompt"] == "Answer like a pirate."
        assert [m["role"] for m in history(gateway, current_conversation(page))][-1] == "assistant"
        watched.ran_nothing()


def test_export_downloads_valid_jsonl(browser: Browser, gateway: GatewayProcess) -> None:
    store_turns(
        gateway,
        "web-export",
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    )
    with open_page(browser, gateway.url) as watched:
        page = watched.page
        open_conversation(page, "web-export")
        with page.expect_download() as one:
            page.click("#export-one")
        lines = Path(one.value.path()).read_text().splitlines()
        assert len(lines) == 1
        roles = [m["role"] for m in json.loads(lines[0])["messages"]]
        assert roles[:3] == ["system", "user", "assistant"]
        with page.expect_download() as every:
            page.click("#export-all")
        records = [json.loads(line) for line in Path(every.value.path()).read_text().splitlines()]
        assert len(records) >= 2 and all(r["messages"] for r in records)
        watched.ran_nothing()


# --- tools and approvals -----------------------------------------------------------------


def test_a_forced_tool_call_is_shown_in_a_panel_and_in_the_audit_log(
    browser: Browser, gateway: GatewayProcess
) -> None:
    workspace = gateway.data_dir / "workspace"
    with open_page(browser, gateway.url) as watched:
        page = watched.page
        send(page, "Which folder are you in?", tool="get_current_directory")
        wait_tool_result(page, "ok")
        panel = page.locator("details.tool", has_text="get_current_directory")
        panel.locator("summary").click()
        expect(panel.locator(".tool-result")).to_contain_text(str(workspace))
        page.click("#open-audit")
        page.check("#audit-this")
        expect(page.locator("#audit-table tbody tr").first).to_contain_text("get_current_directory")
        watched.ran_nothing()


@pytest.fixture(scope="module")
def gemma_gateway(
    llama_server_binary: Path, real_models: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """Gemma 3 at temperature 0 copies a file name into a forced call's arguments reliably;
    SmolLM2 invents paths."""
    data_dir = tmp_path_factory.mktemp("gemma-gateway")
    workspace = data_dir / "workspace"
    workspace.mkdir()
    env = {"AILAB_TOOL_ROOTS": str(workspace), "AILAB_DEFAULT_MODEL": "gemma3-270m"}
    server = GatewayProcess(llama_server_binary, data_dir, env)
    server.start()
    yield server
    server.stop()


def ask_to_delete(page: Page, name: str) -> None:
    send(page, f'Call delete_file with path "{name}".', max_tokens=48, tool="delete_file")
    approval = page.locator("section.approval")
    expect(approval).to_contain_text("delete_file", timeout=TURN_TIMEOUT_MS)
    expect(approval.locator(".tool-args")).to_contain_text(name)


def test_an_approved_delete_removes_the_file(
    browser: Browser, gemma_gateway: GatewayProcess
) -> None:
    target = gemma_gateway.data_dir / "workspace" / "approve-me.txt"
    target.write_text("bye")
    with open_page(browser, gemma_gateway.url) as watched:
        page = watched.page
        ask_to_delete(page, target.name)
        assert target.exists()  # nothing runs before the decision
        page.locator("section.approval").get_by_role("button", name="Approve").click()
        wait_tool_result(page, "ok")
        assert not target.exists()
        watched.ran_nothing()


def test_a_declined_delete_leaves_the_file(browser: Browser, gemma_gateway: GatewayProcess) -> None:
    target = gemma_gateway.data_dir / "workspace" / "keep-me.txt"
    target.write_text("stay")
    with open_page(browser, gemma_gateway.url) as watched:
        page = watched.page
        ask_to_delete(page, target.name)
        page.locator("section.approval").get_by_role("button", name="Decline").click()
        wait_tool_result(page, "error")
        expect(page.locator("details.tool .tool-result").first).to_contain_text("declined")
        assert target.read_text() == "stay"
        watched.ran_nothing()


# --- safety ------------------------------------------------------------------------------

PAYLOADS = [
    f"<img src=x onerror=\"console.log('{XSS_MARK}-img')\">",
    f"<script>console.log('{XSS_MARK}-script')</script>",
    f"[click me](javascript:console.log('{XSS_MARK}-link'))",
    f"<a href=\"javascript:console.log('{XSS_MARK}-a')\">and me</a>",
    f"<svg><animate onbegin=\"console.log('{XSS_MARK}-svg')\"/></svg>",
    f"<iframe srcdoc=\"<script>parent.console.log('{XSS_MARK}-frame')</script>\"></iframe>",
    f"<details open ontoggle=\"console.log('{XSS_MARK}-toggle')\">x</details>",
    f"<form action=\"javascript:console.log('{XSS_MARK}-form')\"><button>Go</button></form>",
]
INERT_DOM = """() => {
    const nodes = [...document.querySelectorAll('#messages *')];
    return nodes.filter((el) => [...el.attributes].some((a) =>
            a.name.startsWith('on') || /^\\s*javascript:/i.test(a.value))
        || ['SCRIPT', 'IFRAME', 'FORM', 'IMG'].includes(el.tagName)).map((el) => el.outerHTML);
}"""


def test_script_in_a_stored_answer_runs_nothing(browser: Browser, gateway: GatewayProcess) -> None:
    store_turns(
        gateway,
        "web-xss",
        [
            {"role": "user", "content": "Show me HTML"},
            {"role": "assistant", "content": "\n\n".join(PAYLOADS)},
        ],
    )
    with open_page(browser, gateway.url) as watched:
        page = watched.page
        open_conversation(page, "web-xss")
        expect(page.locator(".msg.assistant").first).to_contain_text("click me")
        for link in page.locator(".msg.assistant a").all():
            link.click()
        assert page.evaluate(INERT_DOM) == []
        # No console_errors check here: Chromium reports a CSP violation for a handler in
        # DOMPurify's inert parsing document, though it would not run there even without one.
        watched.ran_nothing()


def test_script_in_a_tool_result_runs_nothing(
    browser: Browser, make_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    payload = f"<img src=x onerror=console.log('{XSS_MARK}-tool')>"
    workspace = tmp_path / payload
    workspace.mkdir()
    server = make_gateway({"AILAB_TOOL_ROOTS": str(workspace)})
    with open_page(browser, server.url) as watched:
        page = watched.page
        send(page, "Which folder are you in?", tool="get_current_directory")
        wait_tool_result(page, "ok")
        panel = page.locator("details.tool")
        panel.locator("summary").click()
        expect(panel.locator(".tool-result")).to_contain_text(payload)
        assert page.evaluate(INERT_DOM) == []
        watched.ran_nothing()


# Simple requests (text/plain, no preflight) and JSON ones (which need a preflight).
ATTACK_PAGE = """<!doctype html><script>
(async () => {
    const gateway = GATEWAY;
    for (const [path, body] of Object.entries(ATTACK)) {
        for (const mode of ["no-cors", "cors"]) {
            const type = mode === "cors" ? "application/json" : "text/plain";
            const request = {method: "POST", mode, headers: {"Content-Type": type}};
            try {
                await fetch(gateway + path, {...request, body: JSON.stringify(body)});
            } catch (error) {}
        }
    }
    document.title = "sent";
})();
</script>"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_a_page_from_another_origin_cannot_drive_the_gateway(
    browser: Browser,
    make_gateway,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    server = make_gateway()
    site = tmp_path / "site"
    site.mkdir()
    attack = {
        "/chat": {"messages": [{"role": "user", "content": "pwned"}], "conversation_id": "evil"},
        "/command": {"command": "roots", "value": "/"},
        "/shutdown": {},
    }
    page = ATTACK_PAGE.replace("GATEWAY", json.dumps(server.url))
    (site / "index.html").write_text(page.replace("ATTACK", json.dumps(attack)))
    handler = functools.partial(_QuietHandler, directory=str(site))
    other = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    roots_before = requests.post(f"{server.url}/command", json={"command": "roots"}).json()
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"http://localhost:{other.server_port}/")
        expect(page).to_have_title("sent")
        context.close()
    finally:
        other.shutdown()
    assert server.process is not None
    with pytest.raises(subprocess.TimeoutExpired):
        server.process.wait(timeout=3)  # a shutdown would have ended it by now
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    assert requests.get(f"{server.url}/conversations/evil", timeout=5).status_code == 404
    roots_after = requests.post(f"{server.url}/command", json={"command": "roots"}).json()
    assert roots_after["value"] == roots_before["value"]


def test_the_page_asks_for_the_api_key_and_keeps_it_for_the_tab_only(
    browser: Browser,
    make_gateway,  # type: ignore[no-untyped-def]
) -> None:
    server = make_gateway({"AILAB_API_KEYS": "web-test-key-0123456789"})
    with open_page(browser, server.url) as watched:
        page = watched.page
        expect(page.locator("#key-dialog")).to_be_visible()
        page.fill("#key-input", "web-test-key-0123456789")
        page.click("#key-dialog button[type=submit]")
        expect(page.locator("#health")).to_contain_text("Ready")
        assert page.evaluate("sessionStorage.getItem('ailab.apiKey')") == "web-test-key-0123456789"
        assert page.evaluate("localStorage.length") == 0
        send(page, "Hello")
        wait_turn(page)
        expect(page.locator(".turn-stats")).to_be_visible()
        watched.ran_nothing()


# --- models --------------------------------------------------------------------------------


def test_switching_model_shows_the_new_state(browser: Browser, make_gateway) -> None:  # type: ignore[no-untyped-def]
    # One model resident at a time: a switch unloads the other (a pool may keep both).
    server = make_gateway({"AILAB_MAX_LOADED_MODELS": "1"})
    with open_page(browser, server.url) as watched:
        page = watched.page
        page.click("#open-models")
        gemma = page.locator('.model[data-key="gemma3-270m"]')
        smollm = page.locator('.model[data-key="smollm2-135m"]')
        expect(smollm.locator(".model-state")).to_have_text("ready")
        expect(gemma.locator(".model-state")).to_have_text("unloaded")
        gemma.get_by_role("button", name=re.compile("^Set default")).click()
        expect(gemma.locator(".model-state")).to_have_text("ready", timeout=TURN_TIMEOUT_MS)
        expect(smollm.locator(".model-state")).to_have_text("unloaded")
        expect(page.locator("#health")).to_contain_text("Gemma")
        assert requests.get(f"{server.url}/health").json()["model_key"] == "gemma3-270m"
        watched.ran_nothing()
