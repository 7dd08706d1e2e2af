"""
Tests that bad data and leftovers cost a pair, a line or a game, never a run: pairs.jsonl with
malformed or non-object lines, a truncated JPEG that only fails when decoded, the --domain of a
folder without pairs.jsonl, make_games.py that makes no pair, run.sh and an empty pairs.jsonl,
and make_tiny_model.py's staging folder after a kill.

    python -m pytest -q test_bad_data.py
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import matplotlib
from PIL import Image

import make_tiny_model
import selfplay

HERE = os.path.dirname(os.path.abspath(__file__))
GRACE_HOPPER = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")


def copy_pairs(pairs_dir, data, count):
    """The first `count` pairs of the fixture, copied (the fixture stays intact); their lines."""
    (data / "images").mkdir(parents=True)
    lines = open(os.path.join(pairs_dir, "pairs.jsonl")).read().splitlines()[:count]
    for line in lines:
        pair = json.loads(line)
        for key in ("original", "modified"):
            shutil.copy(os.path.join(pairs_dir, pair[key]), data / pair[key])
    return lines


def read_both_splits(data, capsys, **kwargs):
    pairs = selfplay.read_pairs(str(data), "train", **kwargs) + selfplay.read_pairs(str(data), "eval", **kwargs)
    return pairs, capsys.readouterr().out


def test_malformed_lines_are_skipped_with_their_line_numbers(pairs_dir, tmp_path, capsys):
    data = tmp_path / "data"
    lines = copy_pairs(pairs_dir, data, 4)
    bad = ['{"id": "x", "original": ', "[1, 2, 3]", '"just a string"', '{"id": "y"}', "[" * 100000]
    (data / "pairs.jsonl").write_text("\n".join([lines[0], bad[0], lines[1], bad[1], bad[2], lines[2], bad[3], bad[4], lines[3]]) + "\n")
    pairs, out = read_both_splits(data, capsys)
    assert sorted(p["id"] for p in pairs) == sorted(json.loads(line)["id"] for line in lines)
    for number, why in [(2, "not JSON"), (4, "not a JSON object"), (5, "not a JSON object"), (8, "not JSON")]:
        assert f"skipping line {number} of {data / 'pairs.jsonl'}: {why}" in out
    assert "skipping pair y" in out and "needs an id and the paths" in out
    assert "skipped 5 unreadable pairs or lines" in out


def test_truncated_jpeg_passes_verify_and_is_dropped_before_it_is_played(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    jpeg = open(GRACE_HOPPER, "rb").read()
    index = []
    for pid in ("good", "cut"):
        shutil.copy(GRACE_HOPPER, data / "images" / f"{pid}_original.jpg")
        (data / "images" / f"{pid}_modified.jpg").write_bytes(jpeg if pid == "good" else jpeg[: len(jpeg) // 2])
        index.append(json.dumps({"id": pid, "domain": "photo", "original": f"images/{pid}_original.jpg",
                                 "modified": f"images/{pid}_modified.jpg"}))
    (data / "pairs.jsonl").write_text("\n".join(index) + "\n")
    pairs, _ = read_both_splits(data, capsys)
    assert sorted(p["id"] for p in pairs) == ["cut", "good"]  # verify() passes the cut file: checked when played
    kept = selfplay.decodable_pairs(pairs)
    assert [p["id"] for p in kept] == ["good"]
    assert "dropping pair cut from this batch: cannot read its images" in capsys.readouterr().out
    selfplay.load_image(kept[0]["modified"])  # what play_games does with a kept pair


def test_domain_flag_sets_the_rules_of_a_folder_without_pairs_jsonl(pairs_dir, tmp_path, capsys):
    for i in range(6):
        for kind in ("original", "modified"):
            os.link(os.path.join(pairs_dir, "images", f"{i:06d}_{kind}.png"), tmp_path / f"CLEVR_{i}_{kind}.png")
    default, _ = read_both_splits(tmp_path, capsys)
    clevr, _ = read_both_splits(tmp_path, capsys, domain="clevr")
    assert {p["domain"] for p in default} == {"photo"} and {p["domain"] for p in clevr} == {"clevr"}
    assert len(clevr) == 6
    own, _ = read_both_splits(pairs_dir, capsys)
    assert {p["domain"] for p in own} == {"photo"}  # pairs.jsonl's own domain when no flag is given
    parser = argparse.ArgumentParser()
    selfplay.add_game_args(parser)
    cfg = parser.parse_args(["--domain", "clevr"])
    assert cfg.domain == "clevr" and parser.parse_args([]).domain is None
    game = selfplay.Game(pair=clevr[0], spy=0)
    prompt = selfplay.clue_prompt(game, 1, 0, argparse.Namespace(players=4, rounds=2, spy_image="modified"))
    assert selfplay.DOMAIN_RULES["clevr"] in prompt


def test_make_games_without_a_pair_writes_no_pairs_jsonl(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (20, 20)).save(src / "tiny.png")  # an image, but too small for any pair
    result = subprocess.run([sys.executable, "make_games.py", "--domain", "photo", "--src", str(src), "--n", "2",
                             "--out", str(tmp_path / "out")], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "no pair was made" in result.stderr
    assert not (tmp_path / "out" / "pairs.jsonl").exists() and not (tmp_path / "out" / "pairs.jsonl.tmp").exists()


def test_run_sh_makes_pairs_when_pairs_jsonl_is_empty(tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.jsonl").write_text("")  # what make_games.py used to leave when it made no pair
    env = {**os.environ, "MODEL": tiny_model, "DATA": str(data), "DOMAIN": "cells", "PAIRS": "3",
           "OUT": str(tmp_path / "run"), "ITERATIONS": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "run.sh"], cwd=HERE, capture_output=True, text=True, timeout=600, env=env)
    assert "Making 3 cells pairs" in result.stdout, result.stdout + result.stderr[-2000:]
    assert len((data / "pairs.jsonl").read_text().splitlines()) == 3


def tiny_args(out):
    return argparse.Namespace(out=str(out), hidden=64, layers=1, heads=4, vision_hidden=32, vision_depth=1,
                              vocab_size=400, min_pixels=28 * 28, max_pixels=56 * 56, init_range=0.06, seed=0)


def test_make_tiny_model_removes_a_killed_builds_staging_folder(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = tmp_path / f".tiny-{finished.pid}-abc_123"  # a build killed with -9: its process is gone
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    alive = tmp_path / f".tiny-{os.getpid()}-inuse"  # a build still running: left alone
    alive.mkdir()
    make_tiny_model.build(tiny_args(tmp_path / "model"))
    assert sorted(os.listdir(tmp_path)) == [alive.name, "model"]


def test_make_tiny_model_killed_while_saving_leaves_no_staging_folder(tmp_path):
    script = (
        "import os, runpy, signal, sys\n"
        "from transformers import Qwen2_5_VLForConditionalGeneration as M\n"
        "save = M.save_pretrained\n"
        "def save_then_term(self, *a, **k):\n"
        "    save(self, *a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "M.save_pretrained = save_then_term\n"
        "sys.argv = ['make_tiny_model.py', '--out', sys.argv[1], '--layers', '1', '--vision-depth', '1']\n"
        "runpy.run_path('make_tiny_model.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model")], cwd=HERE, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 143, result.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def cut_picture(pair):
    """Overwrite a pair's modified image with a JPEG cut in half: read_pairs' verify() passes it,
    decoding fails."""
    jpeg = open(GRACE_HOPPER, "rb").read()
    with open(pair["modified"], "wb") as f:
        f.write(jpeg[: len(jpeg) // 2])


def test_undecodable_pair_is_replaced_by_the_next_one_in_the_epoch_order(pairs_dir, tmp_path, capsys):
    """A pair of iteration 1's batch that does not decode gives its place to the next pair of the
    epoch order (the first of iteration 2's batch): the batch keeps --games games, in one line."""
    import trainer
    data = tmp_path / "data"
    copy_pairs(pairs_dir, data, 20)
    cfg = argparse.Namespace(seed=0, games=4)
    pairs = selfplay.read_pairs(str(data), "train")
    first, second = trainer.batch_pairs(pairs, 1, cfg), trainer.batch_pairs(pairs, 2, cfg)
    capsys.readouterr()
    cut_picture(first[2])
    replaced = trainer.batch_pairs(pairs, 1, cfg)
    assert [p["id"] for p in replaced] == [p["id"] for p in first[:2] + second[:1] + first[3:]]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"dropping pair {first[2]['id']} from this batch: cannot read its images")
    assert out[0].endswith(f"; pair {second[0]['id']} plays in its place")
