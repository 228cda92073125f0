"""Training-loop stall per checkpoint publish: the trainer's publisher vs a synchronous save.

On the real Qwen2.5-Math-1.5B architecture (random weights), with the trainer's own model loading,
training step and publisher (train_daemon.publisher.CheckpointPublisher: snapshot to pinned host
memory, then a background thread writes the checkpoint directory and the manifest):

- `sync save_pretrained`: `model.save_pretrained(dir)` of the training model, in the loop (the naive way);
- `sync publish`: the publisher's complete publish (snapshot + write + fsync + rename + manifest), waited for;
- `publish() call`: how long `publish()` blocks the loop (the snapshot), median over --publishes;
- `stall per publish`: (time of a window of --window training steps that starts with a publish) minus
  (time of the same steps without one): the snapshot plus whatever the background write costs the
  loop (GIL, PCIe, page cache), median over --publishes windows.

    python bench/publish_stall.py --model DIR --data .dev/bench/math_train.jsonl [config overrides]   # GPU
    python bench/publish_stall.py --tiny --device cpu --window 2 --publishes 1                   # CPU smoke run
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_config  # noqa: E402
from common.contract import Sidecar, read_manifest  # noqa: E402
from common.data import load_math, load_prompt_template, math_to_sft_pairs  # noqa: E402
from train_daemon.batching import ExampleStream, build_micro_batches, tokenize_pairs  # noqa: E402
from train_daemon.loading import choose_device, load_model, load_tokenizer  # noqa: E402
from train_daemon.publisher import CheckpointPublisher  # noqa: E402
from train_daemon.schedule import make_scheduler  # noqa: E402
from train_daemon.step import make_optimizer, train_step  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (bench/make_random_model.py)")
    parser.add_argument("--tiny", action="store_true", help="build the tiny test model (CPU smoke run)")
    parser.add_argument("--data", default=".dev/bench/math_train.jsonl")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--workdir", help="where checkpoints are written (default: a temp dir, removed)")
    parser.add_argument("--window", type=int, default=8, help="training steps per timed window")
    parser.add_argument("--publishes", type=int, default=2)
    parser.add_argument("--examples-per-step", type=int, default=80)
    parser.add_argument("overrides", nargs="*", help="trainer config overrides (section.key=value)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model_dir = args.model or _tiny_model()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="publish_stall_"))
    config = load_config("config/sft_config.yaml", [
        f"model.name_or_path={model_dir}", f"data.train_source={args.data}", f"training.device={args.device}",
        "logging.wandb=false", "logging.progress_bar=false", *args.overrides])
    t = config.training
    tokenizer = load_tokenizer(config.model)
    template = load_prompt_template(config.data.prompt_template)
    examples = tokenize_pairs(math_to_sft_pairs(load_math(args.data, "train"), template), tokenizer,
                              config.model.max_seq_length)
    setup = choose_device(config)
    model = load_model(config, setup.device)
    optimizer = make_optimizer(model, t.learning_rate, (t.adam_beta1, t.adam_beta2), t.weight_decay, setup.device)
    scheduler = make_scheduler(optimizer, 1, 10_000, 0.0)
    stream = ExampleStream(len(examples), seed=0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    publisher = CheckpointPublisher(workdir / "checkpoints", "bench", model, tokenizer, setup.save_dtype, 0)
    print(f"device {_device_name(setup.device)}; overrides {' '.join(args.overrides) or '(none)'}", flush=True)

    # Every window trains on the same examples, so windows with and without a publish compare exactly.
    window_data = [stream.take(args.examples_per_step) for _ in range(max(args.window, 2))]

    def steps(count: int, publish_at_start: int | None = None) -> float:
        _sync(setup.device)
        start = time.perf_counter()
        for index in range(count):
            micro = build_micro_batches(examples, window_data[index], t.batch_size, t.packing, pad_id,
                                        t.max_tokens_per_micro_batch)
            train_step(model, micro, optimizer, scheduler, t.max_grad_norm, setup.device, setup.autocast_dtype)
            if index == 0 and publish_at_start is not None:
                call_start = time.perf_counter()
                publisher.publish(model, publish_at_start, Sidecar(run_id="bench", step=publish_at_start), {})
                publish_calls.append(time.perf_counter() - call_start)
        _sync(setup.device)
        return time.perf_counter() - start

    # ---- warm up (compilation, allocator, pinned host buffers), then the synchronous baselines
    publish_calls: list[float] = []
    steps(2, publish_at_start=1)
    publisher.wait()
    publish_calls.clear()
    start = time.perf_counter()
    model.save_pretrained(workdir / "sync_save_pretrained")
    sync_save_pretrained = time.perf_counter() - start
    size_gb = sum(f.stat().st_size for f in (workdir / "sync_save_pretrained").iterdir()) / 1e9
    shutil.rmtree(workdir / "sync_save_pretrained")
    start = time.perf_counter()
    publisher.publish(model, 2, Sidecar(run_id="bench", step=2), {})
    publisher.wait()
    sync_publish = time.perf_counter() - start

    # ---- stall: windows with a publish at their first step vs the same windows without
    stalls, plain_windows = [], []
    for index in range(args.publishes):
        plain_windows.append(steps(args.window))
        with_publish = steps(args.window, publish_at_start=10 + index)
        publisher.wait()  # a write outlasting the window is counted below, not hidden
        stalls.append(with_publish - plain_windows[-1])
    published = read_manifest(workdir / "checkpoints").steps()
    rows = [
        ("sync save_pretrained (training model, float32)", sync_save_pretrained, f"{size_gb:.1f} GB"),
        ("sync publish (snapshot + write + fsync + manifest)", sync_publish, "bf16" if setup.save_dtype == torch.bfloat16 else "fp32"),
        ("publish() call (snapshot; median)", statistics.median(publish_calls), ""),
        (f"stall per publish ({args.window}-step window; median)", statistics.median(stalls),
         f"windows without: {statistics.median(plain_windows):.2f} s"),
    ]
    print(f"manifest steps {published} (background write times: the publisher's log lines above)")
    print(f"{'what':<58} {'seconds':>8}  note")
    print("-" * 90)
    for name, seconds, note in rows:
        print(f"{name:<58} {seconds:>8.2f}  {note}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _tiny_model() -> str:
    from common.demo.tiny_model import build_tiny_model

    return str(build_tiny_model(Path(tempfile.mkdtemp(prefix="bench_tiny_"))))


if __name__ == "__main__":
    main()
