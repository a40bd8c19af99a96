"""The LoRA adapter the tests build for a real base model: the bench's own
(ailab/bench/lora.py), rank-4 A and B for every layer's attention query and value
projections; `widen` makes an adapter for some other base."""

from ailab.bench.lora import TARGETS, build_lora

__all__ = ["TARGETS", "build_lora"]
