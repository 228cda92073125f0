"""bin/_env.sh's choices, tested without installing anything big: with this machine's local wheel
configuration hidden (PIP_CONFIG_FILE=/dev/null, no PIP_* variables) it takes PyTorch's CPU index,
and with that index unreachable it fails within a minute in one line; an existing environment
whose stamp is stale is updated in place, never recreated. The successful installs (local wheel
directory, PyTorch's index, uv) need the real indexes: see README's set-up section."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNREACHABLE_INDEX = "http://127.0.0.1:1/whl/cpu"  # nothing listens there: refused at once, as offline


def source_env(venv: Path) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "MATHSFT_"))}
    environment.update(PIP_CONFIG_FILE=os.devnull, MATHSFT_VENV=str(venv), MATHSFT_ENGINE="cpu",
                       MATHSFT_TORCH_INDEX=UNREACHABLE_INDEX)
    return subprocess.run(["bash", "-c", f"source {REPO / 'bin' / '_env.sh'} && echo activated"], env=environment,
                          capture_output=True, text=True, timeout=120)


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("[mathsft] error:")]


@pytest.mark.slow
def test_without_local_wheels_it_takes_the_pytorch_index_and_fails_fast_when_unreachable(tmp_path):
    started = time.monotonic()
    result = source_env(tmp_path / "venv")
    assert time.monotonic() - started < 60
    assert result.returncode == 1 and "activated" not in result.stdout
    (error,) = errors(result)
    assert UNREACHABLE_INDEX in error
    assert not (tmp_path / "venv").exists()  # it asks before it creates anything


@pytest.mark.slow
def test_a_stale_stamp_updates_the_environment_in_place(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    (venv / "kept-by-an-update").write_text("a file of the environment as it was")
    (venv / ".mathsft-stamp").write_text("stale\n")
    result = source_env(venv)
    assert result.returncode == 1 and len(errors(result)) == 1  # it went on to install torch: unreachable here
    assert (venv / "kept-by-an-update").exists() and (venv / ".mathsft-stamp").read_text() == "stale\n"
