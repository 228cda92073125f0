"""The Hugging Face engine's batch decoding loop (eval_daemon/engines/hf_decode.py) against model.generate."""

import pytest
import torch

import eval_daemon.engines.hf_decode as hf_decode
from eval_daemon.engines.base import Sampling
from eval_daemon.engines.hf import HfEngine, _even_batch_size

PROMPTS = ["What is $2+3$? <think>", "hello", "The answer is <answer> 5", "x", "a much longer prompt " * 5]


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _engine(model_dir, decoder: str, batch_size: int = 3, device: str = "cpu") -> HfEngine:
    engine = HfEngine(device, "float32", batch_size=batch_size, max_model_len=512, seed=0, tokenizer_fallback="",
                      decoder=decoder)
    engine.load(str(model_dir))
    return engine


def _stop_from_middle(text: str) -> str | None:
    """Two characters that first occur in the middle of `text` (None when there are none)."""
    return next((text[k:k + 2] for k in range(3, len(text) - 2) if text[k:k + 2].strip() and text.find(text[k:k + 2]) == k),
                None)


@pytest.mark.slow  # a real model decodes (seconds)
@pytest.mark.parametrize("device,check_every,window", [("cpu", 3, 256), ("cpu", 32, 8), pytest.param("cuda", 3, 8, marks=NEEDS_CUDA),
                                                       pytest.param("cuda", 32, 256, marks=NEEDS_CUDA)])
def test_batch_loop_gives_generates_greedy_responses(tiny_model_dir, monkeypatch, device, check_every, window):
    """Left-padded prompts of different lengths, a padded last batch (5 prompts in batches of 3),
    stop strings found across host checks, attention windows growing while decoding (CUDA graphs
    on a GPU): the same tokens, texts and finish reasons as generate."""
    monkeypatch.setattr(hf_decode, "CHECK_EVERY", check_every)
    monkeypatch.setattr(hf_decode, "WINDOW", window)
    reference = _engine(tiny_model_dir, "generate", device=device)
    loop = _engine(tiny_model_dir, "batch_loop", device=device)
    assert reference.loop_unsupported and loop.loop_unsupported is None
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=20, stop=(), seed=0)
    expected = reference.generate(PROMPTS, greedy, progress=False)
    got = loop.generate(PROMPTS, greedy, progress=False)
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert all(g.num_tokens == 20 and g.finish_reason == "length" for g in got)
    assert loop.batch_decoder is not None and loop.batch_decoder.batch_size == 3
    if device == "cuda":
        assert len(loop.batch_decoder.graphs) >= (2 if window == 8 else 1)
    stops = [s for s in map(_stop_from_middle, (g.text for g in expected)) if s][:2]
    stopping = Sampling(0.0, 1.0, 20, tuple(stops), 0)
    expected, got = reference.generate(PROMPTS, stopping, progress=False), loop.generate(PROMPTS, stopping, progress=False)
    assert sum(g.finish_reason == "stop" for g in got) >= 2
    assert [(g.text, g.token_ids, g.finish_reason, g.num_tokens) for g in got] == \
        [(g.text, g.token_ids, g.finish_reason, g.num_tokens) for g in expected]
    reference.close()
    loop.close()


@pytest.mark.slow  # a real model decodes (seconds)
def test_batch_loop_stops_at_eos_and_pads_after_it(tiny_model_dir):
    """A row that samples EOS is finished: its response ends with the EOS token, later steps give padding."""
    loop = _engine(tiny_model_dir, "batch_loop")
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=10, stop=(), seed=0)
    free = loop.generate(PROMPTS, greedy, progress=False)
    # Pretend a token that first appears mid-response is the EOS token.
    row, at = next((r, k) for r, g in enumerate(free) for k in range(2, 8) if g.token_ids[k] not in g.token_ids[:k])
    loop.model.generation_config.eos_token_id = free[row].token_ids[at]
    ended = loop.generate(PROMPTS, greedy, progress=False)
    assert ended[row].token_ids == free[row].token_ids[:at + 1] and ended[row].finish_reason == "stop"
    assert ended[row].num_tokens == at + 1
    alone = loop.generate([PROMPTS[row]], greedy, progress=False)[0]  # 10 steps < CHECK_EVERY: all of them run
    assert alone.token_ids == ended[row].token_ids
    assert loop.batch_decoder.out[0, at + 1:10].tolist() == [loop.tokenizer.pad_token_id] * (9 - at)
    loop.close()


@pytest.mark.slow  # a real model decodes (seconds)
def test_batch_loop_sampling_is_seeded_and_reuses_its_buffers(tiny_model_dir):
    loop = _engine(tiny_model_dir, "batch_loop", batch_size=8)
    sampled = Sampling(temperature=1.0, top_p=1.0, max_tokens=12, stop=(), seed=7)
    first = loop.generate(PROMPTS, sampled, progress=False)
    decoder = loop.batch_decoder
    again = loop.generate(PROMPTS, sampled, progress=False)
    assert loop.batch_decoder is decoder  # same batch size and cache length: buffers kept
    assert [g.token_ids for g in again] == [g.token_ids for g in first]
    other_seed = loop.generate(PROMPTS, Sampling(1.0, 1.0, 12, (), 8), progress=False)
    assert [g.token_ids for g in other_seed] != [g.token_ids for g in first]
    loop.generate(PROMPTS, Sampling(1.0, 1.0, 400, (), 7), progress=False)
    assert loop.batch_decoder is not decoder and loop.batch_decoder.cache_len >= 400
    loop.close()


def test_sampling_draws_from_the_softmax_and_respects_top_p():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(40_000, 1)
    counts = torch.bincount(hf_decode._sample(logits, 1.0, 1.0), minlength=4) / 40_000
    assert counts.tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.01)
    hotter = torch.bincount(hf_decode._sample(logits, 2.0, 1.0), minlength=4) / 40_000
    expected = torch.softmax(logits[0] / 2.0, -1)
    assert hotter.tolist() == pytest.approx(expected.tolist(), abs=0.01)
    nucleus = torch.bincount(hf_decode._sample(logits, 1.0, 0.7), minlength=4) / 40_000
    assert nucleus[2:].sum() == 0  # 0.5 + 0.3 reach 0.7: the two tail tokens are never drawn
    assert nucleus[0].item() == pytest.approx(0.5 / 0.8, abs=0.01)
    assert hf_decode._sample(logits[:3], 0.0, 1.0).tolist() == [0, 0, 0]


@pytest.mark.slow  # a real model decodes (seconds)
def test_unsupported_models_fall_back_to_generate(tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setattr(hf_decode, "SUPPORTED_MODEL_TYPES", ("llama",))
    with caplog.at_level("WARNING"):
        engine = _engine(tiny_model_dir, "batch_loop")
    assert "model_type 'qwen2'" in engine.loop_unsupported and "model.generate" in caplog.text
    generations = engine.generate(PROMPTS[:2], Sampling(0.0, 1.0, 5, (), 0), progress=False)
    assert [g.num_tokens for g in generations] == [5, 5] and engine.batch_decoder is None
    engine.close()


def test_even_batch_size():
    assert _even_batch_size(5000, 512) == 500
    assert _even_batch_size(1024, 512) == 512
    assert _even_batch_size(5, 3) == 3
    assert _even_batch_size(7, 100) == 7
