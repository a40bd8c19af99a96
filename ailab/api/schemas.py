"""Pydantic models for every request and response of the gateway's own API."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments: a JSON object, as text")

    @field_validator("arguments")
    @classmethod
    def json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError('tool call arguments must be a JSON object as text, e.g. "{}"')
        return value


class ToolCall(BaseModel):
    """A tool call of an assistant message, in OpenAI's form."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """An OpenAI-style chat message; unknown fields are kept so nothing is lost."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class NamedToolChoice(BaseModel):
    class Function(BaseModel):
        name: str

    type: Literal["function"]
    function: Function


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class GenerationOptions(BaseModel):
    """How to generate an answer: /chat's options, and all of regenerate's body."""

    system_prompt: str | None = Field(
        None, description="The conversation's own system prompt from this turn on."
    )
    model: str | None = Field(
        None,
        min_length=1,
        description="Model key; a new conversation without one takes the default, an "
        "existing one keeps its model. Naming a model moves the conversation to it.",
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=5.0)
    enable_tools: bool = False
    stream: bool = False
    tool_choice: ToolChoice = "auto"


class ChatRequest(GenerationOptions):
    messages: list[ChatMessage] = Field(
        ..., description="New messages (or the whole history); an empty list resets."
    )
    conversation_id: str = Field("default", min_length=1, max_length=200)

    @field_validator("conversation_id")
    @classmethod
    def printable_id(cls, value: str) -> str:
        if not value.isprintable() or "/" in value:
            raise ValueError("conversation_id must be printable and contain no '/'")
        return value


class ApprovalRequest(BaseModel):
    conversation_id: str = "default"
    approval_id: str
    approve: bool
    stream: bool = False


class ToolCallRecord(BaseModel):
    id: str
    name: str
    arguments: dict[str, Any] | str
    result: dict[str, Any] | None = None


class PendingApprovalInfo(BaseModel):
    approval_id: str
    tool: str
    arguments: dict[str, Any] | str
    description: str


class ChatResponse(BaseModel):
    response: str
    conversation_id: str
    model_key: str | None
    tokens_input: int
    tokens_cached: int = 0  # of tokens_input, reused from llama-server's cache
    tokens_generated: int
    tokens_total: int
    generation_time: float
    tokens_per_second: float
    device: str
    tools_used: list[str]
    tool_calls: list[ToolCallRecord]
    iterations: int
    tool_cap_hit: bool
    trimmed_messages: int
    finish_reason: str | None
    pending_approval: PendingApprovalInfo | None = None


class DownloadInfo(BaseModel):
    repo_id: str
    filename: str | None
    downloaded_bytes: int
    total_bytes: int | None
    percent: float | None
    done: bool
    error: str | None


class PublicHealthResponse(BaseModel):
    """/health for a caller without a key when keys are configured: the status only."""

    status: Literal["ok", "loading", "restarting", "error"]


InstanceState = Literal["unloaded", "downloading", "loading", "ready", "unloading", "failed"]


class Placement(BaseModel):
    """Where a loaded model on RPC workers went (from llama-server's load log): offloaded
    layers, and MiB of weights and KV cache per buffer, an RPC worker by its host:port,
    this machine by llama.cpp's buffer name (CPU_Mapped, CPU, CUDA0, ...)."""

    offloaded_layers: int
    total_layers: int
    weights_mib: dict[str, float]
    kv_cache_mib: dict[str, float]


class InstanceStatus(BaseModel):
    """One model instance in the pool: its state and what it costs."""

    id: str
    purpose: Literal["generate", "embed", "rerank"]
    state: InstanceState
    message: str | None = None  # why it failed, or what it is doing
    download: DownloadInfo | None = None
    pid: int | None = None
    port: int | None = None
    memory_estimate_mb: float | None = None
    memory_measured_mb: float | None = None
    in_flight: int = 0
    last_used: float | None = None  # Unix time of the last request's end
    restarts: int = 0
    placement: Placement | None = None  # a ready model on RPC workers


class KvCacheStatus(BaseModel):
    """Saved KV caches on disk (AILAB_KV_CACHE_MB; 0 turns them off)."""

    enabled: bool
    budget_mb: float
    used_mb: float
    files: int
    restored: int  # since the gateway started
    rejected: int  # files found damaged (deleted; the turn recomputed)


class HealthResponse(BaseModel):
    """Top-level fields describe the default model; ``models`` every resident instance."""

    status: Literal["ok", "loading", "restarting", "error"]
    model_key: str | None
    model_name: str | None
    device: str
    pid: int | None
    restarts: int
    uptime_s: float | None
    message: str | None
    download: DownloadInfo | None
    n_ctx: int
    parallel: int
    memory_budget_mb: float
    memory_used_mb: float
    max_loaded_models: int
    models: list[InstanceStatus]
    kv_cache: KvCacheStatus


class AdapterInfo(BaseModel):
    """A LoRA adapter, served by its base model's process (its key goes in "model")."""

    key: str
    name: str
    description: str | None
    base: str | None
    # The base's state while its process has the adapter loaded; "refused" with the
    # reason when it does not fit its base (or names none).
    state: Literal[InstanceState, "refused"]
    message: str | None


class ModelInfo(BaseModel):
    key: str
    name: str
    description: str | None
    exists: bool
    size_bytes: int | None
    is_finetuned: bool
    recommended: bool
    current: bool
    context_length: int | None
    hf_repo: str | None
    usage: str | None
    base_model: str | None
    pinned: bool
    reranker: bool
    url: str | None = None  # a remote upstream's address (never its key)
    state: InstanceState
    message: str | None
    download: DownloadInfo | None
    pid: int | None
    port: int | None
    memory_estimate_mb: float | None
    memory_measured_mb: float | None
    in_flight: int
    last_used: float | None
    restarts: int
    placement: Placement | None = None
    rpc_workers: list[str] = []  # llama.cpp RPC workers its layers are split across
    embeddings: InstanceStatus | None = None
    adapters: list[AdapterInfo] = []


class ModelsResponse(BaseModel):
    current: str | None
    memory_budget_mb: float
    max_loaded_models: int
    models: list[ModelInfo]
    refused_adapters: list[AdapterInfo] = []  # adapters whose base is not a model


class ModelRequest(BaseModel):
    model: str = Field(..., min_length=1, description="Model key, as /models lists it")


class LoadResponse(BaseModel):
    status: Literal["ok"]
    model: InstanceStatus


class UnloadResponse(BaseModel):
    status: Literal["ok"]
    unloaded: list[str]


class SwitchRequest(BaseModel):
    model_key: str = Field(..., min_length=1)


class SwitchResponse(BaseModel):
    status: Literal["ok"]
    model_key: str
    previous_model_key: str | None
    load_time_s: float
    message: str


class CommandRequest(BaseModel):
    command: str
    value: str | None = None
    conversation_id: str = "default"


class CommandResponse(BaseModel):
    status: Literal["ok"]
    command: str
    message: str
    value: Any = None


class StatusResponse(BaseModel):
    status: Literal["ok"]


class ConversationSummaryOut(BaseModel):
    id: str
    title: str | None
    model_key: str | None = None
    message_count: int
    created_at: str
    updated_at: str


class ConversationsResponse(BaseModel):
    conversations: list[ConversationSummaryOut]


class ConversationResponse(BaseModel):
    id: str
    messages: list[dict[str, Any]]
    system_prompt: str | None = Field(
        None, description="The system prompt the latest turn was generated with."
    )


class AuditResponse(BaseModel):
    records: list[dict[str, Any]]


class RenameRequest(BaseModel):
    title: str | None = Field(
        ..., max_length=200, description="The new title; null or blank goes back to the default."
    )
