"""End to end, with real processes: the trainer and the eval daemon in parallel on the demo's tiny
model (config/demo.yaml at test size, Hugging Face engine on CPU), hit by kill -9 at the awkward
moments, with bin/query reading the store in a loop all along.

One scenario (the `scenario` fixture, ~2 minutes on 2 cores) is shared by the tests below:
  1. junk in results/checkpoints/: a stray directory, a garbage manifest, a manifest of the wrong shape
  2. trainer T1 starts (its step-8 publish is slowed by a test hook); eval daemon E1 starts (a test
     hook makes it pause after grading, before writing) -> kill -9 E1 mid-evaluation of step 0
  3. eval daemon E2 starts; once it has recorded steps 0 and 4 and T1 is inside the step-8
     publish (temp directory written, not renamed) -> kill -9 T1
  4. trainer T2 resumes the run and finishes it; E2 records everything, then gets SIGTERM
  5. eval daemon E3 starts after training finished, with a fresh store: evaluates the whole run

    bin/test tests/test_e2e_faults.py
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from e2e_support import DEMO_CONFIG, TEST_INPUTS, Proc, ReaderLoop, build_inputs, demo_paths, evaluations

from common.contract import read_manifest

pytestmark = pytest.mark.slow

RUN_ID, MAX_STEPS, EVAL_EVERY = "e2e", 16, 4
STEPS = list(range(0, MAX_STEPS + 1, EVAL_EVERY))  # published: step 0 (the base model) and every 4 steps


def train_args(root: Path) -> list[str]:
    return ["--config", DEMO_CONFIG, *demo_paths(root), f"training.run_id={RUN_ID}", f"training.max_steps={MAX_STEPS}",
            f"training.eval_every={EVAL_EVERY}", f"training.save_resume_every={EVAL_EVERY}", "training.batch_size=4",
            "training.warmup_steps=2", "logging.log_every=1", "logging.progress_bar=false"]


def eval_args(root: Path, max_tokens: int = 24) -> list[str]:
    # Reconcile every 2 s as well as watchdog events: the test does not depend on event timing.
    return ["--config", DEMO_CONFIG, *demo_paths(root), "evaluation.engine=hf", f"evaluation.max_tokens={max_tokens}",
            "evaluation.reconcile_interval_s=2", "evaluation.entropy_sample_size=2", "logging.progress_bar=false"]


def resume_step(root: Path) -> int | None:
    pointer = root / "results" / "runs" / RUN_ID / "resume" / "latest.json"
    try:
        return json.loads(pointer.read_text())["step"]
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced right now
        return None


def recorded_steps(db: Path, eval_key_like: str = "%") -> list[int]:
    return [step for run_id, step, _, _ in evaluations(db, eval_key_like) if run_id == RUN_ID]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    build_inputs(root)
    results = root / "results"
    checkpoints, db = results / "checkpoints", results / "results.duckdb"
    run_dir = checkpoints / RUN_ID
    seen: dict = {"root": root, "db": db, "run_dir": run_dir}

    # 1. junk in the checkpoints root, there before either daemon starts
    (checkpoints / "stray").mkdir(parents=True)
    (checkpoints / "stray" / "notes.txt").write_text("not a run")
    (checkpoints / "garbage").mkdir()
    (checkpoints / "garbage" / "manifest.json").write_text("{not json")
    (checkpoints / "wrong_shape").mkdir()
    (checkpoints / "wrong_shape" / "manifest.json").write_text(json.dumps({"checkpoints": "none"}))
    (checkpoints / "loose_file.json").write_text("{}")

    reader = ReaderLoop(db).start()
    procs: list[Proc] = []
    try:
        # 2. T1 with a publish that hangs from step 8; E1 pausing before it records anything
        t1 = Proc("train_daemon", train_args(root), root, "train-1",
                  MATHSFT_TEST_PUBLISH_DELAY_S="600", MATHSFT_TEST_PUBLISH_DELAY_FROM_STEP="8")
        e1 = Proc("eval_daemon", eval_args(root), root, "eval-1", MATHSFT_TEST_EVAL_DELAY_S="600")
        procs += [t1, e1]
        e1.wait_for_log("test hook")  # step 0 generated and graded, nothing written yet
        e1.kill()
        seen["after_eval_kill"] = evaluations(db)
        seen["eval_files_after_eval_kill"] = sorted(p.name for p in results.glob("eval_logs/eval_step_*"))

        # 3. E2 evaluates what is published; T1 gets killed inside the step-8 publish
        e2 = Proc("eval_daemon", eval_args(root), root, "eval-2")
        procs.append(e2)
        e2.wait_for(lambda: recorded_steps(db) == [0, 4], "steps 0 and 4 recorded")
        t1.wait_for(lambda: list(run_dir.glob(".tmp-step_000008-*")) and resume_step(root) == 8,
                    "the step-8 publish in flight with resume state at step 8")
        t1.kill()
        seen["temp_dirs_at_kill"] = sorted(p.name for p in run_dir.glob(".tmp-*"))
        seen["manifest_after_trainer_kill"] = read_manifest(run_dir).steps()
        seen["step_dirs_after_trainer_kill"] = sorted(p.name for p in run_dir.glob("step_*"))
        time.sleep(5)  # two reconcile scans of E2 with the half-written step 8 on disk
        seen["recorded_while_trainer_dead"] = evaluations(db)

        # 4. T2 resumes and finishes; E2 records the rest, then stops on SIGTERM
        t2 = Proc("train_daemon", train_args(root), root, "train-2")
        procs.append(t2)
        seen["t2_code"] = t2.wait(300)
        seen["t2_log"] = t2.log()
        e2.wait_for(lambda: recorded_steps(db) == STEPS, f"steps {STEPS} recorded")
        e2.process.send_signal(signal.SIGTERM)
        seen["e2_code"] = e2.wait(60)
        seen["e2_log"] = e2.log()
        seen["final"] = evaluations(db)
        seen["manifest_final"] = read_manifest(run_dir).steps()
        seen["markers_e2"] = sorted(p.name for p in run_dir.rglob("*.done"))

        # 5. E3, started after training finished, with an eval configuration of its own (a new eval key)
        late = "%-m20-%"
        e3 = Proc("eval_daemon", eval_args(root, max_tokens=20), root, "eval-3")
        procs.append(e3)
        e3.wait_for(lambda: recorded_steps(db, late) == STEPS, f"steps {STEPS} recorded under the new eval key")
        e3.process.send_signal(signal.SIGTERM)
        seen["e3_code"] = e3.wait(60)
        seen["late"] = evaluations(db, late)
    finally:
        seen["reads"] = reader.stop()
        for proc in procs:
            if proc.alive():
                proc.kill()
    return seen


def test_every_published_checkpoint_ends_up_in_the_store_exactly_once(scenario):
    assert scenario["manifest_final"] == STEPS
    assert scenario["final"] == [(RUN_ID, step, "ok", TEST_INPUTS.test_problems) for step in STEPS]
    # Every evaluation left its marker for the trainer's retention.
    assert len(scenario["markers_e2"]) == len(STEPS), scenario["markers_e2"]
    # ... and E3's evaluations under their own eval key, one more marker per step.
    markers = sorted(p.name for p in scenario["run_dir"].rglob("*.done"))
    assert len(markers) == 2 * len(STEPS), markers


def test_kill_9_of_the_trainer_mid_publish_leaves_nothing_partial_and_training_resumes(scenario):
    # The step-8 checkpoint was written into a temporary directory when the trainer died ...
    assert len(scenario["temp_dirs_at_kill"]) == 1 and scenario["temp_dirs_at_kill"][0].startswith(".tmp-step_000008-")
    # ... and nobody could see it: not in the manifest, not under its final name, not evaluated.
    assert scenario["manifest_after_trainer_kill"] == [0, 4]
    assert scenario["step_dirs_after_trainer_kill"] == ["step_000000", "step_000004"]
    assert scenario["recorded_while_trainer_dead"] == [(RUN_ID, 0, "ok", TEST_INPUTS.test_problems),
                                                       (RUN_ID, 4, "ok", TEST_INPUTS.test_problems)]
    assert ".tmp-" not in scenario["e2_log"]
    # The restarted trainer resumed from the last resumable step, republished 8 and finished.
    assert scenario["t2_code"] == 0, scenario["t2_log"][-3000:]
    assert "resuming from step 8" in scenario["t2_log"]
    log_steps = [json.loads(line)["train_step"] for line in
                 (scenario["root"] / "results" / "runs" / RUN_ID / "train_log.jsonl").read_text().splitlines()]
    assert log_steps == list(range(1, MAX_STEPS + 1))  # every step once: the loss curve is continuous
    assert not list(scenario["run_dir"].glob(".tmp-*"))  # the crash leftover was cleaned up


def test_kill_9_of_the_eval_daemon_mid_evaluation_loses_and_duplicates_nothing(scenario):
    assert scenario["after_eval_kill"] == []  # the killed evaluation wrote no row ...
    assert scenario["eval_files_after_eval_kill"] == []  # ... and no file
    # ... and was done again by the restarted daemon, once (no duplicates, none missing).
    assert [step for _, step, _, _ in scenario["final"]] == STEPS
    assert scenario["e2_code"] == 0


def test_a_reader_looping_on_bin_query_never_fails_and_never_sees_half_an_evaluation(scenario):
    reads = scenario["reads"]
    assert len(reads) >= 20, f"only {len(reads)} reads"
    failures = [r for r in reads if r["code"] != 0]
    assert not failures, failures[:3]
    counts = [r["row"]["evaluations"] for r in reads]
    # only ever grows, up to the whole run twice: E2's evaluations, then E3's under an eval key of its own
    assert counts == sorted(counts) and counts[-1] == 2 * len(STEPS)
    for read in reads:
        row = read["row"]
        assert row["distinct_keys"] == row["evaluations"]  # never a duplicate
        assert row["samples"] == row["ok"] * TEST_INPUTS.test_problems  # never half an evaluation


def test_an_eval_daemon_started_after_training_evaluates_the_whole_run(scenario):
    assert scenario["late"] == [(RUN_ID, step, "ok", TEST_INPUTS.test_problems) for step in STEPS]
    assert scenario["e3_code"] == 0


def test_junk_in_the_checkpoints_root_is_warned_about_once_and_the_daemon_keeps_serving(scenario):
    log = scenario["e2_log"]
    assert log.count("ignoring run garbage") == 1
    assert log.count("ignoring run wrong_shape") == 1
    assert log.count("stray: no manifest.json, not a run directory") == 1
    assert "Traceback" not in log
    assert scenario["final"][-1][1] == MAX_STEPS  # it went on serving to the end of the run
