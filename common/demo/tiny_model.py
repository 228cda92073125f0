"""Build a tiny Qwen2-architecture model with a byte-level BPE tokenizer, on the fly, offline.

This is the model of the CPU demo (`bin/demo`) and of the tests: same architecture and file layout
as Qwen2.5-Math-1.5B (config.json, model.safetensors, tokenizer, generation_config.json), so every
code path that loads the real model loads this one unchanged, vLLM included.

    python -m common.demo.tiny_model OUT_DIR
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# Special strings of the R1-zero format kept as single tokens so a tiny model can learn them fast.
FORMAT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

DEFAULT_CORPUS = [
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it.",
    "The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> tags.",
    "What is $2+3$? We add the numbers: $2 + 3 = 5$. The answer is $\\boxed{5}$.",
    "Compute $\\frac{1}{2} + \\frac{1}{3}$. We get $\\frac{5}{6}$, so $\\boxed{\\frac{5}{6}}$.",
    "Solve $x^2 - 4 = 0$ for $x > 0$. Then $x = 2$, and the answer is $\\boxed{2}$.",
    "0 1 2 3 4 5 6 7 8 9 10 + - * / = ( ) [ ] { } ^ _ \\sqrt \\pi \\cdot \\times , . ; : ? !",
]


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512, split_digits: bool = False):
    """A byte-level BPE tokenizer (GPT-2 style, as Qwen2's) trained on the given texts; with
    split_digits one token per digit, as Qwen2's own pre-tokenizer does (the demo: a tiny model then
    learns digit rules instead of a token per number)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if split_digits else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer.add_tokens(FORMAT_TOKENS)  # plain added tokens: they decode back to their text
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    fast.model_max_length = 4096
    return fast


def build_tiny_model(
    out_dir: str | Path,
    corpus: Iterable[str] = DEFAULT_CORPUS,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    split_digits: bool = False,
) -> Path:
    """Write a random-weight Qwen2 model + tokenizer to out_dir (safetensors) and return the path."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(corpus, vocab_size, split_digits)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,  # 32 with the defaults: vLLM's CPU kernels support it
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    logger.info("wrote tiny Qwen2 model (%d parameters) to %s", sum(p.numel() for p in model.parameters()), out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--corpus-file", help="text file (one document per line) to train the tokenizer on")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    corpus = DEFAULT_CORPUS
    if args.corpus_file:
        corpus = DEFAULT_CORPUS + Path(args.corpus_file).read_text().splitlines()
    build_tiny_model(args.out_dir, corpus)


if __name__ == "__main__":
    main()
