"""Tests of what the edited-picture game's CPU runs add (docs/learn_cpu.md): the short judge
prompt (--judge-prompt short), the seeing term beside Eq. 3/6 (--aux-data, --aux-weight) and
evaluate.py's wrong-picture control (decision_acc_wrong_picture).

    python -m pytest -q test_edited_picture.py
    python -m pytest -q -m slow test_edited_picture.py   # the seeing term keeps yes/no through RL
"""
import json
import os
import random
import subprocess
import sys
import zlib
from types import SimpleNamespace

import pytest
import torch

import evaluate
import selfplay
import trainer
import warm_start

HERE = os.path.dirname(os.path.abspath(__file__))
SLOW_ITERATIONS = 10  # decision-stage iterations of the slow check (160 games)


def game_cfg(**overrides):
    cfg = dict(players=4, rounds=1, decision="judge", samples=4, spy_image="modified", max_new_tokens=4,
               temperature=1.0, micro_batch=8, minibatches=1, clip=0.2, kl=0.0, grad_clip=1.0, logprob_temperature=1.0,
               lora_rank=0, device="cpu", dtype=torch.float32, gradient_checkpointing=False, judge_prompt="full", seed=0,
               length_buckets=True, tis_cap=None)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


@pytest.fixture(scope="module")
def cells_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cells"))
    subprocess.run([sys.executable, "make_games.py", "--domain", "cells", "--size", "56x56", "--n", "40", "--out", out,
                    "--workers", "1"], cwd=HERE, check=True, capture_output=True)
    return out


def game_with_clues(pair, spy, clues):
    game = selfplay.Game(pair=pair, spy=spy)
    for k, clue in enumerate(clues):
        game.clues.append(selfplay.Turn(k % 4, k // 4, "", None, text="\\boxed{%s}" % clue, parsed=clue))
    return game


# -----------------------------------------------------------------------------
# --judge-prompt


def test_short_judge_prompt_holds_the_clues_and_the_question_and_full_is_unchanged():
    game = game_with_clues({"domain": "cells"}, 2, ["a red square", "a blue square", "a cyan square", "a red square",
                                                    "a green square"])
    clues = 'All clues:\nRound 1: Player 1: "a red square" Player 2: "a blue square" Player 3: "a cyan square" ' \
            'Player 4: "a red square"\nRound 2: Player 1: "a green square"'
    short = selfplay.decision_prompt(game, None, game_cfg(rounds=2, judge_prompt="short"))
    assert short == clues + "\n\nWhich player is the spy? Answer with the seat number inside \\boxed{}."
    voter = selfplay.decision_prompt(game, 0, game_cfg(rounds=2, judge_prompt="short"))
    assert voter == "You are Player 1, a civilian.\n\n" + short
    # full: the paper's prompt as before the flag, also for run configs saved without it
    full = "\n\n".join([selfplay.game_rules(4, "cells", "modified"), selfplay.JUDGE_TASK, clues, selfplay.VOTE_FORMAT])
    assert selfplay.decision_prompt(game, None, game_cfg(rounds=2)) == full
    old_config = SimpleNamespace(players=4, rounds=2, spy_image="modified")
    assert selfplay.decision_prompt(game, None, old_config) == full
    # the answers parse as before: the parser does not know the prompt
    for text, vote in (("The spy is \\boxed{3}", 2), ("\\boxed{N/A}", "N/A"), ("\\boxed{7}", None)):
        assert selfplay.parse_vote(text, 4) == vote


def test_judge_prompt_flag_reaches_the_games(tiny_model, cells_dir):
    processor = selfplay.load_processor(tiny_model)
    pairs = selfplay.read_pairs(cells_dir, "train")[:2]
    games = [game_with_clues(p, 1, ["a red square"] * 4) for p in pairs]
    pictures = [selfplay.load_image(p["original"]) for p in pairs]
    for flag, wanted in (("short", selfplay.SHORT_JUDGE_QUESTION), ("full", selfplay.JUDGE_TASK)):
        requests = selfplay.decision_requests(games, pictures, processor, game_cfg(judge_prompt=flag))
        assert len(requests) == 2 * 4 and all(wanted in turn.prompt for _, _, turn in requests)
        assert [turn.image for _, _, turn in requests] == [pictures[0]] * 4 + [pictures[1]] * 4


# -----------------------------------------------------------------------------
# The seeing term


def sampled_turns(policy, processor, pairs, n, cfg):
    turns = [selfplay.Turn(0, 0, selfplay.chat(processor, "Give a clue."), selfplay.load_image(pairs[i % len(pairs)]["original"]))
             for i in range(n)]
    selfplay.generate(policy, processor, turns, cfg)
    return turns


def flat_weights(policy):
    return torch.cat([p.detach().flatten() for p in policy.model.parameters()])


def test_aux_weight_zero_is_todays_update_bit_for_bit(tiny_model, cells_dir):
    torch.manual_seed(0)
    cfg = game_cfg(model=tiny_model, minibatches=2, micro_batch=3)
    policy, processor = trainer.build_policy(cfg)
    pairs, images = warm_start.cells_pairs(cells_dir, "train")
    turns = sampled_turns(policy, processor, pairs, 6, cfg)
    advantages = [1.0, -0.5, 2.0, -1.5, 0.5, -1.0]
    seeing = [warm_start.seeing_examples(pairs, images, 4, random.Random(k), cfg) for k in range(2)]
    weights = []
    for aux in ({}, {"aux_batches": seeing, "aux_weight": 0.0}, {"aux_batches": seeing, "aux_weight": 0.5}):
        model = trainer.build_policy(cfg)[0]
        optimizer = torch.optim.AdamW(model.model.parameters(), lr=1e-3)
        step = trainer.train_step(model, None, optimizer, processor, turns, advantages, cfg, 1e-3, **aux)
        weights.append(flat_weights(model))
        assert ("aux_loss" in step) == (aux.get("aux_weight", 0) > 0)
    assert not torch.equal(weights[0], flat_weights(policy))  # the step did move the weights
    assert torch.equal(weights[0], weights[1])  # W = 0: today's update, bit for bit
    assert not torch.equal(weights[0], weights[2])  # W > 0 adds a term


def test_aux_term_moves_a_yes_no_answer_toward_the_right_one(tiny_model, cells_dir):
    """With zero advantages Eq. 3 gives no gradient, so what moves is the seeing term alone: the
    right answer of the trained yes/no question gains log-prob, the wrong one loses it."""
    torch.manual_seed(0)
    cfg = game_cfg(model=tiny_model)
    policy, processor = trainer.build_policy(cfg)
    pairs, images = warm_start.cells_pairs(cells_dir, "train")
    turns = sampled_turns(policy, processor, pairs, 2, cfg)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    colours, image = warm_start.cells_colours(pairs[0])[0], images[0][0]
    prompt, image, right = warm_start.attribute_question(colours, image, True, random.Random(0))
    wrong = "\\boxed{no}"

    def logprobs():
        with torch.no_grad():
            lp, _ = warm_start.target_logprob(policy.model, processor,
                                              warm_start.make_turns([(prompt, image, right), (prompt, image, wrong)], processor, eos))
        return lp.tolist()

    before = logprobs()
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.05)
    step = trainer.train_step(policy, None, optimizer, processor, turns, [0.0, 0.0], cfg, 0.05,
                              aux_batches=[[(prompt, image, right)] * 4], aux_weight=1.0)
    after = logprobs()
    assert step["aux_loss"] > 0
    assert after[0] > before[0] + 0.01 and after[0] - after[1] > before[0] - before[1]


def test_aux_batches_are_seeded_and_off_without_weight(cells_dir):
    pairs, images = warm_start.cells_pairs(cells_dir, "train")
    seeing = SimpleNamespace(pairs=pairs, images=images)
    cfg = game_cfg(aux_weight=0.3, aux_batch=5, minibatches=3)
    first, again = trainer.aux_batches_of(seeing, 7, cfg), trainer.aux_batches_of(seeing, 7, cfg)
    assert [len(b) for b in first] == [5, 5, 5]
    assert [[t for _, _, t in b] for b in first] == [[t for _, _, t in b] for b in again]  # a resume trains the same
    answers = [t for b in first for _, _, t in b]
    assert all(t.startswith("\\boxed{") for t in answers)
    assert {"\\boxed{yes}", "\\boxed{no}"} & set(answers)  # yes/no and list tasks, no game
    assert trainer.aux_batches_of(seeing, 7, game_cfg(aux_weight=0.0, aux_batch=5, minibatches=3)) is None


def test_aux_weight_needs_aux_data(tiny_model, cells_dir, tmp_path):
    result = subprocess.run([sys.executable, "rlvr.py", "--model", tiny_model, "--data", cells_dir, "--out", str(tmp_path),
                             "--aux-weight", "0.5"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--aux-weight needs --aux-data" in result.stderr
    assert "Traceback" not in result.stderr


# -----------------------------------------------------------------------------
# The wrong-picture control


def stub_generate(choose):
    """A generate() whose vote is choose(turn): records every turn it answers."""
    seen = []

    def generate(policy, processor, turns, cfg):
        for turn in turns:
            turn.text = "The spy is \\boxed{%d}" % (choose(turn) + 1)
            seen.append(turn)
        return 0
    return generate, seen


def test_wrong_picture_never_the_games_own_and_text_only_judge_scores_the_same(tiny_model, cells_dir, monkeypatch):
    processor = selfplay.load_processor(tiny_model)
    pairs = selfplay.read_pairs(cells_dir, "train")
    rng = random.Random(0)
    colours = warm_start.COLOURS
    games = [game_with_clues(pairs[k % len(pairs)], rng.randrange(4), [f"a {rng.choice(colours)} square" for _ in range(4)])
             for k in range(24)]
    cfg = game_cfg(judge_prompt="short")
    pixels = {p["id"]: selfplay.load_image(p["original"]).tobytes() for p in pairs}

    # a judge that reads the text only: its vote is a function of the prompt
    text_only, seen = stub_generate(lambda turn: zlib.crc32(turn.prompt.encode()) % 4)
    monkeypatch.setattr(selfplay, "generate", text_only)
    wrong = evaluate.wrong_picture_accuracy(games, pairs, None, processor, cfg, seed=3, batch=5)
    assert len(seen) == 24 * cfg.samples
    for k, game in enumerate(games):  # never the game's own picture
        assert all(turn.image.tobytes() != pixels[game.pair["id"]] for turn in seen[k * 4:(k + 1) * 4])
    own = [selfplay.Game(pair=g.pair, spy=g.spy, clues=g.clues) for g in games]
    for g, _, turn in selfplay.decision_requests(own, [selfplay.load_image(g.pair["original"]) for g in own], processor, cfg):
        text_only(None, processor, [turn], cfg)
        turn.parsed = selfplay.parse_vote(turn.text, 4)
        own[g].decisions.append(turn)
    trained = selfplay.decision_stats(own)["acc"]
    assert 0 < trained < 1 and wrong == trained

    # the control has teeth: a judge that names the spy only when it sees the game's own picture
    by_prompt = {selfplay.chat(processor, selfplay.decision_prompt(g, None, cfg)): (g, pixels[g.pair["id"]]) for g in games}

    def choose(turn):
        game, own_pixels = by_prompt[turn.prompt]
        return game.spy if turn.image.tobytes() == own_pixels else (game.spy + 1) % 4
    looking, _ = stub_generate(choose)
    monkeypatch.setattr(selfplay, "generate", looking)
    assert evaluate.wrong_picture_accuracy(games, pairs, None, processor, cfg, seed=3, batch=5) == 0.0


def test_other_pairs_never_pick_the_games_own(cells_dir):
    pairs = selfplay.read_pairs(cells_dir, "train")
    games = [selfplay.Game(pair=pairs[k % 3], spy=0) for k in range(200)]
    chosen = evaluate.other_pairs(games, pairs[:3], random.Random(0))
    assert all(c["id"] != g.pair["id"] for c, g in zip(chosen, games))
    assert {c["id"] for c in chosen} == {p["id"] for p in pairs[:3]}  # uniform among the others, all used
    with pytest.raises(SystemExit, match="at least 2 held-out pairs"):
        evaluate.other_pairs(games[:1], pairs[:1], random.Random(0))


# -----------------------------------------------------------------------------
# Slow: the seeing term keeps the yes/no check through RL


@pytest.mark.slow
@pytest.mark.xdist_group("learn-cpu-56")
def test_the_seeing_term_keeps_the_yes_no_check_through_rl(edited_picture_warm_start, tmp_path):
    """From the 56-px warm start of `GAME=modified SIZE=56 learn_cpu.sh` (built, or reused when
    cached), SLOW_ITERATIONS decision-stage iterations with learn_cpu.sh's flags, seeded, one
    thread: the policy moves (KL > 0) and the held-out yes/no check stays at 0.9 or more.
    RL alone (--aux-weight 0) also kept it at 1.000 over these 10 iterations (measured): the fall
    the supervised probe saw took thousands of games of full fine-tuning (docs/learn_cpu.md)."""
    folder, data = edited_picture_warm_start
    warm = os.path.join(folder, "warm-start-short")
    out = str(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "rlvr.py", "--model", warm, "--data", data, "--out", out, "--schedule", "decision",
         "--iterations", str(SLOW_ITERATIONS), "--games", "16", "--rounds", "1", "--max-new-tokens", "8", "--samples", "8",
         "--lr", "1e-3", "--minibatches", "8", "--kl", "0.04", "--micro-batch", "32", "--lora-rank", "16",
         "--spy-image", "modified", "--judge-prompt", "short", "--aux-data", data, "--aux-weight", "1",
         "--seeing-every", str(SLOW_ITERATIONS)],
        cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[-1]["kl"] > 0 and all(row["invalid_vote_rate"] < 0.5 for row in rows)  # it trained, and votes parse
    assert rows[-1]["heldout_yes_no"] >= 0.9, rows[-1]["heldout_yes_no"]
