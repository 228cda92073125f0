"""What every generation engine shares: the Protocol, sampling and generation records, load
errors, model-directory checks, and the load -> fingerprint -> reload-or-start logic.

The engines: eval_daemon/engines/vllm.py (vLLM, the default) and eval_daemon/engines/hf.py
(transformers, the fallback); eval_daemon/engines/factory.py builds the configured one.

- VllmEngine keeps ONE `vllm.LLM` alive across checkpoints. The first checkpoint starts it (tens
  of seconds); each later checkpoint of the same architecture and tokenizer is loaded into the
  live engine with vLLM's `reload_weights(weights_path=...)`, run in the workers through
  `collective_rpc` (eval_daemon/engines/vllm_worker.py; checked on vLLM 0.32: 0.02 s vs a 20-27 s start
  for the tiny model on CPU), then the prefix cache is reset so that no KV computed with the old
  weights is reused. When the architecture or the tokenizer differ, or the reload fails, the
  engine is restarted (logged).
- HfEngine (eval_daemon/engines/hf.py) generates with transformers: the fallback for CPU or
  machines without vLLM, slower (a WARNING says so at start-up).

Both load safetensors weights only and never run remote code. Both score token entropy on a
subsample with the model they already hold (eval_daemon/entropy.py says how).
Used by `bin/eval` (eval_daemon/__main__.py) and bench/eval_engine_reuse.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

from common.errors import first_line

logger = logging.getLogger(__name__)

# Files whose content must match for a checkpoint to be loaded into a live vLLM engine.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
ARCH_KEYS = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "rope_theta",
             "max_position_embeddings")


class CheckpointLoadError(Exception):
    """A model directory that cannot be loaded (one-line message naming the file and the problem):
    a failure of the checkpoint itself, recorded as its result."""


class EnvironmentFailure(Exception):
    """The machine, not the checkpoint, failed (out of memory, driver, network, the engine did not
    start): retried with backoff, never recorded as the checkpoint's result."""


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...]
    seed: int

    def as_dict(self) -> dict:
        return {**asdict(self), "stop": list(self.stop)}


@dataclass
class Generation:
    text: str  # the response, cut after the stop string (which is kept)
    token_ids: list[int]  # generated tokens (the EOS token included when it ended the response)
    prompt_token_ids: list[int]
    finish_reason: str  # 'stop' (stop string or EOS) | 'length' (max_tokens or max_model_len)
    num_tokens: int
    token_entropy: float | None = None  # mean token entropy, for the rows generate() was asked to score


def no_interrupt() -> None:
    """The default `GenerationEngine.interrupt`: nothing stops generation early."""


class GenerationEngine(Protocol):
    name: str
    entropy_method: str
    # Called inside the generation loop (per batch, per finished request); raises to abandon it
    # (bin/eval sets its StopSignal.check here).
    interrupt: Callable[[], None]

    def load(self, model_path: str) -> None:
        """Make model_path the model that generate() uses; raise CheckpointLoadError when it cannot."""

    entropy_seconds: float  # time the last generate() spent scoring entropy

    def generate(self, prompts: list[str], sampling: Sampling, progress: bool,
                 entropy_rows: Sequence[int] = (), samples_per_prompt: int = 1) -> list[Generation]:
        """`samples_per_prompt` Generations per prompt, prompt by prompt (row p * k + j is prompt p's
        response j); all prompts are submitted together. The responses at `entropy_rows` (rows of
        the result) get token_entropy: their mean token entropy under the loaded model (None for an
        empty response)."""

    def close(self) -> None:
        """Free the model and any worker processes."""


# ---- checking a model directory before any engine touches it -------------------------------------


def is_local(model_path: str) -> bool:
    return Path(model_path).expanduser().exists() or model_path.startswith((".", "/", "~"))


def check_model_dir(model_path: str) -> None:
    """Fail fast, in one line, on a local model directory that cannot be a safetensors HF model:
    a file that is not regular (a FIFO would block the first read forever), no or a bad config.json,
    no or broken safetensors, or tensors that do not match the architecture (missing, unexpected or
    mis-shaped: an engine would fill missing ones with random weights and evaluate those).

    Hub ids are not checked here (the engine downloads them, with use_safetensors / load_format
    safetensors so pickled weights are never loaded).
    """
    from common.contract import NotRegularFileError, read_regular_file

    if not is_local(model_path):
        return
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise CheckpointLoadError(f"{path} is not a directory")
    _check_file_types(path)
    try:
        config = json.loads(read_regular_file(path / "config.json"))
    except FileNotFoundError as exc:
        raise CheckpointLoadError(f"{path}: missing config.json") from exc
    except (NotRegularFileError, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointLoadError(f"{path}/config.json is unreadable ({exc})") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointLoadError(f"{path}/config.json has no model_type; not a Hugging Face model config")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: only safetensors weights are loaded)" if pickled else ""
        raise CheckpointLoadError(f"{path}: no *.safetensors weights{hint}")
    _check_safetensors(path, weights)
    _check_tensors(path, weights)


def _check_file_types(path: Path) -> None:
    import os
    import stat

    from common.contract import file_kind

    for entry in sorted(path.iterdir()):
        try:
            mode = os.stat(entry).st_mode  # follows symlinks: what a reader would open
        except OSError as exc:  # a dangling symlink, or a file removed under us
            raise CheckpointLoadError(f"{entry} cannot be read ({exc.strerror})") from exc
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise CheckpointLoadError(f"{entry} is {file_kind(mode)}; a checkpoint holds regular files only")


def _check_safetensors(path: Path, weights: list[Path]) -> None:
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointLoadError(f"{index} is unreadable ({exc!r})") from exc
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise CheckpointLoadError(f"{path}: shards listed in the index are missing: {', '.join(missing)}")
    for file in weights:
        # Opening parses the header and checks it against the file size: catches truncated and
        # garbage files without reading the tensors.
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise CheckpointLoadError(f"{file} is not a valid safetensors file ({exc})") from exc


def _check_tensors(path: Path, weights: list[Path]) -> None:
    """Every tensor the architecture needs is there with its shape, and nothing else is."""
    import torch
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    # What transformers raises for a config it cannot build a model from (StrictDataclassError: a
    # config.json that contradicts itself).
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as exc:
        raise CheckpointLoadError(f"{path}/config.json does not describe a model transformers can build "
                                  f"({type(exc).__name__}: {first_line(exc)})") from exc
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}  # tied weights under both names
    required = {name for name, _ in model.named_parameters()}  # one name per tied weight
    found: dict[str, tuple] = {}
    for file in weights:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                found[key] = tuple(handle.get_slice(key).get_shape())
    problems = []
    missing = sorted(required - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
    if missing:
        problems.append(f"missing tensors {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_names(unexpected)}")
    if misshaped:
        problems.append("mis-shaped tensors " + _names([f"{k} {found[k]} (expected {expected[k]})" for k in misshaped]))
    if problems:
        raise CheckpointLoadError(f"{path} does not match its config.json: {'; '.join(problems)}")


def _names(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def model_fingerprint(model_path: str) -> str | None:
    """Hash of the architecture fields and tokenizer files; equal fingerprints can share an engine."""
    if not is_local(model_path):
        return None
    path = Path(model_path).expanduser()
    digest = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    digest.update(json.dumps({k: config.get(k) for k in ARCH_KEYS}, sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        file = path / name
        digest.update(name.encode() + (file.read_bytes() if file.is_file() else b"<absent>"))
    return digest.hexdigest()


def tokenizer_source(model_path: str, fallback: str) -> str:
    """The checkpoint's own tokenizer when it ships one, else the configured one."""
    if not is_local(model_path) or (Path(model_path).expanduser() / "tokenizer_config.json").is_file():
        return model_path
    return fallback


def empty_generation(prompt_ids: list[int]) -> Generation:
    """The result for a prompt too long for max_model_len: graded as an incomplete generation."""
    return Generation(text="", token_ids=[], prompt_token_ids=prompt_ids, finish_reason="length", num_tokens=0)


def score_entropy_rows(token_entropies, results: list[Generation], entropy_rows: Sequence[int]) -> float:
    """Set token_entropy on the entropy_rows of results with an engine's token_entropies; returns seconds."""
    started = time.perf_counter()
    rows = sorted(set(entropy_rows))
    for i, value in zip(rows, token_entropies([results[i] for i in rows])):
        results[i].token_entropy = value
    return time.perf_counter() - started


def _warn_too_long(count: int, max_model_len: int) -> None:
    if count:
        logger.warning("%d prompt(s) are longer than evaluation.max_model_len=%d tokens; they are graded as "
                       "incomplete generations (raise evaluation.max_model_len to evaluate them)", count, max_model_len)


def load_reusing(engine, model_path: str) -> None:
    """The `load` of both engines. A checkpoint with the live model's architecture and tokenizer
    (same fingerprint) is loaded into it in place (`engine.reload`, seconds instead of a cold
    start); anything else, or a reload that failed, starts the engine anew (`engine.start`)."""
    check_model_dir(model_path)
    fingerprint = model_fingerprint(model_path)
    if engine.loaded and fingerprint is not None and fingerprint == engine.fingerprint:
        started = time.perf_counter()
        if engine.reload(model_path):
            engine.last_load = {"kind": "reload", "seconds": time.perf_counter() - started}
            logger.info("loaded %s into the live %s engine in %.2f s", model_path, engine.name, engine.last_load["seconds"])
            return
    elif engine.loaded:
        logger.warning("%s differs from the live %s model in architecture or tokenizer; starting the engine "
                       "anew (a cold start instead of a weight reload)", model_path, engine.name)
    engine.close()
    started = time.perf_counter()
    engine.start(model_path)
    engine.fingerprint = fingerprint
    engine.last_load = {"kind": "start", "seconds": time.perf_counter() - started}
    logger.info("%s engine started on %s in %.1f s", engine.name, model_path, engine.last_load["seconds"])
