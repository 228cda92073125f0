#!/usr/bin/env bash
# Multi-GPU training (issue 20, docs/PERFORMANCE.md) on one host, one device call per case (each < 10 min):
#   bash bench/gpu_multi_train_session.sh scale 1    # the 1-GPU baseline          (kind nvidia-h200)
#   bash bench/gpu_multi_train_session.sh scale 2    # bin/train --nproc 2 (FSDP2)  (kind nvidia-h200-x2)
#   bash bench/gpu_multi_train_session.sh scale 4    # bin/train --nproc 4          (kind nvidia-h200-x4)
#   bash bench/gpu_multi_train_session.sh 7b 4       # Qwen2.5-7B's architecture (random weights) on 4 GPUs
#   bash bench/gpu_multi_train_session.sh layout 4   # trainer on GPUs 0-2 (--nproc 3) + bin/eval on GPU 3
# scale: bench/train_end_to_end.py at the same work per GPU as one GPU at the default config (batch_size
# 40, gradient_accumulation_steps 2 per GPU: 2 micro-batches of <= 12288 tokens on each); it reports
# tokens/s per GPU and MFU per GPU (steady state and end to end); peak memory per GPU is sampled by
# nvidia-smi every 0.5 s. Needs (carried, git-ignored) .dev/bench/{math_train.jsonl,qwen_tok/}; logs to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD WANDB_MODE=offline
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
CASE=${1:-scale}; N=${2:-2}; STEPS=${STEPS:-60}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
DATA=.dev/bench/math_train.jsonl
sample_memory() {  # peak memory.used per GPU while the command runs: $OUT/<name>_memory.csv
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/$1_memory.csv" &
  SAMPLER=$!
}
report_memory() {
  kill $SAMPLER 2>/dev/null; wait $SAMPLER 2>/dev/null
  awk -F', ' '{ if ($2 > peak[$1]) peak[$1] = $2 } END { for (g in peak) printf "GPU %s peak %.1f GiB\n", g, peak[g] / 1024 }' \
    "$OUT/$1_memory.csv" | sort | tee "$OUT/$1_peak_memory.txt"
}
case "$CASE" in
scale|7b)
  MODEL=/tmp/rq; PARAMS=1.544e9; ARCH=1.5b
  if [ "$CASE" = 7b ]; then MODEL=/tmp/r7b; PARAMS=7.616e9; ARCH=7b; fi
  [ -f $MODEL/config.json ] || python3 bench/make_random_model.py $MODEL --arch $ARCH --tokenizer .dev/bench/qwen_tok \
    --device cuda 2>&1 | tail -1
  rm -rf /tmp/e2e_$CASE$N; mkdir -p /tmp/e2e_$CASE$N
  sample_memory $CASE$N
  timeout ${E2E_TIMEOUT:-480} python3 bench/train_end_to_end.py --model $MODEL --data $DATA --nproc $N --params $PARAMS \
    --steps $STEPS --workdir /tmp/e2e_$CASE$N --json $OUT/train_$CASE${N}.json \
    training.gradient_accumulation_steps=$((2 * N)) training.save_resume_every=$STEPS 2>&1 \
    | grep -v "Loading weights" | tee $OUT/train_$CASE$N.log
  report_memory $CASE$N
  grep -v "Loading weights" /tmp/e2e_$CASE$N/bin_train.stderr | cut -c1-300 | tail -40 > $OUT/bin_train_$CASE$N.stderr ;;
layout)  # N GPUs: the trainer on the first N-1 (FSDP2), one eval daemon on the last; eval lag per checkpoint
  [ -f /tmp/rq/config.json ] || python3 bench/make_random_model.py /tmp/rq --tokenizer .dev/bench/qwen_tok --device cuda 2>&1 | tail -1
  rm -rf /tmp/layout; mkdir -p /tmp/layout
  sample_memory layout$N
  LAST=$((N - 1)); TRAIN_GPUS=$(seq -s, 0 $((N - 2)))
  CUDA_VISIBLE_DEVICES=$LAST timeout 540 python3 -m eval_daemon --config config/sft_config.yaml paths.results_dir=/tmp/layout \
    evaluation.device=cuda:0 logging.wandb=false > $OUT/layout_eval.stderr 2>&1 &
  EVAL=$!
  CUDA_VISIBLE_DEVICES=$TRAIN_GPUS timeout 480 python3 -m train_daemon --nproc $((N - 1)) --config config/sft_config.yaml \
    model.name_or_path=/tmp/rq data.train_source=$DATA paths.results_dir=/tmp/layout training.run_id=layout \
    training.max_steps=$STEPS training.gradient_accumulation_steps=$((2 * (N - 1))) logging.wandb=false \
    logging.progress_bar=false > $OUT/layout_train.stderr 2>&1; echo "bin/train exit $?"
  sleep 60; kill -TERM $EVAL; wait $EVAL
  report_memory layout$N
  cp /tmp/layout/runs/layout/train_log.jsonl $OUT/layout_train_log.jsonl
  python3 - <<'PY' | tee $OUT/layout_lag.txt   # eval lag per checkpoint: marker finished_at - manifest published_at
import json
from datetime import datetime
from pathlib import Path
run = Path("/tmp/layout/checkpoints/layout")
done = {}
for path in (run / "evaluated").glob("*.done"):
    marker = json.loads(path.read_text())
    done.setdefault(marker["step"], []).append(marker.get("finished_at", ""))
for entry in json.loads((run / "manifest.json").read_text())["checkpoints"]:
    finished = [datetime.fromisoformat(t) for t in done.get(entry["step"], []) if t]
    lag = (min(finished) - datetime.fromisoformat(entry["published_at"])).total_seconds() if finished else None
    print(f"step {entry['step']}: eval lag {lag if lag is None else round(lag, 1)} s")
PY
  tail -5 $OUT/layout_train.stderr $OUT/layout_eval.stderr ;;
*) echo "usage: $0 scale|7b|layout N"; exit 2 ;;
esac
