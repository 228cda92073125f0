"""The demo's inputs: the embedded dataset and the tiny model, built once, where config/demo.yaml says.

Not run on its own: used by `bin/demo` (`python -m common.demo.run`, common/demo/run.py). The
dataset (common/demo/data.py) goes to data.train_source in the MATH release layout; the model
(common/demo/tiny_model.py) goes to model.name_or_path, with a byte-level BPE tokenizer trained on the
demo problems and the prompt template, so prompts and responses take few tokens. Each is built in a
temporary directory and renamed into place, with a stamp of the settings that made it: an
interrupted build is never mistaken for a finished one, and changed settings rebuild it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from common.config import Config
from common.data import load_prompt_template

logger = logging.getLogger(__name__)

STAMP_NAME = ".demo-inputs.json"


@dataclass(frozen=True)
class DemoInputs:
    """What the demo's dataset and model are made of (the defaults are what bin/demo uses)."""
    train_problems: int = 4000
    test_problems: int = 140
    data_seed: int = 0
    vocab_size: int = 1000  # BPE merges stop early: the demo texts need ~400 tokens (one per digit)
    hidden_size: int = 128
    num_layers: int = 2
    model_seed: int = 0


def ensure_inputs(config: Config, inputs: DemoInputs, rebuild: bool = False) -> tuple[Path, Path]:
    """Build the dataset and the model where the config points, unless they exist with these settings."""
    data_dir, model_dir = Path(config.data.train_source), Path(config.model.name_or_path)
    data_settings = {"train": inputs.train_problems, "test": inputs.test_problems, "seed": inputs.data_seed}
    if rebuild or not _is_current(data_dir, data_settings):
        _build(data_dir, data_settings, lambda tmp: _write_dataset(tmp, inputs))
        rebuild = True  # the tokenizer is trained on the dataset: a new dataset means a new model
    model_settings = {**asdict(inputs), "prompt_template": load_prompt_template(config.data.prompt_template)}
    if rebuild or not _is_current(model_dir, model_settings):
        _build(model_dir, model_settings, lambda tmp: _write_model(tmp, data_dir, model_settings["prompt_template"], inputs))
    return data_dir, model_dir


def _is_current(path: Path, settings: dict) -> bool:
    try:
        return json.loads((path / STAMP_NAME).read_text()) == settings
    except (OSError, json.JSONDecodeError):  # missing or half-written: build again
        return False


def _build(path: Path, settings: dict, write) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted build
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / STAMP_NAME).write_text(json.dumps(settings, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _write_dataset(out: Path, inputs: DemoInputs) -> None:
    from common.demo.data import write_demo_dataset

    write_demo_dataset(out, inputs.train_problems, inputs.test_problems, inputs.data_seed)
    logger.info("wrote the demo dataset: %d train and %d test problems", inputs.train_problems, inputs.test_problems)


def _write_model(out: Path, data_dir: Path, template: str, inputs: DemoInputs) -> None:
    import transformers

    from common.demo.data import demo_corpus
    from common.demo.tiny_model import build_tiny_model

    transformers.utils.logging.disable_progress_bar()  # a one-second save needs no progress bar
    build_tiny_model(out, demo_corpus(data_dir) + [template], vocab_size=inputs.vocab_size,
                     hidden_size=inputs.hidden_size, num_layers=inputs.num_layers,
                     # head_dim 32: a size vLLM's CPU attention kernels support
                     num_heads=inputs.hidden_size // 32, num_kv_heads=max(1, inputs.hidden_size // 64),
                     seed=inputs.model_seed, split_digits=True)
