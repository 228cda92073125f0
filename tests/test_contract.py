"""The filesystem contract (common/contract.py): atomic publish, manifest, markers, retention."""

from __future__ import annotations

import errno
import json
import os

import pytest

from common.contract import (MANIFEST_NAME, SIDECAR_NAME, ManifestError, Marker, Sidecar, apply_retention, is_evaluated,
                             load_or_new_manifest, mark_evaluated, publish_checkpoint, read_manifest, read_sidecar,
                             remove_stale_temp_dirs, step_dir_name, unpublished_step_dirs, write_sidecar)
from common.durable import atomic_write_json


def _writer(content: str = "weights"):
    def write_model(directory):
        (directory / "model.safetensors").write_text(content)
        (directory / "config.json").write_text("{}")
    return write_model


def _publish(run_dir, step, content="weights", metrics=None):
    return publish_checkpoint(run_dir, "run1", step, _writer(content), Sidecar(run_id="run1", step=step), metrics or {"train_loss": 1.0})


def test_publish_writes_a_complete_directory_and_lists_it(tmp_path):
    final = _publish(tmp_path, 50, metrics={"train_loss": 0.5, "learning_rate": 1e-5, "tokens_seen": 10, "epoch": 0.5})
    assert final == tmp_path / "step_000050"
    assert sorted(p.name for p in final.iterdir()) == [SIDECAR_NAME, "config.json", "model.safetensors"]
    manifest = read_manifest(tmp_path)
    assert manifest.run_id == "run1" and manifest.steps() == [50]
    assert manifest.checkpoints[0].metrics["learning_rate"] == 1e-5
    assert read_sidecar(final) == Sidecar(run_id="run1", step=50)


def test_sidecar_round_trips_and_reads_the_flat_layout_of_older_checkpoints(tmp_path):
    sidecar = Sidecar(run_id="r", step=7, wandb_group="g", metrics={"train_loss": 0.25, "epoch": 0.1},
                      config={"training": {"seed": 1}})
    write_sidecar(tmp_path, sidecar)
    assert read_sidecar(tmp_path) == sidecar
    # What earlier trainers wrote: the metrics at the top level beside the named fields.
    (tmp_path / SIDECAR_NAME).write_text(json.dumps({"run_id": "old", "step": 3, "train_loss": 1.5, "wandb_group": "w"}))
    old = read_sidecar(tmp_path)
    assert (old.run_id, old.step, old.wandb_group, old.metrics) == ("old", 3, "w", {"train_loss": 1.5})
    (tmp_path / SIDECAR_NAME).write_text(json.dumps({"step": 3}))
    with pytest.raises(ManifestError):
        read_sidecar(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_republishing_a_step_replaces_it_and_keeps_the_manifest_sorted(tmp_path):
    _publish(tmp_path, 100)
    _publish(tmp_path, 50, content="old")
    _publish(tmp_path, 50, content="new")
    assert read_manifest(tmp_path).steps() == [50, 100]
    assert (tmp_path / "step_000050" / "model.safetensors").read_text() == "new"


def test_a_failed_write_leaves_no_trace_and_keeps_published_checkpoints(tmp_path):
    _publish(tmp_path, 0)
    before = (tmp_path / MANIFEST_NAME).read_text()

    def disk_full(directory):
        (directory / "model.safetensors").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        publish_checkpoint(tmp_path, "run1", 50, disk_full, Sidecar(run_id="run1", step=50), {})
    assert (tmp_path / MANIFEST_NAME).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, "step_000000"]


def test_an_unlisted_step_directory_is_a_crash_leftover_and_is_replaced(tmp_path):
    _publish(tmp_path, 0)
    leftover = tmp_path / step_dir_name(50)  # a crash between the rename and the manifest update
    leftover.mkdir()
    (leftover / "model.safetensors").write_text("stale")
    assert unpublished_step_dirs(tmp_path) == [leftover]
    _publish(tmp_path, 50, content="fresh")
    assert (leftover / "model.safetensors").read_text() == "fresh" and unpublished_step_dirs(tmp_path) == []


def test_stale_temp_dirs_are_removed(tmp_path):
    _publish(tmp_path, 0)
    (tmp_path / ".tmp-step_000050-123").mkdir()
    (tmp_path / ".tmp-manifest.json-123").write_text("{")
    removed = remove_stale_temp_dirs(tmp_path)
    assert len(removed) == 2 and sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, "step_000000"]


@pytest.mark.parametrize("content, reason", [
    ("{not json", "unreadable manifest"),
    (json.dumps({"schema_version": 99, "run_id": "r", "checkpoints": []}), "schema_version"),
    (json.dumps({"schema_version": 1, "run_id": "r", "checkpoints": [{"step": 1}]}), "does not follow the schema"),
    (json.dumps({"schema_version": 1, "run_id": "r", "checkpoints": [
        {"step": 1, "path": "../etc", "published_at": "t"}]}), "expected 'step_000001'"),
])
def test_bad_manifests_raise_one_line_errors(tmp_path, content, reason):
    (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(ManifestError, match=reason) as info:
        read_manifest(tmp_path)
    assert "\n" not in str(info.value)


def test_the_trainer_starts_a_new_manifest_over_a_corrupt_one(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{torn")
    assert load_or_new_manifest(tmp_path, "run1").checkpoints == []
    _publish(tmp_path, 10)
    assert read_manifest(tmp_path).steps() == [10]


def test_retention_deletes_only_old_evaluated_checkpoints(tmp_path):
    for step in (0, 50, 100, 150):
        _publish(tmp_path, step)
    mark_evaluated(tmp_path, Marker(step=0, eval_key="math-abc", status="ok"))
    mark_evaluated(tmp_path, Marker(step=100, eval_key="math-abc", status="ok"))
    assert is_evaluated(tmp_path, 0) and not is_evaluated(tmp_path, 50)
    deleted = apply_retention(tmp_path, keep_last=2)
    assert deleted == [0]  # 50 is not evaluated yet; 100 and 150 are the newest two
    assert read_manifest(tmp_path).steps() == [50, 100, 150]
    assert not (tmp_path / "step_000000").exists() and (tmp_path / "step_000050").exists()
    assert apply_retention(tmp_path, keep_last=0) == []


def test_atomic_write_json_replaces_whole_files(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["x.json"]


