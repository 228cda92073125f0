#!/usr/bin/env bash
# The evaluation benchmarks of docs/PERFORMANCE.md in one device call (one GPU, 7-10 min), after
# vLLM for the GPU is installed into /tmp/site (.dev/vllm/install.sh, see the team notes):
#   bash bench/gpu_eval_session.sh                 # 3 publications; EVAL_STEPS=2 on a host where a generate takes > 55 s
#   HF_TIMEOUT=150 bash bench/gpu_eval_session.sh   # then the HF engine's bench too (or bench/gpu_hf_session.sh)
# Needs (carried, git-ignored) .dev/bench/{math_test.jsonl,qwen_tok/} (or TEST=, TOK=); logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
export PYTHONPATH=/tmp/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
TOK=${TOK:-.dev/bench/qwen_tok}; TEST=${TEST:-.dev/bench/math_test.jsonl}
[ -f /tmp/rq/config.json ] || python3 bench/make_random_model.py /tmp/rq --tokenizer $TOK --device cuda 2>&1 | tail -1
timeout ${EVAL_TIMEOUT:-560} python3 bench/eval_full.py --model /tmp/rq --test-source $TEST --steps ${EVAL_STEPS:-3} ${EVAL_ARGS:-} --json $OUT/eval_full.json \
  > $OUT/eval_full.log 2>&1; echo "eval_full exit $?"
grep -E "eval_daemon|engines|store:|Error|error|Traceback" $OUT/eval_full.log | grep -v "Loading weights" | cut -c1-250 | tail -12
sed -n '/^eval_full:/,$p' $OUT/eval_full.log
[ "${HF_TIMEOUT:-0}" -gt 1 ] && timeout ${HF_TIMEOUT} python3 bench/hf_generate.py --model /tmp/rq --test-source $TEST 2>&1 \
  | grep -v "Loading weights" | tee $OUT/hf_generate.log | tail -6
