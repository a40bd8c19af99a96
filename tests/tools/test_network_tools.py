"""The network tools under the network policy, with real HTTP against 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tool_helpers import settings_for

from ailab.tools import ToolPolicy, execute_tool, network

BODY_SENTINEL = "BODY-SENTINEL-7f3a"


class Handler(BaseHTTPRequestHandler):
    requested: list[str]

    def do_GET(self) -> None:
        self.requested.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/target")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = (BODY_SENTINEL * 1000).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[int, list[str]]]:
    requested: list[str] = []
    handler = type("RecordingHandler", (Handler,), {"requested": requested})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], requested
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (via the backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    yield listener.getsockname()[1]
    listener.close()


def net_policy(tmp_path: Path, allow_private: bool) -> ToolPolicy:
    settings = settings_for(tmp_path, AILAB_NET_ALLOW_PRIVATE="1" if allow_private else "0")
    return ToolPolicy.from_settings(settings)


@pytest.fixture
def strict(tmp_path: Path) -> ToolPolicy:
    return net_policy(tmp_path, allow_private=False)


@pytest.fixture
def private_allowed(tmp_path: Path) -> ToolPolicy:
    return net_policy(tmp_path, allow_private=True)


def run(policy: ToolPolicy, name: str, **arguments: Any) -> dict[str, Any]:
    return execute_tool(policy, name, arguments)


def fake_getaddrinfo(*answers: list[str]) -> tuple[Callable[..., Any], list[str]]:
    """A resolver that gives each answer in turn (the last one repeats) and logs lookups."""
    calls: list[str] = []

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        calls.append(host)
        answer = answers[min(len(calls), len(answers)) - 1]
        return [
            (
                socket.AF_INET6 if ":" in ip else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (ip, port),
            )
            for ip in answer
        ]

    return getaddrinfo, calls


# --- lookup_hostname -----------------------------------------------------------------


def test_lookup_of_localhost_is_refused_by_default(strict: ToolPolicy) -> None:
    result = run(strict, "lookup_hostname", hostname="localhost")
    assert result["status"] == "error"
    assert "loopback" in result["error"] and "AILAB_NET_ALLOW_PRIVATE" in result["error"]


def test_lookup_in_an_odd_spelling_is_refused(strict: ToolPolicy) -> None:
    assert "loopback" in run(strict, "lookup_hostname", hostname="0x7f000001")["error"]


def test_lookup_of_localhost_works_when_private_addresses_are_allowed(
    private_allowed: ToolPolicy,
) -> None:
    result = run(private_allowed, "lookup_hostname", hostname="localhost")
    assert result["status"] == "success"
    assert "127.0.0.1" in result["ip"] or "::1" in result["ip"]
    assert set(result) >= {"ip", "ping_ms", "ping_port", "hostname"}


def test_lookup_accepts_a_url_and_uses_its_host(private_allowed: ToolPolicy) -> None:
    result = run(private_allowed, "lookup_hostname", hostname="http://127.0.0.1:9/x")
    assert result["hostname"] == "127.0.0.1" and result["ip"] == ["127.0.0.1"]


def test_every_resolved_address_is_checked(
    strict: ToolPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    getaddrinfo, _ = fake_getaddrinfo(["8.8.8.8", "10.1.2.3"])
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    result = run(strict, "lookup_hostname", hostname="mixed.example")
    assert result["status"] == "error" and "10.1.2.3" in result["error"]


def test_unknown_names_give_a_readable_error(
    strict: ToolPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_such_name(*args: Any, **kwargs: Any) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    assert "cannot resolve" in run(strict, "lookup_hostname", hostname="nope.invalid")["error"]


# --- measure_http_latency ------------------------------------------------------------


def test_local_server_is_refused_by_default(
    strict: ToolPolicy, http_server: tuple[int, list[str]]
) -> None:
    port, requested = http_server
    assert "port" in run(strict, "measure_http_latency", url=f"http://127.0.0.1:{port}/")["error"]
    for url in ("http://127.0.0.1/", "http://2130706433/", "http://[::1]/", "localhost"):
        error = run(strict, "measure_http_latency", url=url)["error"]
        assert "loopback" in error, url
    assert requested == []


def test_local_server_is_measured_when_private_addresses_are_allowed(
    private_allowed: ToolPolicy, http_server: tuple[int, list[str]]
) -> None:
    port, requested = http_server
    result = run(private_allowed, "measure_http_latency", url=f"http://127.0.0.1:{port}/page?q=1")
    assert result["status"] == "success", result
    assert result["status_code"] == 200 and result["latency_ms"] >= 0
    assert result["ip"] == "127.0.0.1"
    assert requested == ["/page?q=1"]


def test_the_body_is_never_returned(
    private_allowed: ToolPolicy, http_server: tuple[int, list[str]]
) -> None:
    port, _ = http_server
    result = run(private_allowed, "measure_http_latency", url=f"http://127.0.0.1:{port}/")
    assert result["status"] == "success"
    assert BODY_SENTINEL not in json.dumps(result)


def test_redirects_are_reported_not_followed(
    private_allowed: ToolPolicy, http_server: tuple[int, list[str]]
) -> None:
    port, requested = http_server
    result = run(private_allowed, "measure_http_latency", url=f"http://127.0.0.1:{port}/redirect")
    assert result["status_code"] == 302 and result["redirect_not_followed"] is True
    assert requested == ["/redirect"]


def test_a_server_that_never_answers_times_out(
    private_allowed: ToolPolicy, silent_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(network, "NET_TIMEOUT_S", 0.3)
    result = run(private_allowed, "measure_http_latency", url=f"http://127.0.0.1:{silent_port}/")
    assert result["status"] == "error" and "within 0.3 s" in result["error"]


def test_environment_proxies_are_ignored(
    private_allowed: ToolPolicy, http_server: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, requested = http_server
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    result = run(private_allowed, "measure_http_latency", url=f"http://127.0.0.1:{port}/")
    assert result["status_code"] == 200 and requested == ["/"]


def test_a_closed_port_is_a_readable_error(private_allowed: ToolPolicy, silent_port: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    result = run(private_allowed, "measure_http_latency", url=f"http://127.0.0.1:{closed}/")
    assert result["status"] == "error" and "cannot connect" in result["error"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://example.com/", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("http://user:pw@example.com/", "user name or password"),
        ("http://8.8.8.8:8080/", "port 8080 is refused"),
        ("http://exa mple.com/", "spaces"),
        ("http://example.com:99999/", "invalid port"),
    ],
)
def test_only_http_and_https_on_ports_80_and_443_are_measured(
    strict: ToolPolicy, monkeypatch: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    def no_connections(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("nothing may be connected to")

    monkeypatch.setattr(network, "connect", no_connections)
    result = run(strict, "measure_http_latency", url=url)
    assert result["status"] == "error" and expected in result["error"]


def test_the_vetted_address_is_the_one_connected_to_without_resolving_again(
    strict: ToolPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    getaddrinfo, lookups = fake_getaddrinfo(["8.8.8.8"], ["127.0.0.1"])
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    connected: list[tuple[str, int]] = []

    def record(ip: Any, port: int, timeout: float, *, allow_private: bool) -> socket.socket:
        connected.append((str(ip), port))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(network, "connect", record)
    result = run(strict, "measure_http_latency", url="http://rebinding.example/")
    assert result["status"] == "error"
    assert connected == [("8.8.8.8", 80)]
    assert lookups == ["rebinding.example"]


def test_https_to_a_server_without_tls_is_a_readable_error(
    private_allowed: ToolPolicy, http_server: tuple[int, list[str]]
) -> None:
    port, _ = http_server
    result = run(private_allowed, "measure_http_latency", url=f"https://127.0.0.1:{port}/")
    assert result["status"] == "error" and "TLS with 127.0.0.1 failed" in result["error"]
