"""llama.cpp's programs: the one place that finds them, builds llama-server's command line
and asks the binary which devices it can use."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

from ailab.config import ConfigError, ModelSource, Settings

SDIST_VERSION = "0.3.36"  # llama-cpp-python sdist whose vendor/llama.cpp is built
PROGRAMS = ("llama-server", "llama-quantize", "llama-finetune", "ggml-rpc-server")
DEVICE_PROBE_TIMEOUT_S = 15.0
# `--list-devices` prints "Available devices:" and then one indented "NAME: description"
# line per device; backend-loading chatter on other lines also contains colons.
_DEVICE_LINE = re.compile(r"^\s+(?P<name>[A-Za-z][\w-]*\d+): (?P<description>.+)$")


def build_dir(settings: Settings, flags_digest: str) -> Path:
    """Where a build with these flags is cached (scripts/build_llama_server.py fills it)."""
    return settings.build_cache / "llama.cpp" / f"{SDIST_VERSION}-{flags_digest}"


def find_llama_server(settings: Settings) -> Path:
    """LLAMA_SERVER_PATH, else a llama-server on PATH, else the newest cached build."""
    if settings.llama_server_path:
        return settings.llama_server_path
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    built = [p for p in (settings.build_cache / "llama.cpp").glob("*/llama-server") if p.is_file()]
    if built:
        return max(built, key=lambda p: p.stat().st_mtime)
    raise ConfigError(
        "no llama-server found: run `make setup`, set LLAMA_SERVER_PATH, "
        "or put llama-server on PATH"
    )


def find_program(settings: Settings, name: str) -> Path:
    """Another llama.cpp program, from the same build as llama-server."""
    candidate = find_llama_server(settings).parent / name
    if candidate.is_file():
        return candidate
    raise ConfigError(f"no {name} next to llama-server in {candidate.parent}; run `make setup`")


def llama_server_command(
    binary: Path,
    source: ModelSource,
    model_path: Path,
    *,
    settings: Settings,
    port: int,
    n_ctx: int,
    n_gpu_layers: int,
    slot_save_path: Path | None = None,
) -> list[str]:
    """The llama-server command line; the gateway and the bare benchmark both use it.
    With ``slot_save_path`` (an existing directory), slots can be saved to files there."""
    command = [
        str(binary),
        "--model", str(model_path),
        "--alias", source.key,
        "--host", settings.llama_host,
        "--port", str(port),
        "-c", str(n_ctx),
        "-ngl", str(n_gpu_layers),
        "--parallel", str(settings.parallel),
        # One shared KV cache: any slot may use the whole context.
        "--kv-unified",
        "--metrics",
        "--no-webui",
    ]  # fmt: skip
    if settings.n_threads:
        command += ["--threads", str(settings.n_threads)]
    if slot_save_path is not None:
        # Idle slots keep their KV cache, so that a model about to stop can save each of
        # them: by default llama-server moves idle slots to its RAM cache, out of reach.
        command += ["--slot-save-path", str(slot_save_path), "--no-cache-idle-slots"]
    if source.chat_template_path:
        command += ["--chat-template-file", str(source.chat_template_path)]
    if source.rpc:
        # Offloaded layers (-ngl) go to the workers too; verbosity 4 is where llama-server
        # logs which device got how much (rpc.read_placement).
        command += ["--rpc", ",".join(source.rpc), "--log-verbosity", "4"]
    return command + lora_args(source) + source.extra_args


def lora_args(source: ModelSource) -> list[str]:
    """A base's adapters, loaded at scale 0 (every request sends its own scales). Its
    host-memory prompt cache is off: it keys saved prompts by tokens alone, so a prompt
    computed under one adapter would be reused under another (tests/test_lora.py)."""
    if not source.adapters:
        return []
    files = [arg for adapter in source.adapters for arg in ("--lora", str(adapter.path))]
    return [*files, "--lora-init-without-apply", "--cache-ram", "0"]


def parse_device_list(output: str) -> list[str]:
    """The device lines of `llama-server --list-devices` ("CUDA0: NVIDIA ..." each)."""
    devices: list[str] = []
    listing = False
    for line in output.splitlines():
        if line.strip().startswith("Available devices"):
            listing = True
        elif listing and (match := _DEVICE_LINE.match(line)):
            devices.append(f"{match['name']}: {match['description'].strip()}")
    return devices


async def list_devices(binary: Path) -> list[str]:
    """The GPUs this build can use (none for a CPU build); an empty list if it hangs."""
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        "--list-devices",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), DEVICE_PROBE_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return []
    return parse_device_list(output.decode(errors="replace"))
