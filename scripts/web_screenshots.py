"""Take the README's screenshots of the web page, light and dark, from a running gateway.

Start the gateway (`make run`), then: `.venv/bin/python scripts/web_screenshots.py`.
It asks the real model two questions (one with a forced tool call) in a conversation of its
own, opens it in Debian's chromium, and writes docs/web-light.png and docs/web-dark.png.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import requests
from playwright.sync_api import sync_playwright

PROJECT_DIR = Path(__file__).resolve().parent.parent
CONVERSATION = "screenshot-demo"
TURNS = (
    {"content": "Show me a short Python function that reverses a string.", "tools": None},
    {"content": "Which folder are you in?", "tools": "get_current_directory"},
)


def seed(url: str) -> None:
    requests.post(f"{url}/chat", json={"messages": [], "conversation_id": CONVERSATION}, timeout=30)
    for turn in TURNS:
        body = {
            "messages": [{"role": "user", "content": turn["content"]}],
            "conversation_id": CONVERSATION,
            "temperature": 0,
            "max_tokens": 160,
        }
        if turn["tools"]:
            choice = {"type": "function", "function": {"name": turn["tools"]}}
            body |= {"enable_tools": True, "tool_choice": choice}
        requests.post(f"{url}/chat", json=body, timeout=900).raise_for_status()


def shoot(url: str, out: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("web_screenshots: chromium is needed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        for scheme in ("light", "dark"):
            context = browser.new_context(
                viewport={"width": 1280, "height": 800}, color_scheme=scheme
            )
            page = context.new_page()
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]")
            page.click(f'.conversation[data-id="{CONVERSATION}"]')
            page.wait_for_selector("details.tool")
            page.click("details.tool summary")
            page.screenshot(path=out / f"web-{scheme}.png")
            context.close()
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "docs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seed(args.url)
    shoot(args.url, args.out)
    print(f"[web-screenshots] wrote {args.out}/web-light.png and web-dark.png")


if __name__ == "__main__":
    main()
