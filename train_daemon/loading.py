"""Start-up loading for `bin/train`: training pairs, device choice, tokenizer and model.

Every failure a user can fix (missing path, unreachable hub id, no safetensors weights, a GPU
that is not there) becomes a ConfigError or DatasetError with one line naming the fix.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import Config, ConfigError, DataConfig, ModelConfig
from common.data import SftPair, load_math, load_prompt_template, load_sft_pairs, math_to_sft_pairs
from common.errors import first_line
from train_daemon.attention import kernel_available
from train_daemon.attention import register as register_varlen_attention

logger = logging.getLogger(__name__)


@dataclass
class DeviceSetup:
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 autocast over float32 master weights on GPU
    save_dtype: torch.dtype  # dtype of published checkpoints


def check_model_source(model: ModelConfig) -> None:
    """Fail fast on a local model path that does not exist (hub ids are checked when loading)."""
    for key, value in (("model.name_or_path", model.name_or_path), ("model.tokenizer", model.tokenizer)):
        if value and _looks_local(value) and not Path(value).expanduser().is_dir():
            raise ConfigError(f"{key}: model directory {value} does not exist; point it at a Hugging Face "
                              f"model directory or a hub id such as Qwen/Qwen2.5-Math-1.5B")


def _looks_local(name: str) -> bool:
    # Hub ids are "org/name" (or a bare "name"); anything else can only be a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def load_training_pairs(data: DataConfig) -> list[SftPair]:
    if data.format == "sft_pairs":
        return load_sft_pairs(data.train_source)
    template = load_prompt_template(data.prompt_template)
    return math_to_sft_pairs(load_math(data.train_source, data.train_split), template)


def choose_device(config: Config, local_rank: int | None = None) -> DeviceSetup:
    """The training device and precision; CPU (float32) with a WARNING when CUDA is missing. Under
    torchrun (`local_rank`) each rank trains on the visible GPU of its local rank."""
    wanted = config.training.device
    if local_rank is not None and wanted.startswith("cuda"):
        wanted = f"cuda:{local_rank}"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("training.device=%s but CUDA is not available: training on CPU in float32 "
                       "(fine for a tiny model, far too slow for Qwen2.5-Math-1.5B)", wanted)
        return DeviceSetup(torch.device("cpu"), None, torch.float32)
    device = torch.device(wanted)
    if device.type == "cpu":
        return DeviceSetup(device, None, torch.float32)
    # Packed micro-batches change size every step; without expandable segments the caching
    # allocator fragments (seen: 74 GiB reserved for 59 GiB allocated on an H100). Pinned host
    # memory (the resume-state buffers, ~18 GB) is registered by 8 threads: 4.4 s instead of 15 s
    # (docs/PERFORMANCE.md). Read when CUDA initialises, so it must be set before the first
    # allocation; a user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True,pinned_use_cuda_host_register:True,"
                                                     "pinned_num_register_threads:8")
    if config.model.attn_implementation == "varlen" and not kernel_available(device):
        raise ConfigError(f"model.attn_implementation=varlen needs torch >= 2.10 on GPU (this is {torch.__version__}); "
                          f"set model.attn_implementation=sdpa")
    if (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"training.device={wanted} but only {torch.cuda.device_count()} GPU(s) are visible; "
                          f"pick cuda:0..cuda:{torch.cuda.device_count() - 1}")
    torch.cuda.set_device(device)
    if config.model.dtype == "bfloat16":
        # Master weights stay float32: at lr 2e-5 most AdamW updates are below bf16's resolution
        # and would round away. Matmuls run in bf16 under autocast; checkpoints are saved in bf16.
        return DeviceSetup(device, torch.bfloat16, torch.bfloat16)
    return DeviceSetup(device, None, torch.float32)


def load_tokenizer(model: ModelConfig):
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoTokenizer

    source = model.tokenizer or model.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    # Missing files, unreachable hub, unknown tokenizer class; StrictDataclassError: the tokenizer
    # reads the model's config.json too, and transformers 5 refuses one that contradicts itself.
    except (OSError, ValueError, StrictDataclassError) as exc:
        raise ConfigError(f"cannot load the tokenizer from {source!r} ({first_line(exc, type(exc).__name__)}); set model.tokenizer "
                          f"or model.name_or_path to a local model directory or a reachable hub id") from exc
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {source!r} has no EOS token; SFT responses must end with one")
    return tokenizer


def load_model(config: Config, device: torch.device):
    """The causal LM in float32 on the device, in training mode (safetensors only, no remote code)."""
    import transformers
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM

    if not config.logging.progress_bar:
        transformers.utils.logging.disable_progress_bar()
    source = config.model.name_or_path
    attn_implementation = config.model.attn_implementation
    if attn_implementation == "varlen":
        attn_implementation = register_varlen_attention()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True,
                                                     trust_remote_code=False, attn_implementation=attn_implementation)
    # No safetensors, unreachable hub, missing attention package; StrictDataclassError: a config.json that
    # contradicts itself (transformers 5 validates configs with huggingface_hub's strict dataclasses).
    except (OSError, ValueError, ImportError, StrictDataclassError) as exc:
        raise ConfigError(f"cannot load the model from {source!r} ({first_line(exc, type(exc).__name__)}); set model.name_or_path to a "
                          f"directory with safetensors weights or a reachable hub id") from exc
    if not hasattr(model, "model") or not hasattr(model, "lm_head"):
        raise ConfigError(f"{source!r} is a {type(model).__name__}; the trainer needs a decoder with .model and .lm_head (Qwen2, Llama, ...)")
    model.to(device)
    model.train()
    if config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.training.compile and device.type == "cuda":
        # Each decoder layer in place (state_dict names, hence checkpoints, are unchanged). The 28
        # layers share one compiled graph, so this compiles once (~20 s), and dynamic shapes take
        # every packed length without recompiling. On CPU compiling costs more than it saves.
        # Inductor's mix-order reduction (RMSNorm backward) otherwise guards on the length of the
        # first micro-batch (>= 4096 tokens, >= 3413) and recompiles, ~8 s each, for shorter ones.
        import torch._inductor.config as inductor_config

        if hasattr(inductor_config.triton, "mix_order_reduction_non_strict_mode"):
            inductor_config.triton.mix_order_reduction_non_strict_mode = True
        for layer in model.model.layers:
            layer.compile(dynamic=True)
    return model
