"""gpu_learn.sh on the CPU at a reduced size (bench_gpu.sh's CPU run is test_7b_shape.py's).

    OMP_NUM_THREADS=1 python -m pytest -q -m slow test_gpu_scripts.py     # slow: a few CPU-minutes

The edited-picture cells game end to end through the GPU script: tiny model, 2,000 pairs, a
2-step warm start and a 2-step short-prompt phase on the CPU (the accuracy requirement off), one
Iterative-SPO iteration of 2 games, evaluation of 2 games, the results table. Nothing learns at this size; the test checks the plumbing.
"""
import json
import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_gpu_learn_runs_the_edited_picture_game_at_reduced_size(tmp_path):
    out, data = tmp_path / "gpu-learn", tmp_path / "cells"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(out), "DATA": str(data), "GAMES": "2",
           "ITERATIONS": "1", "EVAL_GAMES": "2", "WARM_STEPS": "2", "LIST_STEPS": "1", "SHORT_STEPS": "2", "REQUIRE_ATTRIBUTE": "0",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "gpu_learn.sh"], cwd=HERE, capture_output=True, text=True, timeout=1800, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run = out / "iterative-s0"
    config = json.load(open(run / "config.json"))
    assert (config["games"], config["spy_image"], config["dtype"], config["iterations"]) == (2, "modified", "torch.float32", 1)
    assert json.load(open(run / "eval.json"))["games"] == 2
    assert "| iterative | 1 |" in open(out / "results.md").read()
