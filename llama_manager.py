"""Entry point to the llama-server supervisor, which lives in ailab.upstream.supervisor."""

from ailab.upstream.supervisor import LlamaServerManager, LlamaStartError, LlamaUnavailable

__all__ = ["LlamaServerManager", "LlamaStartError", "LlamaUnavailable"]
