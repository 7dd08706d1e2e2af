#!/usr/bin/env bash
# Iterative-SPO (Vision-Zero, Algorithm 1): alternate the decision stage (rlvr.py) and the clue
# stage (spo.py) on one run folder until ITERATIONS are done, then evaluate against the initial
# model on held-out games and write the HTML report.
#
#   bash run.sh                                   # GPU: Qwen2.5-VL-7B + LoRA on CLEVR; CPU: tiny demo
#   OUT=runs/a ITERATIONS=200 bash run.sh         # continue the same run to 200 iterations
#   MODEL=/path/to/model DATA=games/chart DOMAIN=chart bash run.sh
#   SCHEDULE=decision OUT=runs/rlvr-only bash run.sh    # ablations: decision | clue | alternate
#
# Each stage script trains until the switching rule (trainer.py) hands over, saves everything
# (weights or adapter, optimiser, iteration, stage, EMAs, RAE baselines) in OUT and exits; this
# loop starts the other one. Rerunning on the same OUT resumes after the last completed iteration.
# Any further flag of trainer.py goes in EXTRA, e.g. EXTRA="--decision civilians --spy-image blank".
set -euo pipefail
cd "$(dirname "$0")"

if python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
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
  SETTINGS=(--lora-rank "${LORA_RANK:-64}" --gradient-checkpointing --micro-batch "${MICRO_BATCH:-4}")
else
  echo "No CUDA GPU: this is a CPU demo of the mechanics (a tiny random-weight Qwen2.5-VL, short"
  echo "games). It shows the whole Iterative-SPO loop running, not a model learning."
  MODEL=${MODEL:-tiny-vlm}
  DOMAIN=${DOMAIN:-clevr}
  DATA=${DATA:-games/$DOMAIN-demo}
  PAIRS=${PAIRS:-60}
  OUT=${OUT:-runs/cpu-demo}
  ITERATIONS=${ITERATIONS:-12}
  GAMES=${GAMES:-4}
  EVAL_GAMES=${EVAL_GAMES:-8}
  # short turns and quick switches, so that a few minutes visit both stages
  SETTINGS=(--lora-rank "${LORA_RANK:-0}" --max-new-tokens 24 --samples 4 --k-min 2 --patience 3 --lr 1e-4)
  if [ "$MODEL" = tiny-vlm ] && [ ! -f tiny-vlm/config.json ]; then
    python3 make_tiny_model.py --out tiny-vlm
  fi
fi
SCHEDULE=${SCHEDULE:-iterative}

if [ ! -f "$DATA/pairs.jsonl" ]; then
  echo "Making $PAIRS $DOMAIN pairs in $DATA"
  python3 make_games.py --domain "$DOMAIN" --n "$PAIRS" --out "$DATA"
fi

ARGS=(--model "$MODEL" --data "$DATA" --out "$OUT" --iterations "$ITERATIONS" --games "$GAMES"
      --schedule "$SCHEDULE" "${SETTINGS[@]}")
# shellcheck disable=SC2206  # EXTRA is meant to split into flags
ARGS+=(${EXTRA:-})

progress() {  # "iteration stage" of the run's latest checkpoint, or "0 start"
  python3 -c '
import json, os, sys
out = sys.argv[1]
try:
    with open(os.path.join(out, "latest")) as f:
        state = json.load(open(os.path.join(out, f.read().strip(), "state.json")))
    print(state["iteration"], state["stage"])
except FileNotFoundError:
    print(0, "start")' "$OUT"
}

while true; do
  read -r done_iterations stage < <(progress)
  [ "$done_iterations" -ge "$ITERATIONS" ] && break
  if [ "$stage" = start ]; then
    stage=$([ "$SCHEDULE" = clue ] && echo clue || echo decision)
  fi
  if [ "$stage" = decision ]; then python3 rlvr.py "${ARGS[@]}"; else python3 spo.py "${ARGS[@]}"; fi
  read -r after _ < <(progress)
  if [ "$after" -le "$done_iterations" ]; then
    echo "run.sh: the $stage stage made no progress in $OUT; see its output above" >&2
    exit 1
  fi
done

python3 evaluate.py --out "$OUT" --games "$EVAL_GAMES"
python3 report.py "$OUT"
echo "Done: open $OUT/report.html; $OUT also holds metrics.jsonl, games/, eval.json and the latest checkpoint (ckpt-*)."
