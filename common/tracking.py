"""Metrics to a local JSONL file and to Weights & Biases (both daemons).

    tracker = start_tracking(config, run_name="math-sft-dual-gpu-...", job_type="train",
                             local_jsonl=Path("results/runs/<run_id>/train_log.jsonl"))
    tracker.log({"train/loss": 0.71}, step=12)
    tracker.finish()

Every record carries "train_step": the training step the metrics belong to (W&B plots use it as
the x axis, so the eval run can log checkpoints out of order). W&B mode: off when logging.wandb is
false; WANDB_MODE when set; online when wandb itself finds credentials for the host it is
configured for (WANDB_API_KEY, an identity token, `wandb login`'s netrc entry, WANDB_BASE_URL /
`wandb login --host`); otherwise offline (upload later with `wandb sync`). Runs are grouped by
logging.wandb_group (the trainer fills in its run id), so the train and eval runs of one training
run sit together.

W&B never holds the caller: it starts in a background thread (importing wandb alone takes ~1.5 s,
an online start without a network ~20 s before it gives up), records logged meanwhile are kept and
sent once the run is up. An online start that fails falls back to an offline run, said once.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common.config import Config, to_dict
from common.contract import now_iso

logger = logging.getLogger(__name__)

STEP_KEY = "train_step"
# wandb.init's own limit for reaching the server; it runs in the background, so this only bounds
# how long finish() may wait for a start that is still trying.
WANDB_INIT_TIMEOUT_S = 20.0


class Tracker:
    def __init__(self, wandb_start: Future | None, local_jsonl: Path | None):
        self._wandb_start = wandb_start  # resolves to a wandb run, or None when W&B did not start
        self._wandb_run = None
        self._pending: list[dict] = []  # records logged while W&B was still starting
        self._file = None
        if local_jsonl is not None:
            Path(local_jsonl).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(local_jsonl, "a")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {STEP_KEY: step, **metrics}
        if self._file is not None:
            self._file.write(json.dumps({**record, "time": now_iso()}) + "\n")
            self._file.flush()
        if self._wandb_start is not None or self._wandb_run is not None:
            self._pending.append(record)
            self._send(wait=False)

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._send(wait=True)
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def _send(self, wait: bool) -> None:
        if self._wandb_start is not None:
            if not (wait or self._wandb_start.done()):
                return  # still starting: keep the records, never wait here
            self._wandb_run = self._wandb_start.result()  # _start_wandb returns None instead of raising
            self._wandb_start = None
        if self._wandb_run is not None:
            for record in self._pending:
                self._wandb_run.log(record)
        self._pending.clear()


def start_tracking(config: Config, run_name: str, job_type: str, local_jsonl: Path | None) -> Tracker:
    """A Tracker writing to local_jsonl (when given) and to W&B (when enabled), started in the background."""
    if wandb_mode_set(config.logging.wandb) == "disabled":
        return Tracker(None, local_jsonl)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wandb-start")
    start = pool.submit(_start_wandb, config, run_name, job_type)
    pool.shutdown(wait=False)  # the one task runs on; the thread ends with it
    return Tracker(start, local_jsonl)


def wandb_mode_set(enabled: bool) -> str | None:
    """disabled | WANDB_MODE's value when one is set; None: credentials decide (wandb_mode)."""
    if not enabled:
        return "disabled"
    return os.environ.get("WANDB_MODE") or None


def wandb_mode(enabled: bool) -> str:
    """disabled | online | offline (see module docstring); imports wandb unless the mode is set."""
    return wandb_mode_set(enabled) or ("online" if wandb_credentials()[0] else "offline")


def wandb_credentials() -> tuple[bool, str]:
    """(whether wandb has credentials, the host it is configured for), asked without a network."""
    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    # wandb's own lookup (env, identity token, netrc, settings) for its configured host; wandb.login()
    # answers the same but prints, writes settings files and asks the server who is logged in.
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
    try:
        auth = wbauth.authenticate_session(host=host, source="mathsft", prompt=False, update_session=False)
    except AuthenticationError as exc:  # a malformed key: wandb.init would refuse it as well
        logger.warning("W&B credentials for %s are not usable (%s)", host.url, exc)
        return False, host.url
    return auth is not None, host.url


def _start_wandb(config: Config, run_name: str, job_type: str):
    """The wandb run, or None (one WARNING says why); runs in the background thread."""
    lg, directory = config.logging, Path(config.paths.results_dir)
    mode = wandb_mode_set(lg.wandb)
    if mode is None:
        has_key, host = wandb_credentials()
        mode = "online" if has_key else "offline"
        if not has_key:
            logger.warning("no W&B credentials for %s (`wandb login` or WANDB_API_KEY): logging offline under "
                           "%s/wandb; upload later with `wandb sync`", host, directory)
    import wandb  # slow to import; only when W&B is on

    directory.mkdir(parents=True, exist_ok=True)
    arguments = dict(project=lg.wandb_project, entity=lg.wandb_entity, group=lg.wandb_group or "math-sft",
                     name=run_name, job_type=job_type, config=to_dict(config), dir=str(directory),
                     settings=wandb.Settings(console="off", init_timeout=WANDB_INIT_TIMEOUT_S))
    try:
        run = wandb.init(mode=mode, **arguments)
    except (wandb.Error, OSError) as exc:  # server unreachable, refused key, ...: metrics still go to the JSONL file
        if mode != "online":
            logger.warning("W&B did not start (%s: %s); continuing with local metrics only", type(exc).__name__, exc)
            return None
        logger.warning("W&B could not start online (%s: %s); logging offline under %s/wandb instead; upload "
                       "later with `wandb sync`", type(exc).__name__, str(exc).splitlines()[0], directory)
        try:
            run = wandb.init(mode="offline", **arguments)
        except (wandb.Error, OSError) as offline_exc:
            logger.warning("W&B did not start offline either (%s); continuing with local metrics only", offline_exc)
            return None
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY)
    return run


def gpu_stats(device: str) -> dict[str, float]:
    """memory_used (GiB, the whole device as nvidia-smi shows it) and utilization (%) of a CUDA
    device; {} on CPU. Without NVML (pynvml) memory falls back to this process's reserved memory."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return {}
    index = torch.device(device).index or 0
    stats = {}
    try:
        stats["memory_used"] = torch.cuda.device_memory_used(index) / 2**30
        stats["utilization"] = float(torch.cuda.utilization(index))
    except (ImportError, RuntimeError):  # pynvml missing or NVML unavailable: report what torch knows
        stats.setdefault("memory_used", torch.cuda.memory_reserved(index) / 2**30)
    return stats
