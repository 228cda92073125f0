"""The Hugging Face fallback engine on GPU vs a plain padded `model.generate` (generated tokens/s).

Same prompts (MATH test, R1-zero prompt), same model (real Qwen2.5-Math-1.5B architecture, random
weights, bf16), sampling at temperature 1, --max-new-tokens per response (random weights rarely
stop early, so both sides generate about the same number of tokens; the count is measured):

- `padded model.generate`: all prompts in one left-padded batch (the issue's baseline shape);
- `HfEngine batch B`: the eval daemon's engine (eval_daemon.engines.HfEngine: length-sorted,
  left-padded batches of B prompts, stop strings), for each B in --engine-batches.

    python bench/hf_generate.py --model DIR --test-source .dev/bench/math_test.jsonl    # GPU
    python bench/hf_generate.py --device cpu --num-prompts 8 --max-new-tokens 8         # CPU smoke run, tiny model
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
from eval_daemon.engines import HfEngine, Sampling  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (default: build the tiny test model)")
    parser.add_argument("--test-source", help="MATH test JSONL / directory (default: the demo problems)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--engine-batches", default="16,128", help="HfEngine batch sizes to measure")
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
    rows = []

    engine = HfEngine(args.device, dtype, batch_size=len(prompts), max_model_len=4096, seed=0,
                      tokenizer_fallback=str(model_dir))
    engine.load(str(model_dir))
    rows.append(("padded model.generate, one batch", *_timed(lambda: _padded_generate(engine, prompts, args), args)))
    for batch in [int(b) for b in args.engine_batches.split(",")]:
        engine.batch_size = batch
        rows.append((f"HfEngine batch {batch}", *_timed(lambda: engine.generate(prompts, sampling, False), args)))
    engine.close()

    base = rows[0][2]
    print(f"\nhf_generate: {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, {dtype} on "
          f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}")
    print(f"{'what':<36} {'seconds':>8} {'tokens':>8} {'tokens/s':>9} {'vs baseline':>11}")
    for name, seconds, tokens_per_second, tokens in rows:
        print(f"{name:<36} {seconds:>8.2f} {tokens:>8} {tokens_per_second:>9.0f} {tokens_per_second / base:>10.2f}x")


def _timed(generate, args) -> tuple[float, float, int]:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    generations = generate()
    seconds = time.perf_counter() - started
    tokens = sum(g if isinstance(g, int) else g.num_tokens for g in generations)
    return seconds, tokens / seconds, tokens


def _padded_generate(engine: HfEngine, prompts: list[str], args) -> list[int]:
    """The baseline: every prompt in one left-padded batch, plain model.generate (new tokens per row)."""
    tokenizer = engine.tokenizer
    encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(args.device)
    torch.manual_seed(0)
    with torch.inference_mode():
        output = engine.model.generate(**encoded, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                       max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    new = output[:, encoded["input_ids"].shape[1]:]
    return [int((row != tokenizer.pad_token_id).sum()) for row in new]


def _tiny_model(workdir: Path) -> str:
    from common.tiny_model import build_tiny_model

    return str(build_tiny_model(workdir / "tiny"))


def _demo_test_set(workdir: Path, count: int) -> str:
    from common.demo_data import write_demo_dataset

    return str(write_demo_dataset(workdir / "demo_math", train=1, test=count))


if __name__ == "__main__":
    main()
