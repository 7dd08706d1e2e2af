"""Tests of vqa.py: every answer re-derived from the generator's metadata by a check written here,
questions only from held-out pairs, determinism, a constant answerer scoring chance, bad input.

    python -m pytest -q test_vqa.py
"""
import json
import math
import os
import subprocess
import sys
import weakref
import zlib
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoints
import make_games
import selfplay
import trainer
import vqa

HERE = os.path.dirname(os.path.abspath(__file__))
DOMAINS = ("clevr", "chart", "cells")


def held_out(pair_id):
    return zlib.crc32(pair_id.encode()) % 100 < 10  # selfplay.read_pairs' split, written out again


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Per domain a make_games.py folder with its first 10 held-out pairs and 3 training pairs
    (made one by one with make_games' own pair maker: a full --n would render ten times more)."""
    folders = {}
    for domain in DOMAINS:
        out = str(tmp_path_factory.mktemp(domain))
        args = make_games.parse_args(["--domain", domain, "--out", out, "--n", "1000"])
        args.maker, args.id_digits = domain, 6
        os.makedirs(os.path.join(out, "images"))
        make_games.init_worker(args)
        wanted = [i for i in range(1000) if held_out(f"{i:06d}")][:10] + [0, 1, 2]
        with open(os.path.join(out, "pairs.jsonl"), "w") as f:
            for index in wanted:
                _, record, _ = make_games.make_pair(index)
                if record:
                    f.write(json.dumps(record) + "\n")
        folders[domain] = out
    return folders


def chosen(q):
    return q["choices"][vqa.LETTERS.index(q["answer"])] if q["choices"] else q["answer"]


def fits(obj, about):
    return all(obj.get(k) == v for k, v in about.items())


def check_clevr(q, pair):
    objects = pair["source"]["objects"]
    if q["kind"] in ("count", "exist"):
        assert q["image"] == "original" and all(o["pixels"] >= 150 for o in objects)
        n = len([o for o in objects if fits(o, q["about"])])
        assert (str(n) if q["kind"] == "count" else ("yes" if n else "no")) == q["answer"]
        for word in q["about"].values():
            assert word in q["question"]
    elif q["kind"] == "attribute":
        target = [o for o in objects if fits(o, q["about"]["object"])]
        assert len(target) == 1 and target[0]["pixels"] >= 150
        assert target[0][q["about"]["asked"]] == chosen(q)
        assert len(set(q["choices"])) == len(q["choices"])
    else:
        assert q["kind"] == "differ" and q["image"] == "pair"
        changed = sorted(int(c["what"].replace("object ", "")) for c in pair["changes"])
        right = " and ".join("{size} {colour} {material} {shape}".format(**objects[i]) for i in changed)
        assert chosen(q) == right and q["choices"].count(right) == 1


def check_chart(q, pair):
    chart = pair["source"]
    assert q["image"] == "original"
    if q["kind"] == "chart_kind":
        assert chosen(q) == chart["kind"]
        return
    values = chart["series"][q["about"]["series"]]
    if chart["kind"] == "pie":
        values = [100 * v / sum(values) for v in values]  # the printed share
    by_category = dict(zip(chart["categories"], values))
    if q["kind"] in ("largest", "smallest"):
        pick = max if q["kind"] == "largest" else min
        assert chosen(q) == pick(by_category, key=by_category.get)
    elif q["kind"] == "compare":
        a, b = q["about"]["categories"]
        assert chosen(q) == (a if by_category[a] > by_category[b] else b)
        assert sorted(q["choices"]) == sorted([a, b])
    else:
        assert q["kind"] == "value"
        truth = by_category[q["about"]["category"]]
        number = lambda text: float(text.rstrip("%"))  # noqa: E731
        assert abs(number(chosen(q)) - truth) <= 0.5  # a pie's share is printed rounded
        assert all(abs(number(c) - truth) > 0.5 for c in q["choices"] if c != chosen(q))


def check_cells(q, pair):
    objects = pair["source"]["objects"]
    assert q["image"] == "original"
    if q["kind"] == "colour_at":
        row, column = q["about"]["cell"]
        assert f"row {row + 1} " in q["question"] and f"column {column + 1} " in q["question"]
        assert [o["colour"] for o in objects if o["cell"] == [row, column]] == [chosen(q)]
    else:
        n = len([o for o in objects if fits(o, q["about"])])
        assert (str(n) if q["kind"] == "count" else ("yes" if n else "no")) == q["answer"]


CHECKS = {"clevr": check_clevr, "chart": check_chart, "cells": check_cells}
KINDS = {"clevr": {"count", "exist", "attribute", "differ"},
         "chart": {"largest", "smallest", "compare", "value", "chart_kind"},
         "cells": {"colour_at", "count", "exist"}}


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_answer_follows_from_the_metadata(data, domain):
    pairs = {p["id"]: p for p in selfplay.read_pairs(data[domain], "eval")}
    questions = [q for seed in range(5) for q in vqa.make_questions(list(pairs.values()), seed)[0]]
    assert {q["kind"] for q in questions} == KINDS[domain]
    for q in questions:
        CHECKS[domain](q, pairs[q["pair_id"]])
        assert set(q) == {"pair_id", "image", "kind", "question", "choices", "answer", "about"}
        assert "\\boxed{}" in q["question"]


def test_questions_only_from_held_out_pairs_and_reproducible(data):
    with open(os.path.join(data["cells"], "pairs.jsonl")) as f:
        assert any(not held_out(json.loads(line)["id"]) for line in f)  # training pairs are there
    pairs = selfplay.read_pairs(data["cells"], "eval")
    questions, _ = vqa.make_questions(pairs, 0)
    assert questions and all(held_out(q["pair_id"]) for q in questions)
    assert vqa.make_questions(selfplay.read_pairs(data["cells"], "eval"), 0)[0] == questions
    assert vqa.make_questions(pairs, 1)[0] != questions
    reversed_order = vqa.make_questions(pairs[::-1], 0)[0]  # a pair's questions depend on it alone
    assert sorted(map(json.dumps, reversed_order)) == sorted(map(json.dumps, questions))


def test_a_constant_answer_scores_chance(data, tiny_model, monkeypatch):
    pairs = [p for d in DOMAINS for p in selfplay.read_pairs(data[d], "eval")]
    questions = [q for seed in range(20) for q in vqa.make_questions(pairs, seed)[0] if q["choices"]]

    def always_a(policy, processor, turns, cfg):
        assert cfg.temperature == 0  # greedy
        for turn in turns:
            turn.text = "I think it is \\boxed{A}."
        return 0

    monkeypatch.setattr(selfplay, "generate", always_a)
    processor = selfplay.load_processor(tiny_model)
    images = {(q["pair_id"], q["image"]): None for q in questions}
    answers = vqa.ask(None, processor, questions, images, {"size": 500, "max_new_tokens": 4}, "constant")
    accuracy = sum(a["correct"] for a in answers) / len(answers)
    expected = sum(1 / len(q["choices"]) for q in questions) / len(questions)
    se = math.sqrt(expected * (1 - expected) / len(questions))
    assert len(questions) > 1000 and abs(accuracy - expected) < 3 * se
    assert vqa.summary(questions, {"model": answers})["overall"]["chance"] == pytest.approx(expected)


def test_summary_by_hand():
    questions = [{"kind": "exist", "choices": None, "answer": "yes"}] * 4
    initial = [{"correct": c} for c in (True, False, False, False)]
    trained = [{"correct": c} for c in (True, True, True, False)]
    row = vqa.summary(questions, {"initial": initial, "trained": trained})["overall"]
    assert row["initial"]["accuracy"] == 0.25 and row["trained"]["accuracy"] == 0.75
    assert row["initial"]["se"] == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    assert row["difference"] == 0.5  # differences 0, 1, 1, 0: sample sd 0.5774, / sqrt(4)
    assert row["se_difference"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert row["chance"] == 0.5


def run(args):
    return subprocess.run([sys.executable, "vqa.py", *args], cwd=HERE, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_cli_scores_one_model_and_writes_the_same_questions_twice(data, tiny_model, tmp_path):
    for out in ("a", "b"):
        result = run(["--data", data["clevr"], "--out", str(tmp_path / out), "--model", tiny_model,
                      "--max-new-tokens", "4"])
        assert result.returncode == 0, result.stderr
    files = [(tmp_path / out / "vqa_questions.jsonl").read_bytes() for out in ("a", "b")]
    assert files[0] == files[1] and files[0]
    result = json.loads((tmp_path / "a" / "vqa.json").read_text())
    assert result["decoding"] == "greedy" and set(result["kinds"]) == KINDS["clevr"]
    assert result["overall"]["questions"] == len(files[0].splitlines())
    with open(tmp_path / "a" / "vqa_answers.jsonl") as f:
        assert all("model" in json.loads(line) for line in f)


def test_bad_input_fails_with_one_line(data, pairs_dir, tiny_model, tmp_path):
    (tmp_path / "empty-data").mkdir()
    (tmp_path / "empty-data" / "pairs.jsonl").write_text("")
    cases = [
        (["--data", data["cells"], "--out", str(tmp_path / "not-a-run")], "is not a run folder"),
        (["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--model", tiny_model], "does not exist"),
        (["--data", str(tmp_path / "empty-data"), "--out", str(tmp_path), "--model", tiny_model], "no questions"),
        (["--data", data["cells"], "--out", str(tmp_path), "--batch", "0"], "must be at least 1"),
    ]
    for args, message in cases:
        result = run(args)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    photos = run(["--data", pairs_dir, "--out", str(tmp_path / "photos"), "--model", tiny_model])
    assert photos.returncode == 0 and "all photo pairs" in photos.stdout  # run.sh goes on to the report
    assert not (tmp_path / "photos" / "vqa.json").exists()


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that the operations inside it create while they are alive,
    and their peak: what a computation adds to the memory it starts with (weights included, the
    bf16 copies that autocast caches of weights that require grad)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.storages = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and not tensor._is_view():
                storage = tensor.untyped_storage()
                if storage.data_ptr() and storage.data_ptr() not in self.storages:
                    self.storages.add(storage.data_ptr())
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(tensor, self.free, storage.data_ptr(), storage.nbytes())
        return out

    def free(self, pointer, nbytes):
        self.live -= nbytes
        self.storages.discard(pointer)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_evaluation_holds_both_models_in_the_run_dtype_without_gradients(tiny_model, data, tmp_path, lora_rank):
    """A bf16 run (full fine-tune or LoRA): evaluate.py and vqa.py get both models in bf16, no
    parameter requires grad, no autocast, and generating adds less than half the weights' bytes
    (activations only). The training set-up of a full fine-tune held fp32 weights under bf16 autocast:
    2x the weights, and autocast's cached bf16 copy of the trainable one while generating."""
    cfg = SimpleNamespace(model=tiny_model, lora_rank=lora_rank, device="cpu", dtype=torch.bfloat16,
                          gradient_checkpointing=False, players=4, rounds=1, spy_image="modified",
                          temperature=1.0, max_new_tokens=2)
    policy, processor = trainer.build_policy(cfg)
    out = str(tmp_path / "run")
    checkpoints.save_checkpoint(out, policy, processor, torch.optim.AdamW(
        [p for p in policy.model.parameters() if p.requires_grad]), {"iteration": 1, "stage": "decision"})
    checkpoints.write_json_atomic(os.path.join(out, "config.json"), {**vars(cfg), "dtype": "bfloat16"})
    trained, initial, processor = trainer.evaluation_policies(checkpoints.load_run_config(out),
                                                              checkpoints.resume_point(out)[0])
    parameters = {id(p): p for side in (trained, initial) for p in side.model.parameters()}.values()
    assert not [p for p in parameters if p.requires_grad]
    assert {p.dtype for p in parameters} == {torch.bfloat16}
    assert trained.autocast is None and initial.autocast is None
    weights = sum(p.numel() for p in parameters) * 2  # bytes in bf16
    pair = selfplay.read_pairs(data["cells"], "train")[0]
    turn = selfplay.Turn(0, 0, selfplay.chat(processor, "Describe the picture."), selfplay.load_image(pair["original"]))
    with LiveTensorBytes() as counted:
        torch.manual_seed(0)
        selfplay.generate(trained, processor, [turn], cfg)
    assert counted.peak < 0.5 * weights, f"generating added {counted.peak / weights:.2f} x the bf16 weights"
