#!/usr/bin/env bash
# Iterative-SPO (Vision-Zero, Algorithm 1): alternate the decision stage (rlvr.py) and the clue
# stage (spo.py) on one run folder until ITERATIONS are done, then evaluate against the initial
# model on held-out games, ask both models questions about held-out pictures (vqa.py) and write
# the HTML report.
#
#   bash run.sh                                   # GPU: Qwen2.5-VL-7B + LoRA on CLEVR
#                                                 # CPU: a warm-started tiny model, blank-spy game (docs/learn_cpu.md)
#   QUICK=1 bash run.sh                           # CPU: a 1-minute demo of the loop, nothing learns
#   OUT=runs/a ITERATIONS=200 bash run.sh         # continue the same run to 200 iterations
#   MODEL=/path/to/model DATA=games/chart DOMAIN=chart bash run.sh
#   SCHEDULE=decision OUT=runs/rlvr-only bash run.sh    # ablations: decision | clue | alternate
#   GPU_SETTINGS=1 MODEL=vlm-7b-shape bash run.sh  # the GPU settings with no GPU (the CPU check of them)
#   EVAL_GAMES=0 bash run.sh                      # train only: no evaluation, no report
#   GPUS=8 bash run.sh                            # one node, 8 processes via torchrun (docs/multi-gpu.md)
#   PYTHON=.venv/bin/python bash run.sh           # a Python other than python3 on PATH
#   REPORT_TO=tensorboard bash run.sh             # also log to tensorboard, wandb or trackio (tracking.py)
#
# Each stage script trains until the switching rule (trainer.py) hands over, saves everything
# (weights or adapter, optimiser, iteration, stage, EMAs, RAE baselines) in OUT and exits; this
# loop starts the other one. Rerunning on the same OUT resumes after the last completed iteration.
# Any further flag of trainer.py goes in EXTRA, e.g. EXTRA="--decision civilians --spy-image blank".
set -euo pipefail
cd "$(dirname "$0")"
# a DOMAIN given by the user also sets the game rules (--domain), e.g. for a released CLEVR
# folder without pairs.jsonl; otherwise each pair keeps the domain make_games.py wrote for it
DOMAIN_FLAG=()
if [ -n "${DOMAIN:-}" ]; then DOMAIN_FLAG=(--domain "$DOMAIN"); fi

PYTHON=${PYTHON:-python3}
WARM_FROM=""  # a random tiny model to warm-start into MODEL first (CPU default, once)

if [ "${GPU_SETTINGS:-0}" = 1 ] || "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
  DOMAIN=${DOMAIN:-clevr}
  DATA=${DATA:-games/$DOMAIN}
  PAIRS=${PAIRS:-2000}
  OUT=${OUT:-runs/$DOMAIN-qwen7b}
  ITERATIONS=${ITERATIONS:-100}
  GAMES=${GAMES:-16}
  EVAL_GAMES=${EVAL_GAMES:-100}
  # no --lr: trainer.py's default, 1e-4 for LoRA (about 10x the full fine-tuning rate, as LoRA
  # studies find) and the paper's 1e-5 with LORA_RANK=0 (full fine-tuning); EXTRA="--lr X" overrides
  VQA_TOKENS=${VQA_TOKENS:-64}
  SETTINGS=(--lora-rank "${LORA_RANK:-64}" --gradient-checkpointing --micro-batch "${MICRO_BATCH:-4}" --dtype bfloat16)
elif [ -n "${QUICK:-}" ]; then
  echo "No CUDA GPU, QUICK=1: a one-minute demo of the mechanics (a tiny random-weight Qwen2.5-VL, short games)."
  echo "It shows the whole Iterative-SPO loop turning, not a model learning: for that, drop QUICK=1."
  # one thread: a model this small runs no faster on two, and more threads than free cores slow torch many times
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  MODEL=${MODEL:-tiny-vlm}
  DOMAIN=${DOMAIN:-cells}  # coloured squares: made in a moment, where CLEVR scenes take a second each
  DATA=${DATA:-games/$DOMAIN-demo}
  PAIRS=${PAIRS:-60}
  OUT=${OUT:-runs/cpu-demo}
  ITERATIONS=${ITERATIONS:-4}
  GAMES=${GAMES:-4}
  EVAL_GAMES=${EVAL_GAMES:-4}
  # short turns and quick switches, so that four iterations visit both stages
  SETTINGS=(--lora-rank "${LORA_RANK:-0}" --rounds 1 --max-new-tokens 16 --samples 4 --k-min 2 --patience 2 --lr 1e-4)
  if [ "$MODEL" = tiny-vlm ] && [ ! -f tiny-vlm/config.json ]; then
    "$PYTHON" make_tiny_model.py --out tiny-vlm
  fi
else
  if [ -z "${MODEL:-}" ]; then
    echo "No CUDA GPU: Iterative-SPO on the CPU in the blank-spy game (docs/learn_cpu.md), by default a 1.6M-parameter"
    echo "Qwen2.5-VL warm-started once: about 12 minutes of one core. QUICK=1 bash run.sh is a 1-minute demo of the loop."
  fi
  # one thread: faster than two for a model this small, and the same arithmetic on every machine,
  # so that the default run retraces test_learning.py's measured one
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # a 2.1M-parameter Qwen2.5-VL, warm-started once (formats only, no spy labels: warm_start.py) and cached
  MODEL=${MODEL:-runs/cpu-start/warm-start}
  DOMAIN=${DOMAIN:-cells}
  DATA=${DATA:-games/cells-300}
  PAIRS=${PAIRS:-300}
  OUT=${OUT:-runs/cpu-learn}
  ITERATIONS=${ITERATIONS:-25}
  GAMES=${GAMES:-16}
  EVAL_GAMES=${EVAL_GAMES:-200}
  # the set-up test_learning.py checks (docs/learn_cpu.md): one clue round of 8-token turns, the
  # spy sees an empty picture, 8 judge samples, LoRA 16, 8 optimiser steps of 2 games at lr 1e-3,
  # the paper's KL and K_min; patience 20 so that the run is test_learning.py's 20 decision iterations, then clue
  SETTINGS=(--lora-rank "${LORA_RANK:-16}" --rounds 1 --max-new-tokens 8 --samples 8 --spy-image blank
            --lr 1e-3 --minibatches 8 --kl 0.04 --micro-batch 32 --k-min 5 --patience 20)
  if [ "$MODEL" = runs/cpu-start/warm-start ] && [ ! -f "$MODEL/config.json" ]; then
    WARM_FROM=runs/cpu-start/tiny-vlm
    [ -f "$WARM_FROM/config.json" ] || "$PYTHON" make_tiny_model.py --out "$WARM_FROM" --hidden 192 --layers 3 \
      --heads 4 --vision-hidden 32 --vision-depth 2 --vocab-size 640 --min-pixels 784 --max-pixels 3136
  fi
fi
SCHEDULE=${SCHEDULE:-iterative}
VQA_TOKENS=${VQA_TOKENS:-16}  # longest answer of vqa.py (the GPU branch allows 64)
GPUS=${GPUS:-1}  # processes on this node: data parallel over torchrun (DDP for LoRA, FSDP2 for --lora-rank 0)
if [ "$GPUS" -gt 1 ]; then LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS"); else LAUNCH=("$PYTHON"); fi

progress() {  # "iteration stage" of the checkpoint the stage scripts will resume from, or "0 start"
  "$PYTHON" -c 'import sys, checkpoints; print(checkpoints.progress(sys.argv[1]))' "$OUT"
}
# an OUT holding files no run wrote, or a run of another MODEL or DATA, is refused before anything
# is written (and where the run stands is read in the same process: each one costs a torch import)
now=$("$PYTHON" -c 'import sys, checkpoints; checkpoints.check_run_folder(*sys.argv[1:]); print(checkpoints.progress(sys.argv[1]))' \
      "$OUT" "$MODEL" "$DATA")

if [ ! -s "$DATA/pairs.jsonl" ]; then  # -s: an empty pairs.jsonl (no pair made) is no data
  echo "Making $PAIRS $DOMAIN pairs in $DATA"
  "$PYTHON" make_games.py --domain "$DOMAIN" --n "$PAIRS" --out "$DATA"
fi
if [ -n "$WARM_FROM" ]; then  # a few minutes, once: the clue and vote formats from the generator's labels
  "$PYTHON" warm_start.py --model "$WARM_FROM" --data "$DATA" --out "$MODEL" --steps 400 --warmup 30 \
    --mix 0,0.5,0.5,0,0 --list-steps 0 --rounds 1 --spy-image blank --threads "$OMP_NUM_THREADS"
fi

ARGS=(--model "$MODEL" --data "$DATA" --out "$OUT" --iterations "$ITERATIONS" --games "$GAMES"
      --schedule "$SCHEDULE" --report-to "${REPORT_TO:-none}" "${SETTINGS[@]}" "${DOMAIN_FLAG[@]}")
# shellcheck disable=SC2206  # EXTRA is meant to split into flags
ARGS+=(${EXTRA:-})

while true; do  # `now` is where the run stands: a folder with no usable checkpoint stopped above, with the one-line error
  read -r done_iterations stage <<< "$now"
  [ "$done_iterations" -ge "$ITERATIONS" ] && break
  if [ "$stage" = start ]; then
    stage=$([ "$SCHEDULE" = clue ] && echo clue || echo decision)
  fi
  if [ "$stage" = decision ]; then "${LAUNCH[@]}" rlvr.py "${ARGS[@]}"; else "${LAUNCH[@]}" spo.py "${ARGS[@]}"; fi
  now=$(progress)
  read -r after _ <<< "$now"
  if [ "$after" -le "$done_iterations" ]; then
    echo "run.sh: the $stage stage made no progress in $OUT; see its output above" >&2
    exit 1
  fi
done

if [ "$EVAL_GAMES" = 0 ]; then
  echo "Done: trained $OUT (EVAL_GAMES=0: no evaluation, no report); metrics in $OUT/metrics.jsonl."
  exit 0
fi
"$PYTHON" evaluate.py --out "$OUT" --games "$EVAL_GAMES"  # one process, whatever GPUS is
"$PYTHON" vqa.py --data "$DATA" --out "$OUT" --max-new-tokens "$VQA_TOKENS"
"$PYTHON" report.py "$OUT"  # ends with the headline: what training changed, against chance
echo "Done: open $OUT/report.html; $OUT also holds metrics.jsonl, games/, eval.json, vqa.json and the latest checkpoint (ckpt-*)."
