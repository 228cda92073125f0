"""Trainer throughput on the real Qwen2.5-Math-1.5B architecture (random weights) at MATH train lengths.

Each variant trains the same optimizer steps (effective batch 80 sequences of MATH train: R1-zero
prompt + SFT response, real tokenizer) and reports non-pad tokens/s, MFU and peak GPU memory:

- `plain`: the plain Hugging Face route: bf16 weights, padded micro-batches of --plain-micro-batch
  sequences, sdpa, `model(..., labels=...)` (full logits), torch AdamW.
- every other variant: the trainer's own path (train_daemon.loading.load_model, build_micro_batches,
  train_step) with the variant's config overrides on top of the default config.

Before timing, each trainer variant's loss and gradients on one batch of 16 sequences (same weights)
are compared with the plain path's (padded, full logits, HF loss): relative differences are printed
(bf16 tolerance: ~1e-2). MFU = 6 x 1.544e9 x non-pad tokens/s / 989e12 (H100/H200 dense bf16 peak).

    python bench/train_throughput.py --model DIR --data .dev/bench/math_train.jsonl \\
        --variants plain,default,fast --steps 4 --json $OUT/train_throughput.json      # GPU
    python bench/train_throughput.py --tiny --device cpu --steps 1                    # CPU smoke run

Variants are named in VARIANTS below; `--variants` takes names or `name=key=value;key=value`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_config  # noqa: E402
from common.data import load_math, load_prompt_template, math_to_sft_pairs  # noqa: E402
from train_daemon.batching import IGNORE_INDEX, ExampleStream, build_micro_batches, padded_micro_batch, tokenize_pairs  # noqa: E402
from train_daemon.loading import choose_device, load_model, load_tokenizer  # noqa: E402
from train_daemon.schedule import make_scheduler  # noqa: E402
from train_daemon.step import forward_backward, make_optimizer, train_step  # noqa: E402

PARAMS = 1.544e9  # Qwen2.5-Math-1.5B, tied embeddings (the issue's MFU formula)
PEAK_FLOPS = 989e12  # dense bf16, H100 SXM / H200
CHECK_SEQUENCES = 16
# Parameters whose gradients the loss check compares (plus the global gradient norm).
CHECK_PARAMS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.mlp.up_proj.weight", "model.norm.weight"]

# Config overrides of each named trainer variant (on top of config/sft_config.yaml's values).
VARIANTS = {
    "default": [],  # the trainer exactly as configured by default
    "nogc": ["training.gradient_checkpointing=false"],
    "gc": ["training.gradient_checkpointing=true"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (bench/make_random_model.py); default: --tiny")
    parser.add_argument("--tiny", action="store_true", help="build the tiny test model (CPU smoke run)")
    parser.add_argument("--data", default=".dev/bench/math_train.jsonl", help="MATH train (directory or JSONL)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--variants", default="plain,default")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--plain-micro-batch", type=int, default=8)
    parser.add_argument("--examples-per-step", type=int, default=80)
    parser.add_argument("--max-seconds", type=float, default=0, help="skip variants once this much time has passed")
    parser.add_argument("--json", help="write all results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    began = time.monotonic()
    model_dir = args.model or _tiny_model()
    base = [f"model.name_or_path={model_dir}", f"data.train_source={args.data}", f"training.device={args.device}",
            "logging.wandb=false", "logging.progress_bar=false"]
    config = load_config("config/sft_config.yaml", base)
    tokenizer = load_tokenizer(config.model)
    template = load_prompt_template(config.data.prompt_template)
    examples = tokenize_pairs(math_to_sft_pairs(load_math(args.data, "train"), template), tokenizer,
                              config.model.max_seq_length)
    lengths = [len(e.input_ids) for e in examples]
    print(f"{len(examples)} examples: mean {statistics.mean(lengths):.0f} tokens, max {max(lengths)}; "
          f"torch {torch.__version__}; device {_device_name(args.device)}", flush=True)
    stream = ExampleStream(len(examples), seed=0)
    steps = [stream.take(args.examples_per_step) for _ in range(args.warmup + args.steps)]
    check_indices = steps[0][:CHECK_SEQUENCES]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    reference = plain_check(model_dir, examples, check_indices, pad_id, args.device)
    results = []
    for spec in args.variants.split(","):
        name, overrides = _variant(spec)
        if args.max_seconds and time.monotonic() - began > args.max_seconds:
            results.append({"variant": name, "error": "skipped (time budget)"})
            continue
        print(f"--- {name}: {' '.join(overrides) or '(defaults)'}", flush=True)
        try:
            if name == "plain":
                result = run_plain(model_dir, examples, steps, pad_id, args)
            else:
                result = run_trainer(load_config("config/sft_config.yaml", base + overrides), examples, steps,
                                     check_indices, reference, pad_id, args)
        except torch.OutOfMemoryError as exc:
            result = {"error": f"OOM ({str(exc).splitlines()[0][:90]})"}
        except (RuntimeError, ValueError) as exc:  # one broken variant (compiler, kernel) must not hide the others
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"}
        result.update(variant=name, overrides=overrides)
        results.append(result)
        print(json.dumps(result), flush=True)
        _free()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": _device_name(args.device), "torch": torch.__version__,
                                               "results": results}, indent=1))
    print_table(results)


# ---- the plain Hugging Face route ----------------------------------------------------------------


def run_plain(model_dir, examples, steps, pad_id, args) -> dict:
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0)

    def one_step(indices):
        micro = [padded_micro_batch([examples[i] for i in indices[s:s + args.plain_micro_batch]], pad_id)
                 for s in range(0, len(indices), args.plain_micro_batch)]
        for mb in micro:
            labels = _unshifted_labels(mb)
            out = model(input_ids=mb.input_ids.to(device), attention_mask=mb.attention_mask.to(device),
                        labels=labels.to(device), use_cache=False)
            out.loss.backward()  # HF mean over this micro-batch's response tokens (the usual route)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(mb.num_tokens for mb in micro), sum(mb.input_ids.numel() for mb in micro)

    result = _time_steps(one_step, steps, args.warmup, device)
    result["micro_batch"] = f"{args.plain_micro_batch} padded"
    return result


def _unshifted_labels(mb) -> torch.Tensor:
    """HF `labels` (unshifted) for a padded micro-batch, from its shifted targets."""
    flat = torch.full((mb.input_ids.numel(),), IGNORE_INDEX, dtype=torch.long)
    flat[mb.target_index] = mb.target_ids
    shifted = flat.view(mb.input_ids.shape)
    labels = torch.full_like(shifted, IGNORE_INDEX)
    labels[:, 1:] = shifted[:, :-1]
    return labels


def plain_check(model_dir, examples, indices, pad_id, device_name) -> dict:
    """Loss and selected gradients of the plain path (fp32 weights, bf16 autocast on GPU, padded,
    full logits, HF loss) on the check batch: the reference the trainer variants must match."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device_name)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.train()
    mb = padded_micro_batch([examples[i] for i in indices], pad_id)
    with _autocast(device):
        out = model(input_ids=mb.input_ids.to(device), attention_mask=mb.attention_mask.to(device),
                    labels=_unshifted_labels(mb).to(device), use_cache=False)
    out.loss.backward()
    reference = _loss_and_grads(model, out.loss)
    del model, out
    _free()
    return reference


def _loss_and_grads(model, loss) -> dict:
    params = dict(model.named_parameters())
    grads = {name: params[name].grad.detach().float().cpu().clone() for name in CHECK_PARAMS if name in params}
    norm = torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach()), "grads": grads, "grad_norm": float(norm)}


def _compare(result: dict, reference: dict) -> dict:
    per_param = {name: float((grad - reference["grads"][name]).norm() / reference["grads"][name].norm().clamp_min(1e-30))
                 for name, grad in result["grads"].items()}
    return {"loss": result["loss"], "loss_rel_diff": abs(result["loss"] - reference["loss"]) / abs(reference["loss"]),
            "grad_rel_diff": max(per_param.values()), "grad_rel_diff_per_param": per_param,
            "grad_norm_rel_diff": abs(result["grad_norm"] - reference["grad_norm"]) / reference["grad_norm"]}


# ---- the trainer's path --------------------------------------------------------------------------


def run_trainer(config, examples, steps, check_indices, reference, pad_id, args) -> dict:
    t = config.training
    setup = choose_device(config)
    model = load_model(config, setup.device)
    # Loss check first, on the same weights as the reference (before any optimizer step).
    check_mb = build_micro_batches(examples, check_indices, len(check_indices), t.packing, pad_id)[0]
    loss_sum, tokens = forward_backward(model, check_mb.to(setup.device), check_mb.num_target_tokens,
                                        setup.autocast_dtype)
    check = _compare(_loss_and_grads(model, loss_sum / tokens), reference)

    optimizer = make_optimizer(model, t.learning_rate, (t.adam_beta1, t.adam_beta2), t.weight_decay, setup.device)
    scheduler = make_scheduler(optimizer, 1, 1000, 0.0)

    def one_step(indices):
        micro = build_micro_batches(examples, indices, t.batch_size, t.packing, pad_id, t.max_tokens_per_micro_batch)
        result = train_step(model, micro, optimizer, scheduler, t.max_grad_norm, setup.device, setup.autocast_dtype)
        return result.num_tokens, sum(mb.input_ids.numel() for mb in micro)

    result = _time_steps(one_step, steps, args.warmup, setup.device)
    cap = f"<={t.max_tokens_per_micro_batch // 1024}k" if t.packing and t.max_tokens_per_micro_batch else ""
    result["micro_batch"] = f"{t.batch_size}{cap} {'packed' if t.packing else 'padded'}"
    result["check"] = check
    return result


# ---- timing and reporting ------------------------------------------------------------------------


def _time_steps(one_step, steps, warmup, device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, tokens, slots = [], 0, 0
    warmup_start = time.perf_counter()
    for index, indices in enumerate(steps):
        if index == warmup:
            warmup_seconds = time.perf_counter() - warmup_start
        _sync(device)
        start = time.perf_counter()
        step_tokens, step_slots = one_step(indices)
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
            tokens += step_tokens
            slots += step_slots
    tokens_per_second = tokens / sum(times)
    result = {"step_seconds": [round(s, 3) for s in times], "tokens_per_step": tokens / len(times),
              "padding_fraction": 1 - tokens / slots, "tokens_per_second": tokens_per_second,
              "mfu": 6 * PARAMS * tokens_per_second / PEAK_FLOPS, "warmup_seconds": warmup_seconds}
    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return result


def print_table(results: list[dict]) -> None:
    header = (f"{'variant':<12} {'micro-batch':<16} {'tok/step':>8} {'step s':>7} {'tok/s':>8} {'MFU':>6} "
              f"{'peak GiB':>8} {'loss rel':>9} {'grad rel':>9}  note")
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<12} {'':<16} {'':>8} {'':>7} {'':>8} {'':>6} {'':>8} {'':>9} {'':>9}  {r['error']}")
            continue
        check = r.get("check", {})
        print(f"{r['variant']:<12} {r['micro_batch']:<16} {r['tokens_per_step']:>8.0f} "
              f"{statistics.median(r['step_seconds']):>7.3f} {r['tokens_per_second']:>8.0f} {r['mfu']:>6.1%} "
              f"{r.get('peak_allocated_gib', math.nan):>8.1f} {check.get('loss_rel_diff', math.nan):>9.1e} "
              f"{check.get('grad_rel_diff', math.nan):>9.1e}  pad {r['padding_fraction']:.0%}, "
              f"warmup {r['warmup_seconds']:.0f} s")


def _variant(spec: str) -> tuple[str, list[str]]:
    if "=" not in spec:
        if spec != "plain" and spec not in VARIANTS:
            raise SystemExit(f"unknown variant {spec!r}; known: plain, {', '.join(VARIANTS)}")
        return spec, VARIANTS.get(spec, [])
    name, overrides = spec.split("=", 1)
    return name, [o for o in overrides.split(";") if o]


def _autocast(device: torch.device):
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def _tiny_model() -> str:
    import tempfile

    from common.demo.tiny_model import build_tiny_model

    return str(build_tiny_model(Path(tempfile.mkdtemp(prefix="bench_tiny_"))))


if __name__ == "__main__":
    main()
