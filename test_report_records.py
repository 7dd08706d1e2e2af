"""
Tests that report.py writes no value of a run folder into the page as markup (a shared run
folder may hold crafted values in any field, numbers included) and shows a malformed record as
"unreadable record" instead of crashing.

    python -m pytest -q test_report_records.py
"""
import json
import os

from test_report import make_synthetic_run, read_report, run_report

INJECTED = "</script><script>document.title='pwned'</script><img src=x onerror=alert(1)>"


def rewrite(path, change):
    """Apply change(list of records) to a .jsonl file."""
    rows = [json.loads(line) for line in open(path)]
    change(rows)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def assert_nothing_injected(page):
    assert "<script>document" not in page and "<img src=x" not in page and "</script><script>" not in page
    assert page.count("<script") == 2  # the page's own: the images JSON and the game browser
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_crafted_values_in_every_number_field_are_escaped(tmp_path):
    folder = make_synthetic_run(str(tmp_path / "run"), iterations=3, games=2, pairs=2, evaluation=True)
    games = os.path.join(folder, "games", "iter_000003.jsonl")

    def craft_game(rows):
        for player in rows[0]["players"]:
            player["reward"] = player["advantage"] = INJECTED
        for decision in rows[0]["decisions"]:
            decision["reward"], decision["advantage"], decision["tokens"] = INJECTED, INJECTED, INJECTED
        rows[0]["votes"] = [INJECTED, 1, 2, 3]
        rows[1]["iteration"] = rows[1]["game_index"] = INJECTED  # the record that cannot be rendered

    def craft_metrics(rows):
        rows[-1].update(acc_ema=INJECTED, na_ema=INJECTED, reward_spy=INJECTED, loss=INJECTED)

    rewrite(games, craft_game)
    rewrite(os.path.join(folder, "metrics.jsonl"), craft_metrics)
    with open(os.path.join(folder, "eval.json"), "w") as f:
        json.dump({"win_rate": INJECTED, "games": 2}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"lr": INJECTED, "acc_high": 0.9}, f)
    done = run_report(folder, "--max-iterations", "3")
    assert done.returncode == 0, done.stderr
    page = read_report(folder)
    assert_nothing_injected(page)
    # the first game is rendered with every crafted value shown as text; the second is unreadable
    assert page.count("&lt;/script&gt;&lt;script&gt;document.title=") >= 20 and "unreadable record" in page


def test_malformed_records_read_unreadable_record(tmp_path):
    folder = make_synthetic_run(str(tmp_path / "run"), iterations=3, games=8, pairs=2, evaluation=False)
    games = os.path.join(folder, "games", "iter_000003.jsonl")

    def break_games(rows):
        rows[0]["game_index"] = "first"
        rows[1]["clues"][0]["round"] = "one"
        rows[2]["clues"] = "not a list"
        rows[3]["players"] = None
        rows[4]["decisions"] = {"voter": 1}
        rows[5]["votes"] = "3 votes"
        rows[6]["original"] = ["not", "a", "path"]

    rewrite(games, break_games)
    rewrite(os.path.join(folder, "metrics.jsonl"), lambda rows: rows[1].update(iteration="2"))
    with open(games, "a") as f:
        f.write('{"iteration": 3, "clues": [{"rou')  # the cut last line of a kill
    done = run_report(folder, "--max-iterations", "3", "--games-per-iteration", "8")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    page = read_report(folder)
    assert page.count("unreadable record") >= 5  # at least the 4 games and the metrics row that crashed it before
    assert page.count('<section class="game" data-iteration="3"') == 8  # every game browsable, the last intact
    assert page.count('data-iteration="1"') >= 2  # iteration 1's games and its metrics row
    assert_nothing_injected(page)
