"""The Hugging Face transformers engine: the fallback for CPU or machines without vLLM.

Loads the model with transformers and decodes length-sorted batches of prompts with
eval_daemon/engines/hf_decode.py (CUDA graphs on a GPU), or with model.generate for architectures that
loop does not support. Implements eval_daemon.engines.base.GenerationEngine. Used by `bin/eval` with
`evaluation.engine: hf` and by bench/hf_generate.py.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path

from common.errors import first_line
from eval_daemon.engines.base import (CheckpointLoadError, EnvironmentFailure, Generation, Sampling, _warn_too_long,
                                      empty_generation, is_local, load_reusing, no_interrupt, score_entropy_rows,
                                      tokenizer_source)
from eval_daemon.engines.hf_decode import BatchDecoder, supported_reason
from eval_daemon.entropy import EXACT_METHOD, response_entropies, response_positions

logger = logging.getLogger(__name__)

ENTROPY_BATCH_TOKENS = 32_768  # padded tokens per forward pass when scoring token entropy


class HfEngine:
    name = "hf"
    entropy_method = EXACT_METHOD

    def __init__(self, device: str, dtype: str, batch_size: int, max_model_len: int, seed: int,
                 tokenizer_fallback: str, decoder: str = "batch_loop", cuda_graphs: bool = True) -> None:
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        # decoder: "batch_loop" (eval_daemon/engines/hf_decode.py; model.generate for models it does not
        # support) or "generate" (transformers' model.generate).
        self.decoder = decoder
        self.cuda_graphs = cuda_graphs  # on a GPU; False: every step runs eagerly (for comparison)
        self.max_model_len = max_model_len
        self.seed = seed
        self.tokenizer_fallback = tokenizer_fallback
        self.model = None
        self.tokenizer = None
        self.fingerprint: str | None = None
        self.batch_decoder: BatchDecoder | None = None  # KV buffers and CUDA graphs, kept across calls
        self.loop_unsupported: str | None = None  # why the loaded model is decoded with generate
        self.entropy_seconds = 0.0  # the last generate's entropy scoring (after generation)
        self.last_load: dict = {}
        self.interrupt = no_interrupt  # called before every batch

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self, model_path: str) -> None:
        load_reusing(self, model_path)

    def reload(self, model_path: str) -> bool:
        """Copy the weights into the live model; False when that failed (then it is loaded anew)."""
        try:
            self._copy_weights_in_place(Path(model_path).expanduser())
        except CheckpointLoadError as exc:  # the model may now hold a mix of weights: load it anew
            logger.warning("in-place weight load of %s failed (%s); loading the model anew", model_path, exc)
            return False
        return True

    def start(self, model_path: str) -> None:
        import torch
        from huggingface_hub.errors import StrictDataclassError
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=getattr(torch, self.dtype), use_safetensors=True, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(model_path, self.tokenizer_fallback),
                                                      trust_remote_code=False)
        # What from_pretrained raises for bad files; StrictDataclassError: a config.json that contradicts
        # itself (transformers 5 validates configs with huggingface_hub's strict dataclasses).
        except (ValueError, KeyError, StrictDataclassError) as exc:
            raise CheckpointLoadError(f"could not load {model_path}: {type(exc).__name__}: {first_line(exc)}") from exc
        except OSError as exc:  # a local file the checks passed but transformers could not read, or the hub
            if is_local(model_path):
                raise CheckpointLoadError(f"could not load {model_path}: {type(exc).__name__}: {first_line(exc)}") from exc
            raise EnvironmentFailure(f"could not fetch {model_path} from the hub ({first_line(exc)}); check the "
                                     f"network and the hub id") from exc
        tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.loop_unsupported = "evaluation.hf_decoder is generate" if self.decoder == "generate" else \
            supported_reason(self.model)
        if self.decoder == "batch_loop" and self.loop_unsupported:
            logger.warning("decoding %s with model.generate, several times slower than mathsft's batch loop, "
                           "which does not support its %s", model_path, self.loop_unsupported)

    def _copy_weights_in_place(self, path: Path) -> None:
        """Copy a checkpoint's tensors into the live model's parameters (same architecture and tokenizer).

        The parameters keep their memory, so the batch decoder's CUDA graphs, which read them by
        address, stay valid and are reused: a new model object would need new graphs and buffers.
        """
        import torch
        from safetensors import SafetensorError, safe_open

        targets = dict(self.model.named_parameters(remove_duplicate=False))  # tied weights under both names
        loaded = set()
        with torch.no_grad():
            for file in sorted(path.glob("*.safetensors")):
                try:
                    with safe_open(str(file), framework="pt") as handle:
                        for key in handle.keys():
                            target = targets.get(key)
                            if target is None:
                                raise CheckpointLoadError(f"{file} holds {key}, which the live model does not have")
                            tensor = handle.get_tensor(key)
                            if tensor.shape != target.shape:
                                raise CheckpointLoadError(f"{file}: {key} has shape {tuple(tensor.shape)}, "
                                                          f"the live model {tuple(target.shape)}")
                            target.copy_(tensor)
                            loaded.add(id(target))
                except (SafetensorError, OSError) as exc:
                    raise CheckpointLoadError(f"{file} is unreadable ({exc})") from exc
        missing = [name for name, p in self.model.named_parameters() if id(p) not in loaded]
        if missing:
            raise CheckpointLoadError(f"{path} has no tensor for {missing[0]} (and {len(missing) - 1} more)")

    def generate(self, prompts: list[str], sampling: Sampling, progress: bool,
                 entropy_rows: Sequence[int] = (), samples_per_prompt: int = 1) -> list[Generation]:
        """k responses per prompt: each prompt is decoded k times (rows of the same batches, each
        drawing its own tokens); see GenerationEngine.generate for the order."""
        import torch
        from tqdm import tqdm

        encoded = [self.tokenizer.encode(p) for p in prompts]
        prompt_ids = [ids for ids in encoded for _ in range(samples_per_prompt)]
        results = [empty_generation(ids) for ids in prompt_ids]
        fits = [i for i, ids in enumerate(prompt_ids) if len(ids) < self.max_model_len]
        _warn_too_long(sum(len(ids) >= self.max_model_len for ids in encoded), self.max_model_len)
        order = sorted(fits, key=lambda i: len(prompt_ids[i]))  # similar lengths share a batch: less padding
        cache_len = max((len(prompt_ids[i]) for i in order), default=0) + sampling.max_tokens
        torch.manual_seed(sampling.seed)
        start = 0
        with tqdm(total=len(order), desc="generating (hf)", unit="prompt", disable=not progress) as bar:
            while start < len(order):
                self.interrupt()
                size = _even_batch_size(len(order), self.batch_size)
                batch = order[start:start + size]
                try:
                    generations = self._generate_batch([prompt_ids[i] for i in batch], sampling, size, cache_len)
                except torch.OutOfMemoryError:
                    self._halve_batch_size()  # then the same prompts again, in smaller batches
                    continue
                for i, generation in zip(batch, generations):
                    results[i] = generation
                bar.update(len(batch))
                start += len(batch)
        self.entropy_seconds = score_entropy_rows(self.token_entropies, results, entropy_rows)
        return results

    def _halve_batch_size(self) -> None:
        """After running out of GPU memory: smaller batches from now on (long prompts need more memory)."""
        import torch

        self.batch_decoder = None  # its KV buffers were sized for the old batch size
        if self.batch_size == 1:
            raise EnvironmentFailure("out of GPU memory generating one prompt at a time; free the GPU (another "
                                     "process?), lower evaluation.max_tokens or use a GPU with more memory")
        self.batch_size = max(1, self.batch_size // 2)
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        logger.warning("out of GPU memory: evaluation.hf_batch_size lowered to %d for the rest of this run "
                       "(set it lower to avoid the retry)", self.batch_size)

    def _generate_batch(self, batch_ids: list[list[int]], sampling: Sampling, size: int,
                        cache_len: int) -> list[Generation]:
        eos_ids = self._eos_ids()
        if self.loop_unsupported:
            new_ids = self._generate_with_transformers(batch_ids, sampling, eos_ids)
        else:
            decoder = self._batch_decoder(size, cache_len)
            new_ids = decoder.sample(batch_ids, sampling.max_tokens, sampling.temperature, sampling.top_p, eos_ids,
                                     self.tokenizer.pad_token_id, self._stop_finder(sampling.stop))
        return [self._to_generation(ids, new, eos_ids, sampling.stop) for ids, new in zip(batch_ids, new_ids)]

    def _batch_decoder(self, size: int, cache_len: int) -> BatchDecoder:
        """The decoder for batches of `size`, kept while batch size and cache length suffice."""
        current = self.batch_decoder
        if current is None or current.batch_size != size or current.cache_len < cache_len:
            self.batch_decoder = None  # frees the old KV buffers before the new ones are allocated
            self.batch_decoder = BatchDecoder(self.model, size, cache_len,
                                              use_cuda_graphs=self.cuda_graphs and self.device.startswith("cuda"))
            logger.info("decoding in batches of %d with a %d-token KV cache%s", size, self.batch_decoder.cache_len,
                        " and CUDA graphs" if self.batch_decoder.use_cuda_graphs else "")
        return self.batch_decoder

    def _stop_finder(self, stops: tuple[str, ...]):
        """stop_end for BatchDecoder: where the first stop string ends, in tokens (None: no stop yet)."""
        overlap = max((len(s) for s in stops), default=0)  # a stop string spans at most this many tokens

        def holds_stop(tokens: list[int]) -> bool:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            return any(s in text for s in stops)

        def stop_end(tokens: list[int], checked: int) -> int | None:
            start = max(0, checked - overlap)  # tokens[:checked] hold no stop: look at the new ones
            if not stops or not holds_stop(tokens[start:]):
                return None
            free, stopped = checked, len(tokens)  # the shortest stopped prefix lies in (free, stopped]
            while stopped - free > 1:
                middle = (free + stopped) // 2
                free, stopped = (free, middle) if holds_stop(tokens[start:middle]) else (middle, stopped)
            return stopped

        return stop_end

    def _generate_with_transformers(self, batch_ids: list[list[int]], sampling: Sampling,
                                    eos_ids: list[int]) -> list[list[int]]:
        import torch

        encoded = self.tokenizer.pad({"input_ids": batch_ids}, return_tensors="pt").to(self.device)
        config = self._generation_config(sampling, eos_ids)
        with torch.inference_mode():
            output = self.model.generate(**encoded, generation_config=config, tokenizer=self.tokenizer)
        return output[:, encoded["input_ids"].shape[1]:].tolist()

    def _generation_config(self, sampling: Sampling, eos_ids: list[int]):
        from transformers import GenerationConfig

        # Sampling as in vLLM: no top-k (transformers would default it to 50), no repetition penalty.
        sample = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0} \
            if sampling.temperature > 0 else {"do_sample": False}
        return GenerationConfig(max_new_tokens=sampling.max_tokens, repetition_penalty=1.0, **sample,
                                stop_strings=list(sampling.stop) or None,
                                eos_token_id=eos_ids, pad_token_id=self.tokenizer.pad_token_id)

    def _to_generation(self, prompt_ids: list[int], new_ids: list[int], eos_ids: list[int],
                       stops: tuple[str, ...]) -> Generation:
        eos_at = next((k for k, t in enumerate(new_ids) if t in eos_ids), None)
        before_eos = new_ids if eos_at is None else new_ids[:eos_at]
        text = self.tokenizer.decode(before_eos, skip_special_tokens=True)
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            # Generation stopped on the token completing the stop string; what follows is padding
            # (pad = EOS for Qwen). Keep the stop string, drop anything the last token carried past it.
            at, stop = min(hits)
            return Generation(text[: at + len(stop)], before_eos, prompt_ids, "stop", len(before_eos))
        if eos_at is not None:
            tokens = new_ids[: eos_at + 1]
            return Generation(text, tokens, prompt_ids, "stop", len(tokens))
        return Generation(text, new_ids, prompt_ids, "length", len(new_ids))

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def token_entropies(self, generations: list[Generation]) -> list[float | None]:
        import torch

        results: list[float | None] = [None] * len(generations)
        # Longest first, in batches of at most ENTROPY_BATCH_TOKENS padded tokens: a forward pass over
        # hf_batch_size long responses at once would need tens of GB of activations.
        scored = sorted((i for i, g in enumerate(generations) if g.token_ids),
                        key=lambda i: -len(generations[i].prompt_token_ids + generations[i].token_ids))
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        start = 0
        with torch.inference_mode():
            while start < len(scored):
                width = len(generations[scored[start]].prompt_token_ids + generations[scored[start]].token_ids)
                batch = scored[start:start + max(1, ENTROPY_BATCH_TOKENS // width)]
                sequences = [generations[i].prompt_token_ids + generations[i].token_ids for i in batch]
                # Right padding: position ids start at 0 in every row, as during generation.
                ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, sequence in enumerate(sequences):
                    ids[row, : len(sequence)] = torch.tensor(sequence)
                    mask[row, : len(sequence)] = 1
                hidden = decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
                states = [hidden[row, response_positions(len(g.prompt_token_ids), len(g.token_ids))]
                          for row, g in enumerate(generations[i] for i in batch)]
                for i, value in zip(batch, response_entropies(states, head)):
                    results[i] = value
                start += len(batch)
        return results

    def close(self) -> None:
        if self.model is None:
            return
        on_gpu = self.device.startswith("cuda")
        self.batch_decoder = None
        self.model = None
        self.fingerprint = None
        gc.collect()
        if on_gpu:
            import torch

            torch.cuda.empty_cache()


def _even_batch_size(prompts: int, limit: int) -> int:
    """The batch size that splits `prompts` into the fewest batches of at most `limit`, evenly:
    5,000 prompts at 512 -> 10 batches of 500 (not 9 of 512 and one of 392, whose decoder would
    be padded to 512 rows or sized, and on a GPU captured, anew)."""
    batches = -(-prompts // limit)
    return -(-prompts // batches)
