"""Fixtures shared by the test files: a tiny random-weight Qwen2.5-VL and a few image pairs."""
import argparse
import json
import os
import subprocess

import matplotlib
import pytest
import torch
from PIL import Image, ImageDraw

import make_tiny_model

if os.environ.get("PYTEST_XDIST_WORKER"):
    # -n 2 on 2 cores: one thread per worker and per script it starts (more threads than free
    # cores makes torch many times slower, not faster)
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


LONGEST = ("test_learning.py", "test_edited_picture.py")  # the learning checks: 15-20 minutes each


def pytest_collection_modifyitems(items):
    """The learning checks first, then the other slow tests, then the quick ones (each in file
    order): with -n 2 the longest start at once and the rest fill in around them, rather than one
    learning run finishing alone at the end."""
    def order(item):
        slow = item.get_closest_marker("slow") is not None
        return not slow, not (slow and os.path.basename(str(item.fspath)) in LONGEST)
    items.sort(key=order)


GRACE_HOPPER = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny Qwen2.5-VL folder, built with the project's own script (same defaults as its CLI)."""
    out = str(tmp_path_factory.mktemp("model") / "tiny-vlm")
    defaults = {"out": out, "hidden": 64, "layers": 2, "heads": 4, "vision_hidden": 32, "vision_depth": 2,
                "vocab_size": 512, "min_pixels": 28 * 28, "max_pixels": 56 * 56, "init_range": 0.06, "seed": 0}
    make_tiny_model.build(argparse.Namespace(**defaults))
    return out


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory):
    """Twenty pairs in make_games.py's layout: crops of a real photo, the modified one with a
    coloured square painted in, in two sizes so that batches mix image shapes."""
    root = tmp_path_factory.mktemp("pairs")
    os.makedirs(root / "images")
    photo = Image.open(GRACE_HOPPER).convert("RGB")
    with open(root / "pairs.jsonl", "w") as f:
        for i in range(20):
            size = (96, 64) if i % 2 else (64, 80)
            original = photo.crop((i * 9, i * 7, i * 9 + 4 * size[0], i * 7 + 4 * size[1])).resize(size)
            modified = original.copy()
            box = [8 + i, 8, 24 + i, 24]
            ImageDraw.Draw(modified).rectangle(box, fill=("red", "blue", "yellow")[i % 3])
            pid = f"{i:06d}"
            original.save(root / "images" / f"{pid}_original.png")
            modified.save(root / "images" / f"{pid}_modified.png")
            f.write(json.dumps({"id": pid, "domain": "photo", "original": f"images/{pid}_original.png",
                                "modified": f"images/{pid}_modified.png",
                                "changes": [{"what": "painted square", "bbox": box}]}) + "\n")
    return str(root)


@pytest.fixture(scope="session")
def edited_picture_warm_start():
    """The 56-px edited-picture warm start of `GAME=modified SIZE=56 learn_cpu.sh` (its folder,
    and its pairs' folder), built once in the checkout (8 minutes on an idle core, 17 beside another worker) and reused
    from there, as learn_cpu.sh itself reuses it. The tests that read it share one xdist group, so
    two workers never build it at once."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GAME": "modified", "SIZE": "56", "SCHEDULES": ""}
    built = subprocess.run(["bash", "learn_cpu.sh"], cwd=here, env=env, capture_output=True, text=True, timeout=3600)
    assert built.returncode == 0, built.stderr[-2000:]
    return os.path.join(here, "runs", "learn-cpu-modified-56"), os.path.join(here, "games", "cells56")
