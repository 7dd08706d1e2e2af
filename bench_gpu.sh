#!/usr/bin/env bash
# bench_gpu.sh: time and memory of run.sh's GPU settings at Qwen2.5-VL-7B's full shape, with
# nothing to download. It builds a random-weight model of the 7B's shape with the project's
# builder (make_tiny_model.py --shape 7b: 7.2B parameters, bfloat16; SHAPE=qwen3-vl-8b or
# SHAPE=internvl3-8b for those models' shapes, at their full depth on a GPU), makes a few CLEVR
# pairs (make_games.py, 480x320 pictures: 187 visual tokens each), then
#  1. bench_levers.py: every rollout/update lever on and off (merged LoRA, static KV cache compiled
#     on CUDA, each picture encoded once, length-bucketed micro-batches; plain, each alone, all),
#     one model load, LEVER_GAMES games of one clue round and G = 8 at LEVER_TOKENS new tokens;
#     per configuration the seconds of generation and update, decode steps, useful tokens, tokens/s,
#     kernel launches per decode step (profiler), pictures encoded, peak memory, and ratios to plain;
#  2. 2 iterations of run.sh's GPU settings with the levers' defaults (LoRA 64 on the text
#     projections, gradient checkpointing, micro-batch 4, bfloat16; SCHEDULE=alternate: one
#     decision-stage and one clue-stage iteration), printing per iteration the seconds of
#     generation and of update, generated tokens/s, the sampling drift and peak GPU memory.
# A random model never stops, so every turn runs to its token limit: the worst case.
#
#   bash bench_gpu.sh                              # one GPU: sized for 8 minutes from the cost model (not yet timed on one)
#   GAMES=16 BENCH=runs/bench-16 bash bench_gpu.sh # run.sh's batch of 16 games: a longer update
#
# With no CUDA GPU the same path runs on the CPU at a reduced depth and with short turns (1 text
# layer, 2 vision blocks, 4-token turns, one clue round, 2 judge samples). At the 7B's shapes that
# is most of an hour (run.sh's bfloat16 matmuls are ~15x slower on a CPU); test_7b_shape.py runs it
# with SHAPE=tiny, the same steps in under 2 minutes. Every size is an environment variable:
# LAYERS, VISION_DEPTH, MAX_NEW_TOKENS, GAMES,
# PAIRS, EVAL_GAMES (0: no evaluation), EXTRA (more trainer flags), BENCH (the output folder), SHAPE,
# and for step 1 LEVER_GAMES, LEVER_TOKENS, CONFIGS (e.g. plain,all), LEVER_EXTRA; LEVERS=0 skips it.
set -euo pipefail
cd "$(dirname "$0")"

if python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  DEVICE=cuda  # LAYERS, VISION_DEPTH: the shape's full depth unless set
  MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
  GAMES=${GAMES:-4}
  EXTRA=${EXTRA:-}
  LEVER_GAMES=${LEVER_GAMES:-4}
  LEVER_TOKENS=${LEVER_TOKENS:-64}
  LEVER_EXTRA=${LEVER_EXTRA:---samples 8 --repeats 2}
  LEVER_DTYPE=bfloat16
else
  echo "No CUDA GPU: the GPU settings on the CPU, at the 7B's layer shapes but a reduced depth and short turns."
  DEVICE=cpu
  LAYERS=${LAYERS:-1}
  VISION_DEPTH=${VISION_DEPTH:-2}
  MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-4}
  GAMES=${GAMES:-2}
  EXTRA=${EXTRA:---rounds 1 --samples 2}
  LEVER_GAMES=${LEVER_GAMES:-1}
  LEVER_TOKENS=${LEVER_TOKENS:-4}
  LEVER_EXTRA=${LEVER_EXTRA:---samples 2 --kl 0}
  LEVER_DTYPE=float32  # the op counts and encodes do not depend on it; bf16 matmuls are ~15x slower on a CPU
fi
CONFIGS=${CONFIGS:-plain,merged,static,vision,shared,buckets,all}
PAIRS=${PAIRS:-20}
EVAL_GAMES=${EVAL_GAMES:-0}
BENCH=${BENCH:-runs/bench-gpu}
SHAPE=${SHAPE:-7b}
DEPTH=()
if [ -n "${LAYERS:-}" ]; then DEPTH+=(--layers "$LAYERS"); fi
if [ -n "${VISION_DEPTH:-}" ]; then DEPTH+=(--vision-depth "$VISION_DEPTH"); fi

started=$(date +%s)
python3 make_tiny_model.py --shape "$SHAPE" "${DEPTH[@]}" --device "$DEVICE" --out "$BENCH/model"
[ -f "$BENCH/games/pairs.jsonl" ] || python3 make_games.py --domain clevr --n "$PAIRS" --out "$BENCH/games"
rm -rf "$BENCH/run"  # timings of a fresh run, not a resumed one
built=$(date +%s)
if [ "${LEVERS:-1}" != 0 ]; then
  # shellcheck disable=SC2086  # LEVER_EXTRA is meant to split into flags
  python3 bench_levers.py --model "$BENCH/model" --data "$BENCH/games" --configs "$CONFIGS" --games "$LEVER_GAMES" \
    --rounds 1 --max-new-tokens "$LEVER_TOKENS" --lora-rank 64 --gradient-checkpointing --micro-batch 4 \
    --dtype "$LEVER_DTYPE" --device "$DEVICE" --json "$BENCH/levers.json" $LEVER_EXTRA
fi
levers=$(date +%s)
GPU_SETTINGS=1 MODEL="$BENCH/model" DATA="$BENCH/games" OUT="$BENCH/run" ITERATIONS=2 SCHEDULE=alternate \
  GAMES="$GAMES" EVAL_GAMES="$EVAL_GAMES" EXTRA="--max-new-tokens $MAX_NEW_TOKENS $EXTRA" bash run.sh
finished=$(date +%s)

python3 - "$BENCH/run/metrics.jsonl" "$DEVICE" <<'EOF'
import json, sys
import torch
metrics = [json.loads(line) for line in open(sys.argv[1])]
device = torch.cuda.get_device_name() if sys.argv[2] == "cuda" else "CPU"
print(f"\nbench_gpu.sh on {device}")
print("iteration  stage     generate_s  update_s  gen_tokens/s  logp_drift_mean/max  peak_gpu_GB")
for m in metrics:
    peak = f"{m['peak_gpu_memory_gb']:.1f}" if "peak_gpu_memory_gb" in m else "n/a"
    drift = (f"{m['sampling/sampling_logp_difference/mean']:.1e}/{m['sampling/sampling_logp_difference/max']:.1e}"
             if "sampling/sampling_logp_difference/mean" in m else "n/a")
    print(f"{m['iteration']:>9}  {m['stage']:<8}  {m['seconds_generate']:>10.1f}  {m['seconds_update']:>8.1f}"
          f"  {m['gen_tokens_per_s']:>12.1f}  {drift:>19}  {peak:>11}")
EOF
echo "model and pairs: $((built - started)) s; levers: $((levers - built)) s; run.sh (2 iterations, model loads included): $((finished - levers)) s"
