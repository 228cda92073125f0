"""Code that runs inside vLLM's worker processes, mixed into the worker class by
`LLM(worker_extension_cls="eval_daemon.engines.vllm_worker.EvalWorker")` and called through
`LLM.collective_rpc`: weight reloads, and the exact token entropy of the entropy subsample.

Weight reloads. vLLM's `reload_weights(weights_path=...)` loads a new checkpoint into the live
model in place. One gap (seen on vLLM 0.32, CPU backend): with tied word embeddings
(Qwen2.5-Math-1.5B, the tiny test model) the checkpoint has no `lm_head.weight`, so the layerwise
reload skips the LM head and never re-runs its post-load processing. On CPU that processing packs
the weight into a oneDNN handle, so the head kept computing logits with the OLD embeddings: wrong
outputs, no error. After the reload we re-run the head's processing when it is tied and
unquantized (a no-op on GPU, where the head reads the shared weight directly).
tests/test_eval_vllm.py checks the outputs against a freshly started engine.

Token entropy. The engine's own API gives at most top-k logprobs per position (a lower bound on
the entropy), and its scheduler only runs a forward pass inside a step whose attention metadata
(KV-cache slots, block tables, backend-specific) it builds itself; with no metadata vLLM's
attention backends return without computing anything (that is the profiling run). So the worker
runs its model's decoder itself, eagerly (`model.model.forward`: the compiled graph and CUDA
graphs are bypassed), inside a forward context without metadata, and swaps each attention layer's
`forward` for a causal scaled-dot-product attention over each sequence for the length of the call;
every other layer is vLLM's own, on the weights it serves. No KV cache is read or written. The
logits come from the model's `compute_logits`, CHUNK_POSITIONS positions at a time
(eval_daemon/entropy.py owns the reduction, shared with the hf engine). tests/test_eval_vllm.py
checks the result against a full-softmax computation with transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial

from eval_daemon.entropy import response_entropies, response_positions


class EvalWorker:
    """Worker methods callable as `llm.collective_rpc(NAME, args=(...))`."""

    def reload_checkpoint(self, weights_path: str) -> dict:
        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        return {"tied_head_refreshed": refresh_tied_lm_head(self.model_runner.get_model())}

    def response_entropies(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list[float]:
        """Mean full-vocabulary token entropy of each (non-empty) response after its prompt."""
        return mean_response_entropies(self.model_runner.get_model(), self.vllm_config, prompts, responses)


def refresh_tied_lm_head(model) -> bool:
    """Re-run the unquantized LM head's post-load processing when it shares the embedding weight."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or not hasattr(head, "quant_method"):
        return False
    tied = head.weight.data_ptr() == embed.weight.data_ptr()
    if not tied or type(head.quant_method).__name__ != "UnquantizedEmbeddingMethod":
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


def mean_response_entropies(model, vllm_config, prompts: Sequence[Sequence[int]],
                            responses: Sequence[Sequence[int]]) -> list[float]:
    """Teacher-forced forward passes over prompt + response (the last response token is not needed:
    no position after it is scored), packed up to the scheduler's token budget per pass, which is
    what vLLM reserved activation memory for when it sized the KV cache."""
    import torch
    from vllm.forward_context import set_forward_context

    layers = _attention_layers(vllm_config)
    device = next(model.parameters()).device
    sequences = [list(p) + list(r[:-1]) for p, r in zip(prompts, responses)]
    results: list[float] = []
    with torch.inference_mode(), set_forward_context(None, vllm_config):
        for batch in _packed([len(s) for s in sequences], vllm_config.scheduler_config.max_num_batched_tokens):
            lengths = [len(sequences[i]) for i in batch]
            ids = torch.tensor([t for i in batch for t in sequences[i]], dtype=torch.long, device=device)
            positions = torch.cat([torch.arange(n, dtype=torch.long, device=device) for n in lengths])
            with _attention_per_sequence(layers, lengths):
                hidden = model.model.forward(ids, positions)  # .forward: eager, not the compiled __call__
            starts = [sum(lengths[:k]) for k in range(len(batch))]
            states = [hidden[start:][response_positions(len(prompts[i]), len(responses[i]))]
                      for start, i in zip(starts, batch)]
            results.extend(response_entropies(states, model.compute_logits))
    return results


def _packed(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's lengths sum to at most `budget` (a longer
    sequence goes alone)."""
    batches: list[list[int]] = []
    total = budget + 1
    for i, length in enumerate(lengths):
        if total + length > budget:
            batches.append([])
            total = 0
        batches[-1].append(i)
        total += length
    return batches


def _attention_layers(vllm_config) -> list:
    """The model's attention layers (vLLM's registry of them), refused when they use what the
    plain causal attention below does not do."""
    layers = [layer for layer in vllm_config.compilation_config.static_forward_context.values()
              if hasattr(layer, "impl") and hasattr(layer, "num_kv_heads")]
    for layer in layers:
        impl = layer.impl
        if getattr(layer, "sliding_window", None) is not None or getattr(impl, "logits_soft_cap", None) \
                or getattr(impl, "alibi_slopes", None) is not None:
            raise ValueError(f"attention layer {layer.layer_name} uses a sliding window, soft cap or ALiBi; "
                             f"exact token entropy supports plain causal attention only")
    return layers


@contextmanager
def _attention_per_sequence(layers: list, lengths: list[int]):
    """Each attention layer computes causal attention within each of the packed sequences."""
    bounds = [sum(lengths[:k]) for k in range(len(lengths) + 1)]
    for layer in layers:
        layer.forward = partial(_causal_attention, layer, bounds)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _causal_attention(layer, bounds: list[int], query, key, value, *args, **kwargs):
    """What vLLM's Attention.forward returns ([tokens, heads x head size]) for packed sequences
    that start at position 0, from the projected (and rotated) queries, keys and values."""
    import torch
    import torch.nn.functional as F

    q = query.view(-1, layer.num_heads, layer.head_size).transpose(0, 1)
    k = key.view(-1, layer.num_kv_heads, layer.head_size).transpose(0, 1)
    v = value.view(len(query), layer.num_kv_heads, -1).transpose(0, 1)
    out = torch.empty((layer.num_heads, len(query), v.shape[-1]), dtype=query.dtype, device=query.device)
    for a, b in zip(bounds, bounds[1:]):
        out[:, a:b] = F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True,
                                                     scale=layer.impl.scale, enable_gqa=True)
    return out.transpose(0, 1).reshape(len(query), -1)
