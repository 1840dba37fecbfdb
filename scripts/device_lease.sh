#!/usr/bin/env bash
# One short GPU lease, unattended (about 10 minutes of one GPU, start to finish):
#
#   1. the CUDA benchmarks, alone on the GPU: benchmarks/train_speed.py (ProtoNet episodes/s,
#      vectorised vs per-task-loop MAML), benchmarks/label_speed.py --cuda-only and, when the
#      GTSRB dev set is in $FEWSHOT_DATA, benchmarks/finetune.py --device cuda;
#   2. the six Omniglot trainings of `scripts/train_checkpoints.py --budget gpu` (shipped
#      omniglot-* and the papers' protocol paper-*) at the same time on the one GPU, each
#      stopped by its time limit, then their evaluations, until the deadline;
#   3. the results packed into $OUT/results.tar.gz (best checkpoints with their recorded
#      evaluations, metrics, command log, logs; ~5 MB); benchmark output in $OUT/*.txt.
#      Unpack it in the repository root (runs/bundled-gpu/), copy
#      runs/bundled-gpu/installed/*.safetensors (the omniglot-* checkpoints with the lease's
#      evaluations) into checkpoints/, then `scripts/train_checkpoints.py --budget gpu`
#      reuses the trainings and runs only the evaluations still missing, and writes the card.
#
# Run from the repository root with python3 holding torch (CUDA), numpy, pillow, safetensors,
# onnx and onnxruntime. Wheels in .whl/ (e.g. platformdirs) are installed to /tmp/site first.
# Settings (environment): FEWSHOT_DATA (folder with omniglot/; default .devdata),
# TRAIN_S (seconds per training, default the script's LEASE_TRAIN_S), DEADLINE (seconds
# after the start when whatever still runs is stopped and the results are packed; default
# 555), BENCH=0 (skip the benchmarks), STEPS (default: the six trainings), QUICK=1 (smoke
# settings for the benchmarks), OUT (default /tmp/lease-out).
set -u
T0=$(date +%s)
DEADLINE=${DEADLINE:-555}
OUT=${OUT:-/tmp/lease-out}
STEPS=${STEPS:-"omniglot-relation paper-relation omniglot-maml paper-maml omniglot-protonet paper-protonet"}
RUNS=runs/bundled-gpu
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export FEWSHOT_DATA=${FEWSHOT_DATA:-$PWD/.devdata}
PY=${PY:-python3}
since() { echo $(( $(date +%s) - T0 )); }

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [ "${BENCH:-1}" = 1 ]; then
  q=(); [ "${QUICK:-0}" = 1 ] && q=(--quick)
  echo "== [$(since) s] benchmarks/train_speed.py"
  timeout 120 $PY benchmarks/train_speed.py --device auto --proto-steps 200 --maml-steps 5 \
    --warmup 3 "${q[@]}" 2>&1 | tee "$OUT/train_speed.txt"
  echo "== [$(since) s] benchmarks/label_speed.py --cuda-only"
  timeout 60 $PY benchmarks/label_speed.py --cuda-only --n 1000 "${q[@]}" 2>&1 \
    | tee "$OUT/label_speed_cuda.txt"
  # issue 17's GPU budget: 5-way 5-shot test-time fine-tuning <= 2 s (copy the dev set
  # gtsrb/gtsrb_subset.zip into $FEWSHOT_DATA first; the features are embedded there once)
  if [ -f "$FEWSHOT_DATA/gtsrb/gtsrb_subset.zip" ]; then
    echo "== [$(since) s] benchmarks/finetune.py --device cuda"
    FEWSHOT_DEV_DATA=$FEWSHOT_DATA timeout 150 $PY benchmarks/finetune.py --datasets gtsrb \
      --episodes 5 --device cuda 2>&1 | tee "$OUT/finetune_cuda.txt"
  fi
fi

echo "== [$(since) s] trainings: $STEPS"
limit=(); [ -n "${TRAIN_S:-}" ] && limit=(--time-limit "$TRAIN_S")
pids=()
for s in $STEPS; do
  setsid $PY scripts/train_checkpoints.py --budget gpu --steps "$s" "${limit[@]}" \
    --checkpoints "$RUNS/installed" >"$RUNS/step_$s.log" 2>&1 &
  pids+=($!)
done
running() { local n=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done; echo $n; }
while [ "$(running)" -gt 0 ] && [ "$(since)" -lt "$DEADLINE" ]; do
  sleep 5
  if [ $(( $(since) % 30 )) -lt 5 ]; then
    echo "-- [$(since) s] $(running) running"
    for s in $STEPS; do
      m=$RUNS/$s/metrics.csv
      [ -f "$m" ] && echo "   $s: $(tail -n 1 "$m")"
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  fi
done
for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null; done
sleep 2
echo "== [$(since) s] stopped; step logs (tails):"
for s in $STEPS; do echo "--- $s"; tail -n 4 "$RUNS/step_$s.log"; done
# what comes back from a lease is at most 16 MB a file: the best checkpoints, logs and
# results, without the resume states and last checkpoints (18 MB with them)
tar czf "$OUT/results.tar.gz" --exclude='*.lock' --exclude='.*.tmp' \
  --exclude='resume.safetensors' --exclude='last.safetensors' "$RUNS"
ls -la "$OUT"
echo "== [$(since) s] done"
