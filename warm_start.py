"""
warm_start.py: teach a tiny random-weight Qwen2.5-VL to see and to speak the game's formats,
from what the pair generator knows about its own images and nothing else.

A random tiny model cannot read a colour off a picture nor write \\boxed{}, so every game reward
it gets is noise. This script gives it the skills a pretrained VLM brings to Vision-Zero, with
supervised next-token training on four kinds of turns, all built from the cells domain's scene
descriptions (make_games.py --domain cells) and the game's real prompts (selfplay.py):

  describe   "Describe one square of your picture" about the original or the modified image
             -> "\\boxed{a <colour> square}" naming one of its squares: seeing colours, cheaply
  clue       the real clue prompt of a random seat, round and role, with the image that role sees
             (civilian: original, spy: modified, or the empty picture of --spy-image blank) and
             made-up earlier clues -> "\\boxed{a <colour> square}" naming a random square of THAT
             image, or "\\boxed{an empty picture}" for the empty one
  vote       the real judge prompt with made-up clues (any seat may say any colour or, with
             --spy-image blank, "an empty picture") -> "The spy is \\boxed{k}", k uniformly
             random: the format only; nothing here says or hints who the spy is
  attribute  "Is there a <colour> square in your picture?" about the original or the modified
             image -> "\\boxed{yes}" / "\\boxed{no}", balanced: image-grounded colour checking

There is no label of who the spy is and no "which clue does not fit" task: finding the spy and
choosing clues are left to the game's rewards (rlvr.py, spo.py). Only training pairs are used
(selfplay.read_pairs(..., "train")), so the held-out pairs of evaluate.py stay unseen.

    python make_tiny_model.py --out runs/learn-cpu/tiny-vlm --hidden 192 --layers 3 --heads 4 \\
        --vision-hidden 96 --vision-depth 3 --vocab-size 768 --min-pixels 12544 --max-pixels 12544
    python make_games.py --domain cells --n 2000 --out games/cells
    python warm_start.py --model runs/learn-cpu/tiny-vlm --data games/cells --out runs/learn-cpu/warm-start

The result is a normal model folder (save_pretrained + processor), written to a temporary folder
and renamed, so it exists whole or not at all; if --out already holds a model this script does
nothing (the cache: the warm start runs once). Seeded: the same flags give the same weights.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

import selfplay
from make_games import CELL_COLOURS

COLOURS = list(CELL_COLOURS)
TASKS = ("describe", "clue", "vote", "attribute")
EMPTY = "an empty picture"  # what there is to say about the blank spy's picture


def square(colour):
    return f"a {colour} square"


def scene_colours(pair):
    """Colours of the squares in the original and in the modified image, from pairs.jsonl."""
    original = [o["colour"] for o in pair["source"]["objects"]]
    modified = list(original)
    for change in pair["changes"]:
        modified[int(change["what"].split()[-1])] = change["after"]["colour"]
    return original, modified


def made_up_clues(game, count, rng, cfg):
    """`count` earlier clue turns in speaking order, each naming a random colour, or in the blank
    game sometimes the empty picture (no game was played: every seat is equally likely to)."""
    sayings = [square(c) for c in COLOURS] + ([EMPTY] if cfg.spy_image == "blank" else [])
    for k in range(count):
        round_, seat = divmod(k, cfg.players)
        turn = selfplay.Turn(seat, round_, "", None, text="\\boxed{%s}" % rng.choice(sayings))
        turn.parsed = selfplay.parse_clue(turn.text)
        game.clues.append(turn)


def either_picture(original, modified, images, rng):
    """The colours of the original or of the modified picture, half and half, and that picture."""
    return (modified, images[1]) if rng.random() < 0.5 else (original, images[0])


def example(pair, images, task, rng, cfg):
    """One (prompt, image, target text) of a task for a pair."""
    original, modified = scene_colours(pair)
    game = selfplay.Game(pair=pair, spy=rng.randrange(cfg.players))
    if task == "clue":
        round_, seat = rng.randrange(cfg.rounds), rng.randrange(cfg.players)
        made_up_clues(game, round_ * cfg.players + seat, rng, cfg)
        prompt = selfplay.clue_prompt(game, seat, round_, cfg)
        if seat != game.spy:
            return prompt, images[0], "\\boxed{%s}" % square(rng.choice(original))
        if cfg.spy_image == "blank":
            return prompt, selfplay.blank_picture(images[0]), "\\boxed{%s}" % EMPTY
        return prompt, images[1], "\\boxed{%s}" % square(rng.choice(modified))
    if task == "describe":  # the clue skill with a short prompt: 4x cheaper per example than "clue"
        colours, image = either_picture(original, modified, images, rng)
        prompt = "Describe one square of your picture inside \\boxed{}."
        return prompt, image, "\\boxed{%s}" % square(rng.choice(colours))
    if task == "vote":
        made_up_clues(game, cfg.rounds * cfg.players, rng, cfg)
        prompt = selfplay.decision_prompt(game, None, cfg)
        # format only: a random seat. The few words before the box set a vote apart from a clue
        # (both open with \boxed{), so that training votes does not turn clues into digits
        return prompt, images[0], "The spy is \\boxed{%d}" % rng.randint(1, cfg.players)
    colours, image = either_picture(original, modified, images, rng)
    present = rng.random() < 0.5
    colour = rng.choice(colours if present else [c for c in COLOURS if c not in colours])
    # short on purpose: perception is the slow skill to learn, and a long prompt costs 7x per example
    prompt = f"Is there {square(colour)} in your picture? Answer \\boxed{{yes}} or \\boxed{{no}}."
    return prompt, image, "\\boxed{yes}" if present else "\\boxed{no}"


def make_turns(batch, processor, eos):
    """Turns as selfplay's rollouts make them: chat prompt, image, target token ids with the stop token."""
    turns = []
    for prompt, image, target in batch:
        turn = selfplay.Turn(0, 0, selfplay.chat(processor, prompt), image)
        turn.completion_ids = processor.tokenizer(target)["input_ids"] + [eos]
        turns.append(turn)
    return turns


def target_logprob(model, processor, turns):
    """Summed log-prob of each turn's target [B], through the project's one log-prob function."""
    inputs, ids, mask = selfplay.completion_batch(processor, turns, model.device)
    return (selfplay.token_logprobs(model, inputs, ids) * mask).sum(-1), mask


@torch.no_grad()
def attribute_accuracy(model, processor, pairs, images, eos, cfg, n=128):
    """Held-out yes/no accuracy: is \\boxed{yes} or \\boxed{no} more likely for the right answer?"""
    rng = random.Random(cfg.seed + 1)
    model.eval()
    right = 0
    for start in range(0, n, 32):
        batch = []
        for _ in range(min(32, n - start)):
            k = rng.randrange(len(pairs))
            batch.append(example(pairs[k], images[k], "attribute", rng, cfg))
        yes = [(p, im, "\\boxed{yes}") for p, im, _ in batch]
        no = [(p, im, "\\boxed{no}") for p, im, _ in batch]
        lp_yes, _ = target_logprob(model, processor, make_turns(yes, processor, eos))
        lp_no, _ = target_logprob(model, processor, make_turns(no, processor, eos))
        for (_, _, target), y, n_ in zip(batch, lp_yes.tolist(), lp_no.tolist()):
            right += (y > n_) == (target == "\\boxed{yes}")
    model.train()
    return right / n


def learning_rate(step, args):
    """Linear warm-up, then cosine down to 10% of --lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the random tiny model folder (make_tiny_model.py)")
    p.add_argument("--data", required=True, help="cells pairs folder (make_games.py --domain cells); its training split is used")
    p.add_argument("--out", required=True, help="folder for the warm-started model; if it already holds one, nothing is done")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    p.add_argument("--batch", type=int, default=32, help="examples per describe or attribute step (short prompts)")
    p.add_argument("--game-batch", type=int, default=8, help="examples per clue or vote step (long prompts)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (2e-3 stayed image-blind for 500 steps here)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--mix", default="0.6,0.2,0.1,0.1", help="shares of describe, clue, vote and attribute steps")
    p.add_argument("--players", type=int, default=4, help="players in the prompts (as the RL runs)")
    p.add_argument("--rounds", type=int, default=2, help="clue rounds in the prompts (as the RL runs)")
    p.add_argument("--spy-image", choices=["modified", "blank"], default="modified",
                   help="what the spy sees in the games to come (as the RL runs' --spy-image)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and of the update order")
    args = p.parse_args()
    if os.path.exists(os.path.join(args.out, "config.json")):
        print(f"{args.out} already holds a warm-started model: nothing to do (delete it to train again)")
        return
    mix = [float(x) for x in args.mix.split(",")]
    if len(mix) != len(TASKS) or min(mix) < 0 or sum(mix) <= 0:
        p.error("--mix needs four non-negative shares, e.g. 0.6,0.2,0.1,0.1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    pairs = [q for q in selfplay.read_pairs(args.data, "train") if q.get("domain") == "cells"]
    if not pairs:
        sys.exit(f"error: no cells training pairs in {args.data}; make them with `python make_games.py --domain cells --n 2000 --out {args.data}`")
    images = [(selfplay.load_image(q["original"]), selfplay.load_image(q["modified"])) for q in pairs]
    held_out = [q for q in selfplay.read_pairs(args.data, "eval") if q.get("domain") == "cells"]
    held_images = [(selfplay.load_image(q["original"]), selfplay.load_image(q["modified"])) for q in held_out]
    cfg = SimpleNamespace(players=args.players, rounds=args.rounds, spy_image=args.spy_image, seed=args.seed)

    processor = selfplay.load_processor(args.model)
    model = selfplay.load_model(args.model, "cpu", torch.float32).train()
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    print(f"warm start: {len(pairs)} training pairs, {args.steps} steps of {args.batch}; attribute accuracy "
          f"before: {attribute_accuracy(model, processor, held_out, held_images, eos, cfg):.3f} (chance 0.5)")

    started, running = time.time(), {t: [] for t in TASKS}
    for step in range(args.steps):
        # one task per step: a batch pads to its longest prompt, and the game prompts are ~7x
        # longer than the attribute questions, so they come in smaller batches
        task = rng.choices(TASKS, weights=mix)[0]
        tasks = [task] * (args.batch if task in ("describe", "attribute") else args.game_batch)
        batch = []
        for task in tasks:
            k = rng.randrange(len(pairs))
            batch.append(example(pairs[k], images[k], task, rng, cfg))
        logp, mask = target_logprob(model, processor, make_turns(batch, processor, eos))
        nll = -logp / mask.sum(-1)  # per-token negative log-likelihood of each target
        loss = nll.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.step()
        for task, value in zip(tasks, nll.tolist()):
            running[task].append(value)
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            parts = " ".join(f"{t} {sum(v) / max(1, len(v)):.3f}" for t, v in running.items())
            print(f"step {step + 1}/{args.steps} {time.time() - started:.0f}s loss per token: {parts}", flush=True)
            running = {t: [] for t in TASKS}

    accuracy = attribute_accuracy(model, processor, held_out, held_images, eos, cfg)
    minutes = (time.time() - started) / 60
    print(f"warm start done in {minutes:.1f} min; held-out attribute accuracy {accuracy:.3f}")
    model.eval()
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".warm-")  # whole or not at all: renamed when complete
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    with open(os.path.join(staging, "warm_start.json"), "w") as f:
        json.dump({**vars(args), "minutes": minutes, "attribute_accuracy": accuracy}, f, indent=1)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(staging, args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
