"""Full evaluation with the eval daemon's own loop, warm engine: publication -> committed record.

One process, the real pieces of `bin/eval`: the daemon loop (eval_daemon.__main__.serve: manifest
scan, evaluate_checkpoint: weight reload, generate, grade, entropy subsample, files, DuckDB commit,
marker). First, on the same engine and prompts: the engine's cold start, weight reloads into the
live engine. Then, for each step, in the main thread: a bare `generate` call (the overhead
baseline), a publication with common.contract.publish_checkpoint (as the trainer does), and the
daemon's loop until the store has its record (`serve --once`). With --trainer-thread (the runs
before the fourth session): the daemon's loop watches with its watchdog observer in the main
thread while a second thread runs the bare generates, publishes and waits for each record.

The bare generate starts from an empty prefix cache, as every evaluation of a new checkpoint does
(the daemon resets it after each reload: KV computed with the old weights is stale). Before the
fifth session it did not: it reused the previous evaluation's cached prompt blocks (~371k of the
809k prompt tokens of the MATH test), which no evaluation of a new checkpoint can, and the daemon's
generate looked 9-31% slower than it. --warm-cache-bare also times one bare generate the old way,
before step 1. The table shows the prompt tokens served from the prefix cache in each call.

Each daemon evaluation is compared with the mean of the bare generates just before and just after
it (one more bare generate follows the last step): the generation is CPU-bound in the engine's
Python process (process CPU time = wall time, fifth session) and its speed drifts over minutes on
these shared hosts; with the bare always first, a drift upwards was counted as daemon overhead.

Response lengths are forced (random weights never emit `</answer>` or EOS): each response gets
exactly as many tokens as the problem's reference SFT response (` {solution} </think> <answer>
{answer} </answer>` + EOS, real tokenizer), with vLLM's min_tokens = max_tokens = L, ignore_eos.

    python bench/eval_full.py --model DIR --test-source .dev/bench/math_test.jsonl     # GPU, all 5,000
    python bench/eval_full.py --device cpu --num-prompts 16                           # CPU smoke run, tiny model
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
RUN_ID = "bench"
STEPS = {1: "daemon as configured", 2: "entropy subsample off", 3: "daemon as configured, again",
         4: "daemon as configured, a third time"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (default: build the tiny test model)")
    parser.add_argument("--test-source", help="MATH test JSONL / directory (default: the demo problems)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--num-prompts", type=int, default=0, help="0: the whole test set")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--trainer-thread", action="store_true",
                        help="the structure of the runs before the fourth session: a second thread publishes "
                             "and runs the bare generates while the daemon's loop watches in the main thread")
    parser.add_argument("--steps", type=int, default=len(STEPS), choices=range(2, len(STEPS) + 1),
                        help="publish steps 1..N of STEPS (fewer fit a slower machine's time limit)")
    parser.add_argument("--warm-cache-bare", action="store_true",
                        help="before step 1, also time a bare generate that reuses the prefix cache of the "
                             "evaluation before it (the baseline of the runs before the fifth session)")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for step in [step for step in STEPS if step > args.steps]:
        del STEPS[step]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    on_gpu = args.device.startswith("cuda")
    if on_gpu:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", args.device.split(":")[1] if ":" in args.device else "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from common.config import load_config
    from common.contract import Layout
    from common.grading import Grader
    from common.store.schema import connect_read_only
    from common.store.writer import eval_key
    from eval_daemon.__main__ import Context, serve
    from eval_daemon.engines.base import Sampling
    from eval_daemon.evaluate import load_eval_set
    from eval_daemon.records import Trackers
    from eval_daemon.shutdown import StopSignal

    workdir = Path(tempfile.mkdtemp(prefix="eval_full-"))
    results = workdir / "results"
    model = Path(args.model) if args.model else _tiny_model(workdir)
    test_source = args.test_source or _demo_test_set(workdir, max(args.num_prompts, 16))
    config = load_config(None, [
        "evaluation.engine=vllm", f"evaluation.device={'cuda:0' if on_gpu else 'cpu'}",
        f"evaluation.test_source={test_source}", f"evaluation.num_eval_samples={args.num_prompts}",
        f"paths.results_dir={results}",
        f"evaluation.max_model_len={args.max_model_len}", f"evaluation.max_tokens={min(1024, args.max_model_len - 1)}",
        f"evaluation.gpu_memory_utilization={args.gpu_memory_utilization}",
        f"data.prompt_template={REPO / 'config' / 'r1_zero.prompt'}", f"model.dtype={'bfloat16' if on_gpu else 'float32'}",
        "logging.wandb=false", "logging.progress_bar=false"])
    e = config.evaluation
    eval_set = load_eval_set(e, config.data.prompt_template)
    sampling = Sampling(e.temperature, e.top_p, e.max_tokens, tuple(e.stop), e.seed)
    engine = ForcedLengthEngine(eval_set, model, args.max_model_len, "cuda:0" if on_gpu else "cpu", config.model.dtype,
                                e.gpu_memory_utilization, e.seed)
    rows: dict[str, float] = {}
    subsample = len(eval_set.entropy_indices)  # the configured entropy subsample (step 2 switches it off)
    first = _publish(results / "checkpoints", 0, model)  # what the engine starts on
    second = first.parent / "step_000000_copy"  # a second model directory: same files, another path
    shutil.copytree(first, second, copy_function=os.link)
    try:
        # ---- engine: cold start, weight reloads into the live engine
        started = time.perf_counter()
        engine.load(str(first))
        rows["cold_start_s"] = time.perf_counter() - started
        engine.generate(eval_set.prompts[:8], sampling, False)  # first-call kernels, untimed
        reloads = []
        for index in range(args.reloads):
            started = time.perf_counter()
            engine.load(str(second if index % 2 == 0 else first))
            assert engine.last_load["kind"] == "reload", engine.last_load
            reloads.append(time.perf_counter() - started)
        rows["reload_s"] = statistics.median(reloads)

        # ---- the daemon loop
        with Grader(workers=e.grading_workers) as grader:
            grader.start()
            stop = StopSignal()
            ctx = Context(config=config, layout=Layout.of(config), device="cuda:0" if on_gpu else "cpu", eval_set=eval_set, sampling=sampling,
                          eval_key=eval_key(e.eval_set, sampling.as_dict(), e.num_eval_samples, e.seed,
                                            samples_per_problem=e.samples_per_problem),
                          worker_id="bench", engine=engine, grader=grader, stop=stop,
                          trackers=Trackers(config, "bench", None))
            # Step 0 (already published) is evaluated first, like a daemon that starts on a run;
            # the timed publications come after it, with the engine warm.
            timing: dict[str, float] = {}
            bare_generate = functools.partial(_bare_generate, engine, eval_set.prompts, sampling)
            if args.trainer_thread:  # a trainer-like thread publishes and runs the bare generates
                publisher = threading.Thread(target=_publish_and_wait, daemon=True,
                                             args=(results / "checkpoints", model, ctx, timing, bare_generate,
                                                   args.warm_cache_bare))
                publisher.start()
                serve(ctx, once=False)
                publisher.join()
            else:
                _bare_publish_evaluate(results / "checkpoints", model, ctx, timing, bare_generate, args.warm_cache_bare)
            after = max(STEPS) + 1  # the bare generate after the last evaluation
            timing[f"bare_generate_s_{after}"], _, timing[f"bare_cached_tokens_{after}"] = bare_generate()
            logging.getLogger("bench").info("after step %d: bare generate %.2f s", after - 1,
                                            timing[f"bare_generate_s_{after}"])
        rows.update(timing)

        with connect_read_only(Layout.of(config).store) as con:
            for step in STEPS:
                total, generation, grading, method, scored, entropy = con.execute(
                    "select total_seconds, generation_seconds, grading_seconds, entropy_method, entropy_sample_size, "
                    "avg_token_entropy from evaluations where step = ?", [step]).fetchone()
                rows[f"daemon_evaluation_s_{step}"], rows[f"daemon_generation_s_{step}"] = total, generation
                rows[f"daemon_grading_s_{step}"] = grading
                rows[f"entropy_{step}"] = f"{method}: {scored} of {subsample} responses scored, " \
                                          f"mean {entropy if entropy is None else round(entropy, 4)} nats"
    finally:
        engine.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(args, len(eval_set.prompts), rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"num_prompts": len(eval_set.prompts), **rows}, indent=1, default=str))


def _publish_and_wait(checkpoints: Path, model: Path, ctx, timing: dict, bare_generate, warm_cache_bare: bool) -> None:
    """Trainer side: wait for step 0's record, then for each of STEPS: a bare generate on the same
    engine (the daemon is idle, watching), then publish the step and time it until its record is
    committed. Pairs of bare and daemon runs a minute apart: generation time drifts by several
    percent over minutes on one machine, so one baseline for all would measure the drift.
    Completion is the daemon's marker file, written right after the store commit
    (common.checkpoints): DuckDB refuses a second, read-only connection from the writing process."""
    try:
        _wait_marker(checkpoints / RUN_ID, 0)
        entropy_indices = ctx.eval_set.entropy_indices
        for step in STEPS:
            published = _bare_then_publish(checkpoints, model, ctx, step, entropy_indices, timing, bare_generate,
                                           warm_cache_bare, pause_s=1.0)  # the pause lets the daemon go idle
            _wait_marker(checkpoints / RUN_ID, step)
            timing[f"publication_to_record_s_{step}"] = time.perf_counter() - published
            _note_daemon_generate(ctx.engine, step, timing)
    finally:
        ctx.stop.requested = True  # the serve loop polls this flag every 0.5 s


def _bare_publish_evaluate(checkpoints: Path, model: Path, ctx, timing: dict, bare_generate,
                           warm_cache_bare: bool) -> None:
    """All in this (the main) thread, one after the other, as the bare and the daemon's generate
    must compare like with like: for each of STEPS a bare generate, the publication, then the
    daemon's loop until nothing is pending (serve --once: a manifest scan finds the new step)."""
    from common.contract import is_evaluated
    from eval_daemon.__main__ import serve

    serve(ctx, once=True)  # step 0
    entropy_indices = ctx.eval_set.entropy_indices
    for step in STEPS:
        published = _bare_then_publish(checkpoints, model, ctx, step, entropy_indices, timing, bare_generate,
                                       warm_cache_bare)
        serve(ctx, once=True)
        if not is_evaluated(checkpoints / RUN_ID, step):
            raise RuntimeError(f"step {step} was not recorded (see the daemon's log above)")
        timing[f"publication_to_record_s_{step}"] = time.perf_counter() - published
        _note_daemon_generate(ctx.engine, step, timing)


def _bare_then_publish(checkpoints: Path, model: Path, ctx, step: int, entropy_indices: list[int], timing: dict,
                       bare_generate, warm_cache_bare: bool, pause_s: float = 0.0) -> float:
    """One step's bare generate (timed), then its publication (timed); returns when it was
    published. Step 2's evaluation has the entropy subsample switched off (the overhead floor)."""
    ctx.eval_set.entropy_indices = [] if step == 2 else entropy_indices
    if step == 1 and warm_cache_bare:
        seconds, _, timing["bare_warm_cache_cached_tokens"] = bare_generate(reset_prefix_cache=False)
        timing["bare_warm_cache_s"] = seconds
        logging.getLogger("bench").info("bare generate reusing the prefix cache: %.2f s", seconds)
    seconds, generations, timing[f"bare_cached_tokens_{step}"] = bare_generate()
    timing[f"bare_generate_s_{step}"] = seconds
    timing["generated_tokens"] = sum(g.num_tokens for g in generations)
    timing["prompt_tokens"] = sum(len(g.prompt_token_ids) for g in generations)
    logging.getLogger("bench").info("step %d: bare generate %.2f s", step, seconds)
    time.sleep(pause_s)
    started = time.perf_counter()
    _publish(checkpoints, step, model)
    published = time.perf_counter()
    timing[f"publish_s_{step}"] = published - started
    return published


def _bare_generate(engine, prompts: list[str], sampling, reset_prefix_cache: bool = True):
    """(seconds, generations, prompt tokens served from the prefix cache) of one bare generate.
    The reset is not timed: the daemon's reset is part of its (timed) reload."""
    if reset_prefix_cache:
        engine.llm.reset_prefix_cache()
    started = time.perf_counter()
    generations = engine.generate(prompts, sampling, False)
    return time.perf_counter() - started, generations, engine.cached_prompt_tokens[0]


def _note_daemon_generate(engine, step: int, timing: dict) -> None:
    timing[f"daemon_cached_tokens_{step}"] = engine.cached_prompt_tokens[0]  # its generate, before the entropy call
    timing[f"daemon_entropy_s_{step}"] = engine.entropy_seconds  # the entropy scoring, part of generation_seconds
    logging.getLogger("bench").info("step %d: publication -> record %.2f s (bare generate before it %.2f s)", step,
                                    timing[f"publication_to_record_s_{step}"], timing[f"bare_generate_s_{step}"])


def _wait_marker(run_dir: Path, step: int, timeout_s: float = 900) -> None:
    from common.contract import is_evaluated

    deadline = time.monotonic() + timeout_s
    while not is_evaluated(run_dir, step):
        if time.monotonic() > deadline:
            raise TimeoutError(f"step {step} was not recorded within {timeout_s} s")
        time.sleep(0.1)  # coarse on purpose: the engine runs in this process and shares its GIL


def _publish(checkpoints: Path, step: int, model: Path) -> Path:
    """A trainer-style publication of `model` (hard links: the bytes are the same, the paths are new)."""
    from common.contract import Sidecar, publish_checkpoint

    def write_model(directory: Path) -> None:
        for file in model.iterdir():
            if file.is_file():
                _link_or_copy(file, directory / file.name)

    return publish_checkpoint(checkpoints / RUN_ID, RUN_ID, step, write_model, Sidecar(run_id=RUN_ID, step=step),
                              {"train_loss": None})


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copy2(source, target)


class ForcedLengthEngine:
    """The daemon's VllmEngine with each response forced to its reference solution's token length."""

    def __new__(cls, eval_set, model: Path, max_model_len: int, device: str, dtype: str, memory: float, seed: int):
        from transformers import AutoTokenizer

        from common.data import build_sft_response
        from eval_daemon.engines.vllm import VllmEngine

        tokenizer = AutoTokenizer.from_pretrained(str(model))
        prompt_lengths = [len(ids) for ids in tokenizer(eval_set.prompts, add_special_tokens=False)["input_ids"]]
        responses = tokenizer([build_sft_response(x) for x in eval_set.examples], add_special_tokens=False)["input_ids"]
        # +1 for EOS; capped so that prompt + response fits max_model_len
        lengths = {prompt: max(1, min(len(ids) + 1, max_model_len - n - 1))
                   for prompt, ids, n in zip(eval_set.prompts, responses, prompt_lengths)}

        class _Engine(VllmEngine):
            cached_prompt_tokens: list[int] = []  # per vLLM call of the last generate: prompt tokens from the prefix cache

            def generate(self, *args, **kwargs):
                self.cached_prompt_tokens = []
                return super().generate(*args, **kwargs)

            def _start(self, model_path):
                super()._start(model_path)
                llm_generate = self.llm.generate

                def counted_generate(*args, **kwargs):
                    outputs = llm_generate(*args, **kwargs)
                    self.cached_prompt_tokens.append(sum(o.num_cached_tokens or 0 for o in outputs))
                    return outputs

                self.llm.generate = counted_generate

            def _generation_params(self, sampling, prompt, n=1):
                from vllm import SamplingParams

                return SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=lengths[prompt],
                                      min_tokens=lengths[prompt], ignore_eos=True)

        return _Engine(device, dtype, memory, max_model_len, seed, tokenizer_fallback=str(model))


def print_table(args: argparse.Namespace, num_prompts: int, rows: dict) -> None:
    tokens = rows["generated_tokens"]
    bare = rows["bare_generate_s_1"]

    def around(step: int) -> float:  # the mean of the bare generates just before and just after the step
        return (rows[f"bare_generate_s_{step}"] + rows[f"bare_generate_s_{step + 1}"]) / 2

    paired = [rows[f"daemon_evaluation_s_{step}"] / around(step) for step in STEPS if step != 2]
    lines = [
        ("vLLM cold start (first engine of the process)", f"{rows['cold_start_s']:.2f} s"),
        (f"load a new checkpoint into the live engine (median of {args.reloads})", f"{rows['reload_s']:.2f} s"),
        ("reload / cold start (target <= 0.10)", f"{rows['reload_s'] / rows['cold_start_s']:.3f}"),
        (f"bare generate, {num_prompts} prompts, forced lengths (before step 1)",
         f"{bare:.2f} s ({tokens} tokens, {tokens / bare:.0f} tokens/s)"),
        ("daemon evaluation / mean of the bare generates just before and after it, median over the "
         "configured steps (target <= 1.10)", f"{statistics.median(paired):.3f} (each: {', '.join(f'{r:.3f}' for r in paired)})"),
    ]
    if "bare_warm_cache_s" in rows:
        lines.append(("bare generate reusing the last evaluation's prefix cache (before step 1; the old baseline)",
                      f"{rows['bare_warm_cache_s']:.2f} s ({rows['bare_warm_cache_cached_tokens']} of "
                      f"{rows['prompt_tokens']} prompt tokens from the cache)"))
    for step, label in STEPS.items():
        lines += [
            (f"step {step} ({label}): publication -> committed record (target <= 55 s)",
             f"{rows[f'publication_to_record_s_{step}']:.2f} s"),
            ("  daemon evaluation (reload+generate+grade+entropy+files+commit)", f"{rows[f'daemon_evaluation_s_{step}']:.2f} s"),
            ("  of which generation / grading", f"{rows[f'daemon_generation_s_{step}']:.2f} s / "
                                                f"{rows[f'daemon_grading_s_{step}']:.2f} s"),
            ("  token entropy", rows[f"entropy_{step}"]),
            ("  of which token entropy scoring (issue 17: <= 10% of the evaluation)",
             f"{rows[f'daemon_entropy_s_{step}']:.2f} s "
             f"({100 * rows[f'daemon_entropy_s_{step}'] / rows[f'daemon_evaluation_s_{step}']:.1f}%)"),
            ("  bare generate just before", f"{rows[f'bare_generate_s_{step}']:.2f} s"),
            ("  prompt tokens from the prefix cache: bare / daemon generate",
             f"{rows[f'bare_cached_tokens_{step}']} / {rows[f'daemon_cached_tokens_{step}']} of {rows['prompt_tokens']}"),
            ("  bare generate just after", f"{rows[f'bare_generate_s_{step + 1}']:.2f} s"),
            ("  daemon evaluation / mean of those two", f"{rows[f'daemon_evaluation_s_{step}'] / around(step):.3f}"),
            ("  daemon generation (entropy scoring taken out) / that mean",
             f"{(rows[f'daemon_generation_s_{step}'] - rows[f'daemon_entropy_s_{step}']) / around(step):.3f}"),
        ]
    width = max(len(name) for name, _ in lines)
    print(f"\neval_full: {args.model or 'tiny model'} on {args.device}")
    for name, value in lines:
        print(f"{name.ljust(width)}  {value}")


def _tiny_model(workdir: Path) -> Path:
    from common.demo.tiny_model import build_tiny_model

    return Path(build_tiny_model(workdir / "tiny"))


def _demo_test_set(workdir: Path, count: int) -> str:
    from common.demo.data import write_demo_dataset

    return str(write_demo_dataset(workdir / "demo_math", train=1, test=count))


if __name__ == "__main__":
    main()
