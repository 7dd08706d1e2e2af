"""
Tests of what a run folder survives: checkpoints kept two deep and checked when written, a resume
that falls back from a damaged newest checkpoint (weights, optimizer, state, `latest`) with one
line saying which iterations are redone, one line and a stop when none is usable, a metrics log
whose last line was cut by a kill, run.sh's progress read through the same code, and a kill -9
while a checkpoint is written followed by a resume.

    python -m pytest -q test_checkpoints.py
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import checkpoints

HERE = os.path.dirname(os.path.abspath(__file__))


def fake_policy(weights=None):
    """What save_checkpoint needs of a policy and a processor: save_pretrained into a folder."""
    def save(folder):
        os.makedirs(folder, exist_ok=True)
        save_file(weights or {"w": torch.arange(6.0)}, os.path.join(folder, "model.safetensors"))
    return SimpleNamespace(model=SimpleNamespace(save_pretrained=save)), SimpleNamespace(save_pretrained=lambda folder: None)


def optimizer():
    weight = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([weight], lr=0.1)
    weight.sum().backward()
    opt.step()
    return opt


def save(out, iteration, stage="decision"):
    policy, processor = fake_policy()
    checkpoints.save_checkpoint(str(out), policy, processor, optimizer(), {"iteration": iteration, "stage": stage})


def folders(out):
    return sorted(name for name in os.listdir(out) if name.startswith("ckpt-"))


def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def test_keeps_the_last_two_and_removes_leftovers(tmp_path):
    save(tmp_path, 1)
    (tmp_path / "ckpt-000000").mkdir()  # an empty leftover of a kill during an old deletion
    save(tmp_path, 2)
    assert folders(tmp_path) == ["ckpt-000001", "ckpt-000002"]
    (tmp_path / "ckpt-000009").mkdir()  # a stale empty folder, newer than any real one
    save(tmp_path, 3)
    assert folders(tmp_path) == ["ckpt-000002", "ckpt-000003"]
    assert open(tmp_path / "latest").read() == "ckpt-000003"
    folder, state, note = checkpoints.resume_point(str(tmp_path))
    assert folder.endswith("ckpt-000003") and state == {"iteration": 3, "stage": "decision"} and note is None
    assert checkpoints.progress(str(tmp_path)) == "3 decision"
    assert checkpoints.progress(str(tmp_path / "not-started")) == "0 start"


DAMAGE = {
    "truncated weights": lambda out: truncate(out / "ckpt-000003" / "model.safetensors"),
    "empty weights": lambda out: truncate(out / "ckpt-000003" / "model.safetensors", keep=0),
    "no weights": lambda out: os.remove(out / "ckpt-000003" / "model.safetensors"),
    "truncated optimizer": lambda out: truncate(out / "ckpt-000003" / "optimizer.pt"),
    "truncated state": lambda out: truncate(out / "ckpt-000003" / "state.json"),
    "state not an object": lambda out: (out / "ckpt-000003" / "state.json").write_text("[3]"),
    "no state (killed mid-write)": lambda out: os.remove(out / "ckpt-000003" / "state.json"),
    "missing weight shard": lambda out: (out / "ckpt-000003" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}})),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_falls_back_to_the_previous(tmp_path, damage):
    for iteration in (1, 2, 3):
        save(tmp_path, iteration)
    DAMAGE[damage](tmp_path)
    folder, state, note = checkpoints.resume_point(str(tmp_path))
    assert folder.endswith("ckpt-000002") and state["iteration"] == 2
    assert "ckpt-000003 is damaged" in note and note.endswith("resuming from ckpt-000002, iteration 3 will be redone")
    assert "\n" not in note
    assert checkpoints.progress(str(tmp_path)) == "2 decision"
    save(tmp_path, 3)  # the redone iteration replaces the damaged folder; the good one stays
    assert folders(tmp_path) == ["ckpt-000002", "ckpt-000003"]


def test_latest_empty_or_naming_a_missing_folder(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    (tmp_path / "latest").write_text("")
    folder, _, note = checkpoints.resume_point(str(tmp_path))
    assert folder.endswith("ckpt-000002") and "latest is empty" in note and "redone" not in note
    (tmp_path / "latest").write_text("ckpt-000005")
    folder, _, note = checkpoints.resume_point(str(tmp_path))
    assert folder.endswith("ckpt-000002") and "latest names ckpt-000005, which is missing" in note
    assert note.endswith("iterations 3-5 will be redone")


def test_no_usable_checkpoint_is_one_line_and_a_stop(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    for name in folders(tmp_path):
        truncate(tmp_path / name / "optimizer.pt")
    with pytest.raises(SystemExit) as stop:
        checkpoints.resume_point(str(tmp_path))
    message = str(stop.value)
    assert message.startswith("error: no usable checkpoint") and "\n" not in message
    assert "ckpt-000002 is damaged" in message and "ckpt-000001 is damaged" in message and "another --out" in message
    (tmp_path / "latest").write_text("ckpt-000002")
    for name in folders(tmp_path):
        os.remove(tmp_path / name / "state.json")
    with pytest.raises(SystemExit, match="no usable checkpoint"):
        checkpoints.progress(str(tmp_path))


def test_a_checkpoint_that_does_not_read_back_never_replaces_the_good_one(tmp_path):
    save(tmp_path, 1)
    _, processor = fake_policy()
    broken = SimpleNamespace(model=SimpleNamespace(save_pretrained=lambda folder: (
        os.makedirs(folder, exist_ok=True), open(os.path.join(folder, "model.safetensors"), "wb").close())))
    with pytest.raises(SystemExit, match="does not read back"):
        checkpoints.save_checkpoint(str(tmp_path), broken, processor, optimizer(), {"iteration": 2, "stage": "decision"})
    assert open(tmp_path / "latest").read() == "ckpt-000001"
    assert checkpoints.resume_point(str(tmp_path))[0].endswith("ckpt-000001")


def test_trim_log_skips_a_cut_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"iteration": i, "acc": 0.1 * i}) + "\n" for i in range(1, 5)) + '{"iteration": 5, "ac')
    checkpoints.trim_log(str(log), 3)
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2, 3]
    log.write_text('{"iteration": 1}\n[1, 2]\n{"iteration": "2"}\n{"iteration": 2}\n{"itera')
    checkpoints.trim_log(str(log), 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"iteration": 1}, {"iteration": 2}]


# A stage script whose torch.save kills the process (SIGKILL, no cleanup) half way through writing
# the optimizer state of one checkpoint: what a kill -9 or a power cut at that moment leaves.
KILL_DURING_SAVE = """
import os, runpy, signal, sys, torch
save, target = torch.save, sys.argv.pop(1)
def save_then_die(obj, path, *args, **kwargs):
    save(obj, path, *args, **kwargs)
    if str(path).endswith(os.path.join(target, "optimizer.pt")):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
sys.argv[0] = "rlvr.py"
runpy.run_path("rlvr.py", run_name="__main__")
"""


@pytest.mark.slow
def test_kill_during_checkpoint_write_then_resume_and_a_damaged_newest(tiny_model, pairs_dir, tmp_path):
    out = tmp_path / "run"
    flags = ["--model", tiny_model, "--data", pairs_dir, "--out", str(out), "--games", "2", "--samples", "2",
             "--max-new-tokens", "4", "--lora-rank", "0", "--save-every", "1"]  # full fine-tuning saves every 10 by default

    def run(*args, iterations):
        return subprocess.run([sys.executable, *args, *flags, "--iterations", str(iterations)], cwd=HERE,
                              capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})

    killed = run("-c", KILL_DURING_SAVE, "ckpt-000002", iterations=3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert open(out / "latest").read() == "ckpt-000001" and not (out / "ckpt-000002" / "state.json").exists()
    resumed = run("rlvr.py", iterations=3)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "ckpt-000002 is damaged" in resumed.stdout and "iteration 2 will be redone" in resumed.stdout
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["iteration"] for m in metrics] == [1, 2, 3]  # iteration 2 logged once although played twice
    assert folders(out) == ["ckpt-000002", "ckpt-000003"]

    truncate(out / "ckpt-000003" / "model.safetensors")  # damaged after it was written
    again = run("rlvr.py", iterations=4)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert "resuming from ckpt-000002, iteration 3 will be redone" in again.stdout
    assert [json.loads(line)["iteration"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert folders(out) == ["ckpt-000003", "ckpt-000004"]

    for name in folders(out):
        os.remove(out / name / "optimizer.pt")
    progress = subprocess.run([sys.executable, "-c", "import sys, checkpoints; print(checkpoints.progress(sys.argv[1]))", str(out)],
                              cwd=HERE, capture_output=True, text=True, timeout=300)
    assert progress.returncode == 1 and progress.stdout == "" and "Traceback" not in progress.stderr
    assert progress.stderr.startswith("error: no usable checkpoint") and progress.stderr.count("\n") == 1
