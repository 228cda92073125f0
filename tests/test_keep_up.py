"""evaluation.schedule=keep_up: the scheduling decisions (eval_daemon/schedule.py), the stratified
subset (eval_daemon/evaluate.py), and bin/eval behind a run as a real process (slow).

    /work/tools/pt tests/test_keep_up.py
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from test_eval_daemon import daemon_args, publish_model, run_daemon

from common.contract import Checkpoint
from common.data import MathExample
from common.store.schema import connect_read_only
from eval_daemon.evaluate import EvalSet, stratified_subset
from eval_daemon.schedule import plan

FULL, SUB = "full-key", "sub-key"


def _ck(step: int, published_at: float, run_id: str = "a") -> Checkpoint:
    return Checkpoint(run_id=run_id, step=step, path=Path(f"/x/{run_id}/{step}"), run_dir=None,
                      published_at=f"{published_at:012.3f}")


def _kinds(work) -> list[tuple[int, str]]:
    return [(w.checkpoint.step, "sub" if w.subset else "full") for w in work]


# ---- the decisions -------------------------------------------------------------------------------


def test_the_newest_checkpoint_alone_waiting_gets_the_full_evaluation_then_the_back_fill():
    published = [_ck(10, 1), _ck(20, 2), _ck(30, 3)]
    recorded = {("a", 10, SUB), ("a", 20, SUB)}  # 10 and 20 had quick numbers while behind
    assert _kinds(plan(published, recorded, set(), FULL, SUB, "keep_up")) == [(30, "full"), (20, "full"), (10, "full")]
    # An older one left waiting (the fleet is still behind): its quick number comes first.
    assert _kinds(plan(published, {("a", 30, SUB)}, set(), FULL, SUB, "keep_up"))[:2] == [(20, "sub"), (10, "sub")]
    assert _kinds(plan(published, {("a", 30, SUB), ("a", 20, SUB)}, set(), FULL, SUB, "keep_up"))[0] == (10, "sub")
    recorded |= {("a", 30, FULL), ("a", 20, FULL)}
    assert _kinds(plan(published, recorded, set(), FULL, SUB, "keep_up")) == [(10, "full")]
    assert plan(published, recorded | {("a", 10, FULL)}, set(), FULL, SUB, "keep_up") == []


def test_behind_every_waiting_checkpoint_gets_the_subset_newest_first_before_any_back_fill():
    published = [_ck(10, 1), _ck(20, 2), _ck(30, 3), _ck(40, 4), _ck(5, 5, run_id="b")]
    recorded = {("a", 10, SUB)}
    work = plan(published, recorded, set(), FULL, SUB, "keep_up")
    assert _kinds(work) == [(5, "sub"), (40, "sub"), (30, "sub"), (20, "sub"), (10, "full")]
    assert [w.eval_key for w in work] == [SUB] * 4 + [FULL]


def test_checkpoints_other_workers_hold_are_neither_waiting_nor_offered():
    published = [_ck(10, 1), _ck(20, 2), _ck(30, 3)]
    held = {("a", 20, FULL), ("a", 10, SUB)}  # another worker evaluates 20 fully, a third 10 quickly
    assert _kinds(plan(published, set(), held, FULL, SUB, "keep_up")) == [(30, "full")]  # the newest, alone: full
    held = {("a", 30, FULL), ("a", 20, SUB)}
    assert _kinds(plan(published, set(), held, FULL, SUB, "keep_up")) == [(10, "sub")]  # an older one: quick


def test_without_a_subset_keep_up_orders_full_evaluations_like_latest_and_the_others_stay():
    published = [_ck(20, 2), _ck(10, 1), _ck(30, 5), _ck(5, 3, "b"), _ck(15, 4, "b")]
    recorded = {("a", 10, FULL)}
    latest = _kinds(plan(published, recorded, set(), FULL, None, "latest"))
    assert _kinds(plan(published, recorded, set(), FULL, None, "keep_up")) == latest
    assert latest == [(30, "full"), (15, "full"), (20, "full"), (5, "full")]
    in_order = plan(published, recorded, set(), FULL, SUB, "in_order")  # a subset key changes nothing there
    assert [(w.checkpoint.run_id, w.checkpoint.step) for w in in_order] == [("a", 20), ("a", 30), ("b", 5), ("b", 15)]


def simulate(schedule: str, checkpoints: int, interval_s: float, full_s: float, subset_s: float) -> dict:
    """One worker following plan() while a trainer publishes every interval_s; returns per step the
    publication -> first record lag and which records it ends with."""
    arrivals = [(i * interval_s, 10 * i) for i in range(checkpoints)]
    now, recorded, first = 0.0, set(), {}
    while True:
        published = [_ck(step, at) for at, step in arrivals if at <= now]
        todo = plan(published, recorded, set(), FULL, SUB, schedule)
        if not todo:
            later = [at for at, _ in arrivals if at > now]
            if not later:
                break
            now = later[0]
            continue
        now += subset_s if todo[0].subset else full_s
        recorded.add(("a", todo[0].checkpoint.step, todo[0].eval_key))
        first.setdefault(todo[0].checkpoint.step, now)
    return {"lag": {step: first[step] - at for at, step in arrivals},
            "full": sorted(step for _, step, key in recorded if key == FULL)}


def test_keep_up_bounds_the_lag_that_in_order_lets_grow_and_ends_with_every_full_evaluation():
    # Full evaluations twice as long as a publish interval (as measured on one H200, issue 16),
    # the subset a fifth of the full set.
    in_order = simulate("in_order", 12, interval_s=35, full_s=70, subset_s=14)
    keep_up = simulate("keep_up", 12, interval_s=35, full_s=70, subset_s=14)
    steps = [10 * i for i in range(12)]
    assert in_order["full"] == keep_up["full"] == steps  # nothing skipped for good
    lags = [in_order["lag"][s] for s in steps]
    assert lags == sorted(lags) and lags[-1] > 5 * lags[0]  # in order: the queue grows without bound
    # keep_up: a checkpoint waits at most for the full evaluation in progress and then its own
    # evaluation (a subset while behind), however long the run
    assert max(keep_up["lag"].values()) <= 2 * 70 < lags[-1] / 3
    longer = simulate("keep_up", 40, interval_s=35, full_s=70, subset_s=14)
    assert max(longer["lag"].values()) <= 2 * 70 and longer["full"] == [10 * i for i in range(40)]


# ---- the stratified subset -----------------------------------------------------------------------


def _eval_set(n_per_stratum: dict[tuple[str, int], int]) -> EvalSet:
    examples = [MathExample(problem=f"p{subject}{level}{i}", answer="1", solution="", subject=subject, level=level,
                            problem_id=f"{subject}/{level}/{i}")
                for (subject, level), count in n_per_stratum.items() for i in range(count)]
    return EvalSet(name="math", examples=examples, prompts=[e.problem for e in examples], entropy_indices=[])


def test_the_subset_keeps_each_subject_and_level_share_and_is_fixed_by_the_seed():
    strata = {("algebra", 1): 300, ("algebra", 5): 100, ("geometry", 2): 50, ("geometry", 3): 49, ("precalculus", 4): 1}
    full = _eval_set(strata)
    subset = stratified_subset(full, 100, seed=0, entropy_sample_size=8)
    assert subset.name == "math-strat100" and len(subset.examples) == 100 == len(subset.prompts)
    counts = Counter((e.subject, e.level) for e in subset.examples)
    for stratum, size in strata.items():
        assert abs(counts[stratum] - size * 100 / 500) < 1  # each share, rounded
    ids = [e.problem_id for e in subset.examples]
    assert ids == [e.problem_id for e in full.examples if e.problem_id in set(ids)]  # the eval set's order
    assert ids == [e.problem_id for e in stratified_subset(full, 100, 0, 8).examples]  # fixed
    assert ids != [e.problem_id for e in stratified_subset(full, 100, 1, 8).examples]  # seeded
    assert len(subset.entropy_indices) == 8
    assert stratified_subset(full, 500, 0, 8) is None  # not smaller than the eval set: no subset


# ---- bin/eval behind a run -----------------------------------------------------------------------


@pytest.mark.slow
def test_started_behind_a_run_keep_up_gives_every_checkpoint_a_subset_number_then_every_full_one(
        tmp_path, tiny_model_dir, math_dir):
    results = tmp_path / "results"
    steps = (10, 20, 30)
    for step in steps:  # published before the daemon starts: it is behind by three checkpoints
        publish_model(results / "checkpoints", "run_a", step, tiny_model_dir, noise_seed=step)
    code, log = run_daemon(tmp_path, daemon_args(math_dir, "--once", "evaluation.schedule=keep_up",
                                                 "evaluation.keep_up_subset=3"), timeout=900,
                           env={"OMP_NUM_THREADS": "1"})
    assert code == 0, log
    with connect_read_only(results / "results.duckdb") as con:
        rows = con.execute("SELECT step, eval_set, num_test_cases FROM evaluations ORDER BY recorded_at").fetchall()
        views = con.execute("SELECT DISTINCT eval_set, eval_key FROM progress ORDER BY eval_set").fetchall()
        subjects = con.execute("SELECT DISTINCT subject, level FROM samples WHERE eval_key = ? ORDER BY ALL",
                               [views[1][1]]).fetchall()
    # All three quick numbers first, newest first; then the full evaluations back-filled, newest first.
    assert rows == [(30, "math-strat3", 3), (20, "math-strat3", 3), (10, "math-strat3", 3),
                    (30, "math", 7), (20, "math", 7), (10, "math", 7)]
    assert [v[0] for v in views] == ["math", "math-strat3"] and views[1][1].startswith("math_strat3-")
    assert subjects == [("algebra", 1), ("algebra", 2), ("prealgebra", 1)]  # the largest stratum, then the rest
    markers = sorted(p.name for p in (results / "checkpoints" / "run_a" / "evaluated").iterdir())
    assert markers == [f"step_0000{step}.{views[0][1]}.done" for step in steps]  # retention waits for the full ones
    metrics = [json.loads(line) for line in (results / "eval_logs" / "eval_metrics.jsonl").read_text().splitlines()]
    assert [("eval_subset/accuracy" in m, "eval/accuracy" in m) for m in metrics] == [(True, False)] * 3 + [(False, True)] * 3
