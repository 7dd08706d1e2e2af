"""The CI-sized learning checks, both through the project's scripts as a user runs them.

    python -m pytest -q -m slow test_learning.py      # about 20 minutes on one CPU core

1. A tiny Qwen2.5-VL becomes a better judge through rlvr.py's own loss, in the blank-spy game: a
   1.6M-parameter model, one clue round, small pictures, a 400-step warm start with the clue and
   vote formats only (generator labels, no spy labels: warm_start.py), 25 decision-stage
   iterations of the unchanged rlvr.py, then evaluate.py on held-out pairs. Seeded, one thread:
   the same machine gives the same numbers (measured: 0.884 against 0.2225; `bash run.sh`'s CPU
   default retraces its first 20 iterations).
2. The edited-picture game's warm start (`GAME=modified SIZE=56 learn_cpu.sh`'s, built once for
   this test and test_edited_picture.py's slow one) learns to check a colour against its picture
   (held-out yes/no at least 0.9), the skill its judge needs. RL in that game teaches the judge
   only after ~3,000 games and meets its target at 14,400 games (100 minutes a run,
   docs/learn_cpu.md), too long for a CI check, so there is no RL gain check of it here.

The full measurements are `bash learn_cpu.sh` and `GAME=modified bash learn_cpu.sh` (docs/learn_cpu.md).
"""
import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run(*args):
    result = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_the_decision_stage_makes_the_judge_find_the_spy(tmp_path):
    model, games, warm, out = (str(tmp_path / name) for name in ("tiny-vlm", "games", "warm", "run"))
    run("make_tiny_model.py", "--out", model, "--hidden", "192", "--layers", "3", "--heads", "4",
        "--vision-hidden", "32", "--vision-depth", "2", "--vocab-size", "640",
        "--min-pixels", str(28 * 28), "--max-pixels", str(56 * 56))
    run("make_games.py", "--domain", "cells", "--n", "300", "--out", games, "--workers", "1")
    run("warm_start.py", "--model", model, "--data", games, "--out", warm, "--steps", "400", "--warmup", "30",
        "--mix", "0,0.5,0.5,0,0", "--list-steps", "0", "--rounds", "1", "--spy-image", "blank", "--threads", "1")
    run("rlvr.py", "--model", warm, "--data", games, "--out", out, "--schedule", "decision", "--iterations", "25",
        "--games", "16", "--samples", "8", "--rounds", "1", "--max-new-tokens", "8", "--lr", "1e-3",
        "--minibatches", "8", "--kl", "0.04", "--lora-rank", "16", "--micro-batch", "32", "--spy-image", "blank")
    run("evaluate.py", "--out", out, "--games", "200")
    result = json.load(open(os.path.join(out, "eval.json")))
    # 100 games decided by each judge (the trained one, and the warm start replaying the same
    # games); a game's 8 votes are not independent, so the standard error counts games only
    se = math.sqrt(2 * 0.25 * 0.75 / 100)
    gain = result["decision_acc"] - result["decision_acc_baseline"]
    assert gain > 3 * se, f"judge accuracy {result['decision_acc']:.3f} vs warm start {result['decision_acc_baseline']:.3f}"
    assert result["win_rate_civilian_side"] > 0.5  # and it wins the games it judges


@pytest.mark.slow
@pytest.mark.xdist_group("learn-cpu-56")
def test_the_warm_start_learns_to_check_a_colour_against_its_picture(edited_picture_warm_start):
    """The edited-picture game's judge must check a clue's colour against its picture. The list
    task, then the mix, teach the 56-px model that check from generator labels only (the warm start
    of `GAME=modified SIZE=56 learn_cpu.sh`, which stops with exit 1 below 0.9): measured 1.000
    held-out yes/no and list accuracy after 1,500 steps; yes/no alone stays at 0.50 (docs/learn_cpu.md)."""
    folder, _ = edited_picture_warm_start
    report = json.load(open(os.path.join(folder, "warm-start", "warm_start.json")))
    assert report["attribute_curve"][0][1] == 0.5 and report["attribute_accuracy"] >= 0.9
    assert report["list_accuracy"] >= 0.9
    # the short-prompt phase teaches new prompts without unlearning the check: at its old lr of
    # 1e-3 yes/no fell to 0.917 at step 100 (one thread) or 0.72-0.78 (two threads: learn_cpu.sh
    # stopped); at 3e-4 it stays at 1.000 at every check with one or two threads
    short = json.load(open(os.path.join(folder, "warm-start-short", "warm_start.json")))
    assert min(accuracy for _, accuracy in short["attribute_curve"]) >= 0.95, short["attribute_curve"]
