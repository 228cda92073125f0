#!/usr/bin/env bash
# The 2-GPU benchmarks of docs/PERFORMANCE.md, in two device calls on the same warm machine
# (nvidia-h100-x2), after vLLM for the GPU is installed into /tmp/site (.dev/vllm/install.sh):
#   bash bench/gpu_two_daemons_session.sh alone   # HF engine bench (GPU 0), then the trainer alone (~8 min)
#   bash bench/gpu_two_daemons_session.sh both    # trainer on GPU 0 + eval daemon on GPU 1 (~7 min)
# Needs (carried, git-ignored) .dev/bench/{math_train.jsonl,math_test.jsonl,qwen_tok/} and .whl/
# (duckdb, watchdog, math-verify and its needs, for Python 3.12); logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
export PYTHONPATH=/tmp/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 \
  | grep -v "already exists" | tail -2
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
python3 -c "import vllm, torch, transformers, duckdb, watchdog, math_verify; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'duckdb', duckdb.__version__)"
B=.dev/bench
[ -f /tmp/rq/config.json ] || python3 bench/make_random_model.py /tmp/rq --tokenizer $B/qwen_tok --device cuda 2>&1 | tail -1
TD="python3 bench/two_daemons.py --model /tmp/rq --data $B/math_train.jsonl --test $B/math_test.jsonl --workdir /tmp/td"
case "${1:-alone}" in
alone)
  timeout ${HF_TIMEOUT:-230} python3 bench/hf_generate.py --model /tmp/rq --test-source $B/math_test.jsonl 2>&1 \
    | grep -v "Loading weights" | tee $OUT/hf_generate.log | tail -8
  rm -rf /tmp/td/alone
  timeout 360 $TD alone --steps ${STEPS:-200} --train-timeout-s 340 2>&1 | tail -4
  cp /tmp/td/alone/train.log $OUT/alone_train.log ;;
both)
  rm -rf /tmp/td/both
  timeout 560 $TD both --steps ${STEPS:-200} --train-timeout-s 340 --drain-s 200 2>&1 | tail -14
  cp /tmp/td/both/train.log $OUT/both_train.log; cp /tmp/td/both/eval.log $OUT/both_eval.log
  grep -E "ERROR|Traceback|evaluated|recorded" $OUT/both_eval.log | cut -c1-200 | tail -12 ;;
esac
for p in alone both; do [ -f /tmp/td/$p/summary.json ] && cp /tmp/td/$p/summary.json $OUT/summary_$p.json; done; true
