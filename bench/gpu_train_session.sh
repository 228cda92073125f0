#!/usr/bin/env bash
# The training benchmarks of docs/PERFORMANCE.md in one device call (one GPU, ~8 min):
#   bash bench/gpu_train_session.sh throughput    # bench/train_throughput.py, all variants
#   bash bench/gpu_train_session.sh publish       # bench/publish_stall.py + a short bin/train run
#   bash bench/gpu_train_session.sh e2e           # the GPU snapshot test + bench/train_end_to_end.py (300 steps)
#   bash bench/gpu_train_session.sh peers         # side by side: plain HF, mathsft, TRL SFTTrainer padding-free + Liger
#                                                 # (TRL, liger-kernel, datasets, dill, multiprocess wheels carried in .dev/whl/)
# Needs (carried, git-ignored) .dev/bench/{math_train.jsonl,qwen_tok/}; logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD WANDB_MODE=offline
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -f /tmp/rq/config.json ] || python3 bench/make_random_model.py /tmp/rq --tokenizer .dev/bench/qwen_tok --device cuda 2>&1 | tail -1
DATA=.dev/bench/math_train.jsonl
case "${1:-throughput}" in
throughput)
  V="plain,default"
  V="$V,cap16k=training.max_tokens_per_micro_batch=16384"
  V="$V,cap8k=training.max_tokens_per_micro_batch=8192"
  V="$V,nocompile=training.compile=false"
  V="$V,sdpa=model.attn_implementation=sdpa"
  V="$V,gc=training.gradient_checkpointing=true"
  timeout 560 python3 bench/train_throughput.py --model /tmp/rq --data $DATA --plain-micro-batch 4 --variants "$V" \
    --steps ${STEPS:-5} --warmup 2 --max-seconds 470 --json $OUT/train_throughput.json 2>&1 \
    | grep -v "Loading weights" | tee $OUT/train_throughput.log ;;
publish)
  timeout 200 python3 bench/publish_stall.py --model /tmp/rq --data $DATA --workdir /tmp/publish_stall 2>&1 \
    | grep -v "Loading weights\|Writing model" | tee $OUT/publish_stall.log
  rm -rf /tmp/publish_stall /tmp/results
  timeout 300 python3 -m train_daemon --config config/sft_config.yaml model.name_or_path=/tmp/rq \
    data.train_source=$DATA paths.results_dir=/tmp/results training.run_id=gpu training.max_steps=15 \
    training.eval_every=5 training.save_resume_every=10 training.warmup_steps=5 logging.wandb=false \
    logging.progress_bar=false > $OUT/bin_train.stderr 2>&1; echo "bin/train exit $?"
  grep -v "Loading weights" $OUT/bin_train.stderr | cut -c1-220 | tail -25
  cp /tmp/results/runs/gpu/train_log.jsonl $OUT/bin_train_log.jsonl
  python3 - <<'PY'
import json, os
rows = [json.loads(l) for l in open(os.environ["OUT"] + "/bin_train_log.jsonl")]
for r in rows:
    print(r["train_step"], f"loss {r['train/loss']:.4f}", f"tok/s {r['train/tokens_per_second']:.0f}",
          f"mem {r.get('train_gpu/memory_used', float('nan')):.1f} GiB", f"util {r.get('train_gpu/utilization', float('nan'))}")
steady = [r["train/tokens_per_second"] for r in rows[3:]]
print(f"bin/train steps 4-{len(rows)}: mean {sum(steady)/len(steady):.0f} tokens/s = "
      f"{6*1.544e9*sum(steady)/len(steady)/989e12:.1%} MFU; max memory_used {max(r.get('train_gpu/memory_used', 0) for r in rows):.1f} GiB")
PY
  cat /tmp/results/checkpoints/gpu/manifest.json | head -c 600; echo
  ls -la /tmp/results/checkpoints/gpu/ ;;
e2e)
  df -h /tmp | tail -1; free -g | head -2
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_train_resume.py -k gpu 2>&1 | tail -3
  rm -rf /tmp/e2e; mkdir -p /tmp/e2e
  TORCH_LOGS=recompiles timeout ${E2E_TIMEOUT:-420} python3 bench/train_end_to_end.py --model /tmp/rq --data $DATA \
    --steps ${STEPS:-300} --workdir /tmp/e2e --json $OUT/train_end_to_end.json 2>&1 | tee $OUT/train_end_to_end.log
  grep -v "Loading weights" /tmp/e2e/bin_train.stderr | cut -c1-300 > $OUT/bin_train.stderr; df -h /tmp | tail -1
  grep -c "Recompiling" /tmp/e2e/bin_train.stderr
  if [ -n "${WARM_STEPS:-}" ]; then  # a second run on the same machine: the compile caches are warm
    rm -rf /tmp/e2e; mkdir -p /tmp/e2e
    timeout 150 python3 bench/train_end_to_end.py --model /tmp/rq --data $DATA --steps $WARM_STEPS --workdir /tmp/e2e \
      --json $OUT/train_end_to_end_warm.json 2>&1 | grep "loop_\|steady\|process_\|step 1\"" | tee $OUT/warm.log
  fi ;;
diag)
  rm -rf /tmp/e2e; mkdir -p /tmp/e2e
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,pinned_use_cuda_host_register:True,pinned_num_register_threads:8 \
  TORCH_LOGS=recompiles timeout 240 python3 bench/train_end_to_end.py --model /tmp/rq --data $DATA --steps ${STEPS:-16} \
    --workdir /tmp/e2e training.eval_every=8 training.save_resume_every=8 > $OUT/diag.log 2>&1; echo "exit $?"
  grep -v "Loading weights" /tmp/e2e/bin_train.stderr | cut -c1-600 > $OUT/diag_bin_train.stderr
  grep -i "recompil\|pinned\|guard\|triggered" $OUT/diag_bin_train.stderr | cut -c1-500 | head -30
  python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/e2e/results/runs/e2e/train_log.jsonl")]
prev = 0
for r in rows:
    n = r["train/tokens_seen"] - prev; prev = r["train/tokens_seen"]
    print(r["train_step"], f"{n / r['train/tokens_per_second']:.2f} s", end="; ")
print()
PY
  ;;
peers)
  timeout 300 python3 bench/train_throughput.py --model /tmp/rq --data $DATA --plain-micro-batch 4 --variants plain,default \
    --steps ${STEPS:-5} --warmup 2 --json $OUT/train_throughput.json 2>&1 | grep -v "Loading weights" | tee $OUT/train_throughput.log
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev/whl/*.whl 2>&1 | tail -2
  PYTHONPATH=/tmp/site timeout 240 python3 .dev/peers/trl_sft.py /tmp/rq $DATA config/r1_zero.prompt \
    padding_free,liger ${TRL_STEPS:-8} 2>&1 | grep -v "Loading weights\|it/s\]" | tail -15 | tee $OUT/trl.log ;;
esac
