#!/usr/bin/env bash
# Issue 16's one-GPU target (nvidia-h200): the trainer and an eval fleet sharing one card, at the
# default config (a checkpoint every 50 steps) for a 300-step run, in two device calls on the same
# warm machine, after vLLM for the GPU is installed into /tmp/site (.dev/vllm/install.sh):
#   bash bench/gpu_one_gpu_fleet_session.sh alone   # the trainer alone on cuda:0 (the throughput baseline)
#   bash bench/gpu_one_gpu_fleet_session.sh fleet   # trainer + WORKERS (default 2) eval workers on cuda:0
# Needs (carried, git-ignored) .dev/bench/{math_train.jsonl,math_test.jsonl,qwen_tok/} and .whl/
# (duckdb, watchdog, math-verify and its needs, for Python 3.12); logs and summaries go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
export PYTHONPATH=/tmp/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 \
  | grep -v "already exists" | tail -2
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
B=.dev/bench
[ -f /tmp/rq/config.json ] || python3 bench/make_random_model.py /tmp/rq --tokenizer $B/qwen_tok --device cuda 2>&1 | tail -1
INPUTS="--model /tmp/rq --data $B/math_train.jsonl --test $B/math_test.jsonl --workdir /tmp/fleet"
case "${1:-alone}" in
alone)
  rm -rf /tmp/fleet/alone
  timeout 560 python3 bench/two_daemons.py alone $INPUTS --steps ${STEPS:-300} --train-timeout-s 520 2>&1 | tail -3
  cp /tmp/fleet/alone/train.log $OUT/alone_train.log ;;
fleet)
  rm -rf /tmp/fleet/fleet
  timeout 580 python3 bench/one_gpu_fleet.py $INPUTS --device cuda:0 --workers ${WORKERS:-2} --steps ${STEPS:-300} \
    --train-timeout-s 420 --drain-s 120 2>&1 | tail -20
  cp /tmp/fleet/fleet/train.log $OUT/fleet_train.log; cp /tmp/fleet/fleet/eval-w*.log $OUT/ ;;
esac
for p in alone fleet; do [ -f /tmp/fleet/$p/summary.json ] && cp /tmp/fleet/$p/summary.json $OUT/summary_$p.json; done; true
