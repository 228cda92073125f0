"""The eval fleet: leases (claim, renew, takeover, release) and exactly-once recording with several
writers, first as the contract's functions raced by real processes, then as `bin/eval` workers
(real processes, Hugging Face engine on CPU, the tiny model): 3 workers on one run, a worker
killed with -9 while it holds a lease, a worker whose lease was taken over.

    /work/tools/pt tests/test_fleet.py        (the real-process tests are marked slow)
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from store_fixtures import summarise, synthetic_samples
from test_eval_daemon import Daemon, daemon_args, publish_model

from common.contract import (claim_lease, current_lease, lease_path, live_leases, release_lease, remove_leases,
                             renew_lease)
from common.store.schema import connect_read_only
from common.store.writer import record_evaluation
from eval_daemon.lease import Heartbeat

# ---- leases: the contract's operations -----------------------------------------------------------


def test_a_live_lease_is_refused_an_expired_one_taken_over_and_the_old_holder_cannot_renew(tmp_path):
    root = tmp_path / "leases"
    first = claim_lease(root, "run", 10, "k", "w0", lease_s=30, now=1000.0)
    assert first is not None and first.generation == 1 and first.expires_at == 1030.0
    assert claim_lease(root, "run", 10, "k", "w1", lease_s=30, now=1029.0) is None  # still live
    assert claim_lease(root, "run", 20, "k", "w1", lease_s=30, now=1029.0) is not None  # another step is free
    assert renew_lease(root, first, now=1029.0) and first.expires_at == 1059.0
    assert claim_lease(root, "run", 10, "k", "w1", lease_s=30, now=1058.0) is None  # the renewal counts
    taker = claim_lease(root, "run", 10, "k", "w1", lease_s=30, now=1060.0)  # expired: taken over
    assert taker is not None and taker.generation == 2
    assert not renew_lease(root, first, now=1061.0)  # the old holder learns it lost the lease...
    assert current_lease(root, "run", 10, "k").worker_id == "w1"  # ...and did not overwrite the taker's
    assert set(live_leases(root, now=1050.0)) == {("run", 10, "k"), ("run", 20, "k")}
    assert set(live_leases(root, now=1061.0)) == {("run", 10, "k")}  # step 20 was never renewed

    release_lease(root, taker)  # released: free at once, before it expires
    third = claim_lease(root, "run", 10, "k", "w2", lease_s=30, now=1062.0)
    assert third is not None and third.generation == 3
    remove_leases(root, "run", 10, "k")
    assert current_lease(root, "run", 10, "k") is None and not list((root / "run").glob("step_000010.*"))


def test_an_unreadable_lease_counts_as_expired(tmp_path):
    root = tmp_path / "leases"
    path = lease_path(root, "run", 10, "k", 1)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    lease = claim_lease(root, "run", 10, "k", "w0", lease_s=30)
    assert lease is not None and lease.generation == 2


def _race(root: str, worker: int, rounds: int, barrier, results) -> None:
    wins = []
    for r in range(rounds):
        barrier.wait()
        if claim_lease(Path(root), "run", r, "k", f"w{worker}", lease_s=30) is not None:
            wins.append(r)
    results.put((worker, wins))


def test_of_several_processes_racing_for_one_lease_exactly_one_wins(tmp_path):
    root, workers, rounds = tmp_path / "leases", 4, 30
    for r in range(0, rounds, 2):  # even rounds race to take over an expired lease, odd ones for a new one
        claim_lease(root, "run", r, "k", "dead", lease_s=30, now=0.0)
    context = multiprocessing.get_context("fork")  # no re-import: the race starts at once
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [context.Process(target=_race, args=(str(root), w, rounds, barrier, results)) for w in range(workers)]
    for process in processes:
        process.start()
    wins = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=30)
    winners = [[w for w in wins if r in wins[w]] for r in range(rounds)]
    assert all(len(w) == 1 for w in winners), winners
    for r in range(rounds):
        lease = current_lease(root, "run", r, "k")
        assert lease.worker_id == f"w{winners[r][0]}" and lease.generation == (2 if r % 2 == 0 else 1)


def test_heartbeat_renews_until_taken_over(tmp_path):
    root = tmp_path / "leases"
    lease = claim_lease(root, "run", 10, "k", "w0", lease_s=0.6)
    with Heartbeat(root, lease) as heartbeat:
        time.sleep(1.5)  # 2.5 lease durations: only the renewals keep it live
        assert claim_lease(root, "run", 10, "k", "w1", lease_s=0.6) is None and not heartbeat.lost.is_set()
    time.sleep(0.7)  # no heartbeat any more: it expires
    taker = claim_lease(root, "run", 10, "k", "w1", lease_s=30)
    assert taker is not None
    with Heartbeat(root, lease) as heartbeat:  # the old holder beating again finds it lost
        assert heartbeat.lost.wait(2)
    assert current_lease(root, "run", 10, "k").worker_id == "w1"


# ---- the store with several writers --------------------------------------------------------------


def _record(db: str, barrier, results) -> None:
    samples = synthetic_samples("run_a", 50, 40)
    evaluation = summarise("run_a", 50, samples)
    barrier.wait()
    results.put(record_evaluation(Path(db), evaluation, samples))


@pytest.mark.slow  # real processes, each opening the store
def test_several_processes_recording_one_key_at_once_store_it_once(tmp_path):
    db, writers = tmp_path / "results.duckdb", 3
    context = multiprocessing.get_context("fork")  # no re-import: the race starts at once
    barrier, results = context.Barrier(writers), context.Queue()
    processes = [context.Process(target=_record, args=(str(db), barrier, results)) for _ in range(writers)]
    for process in processes:
        process.start()
    committed = [results.get(timeout=180) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert sorted(committed) == [False] * (writers - 1) + [True]
    with connect_read_only(db) as con:
        assert con.execute("SELECT count(*) FROM evaluations").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == 40


# ---- bin/eval workers as real processes ----------------------------------------------------------


def fleet_args(math_dir: Path, *extra: str) -> list[str]:
    # Short leases (a heartbeat every 4/3 s), and a look at the queue every second.
    return daemon_args(math_dir, "evaluation.reconcile_interval_s=1", "evaluation.lease_s=4", *extra)


def env(**extra: str) -> dict:
    # One torch thread per worker: several processes each spreading over every core of a small
    # machine slow each other down many times over.
    return {"OMP_NUM_THREADS": "1", **extra}


def rows(db: Path) -> list[tuple]:
    """(step, worker_id, started_at, samples) per stored evaluation."""
    if not db.exists():
        return []
    with connect_read_only(db) as con:
        return con.execute("SELECT e.step, e.worker_id, e.started_at, (SELECT count(*) FROM samples s WHERE "
                           "s.run_id = e.run_id AND s.step = e.step AND s.eval_key = e.eval_key) "
                           "FROM evaluations e WHERE e.status = 'ok' ORDER BY e.step").fetchall()


def wait_until(condition, what: str, daemons: list[Daemon], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(d.log()[-2000:] for d in daemons)
            raise AssertionError(f"no {what} after {timeout} s:\n{logs}")
        time.sleep(0.3)


def stop(daemons: list[Daemon]) -> None:
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.wait(30)


@pytest.mark.slow
def test_three_workers_record_every_checkpoint_once_and_each_does_some(tmp_path, tiny_model_dir, math_dir):
    checkpoints, db = tmp_path / "results" / "checkpoints", tmp_path / "results" / "results.duckdb"
    steps = list(range(10, 70, 10))
    # One command, three processes; each evaluation lasts >= 2 s (test hook), so that all three get work.
    fleet = Daemon(tmp_path, fleet_args(math_dir, "--workers", "3", "evaluation.worker_id=fleet"),
                   env=env(MATHSFT_TEST_EVAL_DELAY_S="2"))
    try:
        fleet.wait_for_log("all published checkpoints are evaluated", timeout=600, count=3)  # every worker is up and idle
        for step in steps:
            publish_model(checkpoints, "run_a", step, tiny_model_dir, noise_seed=step)
        wait_until(lambda: len(rows(db)) >= len(steps), f"{len(steps)} evaluations", [fleet])
        fleet.process.send_signal(signal.SIGTERM)
        assert fleet.wait(60) == 0
    finally:
        stop([fleet])
    recorded = rows(db)
    assert [r[0] for r in recorded] == steps and all(r[3] == 7 for r in recorded)  # each once, complete
    assert {r[1] for r in recorded} == {"fleet-0", "fleet-1", "fleet-2"}  # every worker did some
    assert not list((tmp_path / "results" / "leases").rglob("*.lease"))  # recorded: no lease left behind


@pytest.mark.slow
def test_a_checkpoint_whose_worker_was_killed_is_finished_by_another_after_the_lease_expires(
        tmp_path, tiny_model_dir, math_dir):
    checkpoints, db = tmp_path / "results" / "checkpoints", tmp_path / "results" / "results.duckdb"
    for step in (10, 20):
        publish_model(checkpoints, "run_a", step, tiny_model_dir, noise_seed=step)
    holder = Daemon(tmp_path, fleet_args(math_dir, "evaluation.worker_id=holder"), env=env(MATHSFT_TEST_EVAL_DELAY_S="600"))
    other = None
    try:
        holder.wait_for_log("test hook", timeout=600)  # step 10 claimed, generated and graded; sleeping before recording
        other = Daemon(tmp_path, fleet_args(math_dir, "evaluation.worker_id=other"), env=env())
        wait_until(lambda: [r[0] for r in rows(db)] == [20], "step 20 recorded by the other worker", [holder, other])
        time.sleep(9)  # more than two lease durations: only the holder's heartbeat keeps step 10 from being taken
        assert [r[0] for r in rows(db)] == [20]
        killed_at = datetime.now(timezone.utc).replace(tzinfo=None)
        holder.process.send_signal(signal.SIGKILL)
        holder.wait(30)
        wait_until(lambda: len(rows(db)) == 2, "step 10 recorded after the lease expired", [other])
    finally:
        stop([d for d in (holder, other) if d is not None])
    (step10, worker, started_at, samples), step20 = rows(db)
    assert (step10, worker, samples) == (10, "other", 7) and step20[:2] == (20, "other")
    assert started_at >= killed_at  # taken over only once the holder had died


@pytest.mark.slow
def test_a_worker_whose_lease_was_taken_over_does_not_add_a_second_row(tmp_path, tiny_model_dir, math_dir):
    results = tmp_path / "results"
    db = results / "results.duckdb"
    publish_model(results / "checkpoints", "run_a", 10, tiny_model_dir, noise_seed=1)
    slow = Daemon(tmp_path, fleet_args(math_dir, "--once", "evaluation.worker_id=slow"),
                  env=env(MATHSFT_TEST_EVAL_DELAY_S="4"))
    fast = None
    try:
        slow.wait_for_log("test hook", timeout=600)  # holds the lease, has its result, has not recorded it
        slow.process.send_signal(signal.SIGSTOP)  # a stalled worker: no heartbeat, the lease expires
        fast = Daemon(tmp_path, fleet_args(math_dir, "--once", "evaluation.worker_id=fast"), env=env())
        assert fast.wait(600) == 0
        assert [r[:2] for r in rows(db)] == [(10, "fast")]
        slow.process.send_signal(signal.SIGCONT)  # wakes up, finishes, tries to record
        assert slow.wait(300) == 0
    finally:
        if slow.process.poll() is None:
            slow.process.send_signal(signal.SIGCONT)
        stop([d for d in (slow, fast) if d is not None])
    assert [r[:2] for r in rows(db)] == [(10, "fast")]  # one row, the first recorder's
    summaries = [json.loads(p.read_text()) for p in (results / "eval_logs").glob("summary_eval_step_10_*.json")]
    assert [s["worker_id"] for s in summaries] == ["fast"]  # nor did the slow one write files beside the record
