"""
trainer.py: what the two stage scripts share. The loss (Eq. 3 = Eq. 6), the Iterative-SPO
switching rule (Eqs. 7-10, Algorithm 1), and the iteration loop (checkpoints: checkpoints.py).

One iteration: play a batch of full games with the current policy (selfplay.py), train ONLY the
active stage (clue turns via spo.py, or decision samples via rlvr.py) with one optimiser step (or
--minibatches steps), update the decision statistics, log, save, and ask the schedule which stage
comes next:

  Eq. 3/6  per token: ratio = exp(logp - logp_old)
             L = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + beta_KL KL,
             KL = exp(ref - logp) - (ref - logp) - 1 (k3),  eps = 0.2, beta_KL = 0.04;
           mean over a sequence's completion tokens, then over sequences. With one optimiser step
           per batch the ratio is 1 (REINFORCE + KL), so logp_old is the detached logp; with
           --minibatches M > 1, logp_old is the sampling policy's, computed before the first step.
           logp, logp_old and ref are all log-probs of softmax(logits / T) at the sampling
           temperature T, so that the gradient is that of the policy that sampled the tokens
           (--logprob-temperature 1 reproduces the released code, which sampled at 0.8).
  Eq. 7-8  acc_ema <- rho acc_ema + (1 - rho) acc_t, na_ema likewise, rho = 0.95, both from 0;
           acc_t = fraction of decision samples naming the spy, na_t = fraction of N/A.
  Eq. 9    decision -> clue when acc_ema >= 0.9 and na_ema <= 0.1 (the spy is too easy to find).
  Eq. 10   clue -> decision when 1 - acc_ema >= 0.4 or na_ema >= 0.5 (the decisions need work).
           Either only after K_min = 5 iterations in the stage; after P = 20 the stage switches
           regardless.

When the schedule says to change stage, the checkpoint records the new stage and the script
exits; run.sh then starts the other script on the same --out folder (--schedule alternate, which
switches every iteration, trains both stages in one process instead). The stage scripts call
main() with both stages' modules (their scoring and sample functions), so this file imports
neither of them. Started by hand:

    python rlvr.py --model tiny-vlm --data games/clevr --out runs/demo --iterations 10
    python spo.py  --model tiny-vlm --data games/clevr --out runs/demo --iterations 10
"""
import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from contextlib import ExitStack
from types import SimpleNamespace

import torch
from tqdm import tqdm

import cli
import checkpoints
import distributed
import models
import selfplay
import tracking
import warm_start

# -----------------------------------------------------------------------------
# The algorithm: loss and switching rule


def sequence_mean(values, mask):
    """Mean over each sequence's completion tokens, [B]."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def k3_kl(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || pi_ref): unbiased, always >= 0, exactly 0 where they agree."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def policy_loss(logp, old_logp, ref_logp, adv, mask, clip=0.2, kl=0.04, is_weights=None):
    """Eq. 3 / Eq. 6: clipped surrogate plus beta_KL times k3, averaged per sequence then over
    the batch. logp, old_logp, ref_logp, mask: [B, T]; adv: [B]. ref_logp may be None when kl = 0.
    is_weights [B, T] (truncated importance sampling, TRL's correction) multiply the surrogate
    of each token, not the KL."""
    ratio = torch.exp(logp - old_logp)
    adv = adv.unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    if is_weights is not None:
        per_token = per_token * is_weights
    if kl > 0:
        per_token = per_token + kl * k3_kl(logp, ref_logp)
    return sequence_mean(per_token, mask).mean()


def truncated_is_weights(old_logp, sampling_logp, cap):
    """Truncated importance sampling (Yao et al. 2025; TRL's vLLM correction): per token
    min(pi_old / pi_sampling, cap) = min(exp(old_logp - sampling_logp), cap), with no gradient.
    It re-weights tokens that the sampler (merged, bf16 or compiled weights) gave another
    probability than the trained policy does; the cap bounds the variance."""
    return torch.clamp(torch.exp(old_logp - sampling_logp), max=cap).detach()


def length_sorted(indices, turns):
    """A minibatch's turns in order of length (completion, then prompt), so that each micro-batch
    holds turns of similar length and pads little; the loss is the same sum in another order."""
    return sorted(indices, key=lambda i: (len(turns[i].completion_ids), len(turns[i].prompt)))


def clipped_tokens(ratio, adv, clip=0.2):
    """Tokens of Eq. 3 where the clip binds (the min picks the clipped term, so the token gives no
    gradient): ratio above 1 + eps with A > 0, or below 1 - eps with A < 0. ratio [B, T], adv [B].
    TRL logs their share as clip_ratio/region_mean."""
    adv = adv.unsqueeze(1)
    return ((ratio > 1 + clip) & (adv > 0)) | ((ratio < 1 - clip) & (adv < 0))


def next_stage(stage, acc_ema, na_ema, dwell, acc_high=0.9, na_low=0.1, error_high=0.4,
               na_high=0.5, k_min=5, patience=20):
    """Eqs. 9-10: the stage of the next iteration, given `dwell` iterations done in this one."""
    other = "clue" if stage == "decision" else "decision"
    if dwell < k_min:
        return stage
    if dwell >= patience:
        return other
    if stage == "decision" and acc_ema >= acc_high and na_ema <= na_low:
        return "clue"
    if stage == "clue" and (1 - acc_ema >= error_high or na_ema >= na_high):
        return "decision"
    return stage


def scheduled_stage(state, cfg):
    """The stage after this iteration under --schedule (iterative is Algorithm 1)."""
    if cfg.schedule == "iterative":
        return next_stage(state["stage"], state["acc_ema"], state["na_ema"], state["dwell"],
                          cfg.acc_high, cfg.na_low, cfg.error_high, cfg.na_high, cfg.k_min, cfg.patience)
    if cfg.schedule == "alternate":  # the released code: switch after every optimiser step
        return "clue" if state["stage"] == "decision" else "decision"
    return cfg.schedule


def update_decision_emas(state, acc, na, cfg):
    """Eqs. 7-8, kept raw; with --bias-correction the switching rule reads them divided by
    1 - rho^t, so that they mean 'recent accuracy' from the first iteration on."""
    state["ema_steps"] += 1
    state["acc_ema_raw"] = cfg.rho * state["acc_ema_raw"] + (1 - cfg.rho) * acc
    state["na_ema_raw"] = cfg.rho * state["na_ema_raw"] + (1 - cfg.rho) * na
    scale = 1 - cfg.rho ** state["ema_steps"] if cfg.bias_correction else 1.0
    state["acc_ema"], state["na_ema"] = state["acc_ema_raw"] / scale, state["na_ema_raw"] / scale


def learning_rate(iteration, cfg, schedule=None):
    """The learning rate of a 1-based iteration: cosine with 10% linear warm-up over the run's
    horizon, schedule["horizon"] (the --iterations it started with; default cfg.iterations). After
    a resume with a larger --iterations (extend_schedule) the schedule also holds "from" and "lr":
    from that iteration on, the rate falls by a cosine from the rate it had there to 0 at the new
    horizon, instead of stretching the whole cosine, which would throw it back up."""
    schedule = schedule or {"horizon": cfg.iterations}
    if "from" in schedule:
        done, horizon = iteration - schedule["from"], schedule["horizon"] - schedule["from"] + 1
        return schedule["lr"] * 0.5 * (1 + math.cos(math.pi * done / horizon))
    horizon = schedule["horizon"]
    warmup = max(1, math.ceil(0.1 * horizon))
    step = iteration - 1
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, horizon - warmup)))


def extend_schedule(state, cfg):
    """The learning-rate schedule of a run (kept in state["lr_schedule"]): a fresh run's horizon is
    its --iterations. A resume with more --iterations keeps what was done and decays from the
    current rate to 0 at the new end; a resume with fewer stops early on the same schedule. Returns
    a one-line note when the schedule changed, else None."""
    schedule = state.setdefault("lr_schedule", {"horizon": cfg.iterations})  # a checkpoint from before it was kept: as before
    if cfg.iterations <= schedule["horizon"]:
        return None
    done = state["iteration"]
    rate = learning_rate(done, cfg, schedule) if done else cfg.lr
    state["lr_schedule"] = {"horizon": cfg.iterations, "from": done, "lr": rate} if done else {"horizon": cfg.iterations}
    if not done:
        return None
    return (f"--iterations {cfg.iterations} extends this run's schedule of {schedule['horizon']} iterations: the learning rate "
            f"falls from {rate:.3g} (iteration {done}) to 0 at iteration {cfg.iterations}, without a new warm-up")


# -----------------------------------------------------------------------------
# One optimiser step on a stage's samples


def filler_turn(processor):
    """A turn that trains nothing (its loss is multiplied by 0), for a rank with fewer micro-batches
    than another: FSDP2 needs every rank in every forward and backward, DDP in the backward that
    synchronises. A white picture and one pad token: it runs the vision tower and every layer."""
    from PIL import Image
    pad = processor.tokenizer.pad_token_id
    return selfplay.Turn(-1, -1, selfplay.chat(processor, ""), Image.new("RGB", (56, 56), "white"), completion_ids=[pad])


def micro_batches(turns, cfg):
    """Per optimiser step, the index lists of its micro-batches (with --length-buckets, each step's
    turns sorted by length first), padded with empty lists (filler turns) to the most that any rank
    has: every rank runs the same number of passes, even one with no turns at all (a short batch).
    One process: no padding."""
    size = max(1, math.ceil(len(turns) / cfg.minibatches))
    minibatches = [list(range(s, min(s + size, len(turns)))) for s in range(0, len(turns), size)] or [[]]
    if cfg.length_buckets:
        minibatches = [length_sorted(mb, turns) for mb in minibatches]
    chunks = [[mb[k:k + cfg.micro_batch] for k in range(0, len(mb), cfg.micro_batch)] for mb in minibatches]
    steps = distributed.largest(len(chunks))
    chunks += [[] for _ in range(steps - len(chunks))]
    passes = distributed.largest(max(len(c) for c in chunks))
    return [c + [[] for _ in range(passes - len(c))] for c in chunks]


def seeing_term(policy, processor, examples, weight):
    """The --aux-data term of one optimiser step: backward of weight x the warm start's loss (mean
    per-token negative log-likelihood of the targets) on generator-labelled seeing examples
    (warm_start.seeing_examples). Returns that loss. A device of the tiny CPU demo, standing in
    for the pretraining a real VLM keeps: a probe that trained the judge alone (with labels, full
    fine-tuning) unlearned the yes/no check within 3,000 games (docs/learn_cpu.md)."""
    eos = models.stop_token_id(processor)
    with policy.active():
        logp, mask = warm_start.target_logprob(policy.model, processor, warm_start.make_turns(examples, processor, eos))
    loss = (-logp / mask.sum(-1)).mean()
    (weight * loss).backward()
    return loss.item()


def train_step(policy, reference, optimizer, processor, turns, advantages, cfg, lr, aux_batches=None, aux_weight=0.0):
    """Eq. 3/6 on one batch of turns: --minibatches optimiser steps (the paper: 1), each
    accumulated over micro-batches, clipped and skipped if not finite. With aux_weight > 0, the
    k-th step also trains aux_batches[k] (seeing_term).
    Returns the step's metrics: mean loss and kl, the largest grad norm, whether a step was
    skipped, the share of completion tokens where the clip bound, and their mean entropy (and
    aux_loss, the seeing term's mean, when it is on).
    Under torchrun `turns` are this rank's (possibly none); the loss and every metric are over all
    ranks' sequences."""
    model = policy.model
    n_global = distributed.total(len(turns))
    steps = micro_batches(turns, cfg)
    filler = filler_turn(processor)

    def batch(chunk):  # (turns, advantages) of a micro-batch; an empty one is the filler, whose loss counts 0 times
        return ([turns[i] for i in chunk], [advantages[i] for i in chunk]) if chunk else ([filler], [0.0])

    # the log-probs of the policy that sampled: after the first step the weights differ, so the
    # ratio of Eq. 3 moves away from 1 and the clip binds (PPO). One step needs no extra pass.
    old_logps = {}
    if len(steps) > 1:
        with torch.no_grad():
            for s, step_chunks in enumerate(steps[1:], 1):
                for c, chunk in enumerate(step_chunks):
                    chunk_turns = batch(chunk)[0]
                    inputs, ids, _ = selfplay.completion_batch(processor, chunk_turns, model.device)
                    with policy.active(), selfplay.reused_vision(model, chunk_turns, cfg):
                        old_logps[s, c] = selfplay.token_logprobs(model, inputs, ids, cfg.logprob_temperature)
    model.train()
    total_loss, total_kl, max_grad_norm, skipped = 0.0, 0.0, 0.0, False
    tokens, clipped, entropy = 0.0, 0.0, 0.0  # sums over completion tokens, for the diagnostics
    drift_sum, drift_max, drift_tokens = 0.0, 0.0, 0.0  # |recomputed - sampling| log-prob, over sampled turns
    aux_losses = []
    for s, step_chunks in enumerate(steps):
        optimizer.zero_grad(set_to_none=True)
        if aux_weight > 0 and aux_batches:  # first, unsynced under DDP: the step's last micro-batch syncs both
            distributed.sync_gradients(model, False)
            aux_losses.append(seeing_term(policy, processor, aux_batches[s], aux_weight))
        step_loss, mb_global = 0.0, distributed.total(sum(len(chunk) for chunk in step_chunks))
        for c, chunk in enumerate(step_chunks):
            # DDP: micro-batches accumulate locally, the last one all-reduces; FSDP2 reduce-scatters
            # every one, so that a rank never holds more than its shard of the gradients
            distributed.sync_gradients(model, c == len(step_chunks) - 1)
            chunk_turns, chunk_advantages = batch(chunk)
            adv = torch.tensor(chunk_advantages, device=model.device)
            inputs, ids, mask = selfplay.completion_batch(processor, chunk_turns, model.device)
            ref_logp = None
            if cfg.kl > 0:  # no reference pass at all when the KL term is off
                # LoRA: the same model with its adapter off sees the same pictures; a separate reference keeps its tower
                reused = selfplay.reused_vision(model, chunk_turns, cfg) if reference.model is model else ExitStack()
                with torch.no_grad(), reference.active(), reused:
                    ref_logp = selfplay.token_logprobs(reference.model, inputs, ids, cfg.logprob_temperature)
            with policy.active(), selfplay.reused_vision(model, chunk_turns, cfg):
                logp, token_entropy = selfplay.token_logprobs(model, inputs, ids, cfg.logprob_temperature, with_entropy=True)
            old_logp = old_logps.get((s, c), logp.detach())
            sampling_logp = selfplay.sampling_logprob_batch(chunk_turns, model.device) if chunk else None
            is_weights = None
            if sampling_logp is not None and cfg.tis_cap:
                is_weights = truncated_is_weights(old_logp, sampling_logp, cfg.tis_cap)
            loss = policy_loss(logp, old_logp, ref_logp, adv, mask, cfg.clip, cfg.kl, is_weights)
            # DDP and FSDP2 average gradients over ranks: times the world size, it is the mean over all ranks' sequences
            (loss * len(chunk) / max(mb_global, 1) * distributed.world_size()).backward()
            if not chunk:
                continue
            if sampling_logp is not None:
                drift = (old_logp - sampling_logp).abs() * mask
                drift_sum, drift_tokens = drift_sum + drift.sum().item(), drift_tokens + mask.sum().item()
                drift_max = max(drift_max, drift.max().item())
            ratio = torch.exp(logp.detach() - old_logp)
            tokens += mask.sum().item()
            clipped += (clipped_tokens(ratio, adv, cfg.clip) * mask).sum().item()
            entropy += (token_entropy * mask).sum().item()
            step_loss += loss.item() * len(chunk) / mb_global
            if ref_logp is not None:
                total_kl += sequence_mean(k3_kl(logp.detach(), ref_logp), mask).sum().item() / n_global
        step_loss = distributed.total(step_loss)  # the same on every rank, so all step or all skip
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        if math.isfinite(step_loss) and math.isfinite(grad_norm):
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            max_grad_norm = max(max_grad_norm, grad_norm)
        else:  # one bad batch must not poison the weights: drop it and say so in the metrics
            skipped = True
        optimizer.zero_grad(set_to_none=True)
        total_loss += step_loss * mb_global / max(n_global, 1)
    model.eval()
    tokens, clipped, entropy = (distributed.total(x) for x in (tokens, clipped, entropy))
    drift_sum, drift_tokens = distributed.total(drift_sum), distributed.total(drift_tokens)
    metrics = {"loss": total_loss, "kl": distributed.total(total_kl), "grad_norm": max_grad_norm if not skipped else float("nan"),
               "skipped_update": skipped, "clip_ratio/region_mean": clipped / max(tokens, 1),
               "entropy": entropy / max(tokens, 1)}
    if drift_tokens:
        metrics["sampling/sampling_logp_difference/mean"] = drift_sum / drift_tokens
        metrics["sampling/sampling_logp_difference/max"] = distributed.largest(drift_max)
    if aux_losses:
        metrics["aux_loss"] = sum(aux_losses) / len(aux_losses)
    return metrics


# -----------------------------------------------------------------------------
# Plumbing: models, config


def master_dtype(cfg):
    """(weights dtype, autocast dtype) of the trainable model. LoRA trains fp32 adapters on
    frozen --dtype weights; full fine-tuning keeps fp32 master weights (and checkpoints) and
    computes in --dtype under autocast."""
    if cfg.lora_rank > 0 or cfg.dtype == torch.float32:
        return cfg.dtype, None
    return torch.float32, cfg.dtype


def build_policy(cfg, checkpoint=None):
    """The trainable model (from the checkpoint when resuming) and its processor."""
    from peft import LoraConfig, PeftModel, get_peft_model
    processor = selfplay.load_processor(cfg.model)
    weights, autocast = master_dtype(cfg)
    if cfg.lora_rank > 0:
        model = selfplay.load_model(cfg.model, cfg.device, weights)
        if checkpoint:
            model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
        else:  # the text model's projections only; the vision tower stays as it is
            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                              target_modules=models.LORA_TARGETS)
            model = get_peft_model(model, lora)  # adapters in fp32 whatever the base dtype (peft's default)
    else:
        model = selfplay.load_model(checkpoint or cfg.model, cfg.device, weights)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers also hooks every input embedding, the vision tower's patch embedding too, to
        # output a tensor that requires grad: with LoRA every pass then recomputed and back-propagated
        # the whole frozen vision tower for nothing. Non-reentrant checkpointing needs no such input.
        model.disable_input_require_grads()
    return selfplay.Policy(distributed.wrap(model, cfg).eval(), autocast=autocast), processor


def reference_policy(policy, cfg):
    """The frozen initial policy: the same model with its LoRA adapter off (no second copy in
    memory), or, for full fine-tuning, a frozen copy of --model computed exactly as the policy
    is (same weights dtype and autocast), so that the KL is 0 before the first update."""
    if cfg.lora_rank > 0:
        return selfplay.Policy(policy.model, adapter=False)
    frozen = selfplay.load_model(cfg.model, cfg.device, master_dtype(cfg)[0]).eval().requires_grad_(False)
    return selfplay.Policy(distributed.wrap_reference(frozen, cfg), autocast=policy.autocast)


def evaluation_policies(cfg, checkpoint):
    """(trained, initial, processor) for evaluate.py and vqa.py: both models in the run's --dtype,
    eval mode, no parameter requiring grad and no autocast. At 7B that is two bf16 copies (2 x 16.6
    GB); the training set-up of a full fine-tune (fp32 master weights under bf16 autocast, which
    also caches a bf16 copy of every weight that requires grad) needed about 83 GB. A LoRA run's
    adapter is cast to --dtype with its base, and switched off for the initial model."""
    from peft import PeftModel
    processor = selfplay.load_processor(cfg.model)
    if cfg.lora_rank > 0:
        base = selfplay.load_model(cfg.model, cfg.device, cfg.dtype)
        trained = PeftModel.from_pretrained(base, checkpoint).to(cfg.dtype).eval().requires_grad_(False)
        return selfplay.Policy(trained), selfplay.Policy(trained, adapter=False), processor
    trained, initial = (selfplay.load_model(path, cfg.device, cfg.dtype).eval().requires_grad_(False)
                        for path in (checkpoint, cfg.model))
    return selfplay.Policy(trained), selfplay.Policy(initial), processor


def fresh_state(cfg, baselines):
    return {"iteration": 0, "stage": "clue" if cfg.schedule == "clue" else "decision", "dwell": 0,
            "acc_ema": 0.0, "na_ema": 0.0, "acc_ema_raw": 0.0, "na_ema_raw": 0.0, "ema_steps": 0,
            "baselines": baselines, "world_size": distributed.world_size()}


def batch_pairs(pairs, iteration, cfg):
    """The pairs of an iteration: consecutive slices of a per-epoch shuffle, so every pair is used
    once per epoch and a resumed run plays exactly the games an uninterrupted one would. A pair
    whose images do not decode is replaced by the next one after the batch in that order that
    does (selfplay.decodable_pairs): the batch keeps its --games games."""
    orders = {}

    def at(k):  # the k-th pair of the run's sequence of epochs
        epoch, position = divmod(k, len(pairs))
        if epoch not in orders:
            orders[epoch] = random.Random(f"{cfg.seed}-epoch-{epoch}").sample(range(len(pairs)), len(pairs))
        return pairs[orders[epoch][position]]

    end = iteration * cfg.games
    spares = (at(k) for k in range(end, end + len(pairs)))
    return selfplay.decodable_pairs([at(k) for k in range(end - cfg.games, end)], spares)


def parse_args(stage, argv=None):
    """The stage script's flags (argv: a list instead of the command line, for bench_levers.py)."""
    p = argparse.ArgumentParser(description=f"Vision-Zero {stage} stage (see the docstring of trainer.py)",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="Hugging Face model id or folder: the initial policy and the KL reference")
    p.add_argument("--data", required=True, help="folder of image pairs as make_games.py writes it")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, games/; reused to resume")
    p.add_argument("--iterations", type=int, default=100, help="total iterations of the run (both stages together)")
    p.add_argument("--games", type=int, default=16, help="games played per iteration")
    selfplay.add_game_args(p)
    p.add_argument("--schedule", choices=["iterative", "alternate", "clue", "decision"], default="iterative",
                   help="iterative: Algorithm 1; alternate: switch every iteration (released code); clue/decision: one stage only (ablations)")
    p.add_argument("--lr", type=float,
                   help="peak AdamW learning rate (cosine, 10%% warm-up); default 1e-4 with LoRA, 1e-5 (the paper's) for "
                   "full fine-tuning: the best LoRA rate is about 10x the full fine-tuning one (Thinking Machines 2025, "
                   "LoRA Without Regret; Biderman et al. 2024, LoRA Learns Less and Forgets Less)")
    p.add_argument("--logprob-temperature", type=float,
                   help="temperature of the policy, old-policy and reference log-probs in the loss; default: "
                   "--temperature, the policy that sampled (TRL, verl, NeMo-RL); 1 reproduces the released code")
    p.add_argument("--kl", type=float, default=0.04, help="beta_KL, weight of the k3 KL to the initial policy; 0 skips the reference pass")
    p.add_argument("--clip", type=float, default=0.2, help="epsilon of the clipped ratio")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward pass (memory vs speed)")
    p.add_argument("--length-buckets", action=argparse.BooleanOptionalAction, default=True,
                   help="sort each optimiser step's turns by length before cutting micro-batches (less padding; the same loss)")
    p.add_argument("--tis-cap", type=float,
                   help="truncated importance sampling: weight each token's surrogate by min(pi_old / pi_sampling, CAP) "
                   "(TRL uses 2); for when sampling_logp_difference shows the sampler drifting from the trained policy. Default: off")
    p.add_argument("--minibatches", type=int, default=1,
                   help="optimiser steps per iteration, each on its share of the batch (the paper: 1; more = PPO-style reuse)")
    p.add_argument("--beta", type=float, default=0.1, help="Eq. 1: weight of the spy's exposure")
    p.add_argument("--lam", type=float, default=0.1, help="Eq. 1: lambda, penalty for a civilian drawing votes")
    p.add_argument("--rae-alpha", type=float, default=0.95, help="Eq. 2: EMA factor of the role baselines (released code: 0.9)")
    p.add_argument("--rae-update-first", action="store_true", help="update the role baselines before subtracting them (released code)")
    p.add_argument("--rae-bias-correction", action=argparse.BooleanOptionalAction, default=True,
                   help="divide the role baselines by 1 - alpha^t like Eqs. 7-8, so the first clue iteration already "
                   "subtracts the batch's role mean; --no-rae-bias-correction: the literal EMA from 0 (paper, released code)")
    p.add_argument("--decision-reward", choices=["paper", "shaped"], default="paper", help="Eq. 4 (paper) or the released code's shaped reward")
    p.add_argument("--rho", type=float, default=0.95, help="Eqs. 7-8: EMA factor of decision accuracy and N/A rate")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=True,
                   help="divide the EMAs by 1 - rho^t (without it acc_ema cannot reach 0.9 before ~45 iterations)")
    p.add_argument("--acc-high", type=float, default=0.9, help="Eq. 9: decision -> clue needs acc_ema >= this")
    p.add_argument("--na-low", type=float, default=0.1, help="Eq. 9: and na_ema <= this")
    p.add_argument("--error-high", type=float, default=0.4, help="Eq. 10: clue -> decision when 1 - acc_ema >= this")
    p.add_argument("--na-high", type=float, default=0.5, help="Eq. 10: or na_ema >= this")
    p.add_argument("--k-min", type=int, default=5, help="K_min: fewest iterations in a stage before a switch")
    p.add_argument("--patience", type=int, default=20, help="P: iterations after which the stage switches regardless")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank on the text model (0 = full fine-tune with a frozen reference copy)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory, ~30%% slower)")
    p.add_argument("--aux-data", help="cells pairs folder (make_games.py --domain cells) of the seeing tasks: with "
                   "--aux-weight > 0 its training split's yes/no and list examples join every optimiser step; its "
                   "held-out split's yes/no accuracy is logged (heldout_yes_no) every --seeing-every iterations")
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of the seeing tasks' supervised loss beside Eq. 3/6 (0: off, the paper's update; a "
                   "device of the tiny CPU demo, standing in for the pretraining a real VLM keeps)")
    p.add_argument("--aux-batch", type=int, default=8, help="seeing examples per optimiser step")
    p.add_argument("--seeing-every", type=int, default=10, help="iterations between held-out yes/no checks with --aux-data")
    p.add_argument("--save-every", type=int,
                   help="save a checkpoint every this many iterations (and at every exit); default 1 with LoRA (an adapter), "
                   "10 for full fine-tuning, whose checkpoint is the fp32 model and its AdamW state (~100 GB at 7B)")
    p.add_argument("--seed", type=int, default=0, help="seed of pair order, spy seats and sampling")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto (cuda when available)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto", help="compute dtype; auto = bfloat16 on cuda, float32 on cpu (full fine-tuning keeps fp32 master weights and computes under autocast; LoRA adapters are fp32)")
    tracking.add_args(p)
    cfg = p.parse_args(argv)
    selfplay.check_game_args(cfg)
    if cfg.save_every is None:
        cfg.save_every = 1 if cfg.lora_rank > 0 else 10
    if min(cfg.iterations, cfg.games, cfg.micro_batch, cfg.save_every, cfg.minibatches) < 1:
        p.error("--iterations, --games, --micro-batch, --minibatches and --save-every must be at least 1")
    if cfg.lr is None:
        cfg.lr = 1e-4 if cfg.lora_rank > 0 else 1e-5
    if cfg.aux_weight < 0 or cfg.aux_batch < 1 or cfg.seeing_every < 1:
        p.error("need --aux-weight >= 0, --aux-batch >= 1 and --seeing-every >= 1")
    if cfg.aux_weight > 0 and not cfg.aux_data:
        p.error("--aux-weight needs --aux-data, the cells pairs of the seeing tasks (e.g. the run's --data)")
    if cfg.lr <= 0 or cfg.kl < 0 or not 0 < cfg.clip < 1 or not 0 < cfg.rho < 1 or not 0 < cfg.rae_alpha < 1:
        p.error("need --lr > 0, --kl >= 0, 0 < --clip < 1, 0 < --rho < 1 and 0 < --rae-alpha < 1")
    if cfg.logprob_temperature is None:
        cfg.logprob_temperature = cfg.temperature
    if cfg.logprob_temperature <= 0:
        p.error("--logprob-temperature must be positive")
    if cfg.tis_cap is not None and cfg.tis_cap <= 0:
        p.error("--tis-cap must be positive (it is the largest importance weight a token gets)")
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if cfg.device.startswith("cuda") else "float32"
    cfg.dtype = getattr(torch, cfg.dtype)
    return cfg


def batch_metrics(games, cfg):
    """What one batch of played games says, for both stages whichever one trained."""
    spy_rewards = [g.rewards[g.spy] for g in games]
    civilian_rewards = [r for g in games for seat, r in enumerate(g.rewards) if seat != g.spy]
    clues = [t for g in games for t in g.clues]
    decisions = [t for g in games for t in g.decisions]
    return {
        **selfplay.decision_stats(games),
        "completions/clipped_ratio": sum(t.truncated for t in clues + decisions) / len(clues + decisions),
        "reward_spy": sum(spy_rewards) / len(spy_rewards),
        "reward_civilian": sum(civilian_rewards) / len(civilian_rewards),
        "reward_decision": sum(t.reward for t in decisions) / len(decisions),
        "clue_format_rate": sum(t.parsed is not None for t in clues) / len(clues),
        "spy_found_rate": sum(g.spy_found(cfg.players) for g in games) / len(games),
        "clue_tokens": sum(len(t.completion_ids) for t in clues) / len(clues),
        "decision_tokens": sum(len(t.completion_ids) for t in decisions) / len(decisions),
    }


def seeing_data(cfg):
    """--aux-data's training pairs with their images and 400 held-out yes/no questions (the warm
    start's, seed 0), or None without --aux-data."""
    if not cfg.aux_data:
        return None
    pairs, images = warm_start.cells_pairs(cfg.aux_data, "train")
    held_out, held_images = warm_start.cells_pairs(cfg.aux_data, "eval")
    if not pairs or not held_out:
        sys.exit(f"error: --aux-data {cfg.aux_data} holds no cells pairs in its training or held-out split; make them "
                 f"with `python make_games.py --domain cells --n 2000 --out {cfg.aux_data}`")
    return SimpleNamespace(pairs=pairs, images=images, questions=warm_start.held_out_questions(held_out, held_images, 0))


def aux_batches_of(seeing, iteration, cfg):
    """The seeing examples of an iteration's optimiser steps (None when the term is off): seeded by
    (seed, iteration, rank), so that a resumed run trains on the same ones."""
    if seeing is None or cfg.aux_weight <= 0:
        return None
    rng = random.Random(f"{cfg.seed}-aux-{iteration}-{distributed.rank()}")
    return [warm_start.seeing_examples(seeing.pairs, seeing.images, cfg.aux_batch, rng, cfg) for _ in range(cfg.minibatches)]


# -----------------------------------------------------------------------------
# The loop


def main(stage, clue_stage, decision_stage):
    """Train `stage` ("clue" or "decision") until the schedule hands over or the budget is spent.
    clue_stage is spo (score_clues, clue_samples), decision_stage is rlvr (score_decisions,
    decision_samples): the stage scripts pass themselves and each other."""
    cfg = parse_args(stage)
    distributed.init()  # under torchrun; nothing in a plain run
    distributed.check_split(cfg)
    cfg.device = distributed.device(cfg.device)
    os.makedirs(os.path.join(cfg.out, "games"), exist_ok=True)
    checkpoint, state, note = checkpoints.resume_point(cfg.out)
    if note and distributed.is_main():
        print(note)
    state = state or fresh_state(cfg, clue_stage.initial_baselines())
    if checkpoint:
        distributed.check_resume(state.get("world_size", 1), cfg.out)
        if "updates" not in state["baselines"]:  # a checkpoint from before the RAE bias correction
            state["baselines"]["updates"] = checkpoints.clue_iterations_logged(os.path.join(cfg.out, "metrics.jsonl"),
                                                                   state["iteration"])
    schedule_note = extend_schedule(state, cfg)
    if schedule_note and distributed.is_main():
        print(schedule_note)
    if state["iteration"] >= cfg.iterations:
        if distributed.is_main():
            print(f"{cfg.out} has done {state['iteration']} of {cfg.iterations} iterations: nothing to do")
        return
    if state["stage"] != stage and cfg.schedule != "alternate":
        script = "spo.py" if state["stage"] == "clue" else "rlvr.py"
        sys.exit(f"error: the run in {cfg.out} is in the {state['stage']} stage: run `python {script}` with the same flags, or `bash run.sh`")
    # --schedule alternate changes stage every iteration: both stages train in this one process,
    # rather than a new process loading the model for every iteration
    stage = state["stage"]
    pairs = selfplay.read_pairs(cfg.data, "train", domain=cfg.domain)
    if not pairs:
        sys.exit(f"error: no readable training pairs in {cfg.data}; make some with `python make_games.py --out {cfg.data}`")

    resolved = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in vars(cfg).items()}
    if distributed.is_main():
        print(f"{stage} stage, config:\n{cli.format_config(resolved)}")
        command = shlex.join(["python", os.path.basename(sys.argv[0]), *sys.argv[1:]])  # for export.py's model card
        checkpoints.write_json_atomic(os.path.join(cfg.out, "config.json"), {**resolved, "command": command})
        checkpoints.trim_log(os.path.join(cfg.out, "metrics.jsonl"), state["iteration"])
    torch.manual_seed(cfg.seed)  # the LoRA init of a fresh run
    policy, processor = build_policy(cfg, checkpoint)
    reference = reference_policy(policy, cfg) if cfg.kl > 0 else None  # no reference pass when the KL term is off
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    if checkpoint:
        distributed.load_optimizer(policy.model, optimizer, os.path.join(checkpoint, "optimizer.pt"))

    tracker = tracking.open_tracker(cfg.report_to, cfg.out, resolved) if distributed.is_main() else None
    seeing = seeing_data(cfg)
    eos = models.stop_token_id(processor)

    bar = tqdm(total=cfg.iterations, initial=state["iteration"], desc=stage, unit="it", disable=not distributed.is_main())
    while state["iteration"] < cfg.iterations:
        iteration = state["iteration"] + 1
        started = time.time()
        on_cuda = cfg.device.startswith("cuda")
        if on_cuda:  # the peak of this iteration alone
            torch.cuda.reset_peak_memory_stats()
        rng = random.Random(f"{cfg.seed}-{iteration}")
        # sampling is a function of (seed, iteration, rank): resumes replay exactly
        torch.manual_seed(rng.randrange(2**31) + distributed.rank())
        pairs_now = batch_pairs(pairs, iteration, cfg)
        if len(pairs_now) < distributed.world_size() or not pairs_now:  # every rank needs a game
            sys.exit(f"error: only {len(pairs_now)} pairs of {cfg.data} decode, too few for iteration {iteration}'s "
                     f"{cfg.games} games on {distributed.world_size()} processes; check the images in {cfg.data}")
        spy_seats = [rng.randrange(cfg.players) for _ in pairs_now]
        mine = distributed.my_share(len(pairs_now))  # all of them in one process
        own_pairs, own_seats = pairs_now[mine], spy_seats[mine]
        own_games, gen_tokens = selfplay.play_games(own_pairs, own_seats, [(policy, policy)] * len(own_pairs), processor, cfg)
        games, gen_tokens = distributed.gather_games(own_games), distributed.total(gen_tokens)
        generated = time.time()

        # score every game for both stages (for the log); train only the active stage
        clue_stage.score_clues(games, cfg)
        decision_stage.score_decisions(games, cfg)
        # the role baselines as the clue advantages subtract them (bias-corrected unless told not to)
        baselines = clue_stage.baseline_values(state["baselines"], cfg.rae_alpha, cfg.rae_bias_correction)
        if stage == "clue":
            turns, advantages = clue_stage.clue_samples(games, state["baselines"], cfg)
            if cfg.rae_update_first:
                baselines = clue_stage.baseline_values(state["baselines"], cfg.rae_alpha, cfg.rae_bias_correction)
        else:
            turns, advantages = decision_stage.decision_samples(games, cfg)
        turns, advantages = distributed.own_samples(turns, advantages, own_games)
        lr = learning_rate(iteration, cfg, state["lr_schedule"])
        step = train_step(policy, reference, optimizer, processor, turns, advantages, cfg, lr,
                          aux_batches_of(seeing, iteration, cfg), cfg.aux_weight)
        updated = time.time()
        if seeing is not None and (iteration % cfg.seeing_every == 0 or iteration == cfg.iterations):
            with policy.active():
                step["heldout_yes_no"] = warm_start.attribute_accuracy(policy.model, processor, seeing.questions, eos)
            policy.model.eval()

        batch = {**batch_metrics(games, cfg), **decision_stage.reward_spread(games)}
        update_decision_emas(state, batch["acc"], batch["na"], cfg)
        state["iteration"], state["dwell"] = iteration, state["dwell"] + 1
        following = scheduled_stage(state, cfg)
        metrics = {
            "iteration": iteration, "stage": stage, **batch,
            "acc_ema": state["acc_ema"], "na_ema": state["na_ema"],
            "baseline_spy": baselines["spy"], "baseline_civilian": baselines["civilian"],
            **step, "lr": lr, "gen_tokens_per_s": gen_tokens / max(generated - started, 1e-9),
            "seconds_generate": generated - started, "seconds_update": updated - generated,
            "seconds": time.time() - started,
        }
        if on_cuda:
            metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        # log first, then checkpoint: a crash in between leaves lines that trim_log drops on resume
        if distributed.is_main():
            records = [selfplay.game_record(game, cfg, iteration=iteration, stage=stage, game_index=g) for g, game in enumerate(games)]
            with open(os.path.join(cfg.out, "games", f"iter_{iteration:06d}.jsonl"), "w") as f:
                f.writelines(json.dumps(record) + "\n" for record in records)
            with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if tracker:
                tracker.log(metrics, records)
        if following != stage:
            state["stage"], state["dwell"] = following, 0
        handover = following != stage and cfg.schedule != "alternate"  # the other stage script takes over
        finished = handover or state["iteration"] >= cfg.iterations
        if finished or iteration % cfg.save_every == 0:
            checkpoints.save_checkpoint(cfg.out, policy, processor, optimizer, state)
        if step["skipped_update"] and distributed.is_main():
            tqdm.write(f"iteration {iteration}: non-finite loss or gradient, update skipped")
        bar.update(1)
        bar.set_postfix(acc=f"{batch['acc']:.2f}", acc_ema=f"{state['acc_ema']:.2f}", na=f"{batch['na']:.2f}", next=following)
        if finished:
            break
        stage = following
    bar.close()
    if tracker:
        tracker.close()
    if distributed.is_main():
        print(f"{stage} stage stopped after iteration {state['iteration']}; next stage: {state['stage']}; outputs in {cfg.out}")
    distributed.finish()
