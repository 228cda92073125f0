"""What slows one vLLM generate call that the eval daemon makes, compared with a bare one: the same
engine generates the whole MATH test (forced lengths, as bench/eval_full.py) under each variant,
in rounds (A B C A B C ...), so that drift over minutes hits every variant alike. One table.

    PYTHONPATH=/tmp/site VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 bench/generate_interference.py \
        --model /tmp/rq --test-source .dev/bench/math_test.jsonl --rounds 2

Variants (the pieces in which the daemon's generate differs from a bare one): bare; right after a
weight reload into the live engine (only the generate is timed); with the daemon's GPU sampler
thread (eval_daemon.evaluate.GpuSampler: an NVML query a second); with the entropy subsample (256
responses, the prefill after generation included). --variants N keeps the first N. Each starts
from an empty prefix cache (since the fifth session; the runs in docs/PERFORMANCE.md's fourth
session had the bare variants reuse the previous call's cached prompt blocks). CPU smoke run
(tiny model, demo problems): python bench/generate_interference.py --device cpu --rounds 1
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.eval_full import ForcedLengthEngine, _demo_test_set, _tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (default: build the tiny test model)")
    parser.add_argument("--test-source", help="MATH test JSONL / directory (default: the demo problems)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--variants", type=int, default=0, help="run only the first N variants (0: all)")
    parser.add_argument("--device", default="cuda:0", help="cpu: a smoke run with a tiny model")
    parser.add_argument("--num-prompts", type=int, default=0, help="0: the whole test set")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from common.config import load_config
    from common.tracking import gpu_stats
    from eval_daemon.engines.base import Sampling
    from eval_daemon.evaluate import GpuSampler, load_eval_set

    on_gpu = args.device.startswith("cuda")
    workdir = Path(tempfile.mkdtemp(prefix="interference-"))
    model = Path(args.model).resolve() if args.model else _tiny_model(workdir)
    test_source = args.test_source or _demo_test_set(workdir, max(args.num_prompts, 16))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    config = load_config(None, ["evaluation.engine=vllm", f"evaluation.device={args.device}",
                                f"evaluation.test_source={test_source}",
                                f"evaluation.num_eval_samples={args.num_prompts}",
                                f"data.prompt_template={REPO / 'config' / 'r1_zero.prompt'}"])
    e = config.evaluation
    eval_set = load_eval_set(e, config.data.prompt_template)
    sampling = Sampling(e.temperature, e.top_p, e.max_tokens, tuple(e.stop), e.seed)
    engine = ForcedLengthEngine(eval_set, model, e.max_model_len, "cuda:0" if on_gpu else "cpu",
                                config.model.dtype if on_gpu else "float32", args.gpu_memory_utilization, e.seed)
    engine.load(str(model))
    engine.generate(eval_set.prompts[:8], sampling, False)  # first-call kernels, untimed
    started = time.perf_counter()
    for _ in range(20):
        gpu_stats(args.device)
    print(f"gpu_stats: {gpu_stats(args.device)}, {1000 * (time.perf_counter() - started) / 20:.2f} ms a call")

    def bare():
        engine.generate(eval_set.prompts, sampling, False)

    def with_gpu_sampler():
        with GpuSampler(args.device):
            engine.generate(eval_set.prompts, sampling, False)

    def with_entropy():
        engine.generate(eval_set.prompts, sampling, False, entropy_rows=eval_set.entropy_indices)

    copy = workdir / "model_copy"  # the same files under another path
    shutil.copytree(model, copy, copy_function=os.link)
    paths = [str(copy), str(model)]

    def after_reload():  # the daemon's order: load the new checkpoint into the live engine, then generate
        engine.load(paths[0])
        paths.reverse()
        started = time.perf_counter()
        engine.generate(eval_set.prompts, sampling, False)
        return time.perf_counter() - started

    variants = {"bare generate": bare, "generate right after a weight reload (generate timed)": after_reload,
                "with the GPU sampler thread": with_gpu_sampler, "with the entropy subsample": with_entropy}
    if args.variants:
        variants = dict(list(variants.items())[: args.variants])
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, run in variants.items():
            # Every variant starts from an empty prefix cache, as the daemon's generate does after its
            # reload (before the fifth session the bare one reused the previous call's prompt blocks).
            engine.llm.reset_prefix_cache()
            started = time.perf_counter()
            timed = run()
            seconds[name].append(timed if timed is not None else time.perf_counter() - started)
            print(f"round {round_index + 1} {name}: {seconds[name][-1]:.2f} s", flush=True)
    engine.close()
    shutil.rmtree(workdir, ignore_errors=True)
    bare_s = seconds["bare generate"]
    print(f"\ngenerate_interference: {len(eval_set.prompts)} prompts, {args.model or 'tiny model'} on {args.device}")
    for name, values in seconds.items():
        ratios = [v / b for v, b in zip(values, bare_s)]
        print(f"{name.ljust(56)} {', '.join(f'{v:.2f}' for v in values)} s; / bare of the same round: "
              f"{', '.join(f'{r:.3f}' for r in ratios)} (median {statistics.median(ratios):.3f})")


if __name__ == "__main__":
    main()
