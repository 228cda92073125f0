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
import stat
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
MAX_STEP = 2**63 - 1  # the store keeps steps as BIGINT
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # safe in paths, log lines and SQL output
# Contract documents (manifest, sidecar, marker) are small; a bigger one is not ours.
MAX_DOCUMENT_BYTES = 64 * 2**20


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
    rejected: list[str] = field(default_factory=list)  # why entries were left out on reading (never written)

    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def now_iso() -> str:
    """UTC time with milliseconds, e.g. 2026-11-26T05:02:14.123Z."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# ---- reading without blocking ---------------------------------------------------------------------


class NotRegularFileError(OSError):
    """A path that is a FIFO, socket or device (reading it could block forever), or too big."""


def read_regular_file(path: Path, max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The bytes of a regular file, never blocking: opened non-blocking and checked with fstat
    before the first read, so a FIFO or device planted under a contract name cannot hang a daemon."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(f"{path} is not a regular file ({file_kind(info.st_mode)})")
        if info.st_size > max_bytes:
            raise NotRegularFileError(f"{path} holds {info.st_size} bytes, more than the {max_bytes} expected")
        chunks, left = [], info.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 2**20))
            if not chunk:
                break  # shrank while being read: what there is, the JSON parse decides
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _read_json_document(path: Path) -> Any:
    return json.loads(read_regular_file(path).decode())


# ---- manifest ------------------------------------------------------------------------------------


def read_manifest(run_dir: Path) -> Manifest:
    """Parse `<run_dir>/manifest.json`; raise ManifestError with a one-line reason when the file is
    invalid. Invalid entries (step out of range, wrong path) are left out and named in
    `manifest.rejected`, so one bad entry does not hide the good ones."""
    path = Path(run_dir) / MANIFEST_NAME
    try:
        data = _read_json_document(path)
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: no manifest; the run has published nothing yet") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc}); the trainer rewrites it on its next publish") from exc
    try:
        if data.get("schema_version") != MANIFEST_SCHEMA_VERSION:
            raise ManifestError(f"{path}: schema_version {data.get('schema_version')!r} is not {MANIFEST_SCHEMA_VERSION}")
        run_id = data["run_id"]
        if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
            raise ManifestError(f"{path}: run_id {str(run_id)[:80]!r} may hold only letters, digits, '-', '_' "
                                f"and '.'; rename the run")
        manifest = Manifest(run_id=run_id, updated_at=str(data.get("updated_at", "")))
        if not isinstance(data["checkpoints"], list):
            raise TypeError(f"checkpoints is a {type(data['checkpoints']).__name__}, not a list")
        for raw in data["checkpoints"]:
            entry, problem = _manifest_entry(raw)
            if entry is not None:
                manifest.checkpoints.append(entry)
            else:
                manifest.rejected.append(f"{path}: {problem}")
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"{path}: manifest does not follow the schema ({exc!r}); see README 'filesystem contract'") from exc
    return manifest


def _manifest_entry(raw: Any) -> tuple[CheckpointEntry | None, str]:
    """One manifest entry, or None and why it is rejected."""
    try:
        step, rel = raw["step"], raw["path"]
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
            return None, f"entry with step {str(step)[:40]!r}: a step is an integer from 0 to {MAX_STEP}"
        if rel != step_dir_name(step):
            return None, f"entry for step {step} points at {str(rel)[:80]!r}, expected {step_dir_name(step)!r}"
        return CheckpointEntry(step=step, path=rel, published_at=str(raw["published_at"]),
                               metrics=dict(raw.get("metrics") or {})), ""
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # an entry of the wrong shape
        return None, f"entry {str(raw)[:80]!r} does not follow the schema ({exc!r})"


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
    """The trainer's view: the existing manifest; an empty one when none exists; when it exists but
    is unreadable, one rebuilt from the complete, verified step directories on disk (written at
    once, with one WARNING), so that no published checkpoint is dropped."""
    try:
        return read_manifest(run_dir)
    except ManifestError as exc:
        if not os.path.lexists(Path(run_dir) / MANIFEST_NAME):
            return Manifest(run_id=run_id)
        manifest = rebuild_manifest(run_dir, run_id)
        os.unlink(Path(run_dir) / MANIFEST_NAME)  # may be a FIFO or a directory-free junk file: replace it
        write_manifest(run_dir, manifest)
        logger.warning("%s; rebuilt it from the step directories on disk: steps %s", exc, manifest.steps() or "none")
        return manifest


def rebuild_manifest(run_dir: Path, run_id: str) -> Manifest:
    """A manifest listing every complete, verified step directory of the run (see verify_step_dir)."""
    manifest = Manifest(run_id=run_id)
    for path in sorted(Path(run_dir).glob("step_*")):
        sidecar = verify_step_dir(path, run_id)
        if sidecar is not None:
            published = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(path.lstat().st_mtime))
            manifest.checkpoints.append(CheckpointEntry(step=sidecar.step, path=path.name, published_at=published,
                                                        metrics=dict(sidecar.metrics)))
    return manifest


def verify_step_dir(path: Path, run_id: str) -> Sidecar | None:
    """The sidecar of a complete step directory of run_id (a real directory named after its step,
    its sidecar naming this run and step, config.json, safetensors weights whose headers match
    their sizes); None for anything else."""
    from safetensors import SafetensorError, safe_open

    if path.is_symlink() or not path.is_dir():
        return None
    try:
        sidecar = read_sidecar(path)
        read_regular_file(path / "config.json")
        weights = sorted(path.glob("*.safetensors"))
        for file in weights:
            if not stat.S_ISREG(os.stat(file).st_mode):  # safe_open would block on a FIFO
                return None
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
    except (ManifestError, OSError, SafetensorError):  # incomplete or not ours: not listed
        return None
    if not weights or sidecar.run_id != run_id or path.name != step_dir_name(sidecar.step):
        return None
    return sidecar


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


def is_evaluated(run_dir: Path, step: int, ok_only: bool = False) -> bool:
    """True when any eval daemon has written its marker for this step (with ok_only: a marker of a
    successful evaluation; a failed one, or a marker that cannot be read, does not count)."""
    markers = (Path(run_dir) / MARKER_DIR).glob(f"{step_dir_name(step)}.*.done")
    return any(not ok_only or _marker_status(path) == "ok" for path in markers)


def _marker_status(path: Path) -> str | None:
    try:
        return str(_read_json_document(path).get("status"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):  # torn or foreign: not ok
        return None


def apply_retention(run_dir: Path, keep_last: int) -> list[int]:
    """Trainer side: delete published checkpoints beyond the newest `keep_last`, but only those
    that an eval daemon has evaluated successfully (a failed evaluation keeps the checkpoint, so that
    it can be evaluated again). Returns the deleted steps. 0 keeps everything.

    The manifest is rewritten first (the step stops existing), then the directory is removed.
    """
    if keep_last <= 0:
        return []
    manifest = read_manifest(run_dir)
    ordered = sorted(manifest.checkpoints, key=lambda c: c.step)
    candidates = ordered[:-keep_last] if len(ordered) > keep_last else []
    doomed = [c for c in candidates if is_evaluated(run_dir, c.step, ok_only=True)]
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
        data = _read_json_document(path)
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
        name = run_dir.name if RUN_ID_PATTERN.fullmatch(run_dir.name) else repr(run_dir.name)  # no forged lines
        warn(f"ignoring run {name}: {exc}")
        return []
    for problem in manifest.rejected:
        warn(f"ignoring a manifest entry of run {manifest.run_id}: {problem}")
    checkpoints = []
    for entry in manifest.checkpoints:
        path = run_dir / entry.path
        if entry.path.startswith(TEMP_PREFIX) or not path.is_dir():
            warn(f"ignoring step {entry.step} of run {manifest.run_id}: {path} is listed in the manifest but missing")
            continue
        escape = _escapes_run_dir(path, run_dir)
        if escape:
            warn(f"ignoring step {entry.step} of run {manifest.run_id}: {escape} leads out of the run directory "
                 f"{run_dir}; a checkpoint holds its own files")
            continue
        checkpoints.append(Checkpoint(run_id=manifest.run_id, step=entry.step, path=path, run_dir=run_dir,
                                      published_at=entry.published_at, metrics=entry.metrics))
    return checkpoints


def _escapes_run_dir(step_dir: Path, run_dir: Path) -> Path | None:
    """The first path of a step directory (itself or a file in it) that resolves outside run_dir."""
    root = run_dir.resolve()
    for path in (step_dir, *sorted(step_dir.iterdir())):
        if not path.resolve().is_relative_to(root):
            return path
    return None


def checkpoint_from_argument(model: str, run_id: str = "") -> Checkpoint:
    """The Checkpoint for `--checkpoint PATH_OR_HUB_ID [--run-id NAME]`.

    A published step directory keeps its run id and step (from its checkpoint.json sidecar; the
    marker is written when its run directory has a manifest). Any other model is recorded at step 0
    under `run_id` when given, else under an id that names that model alone: its resolved directory
    for a local model (two `model/` folders never share it), its hub id for a hub model.
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        return Checkpoint(run_id=run_id or model, step=0, path=Path(model), run_dir=None)
    try:
        sidecar = read_sidecar(path)
    except ManifestError:  # not a published checkpoint: an external model
        return Checkpoint(run_id=run_id or str(path.resolve()), step=0, path=path, run_dir=None)
    run_dir = path.parent if (path.parent / MANIFEST_NAME).exists() else None
    return Checkpoint(run_id=run_id or sidecar.run_id, step=sidecar.step, path=path, run_dir=run_dir)
