"""The Hugging Face fallback engine on GPU vs a plain padded `model.generate` (generated tokens/s).

Same prompts (MATH test, R1-zero prompt), same model (real Qwen2.5-Math-1.5B architecture, random
weights, bf16), sampling at temperature 1, --max-new-tokens per response (random weights almost
never emit EOS, so every response has that length; the tokens are counted, not assumed):

- `padded model.generate, 128 prompts`: the issue's baseline shape, one left-padded batch of the
  first 128 prompts, after an untimed warm-up call (CUDA context, cuBLAS, kernels);
- `HfEngine batch loop, B`: eval_daemon.engines.hf.HfEngine with its batch decoding loop
  (eval_daemon/engines/hf_decode.py: preallocated KV cache, CUDA graphs), length-sorted left-padded
  batches of at most B prompts with stop strings, over all --num-prompts prompts, for each B in
  --loop-batches, run twice: the first run includes capturing the graphs, the second reuses them;
- `HfEngine generate, B`: the same engine with decoder "generate" (transformers' model.generate
  per batch), for each B in --generate-batches.

Rows print as they finish, so a run cut short by a timeout still reports what it measured.

    python bench/hf_generate.py --model DIR --test-source .dev/bench/math_test.jsonl    # GPU
    python bench/hf_generate.py --device cpu --num-prompts 8 --baseline-prompts 4 --max-new-tokens 8 \
        --loop-batches 4 --generate-batches 4                                           # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.data import build_prompt, load_math, load_prompt_template  # noqa: E402
from eval_daemon.engines.base import Sampling  # noqa: E402
from eval_daemon.engines.hf import HfEngine  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (default: build the tiny test model)")
    parser.add_argument("--test-source", help="MATH test JSONL / directory (default: the demo problems)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--num-prompts", type=int, default=1024, help="prompts for the engine variants")
    parser.add_argument("--baseline-prompts", type=int, default=128, help="prompts in the padded baseline batch")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--loop-batches", default="512", help="batch-loop batch sizes to measure ('' for none)")
    parser.add_argument("--eager-batches", default="", help="batch-loop sizes to measure without CUDA graphs")
    parser.add_argument("--generate-batches", default="", help="model.generate batch sizes to measure ('' for none)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hf_generate-"))
    model_dir = args.model or _tiny_model(workdir)
    source = args.test_source or _demo_test_set(workdir, args.num_prompts)
    template = load_prompt_template("config/r1_zero.prompt")
    prompts = [build_prompt(template, e.problem) for e in load_math(source, "test")[: args.num_prompts]]
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=args.max_new_tokens, stop=("</answer>",), seed=0)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"hf_generate: {len(prompts)} prompts (baseline: the first {args.baseline_prompts}), "
          f"max_new_tokens {args.max_new_tokens}, {dtype} on {card}", flush=True)
    print(f"{'what':<42} {'seconds':>8} {'tokens':>8} {'tokens/s':>9} {'vs baseline':>11}", flush=True)

    engine = HfEngine(args.device, dtype, batch_size=len(prompts), max_model_len=4096, seed=0,
                      tokenizer_fallback=str(model_dir))
    engine.load(str(model_dir))
    baseline_prompts = prompts[: args.baseline_prompts]
    _padded_generate(engine, baseline_prompts[:8], args.device, max_new_tokens=8)  # warm-up, untimed
    base = _report(f"padded model.generate, {len(baseline_prompts)} prompts",
                   lambda: _padded_generate(engine, baseline_prompts, args.device, args.max_new_tokens), args, None)
    for batch in [int(b) for b in args.loop_batches.split(",") if b]:
        engine.batch_size = batch
        for attempt in ("first run", "again"):
            _report(f"HfEngine batch loop, {batch}, {attempt}", lambda: engine.generate(prompts, sampling, False),
                    args, base)
        engine.batch_decoder = None  # free its KV buffers before the next size allocates its own
    engine.cuda_graphs = False
    for batch in [int(b) for b in args.eager_batches.split(",") if b]:
        engine.batch_size = batch
        _report(f"HfEngine batch loop, {batch}, no CUDA graphs", lambda: engine.generate(prompts, sampling, False),
                args, base)
        engine.batch_decoder = None
    engine.decoder, engine.loop_unsupported = "generate", "measuring model.generate"
    for batch in [int(b) for b in args.generate_batches.split(",") if b]:
        engine.batch_size = batch
        _report(f"HfEngine generate, {batch}", lambda: engine.generate(prompts, sampling, False), args, base)
    engine.close()


def _report(name: str, generate, args, base: float | None) -> float:
    seconds, tokens_per_second, tokens = _timed(generate, args)
    ratio = tokens_per_second / base if base else 1.0
    print(f"{name:<42} {seconds:>8.2f} {tokens:>8} {tokens_per_second:>9.0f} {ratio:>10.2f}x", flush=True)
    return tokens_per_second


def _timed(generate, args) -> tuple[float, float, int]:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    generations = generate()
    seconds = time.perf_counter() - started
    tokens = sum(g if isinstance(g, int) else g.num_tokens for g in generations)
    return seconds, tokens / seconds, tokens


def _padded_generate(engine: HfEngine, prompts: list[str], device: str, max_new_tokens: int) -> list[int]:
    """The baseline: every prompt in one left-padded batch, plain model.generate (new tokens per row)."""
    tokenizer = engine.tokenizer
    encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    torch.manual_seed(0)
    with torch.inference_mode():
        output = engine.model.generate(**encoded, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                       max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    new = output[:, encoded["input_ids"].shape[1]:]
    return [int((row != tokenizer.pad_token_id).sum()) for row in new]


def _tiny_model(workdir: Path) -> str:
    from common.demo.tiny_model import build_tiny_model

    return str(build_tiny_model(workdir / "tiny"))


def _demo_test_set(workdir: Path, count: int) -> str:
    from common.demo.data import write_demo_dataset

    return str(write_demo_dataset(workdir / "demo_math", train=1, test=count))


if __name__ == "__main__":
    main()
