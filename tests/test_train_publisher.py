"""Background checkpoint publishing (train_daemon.publisher): snapshot semantics, one write in
flight, failures that damage nothing, and directories that from_pretrained loads unchanged."""

from __future__ import annotations

import errno
import logging

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.contract import Marker, Sidecar, mark_evaluated, read_manifest, read_sidecar
from train_daemon import publisher as publisher_module
from train_daemon.publisher import TEST_DELAY_ENV, CheckpointPublisher


@pytest.fixture
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, use_safetensors=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _publisher(tmp_path, model, tokenizer, keep_last=0):
    return CheckpointPublisher(tmp_path / "ckpt", "run1", model, tokenizer, torch.float32, keep_last)


def _publish(publisher, model, step):
    metrics = {"train_loss": 1.0 / (step + 1), "learning_rate": 1e-5, "tokens_seen": step * 10, "epoch": step / 10}
    publisher.publish(model, step, Sidecar(run_id="r", step=step, wandb_group="g", metrics=metrics), metrics)


def test_published_checkpoint_is_a_complete_model_dir_with_sidecar(tmp_path, model, tokenizer):
    publisher = _publisher(tmp_path, model, tokenizer)
    _publish(publisher, model, 0)
    publisher.wait()
    directory = tmp_path / "ckpt" / "step_000000"
    loaded = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
    assert AutoTokenizer.from_pretrained(directory).eos_token == tokenizer.eos_token
    assert (directory / "generation_config.json").exists()
    assert read_sidecar(directory).wandb_group == "g"
    assert read_manifest(tmp_path / "ckpt").checkpoints[0].metrics["tokens_seen"] == 0


def test_weights_are_those_at_publish_time_even_if_training_goes_on_during_the_write(
        tmp_path, model, tokenizer, monkeypatch, caplog):
    monkeypatch.setenv(TEST_DELAY_ENV, "1.0")
    publisher = _publisher(tmp_path, model, tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _publish(publisher, model, 1)
    # publish() has returned while the write is still in flight: training is not held up.
    assert not (tmp_path / "ckpt" / "manifest.json").exists()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # "training" on while the writer works
    with caplog.at_level(logging.WARNING, logger="train_daemon.publisher"):
        _publish(publisher, model, 2)  # at most one write in flight: this one waits for step 1
        assert read_manifest(tmp_path / "ckpt").steps() == [1]
    assert any("waited" in r.getMessage() for r in caplog.records)
    publisher.wait()
    assert read_manifest(tmp_path / "ckpt").steps() == [1, 2]
    written = load_file(str(tmp_path / "ckpt" / "step_000001" / "model.safetensors"))
    torch.testing.assert_close(written["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    written = load_file(str(tmp_path / "ckpt" / "step_000002" / "model.safetensors"))
    torch.testing.assert_close(written["model.embed_tokens.weight"], before["model.embed_tokens.weight"] + 1.0)
    assert "lm_head.weight" not in written  # tied to the embedding, stored once as the hub files do


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    # What safetensors raises on a full disk: not an OSError.
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_disk_full_reaches_the_caller_damages_nothing_and_stops_further_writes(tmp_path, model, tokenizer,
                                                                              monkeypatch, caplog, error):
    publisher = _publisher(tmp_path, model, tokenizer)
    _publish(publisher, model, 0)
    publisher.wait()
    manifest_before = (tmp_path / "ckpt" / "manifest.json").read_text()
    real_save_file = publisher_module.save_file

    def disk_full(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata)  # part of the data made it to disk ...
        raise error

    monkeypatch.setattr(publisher_module, "save_file", disk_full)
    with caplog.at_level(logging.ERROR):
        _publish(publisher, model, 5)
        publisher.wait()
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    (failure,) = publisher.writer.failures
    assert (failure.step, failure.disk_full) == (5, True) and publisher.failed_steps == [5]
    assert (tmp_path / "ckpt" / "manifest.json").read_text() == manifest_before
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["manifest.json", "step_000000"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "step_000000", use_safetensors=True)

    monkeypatch.setattr(publisher_module, "save_file", real_save_file)
    _publish(publisher, model, 10)  # the disk is known to be full: not written into
    publisher.wait()
    assert publisher.failed_steps == [5, 10] and read_manifest(tmp_path / "ckpt").steps() == [0]


def test_any_exception_of_the_write_reaches_the_caller(tmp_path, model, tokenizer, monkeypatch):
    publisher = _publisher(tmp_path, model, tokenizer)
    monkeypatch.setattr(publisher_module, "save_file", lambda *args, **kwargs: 1 / 0)
    _publish(publisher, model, 3)
    publisher.wait()
    (failure,) = publisher.writer.failures
    assert (failure.step, failure.disk_full) == (3, False) and "ZeroDivisionError" in failure.cause
    assert not (tmp_path / "ckpt" / "manifest.json").exists() and not list((tmp_path / "ckpt").iterdir())
    monkeypatch.undo()
    _publish(publisher, model, 4)  # not a full disk: the next publish is written
    publisher.wait()
    assert read_manifest(tmp_path / "ckpt").steps() == [4]


def test_retention_runs_after_each_publish_and_spares_unevaluated_steps(tmp_path, model, tokenizer):
    publisher = _publisher(tmp_path, model, tokenizer, keep_last=1)
    for step in (0, 10):
        _publish(publisher, model, step)
        publisher.wait()
    mark_evaluated(tmp_path / "ckpt", Marker(step=10, eval_key="k", status="ok"))
    _publish(publisher, model, 20)
    publisher.wait()
    # 0 was never evaluated: kept; 10 was evaluated and is not among the newest 1: deleted.
    assert read_manifest(tmp_path / "ckpt").steps() == [0, 20]
    assert not (tmp_path / "ckpt" / "step_000010").exists()
