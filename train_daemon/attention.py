"""Padding-free attention for packed micro-batches: each example attends only to itself.

Used by `bin/train` when `model.attn_implementation: varlen` (the default). A packed micro-batch
is one row of concatenated examples; `cu_seq_lens` (cumulative example lengths, built on the CPU
with the batch, so no device sync) tells the kernel where each example starts. On CUDA this is
PyTorch's own flash-attention varlen kernel (torch.nn.attention.varlen, no flash-attn package);
cost is linear in the examples' own lengths and no [T, T] mask is ever built. On CPU (tests,
the tiny model) each example runs through scaled_dot_product_attention separately: slow but the
same function, so the wiring is tested where there is no GPU.

Registered with transformers as attention implementation "mathsft_varlen"; the model then builds
no attention mask at all (transformers skips mask creation for implementations it does not know).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

ATTN_NAME = "mathsft_varlen"


def register() -> str:
    """Register the attention function with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, varlen_attention_forward)
    return ATTN_NAME


def _varlen_kernel():
    """(varlen_attn, has window_size, has enable_gqa, has scale): its keywords changed across torch 2.10-2.12."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params, "scale" in params


_KERNEL = _varlen_kernel()


def kernel_available(device: torch.device) -> bool:
    """False on a GPU whose torch has no varlen attention (< 2.10): use attn_implementation sdpa there."""
    return device.type != "cuda" or _KERNEL is not None


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention signature: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None)."""
    if cu_seq_lens_q is None:
        raise ValueError("attention 'mathsft_varlen' needs cu_seq_lens_q (train_daemon.attention.packed_attention_kwargs)")
    if query.shape[0] != 1:
        raise ValueError("attention 'mathsft_varlen' takes one packed row per micro-batch")
    dtype = value.dtype
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        # Under autocast over float32 weights, rotary embeddings leave q and k in float32.
        dtype = torch.get_autocast_dtype("cuda")
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # [T, H, D]
    if q.is_cuda:
        out = _cuda_varlen(q, k, v, cu_seq_lens_q, int(max_length_q), scaling)
    else:
        out = _per_example_sdpa(q, k, v, cu_seq_lens_q, scaling)
    return out.unsqueeze(0), None


def _cuda_varlen(q, k, v, cu_seq_lens, max_len, scaling):
    varlen_attn, has_window, has_gqa, has_scale = _KERNEL
    extra = {"window_size": (-1, 0)} if has_window else {"is_causal": True}
    if has_scale:
        extra["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError("this torch's varlen_attn has no scale argument and the model's scale is not 1/sqrt(head_dim)")
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if has_gqa:
            extra["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_len, max_len, **extra)


def _per_example_sdpa(q, k, v, cu_seq_lens, scaling):
    outputs = []
    bounds = cu_seq_lens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        outputs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scaling,
                                                      enable_gqa=True).transpose(0, 1))
    return torch.cat(outputs, dim=0)


def packed_attention_kwargs(model, micro_batch) -> dict:
    """Model keyword arguments that tell a padding-free kernel where the packed examples start.

    Empty unless the model runs this module's attention (sdpa and flex find the boundaries from
    position_ids themselves) and the micro-batch is packed. The names are those of transformers'
    FlashAttentionKwargs, which the model passes through to every attention call.
    """
    if micro_batch.cu_seq_lens is None or model.config._attn_implementation != ATTN_NAME:
        return {}
    return {"cu_seq_lens_q": micro_batch.cu_seq_lens, "cu_seq_lens_k": micro_batch.cu_seq_lens,
            "max_length_q": micro_batch.max_length, "max_length_k": micro_batch.max_length}
