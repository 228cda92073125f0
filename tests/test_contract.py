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
    (json.dumps({"schema_version": 1, "run_id": "r", "checkpoints": {"step": 1}}), "does not follow the schema"),
    (json.dumps({"schema_version": 1, "run_id": "r\nINFO forged", "checkpoints": []}), "may hold only letters"),
])
def test_bad_manifests_raise_one_line_errors(tmp_path, content, reason):
    (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(ManifestError, match=reason) as info:
        read_manifest(tmp_path)
    assert "\n" not in str(info.value)


def test_bad_manifest_entries_are_left_out_and_the_good_ones_kept(tmp_path):
    """Item 7: a step >= 2^63, a negative or boolean step, a path out of the run directory or of
    the wrong shape is one rejected entry; the entries around it stay."""
    good = {"step": 5, "path": "step_000005", "published_at": "t"}
    bad = [{"step": 2**63, "path": "step_9223372036854775808", "published_at": "t"},
           {"step": -1, "path": "step_-00001", "published_at": "t"}, {"step": True, "path": "x", "published_at": "t"},
           {"step": 1, "path": "../etc", "published_at": "t"}, {"step": 1}, "junk"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema_version": 1, "run_id": "r", "checkpoints": [*bad, good]}))
    manifest = read_manifest(tmp_path)
    assert manifest.steps() == [5]
    assert len(manifest.rejected) == len(bad) and all("\n" not in r for r in manifest.rejected)


def _real_checkpoint(run_dir, step, tiny_model_dir, run_id="run1"):
    import shutil

    path = run_dir / step_dir_name(step)
    shutil.copytree(tiny_model_dir, path)
    write_sidecar(path, Sidecar(run_id=run_id, step=step, metrics={"train_loss": 0.5}))
    return path


def test_a_corrupt_manifest_is_rebuilt_from_the_complete_step_directories(tmp_path, tiny_model_dir, caplog):
    """Item 3: steps complete on disk survive a torn manifest; incomplete or foreign ones do not come back."""
    for step in (0, 50):
        _real_checkpoint(tmp_path, step, tiny_model_dir)
    torn = _real_checkpoint(tmp_path, 100, tiny_model_dir)
    (torn / "model.safetensors").write_bytes((torn / "model.safetensors").read_bytes()[:1000])
    _real_checkpoint(tmp_path, 150, tiny_model_dir, run_id="another_run")
    (tmp_path / "step_000200").mkdir()  # an empty directory
    (tmp_path / MANIFEST_NAME).write_text("{torn")
    with caplog.at_level("WARNING", logger="common.contract"):
        manifest = load_or_new_manifest(tmp_path, "run1")
    assert manifest.steps() == [0, 50]
    assert read_manifest(tmp_path).steps() == [0, 50]  # written at once: the eval daemon sees it now
    assert manifest.checkpoints[1].metrics == {"train_loss": 0.5}
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


@pytest.mark.timeout(30)
def test_a_fifo_under_a_contract_name_is_an_error_not_a_hang(tmp_path):
    """Item 8: reading manifest.json, checkpoint.json or a marker never blocks on a FIFO."""
    os.mkfifo(tmp_path / MANIFEST_NAME)
    with pytest.raises(ManifestError, match="not a regular file"):
        read_manifest(tmp_path)
    (tmp_path / "step_000001").mkdir()
    os.mkfifo(tmp_path / "step_000001" / SIDECAR_NAME)
    with pytest.raises(ManifestError, match="not a regular file"):
        read_sidecar(tmp_path / "step_000001")


def test_retention_deletes_only_old_successfully_evaluated_checkpoints(tmp_path):
    for step in (0, 50, 100, 150, 200):
        _publish(tmp_path, step)
    mark_evaluated(tmp_path, Marker(step=0, eval_key="math-abc", status="ok"))
    mark_evaluated(tmp_path, Marker(step=50, eval_key="math-abc", status="failed"))  # item 6: kept for a retry
    mark_evaluated(tmp_path, Marker(step=150, eval_key="math-abc", status="ok"))
    assert is_evaluated(tmp_path, 0) and not is_evaluated(tmp_path, 100)
    assert is_evaluated(tmp_path, 50) and not is_evaluated(tmp_path, 50, ok_only=True)
    deleted = apply_retention(tmp_path, keep_last=2)
    assert deleted == [0]  # 50 failed, 100 is not evaluated yet; 150 and 200 are the newest two
    assert read_manifest(tmp_path).steps() == [50, 100, 150, 200]
    assert not (tmp_path / "step_000000").exists() and (tmp_path / "step_000050").exists()
    assert apply_retention(tmp_path, keep_last=0) == []


def test_atomic_write_json_replaces_whole_files(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["x.json"]


