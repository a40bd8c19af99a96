"""The security boundary from the outside: forged Hosts, cross-site requests, non-JSON
bodies, preflights and API keys, over real HTTP against real gateways (each with its real
llama-server and SmolLM2), plus llama-server's own key and the start-up refusal."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import psutil
import pytest
import requests
from conftest import PROJECT_DIR, GatewayProcess

from ailab.config import ConfigError, load_settings

KEY = "gateway-key-" + "7f3a9c01d2e4b5a6c7d8e9f0"
FILE_KEY = "file-key-" + "0a1b2c3d4e5f60718293a4b5"
HASHED_KEY = "hashed-key-" + "c0ffee00deadbeef12345678"
WRONG_KEY = "wrong-key-" + "99887766554433221100aabb"
APP_ORIGIN = "https://app.example"
EVIL_ORIGIN = "https://evil.example"
BODY_ROUTES = (
    "/chat",
    "/chat/approve",
    "/command",
    "/model/switch",
    "/shutdown",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
)
TINY_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def running(server: GatewayProcess) -> Iterator[GatewayProcess]:
    """Started, then stopped however the tests (or the start itself) end."""
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def open_gw(
    llama_server_binary: Path, real_models: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """The default: no keys, default hosts; one listed CORS origin and a home of its own."""
    home = tmp_path_factory.mktemp("open-home")
    env = {"AILAB_CORS_ORIGINS": APP_ORIGIN, "HOME": str(home)}
    server = GatewayProcess(llama_server_binary, tmp_path_factory.mktemp("open"), env)
    yield from running(server)


@pytest.fixture(scope="module")
def keyed_gw(
    llama_server_binary: Path, real_models: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """Keys inline and in a file (one of them only as its hash), an explicit host list with
    a port, and the home folder shared with tools from the start-up configuration."""
    home = tmp_path_factory.mktemp("keyed-home")
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    digest = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    key_file.write_text(f"# keys for the test\n\n{FILE_KEY}\nsha256:{digest}\n")
    env = {
        "AILAB_API_KEYS": KEY,
        "AILAB_API_KEY_FILE": str(key_file),
        "AILAB_CORS_ORIGINS": APP_ORIGIN,
        "HOME": str(home),
        "AILAB_TOOL_ROOTS": str(home),
    }
    server = GatewayProcess(llama_server_binary, tmp_path_factory.mktemp("keyed"), env)
    server.env["AILAB_ALLOWED_HOSTS"] = f"127.0.0.1,ailab.lan:{server.port}"
    yield from running(server)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def still_serving(server: GatewayProcess) -> bool:
    health = requests.get(f"{server.url}/health", headers=bearer(KEY), timeout=5)
    return health.json()["status"] == "ok"


def llama_key(server: GatewayProcess) -> str:
    """llama-server's key, read the way only the same user (or root) can: its environment."""
    (pid,) = server.llama_pids()
    return psutil.Process(pid).environ()["LLAMA_API_KEY"]


# --- Host allowlist ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example"])
def test_a_forged_host_is_refused_on_every_route(open_gw: GatewayProcess, host: str) -> None:
    headers = {"Host": host.format(port=open_gw.port)}
    for method, path, body in (
        ("GET", "/health", None),
        ("GET", "/conversations", None),
        ("GET", "/v1/models", None),
        ("POST", "/chat", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("POST", "/shutdown", None),
    ):
        reply = requests.request(
            method, f"{open_gw.url}{path}", json=body, headers=headers, timeout=10
        )
        assert reply.status_code == 403, (path, reply.text)
        assert "AILAB_ALLOWED_HOSTS" in reply.json()["detail"]
    assert still_serving(open_gw)


def test_the_loopback_names_are_allowed_on_any_port(open_gw: GatewayProcess) -> None:
    for host in ("localhost", "127.0.0.1", "[::1]"):
        reply = requests.get(
            f"{open_gw.url}/health", headers={"Host": f"{host}:{open_gw.port}"}, timeout=5
        )
        assert reply.status_code == 200, (host, reply.text)


def test_an_explicit_host_list_replaces_the_default_and_an_entry_with_a_port_fixes_it(
    keyed_gw: GatewayProcess,
) -> None:
    def status(host: str) -> int:
        headers = {"Host": host, **bearer(KEY)}
        return requests.get(f"{keyed_gw.url}/models", headers=headers, timeout=5).status_code

    assert status(f"ailab.lan:{keyed_gw.port}") == 200
    assert status("ailab.lan:1") == 403
    assert status(f"localhost:{keyed_gw.port}") == 403


# --- cross-site requests ---------------------------------------------------------------------


def test_a_cross_site_text_plain_shutdown_is_refused(open_gw: GatewayProcess) -> None:
    """The "simple" request a hostile page can send without a preflight."""
    for origin in (EVIL_ORIGIN, "null", f"http://localhost:{open_gw.port + 1}"):
        reply = requests.post(
            f"{open_gw.url}/shutdown",
            data="{}",
            headers={"Content-Type": "text/plain", "Origin": origin},
            timeout=10,
        )
        assert reply.status_code == 403, (origin, reply.text)
        assert "AILAB_CORS_ORIGINS" in reply.json()["detail"]
    assert still_serving(open_gw)


def test_a_foreign_origin_may_not_post_even_json(open_gw: GatewayProcess) -> None:
    reply = requests.post(
        f"{open_gw.url}/command",
        json={"command": "tools", "value": "off"},
        headers={"Origin": EVIL_ORIGIN},
        timeout=10,
    )
    assert reply.status_code == 403
    tools = requests.post(f"{open_gw.url}/command", json={"command": "tools"}, timeout=10)
    assert tools.json()["value"] is True


def test_sec_fetch_site_cross_site_needs_an_allowed_origin(open_gw: GatewayProcess) -> None:
    def post(headers: dict[str, str]) -> requests.Response:
        body = {"command": "mem"}
        return requests.post(f"{open_gw.url}/command", json=body, headers=headers, timeout=10)

    assert post({"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert post({"Sec-Fetch-Site": "cross-site", "Origin": EVIL_ORIGIN}).status_code == 403
    assert post({"Sec-Fetch-Site": "cross-site", "Origin": APP_ORIGIN}).status_code == 200
    assert post({"Sec-Fetch-Site": "same-origin"}).status_code == 200


def test_the_own_origin_and_listed_origins_may_post(open_gw: GatewayProcess) -> None:
    own = requests.post(
        f"{open_gw.url}/command",
        json={"command": "mem"},
        headers={"Origin": open_gw.url, "Sec-Fetch-Site": "same-origin"},
        timeout=10,
    )
    assert own.status_code == 200
    listed = requests.post(
        f"{open_gw.url}/command",
        json={"command": "mem"},
        headers={"Origin": APP_ORIGIN},
        timeout=10,
    )
    assert listed.status_code == 200
    assert listed.headers["Access-Control-Allow-Origin"] == APP_ORIGIN


def test_a_foreign_origin_may_read_nothing_cross_origin(open_gw: GatewayProcess) -> None:
    """GETs are not refused (they change nothing), but no CORS header lets a page read them."""
    reply = requests.get(
        f"{open_gw.url}/conversations", headers={"Origin": EVIL_ORIGIN}, timeout=10
    )
    assert reply.status_code == 200
    assert "Access-Control-Allow-Origin" not in reply.headers


# --- JSON only -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
def test_a_body_that_is_not_json_gets_415_on_every_route_that_takes_one(
    open_gw: GatewayProcess, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    for path in BODY_ROUTES:
        reply = requests.post(
            f"{open_gw.url}{path}", data=b'{"command": "mem"}', headers=headers, timeout=10
        )
        assert reply.status_code == 415, (path, reply.text)
        assert "application/json" in reply.json()["detail"]
    assert still_serving(open_gw)


def test_an_empty_text_plain_post_is_415_too(open_gw: GatewayProcess) -> None:
    reply = requests.post(
        f"{open_gw.url}/shutdown", headers={"Content-Type": "text/plain"}, timeout=10
    )
    assert reply.status_code == 415
    assert still_serving(open_gw)


def test_json_with_a_charset_passes(open_gw: GatewayProcess) -> None:
    reply = requests.post(
        f"{open_gw.url}/v1/chat/completions",
        data=b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}',
        headers={"Content-Type": "application/json; charset=utf-8"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text


# --- CORS preflights and headers -----------------------------------------------------------


def test_preflights_are_answered_only_for_listed_origins(open_gw: GatewayProcess) -> None:
    def preflight(origin: str, method: str = "POST") -> requests.Response:
        headers = {
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        return requests.options(f"{open_gw.url}/chat", headers=headers, timeout=10)

    allowed = preflight(APP_ORIGIN)
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    allowed_headers = allowed.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    # Renaming a conversation is a PATCH: a listed web app must be allowed to send it.
    assert "PATCH" in preflight(APP_ORIGIN, "PATCH").headers["Access-Control-Allow-Methods"]
    refused = preflight(EVIL_ORIGIN)
    assert refused.status_code == 403
    assert "Access-Control-Allow-Origin" not in refused.headers


def test_every_response_says_nosniff(open_gw: GatewayProcess, keyed_gw: GatewayProcess) -> None:
    responses = [
        requests.get(f"{open_gw.url}/health", timeout=5),
        requests.get(f"{open_gw.url}/conversations/nope", timeout=5),
        requests.get(f"{open_gw.url}/conversations/export", timeout=5),
        requests.get(f"{open_gw.url}/health", headers={"Host": "evil.example"}, timeout=5),
        requests.post(f"{open_gw.url}/chat", data="x", timeout=5),
        requests.get(f"{keyed_gw.url}/models", timeout=5),
    ]
    with requests.post(
        f"{open_gw.url}/v1/chat/completions", json={**TINY_CHAT, "stream": True}, stream=True,
        timeout=60,
    ) as stream:  # fmt: skip
        responses.append(stream)
        assert b"data:" in b"".join(stream.iter_content(None))
    for response in responses:
        assert response.headers["X-Content-Type-Options"] == "nosniff", response.url


# --- API keys ------------------------------------------------------------------------------


def test_without_a_key_every_route_but_health_is_401(keyed_gw: GatewayProcess) -> None:
    for method, path, body in (
        ("GET", "/models", None),
        ("GET", "/conversations", None),
        ("GET", "/tools/audit", None),
        ("GET", "/v1/models", None),
        ("GET", "/docs", None),
        ("POST", "/chat", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("POST", "/v1/chat/completions", TINY_CHAT),
        ("POST", "/shutdown", None),
    ):
        reply = requests.request(method, f"{keyed_gw.url}{path}", json=body, timeout=10)
        assert reply.status_code == 401, (path, reply.text)
        assert reply.headers["WWW-Authenticate"] == "Bearer"
        assert "Authorization: Bearer" in reply.json()["detail"]
    assert still_serving(keyed_gw)


def test_health_without_a_key_shows_only_the_status(keyed_gw: GatewayProcess) -> None:
    public = requests.get(f"{keyed_gw.url}/health", timeout=5)
    assert (public.status_code, public.json()) == (200, {"status": "ok"})
    full = requests.get(f"{keyed_gw.url}/health", headers={"x-api-key": KEY}, timeout=5)
    assert full.json()["model_key"] == "smollm2-135m"


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {WRONG_KEY}"},
        {"x-api-key": WRONG_KEY},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": f"Bearer sha256:{hashlib.sha256(HASHED_KEY.encode()).hexdigest()}"},
    ],
    ids=["bearer", "x-api-key", "basic-scheme", "prefix", "the-hash-itself"],
)
def test_a_wrong_key_is_401_and_not_echoed(
    keyed_gw: GatewayProcess, headers: dict[str, str]
) -> None:
    reply = requests.get(f"{keyed_gw.url}/conversations", headers=headers, timeout=5)
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert "not valid" in reply.json()["detail"]
    sent = next(iter(headers.values())).split(" ")[-1]
    assert sent not in reply.text and KEY not in reply.text


@pytest.mark.parametrize("key", [KEY, FILE_KEY, HASHED_KEY], ids=["inline", "file", "hashed"])
def test_each_configured_key_works_in_both_header_styles(
    keyed_gw: GatewayProcess, key: str
) -> None:
    for headers in (bearer(key), {"x-api-key": key, "anthropic-version": "2023-06-01"}):
        reply = requests.post(
            f"{keyed_gw.url}/v1/chat/completions", json=TINY_CHAT, headers=headers, timeout=60
        )
        assert reply.status_code == 200, reply.text


def test_the_openai_sdk_works_with_a_key(keyed_gw: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=f"{keyed_gw.url}/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content is not None
    chunks = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        stream=True,
    )
    assert [c for c in chunks if c.choices and c.choices[0].delta.content]
    wrong = openai.OpenAI(base_url=f"{keyed_gw.url}/v1", api_key=WRONG_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_the_anthropic_sdk_key_header_is_accepted(keyed_gw: GatewayProcess) -> None:
    """The anthropic SDK sends x-api-key; /v1/models is the one route both SDKs share."""
    client = anthropic.Anthropic(base_url=keyed_gw.url, api_key=KEY, max_retries=0)
    page = client.models.list()
    assert "smollm2-135m" in [model.id for model in page.data]
    wrong = anthropic.Anthropic(base_url=keyed_gw.url, api_key=WRONG_KEY, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong.models.list()


def run_client(server: GatewayProcess, *args: str, key: str | None) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "AILAB_API_KEY"}
    if key is not None:
        env["AILAB_API_KEY"] = key
    return subprocess.run(
        [sys.executable, str(PROJECT_DIR / "ai_client.py"), "--server", server.url, *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=PROJECT_DIR,
        env=env,
    )


def test_the_terminal_client_sends_AILAB_API_KEY(keyed_gw: GatewayProcess) -> None:
    answered = run_client(keyed_gw, "-m", "Say hello", "--conversation", "cli", key=KEY)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip()
    refused = run_client(keyed_gw, "-m", "Say hello", "--wait", "5", key=None)
    assert refused.returncode != 0
    assert "AILAB_API_KEY" in refused.stderr
    flag = run_client(keyed_gw, "-m", "Hi", "--api-key", WRONG_KEY, "--wait", "5", key=KEY)
    assert flag.returncode != 0
    assert "not valid" in flag.stderr


def test_roots_from_start_up_may_include_home(keyed_gw: GatewayProcess) -> None:
    home = keyed_gw.env["HOME"]
    reply = requests.post(
        f"{keyed_gw.url}/command",
        json={"command": "roots", "value": home},
        headers=bearer(KEY),
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["value"] == [str(Path(home).resolve())]


def test_no_key_appears_in_the_gateway_log(keyed_gw: GatewayProcess) -> None:
    requests.get(f"{keyed_gw.url}/models", headers=bearer(WRONG_KEY), timeout=5)
    output = keyed_gw.output()
    assert "refused GET /models" in output
    for secret in (KEY, FILE_KEY, HASHED_KEY, WRONG_KEY):
        assert secret not in output


# --- tool roots at run time ----------------------------------------------------------------


def test_roots_refuse_root_and_home_at_run_time_and_audit_who_asked(
    open_gw: GatewayProcess, tmp_path: Path
) -> None:
    def roots(value: str) -> requests.Response:
        body = {"command": "roots", "value": value}
        # The audit names the connection's own address, whatever a client claims.
        headers = {"Origin": open_gw.url, "X-Forwarded-For": "203.0.113.9"}
        return requests.post(f"{open_gw.url}/command", json=body, headers=headers, timeout=10)

    for refused in ("/", open_gw.env["HOME"]):
        reply = roots(refused)
        assert reply.status_code == 400, reply.text
        assert "AILAB_TOOL_ROOTS" in reply.json()["detail"]
    project = tmp_path / "project"
    project.mkdir()
    assert roots(str(project)).status_code == 200
    audit = requests.get(f"{open_gw.url}/tools/audit", timeout=5).json()["records"]
    changes = [r for r in audit if r["tool"] == "/command roots"][:3]
    assert [c["status"] for c in changes] == ["success", "refused", "refused"]
    assert changes[0]["arguments"]["roots"] == [str(project)]
    assert all(c["arguments"]["origin"] == open_gw.url for c in changes)
    assert changes[0]["arguments"]["client"].startswith("127.0.0.1:")


# --- llama-server's own key ----------------------------------------------------------------


def test_llama_server_listens_on_loopback_and_refuses_requests_without_its_key(
    keyed_gw: GatewayProcess,
) -> None:
    (pid,) = keyed_gw.llama_pids()
    listening = [
        c.laddr for c in psutil.Process(pid).net_connections() if c.status == psutil.CONN_LISTEN
    ]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", keyed_gw.llama_port)]
    llama = f"http://127.0.0.1:{keyed_gw.llama_port}"
    for headers in ({}, bearer(WRONG_KEY), bearer(KEY), {"x-api-key": KEY}):
        for method, path in (
            ("POST", "/v1/chat/completions"),
            ("POST", "/completion"),
            ("GET", "/props"),
            ("GET", "/slots"),
            ("GET", "/metrics"),
            ("GET", "/v1/models"),
        ):
            body = TINY_CHAT if method == "POST" else None
            reply = requests.request(
                method, f"{llama}{path}", json=body, headers=headers, timeout=30
            )
            assert reply.status_code == 401, (path, headers, reply.status_code)
    with_key = requests.post(
        f"{llama}/v1/chat/completions", json=TINY_CHAT, headers=bearer(llama_key(keyed_gw)),
        timeout=60,
    )  # fmt: skip
    assert with_key.status_code == 200


def test_llama_servers_key_is_fresh_and_in_no_command_line_nor_log(
    open_gw: GatewayProcess, keyed_gw: GatewayProcess
) -> None:
    keys = {llama_key(open_gw), llama_key(keyed_gw)}
    assert len(keys) == 2 and all(len(k) >= 32 for k in keys)
    for server in (open_gw, keyed_gw):
        key = llama_key(server)
        for pid in (*server.llama_pids(), server.process.pid):  # type: ignore[union-attr]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert key.encode() not in cmdline
        logs = [server.data_dir / "gateway.out", *(server.data_dir / "logs").iterdir()]
        assert all(key not in p.read_text(errors="replace") for p in logs), logs


# --- start-up --------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_binding_beyond_loopback_without_a_key_refuses_to_start(
    llama_server_binary: Path, tmp_path: Path, host: str
) -> None:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"AILAB_API_KEYS", "AILAB_API_KEY_FILE", "AILAB_ALLOW_NO_AUTH"}
    }
    env.update(
        AILAB_HOST=host, AILAB_DATA_DIR=str(tmp_path), LLAMA_SERVER_PATH=str(llama_server_binary)
    )
    result = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "ai_server.py")],
        env=env,
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "AILAB_API_KEYS" in result.stderr and "AILAB_ALLOW_NO_AUTH=1" in result.stderr
    assert not (tmp_path / "logs").exists()  # refused before anything started


def test_accepting_the_risk_starts_with_a_warning(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway({"AILAB_HOST": "0.0.0.0", "AILAB_ALLOW_NO_AUTH": "1"})
    assert "AILAB_ALLOW_NO_AUTH=1: listening on 0.0.0.0 without an API key" in server.output()
    assert requests.get(f"{server.url}/models", timeout=5).status_code == 200


# --- configuration -------------------------------------------------------------------------


def settings_env(tmp_path: Path, **env: str) -> dict[str, str]:
    return {"AILAB_DATA_DIR": str(tmp_path), **env}


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"AILAB_API_KEYS": "s3cr3tA"}, "AILAB_API_KEYS: key 1"),
        ({"AILAB_API_KEYS": f"{KEY},s3cr3tB"}, "AILAB_API_KEYS: key 2"),
        ({"AILAB_API_KEY_FILE": "/nonexistent/keys"}, "AILAB_API_KEY_FILE"),
        ({"AILAB_ALLOWED_HOSTS": "evil.example/path"}, "AILAB_ALLOWED_HOSTS"),
        ({"AILAB_CORS_ORIGINS": "https://app.example/page"}, "AILAB_CORS_ORIGINS"),
        ({"AILAB_ALLOW_NO_AUTH": "perhaps"}, "AILAB_ALLOW_NO_AUTH"),
    ],
)
def test_bad_security_settings_name_the_variable(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named) as caught:
        load_settings(settings_env(tmp_path, **env))
    assert "s3cr3t" not in str(caught.value) and KEY not in str(caught.value)


def test_a_key_file_entry_that_is_too_short_is_named_by_line_not_shown(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\nsecret1\n")
    with pytest.raises(ConfigError, match="AILAB_API_KEY_FILE line 2") as caught:
        load_settings(settings_env(tmp_path, AILAB_API_KEY_FILE=str(keys)))
    assert "secret1" not in str(caught.value)


def test_settings_keep_only_digests_of_keys(tmp_path: Path) -> None:
    settings = load_settings(settings_env(tmp_path, AILAB_API_KEYS=KEY, AILAB_HOST="0.0.0.0"))
    assert settings.api_key_sha256 == (hashlib.sha256(KEY.encode()).hexdigest(),)
    assert KEY not in repr(settings)
