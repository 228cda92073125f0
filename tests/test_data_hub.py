"""Hub datasets through `datasets.load_dataset`, without a network: local directories laid out like
the hub repositories EleutherAI/hendrycks_math (one config per subject, parquet per split) and
HuggingFaceH4/MATH-500 (one default config, split test), loaded by the same code path as a hub id;
hub ids that do not exist vs a hub that cannot be reached (a loopback server stands in for the hub)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import ConfigError, load_config
from common.data import (MATH500_HUB_SOURCE, MATH_HUB_SOURCE, DatasetError, HubDatasetNotFoundError,
                         HubUnreachableError, check_eval_set, hub_source, load_math)
from tests.conftest import FIXTURE_PROBLEMS, write_math_layout


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets' cache in the test's own directory (never ~/.cache)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def write_hendrycks_layout(root: Path, rows_by_config: dict[str, dict[str, list[dict]]]) -> Path:
    """<root>/<config>/<split>-00000-of-00001.parquet and a README.md whose `configs:` metadata maps
    them, as in the hub repository EleutherAI/hendrycks_math."""
    card = ["---", "configs:"]
    for config, splits in rows_by_config.items():
        card += [f"- config_name: {config}", "  data_files:"]
        (root / config).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            pq.write_table(pa.Table.from_pylist(rows), root / config / f"{split}-00000-of-00001.parquet")
            card += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (root / "README.md").write_text("\n".join([*card, "---", "", "MATH, one config per subject.", ""]))
    return root


def hendrycks_rows(split: str) -> dict[str, dict[str, list[dict]]]:
    """FIXTURE_PROBLEMS with the hendrycks_math fields (problem, level, type, solution)."""
    return {subject: {split: [{"problem": p, "level": level, "type": subject.replace("_", " ").title(),
                               "solution": s} for p, s, level in problems]}
            for subject, problems in FIXTURE_PROBLEMS.items()}


def math500_rows() -> list[dict]:
    """FIXTURE_PROBLEMS with MATH-500's fields; unique_id is the release file, as in MATH-500."""
    return [{"problem": p, "solution": s, "answer": s.split("boxed{")[1].rsplit("}", 1)[0],
             "subject": subject.replace("_", " ").title(), "level": int(level.split()[-1]),
             "unique_id": f"test/{subject}/{index}.json"}
            for subject, problems in FIXTURE_PROBLEMS.items() for index, (p, s, level) in enumerate(problems)]


def write_math500_layout(root: Path, rows: list[dict], form: str) -> Path:
    """MATH-500's repository: test.jsonl at the root (default config, split from the file name);
    `parquet` writes the hub's parquet conversion instead (data/test-00000-of-00001.parquet)."""
    root.mkdir(parents=True, exist_ok=True)
    if form == "jsonl":
        (root / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        (root / "data").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / "test-00000-of-00001.parquet")
    (root / "README.md").write_text("# MATH-500\n")
    return root


def test_hendrycks_layout_concatenates_the_named_configs(tmp_path):
    root = write_hendrycks_layout(tmp_path / "hendrycks_math", {
        subject: {**hendrycks_rows("train")[subject], **hendrycks_rows("test")[subject]} for subject in FIXTURE_PROBLEMS})
    test = load_math(f"{root}:algebra,number_theory", "test")
    assert [e.subject for e in test] == ["algebra"] * 3 + ["number_theory"] * 2
    assert [e.problem_id for e in test[:2]] == ["hendrycks_math/test/algebra/0", "hendrycks_math/test/algebra/1"]
    assert test[0].answer == "5" and test[0].level == 1 and test[3].problem == FIXTURE_PROBLEMS["number_theory"][0][0]
    everything = load_math(f"{root}:" + ",".join(FIXTURE_PROBLEMS), "train")
    assert len(everything) == sum(map(len, FIXTURE_PROBLEMS.values())) == len({e.problem_id for e in everything})


def test_hendrycks_layout_errors_name_the_configs(tmp_path):
    root = write_hendrycks_layout(tmp_path / "hendrycks_math", hendrycks_rows("test"))
    with pytest.raises(DatasetError, match="algbra") as missing_config:
        load_math(f"{root}:algbra", "test")
    assert "algebra" in str(missing_config.value)  # datasets lists the configs that exist
    with pytest.raises(DatasetError, match="validation"):
        load_math(f"{root}:algebra", "validation")


@pytest.mark.parametrize("form", ["jsonl", "parquet"])
def test_math500_layout_keeps_release_ids(tmp_path, form):
    root = write_math500_layout(tmp_path / "MATH-500", math500_rows(), form)
    hub = load_math(str(root), "test")
    release = load_math(str(write_math_layout(tmp_path / "MATH", splits=("test",))), "test")
    assert [(e.problem_id, e.problem, e.answer, e.subject, e.level) for e in hub] == \
        [(e.problem_id, e.problem, e.answer, e.subject, e.level) for e in release]


def test_source_syntax_and_removed_ids():
    hub = hub_source(MATH_HUB_SOURCE)
    assert hub.dataset == "EleutherAI/hendrycks_math" and len(hub.configs) == 7 and not hub.local
    assert hub_source(MATH500_HUB_SOURCE).configs == ()
    for bad in ("hendrycks/competition_math", "EleutherAI/hendrycks_math:algebra,,geometry", "not a source"):
        with pytest.raises(DatasetError):
            hub_source(bad)


def test_config_rejects_removed_ids_and_mismatched_eval_sets(tmp_path):
    for overrides in (["data.train_source=hendrycks/competition_math"],
                      ["evaluation.test_source=hendrycks/competition_math"],
                      ["evaluation.eval_set=math500"],  # over the default: the 5,000 MATH test problems
                      [f"evaluation.test_source={MATH500_HUB_SOURCE}"]):  # eval_set math over MATH-500
        with pytest.raises(ConfigError, match=overrides[0].split("=")[0]):
            load_config(None, overrides)
    config = load_config(None, ["evaluation.eval_set=math500", f"evaluation.test_source={MATH500_HUB_SOURCE}"])
    assert config.evaluation.test_source == MATH500_HUB_SOURCE
    # sft_pairs training reads a JSONL file: the MATH source checks do not apply to it.
    assert load_config(None, ["data.format=sft_pairs", "data.train_source=x/y:z"]).data.format == "sft_pairs"


def test_math500_eval_set_needs_500_problems(tmp_path):
    examples = load_math(str(write_math_layout(tmp_path / "MATH", splits=("test",))), "test")
    with pytest.raises(DatasetError, match="math500"):
        check_eval_set("math500", examples, "MATH")
    check_eval_set("math", examples, "MATH")


class _NotFoundHub(http.server.BaseHTTPRequestHandler):
    """The hub's answer to a repository that does not exist."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def hub_endpoint(monkeypatch):
    from huggingface_hub import constants

    def use(endpoint: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return use


def test_missing_hub_id_fails_fast_naming_the_replacements(hub_endpoint):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFoundHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub_endpoint(f"http://127.0.0.1:{server.server_address[1]}")
        started = time.monotonic()
        with pytest.raises(HubDatasetNotFoundError) as error:
            load_math("someone/hendrycks_maths:algebra", "test")
    finally:
        server.shutdown()
    assert time.monotonic() - started < 5
    assert "EleutherAI/hendrycks_math" in str(error.value) and MATH500_HUB_SOURCE in str(error.value)


def test_unreachable_hub_fails_fast_naming_offline_mode(hub_endpoint):
    hub_endpoint("http://127.0.0.1:1")  # nothing listens there: connection refused, as without a network
    started = time.monotonic()
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE=1"):
        load_math(MATH_HUB_SOURCE, "test")
    assert time.monotonic() - started < 5


def test_offline_mode_without_a_cached_copy_says_so(monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(DatasetError, match="HF_HUB_OFFLINE=1"):
        load_math(MATH500_HUB_SOURCE, "test")
    assert time.monotonic() - started < 5


# ---- the real MATH release (../shared), converted into the hub layouts ----------------------------


def test_real_math_through_the_hub_layouts(shared_dir, tmp_path):
    """The 5,000 MATH test problems as EleutherAI/hendrycks_math lays them out, and MATH-500's JSONL as
    its repository does: every MATH-500 id is a release id holding the same problem."""
    release = load_math(str(shared_dir / "data" / "MATH"), "test")
    by_subject: dict[str, dict[str, list[dict]]] = {}
    for example in release:
        by_subject.setdefault(example.subject, {"test": []})["test"].append(
            {"problem": example.problem, "level": f"Level {example.level}", "type": example.subject,
             "solution": example.solution})
    hendrycks = write_hendrycks_layout(tmp_path / "hendrycks_math", by_subject)
    full = load_math(f"{hendrycks}:{MATH_HUB_SOURCE.split(':')[1]}", "test")
    assert len(full) == len(release) == 5000
    with pytest.raises(DatasetError, match="math500"):
        check_eval_set("math500", full, str(hendrycks))
    math500_dir = tmp_path / "MATH-500"
    math500_dir.mkdir()
    (math500_dir / "test.jsonl").write_bytes((shared_dir / "data" / "MATH-500" / "test.jsonl").read_bytes())
    math500 = load_math(str(math500_dir), "test")
    check_eval_set("math500", math500, str(math500_dir))
    problems = {e.problem_id: e.problem for e in release}
    assert all(problems[e.problem_id] == e.problem for e in math500)


def test_readme_sql_asks_for_a_problem_that_exists_in_real_math(shared_dir):
    import re

    sql = re.search(r"<!-- sql: one_problem_over_steps -->\n```sql\n(.*?)```", Path("README.md").read_text(), re.S)
    (problem_id,) = re.findall(r"problem_id = '([^']+)'", sql.group(1))
    assert (shared_dir / "data" / "MATH" / problem_id).is_file()
