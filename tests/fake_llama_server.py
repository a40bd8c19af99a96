#!/usr/bin/env python3
"""A scripted stand-in for llama-server, for edge cases a tiny model cannot produce on demand.

The gateway starts it exactly as it starts llama-server (LLAMA_SERVER_PATH points here).
FAKE_LLAMA_SCRIPT names a JSON file: a list of replies served in order to
/v1/chat/completions (the last one repeats). A reply is a chat message dict, or
{"status": 500, "error": "..."}; with "stream_chunks" it streams those strings slowly. A
streamed request for a plain reply gets it as one SSE chunk (tool calls included).
Every request body is appended to FAKE_LLAMA_SCRIPT + ".log"; a client that hangs up
mid-stream is recorded as {"cancelled": true}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SCRIPT = Path(os.environ.get("FAKE_LLAMA_SCRIPT", "/nonexistent"))
LOG = Path(str(SCRIPT) + ".log")
state = {"served": 0}


def next_reply() -> dict:
    replies = json.loads(SCRIPT.read_text())
    reply = replies[min(state["served"], len(replies) - 1)]
    state["served"] += 1
    return reply


def record(entry: dict) -> None:
    with LOG.open("a") as log:
        log.write(json.dumps(entry) + "\n")


def completion(message: dict) -> dict:
    return {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        "timings": {"predicted_ms": 50.0},
        "model": "fake",
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.send_json(200, {"status": "ok"} if self.path == "/health" else {"data": []})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/tokenize":
            self.send_json(200, {"tokens": list(range(len(body.get("content", "").split())))})
            return
        record(body)
        reply = next_reply()
        if "status" in reply:
            self.send_json(reply["status"], {"error": {"message": reply["error"]}})
        elif "stream_chunks" in reply:
            self.stream(reply["stream_chunks"], float(reply.get("delay", 0.2)))
        elif body.get("stream"):
            self.stream_message(reply)
        else:
            self.send_json(200, completion(reply))

    def stream(self, chunks: list[str], delay: float) -> None:
        events = [{"choices": [{"index": 0, "delta": {"content": text}}]} for text in chunks]
        self.send_events(events, delay)

    def stream_message(self, message: dict) -> None:
        calls = [{"index": i, **call} for i, call in enumerate(message.get("tool_calls") or [])]
        delta = {"content": message.get("content"), "tool_calls": calls}
        finish = "tool_calls" if calls else "stop"
        self.send_events([{"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}], 0)

    def send_events(self, events: list[dict], delay: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in events:
                payload = f"data: {json.dumps(event)}\n\n".encode()
                self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
                self.wfile.flush()
                time.sleep(delay)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            record({"cancelled": True})


def main() -> None:
    if "--list-devices" in sys.argv:
        print("Available devices:")
        return
    port = int(sys.argv[sys.argv.index("--port") + 1])
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
