#!/usr/bin/env bash
# Iterative-SPO (Vision-Zero, Algorithm 1): alternate the decision stage (rlvr.py) and the clue
# stage (spo.py) on one run folder until ITERATIONS are done, then evaluate against the initial
# model on held-out games, ask both models questions about held-out pictures (vqa.py) and write
# the HTML report.
#
#   bash run.sh                                   # GPU: Qwen2.5-VL-7B + LoRA on CLEVR; CPU: tiny demo
#   OUT=runs/a ITERATIONS=200 bash run.sh         # continue the same run to 200 iterations
#   MODEL=/path/to/model DATA=games/chart DOMAIN=chart bash run.sh
#   SCHEDULE=decision OUT=runs/rlvr-only bash run.sh    # ablations: decision | clue | alternate
#   GPU_SETTINGS=1 MODEL=vlm-7b-shape bash run.sh  # the GPU settings with no GPU (the CPU check of them)
#   EVAL_GAMES=0 bash run.sh                      # train only: no evaluation, no report
#   GPUS=8 bash run.sh                            # one node, 8 processes via torchrun (docs/multi-gpu.md)
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

if [ "${GPU_SETTINGS:-0}" = 1 ] || python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
  DOMAIN=${DOMAIN:-clevr}
  DATA=${DATA:-games/$DOMAIN}
  PAIRS=${PAIRS:-2000}
  OUT=${OUT:-runs/$DOMAIN-qwen7b}
  ITERATIONS=${ITERATIONS:-100}
  GAMES=${GAMES:-16}
  EVAL_GAMES=${EVAL_GAMES:-100}
  VQA_TOKENS=${VQA_TOKENS:-64}
  SETTINGS=(--lora-rank "${LORA_RANK:-64}" --gradient-checkpointing --micro-batch "${MICRO_BATCH:-4}" --dtype bfloat16)
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
  VQA_TOKENS=${VQA_TOKENS:-16}
  # short turns and quick switches, so that a few minutes visit both stages
  SETTINGS=(--lora-rank "${LORA_RANK:-0}" --max-new-tokens 24 --samples 4 --k-min 2 --patience 3 --lr 1e-4)
  if [ "$MODEL" = tiny-vlm ] && [ ! -f tiny-vlm/config.json ]; then
    python3 make_tiny_model.py --out tiny-vlm
  fi
fi
SCHEDULE=${SCHEDULE:-iterative}
GPUS=${GPUS:-1}  # processes on this node: data parallel over torchrun (DDP for LoRA, FSDP2 for --lora-rank 0)
if [ "$GPUS" -gt 1 ]; then LAUNCH=(torchrun --standalone --nproc_per_node "$GPUS"); else LAUNCH=(python3); fi

if [ ! -s "$DATA/pairs.jsonl" ]; then  # -s: an empty pairs.jsonl (no pair made) is no data
  echo "Making $PAIRS $DOMAIN pairs in $DATA"
  python3 make_games.py --domain "$DOMAIN" --n "$PAIRS" --out "$DATA"
fi

ARGS=(--model "$MODEL" --data "$DATA" --out "$OUT" --iterations "$ITERATIONS" --games "$GAMES"
      --schedule "$SCHEDULE" "${SETTINGS[@]}" "${DOMAIN_FLAG[@]}")
# shellcheck disable=SC2206  # EXTRA is meant to split into flags
ARGS+=(${EXTRA:-})

progress() {  # "iteration stage" of the checkpoint the stage scripts will resume from, or "0 start"
  python3 -c 'import sys, trainer; print(trainer.progress(sys.argv[1]))' "$OUT"
}

while true; do
  now=$(progress)  # a run folder with no usable checkpoint stops here, with the one-line error
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
python3 evaluate.py --out "$OUT" --games "$EVAL_GAMES"  # one process, whatever GPUS is
python3 vqa.py --data "$DATA" --out "$OUT" --max-new-tokens "$VQA_TOKENS"
python3 report.py "$OUT"
echo "Done: open $OUT/report.html; $OUT also holds metrics.jsonl, games/, eval.json, vqa.json and the latest checkpoint (ckpt-*)."
