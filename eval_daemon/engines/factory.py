"""The configured generation engine: `make_engine(config, device)`. Used by `bin/eval`."""

from __future__ import annotations

from eval_daemon.engines.base import GenerationEngine


def make_engine(config, device: str) -> GenerationEngine:
    """The configured engine (no model loaded yet: the first checkpoint loads one)."""
    e = config.evaluation
    dtype = "float32" if device == "cpu" else config.model.dtype  # bfloat16 matmuls on CPU are slow or missing
    tokenizer = config.model.tokenizer or config.model.name_or_path
    if e.engine == "vllm":
        from eval_daemon.engines.vllm import VllmEngine  # imported here: vLLM's import is heavy

        return VllmEngine(device, dtype, e.gpu_memory_utilization, e.max_model_len, e.seed, tokenizer)
    from eval_daemon.engines.hf import HfEngine  # imported here: it imports torch

    return HfEngine(device, dtype, e.hf_batch_size, e.max_model_len, e.seed, tokenizer, decoder=e.hf_decoder)
