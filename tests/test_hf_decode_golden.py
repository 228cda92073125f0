"""Golden test of the HF engine's own decoding loop (eval_daemon/engines/hf_decode.py) on the real
Qwen2.5-Math-1.5B architecture in bfloat16: teacher-forced, the loop's logits at every prefill and
decoding step stay as close to one plain transformers forward pass over the whole sequence as
transformers' own left-padded batched forward does (the bf16 noise floor: measured on 2026-12-01,
0.14 on a logit scale of 0.78, the loop 0.10-0.11), and the token each step would pick is the same
wherever the choice is not a near-tie at that floor. A wiring error (rotary positions, masks, the
KV cache, a skipped layer) moves logits by about the whole scale.

Why the loop is kept rather than replaced by transformers' own generation: it is 14-17x
`model.generate` on an H200 (docs/PERFORMANCE.md); this test is what makes a wrong token visible.
Random weights (speed and wiring do not depend on them); CPU, about a minute on 2 cores.
"""

import pytest
import torch

import eval_daemon.engines.hf_decode as hf_decode

pytestmark = pytest.mark.slow

# Qwen/Qwen2.5-Math-1.5B's config.json (architecture fields).
QWEN25_MATH_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                       rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
PROMPT_LENGTHS = (23, 9, 17)  # left-padded to one width, as the engine batches them
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**QWEN25_MATH_15B, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise 1.5B weights in bf16: half the time and memory
    try:
        return Qwen2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


def test_batch_loop_matches_a_full_forward_on_the_real_architecture_in_bf16(model, monkeypatch):
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 151_000, (n + NEW_TOKENS,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    prompts = [seq[:n] for seq, n in zip(sequences, PROMPT_LENGTHS)]
    forced = iter(torch.tensor([seq[n + k] for seq, n in zip(sequences, PROMPT_LENGTHS)]) for k in range(NEW_TOKENS))
    seen: list[torch.Tensor] = []

    def teacher_forced(logits, temperature, top_p):  # records what the loop would sample from
        seen.append(logits.float())
        return next(forced)

    monkeypatch.setattr(hf_decode, "_sample", teacher_forced)
    decoder = hf_decode.BatchDecoder(model, batch_size=len(prompts), cache_len=64, use_cuda_graphs=False)
    tokens = decoder.sample(prompts, NEW_TOKENS, 0.0, 1.0, eos_ids=[151643], pad_id=151643, stop_end=lambda t, c: None)
    assert tokens == [seq[n:] for seq, n in zip(sequences, PROMPT_LENGTHS)]
    assert len(seen) == NEW_TOKENS

    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), 151643)
    mask = torch.zeros(ids.shape, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):], mask[row, width - len(seq):] = torch.tensor(seq), 1
    with torch.inference_mode():
        padded = model(ids, attention_mask=mask).logits.float()
        references, floor = [], 0.0
        for row, (seq, n) in enumerate(zip(sequences, PROMPT_LENGTHS)):
            reference = model(torch.tensor([seq])).logits[0, n - 1: n - 1 + NEW_TOKENS].float()
            offset = width - len(seq)
            floor = max(floor, (padded[row, offset + n - 1: offset + n - 1 + NEW_TOKENS] - reference).abs().max().item())
            references.append(reference)
    scale = torch.cat(references).std().item()
    floor = max(floor, 0.02 * scale)  # transformers' own deviation under left padding, in bf16
    assert floor < 0.3 * scale, (floor, scale)  # a floor near the scale would make the test meaningless
    for row, reference in enumerate(references):
        loop = torch.stack([step[row] for step in seen])
        assert (loop - reference).abs().max().item() <= 1.5 * floor, (row, (loop - reference).abs().max().item(), floor)
        top2 = reference.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * floor
        assert torch.equal(loop.argmax(-1)[clear], reference.argmax(-1)[clear]), row
