"""Eval engine reuse and daemon overhead, measured with the real vLLM engine and the daemon's code.

Prints a table of:
- vLLM cold start (first engine of the process) and a restart on a new checkpoint (close + start),
- loading a new checkpoint into the live engine (the daemon's path; median of 3), and its ratio to
  the cold start (target: <= 1/10),
- one bare `generate` call on the eval prompts vs the daemon's full evaluation of a checkpoint
  (eval_daemon.__main__.evaluate_checkpoint: weight reload, generate, grade, entropy subsample,
  files, DuckDB commit, marker) on the same prompts and checkpoint: the overhead ratio.

Without --model it builds the tiny test model (CPU); the second checkpoint is that model with
perturbed weights. With --model (a real model directory) the second checkpoint is a directory of
symlinks to the same files: reload cost does not depend on the values of the weights.

    python bench/eval_engine_reuse.py                                         # CPU, tiny model
    python bench/eval_engine_reuse.py --model /path/to/Qwen2.5-Math-1.5B --device cuda:0 \\
        --num-prompts 5000 --test-source /path/to/MATH                       # GPU, real size
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (default: build the tiny test model)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda:N")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, help="default: 1024 on GPU, 32 on CPU")
    parser.add_argument("--test-source", help="MATH directory / JSONL (default: the built-in demo problems)")
    parser.add_argument("--entropy-sample-size", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--reloads", type=int, default=3)
    return parser.parse_args()


def make_checkpoints(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path]:
    """Two published-looking model directories with the same architecture and tokenizer."""
    if args.model:
        first = Path(args.model).resolve()
        second = workdir / "second"
        second.mkdir()
        for file in first.iterdir():
            if file.is_file():
                (second / file.name).symlink_to(file)
        return first, second
    import torch
    from transformers import AutoModelForCausalLM

    from common.demo.tiny_model import build_tiny_model

    first = build_tiny_model(workdir / "tiny")
    model = AutoModelForCausalLM.from_pretrained(first)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    second = workdir / "tiny_perturbed"
    model.save_pretrained(second)
    for file in first.glob("tokenizer*"):
        shutil.copy(file, second)
    return first, second


def make_eval_set(args: argparse.Namespace, workdir: Path, config):
    from common.data import load_math
    from common.demo.data import write_demo_dataset
    from eval_daemon.evaluate import load_eval_set

    source = args.test_source or str(write_demo_dataset(workdir / "demo_math", train=1, test=args.num_prompts))
    config.evaluation.test_source = source
    available = len(load_math(source, "test"))
    config.evaluation.num_eval_samples = args.num_prompts if args.num_prompts < available else 0
    eval_set = load_eval_set(config.evaluation, config.data.prompt_template)
    if len(eval_set.examples) < args.num_prompts:  # a small source is cycled up to the requested size
        repeat = -(-args.num_prompts // len(eval_set.examples))
        eval_set.examples = (eval_set.examples * repeat)[: args.num_prompts]
        eval_set.prompts = (eval_set.prompts * repeat)[: args.num_prompts]
    return eval_set


def timed(function, *arguments) -> float:
    started = time.perf_counter()
    function(*arguments)
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    on_gpu = args.device.startswith("cuda")
    if on_gpu and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.device.split(":")[1] if ":" in args.device else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    device = "cuda:0" if on_gpu else "cpu"
    max_tokens = args.max_tokens or (1024 if on_gpu else 32)

    from common.config import load_config
    from common.contract import Checkpoint, Layout
    from common.grading import Grader
    from common.store.writer import eval_key
    from eval_daemon.__main__ import Context, evaluate_checkpoint
    from eval_daemon.engines.base import Sampling
    from eval_daemon.engines.vllm import VllmEngine
    from eval_daemon.records import Trackers
    from eval_daemon.shutdown import StopSignal

    workdir = Path(tempfile.mkdtemp(prefix="eval_engine_reuse-"))
    results = workdir / "results"
    config = load_config(None, [
        "evaluation.engine=vllm", f"evaluation.device={args.device}", f"evaluation.max_tokens={max_tokens}",
        f"evaluation.entropy_sample_size={args.entropy_sample_size}", f"paths.results_dir={results}",
        f"data.prompt_template={REPO / 'config' / 'r1_zero.prompt'}", "logging.wandb=false",
        "logging.progress_bar=false", f"model.dtype={'bfloat16' if on_gpu else 'float32'}",
        f"evaluation.max_model_len={2048 if on_gpu else 512}"])
    first, second = make_checkpoints(args, workdir)
    eval_set = make_eval_set(args, workdir, config)
    e = config.evaluation
    sampling = Sampling(e.temperature, e.top_p, e.max_tokens, tuple(e.stop), e.seed)
    engine = VllmEngine(device, config.model.dtype, args.gpu_memory_utilization, e.max_model_len, e.seed,
                        tokenizer_fallback=str(first))
    rows: list[tuple[str, str]] = []
    try:
        cold = timed(engine.load, str(first))
        engine.generate(eval_set.prompts[:4], sampling, False)  # warm-up (first-call kernels), untimed
        reloads = []
        for index in range(args.reloads):
            reloads.append(timed(engine.load, str(second if index % 2 == 0 else first)))
            assert engine.last_load["kind"] == "reload", engine.last_load
        engine.close()
        restart = timed(engine.load, str(second))
        reload = statistics.median(reloads)
        rows += [("vLLM cold start (first engine in the process)", f"{cold:.2f} s"),
                 ("vLLM restart on a new checkpoint (close + start)", f"{restart:.2f} s"),
                 (f"load new checkpoint into live engine (median of {args.reloads})", f"{reload:.3f} s"),
                 ("reload / cold start", f"{reload / cold:.4f} (target <= 0.1)"),
                 ("reload / restart", f"{reload / restart:.4f}")]

        with Grader(workers=e.grading_workers) as grader:
            grader.start()
            ctx = Context(config=config, layout=Layout.of(config), device=device, eval_set=eval_set, sampling=sampling,
                          eval_key=eval_key(e.eval_set, sampling.as_dict(), e.num_eval_samples, e.seed,
                                            samples_per_problem=e.samples_per_problem),
                          worker_id="bench", engine=engine, grader=grader, stop=StopSignal(),
                          trackers=Trackers(config, "bench", None))
            # The first evaluation of a process also pays one-off costs (DuckDB/Arrow imports, store
            # creation); the second, on another checkpoint, is the steady state that a daemon runs in.
            first_eval = timed(evaluate_checkpoint, ctx, Checkpoint(run_id="bench", step=0, path=first, run_dir=None))
            daemon = timed(evaluate_checkpoint, ctx, Checkpoint(run_id="bench", step=1, path=second, run_dir=None))
            reload_s = engine.last_load["seconds"]
            bare = timed(engine.generate, eval_set.prompts, sampling, False)
        summary = json.loads(next((results / "eval_logs").glob("summary_eval_step_1_*.json")).read_text())
        generation_s, grading_s, entropy_s = (summary[k] for k in ("generation_seconds", "grading_seconds",
                                                                   "entropy_seconds"))
        tokens = sum(json.loads(line)["response_length"]
                     for line in next((results / "eval_logs").glob("eval_step_1_*.jsonl")).read_text().splitlines())
        rest = daemon - generation_s - grading_s - reload_s  # generation_s includes the entropy subsample
        rows += [(f"bare generate, {len(eval_set.prompts)} prompts, max_tokens {max_tokens}", f"{bare:.2f} s"),
                 ("daemon evaluation of one checkpoint (wall, steady state)", f"{daemon:.2f} s"),
                 ("  generation, entropy subsample included", f"{generation_s:.2f} s"),
                 (f"    of which the entropy subsample ({summary['entropy_sample_size']} responses, "
                  f"{summary['entropy_method']})", f"{entropy_s:.2f} s ({100 * entropy_s / daemon:.1f}% of the evaluation)"),
                 ("  grading", f"{grading_s:.2f} s"),
                 ("  weight reload", f"{reload_s:.3f} s"),
                 ("  files + store commit + marker", f"{rest:.2f} s"),
                 ("overhead ratio (daemon evaluation / bare generate)", f"{daemon / bare:.3f}"),
                 ("first daemon evaluation in the process (one-off imports)", f"{first_eval:.2f} s"),
                 ("generated tokens, tokens/s (daemon run)", f"{tokens}, {tokens / generation_s:.0f}")]
    finally:
        engine.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(args, device, rows)


def print_table(args: argparse.Namespace, device: str, rows: list[tuple[str, str]]) -> None:
    model = args.model or "tiny test model (built on the fly)"
    print(f"\neval engine reuse: {model} on {args.device} ({device} in process)")
    width = max(len(name) for name, _ in rows)
    print(f"| {'measurement'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
