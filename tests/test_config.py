"""Config loading: typed, validated before anything heavy, one-line errors naming key and file."""


import re

import pytest

from common.config import ConfigError, load_config

REFERENCE = "config/sft_config.yaml"


def test_reference_config_loads_with_reference_defaults():
    config = load_config(REFERENCE)
    assert config.model.name_or_path == "Qwen/Qwen2.5-Math-1.5B"
    assert config.training.learning_rate == pytest.approx(2.0e-5)
    assert config.training.batch_size * config.training.gradient_accumulation_steps == 80
    assert config.training.eval_every == 50
    assert config.evaluation.stop == ["</answer>"]
    assert config.evaluation.temperature == 1.0 and config.evaluation.max_tokens == 1024


def test_dotted_overrides_are_typed_like_yaml():
    config = load_config(REFERENCE, ["training.max_steps=7", "training.learning_rate=1e-4",
                                     "logging.wandb=false", "evaluation.stop=['</answer>', 'END']"])
    assert config.training.max_steps == 7
    assert config.training.learning_rate == pytest.approx(1e-4)
    assert config.logging.wandb is False
    assert config.evaluation.stop == ["</answer>", "END"]


@pytest.mark.parametrize("override, named", [
    ("training.bogus=1", "training.bogus"),
    ("trainin.max_steps=1", "trainin"),
    ("training.batch_size=many", "training.batch_size"),
    ("training.packing=3", "training.packing"),
    ("evaluation.engine=tensorrt", "evaluation.engine"),
    ("evaluation.top_p=0", "evaluation.top_p"),
    ("training.device=gpu0", "training.device"),
    ("evaluation.samples_per_problem=0", "evaluation.samples_per_problem"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as info:
        load_config(REFERENCE, [override])
    message = str(info.value)
    assert named in message and "\n" not in message


def test_greedy_with_several_samples_per_problem_is_refused_in_one_line():
    with pytest.raises(ConfigError) as info:
        load_config(REFERENCE, ["evaluation.samples_per_problem=4", "evaluation.temperature=0"])
    assert "evaluation.samples_per_problem=4" in str(info.value) and "\n" not in str(info.value)
    assert load_config(REFERENCE, ["evaluation.samples_per_problem=4"]).evaluation.samples_per_problem == 4


def test_bad_yaml_file_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_every_yaml_in_config_dir_is_valid():
    from pathlib import Path

    for path in Path("config").glob("*.yaml"):
        load_config(path)
        assert path.read_text().startswith("#"), f"{path} must start with a comment showing its command"


def test_readme_documents_every_config_key():
    import dataclasses
    from pathlib import Path

    from common.config import Config

    readme = Path("README.md").read_text()
    for section in dataclasses.fields(Config):
        for key in dataclasses.fields(section.type if isinstance(section.type, type) else getattr(Config(), section.name)):
            assert f"`{section.name}.{key.name}`" in readme, f"README's configuration reference lacks {section.name}.{key.name}"


def test_one_results_root_and_the_old_path_keys_name_it(tmp_path):
    from common.contract import Layout

    layout = Layout.of(load_config(None, [f"paths.results_dir={tmp_path}"]))
    assert (layout.checkpoints, layout.runs, layout.store) == (tmp_path / "checkpoints", tmp_path / "runs",
                                                               tmp_path / "results.duckdb")
    for old in ("training.output_dir", "evaluation.checkpoints_dir", "evaluation.store_path"):
        with pytest.raises(ConfigError, match="paths.results_dir"):
            load_config(None, [f"{old}={tmp_path}"])


def config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message and "; " in message  # one line: what, then the fix
    return message


def test_a_typo_in_an_override_names_the_override_and_the_key_meant():
    message = config_error(REFERENCE, ["training.lerning_rate=1e-5"])
    assert message.startswith("override 'training.lerning_rate=1e-5': unknown key training.lerning_rate")
    assert message.endswith("did you mean training.learning_rate?")
    assert REFERENCE not in message


def test_a_bad_value_from_an_override_names_the_override_not_the_file():
    assert config_error(REFERENCE, ["training.batch_size=0"]).startswith("override 'training.batch_size=0': ")
    assert config_error(REFERENCE, ["training.packing=3"]).startswith("override 'training.packing=3': ")
    assert config_error(REFERENCE, ["trainig.max_steps=1"]) == (
        "override 'trainig.max_steps=1': unknown key trainig; did you mean training?")


def test_a_key_in_the_wrong_section_points_to_its_section():
    assert config_error(None, ["training.grading_workers=2"]).endswith("did you mean evaluation.grading_workers?")


def test_a_typo_in_a_file_names_its_line(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("# bin/train --config typo.yaml\ntraining:\n  max_steps: 3\n  warmup_step: 1\n")
    assert config_error(path) == f"{path}:4: unknown key training.warmup_step; did you mean training.warmup_steps?"
    path.write_text("training:\n  max_steps: 3\n  batch_size: 0\n")
    assert config_error(path).startswith(f"{path}:3: training.batch_size must be >= 1")
    # the override replaces the file's value: the error is the override's
    assert config_error(path, ["training.batch_size=-1"]).startswith("override 'training.batch_size=-1': ")


def test_yaml_syntax_errors_give_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  max_steps: 3\n  batch_size: [1, 2\nmodel:\n  dtype: x\n")
    message = config_error(path)
    assert re.match(rf"{re.escape(str(path))}:\d+:\d+: invalid YAML \(", message), message
    path.write_text("training:\n  max_steps: 3\n bad: indent\n")
    assert config_error(path).startswith(f"{path}:3:")


def test_an_override_with_an_invalid_yaml_value_is_named():
    assert config_error(None, ["evaluation.stop=[a, b"]).startswith("override 'evaluation.stop=[a, b': ")
