"""
bench_levers.py: what each rollout and update lever saves, measured in one process on one model.

For each configuration (plain: every lever off; each lever alone; all of them on) it plays the
same batch of games (same pairs, spy seats and seed) --repeats times with selfplay.play_games,
then runs one trainer.train_step on all their turns (advantages forced to +-1 so that backward runs
as in training; lr 0 so that every configuration sees the same weights; completions cut to random
lengths, since a random model's all run to the limit and would leave nothing to bucket). Per configuration it
prints the seconds of generation (first repeat and last: the first includes torch.compile on
CUDA) and of the update, decode steps (per generate call, its longest row), useful tokens and their
share of the decoded row-steps, tokens/s, pictures the vision tower encoded in the rollouts and in
the update, peak GPU memory, and the profiler's count per decode step of CUDA kernel launches
(graph launches included) or, on the CPU, of ATen ops; then each figure as a ratio to the plain path.

The levers (selfplay.add_game_args, trainer.parse_args): merged = --merged-rollouts, static =
--static-cache (compiled on CUDA), vision = --vision-cache, shared = --shared-prefill (only without
the static cache, so "all" leaves it out), buckets = --length-buckets.

    python bench_levers.py --model M --data D [--configs plain,merged,all] [trainer flags, e.g. --games 4 --lora-rank 64]

bench_gpu.sh runs it at the 7B shape; docs/gpu-speed.md has its CPU numbers.
"""
import argparse
import json
import random
import tempfile
import time
from types import SimpleNamespace

import torch

import selfplay
import trainer

LEVERS = {"merged": "merged_rollouts", "static": "static_cache", "vision": "vision_cache", "shared": "shared_prefill",
          "buckets": "length_buckets"}
CONFIGS = {"plain": (), **{name: (name,) for name in LEVERS}, "all": tuple(LEVERS)}
# CUDA runtime calls that launch work on the GPU: one per kernel, one per replayed CUDA graph
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def configured(cfg, levers):
    """cfg with the named levers on and every other lever off."""
    return SimpleNamespace(**{**vars(cfg), **{flag: name in levers for name, flag in LEVERS.items()}})


def launches_per_decode_step(policy, processor, turns, cfg, lengths=(4, 12)):
    """Kernel launches (CUDA) or ATen ops (CPU) per decode step of a batch of turns (a clue call's,
    whose compiled decode exists already): the profiler's count for two completion lengths,
    differenced, so that the prefill cancels out."""
    cuda = policy.model.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    counts = []
    for n in lengths:
        short = SimpleNamespace(**{**vars(cfg), "max_new_tokens": n})
        selfplay.generate(policy, processor, [selfplay.Turn(0, 0, t.prompt, t.image) for t in turns], short)  # warm up
        probes = [selfplay.Turn(0, 0, t.prompt, t.image) for t in turns]
        with torch.profiler.profile(activities=activities) as profile:
            selfplay.generate(policy, processor, probes, short)
        names = [e.name for e in profile.events()]
        launched = sum(name in LAUNCHES for name in names) if cuda else sum(name.startswith("aten::") for name in names)
        counts.append((launched, max(len(p.completion_ids) for p in probes)))
    (first, steps_first), (last, steps_last) = counts
    return (last - first) / (steps_last - steps_first) if steps_last > steps_first else float("nan")


def measure(policy, processor, pairs, seats, cfg, repeats, seed, update=True):
    """One configuration: its rollouts, its update (update=False: not timed, for levers that change
    only the rollouts), its counts."""
    model = policy.model
    tower = next(m for name, m in model.named_modules() if name.endswith("visual"))
    encoded, prefilled = [], []
    hook = tower.register_forward_hook(lambda module, args, kwargs, out: encoded.append(len(kwargs["grid_thw"])),
                                       with_kwargs=True)
    # prompt tokens (padding included) through a forward pass of more than one position: prefills
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefill_hook = base.register_forward_pre_hook(
        lambda module, args, kwargs: prefilled.append(kwargs["input_ids"].numel())
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    calls, plain_generate = [], selfplay.generate

    def counted_generate(policy_, processor_, turns, cfg_):
        n_tokens = plain_generate(policy_, processor_, turns, cfg_)
        calls.append((len(turns), max(len(t.completion_ids) for t in turns), n_tokens))
        return n_tokens

    selfplay.generate = counted_generate
    on_cuda = model.device.type == "cuda"
    seconds = []
    try:
        for _ in range(repeats):
            calls.clear()
            encoded.clear()
            prefilled.clear()
            torch.manual_seed(seed)
            if on_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.time()
            games, _ = selfplay.play_games(pairs, seats, [(policy, policy)] * len(pairs), processor, cfg)
            if on_cuda:
                torch.cuda.synchronize()
            seconds.append(time.time() - started)
    finally:
        selfplay.generate = plain_generate
    rollout_encodes, prefilled_tokens = sum(encoded), sum(prefilled)
    prefill_hook.remove()
    turns = [t for g in games for t in g.clues + g.decisions]
    # a random model never stops, so every completion has the same length and there is nothing to
    # bucket: cut each to a length drawn uniformly from 1..its own (the same draw in every configuration)
    lengths = random.Random(seed)
    for turn in turns:
        keep = lengths.randint(1, len(turn.completion_ids))
        turn.completion_ids, turn.sampling_logps = turn.completion_ids[:keep], turn.sampling_logps[:keep]
    advantages = [1.0 if k % 2 else -1.0 for k in range(len(turns))]
    reference = trainer.reference_policy(policy, cfg) if cfg.kl > 0 else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    encoded.clear()
    started = time.time()
    if update:
        trainer.train_step(policy, reference, optimizer, processor, turns, advantages, cfg, lr=0.0)
    if on_cuda:
        torch.cuda.synchronize()
    update_seconds = time.time() - started if update else float("nan")
    hook.remove()
    row_steps = sum(batch * steps for batch, steps, _ in calls)
    useful = sum(tokens for _, _, tokens in calls)
    return {"generate_s_first": seconds[0], "generate_s": seconds[-1], "update_s": update_seconds,
            "generate_calls": len(calls), "decode_steps": sum(steps for _, steps, _ in calls), "useful_tokens": useful,
            "useful_share": useful / max(row_steps, 1), "tokens_per_s": useful / max(seconds[-1], 1e-9),
            "prefilled_tokens": prefilled_tokens, "encodes_rollouts": rollout_encodes, "encodes_update": sum(encoded) if update else float("nan"),
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if on_cuda else float("nan"),
            "launches_per_decode_step": launches_per_decode_step(policy, processor, [g.clues[0] for g in games], cfg)}


def main():
    p = argparse.ArgumentParser(description="time every rollout/update lever on and off (see the docstring); "
                                "other flags go to trainer.parse_args")
    p.add_argument("--model", required=True, help="model folder (make_tiny_model.py --shape 7b for the real shapes)")
    p.add_argument("--data", required=True, help="pairs folder (make_games.py)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--repeats", type=int, default=1,
                   help="rollouts of a configuration with the static cache (on CUDA the first compiles; the last is reported); others play once")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--update-only-where-it-changes", action="store_true",
                   help="time the update only for plain and the configurations with a lever that changes it (vision, buckets): "
                   "the CPU's 7B-shape run, where an update takes minutes")
    args, rest = p.parse_known_args()
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or args.repeats < 1:
        p.error(f"unknown configurations {unknown} (known: {', '.join(CONFIGS)}), or --repeats below 1")
    with tempfile.TemporaryDirectory() as unused_out:
        cfg = trainer.parse_args("decision", ["--model", args.model, "--data", args.data, "--out", unused_out, *rest])
    pairs = selfplay.decodable_pairs(selfplay.read_pairs(cfg.data, "train", domain=cfg.domain)[:cfg.games])
    if not pairs:
        p.error(f"no readable pairs in {cfg.data}")
    seats = [random.Random(cfg.seed + g).randrange(cfg.players) for g in range(len(pairs))]
    torch.manual_seed(cfg.seed)
    policy, processor = trainer.build_policy(cfg)
    device = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "CPU"
    print(f"bench_levers.py on {device}: {len(pairs)} games, {cfg.rounds} clue rounds, G = {cfg.samples}, "
          f"max {cfg.max_new_tokens} new tokens, LoRA {cfg.lora_rank}, micro-batch {cfg.micro_batch}, {cfg.dtype}")
    # a short untimed game first: the first pass of a process pays one-off set-up costs
    selfplay.play_games(pairs[:1], seats[:1], [(policy, policy)], processor,
                        SimpleNamespace(**{**vars(configured(cfg, ())), "max_new_tokens": 2}))
    results = {}
    for name in configs:
        repeats = args.repeats if "static" in CONFIGS[name] or name == "all" else 1
        update = not args.update_only_where_it_changes or name == "plain" or {"vision", "buckets"} & set(CONFIGS[name])
        results[name] = measure(policy, processor, pairs, seats, configured(cfg, CONFIGS[name]), repeats, cfg.seed, update)
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[name].items()), flush=True)
    keys = list(next(iter(results.values())))
    print("\n| configuration | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
    if "plain" in results:
        print("\nratio to plain (below 1: less time, fewer steps, launches or encodes)")
        print("| configuration | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for name, row in results.items():
            print(f"| {name} | " + " | ".join(f"{row[k] / results['plain'][k]:.3g}" if results["plain"][k] else "n/a"
                                              for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "config": {k: str(v) for k, v in vars(cfg).items()}, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
