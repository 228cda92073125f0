"""Model weights as a flat {name: tensor} dict, with tied tensors stored once (as Hugging Face does).

Used by train_daemon.publisher (checkpoints) and train_daemon.resume (resume state).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases: Qwen2.5's lm_head shares the embedding matrix, and safetensors
    refuses shared tensors. The first name wins (model.embed_tokens.weight, as in the hub files)."""
    seen, unique = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        unique[name] = tensor
    return unique


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a safetensors file written from unique_state_dict back into the model (exactly)."""
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected = set(model.state_dict()) - set(unique_state_dict(model))
    if unexpected or set(missing) - expected:
        raise ValueError(f"{path}: weights do not match the model (missing {sorted(set(missing) - expected)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}); was the run started with another model?")
