"""Tests of the tiny-model groundwork for learning on a CPU: the cells domain and warm_start.py.

    python -m pytest -q test_warm_start.py

Whether the tiny model then learns the game: test_learning.py (a small run, asserted) and
`bash learn_cpu.sh` (the full comparison: docs/learn_cpu.md).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import make_games

HERE = os.path.dirname(os.path.abspath(__file__))


def test_56_px_cells_pairs_fill_a_2x2_grid():
    """The 4-visual-token domain: 56x56 pictures, three squares in a 2x2 grid, two recoloured."""
    args = make_games.parse_args(["--domain", "cells", "--size", "56x56", "--n", "1", "--out", "unused"])
    assert args.size == (56, 56) and args.max_change == 0.5  # two of three squares are 26% of the pixels
    for seed in range(10):
        original, modified, source, changes = make_games.make_cells_pair(np.random.default_rng(seed), 0, args)
        assert original.shape == (56, 56, 3) and len(changes) == 2
        assert all(0 <= r < 2 and 0 <= c < 2 for r, c in (o["cell"] for o in source["objects"]))
        before, after = make_games.cells_colours({"source": source, "changes": changes})
        recoloured = [a for a, b in zip(after, before) if a != b]
        assert len(recoloured) == 2 and not set(recoloured) & set(before)  # new colours: a clue naming one is false


def test_cells_pairs_line_up_with_visual_tokens_and_change_to_new_colours():
    args = make_games.parse_args(["--domain", "cells", "--n", "1", "--out", "unused"])
    assert args.size == (112, 112) and args.min_objects == args.max_objects == 3
    for seed in range(20):
        original, modified, source, changes = make_games.make_cells_pair(np.random.default_rng(seed), 0, args)
        colours = [o["colour"] for o in source["objects"]]
        assert len(set(colours)) == 3 and len(changes) == 2
        for change in changes:
            x0, y0, x1, y1 = change["bbox"]
            assert x0 // 28 == (x1 - 1) // 28 and y0 // 28 == (y1 - 1) // 28  # inside one visual token's cell
            assert change["after"]["colour"] not in colours  # a clue naming it is false for the civilians
            assert (modified[y0:y1, x0:x1] == make_games.CELL_COLOURS[change["after"]["colour"]]).all()
        diff = (original != modified).any(axis=2)
        inside = np.zeros_like(diff)
        for change in changes:
            x0, y0, x1, y1 = change["bbox"]
            inside[y0:y1, x0:x1] = True
        assert diff.any() and not (diff & ~inside).any()


@pytest.fixture(scope="module")
def cells_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cells"))
    subprocess.run([sys.executable, "make_games.py", "--domain", "cells", "--n", "40", "--out", out, "--workers", "1"],
                   cwd=HERE, check=True, capture_output=True)
    return out


def warm_start(model, data, out):
    return subprocess.run([sys.executable, "warm_start.py", "--model", model, "--data", data, "--out", out,
                           "--steps", "4", "--list-steps", "2", "--batch", "4", "--game-batch", "2", "--warmup", "2", "--threads", "1"],
                          cwd=HERE, capture_output=True, text=True, timeout=300)


def test_warm_start_is_deterministic_cached_and_loadable(tiny_model, cells_dir, tmp_path):
    from safetensors.torch import load_file
    import selfplay
    first, second = warm_start(tiny_model, cells_dir, str(tmp_path / "a")), warm_start(tiny_model, cells_dir, str(tmp_path / "b"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:]
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    start = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)  # seeded: the same flags give the same weights
    assert any((a[k] != start[k]).any() for k in a)  # and it did train
    assert json.load(open(tmp_path / "a" / "warm_start.json"))["steps"] == 4
    again = warm_start(tiny_model, cells_dir, str(tmp_path / "a"))
    assert again.returncode == 0 and "nothing to do" in again.stdout  # the cache: it runs once
    processor = selfplay.load_processor(str(tmp_path / "a"))  # a normal model folder
    assert selfplay.load_model(str(tmp_path / "a"), "cpu", None) is not None and processor.tokenizer is not None


def test_warm_start_refuses_a_folder_without_cells_pairs(tiny_model, pairs_dir, tmp_path):
    result = warm_start(tiny_model, pairs_dir, str(tmp_path / "w"))
    assert result.returncode != 0 and "no cells training pairs" in result.stderr and "Traceback" not in result.stderr


def test_warm_start_examples_of_the_blank_spy_game(cells_dir):
    """With --spy-image blank the spy's clue is about the empty picture it sees, every seat may say
    "an empty picture" in made-up clues, and a vote is a uniformly random seat after a fixed phrase:
    nothing in the examples says who the spy is."""
    import random
    from types import SimpleNamespace
    import selfplay
    import warm_start
    pairs = selfplay.read_pairs(cells_dir, "train")
    images = [(selfplay.load_image(p["original"]), selfplay.load_image(p["modified"])) for p in pairs]
    rng = random.Random(0)
    for spy_image in ("blank", "modified"):
        cfg = SimpleNamespace(players=4, rounds=2, spy_image=spy_image, seed=0)
        spy_clues, said, votes = [], set(), []
        for k in range(400):
            prompt, image, target = warm_start.example(pairs[k % len(pairs)], images[k % len(pairs)], "clue", rng, cfg)
            said.update(line for line in prompt.split('"')[1::2])
            if "You are the spy" in prompt:
                spy_clues.append((image.getcolors(), target))
            votes.append(warm_start.example(pairs[k % len(pairs)], images[k % len(pairs)], "vote", rng, cfg)[2])
        blank = [(colors, target) for colors, target in spy_clues if colors == [(112 * 112, (255, 255, 255))]]
        if spy_image == "blank":
            assert spy_clues and len(blank) == len(spy_clues)
            assert {target for _, target in blank} == {"\\boxed{an empty picture}"}
            assert warm_start.EMPTY in said
        else:
            assert not blank and warm_start.EMPTY not in said
        assert {v for v in votes} == {"The spy is \\boxed{%d}" % seat for seat in range(1, 5)}


def test_list_and_yes_no_examples_come_from_the_picture_they_show(cells_dir):
    """The list target is the shown picture's colours, sorted; the held-out yes/no questions are
    exactly balanced and each answer is true of the picture it is asked about."""
    import random
    from types import SimpleNamespace
    import selfplay
    import warm_start
    pairs = selfplay.read_pairs(cells_dir, "train")
    images = [(selfplay.load_image(p["original"]), selfplay.load_image(p["modified"])) for p in pairs]
    rng, cfg = random.Random(0), SimpleNamespace(players=4, rounds=2, spy_image="modified", seed=0)

    def colours_of(image):  # the square colours actually painted in the picture
        painted = {rgb for _, rgb in image.getcolors()}
        return sorted(name for name, rgb in make_games.CELL_COLOURS.items() if rgb in painted)

    shown = set()
    for k in range(200):
        prompt, image, target = warm_start.example(pairs[k % len(pairs)], images[k % len(pairs)], "list", rng, cfg)
        assert prompt == warm_start.LIST_PROMPT and target == "\\boxed{%s}" % " ".join(colours_of(image))
        shown.add(image is images[k % len(pairs)][1])
        question = warm_start.attribute_question(colours_of(image), image, k % 2 == 0, rng)
        asked = question[0].split("Is there a ")[1].split(" square")[0]
        assert question[2] == ("\\boxed{yes}" if asked in colours_of(image) else "\\boxed{no}")
        assert (asked in colours_of(image)) == (k % 2 == 0)
    assert shown == {True, False}  # original and modified pictures both


def test_require_attribute_fails_in_one_line_and_keeps_the_model(tiny_model, cells_dir, tmp_path):
    """A random model answers yes/no at chance: --require-attribute 0.9 fails, says what to do, and
    keeps the model and its held-out numbers (a rerun fails the same way without training)."""
    args = ["warm_start.py", "--model", tiny_model, "--data", cells_dir, "--out", str(tmp_path / "w"), "--steps", "2",
            "--list-steps", "1", "--batch", "2", "--game-batch", "2", "--warmup", "1", "--threads", "1",
            "--require-attribute", "0.9"]
    for _ in range(2):
        result = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "below --require-attribute 0.9; delete it and train longer" in result.stderr.strip().splitlines()[-1]
    report = json.load(open(tmp_path / "w" / "warm_start.json"))
    assert [step for step, _ in report["attribute_curve"]] == [0, 2] and report["attribute_accuracy"] == 0.5
    assert report["list_accuracy"] == 0.0 and os.path.exists(tmp_path / "w" / "config.json")


@pytest.mark.parametrize("mix", ["0.6,0.2,0.1,0.1", "a,b,c,d,e", "0,0,0,0,0", "1,1,1,1,-1"])
def test_bad_mix_is_one_clear_line(tiny_model, cells_dir, tmp_path, mix):
    result = subprocess.run([sys.executable, "warm_start.py", "--model", tiny_model, "--data", cells_dir,
                             "--out", str(tmp_path / "w"), "--mix", mix], cwd=HERE, capture_output=True, text=True)
    assert result.returncode == 2 and "--mix needs five non-negative shares" in result.stderr
    assert "Traceback" not in result.stderr
