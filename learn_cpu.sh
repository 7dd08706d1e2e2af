#!/usr/bin/env bash
# Can a tiny Qwen2.5-VL learn "Who is the spy?" on a CPU, trained by the same rlvr.py / spo.py /
# trainer.py (via run.sh) that train Qwen2.5-VL-7B? (docs/learn_cpu.md has the measured answers.)
#
#   bash learn_cpu.sh                                  # the blank-spy game, everything below
#   GAME=modified SIZE=56 bash learn_cpu.sh            # the edited-picture game, short judge prompt + seeing term
#   SEEDS="0" SCHEDULES="iterative" bash learn_cpu.sh   # one run only
#
# 1. a 2.1M-parameter random Qwen2.5-VL (make_tiny_model.py; 112x112 images = 16 visual tokens;
#    SIZE=56: 56x56 images = 4 visual tokens)
# 2. 2,000 cells pairs (make_games.py --domain cells): three squares on a grid; the spy sees an
#    empty picture (GAME=blank, the v2 paper's game) or the copy with two squares recoloured
#    (GAME=modified, the paper's game)
# 3. a warm start from the generator's own labels only (warm_start.py; cached: runs once). For
#    the edited-picture game it must answer held-out "is there a red square?" questions at 90%
#    before any RL starts (--require-attribute 0.9), and a second, 300-step phase teaches the
#    RL games' prompts: the judge's short one and ROUNDS clue rounds (warm-start-short)
# 4. for each schedule and seed: ITERATIONS iterations of RL from the warm start (run.sh), then
#    evaluate.py (trained vs the frozen warm start on held-out pairs, the warm start alone in the
#    same games: the baseline, the colour-checking judge's ceiling, the trained judge given
#    another game's picture, held-out yes/no) and report.py
# 5. a table of the results, OUT/results.md, and the runs' curves (yes/no, judge accuracy),
#    OUT/schedules.png
# Settings: GAMES per iteration (16), ROUNDS of clues (edited picture 1, blank 2), AUX_WEIGHT of the
# seeing term (edited picture: 1; 0 is RL alone), ITERATIONS, SEEDS, SCHEDULES, EVAL_GAMES; the warm
# start's WARM_STEPS, LIST_STEPS, SHORT_STEPS (the short-prompt phase: 300) and REQUIRE_ATTRIBUTE
# (the held-out yes/no both phases must reach: 0.9; 0 turns the check off).
# Every step is skipped when its output exists, so a rerun continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"

GAME=${GAME:-blank}
SIZE=${SIZE:-112}  # picture side: 112 (16 visual tokens, one per square) or 56 (4 visual tokens)
case "$GAME" in
  # describe, clue, vote and yes/no; the blank spy's tell needs no seeing
  blank) WARM_FLAGS=(--steps "${WARM_STEPS:-1500}" --list-steps 0 --mix 0.6,0.2,0.1,0.1,0)
         DEFAULT_OUT=runs/learn-cpu DEFAULT_ITERATIONS=40 ;;
  # the list task first: without it the tiny model never binds a colour word to its picture
  # (measured: 600 + 1,400 steps at 112 px, 400 + 1,100 at 56 px reach 1.000); 900 iterations
  # (14,400 games, ~100 minutes a run at 56 px, two at a time), since the judge is at chance for the
  # first ~3,000 games and both seeds reached the target only at 900 (docs/learn_cpu.md)
  modified) if [ "$SIZE" = 56 ]; then WARM=(1500 400); else WARM=(2000 600); fi  # steps in all, list steps
            WARM_FLAGS=(--steps "${WARM_STEPS:-${WARM[0]}}" --list-steps "${LIST_STEPS:-${WARM[1]}}" --mix 0,0.1,0.1,0.6,0.2
                        --require-attribute "${REQUIRE_ATTRIBUTE:-0.9}")
            DEFAULT_OUT=runs/learn-cpu-modified DEFAULT_ITERATIONS=900 ;;
  *) echo "error: GAME must be blank or modified, not '$GAME'" >&2; exit 2 ;;
esac
OUT=${OUT:-$DEFAULT_OUT$([ "$SIZE" = 112 ] || echo "-$SIZE")}
DATA=${DATA:-games/cells$([ "$SIZE" = 112 ] || echo "$SIZE")}
ITERATIONS=${ITERATIONS:-$DEFAULT_ITERATIONS}
SEEDS=${SEEDS:-"0 1 2"}
SCHEDULES=${SCHEDULES-"iterative decision clue"}  # SCHEDULES="" : the model, pairs and warm start only
EVAL_GAMES=${EVAL_GAMES:-200}
GAMES=${GAMES:-16}  # games per iteration (gpu_learn.sh: many more)
WARM_DEVICE=${WARM_DEVICE:-cpu}  # where the warm start trains (gpu_learn.sh: cuda)
ROUNDS=${ROUNDS:-$([ "$GAME" = modified ] && echo 1 || echo 2)}  # clue rounds of the RL games
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-1}  # more threads than free cores makes torch many times slower, not faster
export OMP_NUM_THREADS=$THREADS
# short turns (a clue is "\boxed{a red square}", a vote "The spy is \boxed{3}"), LoRA rank 16
# (full fine-tuning turned votes and clues into each other's words within ~15 iterations), 16
# games x 8 judge samples in 8 optimiser steps of 2 games per iteration at a peak lr of 1e-3 (4
# steps at 2e-3 learned in 2 of 3 seeds; more, smaller steps drift less for the same progress),
# the paper's KL 0.04 (without it the clue stage broke every format in 2 of 3 blank-game
# Iterative-SPO runs), K_min and patience (docs/learn_cpu.md)
RL_FLAGS="--rounds $ROUNDS --max-new-tokens 8 --samples 8 --lr 1e-3 --minibatches 8 --kl 0.04 --k-min 5 --patience 20 --micro-batch 32 --spy-image $GAME"
if [ "$GAME" = modified ]; then
  # the judge reads the clues and the question only, and every optimiser step also trains the
  # warm start's yes/no and list tasks on the training pairs (weight AUX_WEIGHT; 0: RL alone):
  # without both, the judge unlearns seeing and learns text (docs/learn_cpu.md)
  RL_FLAGS="$RL_FLAGS --judge-prompt short --aux-data $DATA --aux-weight ${AUX_WEIGHT:-1} --aux-batch 8 --seeing-every 20"
fi
RL_FLAGS="$RL_FLAGS ${RL_EXTRA:-}"

mkdir -p "$OUT"
if [ ! -f "$OUT/tiny-vlm/config.json" ]; then
  "$PYTHON" make_tiny_model.py --out "$OUT/tiny-vlm" --hidden 192 --layers 3 --heads 4 --vision-hidden 96 \
    --vision-depth 3 --vocab-size 768 --min-pixels $((SIZE * SIZE)) --max-pixels $((SIZE * SIZE))
fi
if [ ! -s "$DATA/pairs.jsonl" ]; then  # -s: an empty pairs.jsonl (no pair made) is no data
  "$PYTHON" make_games.py --domain cells --size "${SIZE}x$SIZE" --n 2000 --out "$DATA"
fi
"$PYTHON" warm_start.py --model "$OUT/tiny-vlm" --data "$DATA" --out "$OUT/warm-start" "${WARM_FLAGS[@]}" \
  --threads "$THREADS" --spy-image "$GAME" --device "$WARM_DEVICE"
START=$OUT/warm-start  # the initial policy of every run
if [ "$GAME" = modified ]; then
  # the judge's short prompt and one clue round (half the cost of a game): 300 more steps of the
  # same tasks (vote and clue formats, yes/no, list) in those prompts, since a model votes only in
  # the prompts it was taught (the warm start's votes are 96% invalid in the short prompt); at a
  # third of the first phase's lr, which kept yes/no at 1.000 where 1e-3 dropped it to 0.72-0.92
  START=$OUT/warm-start-short$([ "$ROUNDS" = 1 ] || echo "-r$ROUNDS")  # cached per number of rounds
  "$PYTHON" warm_start.py --model "$OUT/warm-start" --data "$DATA" --out "$START" --steps "${SHORT_STEPS:-300}" --list-steps 0 \
    --lr 3e-4 --warmup 20 --mix 0,0.2,0.3,0.3,0.2 --rounds "$ROUNDS" --judge-prompt short --eval-every 100 \
    --require-attribute "${REQUIRE_ATTRIBUTE:-0.9}" \
    --threads "$THREADS" --spy-image modified --device "$WARM_DEVICE"
fi

run_rl() {  # schedule seed -> OUT/<schedule>-s<seed>, trained, evaluated and reported by run.sh
  [ -f "$OUT/$1-s$2/eval.json" ] && return  # done before
  MODEL="$START" DOMAIN=cells DATA="$DATA" OUT="$OUT/$1-s$2" ITERATIONS="$ITERATIONS" GAMES="$GAMES" \
    SCHEDULE="$1" EVAL_GAMES="$EVAL_GAMES" LORA_RANK=16 PYTHON="$PYTHON" EXTRA="$RL_FLAGS --seed $2" bash run.sh
}

for schedule in $SCHEDULES; do
  for seed in $SEEDS; do
    run_rl "$schedule" "$seed"
  done
done

"$PYTHON" - "$OUT" <<'EOF'
import glob, json, os, statistics, sys
import jsonl  # read_jsonl skips a line cut short by a kill
out = sys.argv[1]
def load(path):
    with open(path) as f:
        return json.load(f)
paths = {s: sorted(glob.glob(os.path.join(out, f"{s}-s*", "eval.json"))) for s in ("iterative", "decision", "clue")}
runs = {s: [load(p) for p in found] for s, found in paths.items()}
every = [e for evals in runs.values() for e in evals]
if not every:
    print("no evaluated run yet: nothing to tabulate")
    sys.exit(0)
base = statistics.mean(e["decision_acc_baseline"] for e in every)  # the warm start in the same games
rows = ["| schedule | runs | held-out decision accuracy | gain over the warm start | win rate vs warm start | as civilians / as spy |",
        "|---|---|---|---|---|---|",
        f"| warm start (replaying the same games) | {len(every)} | {base:.3f} | | 0.5 | |"]
ceilings = [e["decision_acc_colour_check"] for e in every if e.get("decision_acc_colour_check") is not None]
if ceilings:  # the edited-picture game: what checking each clue's colour against the picture gives
    rows.append(f"| a judge checking every clue's colours (ceiling, same games) | {len(ceilings)} | "
                f"{statistics.mean(ceilings):.3f} | | | |")
def cell(evals, value):  # mean, and the spread over seeds when there are several
    values = [value(e) for e in evals]
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread}"
for schedule, evals in runs.items():
    if evals:
        rows.append(f"| {schedule} | {len(evals)} | {cell(evals, lambda e: e['decision_acc'])} | "
                    f"{cell(evals, lambda e: e['decision_acc'] - e['decision_acc_baseline'])} | "
                    f"{cell(evals, lambda e: e['win_rate'])} | {cell(evals, lambda e: e['win_rate_civilian_side'])} / "
                    f"{cell(evals, lambda e: e['win_rate_spy_side'])} |")
def number(e, key):  # a field of eval.json that older evaluations lack
    return f"{e[key]:.3f}" if isinstance(e.get(key), (int, float)) else "-"
rows += ["", "| run | decision accuracy | gain | win rate | as civilians / as spy | the same judge, another game's picture "
         "| held-out yes/no, warm start -> trained |", "|---|---|---|---|---|---|---|"]
for schedule, evals in runs.items():
    for path, e in zip(paths[schedule], evals):
        rows.append(f"| {os.path.basename(os.path.dirname(path))} | {e['decision_acc']:.3f} | "
                    f"{e['decision_acc'] - e['decision_acc_baseline']:+.3f} | {e['win_rate']:.3f} | "
                    f"{e['win_rate_civilian_side']:.3f} / {e['win_rate_spy_side']:.3f} | "
                    f"{number(e, 'decision_acc_wrong_picture')} | {number(e, 'heldout_yes_no_reference')} -> "
                    f"{number(e, 'heldout_yes_no')} |")
table = "\n".join(rows)
with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table + "\n")
print(table)

# training decision accuracy of every run (10-iteration moving mean), one colour per schedule
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
# left, when the warm start kept one: its held-out yes/no accuracy, then each run's during RL
# (heldout_yes_no, with --aux-data); right: each run's training judge accuracy (10-iteration
# moving mean), one colour per schedule
try:
    with open(os.path.join(out, "warm-start", "warm_start.json")) as f:
        curve = json.load(f).get("attribute_curve")
except (OSError, ValueError):
    curve = None
fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(11 if curve else 7, 3.5), squeeze=False)
if curve:
    axes[0][0].plot([step for step, _ in curve], [acc for _, acc in curve], "o-", color="C4")
    axes[0][0].axhline(0.9, color="gray", ls="--", lw=0.8, label="required before RL")
    end = curve[-1][0]  # RL iterations drawn after the warm start's steps, one step per iteration
    for colour, schedule in zip(("C0", "C1", "C2"), ("iterative", "decision", "clue")):
        for k, path in enumerate(sorted(glob.glob(os.path.join(out, f"{schedule}-s*", "metrics.jsonl")))):
            checks = [(row["iteration"], row["heldout_yes_no"]) for row in jsonl.read_jsonl(path)
                      if isinstance(row.get("heldout_yes_no"), (int, float))]
            if checks:
                axes[0][0].plot([end + 10 * i for i, _ in checks], [a for _, a in checks], ".-", color=colour, alpha=0.8,
                                label=f"{schedule} RL (x10 iterations)" if k == 0 else None)
    axes[0][0].set(xlabel="warm-start step, then RL iteration x 10", ylabel="held-out yes/no accuracy",
                   title="is there a <colour> square? (held-out)")
    axes[0][0].legend(fontsize=8)
ax = axes[0][-1]
for colour, schedule in zip(("C0", "C1", "C2"), ("iterative", "decision", "clue")):
    for k, path in enumerate(sorted(glob.glob(os.path.join(out, f"{schedule}-s*", "metrics.jsonl")))):
        acc = [row["acc"] for row in jsonl.read_jsonl(path) if isinstance(row.get("acc"), (int, float))]
        smooth = [sum(acc[max(0, i - 9):i + 1]) / len(acc[max(0, i - 9):i + 1]) for i in range(len(acc))]
        ax.plot(range(1, len(acc) + 1), smooth, colour, alpha=0.8, label=schedule if k == 0 else None)
if ceilings:
    ax.axhline(statistics.mean(ceilings), color="C3", ls="-.", label="colour-checking judge (held-out)")
ax.axhline(base, color="gray", ls="--", label="warm start (held-out)")
wrong = [e["decision_acc_wrong_picture"] for e in every if isinstance(e.get("decision_acc_wrong_picture"), (int, float))]
if wrong:  # the control: the trained judges seeing another game's picture
    ax.axhline(statistics.mean(wrong), color="C5", ls=":", label="trained judge, another game's picture (held-out)")
ax.axhline(0.25, color="black", ls=":", lw=0.8, label="chance (1 of 4 seats)")
ax.set_xlabel("iteration")
ax.set_ylabel("judge accuracy (10-it mean)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(out, "schedules.png"), dpi=120)
print(f"wrote {os.path.join(out, 'results.md')} and {os.path.join(out, 'schedules.png')}")
EOF
