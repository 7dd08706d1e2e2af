"""Tests of what a new user meets first: the headline numbers and their uncertainty, run.sh refusing a
folder that is not its own, one-line model-loading errors, --help defaults, quiet known warnings, the
config table, warm-start messages, the optional trackers, the model card, and the README's install
line in a fresh venv (slow).

    python -m pytest -q test_first_screen.py
"""
import json
import math
import os
import re
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest

import checkpoints
import models
import cli
import evaluate
import report
import selfplay
import warm_start

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def run(args, **env):
    return subprocess.run(args, cwd=HERE, capture_output=True, text=True, timeout=600, env={**ENV, **env})


def fake_game(spy, votes):
    return SimpleNamespace(spy=spy, decisions=[SimpleNamespace(parsed=v) for v in votes])


# -----------------------------------------------------------------------------
# The headline and its uncertainty


def test_per_game_standard_error_and_wilson_interval_by_hand():
    games = [fake_game(1, [1, 1]), fake_game(0, [0, 2]), fake_game(3, [None, "N/A"])]  # accuracies 1, 0.5, 0
    assert evaluate.per_game_se(games) == pytest.approx(0.5 / math.sqrt(3))
    assert evaluate.per_game_se(games[:1]) is None
    low, high = evaluate.wilson_interval(8, 10)  # the textbook 95% Wilson interval of 8 / 10
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert evaluate.wilson_interval(0, 4)[0] == 0.0 and evaluate.wilson_interval(4, 4)[1] == 1.0


def test_headline_says_before_after_chance_win_rate_and_the_game():
    evaluation = {"games": 200, "decision_acc": 0.736, "decision_acc_se": 0.031, "decision_acc_baseline": 0.223,
                  "decision_acc_baseline_se": 0.02, "chance": 0.25, "win_rate": 0.815, "win_rate_ci95": [0.755, 0.863],
                  "invalid_vote_rate": 0.0}
    metrics = [{"iteration": i, "acc": a} for i, a in enumerate([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], 1)]
    title, sentences = report.headline(evaluation, {"spy_image": "blank", "players": 4}, metrics)
    assert title == "Judge accuracy 0.223 → 0.736 (chance 0.250) · win rate 0.815"
    assert "0.736 ± 0.031" in sentences[0] and "0.223 ± 0.020" in sentences[0] and "100 held-out games" in sentences[0]
    assert "(95% interval 0.755-0.863)" in sentences[1]
    assert "blank picture" in sentences[2] and "not to see" in sentences[2]
    assert "0.300 (first 5 iterations) to 0.500 (last 5)" in sentences[3]
    _, sentences = report.headline({**evaluation, "invalid_vote_rate": 1.0}, {"spy_image": "modified"}, metrics)
    assert any("do not parse" in s for s in sentences) and any("edited copy" in s for s in sentences)
    title, _ = report.headline(None, {}, [])
    assert title == "No evaluation yet"


def test_every_eval_field_is_explained_in_the_readme_or_docs():
    documented = open(os.path.join(HERE, "README.md")).read() + open(os.path.join(HERE, "docs", "report.md")).read()
    for field in report.EVAL_FIELDS:
        assert f"`{field}`" in documented, field


def test_vqa_section_folds_when_the_initial_model_is_not_better_than_chance():
    untaught = {"models": {"initial": "a", "trained": "b"}, "overall": {"chance": 0.3, "initial": {"accuracy": 0.0}}}
    taught = {"models": {"initial": "a", "trained": "b"}, "overall": {"chance": 0.3, "initial": {"accuracy": 0.6}}}
    assert report.vqa_not_taught(untaught) and not report.vqa_not_taught(taught)
    assert not report.vqa_not_taught({}) and not report.vqa_not_taught({"models": {"x": 1}, "overall": "bad"})


# -----------------------------------------------------------------------------
# run.sh and its run folder


def test_run_folder_problem_names_foreign_files_configs_and_other_models(tmp_path):
    assert checkpoints.run_folder_problem(str(tmp_path / "new"), "m", "d") is None
    run_folder = tmp_path / "run"
    os.makedirs(run_folder / "games")
    for name in ("metrics.jsonl", "eval.json", "latest", "report.html", ".DS_Store", "config.json.tmp"):
        (run_folder / name).write_text("")
    os.makedirs(run_folder / "ckpt-000003")
    (run_folder / "config.json").write_text(json.dumps({"model": "tiny-vlm", "data": "games/x/", "lora_rank": 0,
                                                        "dtype": "torch.float32"}))
    assert checkpoints.run_folder_problem(str(run_folder), "tiny-vlm", "games/x") is None
    problem = checkpoints.run_folder_problem(str(run_folder), "other-model", "games/x")
    assert "MODEL=tiny-vlm on DATA=games/x/" in problem and "this command gives MODEL=other-model;" in problem
    (run_folder / "thesis.tex").write_text("mine")
    assert "holds files no run wrote (thesis.tex)" in checkpoints.run_folder_problem(str(run_folder), "tiny-vlm", "games/x")
    model_folder = tmp_path / "model"
    os.makedirs(model_folder)
    (model_folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}))
    assert "is not a run's config" in checkpoints.run_folder_problem(str(model_folder), "m", "d")


def snapshot(folder):
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def test_run_sh_refuses_a_foreign_folder_and_leaves_it_untouched(tiny_model, tmp_path):
    out = tmp_path / "someone-elses"
    os.makedirs(out)
    (out / "config.json").write_text(json.dumps({"architectures": ["X"], "hidden_size": 8}))
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    done = run(["bash", "run.sh"], QUICK="1", MODEL=tiny_model, DATA=str(tmp_path / "data"), OUT=str(out))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: {out} holds files no run wrote (notes.txt); choose another OUT, or empty it if it is yours to lose"
    assert snapshot(out) == before and not os.path.exists(tmp_path / "data")


def test_run_sh_names_a_different_model_on_resume(tiny_model, tmp_path):
    out = tmp_path / "run"
    os.makedirs(out)
    (out / "config.json").write_text(json.dumps({"model": tiny_model, "data": str(tmp_path / "data"), "lora_rank": 0,
                                                 "dtype": "torch.float32"}))
    before = snapshot(out)
    done = run(["bash", "run.sh"], QUICK="1", MODEL="/nonexistent", DATA=str(tmp_path / "data"), OUT=str(out))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out} is a run of MODEL={tiny_model}") and "this command gives MODEL=/nonexistent;" in last
    assert snapshot(out) == before


def test_model_loading_error_names_the_path_without_library_internals(tmp_path):
    done = run([sys.executable, "evaluate.py", "--help"])  # cheap: the flags of a script that loads models
    assert "(default: 100)" in done.stdout
    assert "no such folder" in models.model_load_problem(str(tmp_path / "nothing"))
    assert "no complete model" in models.model_load_problem(str(tmp_path))
    (tmp_path / "f").write_text("")
    assert "a file, not a model folder" in models.model_load_problem(str(tmp_path / "f"))
    with pytest.raises(SystemExit) as stop:
        selfplay.load_processor(str(tmp_path / "nothing"))
    message = str(stop.value.code)
    assert message.startswith(f"error: cannot load model '{tmp_path / 'nothing'}': no such folder") and "\n" not in message
    assert "Repo id" not in message and "HFValidationError" not in message and "[" not in message


# -----------------------------------------------------------------------------
# --help, warnings, the config, warm-start messages


def test_help_shows_every_default():
    done = run([sys.executable, "rlvr.py", "--help"])
    flat = " ".join(done.stdout.split())
    for text in ("(default: 100)", "(default: 0.04)", "(default: iterative)", "(default: none)", "(default: True)"):
        assert text in flat
    assert "(default: None)" not in flat and "(default: False)" not in flat


def test_known_library_warnings_are_silenced_and_others_are_not(tiny_model):
    import torch
    import trainer
    cfg = SimpleNamespace(model=tiny_model, device="cpu", dtype=torch.float32, lora_rank=4, gradient_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        cli.quiet_library_warnings()  # simplefilter above reset them, as a fresh process starts without them
        trainer.build_policy(cfg)
        warnings.warn("something a user should read", FutureWarning)
    messages = [str(w.message) for w in caught]
    assert not any("gradient_checkpointing" in m for m in messages), messages
    assert "something a user should read" in messages


def test_config_table_has_every_key_once_and_fits_the_width():
    config = {f"flag_{i}": i / 7 for i in range(23)} | {"model": "runs/cpu-start/warm-start"}
    table = cli.format_config(config, width=100)
    cells = re.findall(r"(\S+) = (\S+)", table)
    assert sorted(k for k, _ in cells) == sorted(config) and all(len(line) <= 100 for line in table.splitlines())
    assert len(table.splitlines()) < len(config)  # several keys per line


def test_warm_start_summary_says_which_checks_apply():
    taught = warm_start.taught_tasks([0, 0.5, 0.5, 0, 0], 0)
    assert taught == {"clue", "vote"}
    text = warm_start.held_out_summary(taught, 0.495, None, 60)
    assert "not checked (the list task is not in this mix)" in text and "none is expected" in text
    assert "list accuracy 0.000" not in text
    text = warm_start.held_out_summary(warm_start.taught_tasks([0, 0.1, 0.1, 0.6, 0.2], 600), 0.97, 0.8, 60)
    assert text == "held-out yes/no accuracy 0.970 (chance 0.5), list accuracy 0.800 (60 pictures)"


# -----------------------------------------------------------------------------
# Trackers


def train_two_iterations(tiny_model, pairs_dir, out, tracker, **env):
    done = run([sys.executable, "rlvr.py", "--model", tiny_model, "--data", pairs_dir, "--out", str(out),
                "--iterations", "2", "--games", "2", "--rounds", "1", "--samples", "2", "--max-new-tokens", "4",
                "--lora-rank", "0", "--report-to", tracker], **env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def expected_scalars(metrics):
    return {(row["iteration"], k): float(v) for row in metrics for k, v in row.items()
            if isinstance(v, (int, float)) and k != "iteration"}


def test_tensorboard_scalars_equal_metrics_jsonl(tiny_model, pairs_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    metrics = train_two_iterations(tiny_model, pairs_dir, tmp_path / "run", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    logged = {(e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    expected = expected_scalars(metrics)
    assert set(logged) == set(expected) and ("lr" in {k for _, k in expected})
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-12) or (math.isnan(value) and math.isnan(logged[key]))
    assert len(events.Images("games/1")) == 2 and "config" in str(events.Tags()["tensors"])


def test_trackio_scalars_equal_metrics_jsonl(tiny_model, pairs_dir, tmp_path):
    pytest.importorskip("trackio")
    env = {"TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}  # a local project, no network
    metrics = train_two_iterations(tiny_model, pairs_dir, tmp_path / "run", "trackio", **env)
    read = run([sys.executable, "-c", "import json; from trackio.sqlite_storage import SQLiteStorage; "
                "print(json.dumps(SQLiteStorage.get_logs('vision-zero', 'run'), default=str))"], **env)
    logs = json.loads(read.stdout.strip().splitlines()[-1])
    logged = {(row["step"], k): v for row in logs for k, v in row.items() if isinstance(v, (int, float))
              and not isinstance(v, bool) and k != "step"}
    for key, value in expected_scalars(metrics).items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    assert sum("games" in row for row in logs) == 2  # the table of games, once per iteration


def test_wandb_offline_logs_one_run_with_its_games_tables(tiny_model, pairs_dir, tmp_path):
    pytest.importorskip("wandb")
    train_two_iterations(tiny_model, pairs_dir, tmp_path / "run", "wandb", WANDB_MODE="offline", WANDB_SILENT="true")
    run_id = json.load(open(tmp_path / "run" / "tracking.json"))["wandb_id"]
    runs = [name for name in os.listdir(tmp_path / "run" / "wandb") if name.startswith("offline-run-")]
    assert len(runs) == 1 and runs[0].endswith(run_id)  # what `wandb sync` uploads
    tables = os.listdir(tmp_path / "run" / "wandb" / runs[0] / "files" / "media" / "table")
    assert sorted(name.split("_")[1] for name in tables) == ["0", "1"]  # a games table per iteration


def test_a_missing_tracker_package_is_one_line(monkeypatch, tmp_path):
    import tracking
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(SystemExit) as stop:
        tracking.open_tracker("wandb", str(tmp_path), {})
    assert str(stop.value.code) == "error: --report-to wandb needs the wandb package: pip install wandb (or REPORT_TO=none)"
    assert tracking.open_tracker("none", str(tmp_path), {}) is None


# -----------------------------------------------------------------------------
# The model card


def test_model_card_numbers_equal_eval_and_vqa(tiny_model, pairs_dir, tmp_path):
    out = tmp_path / "run"
    train_two_iterations(tiny_model, pairs_dir, out, "none")
    evaluation = {"games": 200, "win_rate": 0.815, "win_rate_ci95": [0.7551, 0.8631], "decision_acc": 0.7362,
                  "decision_acc_se": 0.0311, "decision_acc_baseline": 0.2231, "decision_acc_baseline_se": 0.0207,
                  "chance": 0.25, "invalid_vote_rate": 0.0}
    vqa = {"models": {"initial": tiny_model, "trained": "ckpt"},
           "kinds": {"exist": {"questions": 10, "chance": 0.5, "initial": {"accuracy": 0.6, "se": 0.15},
                               "trained": {"accuracy": 0.7, "se": 0.1449}, "difference": 0.1, "se_difference": 0.1}},
           "overall": {"questions": 10, "chance": 0.5, "initial": {"accuracy": 0.6, "se": 0.15},
                       "trained": {"accuracy": 0.7, "se": 0.1449}, "difference": 0.1, "se_difference": 0.1}}
    (out / "eval.json").write_text(json.dumps(evaluation))
    (out / "vqa.json").write_text(json.dumps(vqa))
    done = run([sys.executable, "export.py", str(out), "--to", str(tmp_path / "exported"), "--dtype", "float32"])
    assert done.returncode == 0, done.stderr[-2000:]
    card = open(tmp_path / "exported" / "README.md").read()
    front = card.split("---\n")[1]
    assert "library_name: transformers" in front and "pipeline_tag: image-text-to-text" in front and "- vision-zero" in front
    assert "base_model" not in front  # a local folder is no Hub id
    for key, value in evaluation.items():
        assert f"| `{key}` | {json.dumps(value)} |" in card
    assert "Judge accuracy 0.223 → 0.736 (chance 0.250) · win rate 0.815" in card
    assert "| overall | 10 | 0.500 | 0.600 ± 0.150 | 0.700 ± 0.145 | 0.100 ± 0.100 |" in card
    assert "2 decision-stage iterations" in card and "python rlvr.py --model" in card
    config = json.load(open(out / "config.json"))
    assert config["command"].startswith("python rlvr.py --model ") and f"--data {pairs_dir}" in config["command"]


# -----------------------------------------------------------------------------
# The README's install line, in a fresh venv


def readme_commands():
    """The install line, the CPU torch hint and the quick-test command of the README's first code block."""
    readme = open(os.path.join(HERE, "README.md")).read()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    install = next(line for line in lines if line.startswith("pip install -r"))
    torch_hint = re.search(r"pip install torch==\S+ --index-url \S+", block).group(0)
    tests = next(line for line in lines if line.startswith("python -m pytest -q") and "slow" not in line)
    return install, torch_hint, tests


def test_readme_torch_hint_pins_the_constraints_version():
    _, torch_hint, _ = readme_commands()
    pinned = next(line for line in open(os.path.join(HERE, "constraints.txt")) if line.startswith("torch=="))
    assert torch_hint.split()[2] == pinned.strip()  # the CPU build the constraints then keep


@pytest.mark.slow
def test_readme_install_line_makes_the_tests_run_in_a_fresh_venv(tmp_path):
    install, torch_hint, tests = readme_commands()
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    python = str(venv / "bin" / "python")
    # torch first, as the README's CPU hint does; here the pinned CPU wheel comes from pip's own sources
    done = run([python, "-m", "pip", "install", "-q", torch_hint.split()[2]])
    assert done.returncode == 0, done.stderr[-2000:]
    done = run([python, "-m", *install.split()])
    assert done.returncode == 0, done.stderr[-2000:]
    done = run([python, *tests.split()[1:], "test_parsers.py", "-p", "no:cacheprovider"])
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
