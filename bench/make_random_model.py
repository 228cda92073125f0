"""Write a random-weight model with the real Qwen2.5-Math-1.5B architecture (speed does not depend on
the weights), with a real tokenizer, as a Hugging Face directory that bin/train, bin/eval and vLLM load.

    python bench/make_random_model.py OUT_DIR --tokenizer ../shared/tokenizers/qwen2.5 [--device cuda]
    python bench/make_random_model.py OUT_DIR --tokenizer ... --arch 7b --device cuda   # Qwen2.5-7B's architecture
"""

from __future__ import annotations

import argparse
import time

# Qwen/Qwen2.5-Math-1.5B config.json (architecture only; 1.544e9 parameters with tied embeddings).
QWEN25_MATH_15B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151643,
    hidden_act="silu",
    sliding_window=None,
    use_sliding_window=False,
)

# Qwen/Qwen2.5-7B config.json (architecture only; 7.6e9 parameters, untied lm_head): the FSDP2 case of issue 20.
QWEN25_7B = dict(
    QWEN25_MATH_15B, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
    num_key_value_heads=4, rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False,
)
ARCHITECTURES = {"1.5b": QWEN25_MATH_15B, "7b": QWEN25_7B}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", required=True, help="directory of the Qwen2.5 tokenizer")
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is faster)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="1.5b")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    start = time.perf_counter()
    config = Qwen2Config(**ARCHITECTURES[args.arch], torch_dtype="bfloat16")
    with torch.device(args.device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=151643, pad_token_id=151643)
    model.save_pretrained(args.out_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    tokenizer.save_pretrained(args.out_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {params / 1e9:.3f}B-parameter random {args.arch} Qwen2.5 architecture to {args.out_dir} "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
