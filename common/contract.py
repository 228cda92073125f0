"""The filesystem contract between the trainer and the eval daemon (the only thing they share).

Everything lives under one results root, `paths.results_dir` (default `results/`); `Layout`
derives every path from it, so the trainer and the eval daemon cannot disagree on where
checkpoints are:

    checkpoints/<run_id>/manifest.json            the list of published checkpoints; the only source of truth
    checkpoints/<run_id>/step_000050/             a complete Hugging Face model directory + checkpoint.json
    checkpoints/<run_id>/.tmp-step_000050-<pid>/  a checkpoint being written (dot-prefixed: never a checkpoint)
    checkpoints/<run_id>/evaluated/step_000050.<eval_key>.done
                                                  written by the eval daemon when it has finished with a step;
                                                  retention deletes only steps that have at least one marker
    leases/<run_id>/step_000050.<eval_key>.g000001.lease
                                                  an eval worker is evaluating this step for this eval key
                                                  (between eval workers only; the trainer never reads it)
    runs/<run_id>/                                private to the trainer (logs, resume state, config)
    eval_logs/, analysis/, results.duckdb         private to the eval daemon (and the tools that read them)

The documents of the contract are typed here and written and read only through this module:
`Manifest` (manifest.json), `Sidecar` (checkpoint.json), `Marker` (evaluated/*.done) and, between
the eval workers of a fleet, `Lease` (leases/*.lease).

Rules:
- Publish = write into a temporary directory beside the final one (same filesystem), fsync every
  file and the directory, rename into place, fsync the parent, then rewrite manifest.json by temp
  file + fsync + os.replace. A step directory that is not listed in the manifest does not exist
  for anyone (it may be left over from a crash between the rename and the manifest update).
- Readers trigger on manifest.json being replaced (a move event), never on step directories, and
  discover checkpoints with `scan_published` (the one implementation).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.durable import TEMP_PREFIX, atomic_write_json, create_exclusive, fsync_dir, fsync_tree

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SIDECAR_NAME = "checkpoint.json"
MARKER_DIR = "evaluated"
MANIFEST_SCHEMA_VERSION = 1
STORE_NAME = "results.duckdb"
LEASE_DIR = "leases"


@dataclass(frozen=True)
class Layout:
    """Every path under the results root (`paths.results_dir`); nothing else builds these paths."""

    root: Path

    @classmethod
    def of(cls, config) -> Layout:
        return cls(Path(config.paths.results_dir))

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def run_checkpoints(self, run_id: str) -> Path:
        return self.checkpoints / run_id

    @property
    def runs(self) -> Path:
        """Private to the trainer."""
        return self.root / "runs"

    def run_state(self, run_id: str) -> Path:
        return self.runs / run_id

    def train_log(self, run_id: str) -> Path:
        """The trainer's metrics, one JSON line per logged step (read by bin/demo)."""
        return self.run_state(run_id) / "train_log.jsonl"

    def resume_state(self, run_id: str) -> Path:
        return self.run_state(run_id) / "resume"

    @property
    def eval_logs(self) -> Path:
        return self.root / "eval_logs"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def store(self) -> Path:
        return self.root / STORE_NAME

    @property
    def leases(self) -> Path:
        """Private to the eval workers: who is evaluating what (see Lease)."""
        return self.root / LEASE_DIR


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
    sidecar: Sidecar,
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
        write_sidecar(tmp, sidecar)
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


@dataclass
class Marker:
    """evaluated/step_N.<eval_key>.done: an eval daemon has finished with this checkpoint."""

    step: int
    eval_key: str
    status: str  # ok | failed
    worker_id: str = ""
    finished_at: str = ""


def marker_path(run_dir: Path, step: int, eval_key: str) -> Path:
    return Path(run_dir) / MARKER_DIR / f"{step_dir_name(step)}.{eval_key}.done"


def mark_evaluated(run_dir: Path, marker: Marker) -> None:
    """Eval side: record that it has finished with this checkpoint (retention may delete it)."""
    path = marker_path(run_dir, marker.step, marker.eval_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    marker.finished_at = marker.finished_at or now_iso()
    atomic_write_json(path, asdict(marker))


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


# ---- eval leases (between the eval workers of a fleet) ----------------------------------------------


@dataclass
class Lease:
    """leases/<run_id>/step_N.<eval_key>.g<generation>.lease: eval worker `worker_id` is evaluating
    this checkpoint for this eval key and renews the lease (heartbeat) until it is done; once
    `expires_at` (unix seconds) has passed, any other worker may take over.

    Takeover is atomic through generations: generation g+1 is a new file, created exclusively, so of
    several workers taking over one expired lease exactly one wins, and a late renewal by the old
    holder rewrites only its own generation's file, never the taker's. Expiry compares wall clocks:
    workers on several hosts need synchronised clocks (NTP) and a lease_s well above their skew.
    The lease only spares duplicate work: the store's transaction is what keeps a record unique."""

    run_id: str
    step: int
    eval_key: str
    worker_id: str
    generation: int = 1
    lease_s: float = 60.0
    claimed_at: str = ""
    expires_at: float = 0.0
    released: bool = False

    def live(self, now: float) -> bool:
        return not self.released and now < self.expires_at


_LEASE_NAME = re.compile(r"^step_(\d+)\.(.+)\.g(\d+)\.lease$")


def lease_path(leases_root: Path, run_id: str, step: int, eval_key: str, generation: int) -> Path:
    return Path(leases_root) / run_id / f"{step_dir_name(step)}.{eval_key}.g{generation:06d}.lease"


def _lease_files(leases_root: Path, run_id: str) -> dict[tuple[int, str], list[tuple[int, Path]]]:
    """(step, eval_key) -> [(generation, path)] ascending, for one run's lease directory."""
    folder = Path(leases_root) / run_id
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return {}
    found: dict[tuple[int, str], list[tuple[int, Path]]] = {}
    for name in names:
        match = _LEASE_NAME.match(name)
        if match:  # anything else (a temporary being written) is not a lease
            found.setdefault((int(match[1]), match[2]), []).append((int(match[3]), folder / name))
    return {key: sorted(files) for key, files in found.items()}


def _read_lease(path: Path, generation: int) -> Lease | None:
    """The lease in `path`; an unreadable file counts as an expired lease of that generation (it
    can then be taken over), a vanished one (removed after its record was committed) as None."""
    try:
        data = json.loads(path.read_text())
        return Lease(**{**data, "generation": generation})
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        logger.warning("unreadable lease %s (%s); treated as expired", path, exc)
        return Lease(run_id="", step=-1, eval_key="", worker_id="", generation=generation)


def current_lease(leases_root: Path, run_id: str, step: int, eval_key: str) -> Lease | None:
    """The newest generation's lease of this checkpoint and eval key, or None."""
    files = _lease_files(leases_root, run_id).get((step, eval_key), [])
    for generation, path in reversed(files):
        lease = _read_lease(path, generation)
        if lease is not None:
            return lease
    return None


def live_leases(leases_root: Path, now: float | None = None) -> dict[tuple[str, int, str], Lease]:
    """(run_id, step, eval_key) -> the live lease, over every run: what the fleet is evaluating now."""
    now = time.time() if now is None else now
    root = Path(leases_root)
    held = {}
    runs = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    for run_id in runs:
        for (step, key), files in _lease_files(root, run_id).items():
            lease = _read_lease(files[-1][1], files[-1][0])
            if lease is not None and lease.live(now):
                held[(run_id, step, key)] = lease
    return held


def claim_lease(leases_root: Path, run_id: str, step: int, eval_key: str, worker_id: str, lease_s: float,
                now: float | None = None) -> Lease | None:
    """Claim the checkpoint for this worker: the new lease, or None when another worker holds a live
    lease or won the race for this generation."""
    now = time.time() if now is None else now
    current = current_lease(leases_root, run_id, step, eval_key)
    if current is not None and current.live(now):
        return None
    lease = Lease(run_id=run_id, step=step, eval_key=eval_key, worker_id=worker_id,
                  generation=current.generation + 1 if current else 1, lease_s=lease_s, claimed_at=now_iso(),
                  expires_at=now + lease_s)
    path = lease_path(leases_root, run_id, step, eval_key, lease.generation)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = create_exclusive(path, lambda handle: handle.write(json.dumps(asdict(lease), indent=2, sort_keys=True)))
    return lease if created else None


def _holds(leases_root: Path, lease: Lease) -> bool:
    files = _lease_files(leases_root, lease.run_id).get((lease.step, lease.eval_key), [])
    return bool(files) and files[-1][0] == lease.generation


def renew_lease(leases_root: Path, lease: Lease, now: float | None = None) -> bool:
    """Extend the holder's lease by lease_s; False when it is no longer the newest generation
    (taken over after it expired, or removed because the checkpoint is recorded)."""
    if not _holds(leases_root, lease):
        return False
    lease.expires_at = (time.time() if now is None else now) + lease.lease_s
    atomic_write_json(lease_path(leases_root, lease.run_id, lease.step, lease.eval_key, lease.generation), asdict(lease))
    return True


def release_lease(leases_root: Path, lease: Lease) -> None:
    """Give a lease up before it expires (an abandoned evaluation), so another worker claims it at once."""
    if _holds(leases_root, lease):
        lease.released = True
        atomic_write_json(lease_path(leases_root, lease.run_id, lease.step, lease.eval_key, lease.generation),
                          asdict(lease))


def remove_leases(leases_root: Path, run_id: str, step: int, eval_key: str) -> None:
    """Delete every generation once the checkpoint is recorded (the store is then the truth). Oldest
    first, so that a worker listing meanwhile still sees the newest generation, live."""
    for _generation, path in _lease_files(leases_root, run_id).get((step, eval_key), []):
        path.unlink(missing_ok=True)


# ---- the checkpoint sidecar ----------------------------------------------------------------------


@dataclass
class Sidecar:
    """checkpoint.json: what the eval daemon and the analysis need to know about a checkpoint.

    On disk the metrics (train_loss, epoch, tokens_seen, ...) sit at the top level beside the
    named fields, as earlier versions wrote them, so old checkpoints stay readable."""

    run_id: str
    step: int
    run_name: str = ""
    wandb_group: str = ""
    base_model: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the trainer's fully resolved config

    def to_json(self) -> dict[str, Any]:
        named = {k: v for k, v in asdict(self).items() if k != "metrics"}
        return {**self.metrics, **named}


def write_sidecar(step_dir: Path, sidecar: Sidecar) -> None:
    atomic_write_json(Path(step_dir) / SIDECAR_NAME, sidecar.to_json())


def read_sidecar(step_dir: Path) -> Sidecar:
    path = Path(step_dir) / SIDECAR_NAME
    try:
        data = json.loads(path.read_text())
        named = {name: data.pop(name) for name in ("run_name", "wandb_group", "base_model", "config") if name in data}
        return Sidecar(run_id=str(data.pop("run_id")), step=int(data.pop("step")), metrics=data, **named)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable checkpoint sidecar ({exc})") from exc
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: checkpoint sidecar does not follow the schema ({exc!r})") from exc


# ---- discovery (eval side) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    step: int
    path: Path  # the step directory (a complete Hugging Face model directory)
    run_dir: Path | None  # None for a model given with --checkpoint that is not part of a run
    published_at: str = ""
    metrics: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class WarnOnce:
    """Logs each distinct warning once, so a bad file seen on every rescan is not a flood."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, message: str) -> None:
        if message not in self._seen:
            self._seen.add(message)
            logger.warning("%s", message)


def scan_published(checkpoints_root: Path, warn: WarnOnce) -> list[Checkpoint]:
    """Every checkpoint listed in a readable manifest under the root; bad entries are warned about once."""
    root = Path(checkpoints_root)
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue  # dot-prefixed names are temporaries by contract; plain files are not runs
        if not (child / MANIFEST_NAME).exists():
            if any(not entry.name.startswith(TEMP_PREFIX) for entry in child.iterdir()):
                warn(f"ignoring {child}: no {MANIFEST_NAME}, not a run directory")
            # else: a run whose first checkpoint is still being written (only temporaries): not an error
            continue
        found.extend(_run_checkpoints(child, warn))
    return found


def _run_checkpoints(run_dir: Path, warn: WarnOnce) -> list[Checkpoint]:
    try:
        manifest = read_manifest(run_dir)
    except ManifestError as exc:
        # The daemon keeps serving the other runs; a later valid rewrite is picked up on its event.
        warn(f"ignoring run {run_dir.name}: {exc}")
        return []
    checkpoints = []
    for entry in manifest.checkpoints:
        path = run_dir / entry.path
        if entry.path.startswith(TEMP_PREFIX) or not path.is_dir():
            warn(f"ignoring step {entry.step} of run {manifest.run_id}: {path} is listed in the manifest but missing")
            continue
        checkpoints.append(Checkpoint(run_id=manifest.run_id, step=entry.step, path=path, run_dir=run_dir,
                                      published_at=entry.published_at, metrics=entry.metrics))
    return checkpoints


def checkpoint_from_argument(model: str) -> Checkpoint:
    """The Checkpoint for `--checkpoint PATH_OR_HUB_ID`.

    A published step directory keeps its run id and step (from its checkpoint.json sidecar; the
    marker is written when its run directory has a manifest). Any other model directory or hub id
    (e.g. the base model) is recorded as run_id = its directory name or hub id, step 0.
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        return Checkpoint(run_id=model, step=0, path=Path(model), run_dir=None)
    try:
        sidecar = read_sidecar(path)
    except ManifestError:  # not a published checkpoint: an external model
        return Checkpoint(run_id=path.resolve().name, step=0, path=path, run_dir=None)
    run_dir = path.parent if (path.parent / MANIFEST_NAME).exists() else None
    return Checkpoint(run_id=sidecar.run_id, step=sidecar.step, path=path, run_dir=run_dir)
