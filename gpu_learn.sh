#!/usr/bin/env bash
# gpu_learn.sh: the edited-picture cells game of docs/learn_cpu.md (GAME=modified learn_cpu.sh) at
# GPU batch sizes. On the CPU that game did not learn in 100 iterations of 16 games: a judge
# trained even with spy labels needed more games than a CPU run can play. Here every iteration
# plays GAMES=128 games (8x the CPU's; 1,024 judge samples), the warm start trains on the GPU, and
# the same Iterative-SPO loop runs (run.sh through learn_cpu.sh; fp32, since the tiny model is
# launch-bound and bf16 would only add rounding), then evaluate.py and report.py.
# Sized for about 5 minutes on one H100/H200 from the cost model's launch-bound estimates (not yet
# timed on a GPU): warm start ~1.5 min, ~6-8 s per iteration, 30 iterations, 400 held-out games.
#
#   bash gpu_learn.sh                                # results in runs/gpu-learn/results.md
#   GAMES=256 ITERATIONS=60 bash gpu_learn.sh        # more; every size is a variable of learn_cpu.sh
#
# Without a GPU it runs on the CPU (test_gpu_scripts.py runs it so, at a reduced size).
set -euo pipefail
cd "$(dirname "$0")"
if python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  WARM_DEVICE=${WARM_DEVICE:-cuda}
else
  echo "No CUDA GPU: the GPU learning run on the CPU (slow unless the sizes are reduced)."
  WARM_DEVICE=${WARM_DEVICE:-cpu}
fi
GAME=modified OUT=${OUT:-runs/gpu-learn} GAMES=${GAMES:-128} ITERATIONS=${ITERATIONS:-30} \
  EVAL_GAMES=${EVAL_GAMES:-400} SEEDS=${SEEDS:-0} SCHEDULES=${SCHEDULES-iterative} WARM_DEVICE="$WARM_DEVICE" \
  RL_EXTRA="--dtype float32 ${RL_EXTRA:-}" bash learn_cpu.sh
