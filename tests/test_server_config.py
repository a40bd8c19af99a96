"""Configuration: defaults, environment overrides, and bad values named clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ailab import config
from ailab.config import ConfigError, get_model_source, load_settings


def settings_for(tmp_path: Path, **env: str) -> config.Settings:
    return load_settings({"AILAB_DATA_DIR": str(tmp_path), **env})


def test_defaults_bind_to_loopback_on_the_documented_ports(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    assert (settings.host, settings.port, settings.llama_port) == ("127.0.0.1", 8080, 8081)
    assert settings.default_model == "smollm2-135m"
    assert settings.effective_tool_roots == (tmp_path / "workspace",)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AILAB_PORT", "eighty"),
        ("AILAB_PORT", "70000"),
        ("AILAB_LLAMA_PORT", "-1"),
        ("N_GPU_LAYERS", "-2"),
        ("AILAB_TOOL_APPROVAL", "sometimes"),
        ("AILAB_NET_ALLOW_PRIVATE", "maybe"),
        ("MAX_TOOL_ITERATIONS", "0"),
        ("AILAB_DEFAULT_MODEL", "no-such-model"),
        ("LLAMA_SERVER_PATH", "/nonexistent/llama-server"),
    ],
)
def test_a_bad_value_is_refused_with_the_variable_named(
    tmp_path: Path, variable: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=variable):
        settings_for(tmp_path, **{variable: value})


def test_environment_overrides_reach_the_settings(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, AILAB_PORT="9000", N_GPU_LAYERS="12", AILAB_TOOL_APPROVAL="deny"
    )
    assert (settings.port, settings.n_gpu_layers, settings.tool_approval) == (9000, 12, "deny")


def test_a_gguf_dropped_into_custom_is_listed_as_finetuned(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    (models_dir / "custom").mkdir(parents=True)
    (models_dir / "custom" / "My-Tune.gguf").write_bytes(b"GGUF")
    (models_dir / "custom" / "My-Tune.json").write_text(json.dumps({"base_model": "smollm2-135m"}))
    settings = settings_for(tmp_path, AILAB_MODELS_DIR=str(models_dir))
    entry = config.get_all_models(settings)["my-tune"]
    assert entry["is_finetuned"] and entry["base_model"] == "smollm2-135m"
    source = get_model_source(settings, "my-tune")
    assert source.kind == "local_finetuned"
    assert source.path == models_dir / "custom" / "My-Tune.gguf"
    assert "my-tune" not in config.list_available_models(settings, include_finetuned=False)


def test_a_hugging_face_entry_resolves_to_a_download_until_the_file_exists(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, AILAB_MODELS_DIR=str(tmp_path))
    assert get_model_source(settings, "qwen2.5-0.5b").kind == "huggingface"
    (tmp_path / "qwen2.5-0.5b-instruct-q4_k_m.gguf").write_bytes(b"GGUF")
    assert get_model_source(settings, "qwen2.5-0.5b").kind == "local"


def test_an_unknown_model_key_raises_key_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        get_model_source(settings_for(tmp_path), "nope")


def test_extra_models_file_registers_models_and_rejects_bad_entries(tmp_path: Path) -> None:
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"mine": {"filename": "mine.gguf"}}))
    settings = settings_for(tmp_path, AILAB_EXTRA_MODELS=str(extra))
    assert "mine" in config.get_all_models(settings)
    extra.write_text(json.dumps({"broken": {"name": "no file"}}))
    with pytest.raises(ConfigError, match="AILAB_EXTRA_MODELS"):
        settings_for(tmp_path, AILAB_EXTRA_MODELS=str(extra))
