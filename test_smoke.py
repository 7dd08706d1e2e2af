"""Tests of the training loop: the equations against hand computation, the parsers, the tiny
model's log-probs and KL, a learning check, and run.sh end to end with resume.

    python -m pytest -q
"""
import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import rlvr
import selfplay
import spo
import checkpoints
import trainer
from trainer import next_stage, policy_loss

HERE = os.path.dirname(os.path.abspath(__file__))


def game_cfg(**overrides):
    cfg = dict(players=4, rounds=1, decision="judge", samples=4, spy_image="modified", max_new_tokens=8,
               temperature=1.0, micro_batch=8, minibatches=1, clip=0.2, kl=0.04, grad_clip=1.0, beta=0.1, lam=0.1,
               rae_alpha=0.95, rae_update_first=False, rae_bias_correction=True, logprob_temperature=1.0, decision_reward="paper", lora_rank=0,
               device="cpu", dtype=torch.float32, gradient_checkpointing=False, length_buckets=True, tis_cap=None)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


# -----------------------------------------------------------------------------
# Eq. 1, Eq. 2, Eq. 4, Eq. 5


def test_clue_rewards_by_hand_and_zero_sum():
    # votes [1, 5, 0, 2], spy at seat 1: civilians' mean vote 1, spy exposure 5 - 1 = 4
    rewards = spo.clue_rewards([1, 5, 0, 2], spy=1)
    assert rewards == pytest.approx([0.4 / 3, -0.4, 0.4 / 3 + 0.1, 0.4 / 3 - 0.1])
    assert sum(rewards) == pytest.approx(0.0)
    for votes, spy in [([0, 0, 0, 0], 2), ([8, 0, 0, 0], 0), ([3, 1, 0, 4, 0], 3), ([0, 7, 1], 2)]:
        assert sum(spo.clue_rewards(votes, spy)) == pytest.approx(0.0, abs=1e-12)


def test_role_advantages_literal_ema_subtract_then_update():
    baselines = spo.initial_baselines()
    first = spo.role_advantages([1.0, -1.0, -3.0], [True, False, False], baselines, alpha=0.5, bias_correction=False)
    assert first == pytest.approx([1.0, -1.0, -3.0])  # the baselines as they were: 0
    assert baselines == pytest.approx({"spy": 0.5, "civilian": -1.0, "updates": 1})  # 0.5 * 0 + 0.5 * mean(-1, -3)
    second = spo.role_advantages([1.0, -1.0, -3.0], [True, False, False], baselines, alpha=0.5, bias_correction=False)
    assert second == pytest.approx([0.5, 0.0, -2.0])
    assert baselines == pytest.approx({"spy": 0.75, "civilian": -1.5, "updates": 2})


def test_role_advantages_update_first_like_released_code():
    baselines = spo.initial_baselines()
    adv = spo.role_advantages([1.0, -1.0], [True, False], baselines, alpha=0.9, update_first=True, bias_correction=False)
    assert adv == pytest.approx([1.0 - 0.1, -1.0 + 0.1])
    # bias-corrected, the first update makes the baselines the batch's role means
    adv = spo.role_advantages([1.0, -1.0, -3.0], [True, False, False], spo.initial_baselines(), alpha=0.9, update_first=True)
    assert adv == pytest.approx([0.0, 1.0, -1.0])


def test_bias_corrected_role_baselines_read_the_recent_mean_at_once():
    """Constant role rewards (spy -0.3, civilians 0.1): bias-corrected, every advantage is 0 from
    the second clue iteration on; the literal EMA still gives the spy -0.244 in the 5th
    iteration and -0.113 in the 20th (-0.3 * 0.95^4, -0.3 * 0.95^19)."""
    rewards, is_spy = [-0.3, 0.1, 0.1, 0.1], [True, False, False, False]
    corrected, literal = spo.initial_baselines(), spo.initial_baselines()
    spy_literal = []
    for iteration in range(1, 21):
        adv = spo.role_advantages(rewards, is_spy, corrected)
        assert adv == pytest.approx(rewards if iteration == 1 else [0.0] * 4, abs=1e-12)
        spy_literal.append(spo.role_advantages(rewards, is_spy, literal, bias_correction=False)[0])
        assert spo.baseline_values(corrected) == pytest.approx({"spy": -0.3, "civilian": 0.1})
    assert (spy_literal[4], spy_literal[19]) == pytest.approx((-0.3 * 0.95 ** 4, -0.3 * 0.95 ** 19))
    assert (round(spy_literal[4], 3), round(spy_literal[19], 3)) == (-0.244, -0.113)
    assert corrected["updates"] == literal["updates"] == 20 and corrected["spy"] == literal["spy"]


def test_checkpoint_without_baseline_count_counts_its_clue_iterations(tmp_path):
    """A run saved before the count was kept: its role baselines were updated once per clue
    iteration, which metrics.jsonl records (lines after the checkpoint do not count)."""
    path = str(tmp_path / "metrics.jsonl")
    stages = ["decision"] * 5 + ["clue"] * 6 + ["decision"] * 2 + ["clue"] * 3
    with open(path, "w") as f:
        f.writelines(json.dumps({"iteration": i + 1, "stage": s}) + "\n" for i, s in enumerate(stages))
    assert checkpoints.clue_iterations_logged(path, 14) == 7
    assert checkpoints.clue_iterations_logged(str(tmp_path / "none.jsonl"), 14) == 0
    assert trainer.fresh_state(SimpleNamespace(schedule="iterative"), spo.initial_baselines())["baselines"] == spo.initial_baselines()


def test_decision_reward_and_group_advantages():
    assert [rlvr.decision_reward(v, 2) for v in (2, "N/A", 1, None)] == [1.0, -0.5, -1.0, -1.0]
    rewards = [1.0, -1.0, -1.0, -0.5]
    mean = -0.375
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 4)
    assert rlvr.group_advantages(rewards) == pytest.approx([(r - mean) / (std + 1e-8) for r in rewards])
    assert rlvr.group_advantages([-1.0] * 8) == [0.0] * 8
    # equal shaped rewards whose float mean is not exactly each of them: still exact zeros
    assert sum([0.1] * 3) / 3 != 0.1 and rlvr.group_advantages([0.1] * 3) == [0.0] * 3


@pytest.mark.parametrize("text, parsed, reward", [
    ("The third player named a sphere. \\boxed{3}", 2, 2.49),   # right, format ok
    ("It is P 3. \\boxed{3}", 2, 1.89),                          # right, reasoning of exactly 10 characters
    ("\\boxed{3}", 2, 1.89),                                      # right, no reasoning
    ("Nobody's clue stands out. \\boxed{N/A}", "N/A", -0.30),   # N/A, format ok
    ("\\boxed{N/A}", "N/A", -0.90),
    ("The first player named a sphere. \\boxed{1}", 0, -0.90),   # wrong seat, format ok
    ("\\boxed{1}", 0, -1.50),
    ("I think it is player number three.", None, -1.50),          # no box: invalid, no answer
    ("I think it is someone, really. \\boxed{ }", None, -1.50),  # an empty answer is bad format
    ("I think it is someone, really. \\boxed{9}", None, -0.90),  # invalid seat, format ok
])
def test_shaped_reward_table_of_the_released_code(text, parsed, reward):
    turn = selfplay.Turn(-1, -1, "", None, text=text, parsed=parsed)
    assert rlvr.shaped_decision_reward(turn, spy=2) == pytest.approx(reward, abs=1e-12)


# -----------------------------------------------------------------------------
# Eq. 3 / 6 and the switching rule


def test_policy_loss_zero_when_nothing_to_learn():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1]]))
    loss = policy_loss(logp, logp.detach(), logp.clone(), torch.zeros(1), torch.ones(1, 3))
    assert loss.item() == 0.0


def test_policy_loss_kl_value_mask_and_gradient_sign():
    logp = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.9]]))
    mask = torch.tensor([[1.0, 0.0]])  # the second token is padding: it must not count
    loss = policy_loss(logp, logp.detach(), ref, torch.tensor([2.0]), mask, kl=0.04)
    k3 = 0.5 - math.log(0.5) - 1  # exp(ref - logp) - (ref - logp) - 1 at ref/p = 0.5
    assert loss.item() == pytest.approx(-2.0 + 0.04 * k3)
    loss.backward()
    assert logp.grad[0, 0] < 0  # positive advantage: descending the loss raises the token's log-prob
    assert logp.grad[0, 1] == 0


def test_policy_loss_clips_the_ratio():
    logp = torch.tensor([[0.0]])
    old = torch.tensor([[-1.0]])  # ratio e > 1 + eps
    assert policy_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 1), kl=0).item() == pytest.approx(-1.2)
    assert policy_loss(logp, old, None, torch.tensor([-1.0]), torch.ones(1, 1), kl=0).item() == pytest.approx(math.e)


def test_clipped_tokens_by_hand():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7], [1.5, 0.5, 1.1, 0.7]])
    clipped = trainer.clipped_tokens(ratio, torch.tensor([1.0, -1.0]), clip=0.2)
    # A > 0: only a ratio above 1.2 is clipped; A < 0: only one below 0.8
    assert clipped.tolist() == [[True, False, False, False], [False, True, False, True]]
    assert not trainer.clipped_tokens(ratio, torch.zeros(2)).any()  # no advantage, nothing to clip


def test_token_entropy_by_hand_and_in_chunks():
    uniform = torch.zeros(1, 3, 7)
    assert selfplay.token_entropy(uniform) == pytest.approx(torch.full((1, 3), math.log(7)))
    quarter = torch.tensor([[[0.0, math.log(3.0)]]])  # probabilities 1/4 and 3/4
    assert selfplay.token_entropy(quarter).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    logits = torch.randn(2, 37, 11, generator=torch.Generator().manual_seed(0)) * 3
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(selfplay.token_entropy(logits, positions_per_chunk=5), expected)


def test_reward_spread_of_crafted_decision_groups():
    def game(rewards):
        return selfplay.Game(pair={}, spy=0, decisions=[selfplay.Turn(-1, -1, "", None, reward=r) for r in rewards])
    spread = rlvr.reward_spread([game([-1.0] * 8), game([1.0, -1.0]), game([1.0, 1.0, -0.5, -0.5])])
    assert spread["frac_reward_zero_std"] == pytest.approx(1 / 3)  # the first game teaches nothing
    assert spread["reward_std"] == pytest.approx((0.0 + 1.0 + 0.75) / 3)  # population stds, by hand


@pytest.mark.parametrize("stage, acc, na, dwell, expected", [
    ("decision", 0.95, 0.05, 4, "decision"),   # K_min not reached
    ("decision", 0.95, 0.05, 5, "clue"),       # Eq. 9
    ("decision", 0.95, 0.20, 5, "decision"),   # too many N/A
    ("decision", 0.50, 0.00, 19, "decision"),
    ("decision", 0.50, 0.00, 20, "clue"),      # patience P
    ("clue", 0.70, 0.00, 5, "clue"),           # error 0.3 < 0.4
    ("clue", 0.60, 0.00, 5, "decision"),       # Eq. 10, error 0.4
    ("clue", 0.90, 0.50, 5, "decision"),       # Eq. 10, N/A
    ("clue", 0.10, 0.90, 4, "clue"),           # K_min
    ("clue", 0.95, 0.00, 20, "decision"),      # patience P
])
def test_next_stage_table(stage, acc, na, dwell, expected):
    assert next_stage(stage, acc, na, dwell) == expected


def test_bias_corrected_ema_reads_the_first_value():
    cfg = SimpleNamespace(rho=0.95, bias_correction=True)
    state = {"ema_steps": 0, "acc_ema_raw": 0.0, "na_ema_raw": 0.0}
    trainer.update_decision_emas(state, 0.92, 0.04, cfg)
    assert (state["acc_ema"], state["na_ema"]) == pytest.approx((0.92, 0.04))
    cfg.bias_correction = False
    trainer.update_decision_emas(state, 0.92, 0.04, cfg)
    assert state["acc_ema"] == pytest.approx(0.05 * 0.92 * 0.95 + 0.05 * 0.92)


def test_resume_drops_metric_lines_after_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"iteration": i, "acc": 0.1 * i}) + "\n" for i in range(1, 6)))
    checkpoints.trim_log(str(log), 3)
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2, 3]


# -----------------------------------------------------------------------------
# Parsers


@pytest.mark.parametrize("text, clue", [
    ("I see a cube. \\boxed{A red cube on the left.}", "A red cube on the left."),
    ("\\boxed{first} then \\boxed{second}", "first"),
    ("\\boxed{a set {x} of {y}} tail", "a set {x} of {y}"),
    ("\\boxed{   }", None),
    ("\\boxed{never closed", None),
    ("no box at all", None),
    ("", None),
    ("\\boxed{Ein grüner Würfel 🟩}", "Ein grüner Würfel 🟩"),
])
def test_parse_clue(text, clue):
    assert selfplay.parse_clue(text) == clue


@pytest.mark.parametrize("text, vote", [
    ("\\boxed{3}", 2),
    ("Player 2 is odd. \\boxed{Player 3}", 2),
    ("\\boxed{N/A}", "N/A"), ("\\boxed{n/a}", "N/A"), ("\\boxed{NA}", "N/A"), ("\\boxed{ N / A }", "N/A"),
    ("\\boxed{5}", None), ("\\boxed{0}", None), ("\\boxed{-1}", None), ("\\boxed{2.5}", None),
    ("\\boxed{12}", None), ("\\boxed{}", None), ("\\boxed{spy}", None), ("3", None), ("", None),
    ("\\boxed{4} \\boxed{1}", 3), ("\\boxed{{2}}", 1), ("\\boxed{٣}", None), ("\\boxed{seat 1 or 2}", None),
])
def test_parse_vote(text, vote):
    assert selfplay.parse_vote(text, 4) == vote


# -----------------------------------------------------------------------------
# The tiny model: log-probs, reference, learning


def sample_turns(processor, pairs, n):
    prompts = ["Give a clue.", "You are Player 2. " * 3]
    return [selfplay.Turn(0, 0, selfplay.chat(processor, prompts[i % 2]),
                          selfplay.load_image(pairs[i % len(pairs)]["original"])) for i in range(n)]


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_kl_to_reference_is_zero_before_the_first_update(tiny_model, pairs_dir, lora_rank):
    cfg = game_cfg(model=tiny_model, lora_rank=lora_rank)
    policy, processor = trainer.build_policy(cfg)
    reference = trainer.reference_policy(policy, cfg)
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 4)
    selfplay.generate(policy, processor, turns, cfg)
    batch, ids, mask = selfplay.completion_batch(processor, turns, "cpu")
    with torch.no_grad():
        logp = selfplay.token_logprobs(policy.model, batch, ids)
        with reference.active():
            ref = selfplay.token_logprobs(reference.model, batch, ids)
        blind = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
        blind["input_ids"] = torch.where(blind["input_ids"] == policy.model.config.image_token_id,
                                         processor.tokenizer.pad_token_id, blind["input_ids"])
        without_images = selfplay.token_logprobs(reference.model, blind, ids)
    assert (trainer.k3_kl(logp, ref) * mask).abs().max().item() == 0.0
    # the check has teeth: a reference pass that drops the images gives another distribution
    assert (trainer.k3_kl(logp, without_images) * mask).max().item() > 1e-6


@pytest.mark.slow
def test_policy_gradient_raises_a_verifiable_reward(tiny_model, pairs_dir):
    """Reward = share of completion tokens with an even id: dense and checkable. Fifty steps of
    rlvr's group advantages + the loss must raise the policy's probability of even tokens
    (catches sign, mask and alignment bugs). Measured exactly, on fixed prompts, not by sampling."""
    torch.manual_seed(0)
    cfg = game_cfg(model=tiny_model, max_new_tokens=4, kl=0.0)
    policy, processor = trainer.build_policy(cfg)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=3e-3)
    pairs = selfplay.read_pairs(pairs_dir, "train")
    probe = sample_turns(processor, pairs, 4)
    for turn in probe:
        turn.completion_ids = [0]  # any token: only the distribution at the first position is read

    def even_mass():
        batch, _, _ = selfplay.completion_batch(processor, probe, "cpu")
        with torch.no_grad():
            first = policy.model(**batch).logits[:, -2].softmax(-1)  # the prediction of completion token 1
        return first[:, 0::2].sum(-1).mean().item()

    before = even_mass()
    for _ in range(50):
        turns = sample_turns(processor, pairs, 16)
        selfplay.generate(policy, processor, turns, cfg)
        rewards = [sum(t % 2 == 0 for t in turn.completion_ids) / len(turn.completion_ids) for turn in turns]
        trainer.train_step(policy, None, optimizer, processor, turns, rlvr.group_advantages(rewards), cfg, lr=3e-3)
    after = even_mass()
    assert after > before + 0.3, f"probability of an even token went from {before:.2f} to {after:.2f}"


def test_train_step_reports_entropy_and_clipping(tiny_model, pairs_dir):
    """The diagnostics of a step: the entropy is the mean over completion tokens of the policy's
    entropy before the step (one optimiser step: the first forward sees the sampling weights);
    with one step the ratio is 1 and nothing is clipped."""
    torch.manual_seed(0)
    cfg = game_cfg(model=tiny_model, max_new_tokens=5, kl=0.0)
    policy, processor = trainer.build_policy(cfg)
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 4)
    selfplay.generate(policy, processor, turns, cfg)
    batch, ids, mask = selfplay.completion_batch(processor, turns, "cpu")
    with torch.no_grad():
        _, entropy = selfplay.token_logprobs(policy.model, batch, ids, with_entropy=True)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
    step = trainer.train_step(policy, None, optimizer, processor, turns, [1.0, -1.0, 0.5, -0.5], cfg, lr=1e-3)
    assert step["entropy"] == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert 0 < step["entropy"] <= math.log(policy.model.get_output_embeddings().weight.shape[0])
    assert step["clip_ratio/region_mean"] == 0.0 and step["grad_norm"] > 0 and not step["skipped_update"]


def test_stage_script_loads_itself_once():
    """python spo.py runs spo as __main__ only (trainer.py imports neither stage script; rlvr.py
    is the mirror image)."""
    result = run([sys.executable, "-X", "importtime", "spo.py", "--help"])
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert result.returncode == 0 and "--data" in result.stdout
    assert "rlvr" in imported and "trainer" in imported and "spo" not in imported


def test_minibatches_step_once_per_share(tiny_model, pairs_dir):
    """--minibatches M: M optimiser steps per batch, each on the mean loss of its own share. With
    plain SGD, a 2-minibatch step whose other half has zero advantages moves the weights exactly
    as one step on the informative half alone (first half or second: indexing and scaling)."""
    torch.manual_seed(0)
    cfg = game_cfg(model=tiny_model, max_new_tokens=4, kl=0.0, micro_batch=3)
    policy, processor = trainer.build_policy(cfg)
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 8)
    selfplay.generate(policy, processor, turns, cfg)
    signal = [1.0, -0.5, 2.0, -1.5]
    for advantages, half in ((signal + [0.0] * 4, slice(0, 4)), ([0.0] * 4 + signal, slice(4, 8))):
        weights = []
        for minibatches, share, adv in ((2, turns, advantages), (1, turns[half], advantages[half])):
            model = trainer.build_policy(cfg)[0]
            optimizer = torch.optim.SGD(model.model.parameters(), lr=0.5)
            trainer.train_step(model, None, optimizer, processor, share, adv,
                               game_cfg(**{**vars(cfg), "minibatches": minibatches}), lr=0.5)
            weights.append(torch.cat([p.detach().flatten() for p in model.model.parameters()]))
        assert not torch.equal(weights[0], torch.cat([p.detach().flatten() for p in policy.model.parameters()]))
        torch.testing.assert_close(weights[0], weights[1], atol=1e-6, rtol=1e-5)
    model = trainer.build_policy(cfg)[0]
    optimizer = torch.optim.AdamW(model.model.parameters(), lr=1e-3)
    trainer.train_step(model, None, optimizer, processor, turns, signal * 2, game_cfg(**{**vars(cfg), "minibatches": 3}), lr=1e-3)
    assert {int(state["step"]) for state in optimizer.state.values()} == {3}


def test_play_games_records_every_turn(tiny_model, pairs_dir):
    cfg = game_cfg(model=tiny_model, rounds=2, samples=3)
    policy, processor = trainer.build_policy(cfg)
    pairs = selfplay.read_pairs(pairs_dir, "train")[:3]
    games, n_tokens = selfplay.play_games(pairs, [0, 1, 3], [(policy, policy)] * 3, processor, cfg)
    assert n_tokens == sum(len(t.completion_ids) for g in games for t in g.clues + g.decisions)
    for game in games:
        assert [(t.round, t.seat) for t in game.clues] == [(r, s) for r in range(2) for s in range(4)]
        assert len(game.decisions) == 3 and all(t.seat == -1 for t in game.decisions)
        assert all(1 <= len(t.completion_ids) <= cfg.max_new_tokens for t in game.clues + game.decisions)
    stops = selfplay.stop_ids(policy.model)
    for turn in (t for game in games for t in game.clues + game.decisions):  # cut at the limit, or stopped
        assert turn.truncated == (turn.completion_ids[-1] not in stops)
        assert not turn.truncated or len(turn.completion_ids) == cfg.max_new_tokens
    # the spy (seat 0 of game 0) is shown the modified image, the others the original
    assert games[0].clues[0].image.tobytes() == selfplay.load_image(pairs[0]["modified"]).tobytes()
    assert games[0].clues[1].image.tobytes() == selfplay.load_image(pairs[0]["original"]).tobytes()
    civilians = selfplay.play_games(pairs, [0, 1, 3], [(policy, policy)] * 3, processor,
                                    game_cfg(model=tiny_model, decision="civilians"))[0]
    assert [sorted(t.seat for t in g.decisions) for g in civilians] == [[1, 2, 3], [0, 2, 3], [0, 1, 2]]


def test_prompts_follow_the_game(tiny_model, pairs_dir):
    cfg = game_cfg(rounds=2)
    game = selfplay.Game(pair={"domain": "clevr"}, spy=1)
    game.clues = [selfplay.Turn(0, 0, "", None, text="Hmm, red. \\boxed{A red cube.}", parsed="A red cube."),
                  selfplay.Turn(1, 0, "", None, text="Secret plan. \\boxed{Some objects.}", parsed="Some objects.")]
    spy_prompt = selfplay.clue_prompt(game, 1, 1, cfg)
    civilian_prompt = selfplay.clue_prompt(game, 0, 1, cfg)
    assert "You are the spy" in spy_prompt and "Secret plan." in spy_prompt
    assert "You are a civilian" in civilian_prompt and "Secret plan." not in civilian_prompt
    assert 'Player 1: "A red cube."' in civilian_prompt and "round 2 of 2" in civilian_prompt
    judge = selfplay.decision_prompt(game, None, cfg)
    assert "Hmm, red" not in judge and "Secret plan" not in judge and "Some objects." in judge
    assert "\\boxed{2}" in judge and "{{" not in judge + spy_prompt
    assert selfplay.BLANK_RULE in selfplay.game_rules(4, "chart", "blank")


def test_blank_spy_prompts_describe_the_blank_game_only():
    """--spy-image blank: no text a player or the judge reads speaks of an edited picture."""
    edit_words = ("slightly different", "replaced", "differ", "swapped", "another colour", "except")
    for domain in selfplay.DOMAIN_RULES:
        game = selfplay.Game(pair={"domain": domain}, spy=2)
        game.clues = [selfplay.Turn(0, 0, "", None, text="\\boxed{A red square.}", parsed="A red square.")]
        for decision in ("judge", "civilians"):
            cfg = game_cfg(rounds=2, spy_image="blank", decision=decision)
            texts = [selfplay.clue_prompt(game, seat, 1, cfg) for seat in range(4)]
            texts += [selfplay.decision_prompt(game, voter, cfg) for voter in (None, 0, 1, 3)]
            for text in texts:
                assert selfplay.BLANK_RULE in text
                assert not [w for w in edit_words if w in text.lower()], text
            assert "empty" in texts[2] and "You are the spy" in texts[2]
        modified = selfplay.clue_prompt(game, 2, 1, game_cfg(rounds=2))
        assert selfplay.DOMAIN_RULES[domain] in modified and "slightly different" in modified


# -----------------------------------------------------------------------------
# Command line: bad input and run.sh end to end


def run(args, env=None, timeout=600):
    return subprocess.run(args, cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("extra, message", [
    (["--players", "2"], "at least 3 players"),
    (["--samples", "0"], "must all be positive"),
    (["--model", "no/such/folder"], "cannot load model"),
    (["--model", "/no/such/folder"], "cannot load model"),
])
def test_bad_flags_fail_with_one_clear_line(tiny_model, pairs_dir, tmp_path, extra, message):
    result = run([sys.executable, "rlvr.py", "--model", tiny_model, "--data", pairs_dir, "--out", str(tmp_path), *extra])
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_data_folder_without_pairs(tiny_model, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run([sys.executable, "spo.py", "--model", tiny_model, "--data", str(tmp_path / "empty"),
                  "--out", str(tmp_path / "out"), "--schedule", "clue"])
    assert result.returncode != 0 and "no readable training pairs" in result.stderr


def test_unreadable_pair_is_skipped(pairs_dir, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    lines = open(os.path.join(pairs_dir, "pairs.jsonl")).read().splitlines()[:3]
    for line in lines:
        pair = json.loads(line)
        for key in ("original", "modified"):
            shutil.copy(os.path.join(pairs_dir, pair[key]), data / pair[key])  # a copy: the fixture stays intact
    (data / json.loads(lines[0])["modified"]).write_bytes(b"not a png")
    with open(data / "pairs.jsonl", "w") as f:
        f.write("\n".join(lines) + "\n")
    kept = selfplay.read_pairs(str(data), "train") + selfplay.read_pairs(str(data), "eval")
    assert sorted(p["id"] for p in kept) == sorted(json.loads(l)["id"] for l in lines[1:])


def test_released_dataset_layout_reads_without_pairs_jsonl(pairs_dir, tmp_path):
    """A folder of <id>_original.png / <id>_modified.png (the released datasets) needs no index."""
    for i in range(30):
        for kind in ("original", "modified"):
            os.link(os.path.join(pairs_dir, "images", f"{i % 20:06d}_{kind}.png"), tmp_path / f"x{i}_{kind}.png")
    (tmp_path / "x99_original.png").write_bytes((tmp_path / "x0_original.png").read_bytes())  # no twin: ignored
    train, held_out = selfplay.read_pairs(str(tmp_path), "train"), selfplay.read_pairs(str(tmp_path), "eval")
    assert sorted(p["id"] for p in train + held_out) == sorted(f"x{i}" for i in range(30))
    assert train and held_out and not {p["id"] for p in train} & {p["id"] for p in held_out}
    assert all(p["modified"].endswith(p["id"] + "_modified.png") for p in train)


@pytest.mark.slow
def test_run_sh_visits_both_stages_and_resumes(tiny_model, pairs_dir, tmp_path):
    out = tmp_path / "run"
    env = {"QUICK": "1", "MODEL": tiny_model, "DATA": pairs_dir, "OUT": str(out), "GAMES": "2", "EVAL_GAMES": "2",
           "EXTRA": "--max-new-tokens 6 --k-min 1 --patience 2"}
    first = run(["bash", "run.sh"], {**env, "ITERATIONS": "3"})
    assert first.returncode == 0, first.stderr[-2000:]
    second = run(["bash", "run.sh"], {**env, "ITERATIONS": "5"})
    assert second.returncode == 0, second.stderr[-2000:]
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4, 5]  # resumed after 3, nothing redone
    assert [m["stage"] for m in metrics] == ["decision", "decision", "clue", "decision", "decision"]
    diagnostics = ("frac_reward_zero_std", "reward_std", "clip_ratio/region_mean", "completions/clipped_ratio", "entropy")
    assert all(0 <= m[name] for m in metrics for name in diagnostics)
    assert all(m["frac_reward_zero_std"] == 1.0 for m in metrics)  # a random model's votes never parse
    assert sorted(os.listdir(out / "games")) == [f"iter_{i:06d}.jsonl" for i in range(1, 6)]
    assert open(out / "latest").read() == "ckpt-000005"
    state = json.load(open(out / "ckpt-000005" / "state.json"))
    assert state["iteration"] == 5 and state["stage"] == "clue"
    game = json.loads(open(out / "games" / "iter_000003.jsonl").readline())
    assert len(game["clues"]) == 4 and all(p["advantage"] is not None for p in game["players"])  # QUICK: one round
    result = json.load(open(out / "eval.json"))
    assert result["games"] == 2 and 0 <= result["win_rate"] <= 1 and 0 <= result["decision_acc_baseline"] <= 1
    third = run(["bash", "run.sh"], {**env, "ITERATIONS": "5"})  # nothing left to do
    assert third.returncode == 0 and len(open(out / "metrics.jsonl").readlines()) == 5


def test_colour_check_ceiling_by_hand():
    """evaluate.colour_check_accuracy: the judge sees the original (red green blue). Game 1: only
    the spy names a missing colour -> right. Game 2: the spy and a civilian's garbled clue name
    missing colours -> 1/2. Game 3: the spy names only a shared colour -> a guess among 4 seats.
    Game 4: a civilian alone names a missing colour -> wrong. Colour words count only whole."""
    import evaluate
    pair = {"source": {"objects": [{"colour": c} for c in ("red", "green", "blue")]},
            "changes": [{"what": "object 0", "after": {"colour": "purple"}}]}

    def game(spy, clues):
        g = selfplay.Game(pair=pair, spy=spy)
        g.clues = [selfplay.Turn(seat, 0, "", None, parsed=clue) for seat, clue in enumerate(clues)]
        return g

    games = [game(1, ["a red square", "a purple square", "a blue square", "a green square"]),
             game(2, ["a red square", "a gray square", "purple", "a redder brownish square"]),
             game(0, ["a blue square", "a red square", None, "a green square"]),
             game(3, ["a yellow square", "a red square", "a blue square", "a green square"])]
    assert evaluate.colour_check_accuracy(games[:1], 4) == 1.0
    assert evaluate.colour_check_accuracy(games[1:2], 4) == 0.5
    assert evaluate.colour_check_accuracy(games[2:3], 4) == 0.25
    assert evaluate.colour_check_accuracy(games[3:], 4) == 0.0
    assert evaluate.colour_check_accuracy(games, 4) == pytest.approx((1 + 0.5 + 0.25 + 0) / 4)


def test_more_iterations_on_resume_keep_the_learning_rate_falling():
    """A 10-iteration run resumed after iteration 10 (and another after 4) with --iterations 20:
    the rates already used are kept, the new ones fall from the last one to 0 without jumping back
    up (stretching the cosine to 20 did: 3.0e-6 at iteration 10, then 5.9e-5), and one line says so."""
    cfg = SimpleNamespace(lr=1e-4, iterations=10)
    fresh = {"iteration": 0}
    assert trainer.extend_schedule(fresh, cfg) is None and fresh["lr_schedule"] == {"horizon": 10}
    rates = [trainer.learning_rate(k, cfg, fresh["lr_schedule"]) for k in range(1, 11)]
    assert rates[0] == 1e-4 and max(rates) == 1e-4 and rates[-1] < 1e-5  # warm-up of 1, then the cosine
    for done in (10, 4):
        state = {"iteration": done, "lr_schedule": {"horizon": 10}}
        longer = SimpleNamespace(lr=1e-4, iterations=20)
        note = trainer.extend_schedule(state, longer)
        assert note.startswith("--iterations 20 extends this run's schedule of 10 iterations")
        assert f"(iteration {done})" in note
        after = [trainer.learning_rate(k, longer, state["lr_schedule"]) for k in range(done + 1, 21)]
        assert all(a > b > 0 for a, b in zip([rates[done - 1]] + after, after))  # falling, never 0 before the end
        assert trainer.extend_schedule(state, longer) is None  # the same --iterations again: nothing changes
    assert trainer.extend_schedule({"iteration": 3, "lr_schedule": {"horizon": 10}}, SimpleNamespace(lr=1e-4, iterations=5)) is None


@pytest.mark.slow
def test_alternate_schedule_trains_both_stages_in_one_process(tiny_model, pairs_dir, tmp_path):
    """--schedule alternate: one rlvr.py process plays decision, clue, decision, clue (the released
    code's switch after every step), and a resume continues in the stage it stopped before."""
    out = str(tmp_path / "run")
    args = [sys.executable, "rlvr.py", "--model", tiny_model, "--data", pairs_dir, "--out", out, "--games", "2",
            "--rounds", "1", "--samples", "2", "--max-new-tokens", "4", "--lora-rank", "4", "--schedule", "alternate"]
    first = run([*args, "--iterations", "3"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("stage, config:") == 1  # one process, one model load
    second = run([*args, "--iterations", "4"])  # the run now stands in the clue stage: rlvr.py still takes it
    assert second.returncode == 0, second.stderr[-2000:]
    stages = [json.loads(line)["stage"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert stages == ["decision", "clue", "decision", "clue"]
