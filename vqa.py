"""
vqa.py: does playing make the model see better? Questions about held-out pictures whose answers
the generator knows, asked to the initial and the trained model.

The questions come from the held-out split of a data folder (selfplay.read_pairs(..., "eval"),
the same ~10% that evaluate.py plays: training never saw these pictures), built from each pair's
`source` metadata (make_games.py), one question of each kind per pair, with a seed per pair:

  clevr  count      how many objects (of a shape, of a colour) are there?         a number
         exist      is there a <colour> <shape>?                                  yes / no, balanced
         attribute  the colour, shape or material of a uniquely described object  multiple choice
         differ     which objects of the left picture were replaced in the right  multiple choice;
                    one? (the pair side by side: the game's own skill, in-domain)
  chart  largest / smallest  category of a series                                 multiple choice
         compare    which of two categories is larger?                            multiple choice
         value      the value of a category (a pie: its share, as printed)        multiple choice of 4
         chart_kind bar, grouped bar, line or pie?                                multiple choice
  cells  colour_at  the colour of the square in row r, column c                   multiple choice of 4
         count      how many squares (of a colour) are there?                      a number
         exist      is there a <colour> square?                                    yes / no, balanced
  photo  pairs carry no metadata: skipped, with a message.

Only unambiguous questions are asked: CLEVR objects are asked about only on the original picture,
where make_games.py recorded every object's visible pixels (counts and existence need all of them
at least MIN_VISIBLE_PIXELS, an attribute question its object), chart answers need a clear margin
(MARGIN of the largest value). Every answer goes in \\boxed{}: a letter, a number, yes or no.
Decoding is greedy (temperature 0), so a model's answers are a function of the model: the
difference between two models is not sampling noise. One generate call per --batch questions.

    python vqa.py --data games/clevr --out runs/X       # the run's initial model vs its latest checkpoint
    python vqa.py --data games/cells --out runs/m --model tiny-vlm   # one model

Writes OUT/vqa_questions.jsonl (pair_id, image: original / pair, kind, question, choices or null,
answer, about: what is asked in the metadata's own terms), OUT/vqa_answers.jsonl (each model's
text, boxed answer and whether it is right) and OUT/vqa.json: per kind and overall, the accuracy of
each model with its standard error, chance, and the trained - initial difference with the
standard error of that paired difference.
"""
import argparse
import json
import math
import os
import random
import sys
from types import SimpleNamespace

import torch
from PIL import Image
from tqdm import tqdm

import cli
import selfplay
import checkpoints
import report
import trainer

MIN_VISIBLE_PIXELS = 150  # make_games.py's default --min-visible: every object of a clevr scene has it
MARGIN = 0.05  # chart answers: the right value and any other differ by this fraction of the largest
LETTERS = "ABCD"
FORMATS = {  # how an answer is asked for, by answer type
    "choice": "Answer with the letter of the right choice inside \\boxed{}, for example \\boxed{B}.",
    "number": "Answer with a number inside \\boxed{}, for example \\boxed{2}.",
    "yes/no": "Answer yes or no inside \\boxed{}, for example \\boxed{yes}.",
}
PAIR_GAP = 16  # white pixels between the two pictures of a "differ" question


def question(pair, image, kind, text, answer, about, choices=None, rng=None):
    """One question record. With choices, they are shuffled and the answer becomes their letter."""
    if choices is not None:
        choices = list(choices)
        rng.shuffle(choices)
        answer = LETTERS[choices.index(answer)]
    answer_type = "choice" if choices is not None else "yes/no" if answer in ("yes", "no") else "number"
    listed = "".join(f"\n{LETTERS[k]}. {c}" for k, c in enumerate(choices or []))
    return {"pair_id": pair["id"], "image": image, "kind": kind, "question": text + listed + "\n" + FORMATS[answer_type],
            "choices": choices, "answer": str(answer), "about": about}


def matches(obj, about):
    return all(obj[key] == value for key, value in about.items())


def count_phrase(about, noun):
    return " ".join([about.get("colour", ""), about.get("shape", noun) + "s"]).strip()


# -----------------------------------------------------------------------------
# clevr


def describe(obj, keys=("size", "colour", "material", "shape")):
    words = [obj[k] for k in keys if k != "shape"] + [obj.get("shape", "object") if "shape" in keys else "object"]
    return "the " + " ".join(words)


def clevr_questions(pair, rng):
    from clevr_render import CLEVR_COLOURS, CLEVR_MATERIALS, CLEVR_SHAPES
    objects = pair["source"]["objects"]
    all_visible = min(o["pixels"] for o in objects) >= MIN_VISIBLE_PIXELS
    found = []
    if all_visible:
        about = rng.choice([{}, {"shape": rng.choice(CLEVR_SHAPES)}, {"colour": rng.choice(list(CLEVR_COLOURS))}])
        found.append(question(pair, "original", "count", f"How many {count_phrase(about, 'object')} are in the picture?",
                              sum(matches(o, about) for o in objects), about))
        if rng.random() < 0.5:
            present = rng.choice(objects)
            about = {"colour": present["colour"], "shape": present["shape"]}
        else:
            absent = [(c, s) for c in CLEVR_COLOURS for s in CLEVR_SHAPES
                      if not any(o["colour"] == c and o["shape"] == s for o in objects)]
            colour, shape = rng.choice(absent)
            about = {"colour": colour, "shape": shape}
        found.append(question(pair, "original", "exist", f"Is there a {about['colour']} {about['shape']} in the picture?",
                              "yes" if any(matches(o, about) for o in objects) else "no", about))
    asked = rng.choice(["colour", "shape", "material"])
    options = {"colour": list(CLEVR_COLOURS), "shape": list(CLEVR_SHAPES), "material": list(CLEVR_MATERIALS)}[asked]
    keys = [k for k in ("size", "colour", "material", "shape") if k != asked]
    unique = [o for o in objects if o["pixels"] >= MIN_VISIBLE_PIXELS
              and sum(matches(p, {k: o[k] for k in keys}) for p in objects) == 1]
    if unique:
        target = rng.choice(unique)
        wrong = rng.sample([x for x in options if x != target[asked]], min(3, len(options) - 1))
        found.append(question(pair, "original", "attribute", f"What {asked} is {describe(target, keys)}?",
                              target[asked], {"object": {k: target[k] for k in keys}, "asked": asked},
                              choices=[target[asked]] + wrong, rng=rng))
    changed = sorted(int(c["what"].split()[-1]) for c in pair.get("changes", []))
    names = [describe(o)[4:] for o in objects]  # without "the"
    if changed and len(set(names)) == len(names):
        others = [sorted(rng.sample(range(len(objects)), len(changed))) for _ in range(50)]
        distractors = list(dict.fromkeys(tuple(s) for s in others if s != changed))[:3]
        option = lambda indices: " and ".join(names[i] for i in indices)  # noqa: E731
        found.append(question(pair, "pair", "differ",
                              "The right picture is the left one with some objects replaced by objects of another "
                              "shape and colour. Which objects of the left picture were replaced?",
                              option(changed), {"changed": changed},
                              choices=[option(changed)] + [option(d) for d in distractors], rng=rng))
    return found


# -----------------------------------------------------------------------------
# chart


def shown_values(chart, series):
    """The values of a series as the picture shows them: a pie prints each slice's share in %."""
    values = chart["series"][series]
    if chart["kind"] == "pie":
        return [round(100 * v / sum(values)) for v in values]
    return values


def chart_questions(pair, rng):
    from make_games import CHART_KINDS
    chart = pair["source"]
    categories = chart["categories"]
    series = rng.choice(list(chart["series"]))
    values = shown_values(chart, series)
    margin = MARGIN * max(abs(v) for v in values)
    in_series = f" in the series {series}" if len(chart["series"]) > 1 else ""
    found = []

    def clear(best, rest):  # best beats every other value by the margin
        return all(abs(values[best] - values[k]) >= margin for k in rest if k != best)

    extreme = rng.choice(["largest", "smallest"])
    best = (max if extreme == "largest" else min)(range(len(values)), key=values.__getitem__)
    if clear(best, range(len(values))):
        wrong = rng.sample([c for k, c in enumerate(categories) if k != best], min(3, len(categories) - 1))
        found.append(question(pair, "original", extreme, f"Which category has the {extreme} value{in_series}?",
                              categories[best], {"series": series, "extreme": extreme},
                              choices=[categories[best]] + wrong, rng=rng))
    i, j = rng.sample(range(len(values)), 2)
    if abs(values[i] - values[j]) >= margin:
        larger = i if values[i] > values[j] else j
        found.append(question(pair, "original", "compare",
                              f"Which category has the larger value{in_series}: {categories[i]} or {categories[j]}?",
                              categories[larger], {"series": series, "categories": [categories[i], categories[j]]},
                              choices=[categories[i], categories[j]], rng=rng))
    k = rng.randrange(len(values))
    shown = values[k]
    step = max(abs(v) for v in values) * 0.15  # distractors this far apart are readable off the axis
    offsets = rng.sample([-3, -2, -1, 1, 2, 3], 3)
    unit = "%" if chart["kind"] == "pie" else ""
    decimals = 1 if any(isinstance(v, float) and v != int(v) for v in values) else 0
    text = lambda v: f"{v:.{decimals}f}{unit}"  # noqa: E731
    wrong = [text(round(shown + o * step, decimals)) for o in offsets]
    if text(shown) not in wrong and len(set(wrong)) == 3:
        what = "share" if unit else "value"
        found.append(question(pair, "original", "value", f"What is the {what} of {categories[k]}{in_series}?",
                              text(shown), {"series": series, "category": categories[k]},
                              choices=[text(shown)] + wrong, rng=rng))
    found.append(question(pair, "original", "chart_kind", "What kind of chart is this?", chart["kind"],
                          {"kind": chart["kind"]}, choices=list(CHART_KINDS), rng=rng))
    return found


# -----------------------------------------------------------------------------
# cells


def cells_questions(pair, rng):
    from make_games import CELL_COLOURS
    objects = pair["source"]["objects"]
    target = rng.choice(objects)
    row, column = target["cell"]
    wrong = rng.sample([c for c in CELL_COLOURS if c != target["colour"]], 3)
    found = [question(pair, "original", "colour_at",
                      f"What colour is the square in row {row + 1} from the top, column {column + 1} from the left?",
                      target["colour"], {"cell": [row, column]}, choices=[target["colour"]] + wrong, rng=rng)]
    about = rng.choice([{}, {"colour": rng.choice(list(CELL_COLOURS))}])
    found.append(question(pair, "original", "count", f"How many {count_phrase(about, 'square')} are in the picture?",
                          sum(matches(o, about) for o in objects), about))
    present = {o["colour"] for o in objects}
    pool = sorted(present) if rng.random() < 0.5 else sorted(set(CELL_COLOURS) - present)
    about = {"colour": rng.choice(pool)}
    found.append(question(pair, "original", "exist", f"Is there a {about['colour']} square in the picture?",
                          "yes" if about["colour"] in present else "no", about))
    return found


QUESTION_MAKERS = {"clevr": clevr_questions, "chart": chart_questions, "cells": cells_questions}


def make_questions(pairs, seed):
    """All questions of the pairs, in pair order; each pair's draws depend only on (seed, its id).
    Returns (questions, number of pairs skipped for lack of metadata)."""
    questions, skipped = [], 0
    for pair in pairs:
        maker = QUESTION_MAKERS.get(pair["domain"])
        if maker is None or "source" not in pair:
            skipped += 1
            continue
        questions += maker(pair, random.Random(f"{seed}-{pair['id']}"))
    return questions, skipped


# -----------------------------------------------------------------------------
# Asking and scoring


def side_by_side(left, right):
    """The two pictures of a pair next to each other, on white: one image for any VLM."""
    canvas = Image.new("RGB", (left.width + PAIR_GAP + right.width, max(left.height, right.height)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + PAIR_GAP, 0))
    return canvas


def question_image(pair, image):
    original = selfplay.load_image(pair["original"])
    return side_by_side(original, selfplay.load_image(pair["modified"])) if image == "pair" else original


def normalise(text):
    return text.strip().strip("().:").strip().lower() if text is not None else None


def ask(policy, processor, questions, images, batch, desc):
    """Greedy answers of one model, one generate call per batch: [(text, boxed answer, right?)]."""
    cfg = SimpleNamespace(temperature=0, max_new_tokens=batch["max_new_tokens"])
    answers = []
    for start in tqdm(range(0, len(questions), batch["size"]), desc=desc, unit="batch"):
        chunk = questions[start:start + batch["size"]]
        turns = [selfplay.Turn(-1, -1, selfplay.chat(processor, q["question"]), images[q["pair_id"], q["image"]])
                 for q in chunk]
        selfplay.generate(policy, processor, turns, cfg)
        for q, turn in zip(chunk, turns):
            boxed = selfplay.first_boxed(turn.text)
            answers.append({"text": turn.text, "boxed": boxed, "correct": normalise(boxed) == q["answer"].lower()})
    return answers


def chance(q):
    """The accuracy of a blind guess: 1/choices, 1/2 for yes/no; None for numbers."""
    if q["choices"] is not None:
        return 1 / len(q["choices"])
    return 0.5 if q["answer"] in ("yes", "no") else None


def summary(questions, answers):
    """Accuracy and standard error per model, chance, and the paired difference trained - initial."""
    def stats(indices):
        row = {"questions": len(indices)}
        guesses = [chance(questions[i]) for i in indices]
        row["chance"] = sum(guesses) / len(guesses) if None not in guesses else None
        for name, given in answers.items():
            p = sum(given[i]["correct"] for i in indices) / len(indices)
            row[name] = {"accuracy": p, "se": math.sqrt(p * (1 - p) / len(indices))}
        if len(answers) == 2:
            diffs = [answers["trained"][i]["correct"] - answers["initial"][i]["correct"] for i in indices]
            mean = sum(diffs) / len(diffs)
            var = sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1)
            row["difference"], row["se_difference"] = mean, math.sqrt(var / len(diffs))
        return row

    kinds = sorted({q["kind"] for q in questions})
    return {"kinds": {k: stats([i for i, q in enumerate(questions) if q["kind"] == k]) for k in kinds},
            "overall": stats(list(range(len(questions))))}


def write_jsonl(path, rows):
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)


def models_to_score(args):
    """{name: (Policy, description)} and the processor: one --model, or a run's initial and trained."""
    if args.model:
        processor = selfplay.load_processor(args.model)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        return {"model": (selfplay.Policy(selfplay.load_model(args.model, device, dtype).eval().requires_grad_(False)), args.model)}, processor
    cfg, checkpoint = checkpoints.load_run_config(args.out), checkpoints.resume_point(args.out)[0]
    if cfg is None or checkpoint is None:
        sys.exit(f"error: {args.out} is not a trained run (no config.json or no checkpoint); "
                 "train it first, or give --model to score one model")
    trained, initial, processor = trainer.evaluation_policies(cfg, checkpoint)
    return {"initial": (initial, cfg.model), "trained": (trained, checkpoint)}, processor


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--data", required=True, help="pairs folder from make_games.py; only its held-out split is asked about")
    p.add_argument("--out", required=True, help="run folder (its initial and trained model are scored) or, with --model, any folder")
    p.add_argument("--model", help="score this one model (folder or Hugging Face id) instead of a run's two")
    p.add_argument("--batch", type=int, default=64, help="questions per generate call")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer")
    p.add_argument("--max-questions", type=int, help="ask only the first this many questions")
    p.add_argument("--seed", type=int, default=0, help="seed of the questions (the same seed, the same questions)")
    args = p.parse_args()
    if args.batch < 1 or args.max_new_tokens < 1 or (args.max_questions is not None and args.max_questions < 1):
        p.error("--batch, --max-new-tokens and --max-questions must be at least 1")
    if not args.model and checkpoints.load_run_config(args.out) is None:
        sys.exit(f"error: {args.out} is not a run folder (no config.json); give a run's --out, or --model to score one model")

    pairs = selfplay.read_pairs(args.data, "eval")
    questions, skipped = make_questions(pairs, args.seed)
    if skipped:
        print(f"skipping {skipped} held-out pairs with no generator metadata (photo pairs): nothing to ask about them")
    questions = questions[:args.max_questions]
    if pairs and skipped == len(pairs):  # a photo folder: not an error, there is just nothing to ask
        print(f"vqa: nothing to ask about {args.data}: its held-out pairs are all photo pairs; no vqa.json written")
        return
    if not questions:
        sys.exit(f"error: no questions from the held-out pairs of {args.data}; vqa.py needs clevr, chart or cells "
                 "pairs from make_games.py (about 10% of the ids are held out: make more pairs)")
    models, processor = models_to_score(args)
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "vqa_questions.jsonl"), questions)

    by_id = {pair["id"]: pair for pair in pairs}
    images = {(q["pair_id"], q["image"]): None for q in questions}
    images = {key: question_image(by_id[key[0]], key[1]) for key in images}
    batch = {"size": args.batch, "max_new_tokens": args.max_new_tokens}
    answers = {name: ask(policy, processor, questions, images, batch, name) for name, (policy, _) in models.items()}
    write_jsonl(os.path.join(args.out, "vqa_answers.jsonl"),
                [{"index": i, "pair_id": q["pair_id"], "kind": q["kind"], "answer": q["answer"],
                  **{name: given[i] for name, given in answers.items()}} for i, q in enumerate(questions)])
    result = {"data": args.data, "seed": args.seed, "decoding": "greedy", "max_new_tokens": args.max_new_tokens,
              "held_out_pairs": len(pairs), "skipped_pairs": skipped,
              "models": {name: where for name, (_, where) in models.items()}, **summary(questions, answers)}
    checkpoints.write_json_atomic(os.path.join(args.out, "vqa.json"), result)
    overall = result["overall"]
    scores = ", ".join(f"{name} {overall[name]['accuracy']:.3f} ± {overall[name]['se']:.3f}" for name in models)
    untaught = (" (the initial model does no better than chance: it was never taught to answer such questions, so "
                "this measures nothing about seeing here)" if report.vqa_not_taught(result) else "")
    print(f"vqa: {len(questions)} questions from {len(pairs) - skipped} held-out pairs: {scores}{untaught}; "
          f"written to {os.path.join(args.out, 'vqa.json')}")


if __name__ == "__main__":
    main()
