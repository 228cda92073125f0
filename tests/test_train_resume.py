"""Resume state (train_daemon.resume) and run identity (train_daemon.run), in process."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.config import ConfigError, load_config
from common.data import SftPair
from train_daemon import resume as resume_module
from train_daemon.batching import ExampleStream, build_micro_batches, tokenize_pairs
from train_daemon.resume import ResumeError, ResumeWriter, TrainerState, load_resume_state, save_resume_state, trim_log
from train_daemon.run import resolve_run, write_run_files
from train_daemon.schedule import make_scheduler
from train_daemon.step import make_optimizer, train_step

CPU = torch.device("cpu")


class Trainer:
    """The pieces of the daemon's loop, small enough to run a few steps in a test."""

    def __init__(self, model_dir, examples, device=CPU):
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
        self.model.to(device).train()
        self.optimizer = make_optimizer(self.model, 1e-3, (0.9, 0.95), 0.01, device)
        self.scheduler = make_scheduler(self.optimizer, 2, 10, 0.0)
        self.examples = examples
        self.stream = ExampleStream(len(examples), seed=5)
        self.state = TrainerState()

    def steps(self, count, before_update=None):
        losses = []
        for _ in range(count):
            batches = build_micro_batches(self.examples, self.stream.take(4), 2, True, 0)
            result = train_step(self.model, batches, self.optimizer, self.scheduler, 1.0, self.device, None,
                                before_update)
            self.state.step += 1
            self.state.data_epoch, self.state.data_index = self.stream.epoch, self.stream.index
            losses.append(result.loss.item())
        return losses


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [SftPair(f"Problem {i}: what is {i}+{i}? <think>", f" {2 * i} </think> <answer> {2 * i} </answer>")
             for i in range(6)]
    return tokenize_pairs(pairs, tokenizer, 128)


@pytest.mark.slow  # a real model trains (seconds)
def test_resumed_training_continues_exactly(tmp_path, tiny_model_dir, examples):
    original = Trainer(tiny_model_dir, examples)
    original.steps(3)
    save_resume_state(tmp_path, original.state, original.model, original.optimizer, original.scheduler)
    torch_draw, python_draw = torch.rand(3), random.random()
    expected = original.steps(3)

    resumed = Trainer(tiny_model_dir, examples)  # fresh process: base weights, new optimizer
    state = load_resume_state(tmp_path, resumed.model, resumed.optimizer, resumed.scheduler, CPU)
    assert (state.step, state.data_epoch, state.data_index) == (3, 1, 6)  # 12 examples of 6: end of epoch 1
    torch.testing.assert_close(torch.rand(3), torch_draw)
    assert random.random() == python_draw
    resumed.state = state
    resumed.stream = ExampleStream(len(examples), seed=5, epoch=state.data_epoch, index=state.data_index)
    assert resumed.steps(3) == pytest.approx(expected, abs=1e-6)
    assert resumed.scheduler.get_last_lr() == original.scheduler.get_last_lr()


@pytest.mark.slow  # a real model trains (seconds)
def test_background_save_holds_the_state_of_its_step_while_training_goes_on(tmp_path, tiny_model_dir, examples):
    trainer = Trainer(tiny_model_dir, examples)
    trainer.steps(2)
    writer = ResumeWriter(tmp_path, saved_step=0)
    writer.save(trainer.state, trainer.model, trainer.optimizer, trainer.scheduler)
    at_save = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = trainer.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    trainer.steps(2)  # changes weights and optimizer state in place while the writer may still be writing
    assert writer.wait() and writer.requested_step == 2
    fresh = Trainer(tiny_model_dir, examples)
    assert load_resume_state(tmp_path, fresh.model, fresh.optimizer, fresh.scheduler, CPU).step == 2
    for name, tensor in fresh.model.state_dict().items():
        torch.testing.assert_close(tensor, at_save[name], msg=name)
    torch.testing.assert_close(fresh.optimizer.state_dict()["state"][0]["exp_avg"], moments)


@pytest.mark.slow  # a real model trains (seconds)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous snapshot copy is CUDA's")
def test_on_a_gpu_the_snapshot_copy_runs_behind_training_and_holds_its_step(tmp_path, tiny_model_dir, examples):
    """The copy to pinned memory is queued on a side stream and the next optimizer step waits for it
    on the GPU (fence): the state written is the state at the save, though training went on at once."""
    cuda = torch.device("cuda")
    trainer = Trainer(tiny_model_dir, examples, cuda)
    writer = ResumeWriter(tmp_path, saved_step=0)
    writer.allocate(trainer.model, trainer.optimizer)
    trainer.steps(2)
    writer.save(trainer.state, trainer.model, trainer.optimizer, trainer.scheduler)
    at_save = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    moments = trainer.optimizer.state_dict()["state"][0]["exp_avg"].cpu().clone()
    trainer.steps(3, before_update=writer.writer.fence)
    assert writer.wait() and writer.saved_step == 2
    fresh = Trainer(tiny_model_dir, examples, cuda)
    assert load_resume_state(tmp_path, fresh.model, fresh.optimizer, fresh.scheduler, cuda).step == 2
    for name, tensor in fresh.model.state_dict().items():
        torch.testing.assert_close(tensor.cpu(), at_save[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(fresh.optimizer.state_dict()["state"][0]["exp_avg"].cpu(), moments, rtol=0, atol=0)


@pytest.mark.slow  # a real model trains (seconds)
def test_a_failed_save_keeps_the_previous_state(tmp_path, tiny_model_dir, examples, monkeypatch):
    trainer = Trainer(tiny_model_dir, examples)
    trainer.steps(1)
    save_resume_state(tmp_path, trainer.state, trainer.model, trainer.optimizer, trainer.scheduler)
    trainer.steps(1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(resume_module.torch, "save", disk_full)
    with pytest.raises(OSError):
        save_resume_state(tmp_path, trainer.state, trainer.model, trainer.optimizer, trainer.scheduler)
    monkeypatch.undo()
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_000001"]
    fresh = Trainer(tiny_model_dir, examples)
    assert load_resume_state(tmp_path, fresh.model, fresh.optimizer, fresh.scheduler, CPU).step == 1


@pytest.mark.slow  # a real model trains (seconds)
def test_a_background_save_that_raises_anything_is_a_failure_of_its_step(tmp_path, tiny_model_dir, examples,
                                                                         monkeypatch):
    trainer = Trainer(tiny_model_dir, examples)
    trainer.steps(1)
    writer = ResumeWriter(tmp_path, saved_step=0)
    writer.save(trainer.state, trainer.model, trainer.optimizer, trainer.scheduler)
    assert writer.wait() and writer.saved_step == 1

    def torch_save_on_a_full_disk(*args, **kwargs):  # what torch.save raises there: a RuntimeError
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(resume_module.torch, "save", torch_save_on_a_full_disk)
    trainer.steps(1)
    writer.save(trainer.state, trainer.model, trainer.optimizer, trainer.scheduler)
    assert not writer.wait() and writer.saved_step == 1
    (failure,) = writer.writer.failures
    assert failure.step == 2 and not failure.disk_full and "RuntimeError" in failure.cause
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_000001"]


def test_no_state_means_a_fresh_start_and_a_broken_state_is_one_clear_error(tmp_path, tiny_model_dir, examples):
    trainer = Trainer(tiny_model_dir, examples)
    assert load_resume_state(tmp_path, trainer.model, trainer.optimizer, trainer.scheduler, CPU) is None
    (tmp_path / "latest.json").write_text(json.dumps({"step": 4, "dir": "step_000004"}))
    with pytest.raises(ResumeError, match="delete that directory") as info:
        load_resume_state(tmp_path, trainer.model, trainer.optimizer, trainer.scheduler, CPU)
    assert "\n" not in str(info.value)


def test_trim_log_drops_redone_steps_and_torn_lines(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"train_step": s, "train/loss": 1.0 / s}) for s in range(1, 7)]
    log.write_text("\n".join(lines) + '\n{"train_step": 7, "train/lo')
    assert trim_log(log, 4) == 3
    assert [json.loads(line)["train_step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert trim_log(tmp_path / "missing.jsonl", 4) == 0


def test_a_new_run_gets_an_id_name_and_group(tmp_path):
    config = load_config(None, [f"paths.results_dir={tmp_path}"])
    run = resolve_run(config)
    assert run.is_new and run.run_id.startswith("sft-") and run.run_name.startswith("math-sft-dual-gpu-")
    assert config.training.run_id == run.run_id and config.logging.wandb_group == run.run_id == run.wandb_group
    write_run_files(run, config)
    assert json.loads((run.run_dir / "run.json").read_text())["run_name"] == run.run_name


def test_an_existing_run_keeps_its_name_and_refuses_a_different_data_order(tmp_path):
    first = load_config(None, [f"paths.results_dir={tmp_path}", "training.run_id=r1"])
    run = resolve_run(first)
    write_run_files(run, first)
    again = resolve_run(load_config(None, [f"paths.results_dir={tmp_path}", "training.run_id=r1",
                                           "training.max_steps=500"]))
    assert not again.is_new and again.run_name == run.run_name and again.wandb_group == "r1"
    changed = load_config(None, [f"paths.results_dir={tmp_path}", "training.run_id=r1", "training.batch_size=8"])
    with pytest.raises(ConfigError, match="training.batch_size is 8 but run r1 was started with 40"):
        resolve_run(changed)
