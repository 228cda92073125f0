"""Start-up loading of the trainer (train_daemon.loading): device fallback and clear model errors."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from common.config import ConfigError, ModelConfig, load_config
from train_daemon.loading import check_model_source, choose_device, load_model


def test_cuda_requested_without_cuda_falls_back_to_cpu_float32_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = load_config(None, ["training.device=cuda:0", "model.dtype=bfloat16"])
    with caplog.at_level(logging.WARNING, logger="train_daemon.loading"):
        setup = choose_device(config)
    assert setup.device == torch.device("cpu") and setup.autocast_dtype is None and setup.save_dtype == torch.float32
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "CUDA is not available" in warning and "float32" in warning


@pytest.mark.parametrize("name", ["/no/such/dir", "./models/missing", "~/nothing-here", "a/b/c"])
def test_missing_local_model_paths_fail_before_loading(name):
    with pytest.raises(ConfigError, match="model.name_or_path: model directory .* does not exist"):
        check_model_source(ModelConfig(name_or_path=name))


def test_hub_ids_and_existing_directories_pass_the_early_check(tiny_model_dir):
    check_model_source(ModelConfig(name_or_path="Qwen/Qwen2.5-Math-1.5B"))
    check_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))


def test_a_model_directory_without_safetensors_is_one_clear_error(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    config = load_config(None, [f"model.name_or_path={tmp_path / 'model'}", "training.device=cpu"])
    with pytest.raises(ConfigError, match="cannot load the model from") as info:
        load_model(config, torch.device("cpu"))
    assert "\n" not in str(info.value)


def test_model_loads_in_float32_training_mode_with_gradient_checkpointing(tiny_model_dir):
    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", "training.device=cpu",
                                "training.gradient_checkpointing=true"])
    model = load_model(config, torch.device("cpu"))
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert model.is_gradient_checkpointing
