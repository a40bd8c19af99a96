"""llama-finetune's progress bar, parsed into epoch, loss and time left.

ggml prints one line per training window, ending in a carriage return, and a newline when
an epoch's last window is done:

    train: [███▉    ] data=0000001/0000002 loss=1.11503±nan acc=78.52±2.57% t=00:00:46 ETA=00:00:46

`loss` is the running mean over the epoch so far; the first line of the first epoch is
the untrained model's loss on the first window (it is measured before the update).
"""

from __future__ import annotations

import math
import re

from pydantic import BaseModel

_LINE = re.compile(
    r"(?P<phase>train|val):\s*\[[^\]]*\]\s*data=(?P<done>\d+)/(?P<total>\d+)\s+"
    r"loss=(?P<loss>[-+\w.]+)±\S+\s+acc=\S+\s+"
    r"t=(?P<elapsed>\d+:\d\d:\d\d)\s+ETA=(?P<eta>\d+:\d\d:\d\d)"
)


def _seconds(clock: str) -> int:
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return hours * 3600 + minutes * 60 + seconds


class ProgressLine(BaseModel):
    """One parsed progress-bar line."""

    phase: str
    done: int
    total: int
    loss: float
    elapsed_s: int
    eta_s: int


def parse_line(line: str) -> ProgressLine | None:
    """The progress in one line of output, or None for any other line."""
    match = _LINE.search(line)
    if match is None:
        return None
    try:
        loss = float(match["loss"])
    except ValueError:
        return None
    if math.isnan(loss):
        return None
    return ProgressLine(
        phase=match["phase"],
        done=int(match["done"]),
        total=int(match["total"]),
        loss=loss,
        elapsed_s=_seconds(match["elapsed"]),
        eta_s=_seconds(match["eta"]),
    )


class TrainingProgress(BaseModel):
    """Where a run stands, updated line by line."""

    epochs: int
    epoch: int = 0
    window: int = 0
    windows: int = 0
    loss: float | None = None
    loss_before: float | None = None
    epoch_losses: list[float] = []
    eta_s: int | None = None

    def feed(self, text: str) -> bool:
        """Take a line of output; True when it changed the progress."""
        line = parse_line(text)
        if line is None or line.phase != "train":
            return False
        if self.loss_before is None:
            self.loss_before = line.loss
        finished = line.done >= line.total
        if finished:
            self.epoch_losses.append(line.loss)
        self.epoch = min(len(self.epoch_losses) + (0 if finished else 1), self.epochs)
        self.window, self.windows, self.loss = line.done, line.total, line.loss
        epoch_s = line.elapsed_s + line.eta_s
        self.eta_s = (
            line.eta_s + (self.epochs - len(self.epoch_losses) - (0 if finished else 1)) * epoch_s
        )
        return True

    @property
    def loss_after(self) -> float | None:
        """The last epoch's mean loss, once an epoch has finished."""
        return self.epoch_losses[-1] if self.epoch_losses else None
