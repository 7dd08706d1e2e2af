"""Tests of the rollout and update speed levers (issue "rollouts at GPU speed"): the drift metric
between sampling and training log-probs and its truncated importance sampling correction,
length-bucketed micro-batches.

    OMP_NUM_THREADS=1 python -m pytest -q test_rollout_speed.py
"""
import pytest
import torch

import selfplay
import trainer
from test_smoke import game_cfg, sample_turns


def lora_policy(tiny_model, **overrides):
    """A LoRA policy whose adapter is not the identity (random B), so that merged and unmerged
    weights really differ, with its processor and the cfg it was built from."""
    cfg = game_cfg(model=tiny_model, lora_rank=4, **overrides)
    policy, processor = trainer.build_policy(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    return policy, processor, cfg


def test_drift_metric_is_zero_in_fp32_and_counts_only_completion_tokens(tiny_model, pairs_dir):
    """Sampled log-probs kept by generate equal the trainer's recomputed ones within 1e-5 in fp32;
    a sampler that was off by 0.25 on one token shows as max 0.25 and a mean of 0.25 / tokens."""
    policy, processor, cfg = lora_policy(tiny_model, temperature=0.8, logprob_temperature=0.8, max_new_tokens=10)
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 4)
    torch.manual_seed(0)
    selfplay.generate(policy, processor, turns, cfg)
    assert all(len(t.sampling_logps) == len(t.completion_ids) for t in turns)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=0.0)
    step = trainer.train_step(policy, None, optimizer, processor, turns, [0.0] * 4, game_cfg(**{**vars(cfg), "kl": 0}), lr=0.0)
    assert step["sampling/sampling_logp_difference/max"] < 1e-5
    assert step["sampling/sampling_logp_difference/mean"] <= step["sampling/sampling_logp_difference/max"]

    tokens = sum(len(t.completion_ids) for t in turns)
    turns[2].sampling_logps[1] -= 0.25
    step = trainer.train_step(policy, None, optimizer, processor, turns, [0.0] * 4, game_cfg(**{**vars(cfg), "kl": 0}), lr=0.0)
    assert step["sampling/sampling_logp_difference/max"] == pytest.approx(0.25, abs=1e-5)
    assert step["sampling/sampling_logp_difference/mean"] == pytest.approx(0.25 / tokens, abs=1e-5)


def test_truncated_importance_weights_by_hand():
    old = torch.tensor([[0.0, -1.0, -2.0]])
    sampling = torch.tensor([[0.0, -2.0, -1.0]])
    weights = trainer.truncated_is_weights(old, sampling, cap=2.0)
    assert weights.tolist()[0] == pytest.approx([1.0, 2.0, torch.exp(torch.tensor(-1.0)).item()])  # e^1 capped at 2
    logp = torch.tensor([[-0.5, -1.0, -2.0]], requires_grad=True)
    mask, adv = torch.ones(1, 3), torch.tensor([1.0])
    # ratio 1, no KL: the loss is -mean(w * A) over the tokens, and so is its gradient per token
    loss = trainer.policy_loss(logp, logp.detach(), None, adv, mask, kl=0.0, is_weights=weights)
    assert loss.item() == pytest.approx(-weights.mean().item())
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx((-weights / 3).tolist()[0])
    plain = trainer.policy_loss(logp, logp.detach(), None, adv, mask, kl=0.0, is_weights=torch.ones(1, 3))
    assert plain.item() == pytest.approx(trainer.policy_loss(logp, logp.detach(), None, adv, mask, kl=0.0).item())


def test_tis_cap_changes_the_update_only_where_sampling_drifted(tiny_model, pairs_dir):
    """With --tis-cap and sampling log-probs equal to the recomputed ones (fp32), every weight is 1
    and the step equals the uncorrected one; a sampler that gave the tokens more probability
    (weights < 1) shrinks the loss."""
    policy, processor, cfg = lora_policy(tiny_model, temperature=0.8, logprob_temperature=0.8, max_new_tokens=8, kl=0.0)
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 4)
    torch.manual_seed(0)
    selfplay.generate(policy, processor, turns, cfg)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=0.0)
    advantages = [1.0, 1.0, 1.0, 1.0]  # loss = -mean of the weights: 1 without drift
    plain = trainer.train_step(policy, None, optimizer, processor, turns, advantages, cfg, lr=0.0)
    corrected = trainer.train_step(policy, None, optimizer, processor, turns, advantages,
                                   game_cfg(**{**vars(cfg), "tis_cap": 2.0}), lr=0.0)
    assert corrected["loss"] == pytest.approx(plain["loss"], abs=1e-5) and plain["loss"] == pytest.approx(-1.0)
    for t in turns:
        t.sampling_logps = [x + 0.5 for x in t.sampling_logps]
    shrunk = trainer.train_step(policy, None, optimizer, processor, turns, advantages,
                                game_cfg(**{**vars(cfg), "tis_cap": 2.0}), lr=0.0)
    assert shrunk["loss"] == pytest.approx(-torch.exp(torch.tensor(-0.5)).item(), abs=1e-4)


def test_length_buckets_keep_the_loss_and_gradient(tiny_model, pairs_dir, monkeypatch):
    """Micro-batches cut from a length-sorted minibatch: the same loss, KL and gradient as in the
    given order to float precision, with less padding."""
    policy, processor, cfg = lora_policy(tiny_model, temperature=1.0, max_new_tokens=12, micro_batch=2)
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 6)
    torch.manual_seed(0)
    selfplay.generate(policy, processor, turns, cfg)
    lengths = [3, 12, 4, 11, 5, 12]  # interleaved short and long: every unsorted micro-batch pads
    for turn, n in zip(turns, lengths):
        turn.completion_ids, turn.sampling_logps = (turn.completion_ids * 12)[:n], None
    reference = trainer.reference_policy(policy, cfg)
    advantages = [0.5, -1.0, 1.5, -0.5, 1.0, -1.5]
    results, original = {}, selfplay.completion_batch
    for buckets in (False, True):
        padded = []  # completion positions of every micro-batch, padding included

        def recording(processor_, chunk, device):
            padded.append(max(len(t.completion_ids) for t in chunk) * len(chunk))
            return original(processor_, chunk, device)

        monkeypatch.setattr(selfplay, "completion_batch", recording)
        optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.0)
        step = trainer.train_step(policy, reference, optimizer, processor, turns, advantages,
                                  game_cfg(**{**vars(cfg), "length_buckets": buckets}), lr=0.0)
        results[buckets] = (step, sum(padded))
    assert results[True][0]["loss"] == pytest.approx(results[False][0]["loss"], rel=1e-5, abs=1e-7)
    assert results[True][0]["kl"] == pytest.approx(results[False][0]["kl"], rel=1e-5, abs=1e-9)
    assert results[True][0]["grad_norm"] == pytest.approx(results[False][0]["grad_norm"], rel=1e-5)
    assert results[True][1] < results[False][1]  # padded completion positions: 2*(4+5+12)=42 against 2*(12+11+12)=70


LEVERS = ("merged_rollouts", "static_cache", "vision_cache", "shared_prefill")


def with_levers(cfg, on=()):
    """cfg with the named rollout levers on and the others off."""
    return game_cfg(**{**vars(cfg), **{name: name in on for name in LEVERS}})


def greedy_games(policy, processor, pairs, cfg):
    games, _ = selfplay.play_games(pairs, [0, 2, 1], [(policy, policy)] * len(pairs), processor, cfg)
    return [[t.completion_ids for t in g.clues + g.decisions] for g in games]


@pytest.mark.parametrize("on", [("merged_rollouts",), ("static_cache",), ("vision_cache",), ("shared_prefill",),
                                ("merged_rollouts", "vision_cache", "shared_prefill"), LEVERS])
def test_greedy_games_are_identical_with_and_without_each_lever(tiny_model, pairs_dir, on):
    policy, processor, cfg = lora_policy(tiny_model, temperature=0, max_new_tokens=6, samples=2)
    pairs = selfplay.read_pairs(pairs_dir, "train")[:3]
    plain = greedy_games(policy, processor, pairs, with_levers(cfg))
    assert greedy_games(policy, processor, pairs, with_levers(cfg, on)) == plain


def test_merged_rollouts_restore_the_base_weights_bit_for_bit(tiny_model, pairs_dir):
    """In bf16, where merging then unmerging would not be exact: every weight after a merged
    rollout equals the weight before, bit for bit; during it the adapter's branches never ran."""
    policy, processor, cfg = lora_policy(tiny_model, dtype=torch.bfloat16, temperature=1.0, max_new_tokens=5)
    before = {name: p.detach().clone() for name, p in policy.model.named_parameters()}
    adapter_calls = []
    lora_a = next(m for name, m in policy.model.named_modules() if name.endswith("lora_A.default"))
    lora_a.register_forward_hook(lambda *args: adapter_calls.append(1))
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 3)
    selfplay.generate(policy, processor, turns, with_levers(cfg, ["merged_rollouts"]))
    assert adapter_calls == []
    for name, p in policy.model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    # merging changed the weights while it lasted: (W + D) - D is not W in bf16, so only the copy restores them
    layer = next(m for m in policy.model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer"))
    weight = layer.base_layer.weight
    round_trip = ((weight.float() + layer.get_delta_weight("default").float()).to(weight.dtype).float()
                  - layer.get_delta_weight("default").float()).to(weight.dtype)
    assert not torch.equal(round_trip, weight)
    selfplay.generate(policy, processor, turns, with_levers(cfg))
    assert adapter_calls  # the plain path runs the adapter


def count_encoded_pictures(model):
    """A hook on the vision tower that counts the pictures it encodes (rows of grid_thw)."""
    counted = []
    tower = selfplay.vision_cache(model).owner.visual
    tower.register_forward_hook(lambda module, args, kwargs, out: counted.append(len(kwargs["grid_thw"])),
                                with_kwargs=True)
    return counted


def test_vision_tower_runs_once_per_distinct_picture_in_an_iteration(tiny_model, pairs_dir):
    """3 games, 2 rounds of 4 seats and 2 judge samples: 30 turns see 6 distinct pictures (each game's
    original and edited one). With the vision cache the tower encodes 6, and the LoRA update's
    reference and policy passes encode none; without it, one encode per turn."""
    policy, processor, cfg = lora_policy(tiny_model, temperature=1.0, max_new_tokens=4, samples=2, rounds=2)
    pairs = selfplay.read_pairs(pairs_dir, "train")[:3]
    counted = count_encoded_pictures(policy.model)
    games, _ = selfplay.play_games(pairs, [0, 2, 1], [(policy, policy)] * 3, processor, with_levers(cfg, ["vision_cache"]))
    turns = [t for g in games for t in g.clues + g.decisions]
    assert len(turns) == 30 and len({selfplay.picture_key(t.image) for t in turns}) == 6
    assert sum(counted) == 6
    reference = trainer.reference_policy(policy, cfg)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-3)
    step = trainer.train_step(policy, reference, optimizer, processor, turns, [1.0, -1.0] * 15,
                              with_levers(cfg, ["vision_cache"]), lr=1e-3)
    assert sum(counted) == 6 and step["grad_norm"] > 0  # the update trained, on the rollouts' features

    counted.clear()
    selfplay.play_games(pairs, [0, 2, 1], [(policy, policy)] * 3, processor, with_levers(cfg))
    assert sum(counted) == 30


def test_vision_cache_forgets_features_when_the_tower_trains(tiny_model, pairs_dir):
    """Full fine-tuning trains the tower: after an optimiser step the same pictures are encoded again."""
    cfg = game_cfg(model=tiny_model, lora_rank=0, temperature=1.0, max_new_tokens=4, vision_cache=True)
    policy, processor = trainer.build_policy(cfg)
    counted = count_encoded_pictures(policy.model)
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 2)  # two pictures
    selfplay.generate(policy, processor, turns, cfg)
    selfplay.generate(policy, processor, turns, cfg)
    assert sum(counted) == 2
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-3)
    trainer.train_step(policy, None, optimizer, processor, turns, [1.0, -1.0], game_cfg(**{**vars(cfg), "kl": 0}), lr=1e-3)
    assert sum(counted) == 4  # the update encoded them itself, with gradient
    selfplay.generate(policy, processor, turns, cfg)
    assert sum(counted) == 6


def test_sampled_logprobs_with_every_lever_on_match_the_trainer_s(tiny_model, pairs_dir):
    """A sampled rollout through merged weights, a static cache and cached pictures: the
    trainer's recomputed log-probs (adapter unmerged, pictures encoded afresh) equal the sampler's
    log_softmax(logits / T) within 1e-4."""
    policy, processor, cfg = lora_policy(tiny_model, temperature=0.8, max_new_tokens=10)
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 4)
    torch.manual_seed(0)
    selfplay.generate(policy, processor, turns, with_levers(cfg, LEVERS))
    batch, ids, mask = selfplay.completion_batch(processor, turns, "cpu")
    with torch.no_grad():
        recomputed = selfplay.token_logprobs(policy.model, batch, ids, 0.8)
    sampled = selfplay.sampling_logprob_batch(turns, "cpu")
    assert mask.sum() > len(turns)
    assert ((recomputed - sampled).abs() * mask).max() < 1e-4


@pytest.mark.slow
def test_compiled_static_cache_decode_keeps_greedy_outputs(tiny_model, pairs_dir, monkeypatch):
    """The CUDA default path (static cache, merged LoRA, decode compiled by generate) forced onto the
    CPU: torch.compile accepts Qwen2.5-VL's decode step and its greedy outputs equal the plain path's.
    Slow: compiling takes 1-4 CPU-minutes."""
    from transformers import CompileConfig
    policy, processor, cfg = lora_policy(tiny_model, temperature=0, max_new_tokens=6)
    plain_turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 2)
    selfplay.generate(policy, processor, plain_turns, with_levers(cfg))
    settings = selfplay.sampling_settings

    def compiled(*args):
        config = settings(*args)
        config.compile_config = CompileConfig()
        config.compile_config._compile_all_devices = True  # generate compiles only on accelerators unless told
        return config

    monkeypatch.setattr(selfplay, "sampling_settings", compiled)
    compiled_calls = []
    get_compiled_call = type(policy.model.get_base_model()).get_compiled_call
    monkeypatch.setattr(type(policy.model.get_base_model()), "get_compiled_call",
                        lambda self, *a: compiled_calls.append(1) or get_compiled_call(self, *a))
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 2)
    selfplay.generate(policy, processor, turns, with_levers(cfg, ["static_cache", "merged_rollouts"]))
    assert compiled_calls  # the decode really went through torch.compile
    assert [t.completion_ids for t in turns] == [t.completion_ids for t in plain_turns]


def test_shared_prefill_copies_one_prefill_per_distinct_prompt(tiny_model, pairs_dir):
    """Judge-like calls (each prompt and picture repeated G = 3 times): with the shared prefill the
    model's forward sees each distinct prompt once (plus one token per row), and the sampled
    tokens' log-probs still equal the trainer's recomputed ones within 1e-4."""
    policy, processor, cfg = lora_policy(tiny_model, temperature=0.8, max_new_tokens=6)
    turns = [selfplay.Turn(-1, -1, t.prompt, t.image) for t in sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 2)
             for _ in range(3)]
    prefilled = []
    policy.model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: prefilled.append(kwargs["input_ids"].shape) if kwargs["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    torch.manual_seed(0)
    selfplay.generate(policy, processor, turns, with_levers(cfg, ["shared_prefill", "merged_rollouts", "vision_cache"]))
    assert len(prefilled) == 1 and prefilled[0][0] == 2  # the 2 distinct prompts, not the 6 rows
    batch, ids, mask = selfplay.completion_batch(processor, turns, "cpu")
    with torch.no_grad():
        recomputed = selfplay.token_logprobs(policy.model, batch, ids, 0.8)
    assert ((recomputed - selfplay.sampling_logprob_batch(turns, "cpu")).abs() * mask).max() < 1e-4
    prefilled.clear()
    selfplay.generate(policy, processor, turns, with_levers(cfg))
    assert len(prefilled) == 1 and prefilled[0][0] == 6
