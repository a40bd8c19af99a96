"""What a fine-tune is asked to do, where it stands, and what it leaves beside the model:
the pydantic models shared by `/command finetune`, `ailab-finetune` and the sidecar."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ailab.errors import AilabError, BadRequest

# Lower case, so the file name is also the model key models/custom/ discovery gives it.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
DEFAULT_WINDOW = 256  # tokens per training window; llama-finetune pads smaller contexts to 256
Quantization = Literal["Q8_0", "F16", "F32"]
JobState = Literal[
    "idle", "preparing", "rendering", "converting", "training", "saving", "done", "failed",
    "cancelled",
]  # fmt: skip
RUNNING_STATES = frozenset({"preparing", "rendering", "converting", "training", "saving"})


class FinetuneConflict(AilabError):
    """A fine-tune is already running (one at a time), or the name is taken."""

    status = 409


class InsufficientResources(AilabError):
    """The job would not fit in memory or on disk; refused before anything starts."""

    status = 507


class FinetuneSpec(BaseModel):
    """A fine-tuning request. Exactly one of `conversations`, `match` or `jsonl` names the
    training data."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN, description="the new model's key and file name")
    base_model: str | None = Field(None, alias="base", description="default: the current model")
    conversations: list[str] | None = Field(None, alias="ids", min_length=1)
    match: str | None = Field(None, min_length=1, description="glob over conversation ids")
    jsonl: Path | None = Field(None, description="a file written by the JSONL export")
    include_tools: bool = Field(True, alias="tools")
    epochs: int = Field(3, ge=1, le=100)
    learning_rate: float = Field(3e-4, alias="lr", gt=0, le=1e-2)
    window: int = Field(DEFAULT_WINDOW, ge=256, le=8192, multiple_of=256)
    quantization: Quantization = Field("Q8_0", alias="quant")

    @model_validator(mode="after")
    def _one_source(self) -> FinetuneSpec:
        given = [s for s in ("conversations", "match", "jsonl") if getattr(self, s) is not None]
        if len(given) != 1:
            raise ValueError("name the training data with exactly one of ids, match or jsonl")
        return self


def parse_spec(text: str) -> FinetuneSpec:
    """A spec from a JSON object or `key=value` words (`ids=a,b` is a list)."""
    stripped = text.strip()
    try:
        if stripped.startswith("{"):
            values: dict[str, Any] = json.loads(stripped)
        else:
            values = dict(_key_value(word) for word in shlex.split(stripped))
            if "ids" in values:
                values["ids"] = [i for i in values["ids"].split(",") if i]
        return FinetuneSpec.model_validate(values)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"finetune: the value is not a JSON object ({exc.msg})") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors()
        )
        raise BadRequest(f"finetune: {problems}") from None


def _key_value(word: str) -> tuple[str, str]:
    key, sep, value = word.partition("=")
    if not sep or not key:
        raise BadRequest(
            f"finetune: expected key=value, got {word!r} "
            "(e.g. name=mybot base=smollm2-135m match='demo-*' epochs=3)"
        )
    return key, value


class FinetuneStatus(BaseModel):
    """Where the current (or latest) fine-tune stands."""

    state: JobState = "idle"
    name: str | None = None
    base_model: str | None = None
    message: str = "no fine-tune has run"
    started_at: str | None = None
    elapsed_s: float = 0.0
    epoch: int = 0
    epochs: int = 0
    window: int = 0
    windows: int = 0
    loss: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    eta_s: int | None = None
    conversations: int = 0
    tokens: int = 0
    memory_estimate_mb: int = 0
    model_key: str | None = None
    pid: int | None = None

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    def summary(self) -> str:
        """One line for people: what it is doing and how long is left."""
        if self.state != "training":
            return f"{self.name or 'fine-tune'}: {self.state}. {self.message}"
        if not self.windows:
            return f"{self.name}: training, loading the model"
        line = (
            f"{self.name}: training, epoch {self.epoch}/{self.epochs}, "
            f"window {self.window}/{self.windows}"
        )
        if self.loss is not None:
            line += f", loss {self.loss:.3f} (started at {self.loss_before:.3f})"
        if self.eta_s is not None:
            line += f", about {_duration(self.eta_s)} left"
        return line


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class TrainingData(BaseModel):
    source: Literal["conversations", "jsonl"]
    ids: list[str]
    sha256: str
    conversations: int
    tokens: int
    repeats: int


class FinetuneRecord(BaseModel):
    """The sidecar `<name>.json`; models/custom/ discovery merges it into the model's entry."""

    name: str
    description: str
    base_model: str
    chat_template_file: str | None
    context_length: int
    training_data: TrainingData
    epochs: int
    learning_rate: float
    window: int
    loss_before: float
    loss_after: float
    epoch_losses: list[float]
    quantization: Quantization
    created: str
    duration_s: float
    llama_cpp: str
