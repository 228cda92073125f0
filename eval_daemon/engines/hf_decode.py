"""Batched sampling for the Hugging Face engine: a decoding loop over a preallocated KV cache.

`model.generate` spends most of a decoding step outside the GPU's arithmetic: Python and kernel
launches for ~30 modules, a KV cache that grows by concatenation, and with a padding mask the
sdpa path repeats every key/value head for each query head it serves (6x the KV reads for
Qwen2.5-1.5B). This loop runs the same layers (the model's own modules: projections, norms, MLP,
rotary tables) with

- one KV buffer per layer, [batch, kv_heads, cache_len, head_dim], written in place;
- decoding attention that groups the query heads of each KV head, so keys and values are read once;
- sampling on the GPU (the exponential race: argmax(p / E), E ~ Exp(1), an exact draw from p);
- on CUDA, each decoding step captured once as a CUDA graph per attention window (a multiple of
  WINDOW positions) and replayed: no Python and no launch overhead per step;
- the host checking for finished rows only every CHECK_EVERY steps.

It re-implements the decoder-layer wiring of Qwen2 and Llama models (supported_reason says which
models qualify); the Hugging Face engine falls back to model.generate for any other model.
Used by eval_daemon/engines/hf.py; tests/test_hf_decode.py checks it against model.generate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

WINDOW = 256  # decoding attends to the first k * WINDOW cache positions: one CUDA graph per k
CHECK_EVERY = 32  # decoding steps between host checks for finished rows (each check waits for the GPU)
PREFILL_TOKENS = 16_384  # padded prompt tokens per prefill forward pass (activation memory)
SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
PLAIN_ROPE_TYPES = ("default", "linear", "llama3")  # position tables that need no host-side decisions

# stop_end(row_tokens, checked): None, or the length of the shortest prefix of row_tokens whose text
# holds a stop string (tokens before `checked` were already found free of one).
StopEnd = Callable[[list[int], int], "int | None"]


def supported_reason(model) -> str | None:
    """None when this loop can decode `model`; otherwise why not (the engine then uses generate)."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {config.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    decoder = model.get_decoder()
    if getattr(decoder.rotary_emb, "rope_type", "default") not in PLAIN_ROPE_TYPES:
        return f"rope type {decoder.rotary_emb.rope_type!r}"
    if any(getattr(layer.self_attn, "sliding_window", None) for layer in decoder.layers):
        return "sliding-window attention layers"
    return None


class BatchDecoder:
    """Samples continuations for batches of exactly `batch_size` prompts (fewer are padded with copies).

    Holds the KV buffers and, on CUDA, the captured graphs; both are reused across batches, calls
    and checkpoints whose weights are copied into the same parameters.
    """

    def __init__(self, model, batch_size: int, cache_len: int, use_cuda_graphs: bool) -> None:
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.batch_size = batch_size
        self.cache_len = -(-cache_len // WINDOW) * WINDOW
        self.use_cuda_graphs = use_cuda_graphs
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        attn = self.decoder.layers[0].self_attn
        kv_heads = model.config.num_key_value_heads
        shape = (batch_size, kv_heads, self.cache_len, attn.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.decoder.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.decoder.layers]
        # The decoding step's inputs and state: fixed tensors that each graph reads and advances.
        long = dict(dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(batch_size, **long)  # the token each row feeds next
        self.positions = torch.zeros(batch_size, **long)  # its position id (rows are left-padded)
        self.write_at = torch.zeros(1, **long)  # the cache index it is written to (same for all rows)
        self.step_at = torch.zeros(1, **long)  # its column in `out`
        self.visible = torch.zeros(batch_size, 1, 1, self.cache_len, dtype=torch.bool, device=self.device)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        self.out = torch.zeros(batch_size, 1, **long)
        self.eos = torch.zeros(0, **long)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if use_cuda_graphs else None

    # ---- one batch ----------------------------------------------------------------------------

    def sample(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
               eos_ids: list[int], pad_id: int, stop_end: StopEnd) -> list[list[int]]:
        """New tokens for each prompt: up to max_new_tokens, cut after a stop string; after an EOS
        token come pad_id tokens (as model.generate returns them)."""
        if not 0 < len(prompts) <= self.batch_size:
            raise ValueError(f"{len(prompts)} prompts for a decoder of batch size {self.batch_size}")
        rows = prompts + [prompts[-1]] * (self.batch_size - len(prompts))
        width = max(len(p) for p in rows)
        if width + max_new_tokens > self.cache_len:
            raise ValueError(f"{width} prompt + {max_new_tokens} new tokens exceed the cache of {self.cache_len}")
        sampling = (float(temperature), float(top_p), int(pad_id), tuple(eos_ids))
        with torch.inference_mode():
            first = self._prefill(rows, width, sampling)
            self._start_decoding(rows, width, first, max_new_tokens, eos_ids)
            return self._decode(len(prompts), width, max_new_tokens, sampling, stop_end)

    def _prefill(self, rows: list[list[int]], width: int, sampling: tuple) -> torch.Tensor:
        """Fill the KV buffers with the left-padded prompts; return the first sampled token per row."""
        chunk = max(1, PREFILL_TOKENS // width)
        firsts = []
        for start in range(0, len(rows), chunk):
            ids = torch.full((len(rows[start:start + chunk]), width), sampling[2], dtype=torch.long)
            real = torch.zeros(ids.shape, dtype=torch.bool)
            for row, prompt in enumerate(rows[start:start + chunk]):
                ids[row, width - len(prompt):] = torch.tensor(prompt)
                real[row, width - len(prompt):] = True
            ids, real = ids.to(self.device), real.to(self.device)
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
            # A padding position attends to itself only: keeps its (unused) state finite.
            mask = (causal & real[:, None, None, :]) | torch.eye(width, dtype=torch.bool, device=self.device)
            rows_at = slice(start, start + len(ids))

            def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                self.keys[layer][rows_at, :, :width] = k
                self.values[layer][rows_at, :, :width] = v
                return k, v

            hidden = self._layers(self.decoder.embed_tokens(ids), positions, mask, write, _prefill_attention)
            firsts.append(_sample(self.head(hidden[:, -1]), *sampling[:2]))
        return torch.cat(firsts)

    def _start_decoding(self, rows: list[list[int]], width: int, first: torch.Tensor, max_new_tokens: int,
                        eos_ids: list[int]) -> None:
        lengths = torch.tensor([len(p) for p in rows], device=self.device)
        self.visible.zero_()
        self.visible[:, 0, 0, :width] = torch.arange(width, device=self.device) >= (width - lengths)[:, None]
        # Graphs hold the addresses of `eos` and `out`: replacing either drops them.
        if self.eos.tolist() != list(eos_ids):
            self.eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device)
            self.graphs.clear()
        if self.out.shape[1] < max_new_tokens:
            self.out = torch.zeros(self.batch_size, max_new_tokens, dtype=torch.long, device=self.device)
            self.graphs.clear()
        self.out[:, 0] = first
        self.tokens.copy_(first)
        self.positions.copy_(lengths)
        self.write_at.fill_(width)
        self.step_at.fill_(1)
        self.finished.copy_(torch.isin(first, self.eos))

    def _decode(self, real_rows: int, width: int, max_new_tokens: int, sampling: tuple,
                stop_end: StopEnd) -> list[list[int]]:
        tokens: list[list[int]] = [[] for _ in range(real_rows)]
        done = [False] * real_rows
        checked = 0  # columns of `out` already copied to `tokens`
        for step in range(1, max_new_tokens + 1):
            if step < max_new_tokens:
                window = min(-(-(width + step) // WINDOW) * WINDOW, self.cache_len)
                self._step(window, sampling)
            if step % CHECK_EVERY and step < max_new_tokens:
                continue
            finished = self.finished[:real_rows].tolist()  # waits for the GPU
            new = self.out[:real_rows, checked: min(step + 1, max_new_tokens)].tolist()
            for row in range(real_rows):
                if done[row]:
                    continue
                tokens[row].extend(new[row])
                end = stop_end(tokens[row], checked)
                if end is not None:
                    del tokens[row][end:]
                done[row] = finished[row] or end is not None
            checked = min(step + 1, max_new_tokens)
            if all(done) or checked == max_new_tokens:
                break
        return tokens

    # ---- the decoding step --------------------------------------------------------------------

    def _step(self, window: int, sampling: tuple) -> None:
        if not self.use_cuda_graphs:
            self._decode_step(window, sampling)
            return
        key = (window, *sampling)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        # First step at this window: run it for real on a side stream (warms up cuBLAS and the
        # allocator, as capture requires), then capture the next one without running it.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._decode_step(window, sampling)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._decode_step(window, sampling)
        self.graphs[key] = graph
        logger.debug("captured the decoding step for window %d (%d graphs)", window, len(self.graphs))

    def _decode_step(self, window: int, sampling: tuple) -> None:
        """Feed `tokens`, sample the next ones, advance the state: tensor work only (no host sync)."""
        temperature, top_p, pad_id, _ = sampling
        self.visible.index_fill_(3, self.write_at, True)
        visible = self.visible[..., :window]

        def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.keys[layer].index_copy_(2, self.write_at, k)
            self.values[layer].index_copy_(2, self.write_at, v)
            return self.keys[layer][:, :, :window], self.values[layer][:, :, :window]

        hidden = self._layers(self.decoder.embed_tokens(self.tokens[:, None]), self.positions[:, None], visible,
                              write, _decode_attention)
        next_tokens = _sample(self.head(hidden[:, -1]), temperature, top_p)
        next_tokens = torch.where(self.finished, pad_id, next_tokens)  # rows past their EOS get padding
        self.finished |= torch.isin(next_tokens, self.eos)
        self.out.index_copy_(1, self.step_at, next_tokens[:, None])
        self.tokens.copy_(next_tokens)
        self.positions.add_(1)
        self.write_at.add_(1)
        self.step_at.add_(1)

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, write, attention):
        """The decoder layers (Qwen2 / Llama wiring) with the model's own modules; returns the final norm."""
        cos, sin = self.decoder.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]
        for index, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            shape = (*x.shape[:-1], -1, attn.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys, values = write(index, k, v)
            hidden = hidden + attn.o_proj(attention(q, keys, values, mask, attn.scaling))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.decoder.norm(hidden)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as transformers' apply_rotary_pos_emb (rotate_half convention)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _prefill_attention(q, keys, values, mask, scale) -> torch.Tensor:
    """[b, heads, T, d] queries over the prompt's own keys; returns [b, T, heads * d]."""
    groups = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _decode_attention(q, keys, values, mask, scale) -> torch.Tensor:
    """One query per row: the query heads sharing a KV head become that head's query rows, so the
    cache is read once (repeating it per query head would multiply the reads by the group size)."""
    batch, heads, _, dim = q.shape
    grouped = q.reshape(batch, keys.shape[1], heads // keys.shape[1], dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(batch, 1, heads * dim)


def _sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else a draw from softmax(logits / T), nucleus-cut."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the top token is always kept
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0))
    # argmax(p / E) with E ~ Exp(1) picks token i with probability p_i; the clamp keeps a zero draw
    # from turning a zero-probability token's 0/0 into NaN (which argmax would pick).
    return (probs / torch.empty_like(probs).exponential_().clamp_(min=1e-20)).argmax(-1)
