"""Entry point to the configuration: the model registry and settings live in ailab.config.

Kept so that `from server_config import MODELS, load_settings` works from the repository
root as documented; edit ailab/config.py.
"""

from ailab.config import MODELS, Settings, get_all_models, load_settings

__all__ = ["MODELS", "Settings", "get_all_models", "load_settings"]
