"""Smoke test against a gateway you are already running (`make run`).

    python test_server.py [--server http://127.0.0.1:8080] [--switch gemma3-270m]

A gateway with API keys needs one: AILAB_API_KEY=<key> (or --api-key).

Checks health, the model list, a chat (with history), a forced tool call and, when asked,
a model switch and back. Prints one line per check and exits non-zero on the first failure.
This is for people checking an installation by hand; `make test` runs the full suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import requests

# One session for every check, so the API key given in main() goes with each request.
http = requests.Session()


def check_health(server: str) -> str:
    body = http.get(f"{server}/health", timeout=5).json()
    assert body["status"] == "ok", f"status is {body['status']}: {body.get('message')}"
    assert "model_key" in body, "the gateway has API keys: set AILAB_API_KEY or --api-key"
    return f"{body['model_key']} on {body['device']}, pid {body['pid']}"


def check_models(server: str) -> str:
    models = http.get(f"{server}/models", timeout=5).json()["models"]
    present = [m["key"] for m in models if m["exists"]]
    assert present, "no model file is present; run `make models`"
    return f"{len(models)} registered, present: {', '.join(present)}"


def check_chat(server: str) -> str:
    conversation = f"smoke-{int(time.time())}"

    def ask(text: str) -> dict[str, Any]:
        reply = http.post(
            f"{server}/chat",
            json={
                "messages": [{"role": "user", "content": text}],
                "conversation_id": conversation,
                "max_tokens": 32,
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        return reply.json()

    first = ask("My favourite colour is green. Say hi.")
    second = ask("What is my favourite colour?")
    assert second["tokens_input"] > first["tokens_input"], "history was not sent"
    http.delete(f"{server}/conversations/{conversation}", timeout=5)
    return f"{second['tokens_per_second']} tok/s: {second['response'][:60]!r}"


def check_tool(server: str) -> str:
    reply = http.post(
        f"{server}/chat",
        json={
            "messages": [{"role": "user", "content": "Where are you working?"}],
            "conversation_id": "smoke-tool",
            "enable_tools": True,
            "max_tokens": 48,
            "tool_choice": {"type": "function", "function": {"name": "get_current_directory"}},
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["tools_used"], "no tool ran (are tools switched off? /command tools on)"
    http.delete(f"{server}/conversations/smoke-tool", timeout=5)
    return ", ".join(body["tools_used"])


def check_switch(server: str, target: str) -> str:
    original = http.get(f"{server}/health", timeout=5).json()["model_key"]
    timings = []
    for key in (target, original):
        reply = http.post(f"{server}/model/switch", json={"model_key": key}, timeout=600)
        assert reply.status_code == 200, reply.text
        timings.append(f"{key} {reply.json()['load_time_s']} s")
    return ", ".join(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8080")
    parser.add_argument("--switch", metavar="MODEL_KEY", help="also switch to this model and back")
    parser.add_argument(
        "--api-key", default=os.environ.get("AILAB_API_KEY"), help="default: $AILAB_API_KEY"
    )
    args = parser.parse_args()
    if args.api_key:
        http.headers["Authorization"] = f"Bearer {args.api_key}"
    checks: list[tuple[str, Callable[[], str]]] = [
        ("health", lambda: check_health(args.server)),
        ("models", lambda: check_models(args.server)),
        ("chat", lambda: check_chat(args.server)),
        ("tool", lambda: check_tool(args.server)),
    ]
    if args.switch:
        checks.append(("switch", lambda: check_switch(args.server, args.switch)))
    for name, check in checks:
        try:
            print(f"ok    {name}: {check()}")
        except (AssertionError, requests.RequestException, KeyError) as exc:
            print(f"FAIL  {name}: {exc}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
