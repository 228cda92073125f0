"""Is one vLLM generate of the MATH test bound by the GPU or by the engine's Python process? One
table: for each bare generate (prefix cache cleared first, as after a checkpoint reload; forced
response lengths as in bench/eval_full.py), its wall time, the process's CPU time over it and the
time spent in Python's garbage collector.

    PYTHONPATH=/tmp/site VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 bench/generate_cpu_time.py \
        --model /tmp/rq --test-source .dev/bench/math_test.jsonl --rounds 3 [--gc-freeze] \
        [--llm-kwargs '{"compilation_config": {"max_cudagraph_capture_size": 1024}}']

Process CPU time close to the wall time means one core is busy for the whole call: with the
in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) scheduling, kernel launches and output
processing share one Python thread, so the call runs at the speed of that core, whatever the GPU.
--gc-freeze alternates each plain round with one that calls gc.freeze() before the generate.
--llm-kwargs adds engine arguments (max_num_seqs, compilation_config, ...) to the daemon's own.
CPU smoke run (tiny model, demo problems): python bench/generate_cpu_time.py --device cpu --rounds 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.eval_full import ForcedLengthEngine, _demo_test_set, _tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class GcClock:
    """Seconds spent in the garbage collector, and full (generation 2) collections, since reset()."""

    def __init__(self) -> None:
        self.seconds, self.full, self._started = 0.0, 0, None
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.seconds, self.full = 0.0, 0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.full += info["generation"] == 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (default: build the tiny test model)")
    parser.add_argument("--test-source", help="MATH test JSONL / directory (default: the demo problems)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gc-freeze", action="store_true", help="also a gc.freeze() variant in each round")
    parser.add_argument("--llm-kwargs", default="{}", help="JSON: extra vllm.LLM arguments")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--device", default="cuda:0", help="cpu: a smoke run with a tiny model")
    parser.add_argument("--num-prompts", type=int, default=0, help="0: the whole test set")
    args = parser.parse_args()
    extra = json.loads(args.llm_kwargs)

    import vllm

    from common.config import load_config
    from eval_daemon.engines.base import Sampling
    from eval_daemon.evaluate import load_eval_set

    on_gpu = args.device.startswith("cuda")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    workdir = Path(tempfile.mkdtemp(prefix="generate_cpu_time-"))
    model = Path(args.model).resolve() if args.model else _tiny_model(workdir)
    test_source = args.test_source or _demo_test_set(workdir, max(args.num_prompts, 16))
    config = load_config(None, ["evaluation.engine=vllm", f"evaluation.test_source={test_source}",
                                f"evaluation.num_eval_samples={args.num_prompts}",
                                f"data.prompt_template={REPO / 'config' / 'r1_zero.prompt'}"])
    e = config.evaluation
    eval_set = load_eval_set(e, config.data.prompt_template)
    sampling = Sampling(e.temperature, e.top_p, e.max_tokens, tuple(e.stop), e.seed)
    daemon_llm = vllm.LLM
    vllm.LLM = lambda *a, **k: daemon_llm(*a, **{**k, **extra})  # the daemon's engine, plus --llm-kwargs
    engine = ForcedLengthEngine(eval_set, model, 4096, "cuda:0" if on_gpu else "cpu",
                                "bfloat16" if on_gpu else "float32", args.gpu_memory_utilization, e.seed)
    engine.load(str(model))
    engine.generate(eval_set.prompts[:8], sampling, False)  # first-call kernels, untimed
    clock = GcClock()

    def run(label: str, freeze: bool) -> float:
        engine.llm.reset_prefix_cache()
        if freeze:
            gc.collect()
            gc.freeze()
        clock.reset()
        cpu_started, started = time.process_time(), time.perf_counter()
        engine.generate(eval_set.prompts, sampling, False)
        wall = time.perf_counter() - started
        if freeze:
            gc.unfreeze()
        print(f"{label}: wall {wall:.2f} s, process cpu {time.process_time() - cpu_started:.2f} s, gc {clock.seconds:.2f} s "
              f"({clock.full} full), objects tracked {len(gc.get_objects())}", flush=True)
        return wall

    walls: dict[str, list[float]] = {"plain": [], "gc.freeze": []}
    for _ in range(args.rounds):
        walls["plain"].append(run("plain", False))
        if args.gc_freeze:
            walls["gc.freeze"].append(run("gc.freeze", True))
    engine.close()
    print(f"\ngenerate_cpu_time: {len(eval_set.prompts)} prompts, {args.model or 'tiny model'} on {args.device}, "
          f"extra engine arguments {extra}")
    for name, values in walls.items():
        if values:
            print(f"{name.ljust(10)} {', '.join(f'{v:.2f}' for v in values)} s (median {statistics.median(values):.2f})")


if __name__ == "__main__":
    main()
