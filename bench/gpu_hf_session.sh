#!/usr/bin/env bash
# The Hugging Face engine's GPU benchmark of docs/PERFORMANCE.md in one device call (one GPU, ~6 min):
#   bash bench/gpu_hf_session.sh
# Needs (carried, git-ignored) .dev/bench/{math_test.jsonl,qwen_tok/} (or TEST=, TOK=); logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
TOK=${TOK:-.dev/bench/qwen_tok}; TEST=${TEST:-.dev/bench/math_test.jsonl}
[ -f /tmp/rq/config.json ] || python3 bench/make_random_model.py /tmp/rq --tokenizer $TOK --device cuda 2>&1 | tail -1
# The shape: 256 new tokens; the baseline is 128 prompts in one padded model.generate call.
timeout ${HF_TIMEOUT:-300} python3 bench/hf_generate.py --model /tmp/rq --test-source $TEST --num-prompts 2048 \
  --loop-batches "${LOOP_BATCHES-512,1024}" --eager-batches "${EAGER_BATCHES-512}" 2>&1 \
  | grep -v "Loading weights" | tee $OUT/hf_generate.log
# The evaluation's shape: 1,024 new tokens (random weights never stop early).
[ "${LONG_TIMEOUT:-200}" -gt 1 ] && timeout ${LONG_TIMEOUT:-200} python3 bench/hf_generate.py --model /tmp/rq \
  --test-source $TEST --num-prompts 1024 --max-new-tokens 1024 --baseline-prompts 8 --loop-batches 512 2>&1 \
  | grep -v "Loading weights" | tee $OUT/hf_generate_long.log
