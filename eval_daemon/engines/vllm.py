"""The vLLM engine (the default): one `vllm.LLM` kept alive across checkpoints.

The first checkpoint starts it (tens of seconds); each later checkpoint of the same architecture
and tokenizer is loaded into the live engine with vLLM's `reload_weights(weights_path=...)`, run
in the workers through `collective_rpc` (eval_daemon/engines/vllm_worker.py), then the prefix
cache is reset so that no KV computed with the old weights is reused. Implements
eval_daemon.engines.base.GenerationEngine; used by `bin/eval` and bench/eval_full.py.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence

from common.errors import first_line
from eval_daemon.engines.base import (EnvironmentFailure, Generation, Sampling, _warn_too_long, empty_generation,
                                      load_reusing, no_interrupt, score_entropy_rows, tokenizer_source)
from eval_daemon.entropy import EXACT_METHOD

logger = logging.getLogger(__name__)

class VllmEngine:
    name = "vllm"
    entropy_method = EXACT_METHOD

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
        self.interrupt = no_interrupt  # called for every finished request (through vLLM's progress bar hook)

    @property
    def loaded(self) -> bool:
        return self.llm is not None

    def load(self, model_path: str) -> None:
        load_reusing(self, model_path)

    def start(self, model_path: str) -> None:
        from vllm import LLM

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
                worker_extension_cls="eval_daemon.engines.vllm_worker.EvalWorker",
            )
        # vLLM raises many unrelated types (ValueError, RuntimeError, OSError, ...). The files passed
        # check_model_dir (types, config, safetensors, every tensor's name and shape) before this, so
        # what is left is the engine start itself: out of memory for the KV cache, the driver, the
        # engine-core process, the network for a hub id. Retried, never recorded as the checkpoint's result.
        except Exception as exc:
            self.close()
            raise EnvironmentFailure(f"vLLM did not start on {model_path}: {type(exc).__name__}: {first_line(exc)}") from exc

    def reload(self, model_path: str) -> bool:
        """Load new weights into the live engine; False when that did not work (then it is started anew)."""
        try:
            # reload_weights(weights_path=...) plus a fix for tied LM heads: eval_daemon/engines/vllm_worker.py
            results = self.llm.collective_rpc("reload_checkpoint", args=(str(model_path),))
        except Exception as exc:  # raised from the worker with any type; its weights are now in an unknown state
            logger.warning("weight reload of %s failed (%s: %s); restarting vLLM", model_path,
                           type(exc).__name__, first_line(exc))
            return False
        # Cached KV blocks were computed with the old weights: never reuse them.
        self.llm.reset_prefix_cache()
        logger.info("loaded %s into the live vLLM engine (%s)", model_path, results[0])  # the tied-head fix reports here
        return True

    def generate(self, prompts: list[str], sampling: Sampling, progress: bool,
                 entropy_rows: Sequence[int] = (), samples_per_prompt: int = 1) -> list[Generation]:
        """All prompts in one engine call (k responses of a prompt as one request with n=k, which
        shares the prompt's prefill); then the exact entropy of `entropy_rows`, in the worker.
        (Adding each entropy prefill to the running engine as soon as its response finished was
        tried on an H200: in a paired run it cost 4-5 s per evaluation, more than a second call's
        2.0-2.7 s; docs/PERFORMANCE.md, "Evaluation (vLLM)".)"""
        tokenizer = self.llm.get_tokenizer()
        k = samples_per_prompt
        prompt_ids = [tokenizer.encode(p) for p in prompts]
        fits = [i for i, ids in enumerate(prompt_ids) if len(ids) < self.max_model_len]
        _warn_too_long(len(prompts) - len(fits), self.max_model_len)
        params = [self._generation_params(sampling, prompts[i], k) for i in fits]
        outputs = self.llm.generate([{"prompt_token_ids": prompt_ids[i]} for i in fits], params,
                                    use_tqdm=self._progress_bar(progress))
        results = [empty_generation(ids) for ids in prompt_ids for _ in range(k)]
        for i, output in zip(fits, outputs):
            for j, completion in enumerate(output.outputs):
                results[i * k + j] = Generation(text=completion.text, token_ids=list(completion.token_ids),
                                                prompt_token_ids=prompt_ids[i],
                                                finish_reason=_finish(completion.finish_reason),
                                                num_tokens=len(completion.token_ids))
        self.entropy_seconds = score_entropy_rows(self.token_entropies, results, entropy_rows)
        return results

    def _progress_bar(self, shown: bool):
        """vLLM's progress-bar factory: its update() runs for every finished request, the one hook
        into vLLM's generation loop, so `interrupt` is checked there."""
        from tqdm import tqdm

        interrupt = self.interrupt

        class InterruptibleBar(tqdm):
            def update(self, n=1):
                interrupt()
                return super().update(n)

        def make_bar(*args, **kwargs):  # vLLM also wraps iterables: tqdm(prompts, desc="Adding requests")
            if not shown:
                # Not disable=True: vLLM divides by the bar's elapsed time, which a disabled bar leaves at 0.
                kwargs["file"] = _Discard()
            return InterruptibleBar(*args, **kwargs)

        return make_bar

    def _generation_params(self, sampling: Sampling, prompt: str, n: int = 1):
        """One request's SamplingParams, n responses (bench/eval_full.py overrides it to force response lengths)."""
        from vllm import SamplingParams

        return SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                              max_tokens=sampling.max_tokens, stop=list(sampling.stop), include_stop_str_in_output=True)

    def token_entropies(self, generations: list[Generation]) -> list[float | None]:
        """Mean token entropy of each response (None for an empty one), exact over the full
        vocabulary: a forward pass inside the worker that holds the weights (eval_daemon/engines/vllm_worker.py)."""
        scored = [i for i, g in enumerate(generations) if g.token_ids]
        results: list[float | None] = [None] * len(generations)
        if scored:
            prompts = [generations[i].prompt_token_ids for i in scored]
            responses = [generations[i].token_ids for i in scored]
            try:
                values = self.llm.collective_rpc("response_entropies", args=(prompts, responses))[0]  # TP 1: one worker
            # Why so broad: the worker runs the model outside vLLM's scheduler (vllm_worker.py), on internals
            # that change between vLLM versions; an entropy it cannot compute must not cost the accuracy.
            except Exception as exc:  # noqa: BLE001 (Shutdown is a BaseException and still goes through)
                logger.error("exact token entropy failed in the vLLM worker (%s: %s); this evaluation records no "
                             "entropy, its accuracy is unaffected (set evaluation.entropy_sample_size=0 to skip it)",
                             type(exc).__name__, first_line(exc, type(exc).__name__))
                return results
            for i, value in zip(scored, values):
                results[i] = value
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


def _finish(reason: str | None) -> str:
    # vLLM says 'stop' for EOS and stop strings, 'length' for max_tokens / max_model_len.
    return "length" if reason == "length" else "stop"


class _Discard:
    """A file that drops what a hidden progress bar writes."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
