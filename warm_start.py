"""
warm_start.py: teach a tiny random-weight Qwen2.5-VL to see and to speak the game's formats,
from what the pair generator knows about its own images and nothing else.

A random tiny model cannot read a colour off a picture nor write \\boxed{}, so every game reward
it gets is noise. This script gives it the skills a pretrained VLM brings to Vision-Zero, with
supervised next-token training on five kinds of turns, all built from the cells domain's scene
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
  list       "List the colours of the squares in your picture" -> "\\boxed{blue green red}", the
             picture's colours sorted: the task that binds colour words to the visual tokens

Two phases: --list-steps of the list task alone, then the --mix of all five. The tiny model's
vision tower carries each square's colour from the start (a linear probe reads it perfectly); what
it lacks is the link from a colour word to those tokens, and yes/no alone does not find it (held-out
0.50 after 800 steps), while the list task does in a few hundred steps, after which yes/no follows.
The held-out yes/no accuracy (400 balanced questions about held-out pictures, scored by whether
\\boxed{yes} or \\boxed{no} is the more likely answer) is printed every --eval-every steps, and
with --require-attribute the script fails when it ends below that: the edited-picture game needs a
judge that can check a colour word against its picture before RL starts.

There is no label of who the spy is and no "which clue does not fit" task: finding the spy and
choosing clues are left to the game's rewards (rlvr.py, spo.py). Only training pairs are used
(selfplay.read_pairs(..., "train")), so the held-out pairs of evaluate.py stay unseen.

    python make_tiny_model.py --out runs/learn-cpu-modified/tiny-vlm --hidden 192 --layers 3 --heads 4 \\
        --vision-hidden 96 --vision-depth 3 --vocab-size 768 --min-pixels 12544 --max-pixels 12544
    python make_games.py --domain cells --n 2000 --out games/cells
    python warm_start.py --model runs/learn-cpu-modified/tiny-vlm --data games/cells \\
        --out runs/learn-cpu-modified/warm-start --require-attribute 0.9

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

import cli
import models
import selfplay
from make_games import CELL_COLOURS, cells_colours

COLOURS = list(CELL_COLOURS)
TASKS = ("describe", "clue", "vote", "attribute", "list")
EMPTY = "an empty picture"  # what there is to say about the blank spy's picture
LIST_PROMPT = "List the colours of the squares in your picture inside \\boxed{}."


def square(colour):
    return f"a {colour} square"


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
    original, modified = cells_colours(pair)
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
    if task == "list":
        return LIST_PROMPT, image, "\\boxed{%s}" % " ".join(sorted(colours))
    return attribute_question(colours, image, rng.random() < 0.5, rng)


def attribute_question(colours, image, present, rng):
    """Is there a square of a colour the picture has (present) or lacks? -> (prompt, image, answer)."""
    colour = rng.choice(colours if present else [c for c in COLOURS if c not in colours])
    # short on purpose: perception is the slow skill to learn, and a long prompt costs 7x per example
    prompt = f"Is there {square(colour)} in your picture? Answer \\boxed{{yes}} or \\boxed{{no}}."
    return prompt, image, "\\boxed{yes}" if present else "\\boxed{no}"


SEEING_TASKS = {"attribute": 0.75, "list": 0.25}  # the shares of the warm start's mix (0.6 / 0.2)


def seeing_examples(pairs, images, n, rng, cfg):
    """n examples of the seeing tasks, yes/no and list in the warm start's proportions, about
    random pairs: trainer.py's --aux-data term (generator labels only, no spy, no game)."""
    tasks = rng.choices(list(SEEING_TASKS), weights=list(SEEING_TASKS.values()), k=n)
    picks = [rng.randrange(len(pairs)) for _ in tasks]
    return [example(pairs[k], images[k], task, rng, cfg) for k, task in zip(picks, tasks)]


def cells_pairs(data, split):
    """The cells pairs of a split of a data folder and their (original, modified) images."""
    pairs = [q for q in selfplay.read_pairs(data, split) if q.get("domain") == "cells"]
    return pairs, [(selfplay.load_image(q["original"]), selfplay.load_image(q["modified"])) for q in pairs]


def make_turns(batch, processor, eos):
    """Turns as selfplay's rollouts make them: chat prompt, image, target token ids with the stop token."""
    turns = []
    for prompt, image, target in batch:
        turn = selfplay.Turn(0, 0, selfplay.chat(processor, prompt), image)
        turn.completion_ids = processor.tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
        turns.append(turn)
    return turns


def target_logprob(model, processor, turns):
    """Summed log-prob of each turn's target [B], through the project's one log-prob function."""
    inputs, ids, mask = selfplay.completion_batch(processor, turns, model.device)
    return (selfplay.token_logprobs(model, inputs, ids) * mask).sum(-1), mask


def held_out_questions(pairs, images, seed, n=400):
    """n balanced yes/no questions (half the colours present) about held-out pictures, built once."""
    rng = random.Random(seed + 1)
    questions = []
    for i in range(n):
        k = rng.randrange(len(pairs))
        original, modified = cells_colours(pairs[k])
        colours, image = either_picture(original, modified, images[k], rng)
        questions.append(attribute_question(colours, image, i % 2 == 0, rng))
    return questions


@torch.no_grad()
def attribute_accuracy(model, processor, questions, eos):
    """Held-out yes/no accuracy: is \\boxed{yes} or \\boxed{no} the more likely answer?"""
    model.eval()
    right = 0
    for start in range(0, len(questions), 32):
        batch = questions[start:start + 32]
        lp_yes, _ = target_logprob(model, processor, make_turns([(p, im, "\\boxed{yes}") for p, im, _ in batch], processor, eos))
        lp_no, _ = target_logprob(model, processor, make_turns([(p, im, "\\boxed{no}") for p, im, _ in batch], processor, eos))
        right += sum((y > n_) == (answer == "\\boxed{yes}") for (_, _, answer), y, n_ in zip(batch, lp_yes.tolist(), lp_no.tolist()))
    model.train()
    return right / len(questions)


@torch.no_grad()
def list_accuracy(model, processor, pairs, images):
    """Held-out list accuracy: the fraction of pictures (original and modified of every pair) whose
    greedy answer to the list prompt is exactly their sorted colours."""
    cases = []
    for pair, (original_image, modified_image) in zip(pairs, images):
        original, modified = cells_colours(pair)
        cases += [(original, original_image), (modified, modified_image)]
    cfg = SimpleNamespace(temperature=0, max_new_tokens=24)  # greedy: the model's own answer
    policy = selfplay.Policy(model, adapter=False)
    model.eval()
    right = 0
    for start in range(0, len(cases), 32):
        batch = cases[start:start + 32]
        turns = [selfplay.Turn(0, 0, selfplay.chat(processor, LIST_PROMPT), image) for _, image in batch]
        selfplay.generate(policy, processor, turns, cfg)
        right += sum(t.text.strip() == "\\boxed{%s}" % " ".join(sorted(colours)) for (colours, _), t in zip(batch, turns))
    model.train()
    return right / len(cases)


def learning_rate(step, args):
    """Linear warm-up, then cosine down to 10% of --lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--model", required=True, help="the random tiny model folder (make_tiny_model.py)")
    p.add_argument("--data", required=True, help="cells pairs folder (make_games.py --domain cells); its training split is used")
    p.add_argument("--out", required=True, help="folder for the warm-started model; if it already holds one, nothing is done")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps in all, --list-steps included")
    p.add_argument("--list-steps", type=int, default=600,
                   help="first phase: steps of the list task alone (0: none; without it yes/no stays at chance)")
    p.add_argument("--batch", type=int, default=32, help="examples per describe, attribute or list step (short prompts)")
    p.add_argument("--game-batch", type=int, default=8, help="examples per clue or vote step (long prompts)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (2e-3 stayed image-blind for 500 steps here)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--mix", default="0,0.1,0.1,0.6,0.2",
                   help="second phase: shares of describe, clue, vote, attribute and list steps")
    p.add_argument("--players", type=int, default=4, help="players in the prompts (as the RL runs)")
    p.add_argument("--rounds", type=int, default=2, help="clue rounds in the prompts (as the RL runs)")
    p.add_argument("--spy-image", choices=["modified", "blank"], default="modified",
                   help="what the spy sees in the games to come (as the RL runs' --spy-image)")
    p.add_argument("--judge-prompt", choices=["full", "short"], default="full",
                   help="the vote task's prompt (as the RL runs' --judge-prompt): a model votes only in the prompts it was taught")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out yes/no checks (0: at the end only)")
    p.add_argument("--require-attribute", type=float, default=0.0,
                   help="fail when the final held-out yes/no accuracy is below this (the model is kept): 0.9 before "
                        "RL in the edited-picture game")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (gpu_learn.sh): where the model trains")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and of the update order")
    args = p.parse_args()
    if os.path.exists(os.path.join(args.out, "config.json")):
        print(f"{args.out} already holds a warm-started model: nothing to do (delete it to train again)")
        require(read_report(args.out).get("attribute_accuracy"), args)
        return
    try:
        mix = [float(x) for x in args.mix.split(",")]
    except ValueError:
        mix = []
    if len(mix) != len(TASKS) or min(mix) < 0 or sum(mix) <= 0:
        p.error("--mix needs five non-negative shares (describe, clue, vote, attribute, list), e.g. 0,0.1,0.1,0.6,0.2")
    if not 0 <= args.list_steps <= args.steps:
        p.error("--list-steps must be between 0 and --steps")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    pairs, images = cells_pairs(args.data, "train")
    if not pairs:
        sys.exit(f"error: no cells training pairs in {args.data}; make them with `python make_games.py --domain cells --n 2000 --out {args.data}`")
    held_out, held_images = cells_pairs(args.data, "eval")
    if not held_out:
        sys.exit(f"error: no held-out cells pairs in {args.data} (about 10% of the ids); make at least 100 pairs")
    cfg = SimpleNamespace(players=args.players, rounds=args.rounds, spy_image=args.spy_image, judge_prompt=args.judge_prompt,
                          seed=args.seed)

    processor = selfplay.load_processor(args.model)
    model = selfplay.load_model(args.model, args.device, torch.float32).train()
    eos = models.stop_token_id(processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)

    questions = held_out_questions(held_out, held_images, args.seed)

    taught = taught_tasks(mix, args.list_steps)
    untaught = "" if {"attribute", "list"} & taught else "; not taught by this mix"

    def check_attribute(step):  # held-out yes/no accuracy, kept for the curve
        curve.append([step, attribute_accuracy(model, processor, questions, eos)])
        print(f"step {step}: held-out yes/no accuracy {curve[-1][1]:.3f} (chance 0.5{untaught})", flush=True)

    print(f"warm start: {len(pairs)} training pairs, {args.list_steps} list steps, then {args.steps - args.list_steps} "
          f"steps of the mix {args.mix} (describe, clue, vote, attribute, list)")
    started, running, curve = time.time(), {t: [] for t in TASKS}, []
    check_attribute(0)
    for step in range(args.steps):
        # one task per step: a batch pads to its longest prompt, and the game prompts are ~7x
        # longer than the attribute questions, so they come in smaller batches
        task = "list" if step < args.list_steps else rng.choices(TASKS, weights=mix)[0]
        tasks = [task] * (args.game_batch if task in ("clue", "vote") else args.batch)
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
            parts = " ".join(f"{t} {sum(v) / len(v):.3f}" for t, v in running.items() if v)
            print(f"step {step + 1}/{args.steps} {time.time() - started:.0f}s loss per token: {parts}", flush=True)
            running = {t: [] for t in TASKS}
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            check_attribute(step + 1)

    check_attribute(args.steps)
    listed = list_accuracy(model, processor, held_out, held_images) if "list" in taught else None
    minutes = (time.time() - started) / 60
    report = {**vars(args), "minutes": minutes, "attribute_accuracy": curve[-1][1], "list_accuracy": listed,
              "attribute_curve": curve}
    print(f"warm start done in {minutes:.1f} min; " + held_out_summary(taught, curve[-1][1], listed, 2 * len(held_out)))
    model.eval()
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".warm-")  # whole or not at all: renamed when complete
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    with open(os.path.join(staging, "warm_start.json"), "w") as f:
        json.dump(report, f, indent=1)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(staging, args.out)
    print(f"saved to {args.out}")
    require(curve[-1][1], args)


def taught_tasks(mix, list_steps):
    """The tasks this warm start trains: those with a share in the mix, and list when it has its own phase."""
    return {task for task, share in zip(TASKS, mix) if share > 0} | ({"list"} if list_steps > 0 else set())


def held_out_summary(taught, yes_no, listed, pictures):
    """The held-out checks in words, each said to apply or not to the tasks that ran: a task the
    mix never taught stays near chance, and that is no failure."""
    applies = "attribute" in taught or "list" in taught  # yes/no follows from either
    parts = [f"held-out yes/no accuracy {yes_no:.3f} (chance 0.5" +
             (")" if applies else "; neither yes/no nor list is in this mix, so none is expected)")]
    parts.append(f"list accuracy {listed:.3f} ({pictures} pictures)" if listed is not None
                 else "list accuracy not checked (the list task is not in this mix)")
    return ", ".join(parts)


def read_report(folder):
    """warm_start.json of a finished warm start ({} when it is missing or unreadable)."""
    try:
        with open(os.path.join(folder, "warm_start.json")) as f:
            report = json.load(f)
        return report if isinstance(report, dict) else {}
    except (OSError, ValueError):
        return {}


def require(accuracy, args):
    """Exit with an error when --require-attribute is not met."""
    if args.require_attribute and not (isinstance(accuracy, (int, float)) and accuracy >= args.require_attribute):
        shown = f"{accuracy:.3f}" if isinstance(accuracy, (int, float)) else "unknown"
        sys.exit(f"error: the warm start in {args.out} answers held-out yes/no questions at {shown}, below "
                 f"--require-attribute {args.require_attribute}; delete it and train longer (--steps)")


if __name__ == "__main__":
    main()
