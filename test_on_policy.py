"""Tests that the RL trains on what was sampled (issue "train on what was sampled"): the loss's
log-probs are those of the sampling policy, softmax(logits / T), whatever the checkpoint's
generation_config says; the log-prob passes build no KV cache; and full fine-tuning in bf16 keeps
the updates (fp32 master weights).

    python -m pytest -q test_on_policy.py
"""
import json
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import selfplay
import trainer
from test_smoke import game_cfg, sample_turns


@pytest.fixture(scope="module")
def opinionated_model(tiny_model, tmp_path_factory):
    """The tiny model with a generation_config that, if it leaked into sampling, would change
    every sampled distribution (Qwen2.5-VL-7B-Instruct's sets a repetition penalty, top_k and
    top_p; this one sets them much harder, and more)."""
    out = str(tmp_path_factory.mktemp("opinionated") / "tiny-vlm")
    shutil.copytree(tiny_model, out)
    path = os.path.join(out, "generation_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(do_sample=True, repetition_penalty=1.5, top_k=3, top_p=0.5, temperature=0.1,
                  no_repeat_ngram_size=1, min_p=0.2, typical_p=0.5, epsilon_cutoff=0.01)
    with open(path, "w") as f:
        json.dump(config, f)
    return out


def test_logprobs_at_the_sampling_temperature_match_what_generate_sampled(opinionated_model, pairs_dir):
    """token_logprobs at T equals log_softmax(raw logits / T) within 1e-4, and the scores generate
    sampled from are exactly raw logits / T (the checkpoint's penalty, top-k and top-p not applied)."""
    temperature = 0.8
    processor = selfplay.load_processor(opinionated_model)
    model = selfplay.load_model(opinionated_model, "cpu", torch.float32).eval()
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 4)
    inputs = processor(text=[t.prompt for t in turns], images=[t.image for t in turns],
                       padding=True, padding_side="left", return_tensors="pt")
    settings = selfplay.sampling_settings(model, processor, game_cfg(temperature=temperature, max_new_tokens=12))
    torch.manual_seed(0)
    out = model.generate(**inputs, generation_config=settings, output_logits=True, output_scores=True,
                         return_dict_in_generate=True)
    raw = torch.stack(out.logits, 1).float() / temperature
    scores = torch.stack(out.scores, 1).float()
    suppressed = selfplay.special_vision_ids(processor)
    kept = torch.ones(raw.shape[-1], dtype=torch.bool)
    kept[suppressed] = False
    assert torch.isinf(scores[..., suppressed]).all()
    assert torch.allclose(scores[..., kept], raw[..., kept], atol=1e-5)

    assert_recomputed_logprobs_match(model, processor, turns, inputs, out, temperature)


def assert_recomputed_logprobs_match(model, processor, turns, inputs, out, temperature):
    """Give each turn the completion generate sampled (cut after its stop token) and assert that
    token_logprobs at T equals log_softmax(output_logits / T) within 1e-4. Returns the
    recomputed log-probs and the completion ids of the batch."""
    raw = torch.stack(out.logits, 1).float() / temperature
    sampled = out.sequences[:, inputs["input_ids"].shape[1]:]
    expected = F.log_softmax(raw, -1).gather(2, sampled.unsqueeze(-1)).squeeze(-1)
    stops = selfplay.stop_ids(model)
    for turn, row in zip(turns, sampled.tolist()):
        turn.completion_ids = row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))]
    batch, ids, mask = selfplay.completion_batch(processor, turns, "cpu")
    with torch.no_grad():
        recomputed = selfplay.token_logprobs(model, batch, ids, temperature)
    assert mask.sum() > len(turns)
    assert torch.allclose(recomputed * mask, expected[:, : ids.shape[1]] * mask, atol=1e-4)
    return recomputed, ids


def test_first_sampled_token_follows_softmax_of_logits_over_t(opinionated_model, pairs_dir):
    """2,000 first tokens from selfplay.generate at T = 0.8 against softmax(logits / 0.8) over the
    vocabulary minus the suppressed vision tokens: Pearson's chi-square (categories with an
    expected count under 5 pooled) must not reject at the 0.1% level, and the total variation
    distance must not exceed the largest of 200 exact multinomial draws of the same size (its
    spread over ~500 tokens with 2,000 samples is ~0.17-0.2). With the checkpoint's settings
    (top_k 3, ...) leaking in, all samples fall on a handful of tokens: p ~ 0, distance ~ 0.9."""
    temperature, n = 0.8, 2000
    cfg = game_cfg(temperature=temperature, max_new_tokens=1)
    policy, processor = trainer.build_policy(game_cfg(model=opinionated_model))
    turn = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 1)[0]
    inputs = processor(text=[turn.prompt], images=[turn.image], return_tensors="pt")
    with torch.no_grad():
        logits = policy.model(**inputs).logits[0, -1].float() / temperature
    logits[selfplay.special_vision_ids(processor)] = -float("inf")
    expected = torch.softmax(logits, -1).double()

    torch.manual_seed(0)
    counts = torch.zeros_like(expected)
    for _ in range(n // 500):
        turns = [selfplay.Turn(0, 0, turn.prompt, turn.image) for _ in range(500)]
        selfplay.generate(policy, processor, turns, cfg)
        for t in turns:
            counts[t.completion_ids[0]] += 1

    common = expected * n >= 5
    observed = torch.cat([counts[common], counts[~common].sum().reshape(1)])
    wanted = torch.cat([expected[common], expected[~common].sum().reshape(1)])
    wanted = wanted / wanted.sum() * n
    # Pearson's chi-square, p = P(chi2 with k - 1 degrees of freedom > statistic)
    statistic = ((observed - wanted) ** 2 / wanted).sum().double()
    p_value = torch.special.gammaincc(torch.tensor((len(observed) - 1) / 2, dtype=torch.float64), statistic / 2).item()
    total_variation = 0.5 * (counts / n - expected).abs().sum().item()
    exact = torch.distributions.Multinomial(n, probs=expected).sample((200,))
    null_spread = (0.5 * (exact / n - expected).abs().sum(-1)).max().item()
    assert common.sum() > 20  # a wide distribution: the check has many categories to fail on
    assert p_value > 1e-3, f"chi-square p = {p_value:.2e}"
    assert total_variation <= null_spread, f"total variation {total_variation:.3f} > {null_spread:.3f}"


def test_logprob_passes_build_no_kv_cache(tiny_model, pairs_dir):
    processor = selfplay.load_processor(tiny_model)
    model = selfplay.load_model(tiny_model, "cpu", torch.float32).eval()
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 2)
    for turn in turns:
        turn.completion_ids = [100, 101, 102]
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("use_cache")),
                                    with_kwargs=True)
    batch, ids, _ = selfplay.completion_batch(processor, turns, "cpu")
    with torch.no_grad():
        selfplay.token_logprobs(model, batch, ids)
    assert seen == [False]


def test_the_loss_scores_every_pass_at_the_logprob_temperature(tiny_model, pairs_dir, monkeypatch):
    """Policy, old policy (--minibatches 2) and reference: all at cfg.logprob_temperature, which
    defaults to --temperature; --logprob-temperature 1 is the released code's."""
    cfg = game_cfg(model=tiny_model, temperature=0.8, logprob_temperature=0.8, minibatches=2, micro_batch=2)
    policy, processor = trainer.build_policy(cfg)
    reference = trainer.reference_policy(policy, cfg)
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 4)
    selfplay.generate(policy, processor, turns, cfg)
    temperatures, score = [], selfplay.token_logprobs

    def recording(model, inputs, ids, temperature=1.0, **kwargs):
        temperatures.append((model is reference.model, temperature))
        return score(model, inputs, ids, temperature, **kwargs)

    monkeypatch.setattr(selfplay, "token_logprobs", recording)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-5)
    trainer.train_step(policy, reference, optimizer, processor, turns, [1.0, -1.0, 0.5, -0.5], cfg, lr=1e-5)
    assert {t for _, t in temperatures} == {0.8}
    assert sum(is_reference for is_reference, _ in temperatures) == 2  # one reference pass per micro-batch
    assert len(temperatures) == 2 + 2 + 1  # policy, reference, and the second share's old policy

    def parsed(*flags):
        monkeypatch.setattr(sys, "argv", ["rlvr.py", "--data", "d", "--out", "o", *flags])
        return trainer.parse_args("decision")

    assert parsed("--temperature", "0.7").logprob_temperature == 0.7
    assert parsed("--logprob-temperature", "1").logprob_temperature == 1.0


def test_bf16_full_fine_tuning_keeps_its_updates(tiny_model, pairs_dir, tmp_path):
    """--lora-rank 0 --dtype bfloat16: one AdamW step at lr 1e-5 (forced advantages) moves more than
    90% of a trained matrix's entries, because the weights stay fp32 (bf16 compute under autocast);
    in bf16 weights a step of 1e-5 rounds away on most entries. The checkpoint is fp32 too."""
    cfg = game_cfg(model=tiny_model, dtype=torch.bfloat16, kl=0.04, max_new_tokens=6)
    policy, processor = trainer.build_policy(cfg)
    reference = trainer.reference_policy(policy, cfg)
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    matrix = dict(policy.model.named_parameters())[name]
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 4)
    torch.manual_seed(0)
    selfplay.generate(policy, processor, turns, cfg)
    before = matrix.detach().clone()
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    step = trainer.train_step(policy, reference, optimizer, processor, turns, [1.0, -1.0, 0.5, -0.5], cfg, lr=1e-5)
    assert not step["skipped_update"] and step["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is computed as the policy is
    changed = (matrix.detach() != before).float().mean().item()
    assert changed > 0.9, f"only {changed:.1%} of {name} changed"
    assert matrix.dtype == torch.float32 and policy.autocast == torch.bfloat16
    folder = str(tmp_path / "ckpt")
    policy.model.save_pretrained(folder)
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_default_learning_rate_is_lora_s_or_full_fine_tuning_s(monkeypatch):
    def lr(*flags):
        monkeypatch.setattr(sys, "argv", ["rlvr.py", "--data", "d", "--out", "o", *flags])
        return trainer.parse_args("decision").lr

    assert lr() == 1e-4 and lr("--lora-rank", "64") == 1e-4  # LoRA: ~10x the full fine-tuning rate
    assert lr("--lora-rank", "0") == 1e-5  # the paper's full fine-tuning rate
    assert lr("--lora-rank", "0", "--lr", "3e-6") == 3e-6


def test_gradient_checkpointing_runs_no_backward_through_the_frozen_vision_tower(tiny_model, pairs_dir):
    """LoRA with --gradient-checkpointing: no gradient flows through any vision block (a hook on
    their outputs counts it), and every LoRA gradient is bit-identical to the one computed with
    transformers' input hooks on, which back-propagate the whole vision tower."""
    cfg = game_cfg(model=tiny_model, lora_rank=4, gradient_checkpointing=True)
    torch.manual_seed(0)
    policy, processor = trainer.build_policy(cfg)
    model = policy.model
    with torch.no_grad():  # a non-zero adapter, so that its gradients are not trivially equal
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    turns = sample_turns(processor, selfplay.read_pairs(pairs_dir, "train"), 4)
    for i, turn in enumerate(turns):
        turn.completion_ids = [11 + i, 23, 57 + i]
    inputs, ids, mask = selfplay.completion_batch(processor, turns, "cpu")
    backward_passes = []

    def count_backward(module, args, output):
        if output.requires_grad:
            output.register_hook(lambda grad: backward_passes.append(1))

    for block in model.base_model.model.model.visual.blocks:
        block.register_forward_hook(count_backward)

    def lora_gradients():
        model.zero_grad(set_to_none=True)
        model.train()
        (selfplay.token_logprobs(model, inputs, ids, cfg.logprob_temperature) * mask).sum().backward()
        model.eval()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    gradients = lora_gradients()
    assert not backward_passes
    assert max(g.abs().max().item() for g in gradients.values()) > 0
    model.enable_input_require_grads()  # what gradient_checkpointing_enable leaves on by itself
    with_vision_backward = lora_gradients()
    assert len(backward_passes) == len(model.base_model.model.model.visual.blocks)
    for name, gradient in gradients.items():
        assert torch.equal(gradient, with_vision_backward[name]), name
