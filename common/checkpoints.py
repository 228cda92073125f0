"""The filesystem contract between the trainer and the eval daemon (the only thing they share).

Layout under `<output_dir>/checkpoints/` (default `results/checkpoints/`):

    <run_id>/manifest.json            the list of published checkpoints; the only source of truth
    <run_id>/step_000050/             a complete Hugging Face model directory + checkpoint.json
    <run_id>/.tmp-step_000050-<pid>/  a checkpoint being written (dot-prefixed: never a checkpoint)
    <run_id>/evaluated/step_000050.<eval_key>.done
                                      written by the eval daemon when it has finished with a step;
                                      retention deletes only steps that have at least one marker

Rules:
- Publish = write into a temporary directory beside the final one (same filesystem), fsync every
  file and the directory, rename into place, fsync the parent, then rewrite manifest.json by temp
  file + fsync + os.replace. A step directory that is not listed in the manifest does not exist
  for anyone (it may be left over from a crash between the rename and the manifest update).
- Readers trigger on manifest.json being replaced (a move event), never on step directories.
- Resume state (optimizer, RNG, data position) lives elsewhere (`<output_dir>/runs/<run_id>/`), so
  the eval daemon never sees it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SIDECAR_NAME = "checkpoint.json"
MARKER_DIR = "evaluated"
TEMP_PREFIX = ".tmp-"
MANIFEST_SCHEMA_VERSION = 1


class ManifestError(ValueError):
    """A manifest that cannot be read or does not follow the schema (one-line message)."""


@dataclass
class CheckpointEntry:
    step: int
    path: str  # relative to the run directory, e.g. "step_000050"
    published_at: str  # ISO 8601 UTC
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    run_id: str
    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    updated_at: str = ""

    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def now_iso() -> str:
    """UTC time with milliseconds, e.g. 2026-11-26T05:02:14.123Z."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# ---- durable writes ------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (root included)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON so that readers see either the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---- manifest ------------------------------------------------------------------------------------


def read_manifest(run_dir: Path) -> Manifest:
    """Parse `<run_dir>/manifest.json`; raise ManifestError with a one-line reason when invalid."""
    path = Path(run_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: no manifest; the run has published nothing yet") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc}); the trainer rewrites it on its next publish") from exc
    try:
        if data.get("schema_version") != MANIFEST_SCHEMA_VERSION:
            raise ManifestError(f"{path}: schema_version {data.get('schema_version')!r} is not {MANIFEST_SCHEMA_VERSION}")
        entries = [
            CheckpointEntry(step=int(c["step"]), path=str(c["path"]), published_at=str(c["published_at"]),
                            metrics=dict(c.get("metrics") or {}))
            for c in data["checkpoints"]
        ]
        manifest = Manifest(run_id=str(data["run_id"]), checkpoints=entries, updated_at=str(data.get("updated_at", "")))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"{path}: manifest does not follow the schema ({exc!r}); see README 'filesystem contract'") from exc
    for entry in entries:
        if entry.path != step_dir_name(entry.step):
            raise ManifestError(f"{path}: entry for step {entry.step} points at {entry.path!r}, expected {step_dir_name(entry.step)!r}")
    return manifest


def write_manifest(run_dir: Path, manifest: Manifest) -> None:
    manifest.updated_at = now_iso()
    atomic_write_json(Path(run_dir) / MANIFEST_NAME, {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "run_id": manifest.run_id,
        "updated_at": manifest.updated_at,
        "checkpoints": [
            {"step": c.step, "path": c.path, "published_at": c.published_at, "metrics": c.metrics}
            for c in sorted(manifest.checkpoints, key=lambda c: c.step)
        ],
    })


def load_or_new_manifest(run_dir: Path, run_id: str) -> Manifest:
    """The trainer's view: the existing manifest, or an empty one if none (or unreadable) exists."""
    try:
        return read_manifest(run_dir)
    except ManifestError as exc:
        if (Path(run_dir) / MANIFEST_NAME).exists():
            logger.warning("%s; starting a new manifest (published step directories stay on disk)", exc)
        return Manifest(run_id=run_id)


# ---- publishing (trainer side) -------------------------------------------------------------------


def publish_checkpoint(
    run_dir: Path,
    run_id: str,
    step: int,
    write_model: Callable[[Path], None],
    sidecar: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write a checkpoint atomically and list it in the manifest; returns its final directory.

    `write_model(tmp_dir)` writes the Hugging Face files (config, safetensors, tokenizer,
    generation config). A crash anywhere leaves either no trace under the final name, or a
    complete directory that is not yet in the manifest (which does not exist for anyone and is
    replaced on the next publish of that step).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_model(tmp)
        atomic_write_json(tmp / SIDECAR_NAME, sidecar)
        fsync_tree(tmp)
    except BaseException:
        # A failed write (e.g. disk full) must not leave gigabytes behind until the next start-up.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = load_or_new_manifest(run_dir, run_id)
    if final.exists():
        # Left by a crash between rename and manifest update (not published), or a re-publish
        # of the same step after a resume: move it aside, then delete, so the name is never torn.
        _remove_dir(final)
    os.rename(tmp, final)
    fsync_dir(run_dir)
    manifest.checkpoints = [c for c in manifest.checkpoints if c.step != step]
    manifest.checkpoints.append(CheckpointEntry(step=step, path=final.name, published_at=now_iso(), metrics=metrics))
    write_manifest(run_dir, manifest)
    return final


def _remove_dir(path: Path) -> None:
    doomed = path.with_name(f"{TEMP_PREFIX}deleted-{path.name}-{os.getpid()}")
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temp_dirs(run_dir: Path) -> list[Path]:
    """Delete temporary directories left by a crash (called by the trainer at start-up only)."""
    removed = []
    for child in Path(run_dir).glob(f"{TEMP_PREFIX}*"):
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
        elif child.is_file():
            child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def unpublished_step_dirs(run_dir: Path) -> list[Path]:
    """Step directories on disk that the manifest does not list (crash leftovers)."""
    listed = set()
    try:
        listed = {c.path for c in read_manifest(run_dir).checkpoints}
    except ManifestError:
        pass
    return [p for p in sorted(Path(run_dir).glob("step_*")) if p.is_dir() and p.name not in listed]


# ---- eval markers and retention ------------------------------------------------------------------


def marker_path(run_dir: Path, step: int, eval_key: str) -> Path:
    return Path(run_dir) / MARKER_DIR / f"{step_dir_name(step)}.{eval_key}.done"


def mark_evaluated(run_dir: Path, step: int, eval_key: str, info: dict[str, Any]) -> None:
    """Eval side: record that it has finished with this checkpoint (retention may delete it)."""
    path = marker_path(run_dir, step, eval_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"step": step, "eval_key": eval_key, "finished_at": now_iso(), **info})


def is_evaluated(run_dir: Path, step: int) -> bool:
    """True when any eval daemon has written its marker for this step."""
    return any((Path(run_dir) / MARKER_DIR).glob(f"{step_dir_name(step)}.*.done"))


def apply_retention(run_dir: Path, keep_last: int) -> list[int]:
    """Trainer side: delete published checkpoints beyond the newest `keep_last`, but only those
    that an eval daemon has marked as finished. Returns the deleted steps. 0 keeps everything.

    The manifest is rewritten first (the step stops existing), then the directory is removed.
    """
    if keep_last <= 0:
        return []
    manifest = read_manifest(run_dir)
    ordered = sorted(manifest.checkpoints, key=lambda c: c.step)
    candidates = ordered[:-keep_last] if len(ordered) > keep_last else []
    doomed = [c for c in candidates if is_evaluated(run_dir, c.step)]
    if not doomed:
        return []
    doomed_steps = {c.step for c in doomed}
    manifest.checkpoints = [c for c in ordered if c.step not in doomed_steps]
    write_manifest(run_dir, manifest)
    for entry in doomed:
        path = Path(run_dir) / entry.path
        if path.exists():
            _remove_dir(path)
    return sorted(doomed_steps)


# ---- discovery (eval side) -----------------------------------------------------------------------


def list_run_dirs(checkpoints_root: Path) -> list[Path]:
    """Run directories under the checkpoints root (anything holding a manifest.json)."""
    root = Path(checkpoints_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_NAME).exists())


def read_sidecar(step_dir: Path) -> dict[str, Any]:
    path = Path(step_dir) / SIDECAR_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable checkpoint sidecar ({exc})") from exc
