#!/usr/bin/env python3
"""A py-spy profile of the gateway summed up: the functions with the most own time and the
most time including their callees, as shares of the samples where the gateway was busy.

Record while load runs, then sum up (docs/performance-profile.md was made this way):

    .venv/bin/py-spy record -p <gateway pid> -r 500 -d 30 --format raw -o profile.txt
    python scripts/profile_top.py profile.txt

py-spy also samples threads blocked in C (the event loop's poll, idle worker threads, the
access log's writer waiting for a line); those samples are left out. The ASGI middleware
and routing frames every request passes through are left out of the inclusive list, where
they would fill the top with near 100% each.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

# Leaf frames that are a thread waiting, not working.
IDLE_LEAVES = (
    "Runner.run ",
    "_worker ",
    "QueueListener.dequeue ",
    "AccessLog._write_lines ",
    "Thread.run ",
    "Thread._bootstrap",
)
# Frames on every request's stack: they say nothing about where the time goes.
PASSED_THROUGH = re.compile(
    r"^(<module>|main|run|asyncio_run|Server\.run|Runner\.run|Thread\.|"
    r"RequestResponseCycle\.run_asgi|ProxyHeadersMiddleware|FastAPI\.__call__|"
    r"Starlette\.__call__|\w+Middleware\.__call__ |SecurityBoundary\.__call__ |"
    r"wrap_app_handling_exceptions\.<locals>\.wrapped_app |Router\.__call__|APIRouter\.app|"
    r"APIRoute\.handle|Route\.handle|request_response|get_request_handler|"
    r"run_endpoint_function|TaskHandle|StreamingResponse\.__call__)"
)


def frame_name(frame: str) -> str:
    """`func (/long/path/site-packages/pkg/mod.py:12)` as `func (pkg/mod.py)`."""
    frame = re.sub(r" \(/.*?(site-packages|python3\.\d+|ailab/\.\.|wt/\w+|orig)/", " (", frame)
    return re.sub(r":\d+\)$", ")", frame)


def summarize(path: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [frame_name(f) for f in stack.split(";")]
        if frames[-1].startswith(IDLE_LEAVES):
            continue
        busy += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    if not busy:
        return f"{path}: no busy samples"
    lines = [f"busy samples: {busy}", "", "own time:"]
    lines += [f"  {100 * n / busy:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "including callees (frames every request passes left out):"]
    shown = [(f, n) for f, n in inclusive.most_common() if not PASSED_THROUGH.match(f)]
    lines += [f"  {100 * n / busy:5.1f}%  {f}" for f, n in shown[:top]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=12, help="entries per list")
    args = parser.parse_args()
    print(summarize(args.profile, args.top))


if __name__ == "__main__":
    main()
