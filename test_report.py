"""
Tests of report.py, on a real tiny-model run and on synthetic run folders.

    python -m pytest -q test_report.py

Run as a script it builds a synthetic run of 100 iterations x 64 games, times the report and
opening it in headless Chromium, and refreshes the docs images assets/report_screenshot.png
and assets/curves.png:

    python test_report.py
"""
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser

import pytest
from PIL import Image, ImageDraw

import report

HERE = os.path.dirname(os.path.abspath(__file__))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NASTY = "<script>alert(1)</script> & </pre></details>\x00\x1b\u202e\ud800 ✓"
CONFIG = {"model": "Qwen/Qwen2.5-VL-7B-Instruct", "data": "games/clevr", "players": 4, "rounds": 2,
          "decision": "judge", "samples": 8, "spy_image": "modified", "max_new_tokens": 1024,
          "temperature": 0.8, "schedule": "iterative", "lr": 1e-05, "kl": 0.04, "rho": 0.95,
          "acc_high": 0.9, "na_low": 0.1, "error_high": 0.4, "na_high": 0.5, "k_min": 5, "patience": 20}


def make_pairs(folder, count, size=(480, 320), seed=0):
    """`count` image pairs: coloured shapes, one of them recoloured in the modified image."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    pairs = []
    for index in range(count):
        pair_id = f"{index:06d}"
        original = Image.new("RGB", size, (225, 228, 232))
        shapes = []
        side = min(size) // 5  # shape size in proportion, so that tiny images work too
        for _ in range(5):
            x, y = rng.randrange(0, size[0] - 2 * side), rng.randrange(0, size[1] - 2 * side)
            shapes.append(([x, y, x + rng.randrange(side, 2 * side), y + rng.randrange(side, 2 * side)],
                           tuple(rng.randrange(256) for _ in range(3))))
        modified = original.copy()
        for image, recolour in [(original, False), (modified, True)]:
            draw = ImageDraw.Draw(image)
            for number, (box, colour) in enumerate(shapes):
                draw.ellipse(box, fill=(20, 200, 60) if recolour and number == 0 else colour)
        paths = {}
        for kind, image in [("original", original), ("modified", modified)]:
            paths[kind] = os.path.join(folder, "images", f"{pair_id}_{kind}.png")
            image.save(paths[kind])
        pairs.append({"id": pair_id, "domain": "clevr", "original": f"images/{pair_id}_original.png",
                      "modified": f"images/{pair_id}_modified.png", "paths": paths,
                      "changes": [{"what": "colour", "before": "other", "after": "green", "bbox": shapes[0][0]}]})
    with open(os.path.join(folder, "pairs.jsonl"), "w") as f:
        for pair in pairs:
            f.write(json.dumps({k: v for k, v in pair.items() if k != "paths"}) + "\n")
    return pairs


def make_game(rng, iteration, stage, index, pair, samples=8):
    spy = rng.randrange(4)
    clues = [{"round": r, "seat": s, "role": "spy" if s == spy else "civilian",
              "reasoning": rng.choice(["I see a red sphere left of a cube, so I will mention the sphere. ",
                                       "My picture may differ; stay vague about colours. "]) * rng.randint(1, 6),
              "clue": rng.choice(["a shiny sphere near the left edge", "there is something green", None,
                                  "three small objects in a row"]), "tokens": rng.randint(20, 300)}
             for r in range(2) for s in range(4)]
    decisions = []
    for _ in range(samples):
        vote = spy if rng.random() < 0.6 else rng.choice([0, 1, 2, 3, "N/A", None])
        decisions.append({"voter": "judge", "text": f"Player {vote} gave the vaguest clue. <box>{vote}</box>",
                          "vote": vote, "tokens": rng.randint(30, 200), "reward": 1.0 if vote == spy else -1.0,
                          "advantage": round(rng.gauss(0, 1), 3) if stage == "decision" else None})
    votes = [sum(d["vote"] == s for d in decisions) for s in range(4)]
    players = [{"seat": s, "role": "spy" if s == spy else "civilian", "reward": round(rng.gauss(0, 0.5), 3),
                "advantage": round(rng.gauss(0, 0.3), 3) if stage == "clue" else None} for s in range(4)]
    return {"iteration": iteration, "stage": stage, "game_index": index, "pair_id": pair["id"], "domain": "clevr",
            "original": pair["paths"]["original"], "modified": pair["paths"]["modified"], "changes": pair["changes"],
            "spy_image": "modified", "spy": spy, "votes": votes, "spy_found": votes[spy] == max(votes),
            "players": players, "clues": clues, "decisions": decisions}


def make_synthetic_run(folder, iterations=30, games=8, pairs=12, evaluation=True, seed=0):
    """A run folder with realistic curves: decision accuracy climbs in the decision stage and falls
    in the clue stage, and the stage switches by the rule of trainer.py."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "games"), exist_ok=True)
    pair_list = make_pairs(os.path.join(folder, "data"), pairs, seed=seed)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(CONFIG, out=folder, iterations=iterations, games=games), f, indent=1)
    stage, dwell, acc, na, acc_ema, na_ema = "decision", 0, 0.3, 0.4, 0.0, 0.0
    metrics = []
    for iteration in range(1, iterations + 1):
        acc = min(0.99, max(0.05, acc + (0.06 if stage == "decision" else -0.07) + rng.gauss(0, 0.03)))
        na = min(0.9, max(0.0, na + (-0.05 if stage == "decision" else 0.02) + rng.gauss(0, 0.02)))
        acc_ema, na_ema = 0.8 * acc_ema + 0.2 * acc, 0.8 * na_ema + 0.2 * na
        metrics.append({"iteration": iteration, "stage": stage, "acc": acc, "na": na, "acc_ema": acc_ema, "na_ema": na_ema,
                        "baseline_spy": -0.3 + 0.2 * math.sin(iteration / 9), "baseline_civilian": 0.1 + 0.05 * math.cos(iteration / 7),
                        "reward_spy": rng.gauss(-0.3, 0.2), "reward_civilian": rng.gauss(0.1, 0.1), "reward_decision": 2 * acc - 1,
                        "loss": rng.gauss(0, 0.05), "kl": 0.002 * iteration ** 0.5, "grad_norm": rng.uniform(0.1, 1),
                        "skipped_update": False, "lr": 1e-5, "invalid_vote_rate": max(0.0, 0.3 - 0.01 * iteration),
                        "clue_format_rate": min(1.0, 0.5 + 0.02 * iteration), "spy_found_rate": acc,
                        "clue_tokens": 120 + rng.gauss(0, 10), "decision_tokens": 200 - iteration + rng.gauss(0, 10),
                        "gen_tokens_per_s": rng.gauss(900, 40), "seconds_generate": rng.gauss(30, 2), "seconds_update": rng.gauss(10, 1),
                        "seconds": rng.gauss(41, 2)})
        with open(os.path.join(folder, "games", f"iter_{iteration:06d}.jsonl"), "w") as f:
            for index in range(games):
                f.write(json.dumps(make_game(rng, iteration, stage, index, rng.choice(pair_list))) + "\n")
        dwell += 1
        to_clue = stage == "decision" and acc_ema >= 0.9 and na_ema <= 0.1
        to_decision = stage == "clue" and (1 - acc_ema >= 0.4 or na_ema >= 0.5)
        if dwell >= 20 or (dwell >= 5 and (to_clue or to_decision)):
            stage, dwell = ("clue" if stage == "decision" else "decision"), 0
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in metrics)
    if evaluation:
        with open(os.path.join(folder, "eval.json"), "w") as f:
            json.dump({"games": 100, "win_rate": 0.56, "win_rate_civilian_side": 0.61, "win_rate_spy_side": 0.51,
                       "decision_acc": 0.72, "decision_acc_reference": 0.41, "na_rate": 0.05, "na_rate_reference": 0.22,
                       "invalid_vote_rate": 0.01, "trained": "runs/demo/latest", "reference": CONFIG["model"]}, f)
    return folder


def run_report(folder, *flags):
    return subprocess.run([sys.executable, os.path.join(HERE, "report.py"), str(folder), *flags],
                          capture_output=True, text=True, timeout=120)


def read_report(folder):
    with open(os.path.join(folder, "report.html"), encoding="utf-8") as f:
        return f.read()


def chromium(*args, timeout=60):
    """Headless Chromium with a fresh profile and no way out: every request goes to a closed proxy."""
    with tempfile.TemporaryDirectory() as profile:
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def open_in_chromium(report, screenshot=None, size=(1280, 1800)):
    """The DOM after the page's script ran, and the seconds it took; optionally a screenshot."""
    start = time.time()
    dom = chromium(f"--window-size={size[0]},{size[1]}", "--dump-dom", "file://" + os.path.abspath(report)).stdout
    seconds = time.time() - start
    if screenshot:
        chromium(f"--window-size={size[0]},{size[1]}", f"--screenshot={screenshot}", "file://" + os.path.abspath(report))
    return dom, seconds


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real run of the trainer on a random tiny model: 2 iterations of 2 games."""
    root = tmp_path_factory.mktemp("real")
    make_pairs(str(root / "pairs"), 6, size=(64, 48))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for command in [["make_tiny_model.py", "--out", str(root / "tiny")],
                    ["rlvr.py", "--model", str(root / "tiny"), "--data", str(root / "pairs"), "--out", str(root / "run"),
                     "--iterations", "2", "--games", "2", "--samples", "2", "--max-new-tokens", "8", "--lora-rank", "0",
                     "--k-min", "2", "--patience", "3"]]:
        done = subprocess.run([sys.executable, os.path.join(HERE, command[0]), *command[1:]], capture_output=True,
                              text=True, timeout=300, env=env, cwd=HERE)
        assert done.returncode == 0, done.stderr[-2000:]
    done = run_report(root / "run")
    assert done.returncode == 0, done.stderr
    return root / "run"


def test_real_run_report(real_run):
    page = read_report(real_run)
    assert os.path.getsize(real_run / "curves.png") > 10_000
    metrics = [json.loads(line) for line in open(real_run / "metrics.jsonl")]
    for row in metrics:
        assert f'<tr data-iteration="{row["iteration"]}">' in page
    assert "no evaluation yet" in page
    for row in metrics:  # the diagnostics: a random model's votes never parse, so no group can teach
        assert row["frac_reward_zero_std"] == 1.0 and row["reward_std"] == 0.0
        assert row["clip_ratio/region_mean"] == 0.0 and 0 <= row["completions/clipped_ratio"] <= 1 and row["entropy"] > 0
    for name in ("frac_reward_zero_std", "reward_std", "clip_ratio/region_mean", "completions/clipped_ratio", "entropy",
                 "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max"):
        assert report.esc(name) in page
    for row in metrics:  # fp32 on the CPU: the sampler and the trainer compute the same log-probs
        assert 0 <= row["sampling/sampling_logp_difference/mean"] <= row["sampling/sampling_logp_difference/max"] < 1e-5
    assert ">max_new_tokens</span> 8<" in page and ">samples</span> 2<" in page
    games = [json.loads(line) for line in open(real_run / "games" / "iter_000002.jsonl")]
    for game in games:
        assert f'<section class="game" data-iteration="2" data-game="{game["game_index"]}">' in page
        for clue in game["clues"]:
            if clue["reasoning"]:
                assert report.esc(clue["reasoning"]) in page
        assert f"player {game['spy'] + 1} (spy): {game['votes'][game['spy']]}" in page
        for decision in game["decisions"]:
            assert report.esc(decision["text"]) in page


def test_missing_metrics_is_one_line_error(tmp_path):
    done = run_report(tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("report.py: error:") and "(run bash run.sh first)" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    done = run_report(tmp_path / "does-not-exist")
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_synthetic_run_odd_inputs(tmp_path):
    folder = make_synthetic_run(str(tmp_path / "run"), iterations=12, games=5, pairs=3, evaluation=False)
    path = os.path.join(folder, "games", "iter_000012.jsonl")
    games = [json.loads(line) for line in open(path)]
    games[0]["original"] = "/nowhere/lost.png"
    games[1]["spy_image"] = "blank"
    games[2]["clues"][0]["reasoning"] = NASTY
    games[2]["decisions"][0]["text"] = NASTY
    with open(path, "w") as f:
        f.writelines(json.dumps(game) + "\n" for game in games)
        f.write('{"truncated line of a killed run\n')
    with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
        f.write('{"iteration": 13, "sta')
    done = run_report(folder, "--max-iterations", "3", "--games-per-iteration", "4")
    assert done.returncode == 0, done.stderr
    page = read_report(folder)
    assert "no evaluation yet" in page
    assert "image not found:<br>/nowhere/lost.png" in page
    assert "blank white picture" in page
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;/pre&gt;" in page
    assert "\x00" not in page and "\x1b" not in page
    # iterations 1, 6 or 7, and 12 sampled, 4 of 5 games each; the note says so
    assert page.count('<section class="game"') == 12
    assert "Games of 3 of 12 logged iterations" in page and "12 (4/5)" in page
    # 3 pairs: at most 6 distinct images embedded however many games show them
    images = json.loads(page.split('<script type="application/json" id="images">')[1].split("</script>")[0])
    assert 1 <= len(images) <= 6
    assert page.count('<div class="box"') >= 12


def test_large_run_stays_small(tmp_path):
    folder = make_synthetic_run(str(tmp_path / "big"), iterations=100, games=64, pairs=40)
    done = run_report(folder)
    assert done.returncode == 0, done.stderr
    page = read_report(folder)
    assert len(page.encode()) < 8_000_000
    assert page.count('<section class="game"') == 20 * 8
    assert page.count("<tr data-iteration=") == 100
    if CHROMIUM:
        dom, _ = open_in_chromium(os.path.join(folder, "report.html"))
        assert 'data-report="ready"' in dom  # the page's script got through every game


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
@pytest.mark.parametrize("kind", ["real", "synthetic"])
def test_renders_in_chromium(kind, request, tmp_path):
    if kind == "real":
        folder = str(request.getfixturevalue("real_run"))
    else:
        folder = make_synthetic_run(str(tmp_path / "run"), iterations=25, games=4, pairs=4)
        assert run_report(folder).returncode == 0
    screenshot = str(tmp_path / "shot.png")
    dom, _ = open_in_chromium(os.path.join(folder, "report.html"), screenshot)
    assert 'data-report="ready"' in dom, "the page's script did not finish"
    assert 'id="curves"' in dom and 'src="data:image/png;base64,' in dom
    assert int(dom.split('data-shown-images="')[1].split('"')[0]) >= 2  # the curves and the first game's image(s)
    with Image.open(screenshot) as image:
        extrema = image.convert("RGB").getextrema()
    assert any(low != high for low, high in extrema), "the screenshot is a single colour"


class FirstTexts(HTMLParser):
    """The page's visible text pieces in document order, from <body> on (scripts and styles left out)."""

    def __init__(self):
        super().__init__()
        self.texts, self.in_body, self.skip = [], False, 0

    def handle_starttag(self, tag, attrs):
        self.in_body |= tag == "body"
        self.skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style")

    def handle_data(self, data):
        if self.in_body and not self.skip and data.strip():
            self.texts.append(" ".join(data.split()))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_headline_is_the_first_text_and_equals_eval_json(real_run, tmp_path):
    """A real run evaluated by evaluate.py: the page, as the browser renders it, opens with the judge's
    accuracy before -> after, chance and the win rate of eval.json, then their standard errors and interval."""
    folder = tmp_path / "run"
    shutil.copytree(real_run, folder)
    done = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--out", str(folder), "--games", "4"],
                          capture_output=True, text=True, timeout=300, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert run_report(folder).returncode == 0
    e = json.load(open(folder / "eval.json"))
    dom, _ = open_in_chromium(str(folder / "report.html"))
    assert 'data-report="ready"' in dom
    parser = FirstTexts()
    parser.feed(dom)
    assert parser.texts[0] == (f"Judge accuracy {e['decision_acc_baseline']:.3f} → {e['decision_acc']:.3f} "
                               f"(chance {e['chance']:.3f}) · win rate {e['win_rate']:.3f}")
    assert e["chance"] == 0.25 and parser.texts[1].startswith(
        f"In {e['games'] // 2} held-out games, the trained judge named the spy in {e['decision_acc']:.3f} ± "
        f"{e['decision_acc_se']:.3f} of its votes; the initial model, judging the same games: "
        f"{e['decision_acc_baseline']:.3f} ± {e['decision_acc_baseline_se']:.3f}")
    low, high = e["win_rate_ci95"]
    assert f"{e['win_rate']:.3f} of {e['games']} games (95% interval {low:.3f}-{high:.3f})" in parser.texts[2]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as root:
        folder = make_synthetic_run(os.path.join(root, "run"), iterations=100, games=64, pairs=40)
        start = time.time()
        done = run_report(folder)
        print(done.stdout.strip() or done.stderr.strip(), f"in {time.time() - start:.1f} s")
        report_path = os.path.join(folder, "report.html")
        os.makedirs(os.path.join(HERE, "assets"), exist_ok=True)
        shutil.copy(os.path.join(folder, "curves.png"), os.path.join(HERE, "assets", "curves.png"))
        if CHROMIUM:
            dom, seconds = open_in_chromium(report_path)
            print(f"100 x 64 report: {os.path.getsize(report_path) / 1e6:.2f} MB, opened by headless chromium "
                  f"in {seconds:.2f} s (script ran: {'data-report=' + chr(34) + 'ready' in dom})")
            # headless chromium cannot scroll before a screenshot: shoot a tall page, keep the game browser
            top = int(dom.split('data-browse-top="')[1].split('"')[0])
            screenshot = os.path.join(HERE, "assets", "report_screenshot.png")
            open_in_chromium(report_path, screenshot, size=(1280, top + 1250))
            with Image.open(screenshot) as image:
                image.crop((0, top - 20, 1280, top + 1250)).save(screenshot, optimize=True)


def test_vqa_table_and_examples_are_shown_and_escaped(tmp_path):
    folder = make_synthetic_run(str(tmp_path / "run"), iterations=3, games=2, pairs=3)
    page, _ = report.build_report(folder, 20, 8, 320)
    assert "no vqa.json yet" in page
    hostile = "<script>alert(1)</script>"
    row = {"questions": 2, "chance": 0.25, "initial": {"accuracy": 0.5, "se": 0.35}, "trained": {"accuracy": 1.0, "se": 0.0},
           "difference": 0.5, "se_difference": 0.5}
    with open(os.path.join(folder, "vqa.json"), "w") as f:
        json.dump({"data": os.path.join(folder, "data"), "decoding": "greedy", "models": {"initial": hostile, "trained": "ckpt"},
                   "kinds": {"attribute" + hostile: row}, "overall": row}, f)
    questions = [{"pair_id": "000000", "image": "pair", "kind": "differ", "question": "Which? " + hostile,
                  "choices": ["x", "y"], "answer": "A", "about": {}},
                 {"pair_id": "000001", "image": "original", "kind": "count", "question": "How many?",
                  "choices": None, "answer": "2", "about": {}}]
    answers = [{"index": 0, "initial": {"boxed": hostile, "correct": False}, "trained": {"boxed": "A", "correct": True}},
               {"index": 1, "initial": {"boxed": "2", "correct": True}, "trained": "not a dict"}]
    for name, rows in [("vqa_questions.jsonl", questions), ("vqa_answers.jsonl", answers)]:
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    page, _ = report.build_report(folder, 20, 8, 320)
    section = page.split("(vqa.py)</h2>")[1].split("<h2>")[0]
    assert "<script>alert" not in page and section.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 4
    assert "0.5 ± 0.35" in section and "1 ± 0" in section and "0.5 ± 0.5" in section
    assert section.count('<img src="data:image/') == 3  # the pair question shows both pictures
    assert section.index("Which?") < section.index("How many?")  # answers that differ come first
