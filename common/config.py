"""Typed configuration shared by both daemons.

YAML in `config/` is loaded into the dataclasses below; `key=value` overrides on the command line
use dotted paths (`training.learning_rate=1e-5`). Unknown keys, wrong types and bad values raise
ConfigError before anything heavy (torch, weights, GPUs) is touched: one line that names the key,
where it was set (`config/x.yaml:12`, or the override `'training.lr=1'`) and the fix ("did you mean
training.learning_rate?"); YAML syntax errors give the line and column.

Why not OmegaConf (as torchtune; 2.4 tried on this schema): it would replace only `_build` and
`_coerce` (~50 lines). Its errors are multi-line and know neither the YAML line nor which override
set a key (its "did you mean" covers only spellings within a section), and it converts the string
"3" to an int; the one-line messages, the moved keys and `validate` would still be ours.

    bin/train --config config/sft_config.yaml training.max_steps=200
    bin/eval  --config config/sft_config.yaml evaluation.schedule=latest
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from common.data import (FULL_MATH_HUB_IDS, MATH500_HUB_IDS, MATH500_HUB_SOURCE, MATH_HUB_SOURCE, DatasetError,
                         hub_source)

# Exit code for configuration errors, shared by every entry point.
CONFIG_ERROR_EXIT_CODE = 2

# Keys of earlier versions, with what replaced them: an old config gets the fix, not a key list.
_ONE_ROOT = "set paths.results_dir (every results path is derived from it, the same for both daemons)"
MOVED_KEYS = {"training.output_dir": _ONE_ROOT, "evaluation.store_path": _ONE_ROOT,
              "evaluation.checkpoints_dir": _ONE_ROOT, "evaluation.logs_dir": _ONE_ROOT,
              "evaluation.analysis_dir": _ONE_ROOT}


class ConfigError(ValueError):
    """A configuration problem; the message is one line that names the key and the fix."""


@dataclass
class PathsConfig:
    # The results root: checkpoints/ (the contract both daemons share), runs/ (the trainer's),
    # eval_logs/, analysis/ and results.duckdb (the eval daemon's). common/contract.py Layout
    # derives every path from it, so the trainer and the eval daemon always agree.
    results_dir: str = "results"


@dataclass
class ModelConfig:
    # Hugging Face hub id or local directory; safetensors only, never remote code.
    name_or_path: str = "Qwen/Qwen2.5-Math-1.5B"
    # Tokenizer source; empty means the same as name_or_path.
    tokenizer: str = ""
    dtype: str = "bfloat16"  # bfloat16 | float32 (float32 is forced on CPU)
    max_seq_length: int = 2048  # prompt + response tokens; longer examples are dropped with a warning
    # Trainer attention kernel: varlen (PyTorch's own flash-attention varlen kernel on GPU, no [T, T]
    # mask; per-example sdpa on CPU) | sdpa | flash_attention_2 (needs flash-attn) | flex_attention | eager.
    # All of them keep packed examples apart (training.packing); varlen needs packing.
    attn_implementation: str = "varlen"


@dataclass
class DataConfig:
    # Where MATH comes from: a hub dataset `owner/name[:config,...]` (the configs are concatenated),
    # a local directory in the original release layout (`train/<subject>/<n>.json`) or laid out like
    # a hub repository, or a JSONL file (common/data.py). `format: sft_pairs` reads JSONL with
    # `prompt`/`response` fields instead (ready reasoning traces).
    train_source: str = MATH_HUB_SOURCE
    train_split: str = "train"
    format: str = "math"  # math | sft_pairs
    prompt_template: str = "config/r1_zero.prompt"


@dataclass
class TrainingConfig:
    learning_rate: float = 2.0e-5
    batch_size: int = 40  # sequences per micro-batch (packed: at most max_tokens_per_micro_batch tokens)
    gradient_accumulation_steps: int = 2
    warmup_steps: int = 100
    epochs: float = 1.0
    max_steps: int = 0  # 0: derived from epochs
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    min_lr_ratio: float = 0.0  # cosine decays to learning_rate * min_lr_ratio
    seed: int = 42
    eval_every: int = 50  # publish a checkpoint every N optimizer steps
    save_resume_every: int = 50  # write resumable state (weights+optimizer+RNG+data position) every N steps
    device: str = "cuda:0"
    packing: bool = True  # padding-free micro-batches with per-example attention boundaries
    # A packed micro-batch closes at batch_size examples or at this many tokens, whichever comes
    # first (0: no token cap). The gradient of a step does not depend on the split (the loss is
    # normalised per step). 12288 keeps Qwen2.5-Math-1.5B under ~65 GiB on one H100 without
    # gradient checkpointing (docs/PERFORMANCE.md).
    max_tokens_per_micro_batch: int = 12288
    compile: bool = True  # torch.compile each decoder layer (GPU only; ignored on CPU)
    # Recompute layer activations in the backward: ~30% slower steps, far less memory. Not needed
    # at the default config on an 80 GB GPU (see max_tokens_per_micro_batch).
    gradient_checkpointing: bool = False
    run_id: str = ""  # empty: a new id from the timestamp; an existing id resumes that run
    keep_last_checkpoints: int = 0  # 0: keep all published checkpoints


@dataclass
class PublishedResult:
    """The published number a preset reproduces; `bin/eval --checkpoint` prints its result beside it.
    accuracy / format_accuracy: fractions, one value or a [low, high] range; empty when not published."""

    name: str = ""  # empty: no published number
    accuracy: list[float] = field(default_factory=list)
    format_accuracy: list[float] = field(default_factory=list)
    source: str = ""  # paper / course and table


@dataclass
class EvaluationConfig:
    engine: str = "vllm"  # vllm | hf
    device: str = "cuda:1"
    eval_set: str = "math"  # math (full test set) | math500 (test_source must then hold MATH-500's 500 problems)
    test_source: str = MATH_HUB_SOURCE  # same forms as data.train_source; MATH-500: HuggingFaceH4/MATH-500
    test_split: str = "test"
    num_eval_samples: int = 0  # 0: all; otherwise a fixed, seeded subset
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    stop: list[str] = field(default_factory=lambda: ["</answer>"])
    # keep_up | latest | in_order (eval_daemon/schedule.py). keep_up: while checkpoints arrive faster
    # than full evaluations finish, each waiting one first gets a quick evaluation on a fixed, seeded
    # subset of keep_up_subset problems stratified by subject and level (its own eval key); the full
    # evaluations are back-filled when the fleet is idle. Keeping up, it is `latest`.
    schedule: str = "keep_up"
    keep_up_subset: int = 1000
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 2048
    entropy_sample_size: int = 256  # responses whose mean token entropy is scored (0: none)
    samples_per_problem: int = 1  # k responses per problem, in the same engine call (pass@k, maj@k)
    poll_observer: bool = False  # watchdog PollingObserver (network filesystems)
    reconcile_interval_s: float = 30.0
    environment_retries: int = 3  # tries of a checkpoint whose evaluation the machine failed (OOM, driver, network)
    retry_backoff_s: float = 10.0  # wait before the 2nd try, doubled for each further one
    grading_timeout_s: float = 5.0
    grading_workers: int = 2
    worker_id: str = ""  # empty: hostname-pid; `bin/eval --workers N` names its workers <id>-0 .. <id>-N-1
    # bin/eval --workers N: worker i runs on devices[i % len(devices)] (several workers per GPU are
    # allowed: list a GPU twice, or give fewer devices than workers); empty: every worker on `device`.
    devices: list[str] = field(default_factory=list)
    # A worker's claim on a checkpoint (results/leases/) lasts this long without a heartbeat (one
    # every lease_s/3): after a worker dies, another takes its checkpoint over within about lease_s.
    lease_s: float = 60.0
    hf_batch_size: int = 512  # prompts decoded together with engine: hf (halved on out-of-memory)
    # engine hf: batch_loop = mathsft's decoding loop (preallocated KV cache, CUDA graphs on a GPU;
    # Qwen2 / Llama models, others use generate) | generate = transformers' model.generate
    hf_decoder: str = "batch_loop"
    published: PublishedResult = field(default_factory=PublishedResult)


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "math-sft"
    wandb_entity: str | None = None
    wandb_group: str = ""  # empty: derived from the run id, shared by the train and eval runs
    log_every: int = 1
    progress_bar: bool = True


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---- loading -------------------------------------------------------------------------------------


class Sources:
    """Where each dotted key was set: a file line ("config/x.yaml:12") or an override ("override 'k=v'")."""

    def __init__(self, default: str = "<defaults>"):
        self.default = default
        self.by_key: dict[str, str] = {}

    def of(self, key: str) -> str:
        """The key's own source, else a key under it (an unknown section), else its section's, else the default."""
        if key in self.by_key:
            return self.by_key[key]
        under = [source for dotted, source in self.by_key.items() if dotted.startswith(key + ".")]
        if under:
            return under[-1]
        parent = key.rpartition(".")[0]
        return self.of(parent) if parent else self.default


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read YAML (or defaults when path is None), apply dotted overrides, validate, return Config."""
    raw: dict[str, Any] = {}
    sources = Sources()
    if path is not None:
        raw, sources = _read_yaml(Path(path))
    for item in overrides:
        sources.by_key[_apply_override(raw, item)] = f"override {item!r}"
    config = _build(Config, raw, prefix="", sources=sources)
    validate(config, sources)
    return config


def _read_yaml(path: Path) -> tuple[dict, Sources]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}; pass an existing --config") from exc
    try:
        raw, root = yaml.safe_load(text) or {}, yaml.compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({exc.problem or exc.context}); fix the syntax there") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]}); fix the syntax") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections; start with model:, training:, ...")
    sources = Sources(str(path))
    _record_lines(root, "", path, sources)
    return raw, sources


def _record_lines(node: yaml.Node, prefix: str, path: Path, sources: Sources) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            sources.by_key[dotted] = f"{path}:{key_node.start_mark.line + 1}"
            _record_lines(value_node, dotted + ".", path, sources)


def _apply_override(raw: dict, item: str) -> str:
    """Set one `section.key=value` in raw; returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} has no '='; write section.key=value")
    dotted, value_text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key} is not a section; name a key inside a section")
    try:  # YAML parsing gives overrides the same typing as the file (1e-5 -> float, true -> bool).
        node[keys[-1]] = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML; quote it or fix it") from exc
    return dotted.strip()


def _build(cls: type, raw: Any, prefix: str, sources: Sources):
    if not isinstance(raw, dict):
        raise ConfigError(f"{sources.of(prefix.rstrip('.'))}: {prefix.rstrip('.') or 'config'} must be a mapping; "
                          "write key: value lines under it")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        dotted = f"{prefix}{key}"
        if dotted in MOVED_KEYS:
            raise ConfigError(f"{sources.of(dotted)}: {dotted} is gone; {MOVED_KEYS[dotted]}")
        if key not in names:
            raise ConfigError(f"{sources.of(dotted)}: unknown key {dotted}; {_suggest(dotted, prefix, names)}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, raw[f.name] or {}, f"{prefix}{f.name}.", sources)
        else:
            values[f.name] = _coerce(raw[f.name], hint, f"{prefix}{f.name}", sources.of(f"{prefix}{f.name}"))
    return cls(**values)


def _suggest(dotted: str, prefix: str, names: list[str]) -> str:
    """The fix for an unknown key: the same name in another section, a close spelling, or the valid keys."""
    leaf = dotted.rpartition(".")[2]
    everywhere = all_keys()
    moved = [key for key in everywhere if key.rpartition(".")[2] == leaf]  # e.g. training.grading_workers
    close = moved or [prefix + name for name in difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)]
    close = close or difflib.get_close_matches(dotted, everywhere, n=1, cutoff=0.8)
    if close:
        return f"did you mean {close[0]}?"
    return f"valid keys here: {', '.join(sorted(names))}"


def all_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config ('training.learning_rate', ...), sections included."""
    keys = []
    for f in dataclasses.fields(cls or Config):
        hint = typing.get_type_hints(cls or Config)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.")
    return keys


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(option for option in options if option is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list of {item_type.__name__}, got {value!r}; "
                              f"write [a, b] in YAML")
        return [_coerce(v, item_type, key, source) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads "2e-5" (no dot) as a string; accept it as the number it is.
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(
            f"{source}: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}; write a {hint.__name__}"
        )
    return value


# ---- validation ----------------------------------------------------------------------------------


def validate(config: Config, where: Sources | None = None) -> None:
    """Check every option and combination; each message names the key, where it was set, and the fix."""
    def _require(condition: bool, key: str, problem: str) -> None:
        if not condition:
            fix = "" if "; " in problem else f"; set {key} to a value that does"  # every message ends in a fix
            raise ConfigError(f"{(where or Sources()).of(key)}: {key} {problem}{fix}")

    t, e, m, d, lg = config.training, config.evaluation, config.model, config.data, config.logging
    _require(config.paths.results_dir.strip() != "", "paths.results_dir", "is empty; set a directory (default results)")
    _require(m.name_or_path != "", "model.name_or_path", "is empty; set a hub id or a local directory")
    _require(m.dtype in ("bfloat16", "float32"), "model.dtype", "must be bfloat16 or float32")
    _require(m.attn_implementation in ("varlen", "sdpa", "flash_attention_2", "flex_attention", "eager"),
             "model.attn_implementation", "must be varlen, sdpa, flash_attention_2, flex_attention or eager")
    _require(m.attn_implementation != "varlen" or t.packing,
             "model.attn_implementation", "is varlen, which needs training.packing=true; set attn_implementation=sdpa for padded batches")
    _require(t.max_tokens_per_micro_batch >= 0, "training.max_tokens_per_micro_batch", "must be >= 0 (0: no cap)")
    _require(m.max_seq_length >= 16, "model.max_seq_length", "must be >= 16")
    _require(d.format in ("math", "sft_pairs"), "data.format", "must be math or sft_pairs")
    _require(t.learning_rate > 0, "training.learning_rate", "must be > 0")
    _require(t.batch_size >= 1, "training.batch_size", "must be >= 1")
    _require(t.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps", "must be >= 1")
    _require(t.warmup_steps >= 0, "training.warmup_steps", "must be >= 0")
    _require(t.epochs > 0 or t.max_steps > 0, "training.epochs", "must be > 0, or training.max_steps > 0")
    _require(t.max_steps >= 0, "training.max_steps", "must be >= 0")
    _require(t.eval_every >= 1, "training.eval_every", "must be >= 1")
    _require(t.save_resume_every >= 1, "training.save_resume_every", "must be >= 1")
    _require(t.max_grad_norm > 0, "training.max_grad_norm", "must be > 0")
    _require(0 <= t.min_lr_ratio <= 1, "training.min_lr_ratio", "must be in [0, 1]")
    _require(t.keep_last_checkpoints >= 0, "training.keep_last_checkpoints", "must be >= 0 (0 keeps all)")
    _require(_valid_device(t.device), "training.device", f"must be cpu, cuda or cuda:N, got {t.device!r}")
    _require(t.run_id == "" or _safe_name(t.run_id),
             "training.run_id", "may hold only letters, digits, '-', '_' and '.'")
    _require(e.engine in ("vllm", "hf"), "evaluation.engine", "must be vllm or hf")
    _require(_valid_device(e.device), "evaluation.device", f"must be cpu, cuda or cuda:N, got {e.device!r}")
    _require(e.eval_set in ("math", "math500"), "evaluation.eval_set", "must be math or math500")
    _require(e.num_eval_samples >= 0, "evaluation.num_eval_samples", "must be >= 0 (0 means all)")
    _require(e.temperature >= 0, "evaluation.temperature", "must be >= 0 (0 is greedy)")
    _require(0 < e.top_p <= 1, "evaluation.top_p", "must be in (0, 1]")
    _require(e.max_tokens >= 1, "evaluation.max_tokens", "must be >= 1")
    _require(e.schedule in ("keep_up", "latest", "in_order"), "evaluation.schedule", "must be keep_up, latest or in_order")
    _require(e.keep_up_subset >= 1, "evaluation.keep_up_subset", "must be >= 1")
    _require(0 < e.gpu_memory_utilization <= 1, "evaluation.gpu_memory_utilization", "must be in (0, 1]")
    _require(e.samples_per_problem >= 1, "evaluation.samples_per_problem", "must be >= 1")
    _require(e.samples_per_problem == 1 or e.temperature > 0, "evaluation.samples_per_problem",
             f"is {e.samples_per_problem} with greedy decoding (temperature 0), which gives {e.samples_per_problem} "
             "identical responses; set evaluation.temperature > 0 or samples_per_problem=1")
    _require(e.entropy_sample_size >= 0, "evaluation.entropy_sample_size", "must be >= 0")
    _require(e.grading_timeout_s > 0, "evaluation.grading_timeout_s", "must be > 0")
    _require(e.grading_workers >= 1, "evaluation.grading_workers", "must be >= 1")
    _require(e.hf_batch_size >= 1, "evaluation.hf_batch_size", "must be >= 1")
    _require(e.hf_decoder in ("batch_loop", "generate"),
             "evaluation.hf_decoder", f"must be batch_loop or generate, got {e.hf_decoder!r}")
    _require(e.max_tokens < e.max_model_len,
             "evaluation.max_tokens", f"({e.max_tokens}) must be < evaluation.max_model_len ({e.max_model_len}); raise max_model_len")
    _require(e.worker_id == "" or _safe_name(e.worker_id),
             "evaluation.worker_id", "may hold only letters, digits, '-', '_' and '.'")
    _require(all(_valid_device(d) for d in e.devices), "evaluation.devices",
             f"must list cpu, cuda or cuda:N entries, got {e.devices!r}")
    _require(e.lease_s > 0, "evaluation.lease_s", "must be > 0")
    _require(e.reconcile_interval_s > 0, "evaluation.reconcile_interval_s", "must be > 0")
    _require(e.environment_retries >= 1, "evaluation.environment_retries", "must be >= 1")
    _require(e.retry_backoff_s >= 0, "evaluation.retry_backoff_s", "must be >= 0")
    _require(lg.log_every >= 1, "logging.log_every", "must be >= 1")
    _validate_sources(config, _require)
    _validate_published(e.published, _require)


def _validate_sources(config: Config, require) -> None:
    """Source syntax, removed hub ids, and eval sets that contradict their hub source."""
    keys = [("evaluation.test_source", config.evaluation.test_source)]
    if config.data.format == "math":
        keys.insert(0, ("data.train_source", config.data.train_source))
    hubs = {}
    for key, value in keys:
        try:
            hubs[key] = hub_source(value)
        except DatasetError as exc:
            require(False, key, f"is not usable: {exc}")
    test = hubs["evaluation.test_source"]
    test_id = test.dataset if test is not None and not test.local else ""
    eval_set = config.evaluation.eval_set
    require(not (eval_set == "math500" and test_id in FULL_MATH_HUB_IDS), "evaluation.eval_set",
            f"is math500 but evaluation.test_source={test_id} is the full MATH test set (5,000 problems); set "
            f"evaluation.test_source={MATH500_HUB_SOURCE}, or evaluation.eval_set=math")
    require(not (eval_set == "math" and test_id in MATH500_HUB_IDS), "evaluation.eval_set",
            f"is math but evaluation.test_source={test_id} is MATH-500; set evaluation.eval_set=math500")


def _validate_published(published: PublishedResult, require) -> None:
    for key in ("accuracy", "format_accuracy"):
        values = getattr(published, key)
        require(len(values) <= 2 and all(0 <= v <= 1 for v in values) and values == sorted(values),
                f"evaluation.published.{key}", "must be one fraction or a [low, high] range in [0, 1]")
    require(published.name != "" or not (published.accuracy or published.format_accuracy),
            "evaluation.published.name", "is empty but evaluation.published has numbers; set a name")


def _valid_device(device: str) -> bool:
    if device in ("cpu", "cuda"):
        return True
    return device.startswith("cuda:") and device[5:].isdigit()


def _safe_name(name: str) -> bool:
    return all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")


def to_dict(config: Config) -> dict:
    """The fully resolved config, as written into each checkpoint and evaluation record."""
    return dataclasses.asdict(config)
