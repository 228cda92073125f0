#!/usr/bin/env bash
# One-GPU A/B of bin/train: this checkout's trainer against an older one, same random Qwen2.5-Math-1.5B,
# same data, 30 steps each, new then old (median tokens/s of steps 4-30, losses, exit codes).
# Prepare here:  mkdir -p .dev/old && git archive <old commit> train_daemon | tar -x -C .dev/old
# then a device call carrying .dev/bench and .dev/old:  bash bench/gpu_train_ab.sh
# The 64 GiB card disk holds two runs' resume states (18.5 GB each) and checkpoints only just: results are removed after each run.
set -u
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PYTHONPATH=$PWD python3 bench/make_random_model.py /tmp/rq --tokenizer .dev/bench/qwen_tok --device cuda 2>&1 | tail -1
run() {  # name pythonpath
  rm -rf /tmp/results_$1
  PYTHONPATH=$2 timeout 150 python3 -m train_daemon --config config/sft_config.yaml model.name_or_path=/tmp/rq \
    data.train_source=.dev/bench/math_train.jsonl paths.results_dir=/tmp/results_$1 training.run_id=gpu \
    training.max_steps=30 training.eval_every=15 training.save_resume_every=15 training.warmup_steps=5 \
    logging.wandb=false logging.progress_bar=false > $OUT/train_$1.err 2>&1
  echo "$1: exit $?"; grep -v "Loading weights" $OUT/train_$1.err | tail -2 | cut -c1-200
  python3 - $1 <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(f"/tmp/results_{sys.argv[1]}/runs/gpu/train_log.jsonl")]
tps = [r["train/tokens_per_second"] for r in rows if r["train_step"] > 3]
print(sys.argv[1], "steps", rows[-1]["train_step"], "median tokens/s (steps>3)", round(statistics.median(tps)),
      "loss", [round(r["train/loss"], 4) for r in rows][:3], "...", round(rows[-1]["train/loss"], 4))
PY
  ls /tmp/results_$1/checkpoints/gpu/; rm -rf /tmp/results_$1
}
run new $PWD
run old $PWD/.dev/old:$PWD

