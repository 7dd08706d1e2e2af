"""Tests for make_games.py: determinism, metadata that matches the pixels, and clear errors on bad input."""

import json
import math
import os
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
from PIL import Image

import clevr_render
import make_games

HERE = os.path.dirname(os.path.abspath(__file__))
GRACE_HOPPER = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
SMALL_CLEVR = ["--size", "240x160", "--min-visible", "40"]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """A folder holding one real photo."""
    folder = tmp_path_factory.mktemp("photos")
    with open(GRACE_HOPPER, "rb") as f:
        (folder / "grace_hopper.jpg").write_bytes(f.read())
    return folder


def run(*flags):
    return subprocess.run([sys.executable, os.path.join(HERE, "make_games.py"), *map(str, flags)],
                          capture_output=True, text=True, timeout=120)


def read_pairs(folder):
    with open(os.path.join(folder, "pairs.jsonl")) as f:
        return [json.loads(line) for line in f]


def load(folder, relative):
    return np.asarray(Image.open(os.path.join(folder, relative)).convert("RGB"))


def folder_bytes(folder):
    """Every file under folder (relative path -> bytes)."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def assert_boxes_explain_difference(original, modified, changes, inside=0.9):
    """Most changed pixels lie in the union of the change boxes, and every box holds changed pixels."""
    diff = make_games.changed_mask(original, modified, 16)
    union = np.zeros_like(diff)
    for change in changes:
        x0, y0, x1, y1 = change["bbox"]
        assert 0 <= x0 < x1 <= diff.shape[1] and 0 <= y0 < y1 <= diff.shape[0]
        assert diff[y0:y1, x0:x1].any(), f"no changed pixel in the box of {change['what']}"
        union[y0:y1, x0:x1] = True
    assert (diff & union).sum() >= inside * diff.sum()


def default_args(*flags):
    args = make_games.parse_args(["--domain", "clevr", "--n", "1", "--out", "unused", *flags])
    return args


def photo(long_side=320):
    return make_games.load_photo(GRACE_HOPPER, long_side)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("domain", ["clevr", "chart", "photo"])
def test_same_seed_same_bytes_for_any_worker_count(tmp_path, photo_folder, domain):
    flags = {"clevr": ["--domain", "clevr", *SMALL_CLEVR], "chart": ["--domain", "chart", "--size", "320x240"],
             "photo": ["--domain", "photo", "--src", photo_folder, "--long-side", "256"]}[domain]
    one, two = tmp_path / "one", tmp_path / "two"
    first = run(*flags, "--n", 5, "--seed", 7, "--out", one, "--workers", 1)
    second = run(*flags, "--n", 5, "--seed", 7, "--out", two, "--workers", 2)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "pairs/s" in first.stdout
    files = folder_bytes(one)
    assert files == folder_bytes(two)
    pairs = read_pairs(one)
    assert [p["id"] for p in pairs] == ["000000", "000001", "000002", "000003", "000004"]
    for pair in pairs:
        assert set(pair) == {"id", "domain", "original", "modified", "width", "height", "source", "changes"}
        original, modified = load(one, pair["original"]), load(one, pair["modified"])
        assert original.shape == modified.shape == (pair["height"], pair["width"], 3)
        assert pair["original"] == f"images/{pair['id']}_original.png"


def test_other_seed_other_pairs(tmp_path):
    assert run("--domain", "chart", "--n", 2, "--seed", 1, "--out", tmp_path / "a", "--workers", 1).returncode == 0
    assert run("--domain", "chart", "--n", 2, "--seed", 2, "--out", tmp_path / "b", "--workers", 1).returncode == 0
    assert read_pairs(tmp_path / "a") != read_pairs(tmp_path / "b")


# ----------------------------------------------------------------------------- metadata matches pixels


def scene_from_source(source, objects):
    """The renderer's scene from the pairs.jsonl records of the objects."""
    return {"objects": [{"shape": o["shape"], "colour": o["colour"], "material": o["material"], "size": o["size"],
                         "r": clevr_render.CLEVR_SIZES[o["size"]], "x": o["position"][0], "y": o["position"][1],
                         "angle": math.radians(o["rotation_deg"])} for o in objects],
            "camera": source["camera"], "lights": source["lights"]}


@pytest.mark.parametrize("seed", range(3))
def test_clevr_changes_colour_and_shape_and_boxes_cover_them(seed):
    args = default_args(*SMALL_CLEVR)
    original, modified, source, changes = make_games.make_clevr_pair(np.random.default_rng(seed), 0, args)
    assert len(changes) == args.changes
    assert args.min_objects <= len(source["objects"]) <= args.max_objects
    assert make_games.check_pair(original, modified, args) is None
    assert_boxes_explain_difference(original, modified, changes, inside=0.75)  # shadows may fall outside
    objects = source["objects"]
    for a in range(len(objects)):  # footprints (the same circle for every shape of a size) never overlap
        for b in range(a):
            distance = math.dist(objects[a]["position"][:2], objects[b]["position"][:2])
            assert distance > clevr_render.CLEVR_SIZES[objects[a]["size"]] + clevr_render.CLEVR_SIZES[objects[b]["size"]]
    edited = [dict(o) for o in source["objects"]]
    for change in changes:
        before, after = change["before"], change["after"]
        assert before["colour"] != after["colour"] and before["shape"] != after["shape"]
        assert before["position"][:2] == after["position"][:2]
        assert before["size"] == after["size"] and before["material"] == after["material"]
        assert min(before["pixels"], after["pixels"]) >= args.min_visible
        edited[int(change["what"].split()[1])] = after
    # the metadata alone re-renders both images
    for objects, image in ((source["objects"], original), (edited, modified)):
        rendered, _ = clevr_render.render_clevr(scene_from_source(source, objects), *args.size)
        assert make_games.changed_mask(rendered, image, 16).mean() < 0.002


@pytest.mark.parametrize("seed", range(6))
def test_chart_swaps_two_values_and_boxes_cover_them(seed):
    args = default_args("--size", "400x300")
    original, modified, chart, changes = make_games.make_chart_pair(np.random.default_rng(seed), 0, args)
    assert chart["kind"] in make_games.CHART_KINDS
    assert make_games.check_pair(original, modified, args) is None
    assert_boxes_explain_difference(original, modified, changes, inside=0.95)
    first, second = changes
    assert first["before"] == second["after"] and first["after"] == second["before"]
    assert first["before"] != first["after"]
    for change in changes:
        category, series = change["what"].removeprefix("value ").split("/")
        assert chart["series"][series][chart["categories"].index(category)] == change["before"]


@pytest.mark.parametrize("kind", make_games.PHOTO_EDITS)
def test_photo_edits_are_local_and_boxed(kind):
    args = default_args()
    image = photo()
    for seed in range(3):
        modified, mask, change = make_games.edit_photo(np.random.default_rng(seed), image, kind)
        if make_games.check_pair(image, modified, args) is None:
            break
    else:
        pytest.fail(f"no valid {kind} edit in 3 tries")
    change["bbox"] = make_games.mask_bbox(mask > 0)
    assert_boxes_explain_difference(image, modified, [change], inside=1.0)


def test_photo_run_cycles_through_edit_kinds(tmp_path, photo_folder):
    result = run("--domain", "photo", "--src", photo_folder, "--n", 4, "--out", tmp_path,
                 "--long-side", 200, "--workers", 1)
    assert result.returncode == 0, result.stderr
    pairs = read_pairs(tmp_path)
    assert len({p["source"]["edit"] for p in pairs}) == 4  # one photo, four different edits
    for pair in pairs:
        assert max(pair["width"], pair["height"]) == 200
        assert_boxes_explain_difference(load(tmp_path, pair["original"]), load(tmp_path, pair["modified"]),
                                        pair["changes"], inside=1.0)


def test_check_pair_reasons():
    args = default_args()
    image = photo(128)
    assert "no visible difference" in make_games.check_pair(image, image.copy(), args)
    assert "size" in make_games.check_pair(image, image[:-1], args)
    assert "not local" in make_games.check_pair(image, 255 - image, args)
    speck = image.copy()
    speck[0, 0] = 255 - speck[0, 0]
    assert "too small" in make_games.check_pair(image, speck, args)


def test_import_ready_made_pairs(tmp_path):
    source, out = tmp_path / "pairs", tmp_path / "out"
    source.mkdir()
    image = photo(320)
    modified = image.copy()
    modified[60:100, 40:90] = [255, 0, 0]  # the region that was edited by hand
    modified[150:170, 200:230] = 255 - modified[150:170, 200:230]  # and a second, separate one
    Image.fromarray(image).save(source / "scene_original.png")
    Image.fromarray(modified).save(source / "scene_modified.png")
    Image.fromarray(image).save(source / "same_original.png")  # no difference: skipped
    Image.fromarray(image).save(source / "same_modified.png")
    Image.fromarray(image).save(source / "lonely_original.png")  # no partner: skipped
    result = run("--domain", "photo", "--pairs", source, "--out", out, "--workers", 1)
    assert result.returncode == 0, result.stderr
    assert "lonely_original.png" in result.stderr and "Traceback" not in result.stderr
    [pair] = read_pairs(out)
    assert pair["domain"] == "photo" and pair["source"]["name"] == "scene"
    assert sorted(change["bbox"] for change in pair["changes"]) == [[40, 60, 90, 100], [200, 150, 230, 170]]
    assert (load(out, pair["modified"]) == modified).all()


# ----------------------------------------------------------------------------- bad input


def assert_clean_error(result):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make_games.py: error: "), result.stderr


def test_bad_photos_are_skipped_and_the_run_continues(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(GRACE_HOPPER, "rb") as f:
        data = f.read()
    (src / "a_good.jpg").write_bytes(data)
    (src / "b_truncated.jpg").write_bytes(data[: len(data) // 3])
    (src / "c_notes.txt").write_text("not an image")
    Image.new("P", (32, 32)).save(src / "d_tiny.png")
    Image.fromarray(photo(300)).convert("LA").save(src / "e_grey_alpha.png")  # converted to RGB
    result = run("--domain", "photo", "--src", src, "--n", 10, "--out", tmp_path / "out", "--workers", 2)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    for name in ("b_truncated.jpg", "c_notes.txt", "d_tiny.png"):
        assert sum(name in line for line in result.stderr.splitlines()) == 1  # said once, not once per cycle
    assert f"at least {make_games.MIN_SIDE} px" in result.stderr
    pairs = read_pairs(tmp_path / "out")
    assert {os.path.basename(p["source"]["photo"]) for p in pairs} == {"a_good.jpg", "e_grey_alpha.png"}
    # the text file is left out of the cycle; the truncated and the tiny photo are visited but skipped
    assert "made 5 photo pairs" in result.stdout and "skipped 5" in result.stdout


def test_no_usable_photo_fails(tmp_path):
    (tmp_path / "notes.txt").write_text("no photos here")
    result = run("--domain", "photo", "--src", tmp_path, "--n", 2, "--out", tmp_path / "out")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("make_games.py: error: ")

    Image.new("RGB", (20, 20)).save(tmp_path / "tiny.png")  # an image, but too small: no pair at all
    result = run("--domain", "photo", "--src", tmp_path, "--n", 2, "--out", tmp_path / "out")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("make_games.py: error: no pair")


@pytest.mark.parametrize("case", ["empty src", "no src", "n zero", "n negative", "unwritable out", "bad size",
                                  "src missing", "empty pairs"])
def test_bad_input_gives_one_clear_line(tmp_path, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    flags = {
        "empty src": ["--domain", "photo", "--src", tmp_path / "empty", "--n", 3, "--out", tmp_path / "out"],
        "no src": ["--domain", "photo", "--n", 3, "--out", tmp_path / "out"],
        "n zero": ["--domain", "clevr", "--n", 0, "--out", tmp_path / "out"],
        "n negative": ["--domain", "chart", "--n", -5, "--out", tmp_path / "out"],
        "unwritable out": ["--domain", "chart", "--n", 1, "--out", tmp_path / "a_file" / "out"],
        "bad size": ["--domain", "clevr", "--n", 1, "--size", "big", "--out", tmp_path / "out"],
        "src missing": ["--domain", "photo", "--src", tmp_path / "nowhere", "--out", tmp_path / "out"],
        "empty pairs": ["--domain", "photo", "--pairs", tmp_path / "empty", "--out", tmp_path / "out"],
    }[case]
    assert_clean_error(run(*flags))


def test_existing_output_is_overwritten(tmp_path):
    assert run("--domain", "chart", "--n", 3, "--out", tmp_path, "--workers", 1).returncode == 0
    assert run("--domain", "chart", "--n", 2, "--seed", 5, "--out", tmp_path, "--workers", 1).returncode == 0
    pairs = read_pairs(tmp_path)
    assert len(pairs) == 2
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
