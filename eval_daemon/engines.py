"""Generation engines behind one Protocol: vLLM (default on GPU) and Hugging Face transformers.

- VllmEngine keeps ONE `vllm.LLM` alive across checkpoints. The first checkpoint starts it (tens
  of seconds); each later checkpoint of the same architecture and tokenizer is loaded into the
  live engine with vLLM's `reload_weights(weights_path=...)`, run in the workers through
  `collective_rpc` (eval_daemon/vllm_worker.py; checked on vLLM 0.32: 0.02 s vs a 20-27 s start
  for the tiny model on CPU), then the prefix cache is reset so that no KV computed with the old
  weights is reused. When the architecture or the tokenizer differ, or the reload fails, the
  engine is restarted (logged).
- HfEngine (eval_daemon/hf_engine.py) generates with transformers: the fallback for CPU or
  machines without vLLM, slower (a WARNING says so at start-up).

Both load safetensors weights only and never run remote code. Both score token entropy on a
subsample with the model they already hold (eval_daemon/entropy.py says how).
Used by `bin/eval` (eval_daemon/__main__.py) and bench/eval_engine_reuse.py.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from common.errors import first_line
from eval_daemon.entropy import TOP_K, entropy_from_top_logprobs

logger = logging.getLogger(__name__)

# Files whose content must match for a checkpoint to be loaded into a live vLLM engine.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
ARCH_KEYS = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "rope_theta",
             "max_position_embeddings")


class CheckpointLoadError(Exception):
    """A model directory that cannot be loaded (one-line message naming the file and the problem)."""


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


class GenerationEngine(Protocol):
    name: str
    entropy_method: str

    def load(self, model_path: str) -> None:
        """Make model_path the model that generate() uses; raise CheckpointLoadError when it cannot."""

    entropy_seconds: float  # time the last generate() spent scoring entropy

    def generate(self, prompts: list[str], sampling: Sampling, progress: bool,
                 entropy_rows: Sequence[int] = ()) -> list[Generation]:
        """One Generation per prompt, in prompt order; all prompts are submitted together. The
        responses of `entropy_rows` get token_entropy: their mean token entropy under the loaded
        model (None for an empty response)."""

    def close(self) -> None:
        """Free the model and any worker processes."""


# ---- checking a model directory before any engine touches it -------------------------------------


def is_local(model_path: str) -> bool:
    return Path(model_path).expanduser().exists() or model_path.startswith((".", "/", "~"))


def check_model_dir(model_path: str) -> None:
    """Fail fast, in one line, on a local model directory that cannot be a safetensors HF model.

    Hub ids are not checked here (the engine downloads them, with use_safetensors / load_format
    safetensors so pickled weights are never loaded).
    """
    if not is_local(model_path):
        return
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise CheckpointLoadError(f"{path} is not a directory")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError as exc:
        raise CheckpointLoadError(f"{path}: missing config.json") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointLoadError(f"{path}/config.json is unreadable ({exc})") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointLoadError(f"{path}/config.json has no model_type; not a Hugging Face model config")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: only safetensors weights are loaded)" if pickled else ""
        raise CheckpointLoadError(f"{path}: no *.safetensors weights{hint}")
    _check_safetensors(path, weights)


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


# ---- vLLM ----------------------------------------------------------------------------------------


class VllmEngine:
    name = "vllm"
    entropy_method = f"vllm_prompt_logprobs_top{TOP_K}_lower_bound"

    def __init__(self, device: str, dtype: str, gpu_memory_utilization: float, max_model_len: int,
                 seed: int, tokenizer_fallback: str) -> None:
        self.device = device
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.seed = seed
        self.tokenizer_fallback = tokenizer_fallback
        self.llm = None
        self.fingerprint: str | None = None
        self.last_load: dict = {}  # {"kind": "start" | "reload", "seconds": ...} for logs and the bench
        self.entropy_seconds = 0.0  # the last generate's entropy scoring (after generation)

    def load(self, model_path: str) -> None:
        check_model_dir(model_path)
        fingerprint = model_fingerprint(model_path)
        if self.llm is not None and fingerprint is not None and fingerprint == self.fingerprint:
            if self._reload(model_path):
                return
        elif self.llm is not None:
            logger.warning("%s differs from the live engine's model in architecture or tokenizer; "
                           "restarting vLLM (a cold start instead of a weight reload)", model_path)
            self.close()
        self._start(model_path)
        self.fingerprint = fingerprint

    def _start(self, model_path: str) -> None:
        from vllm import LLM

        started = time.perf_counter()
        try:
            self.llm = LLM(
                model=model_path,
                tokenizer=tokenizer_source(model_path, self.tokenizer_fallback),
                dtype=self.dtype,
                seed=self.seed,
                max_model_len=self.max_model_len,
                gpu_memory_utilization=self.gpu_memory_utilization,
                enforce_eager=self.device == "cpu",  # CPU: skip graph capture, minutes of compile for nothing
                trust_remote_code=False,
                load_format="safetensors",
                worker_extension_cls="eval_daemon.vllm_worker.CheckpointReload",
            )
        except Exception as exc:  # vLLM raises many unrelated types for a bad model (ValueError, RuntimeError, OSError, ...)
            self.close()
            raise CheckpointLoadError(f"vLLM could not load {model_path}: {type(exc).__name__}: {first_line(exc)}") from exc
        self.last_load = {"kind": "start", "seconds": time.perf_counter() - started}
        logger.info("vLLM engine started on %s in %.1f s", model_path, self.last_load["seconds"])

    def _reload(self, model_path: str) -> bool:
        """Load new weights into the live engine; False (engine closed) when that did not work."""
        started = time.perf_counter()
        try:
            # reload_weights(weights_path=...) plus a fix for tied LM heads: eval_daemon/vllm_worker.py
            results = self.llm.collective_rpc("reload_checkpoint", args=(str(model_path),))
        except Exception as exc:  # raised from the worker with any type; its weights are now in an unknown state
            logger.warning("weight reload of %s failed (%s: %s); restarting vLLM", model_path,
                           type(exc).__name__, first_line(exc))
            self.close()
            return False
        # Cached KV blocks were computed with the old weights: never reuse them.
        self.llm.reset_prefix_cache()
        self.last_load = {"kind": "reload", "seconds": time.perf_counter() - started}
        logger.info("loaded %s into the live vLLM engine in %.2f s (%s)", model_path, self.last_load["seconds"], results[0])
        return True

    def generate(self, prompts: list[str], sampling: Sampling, progress: bool,
                 entropy_rows: Sequence[int] = ()) -> list[Generation]:
        """All prompts in one engine call; then the entropy prefill of `entropy_rows`, in a second
        call. (Adding each entropy prefill to the running engine as soon as its response finished
        was tried on an H200: in a paired run it cost 4-5 s per evaluation, more than this second
        call's 2.0-2.7 s; docs/PERFORMANCE.md, "Evaluation (vLLM)".)"""
        tokenizer = self.llm.get_tokenizer()
        prompt_ids = [tokenizer.encode(p) for p in prompts]
        fits = [i for i, ids in enumerate(prompt_ids) if len(ids) < self.max_model_len]
        _warn_too_long(len(prompts) - len(fits), self.max_model_len)
        params = [self._generation_params(sampling, prompts[i]) for i in fits]
        outputs = self.llm.generate([{"prompt_token_ids": prompt_ids[i]} for i in fits], params, use_tqdm=progress)
        results = [empty_generation(ids) for ids in prompt_ids]
        for i, output in zip(fits, outputs):
            completion = output.outputs[0]
            results[i] = Generation(text=completion.text, token_ids=list(completion.token_ids),
                                    prompt_token_ids=prompt_ids[i], finish_reason=_finish(completion.finish_reason),
                                    num_tokens=len(completion.token_ids))
        self.entropy_seconds = score_entropy_rows(self.token_entropies, results, entropy_rows)
        return results

    def _generation_params(self, sampling: Sampling, prompt: str):
        """One request's SamplingParams (bench/eval_full.py overrides it to force response lengths)."""
        from vllm import SamplingParams

        return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                              stop=list(sampling.stop), include_stop_str_in_output=True)

    def _entropy_params(self):
        from vllm import SamplingParams

        # Prefill only: prompt_logprobs over prompt + response, one generated token that is discarded.
        # flat_logprobs (where this vLLM has it) returns flat lists instead of one dict of Logprob
        # objects per position: ~100k positions x 21 entries for 256 responses, mostly object overhead.
        flat = {"flat_logprobs": True} if "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ()) else {}
        return SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=TOP_K, detokenize=False, **flat)

    def token_entropies(self, generations: list[Generation]) -> list[float | None]:
        """Mean token entropy of each response (None for an empty one): one prefill-only call."""
        scored = [i for i, g in enumerate(generations) if g.token_ids]
        requests = [{"prompt_token_ids": (generations[i].prompt_token_ids + generations[i].token_ids)[: self.max_model_len - 1]}
                    for i in scored]
        outputs = self.llm.generate(requests, self._entropy_params(), use_tqdm=False) if requests else []
        results: list[float | None] = [None] * len(generations)
        for i, output in zip(scored, outputs):
            values = _position_entropies(output.prompt_logprobs, len(generations[i].prompt_token_ids))
            if values:
                results[i] = sum(values) / len(values)
        return results

    def close(self) -> None:
        if self.llm is None:
            return
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()  # stops the engine-core process now rather than at interpreter exit
            # shutdown() only signals vLLM's output thread (a daemon thread) to stop. Left running, it
            # may free its last outputs (torch tensors) while the interpreter finalizes, which aborts
            # the process: "terminate called without an active exception", exit code -6 after a clean
            # SIGTERM (seen in 5 of 9 bin/demo runs). Joining it first makes the exit clean.
            output_thread = getattr(engine_core, "output_queue_thread", None)
            if output_thread is not None:
                output_thread.join(timeout=10)
        self.llm = None
        self.fingerprint = None
        gc.collect()


def _position_entropies(prompt_logprobs, start: int) -> list[float]:
    """Top-k entropy of each position from `start` on, from vLLM's prompt logprobs: a list of
    {token: Logprob} dicts, or FlatLogprobs (flat lists; the scored token comes first and appears
    again when it is in the top k, hence the de-duplication by token id, as the dicts do)."""
    if hasattr(prompt_logprobs, "start_indices"):  # FlatLogprobs
        starts, ends = prompt_logprobs.start_indices[start:], prompt_logprobs.end_indices[start:]
        if starts and all(b - a == ends[0] - starts[0] > 1 for a, b in zip(starts, ends)) \
                and all(b == a for a, b in zip(starts[1:], ends[:-1])):
            return _uniform_flat_entropies(prompt_logprobs, starts[0], ends[-1], ends[0] - starts[0])
        ids, logprobs = prompt_logprobs.token_ids, prompt_logprobs.logprobs
        return [entropy_from_top_logprobs(list(dict(zip(ids[a:b], logprobs[a:b])).values()))
                for a, b in zip(starts, ends) if b > a]
    return [entropy_from_top_logprobs([lp.logprob for lp in p.values()]) for p in prompt_logprobs[start:] if p]


def _uniform_flat_entropies(flat, low: int, high: int, width: int) -> list[float]:
    """entropy_from_top_logprobs of every position at once, for back-to-back positions of `width`
    entries each (the usual case: the scored token, then the top k): ~100k positions per
    evaluation, 0.09 s instead of 0.30 s with one Python call per position (2-core CPU)."""
    import numpy as np

    ids = np.asarray(flat.token_ids[low:high], dtype=np.int64).reshape(-1, width)
    logprobs = np.asarray(flat.logprobs[low:high], dtype=np.float64).reshape(-1, width)
    keep = np.ones(ids.shape, dtype=bool)
    keep[:, 0] = ~(ids[:, 1:] == ids[:, :1]).any(axis=1)  # the scored token counts once
    probs = np.where(keep, np.exp(logprobs), 0.0)
    with np.errstate(invalid="ignore"):  # 0 * -inf for a token of probability 0
        entropy = -np.where(probs > 0, probs * logprobs, 0.0).sum(axis=1)
    rest = 1.0 - probs.sum(axis=1)
    has_rest = rest > 1e-12
    entropy[has_rest] -= rest[has_rest] * np.log(rest[has_rest])
    return entropy.tolist()


def _finish(reason: str | None) -> str:
    # vLLM says 'stop' for EOS and stop strings, 'length' for max_tokens / max_model_len.
    return "length" if reason == "length" else "stop"


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


def make_engine(config, device: str) -> GenerationEngine:
    """The configured engine (no model loaded yet: the first checkpoint loads one)."""
    e = config.evaluation
    dtype = "float32" if device == "cpu" else config.model.dtype  # bfloat16 matmuls on CPU are slow or missing
    tokenizer = config.model.tokenizer or config.model.name_or_path
    if e.engine == "vllm":
        return VllmEngine(device, dtype, e.gpu_memory_utilization, e.max_model_len, e.seed, tokenizer)
    from eval_daemon.hf_engine import HfEngine  # imported here: hf_engine imports this module

    return HfEngine(device, dtype, e.hf_batch_size, e.max_model_len, e.seed, tokenizer, decoder=e.hf_decoder)
