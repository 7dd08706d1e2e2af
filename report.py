"""
report.py: turn a Vision-Zero run folder into one self-contained HTML page.

    python report.py runs/demo

writes runs/demo/report.html and runs/demo/curves.png. The page opens from disk with no server
and no network: the curves and the image thumbnails are embedded as data URIs, and the little
script that drives the game browser is written into the page itself. It shows, top to bottom:
the headline (headline(): the judge's accuracy before -> after against chance with standard
errors, the win rate against the initial model with its 95% interval, what the game lets a judge
learn; run.sh prints the same lines), the training curves with the stages shaded and the
switching thresholds of the schedule drawn in, a browser over the games that were played, then
the details: every eval.json number with its meaning, the answers to questions about held-out
pictures (vqa.json; folded when the initial model does no better than chance), the config and a
table of every logged metric.

Big runs stay quick to open: every metric is embedded, but only the games of --max-iterations
iterations (evenly spaced, first and last included), --games-per-iteration each, and an image
that several games share (the same pair) is embedded once.
"""
import argparse
import base64
import html
import io
import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")  # no display on a training box
import matplotlib.pyplot as plt
from matplotlib.patches import Patch
from PIL import Image

import cli
import jsonl

STAGE_COLORS = {"decision": "#4c72b0", "clue": "#dd8452"}
# (panel title, metrics drawn in it); a metric missing from the log is simply left out
PANELS = [
    ("decision accuracy and N/A rate", ["acc", "acc_ema", "na", "na_ema"]),
    ("reward per role (mean)", ["reward_spy", "reward_civilian", "reward_decision"]),
    ("RAE role baselines", ["baseline_spy", "baseline_civilian"]),
    ("loss", ["loss"]),
    ("KL to the reference policy", ["kl"]),
    ("completion length (tokens)", ["clue_tokens", "decision_tokens"]),
    ("generation speed (tokens/s)", ["gen_tokens_per_s"]),
    ("game statistics", ["spy_found_rate", "invalid_vote_rate", "clue_format_rate"]),
    ("seconds per iteration", ["seconds_generate", "seconds_update", "seconds"]),
    ("learning signal of the decision groups", ["frac_reward_zero_std", "reward_std"]),
    ("clipped tokens, truncated completions", ["clip_ratio/region_mean", "completions/clipped_ratio"]),
    ("token entropy of the trained completions (nats)", ["entropy"]),
    ("|sampling - recomputed| log-prob per completion token",
     ["sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max"]),
    ("seeing (--aux-data): held-out yes/no, seeing-term loss", ["heldout_yes_no", "aux_loss"]),
]
# C0 control characters (tab and newlines kept) that model text may contain
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def fail(message):
    print(f"report.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def esc(value):
    """Any value as HTML text that cannot break the page: lone surrogates and control characters
    become U+FFFD, markup characters are escaped."""
    text = str(value).encode("utf-8", "replace").decode("utf-8")
    return html.escape(CONTROL_CHARS.sub("\ufffd", text))


def fmt(value):
    """Any value as safe HTML text: a number formatted as a number, anything else escaped (a run
    folder may come from someone else, and a crafted "reward" must not become markup)."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return "—" if value is None else esc(value)


def is_iteration(value):
    """An iteration number as trainer.py logs it (bool is an int to Python, but no iteration)."""
    return isinstance(value, int) and not isinstance(value, bool)


def read_json(path):
    """(object, None) for a readable JSON file, (None, why not) otherwise."""
    if not os.path.exists(path):
        return None, "missing"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except (OSError, ValueError) as e:
        return None, f"unreadable ({e})"


# every key evaluate.py writes to eval.json, with what it means (the README's eval.json paragraph)
EVAL_FIELDS = {
    "games": "held-out games played, half with the trained model as the civilians (who also judge)",
    "win_rate": "the trained model's share of wins against the initial one (0.5: no change; the paper: 0.71)",
    "win_rate_ci95": "95% Wilson interval of win_rate over the games",
    "win_rate_civilian_side": "win rate in the games where the trained model plays the civilians and judges",
    "win_rate_spy_side": "win rate in the games where the trained model plays the spy",
    "decision_acc": "share of the trained judge's votes that name the spy (in the games it judged)",
    "decision_acc_se": "standard error of decision_acc over games",
    "decision_acc_baseline": "the initial model judging the very same games (pairs and spy seats): "
                             "decision_acc - decision_acc_baseline is what training changed",
    "decision_acc_baseline_se": "standard error of decision_acc_baseline over games",
    "chance": "accuracy of a judge voting for a random player: 1 / players",
    "decision_acc_reference": "the initial model's accuracy when it judges the other half of the games, "
                              "against the trained model as the spy",
    "na_rate": "share of the trained judge's votes that say N/A",
    "na_rate_reference": "the same for the initial model, in the other half of the games",
    "invalid_vote_rate": "share of the trained judge's votes that do not parse",
    "decision_acc_colour_check": "cells game with the edited picture only: the accuracy of a judge that "
                                 "checks every clue's colour against its picture, in the same games (the ceiling)",
    "decision_acc_wrong_picture": "cells game with the edited picture only: the trained judge in the same games "
                                  "seeing another held-out pair's picture (reads only the clues: equals decision_acc)",
    "heldout_yes_no": "cells game only: the trained model on 400 held-out \"is there a <colour> square?\" questions",
    "heldout_yes_no_reference": "the same check for the initial model",
    "trained": "the checkpoint evaluated", "reference": "the initial model (--model)", "data": "the pairs folder",
    "held_out_pairs": "held-out pairs the games were drawn from", "seed": "seed of pairs, spy seats and sampling",
}


def number(value):
    """A float of eval.json, or None for anything else (a hand-edited or damaged file)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def with_se(value, se):
    return f"{value:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def headline(evaluation, config, metrics):
    """What the run found, in a few sentences a reader of the paper follows: the judge's accuracy
    before -> after against chance, the win rate against the initial model, what this game lets a
    judge learn, and the training curve in two numbers. run.sh prints it; the report opens with it.
    Returns (title, sentences)."""
    evaluation = evaluation if isinstance(evaluation, dict) else {}
    after, before = number(evaluation.get("decision_acc")), number(evaluation.get("decision_acc_baseline"))
    win, games = number(evaluation.get("win_rate")), evaluation.get("games")
    chance = number(evaluation.get("chance")) or 1 / (number(config.get("players")) or 4)
    sentences = []
    if after is None or before is None or win is None:
        title = "No evaluation yet"
        sentences.append("No eval.json in this run folder yet: `python evaluate.py --out RUN` plays the held-out games.")
    else:
        title = f"Judge accuracy {before:.3f} → {after:.3f} (chance {chance:.3f}) · win rate {win:.3f}"
        judged = games // 2 if isinstance(games, int) else "the"
        sentences.append(
            f"In {judged} held-out games, the trained judge named the spy in {with_se(after, number(evaluation.get('decision_acc_se')))} "
            f"of its votes; the initial model, judging the same games: {with_se(before, number(evaluation.get('decision_acc_baseline_se')))} "
            f"(a judge voting at random: {chance:.3f}).")
        interval = evaluation.get("win_rate_ci95")
        shown = (f" (95% interval {interval[0]:.3f}-{interval[1]:.3f})"
                 if isinstance(interval, list) and len(interval) == 2 and all(number(v) is not None for v in interval) else "")
        sentences.append(f"Win rate against the initial model: {win:.3f} of {games} games{shown}; "
                         f"0.5 means no change (the paper reports 0.71 for Qwen2.5-VL-7B).")
        invalid = number(evaluation.get("invalid_vote_rate"))
        if invalid is not None and invalid >= 0.5:
            sentences.append(f"{invalid:.0%} of the trained judge's votes do not parse: a model that cannot write a "
                             "vote gets no reward signal, so nothing could be learned (a random model, as in QUICK=1).")
    if config.get("spy_image") == "blank":
        sentences.append("In this game the spy sees a blank picture and its clues say so: a judge can find it by "
                         "reading the clues, without looking at the picture, so a gain here is learning to read the "
                         "clues, not to see.")
    elif config.get("spy_image") == "modified":
        ceiling = number(evaluation.get("decision_acc_colour_check"))
        sentences.append("In this game the spy sees an edited copy of the picture: to find it the judge must compare "
                         "what the players say with what it sees" +
                         (f"; a judge checking every clue's colour against its picture would score {ceiling:.3f} "
                          "in the same games." if ceiling is not None else "."))
    accuracies = [row["acc"] for row in metrics if number(row.get("acc")) is not None]
    if accuracies:
        first, last = accuracies[:5], accuracies[-5:]
        sentences.append(f"In training games the judge's accuracy went from {sum(first) / len(first):.3f} (first "
                         f"{len(first)} iterations) to {sum(last) / len(last):.3f} (last {len(last)}), over "
                         f"{len(metrics)} iterations; the curves below show it.")
    return title, sentences


def vqa_not_taught(result):
    """True when the initial model answers vqa.py's questions no better than chance: it was never
    taught to answer them, and the comparison measures nothing."""
    overall = result.get("overall") if isinstance(result, dict) else None
    models = list(result.get("models") or {}) if isinstance(result, dict) else []
    if not isinstance(overall, dict) or not models or not isinstance(overall.get(models[0]), dict):
        return False
    accuracy = number(overall[models[0]].get("accuracy"))
    return accuracy is not None and accuracy <= (number(overall.get("chance")) or 0.0)


def draw_curves(metrics, config):
    """One PNG with a panel per group of metrics over the iterations, as bytes."""
    iterations = [row.get("iteration", i + 1) for i, row in enumerate(metrics)]
    # contiguous runs of one stage, shaded in every panel so that each switch is visible
    spans = []
    for it, row in zip(iterations, metrics):
        if spans and spans[-1][0] == row.get("stage"):
            spans[-1][2] = it
        else:
            spans.append([row.get("stage"), it, it])
    # the panel of the switching rule spans the top row, the others share the three rows below
    fig, axes = plt.subplot_mosaic([["rule"] * 4, list("abcd"), list("efgh"), list("ijkl")], figsize=(16, 13), sharex=True)
    panel_axes = [axes[name] for name in ["rule", *"abcdefghijkl"]]
    for ax, (title, keys) in zip(panel_axes, PANELS):
        for stage, first, last in spans:
            ax.axvspan(first - 0.5, last + 0.5, color=STAGE_COLORS.get(stage, "#999999"), alpha=0.12, lw=0)
        for key in keys:
            values = [row.get(key) for row in metrics]
            values = [float(v) if isinstance(v, (int, float)) and abs(v) < 1e300 else math.nan for v in values]
            if all(math.isnan(v) for v in values):
                continue
            ema = key.endswith("_ema")
            xs = iterations
            if sum(not math.isnan(v) for v in values) < len(values) / 2:  # a check of every few iterations: join its points
                xs, values = zip(*[(x, v) for x, v in zip(iterations, values) if not math.isnan(v)])
            ax.plot(xs, values, label=key, lw=2.0 if ema else 1.2, alpha=1.0 if ema else 0.6,
                    marker="" if len(values) > 30 else ".")
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)
    # the switching rule of the schedule: decision -> clue when acc_ema >= acc_high and
    # na_ema <= na_low; clue -> decision when 1 - acc_ema >= error_high or na_ema >= na_high
    rule = axes["rule"]
    thresholds = [("acc_high", config.get("acc_high", 0.9), "#1f77b4", "acc_ema ≥ {:g}: to clue"),
                  ("error_high", 1 - config.get("error_high", 0.4), "#d62728", "acc_ema ≤ {:g}: to decision"),
                  ("na_low", config.get("na_low", 0.1), "#2ca02c", "na_ema ≤ {:g}: to clue"),
                  ("na_high", config.get("na_high", 0.5), "#9467bd", "na_ema ≥ {:g}: to decision")]
    for _, value, color, label in thresholds:
        rule.axhline(value, ls="--", lw=1, color=color, label=label.format(value))
    rule.set_ylim(-0.05, 1.05)
    handles, labels = rule.get_legend_handles_labels()
    handles += [Patch(color=c, alpha=0.25, label=f"{s} stage") for s, c in STAGE_COLORS.items()]
    rule.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    for ax in panel_axes[1:]:
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
    for name in "ijkl":
        axes[name].set_xlabel("iteration")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


class Thumbnails:
    """Downscaled images as data URIs, each path encoded once however many games show it."""

    def __init__(self, max_side):
        self.max_side = max_side
        self.ids = {}  # path -> (id, width, height) of the full image, or None when unreadable
        self.uris = {}  # id -> data URI

    def get(self, path):
        if path not in self.ids:
            self.ids[path] = self._encode(path)
        return self.ids[path]

    def _encode(self, path):
        try:
            with Image.open(path) as image:
                size = image.size
                image = image.convert("RGB")
                image.thumbnail((self.max_side, self.max_side))
        except (OSError, ValueError, TypeError):
            return None
        # renders and charts compress better as PNG, photos as JPEG: keep the smaller
        encoded = []
        for fmt_name, mime, options in [("PNG", "image/png", {"optimize": True}), ("JPEG", "image/jpeg", {"quality": 80})]:
            buffer = io.BytesIO()
            image.save(buffer, fmt_name, **options)
            encoded.append((len(buffer.getvalue()), mime, buffer.getvalue()))
        _, mime, data = min(encoded)
        image_id = f"img{len(self.uris)}"
        self.uris[image_id] = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        return image_id, size[0], size[1]


def render_image(thumbnails, path, caption, boxes_size, changes, blank=False):
    """A figure with the thumbnail and the changed regions outlined (bbox in pixels of the original,
    drawn in percent so they scale with the thumbnail)."""
    if blank:
        body = '<div class="blank">blank white picture</div>'
    else:
        found = thumbnails.get(path) if path else None
        if found is None:
            body = f'<div class="missing">image not found:<br>{esc(path)}</div>'
        else:
            image_id, _, _ = found
            body = f'<img data-image="{image_id}" alt="{esc(caption)}">'
            if boxes_size:
                width, height = boxes_size
                for change in changes:
                    box = change.get("bbox") if isinstance(change, dict) else None
                    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                        continue
                    x0, y0, x1, y1 = box
                    body += (f'<div class="box" style="left:{100 * x0 / width:.2f}%;top:{100 * y0 / height:.2f}%;'
                             f'width:{100 * (x1 - x0) / width:.2f}%;height:{100 * (y1 - y0) / height:.2f}%"></div>')
    return f'<figure><div class="thumb">{body}</div><figcaption>{esc(caption)}</figcaption></figure>'


def player_name(seat):
    return f"player {seat + 1}" if isinstance(seat, int) else esc(seat)


def render_game(game, thumbnails):
    """One game: the two images, the clues round by round, the decision, the rewards."""
    spy = game.get("spy")
    changes = game.get("changes") or []
    original = game.get("original")
    found = thumbnails.get(original) if original else None
    if found is None and game.get("modified"):
        found = thumbnails.get(game["modified"])
    boxes_size = found[1:] if found else None
    spy_sees = game.get("spy_image", "modified")
    won = "civilians win: the spy was found" if game.get("spy_found") else "the spy wins: not found"
    out = ['<section class="game">',
           f'<h3>iteration {esc(game.get("iteration"))} · game {esc((game.get("game_index") or 0) + 1)} · '
           f'pair {esc(game.get("pair_id"))} ({esc(game.get("domain"))}) · {esc(game.get("stage"))} stage · '
           f'spy: {player_name(spy)} · <span class="{"civ" if game.get("spy_found") else "spywin"}">{won}</span></h3>',
           '<div class="pair">',
           render_image(thumbnails, original, "civilians see: original", boxes_size, changes),
           render_image(thumbnails, game.get("modified"), f"the spy sees: {spy_sees}", boxes_size, changes,
                        blank=spy_sees == "blank"),
           '<div><b>players</b><table><tr><th>seat</th><th>role</th><th>reward</th><th>advantage</th></tr>']
    for player in game.get("players", []):
        out.append(f'<tr class="{esc(player.get("role"))}"><td>{player_name(player.get("seat"))}</td>'
                   f'<td>{esc(player.get("role"))}</td><td>{fmt(player.get("reward"))}</td><td>{fmt(player.get("advantage"))}</td></tr>')
    out.append('</table><small>— : the clue stage did not train in this iteration</small></div></div>')
    described = [c for c in changes if isinstance(c, dict) and any(k in c for k in ("what", "before", "after"))]
    if described:
        out.append("<ul class=changes>" + "".join(
            f"<li>{esc(c.get('what', 'change'))}: {esc(c.get('before', '?'))} → {esc(c.get('after', '?'))}</li>"
            for c in described) + "</ul>")
    out.append("<h4>clues</h4>")
    rounds = sorted({c.get("round", 0) for c in game.get("clues", [])})
    for number in rounds:
        out.append(f'<div class="round"><b>round {number + 1}</b>')
        for clue in (c for c in game.get("clues", []) if c.get("round", 0) == number):
            text = f'<q>{esc(clue["clue"])}</q>' if clue.get("clue") is not None else '<i class="bad">no clue (format broken)</i>'
            out.append(f'<div class="clue {esc(clue.get("role"))}"><span class="who">{player_name(clue.get("seat"))} '
                       f'<span class="role">{esc(clue.get("role"))}</span></span> {text}'
                       f'<details><summary>reasoning ({esc(clue.get("tokens"))} tokens)</summary>'
                       f'<pre>{esc(clue.get("reasoning", ""))}</pre></details></div>')
        out.append("</div>")
    votes = game.get("votes") or []
    tally = ", ".join(f'{player_name(seat)}{" (spy)" if seat == spy else ""}: {fmt(count)}' for seat, count in enumerate(votes))
    out.append(f"<h4>decision</h4><p>votes per seat: {tally or '—'}</p>")
    out.append("<table><tr><th>#</th><th>voter</th><th>vote</th><th>reward</th><th>advantage</th><th>completion</th></tr>")
    for number, decision in enumerate(game.get("decisions", []), 1):
        vote = decision.get("vote")
        shown = player_name(vote) if isinstance(vote, int) else ("invalid" if vote is None else esc(vote))
        mark = " right" if vote == spy else (" bad" if vote is None else "")
        voter = decision.get("voter")
        out.append(f'<tr><td>{number}</td><td>{player_name(voter) if isinstance(voter, int) else esc(voter)}</td>'
                   f'<td class="vote{mark}">{shown}</td><td>{fmt(decision.get("reward"))}</td>'
                   f'<td>{fmt(decision.get("advantage"))}</td><td><details><summary>{esc(decision.get("tokens"))} tokens'
                   f'</summary><pre>{esc(decision.get("text", ""))}</pre></details></td></tr>')
    out.append("</table></section>")
    return "\n".join(out)


def render_record(game, thumbnails, iteration, index):
    """A game as render_game shows it, or, for a record that is not a well-formed game (a shared or
    damaged run folder), a section that says "unreadable record"; either way the game browser
    finds it by the iteration of its file and its position there."""
    try:
        section = render_game(game, thumbnails)
    except Exception:  # any malformed field: one unreadable game must not cost the whole report
        section = (f'<section class="game"><h3>iteration {iteration} · game {index + 1}</h3>'
                   '<p class="bad">unreadable record</p></section>')
    return section.replace('<section class="game"', f'<section class="game" data-iteration="{iteration}" data-game="{index}"', 1)


def sample_evenly(items, count):
    """Up to `count` items, evenly spaced, the first and the last included."""
    if count <= 0 or not items:
        return []
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[-1]]
    return [items[i] for i in sorted({round(k * (len(items) - 1) / (count - 1)) for k in range(count)})]


def key_value_table(mapping):
    items = "".join(f"<div><span>{esc(k)}</span> {fmt(v) if not isinstance(v, (dict, list)) else esc(json.dumps(v))}</div>"
                    for k, v in mapping.items())
    return f'<div class="kv">{items}</div>'


def render_vqa(out_dir, thumbnails, examples=6):
    """The vqa.py section: accuracy per question kind of each model, and a few questions (those the
    models answer differently first) with the picture and both answers. Every value is escaped."""
    result, problem = read_json(os.path.join(out_dir, "vqa.json"))
    if not isinstance(result, dict) or not isinstance(result.get("kinds"), dict):
        return "<p>no vqa.json yet (python vqa.py --data DATA --out RUN)</p>" if problem == "missing" \
            else f"<p>vqa.json {esc(problem or 'has no kinds')}</p>"
    models = list(result.get("models") or {})

    def cell(row, name):
        score = row.get(name) if isinstance(row, dict) else None
        return f"{fmt(score.get('accuracy'))} ± {fmt(score.get('se'))}" if isinstance(score, dict) else ""

    rows = []
    for kind, row in [*result["kinds"].items(), ("overall", result.get("overall", {}))]:
        row = row if isinstance(row, dict) else {}
        difference = f"{fmt(row.get('difference'))} ± {fmt(row.get('se_difference'))}" if "difference" in row else ""
        rows.append("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in [
            kind, row.get("questions"), fmt(row.get("chance")), *[cell(row, m) for m in models], difference]) + "</tr>")
    header = "".join(f"<th>{esc(h)}</th>" for h in ["kind", "questions", "chance", *models, "difference"])
    table = f"<table><tr>{header}</tr>{''.join(rows)}</table>"
    note = (f"<p>{esc(result.get('overall', {}).get('questions'))} questions about held-out pictures of "
            f"{esc(result.get('data'))}, {esc(result.get('decoding'))} decoding; models: "
            f"{esc(', '.join(f'{k}: {v}' for k, v in result['models'].items()))}</p>") if models else ""

    def rows_of(path):
        return jsonl.read_jsonl(path) if os.path.isfile(path) else []

    def answer_of(row, model):  # {"boxed", "correct", ...} of one model, {} when absent or malformed
        return row.get(model) if isinstance(row.get(model), dict) else {}

    questions = rows_of(os.path.join(out_dir, "vqa_questions.jsonl"))
    answers = rows_of(os.path.join(out_dir, "vqa_answers.jsonl"))
    pictures = {p.get("id"): p for p in rows_of(os.path.join(str(result.get("data")), "pairs.jsonl"))}
    shown = sorted(range(min(len(questions), len(answers))),
                   key=lambda i: len({str(answer_of(answers[i], m).get("boxed")) for m in models}) == 1)[:examples]
    blocks = []
    for i in shown:
        q, given, pair = questions[i], answers[i], pictures.get(questions[i].get("pair_id"), {})
        figures = []
        for side in (["original", "modified"] if q.get("image") == "pair" else ["original"]):
            found = thumbnails.get(os.path.join(str(result.get("data")), str(pair.get(side)))) if pair else None
            figures.append(f'<figure><img src="{esc(thumbnails.uris[found[0]])}" alt="{esc(side)}" width="240">'
                           f"<figcaption>{esc(side)}</figcaption></figure>" if found else "")
        said = "".join(f"<div>{esc(m)}: <q>{esc(answer_of(given, m).get('boxed'))}</q> "
                       f"{'right' if answer_of(given, m).get('correct') else 'wrong'}</div>" for m in models)
        blocks.append(f'<div class="game"><div class="pair">{"".join(figures)}<div><pre>{esc(q.get("question"))}</pre>'
                      f"<div>answer: {esc(q.get('answer'))} ({esc(q.get('kind'))})</div>{said}</div></div></div>")
    body = table + note + "".join(blocks)
    if vqa_not_taught(result):  # folded: the numbers say nothing about seeing
        return ("<details><summary>Folded: the initial model answers these questions no better than chance; it was "
                "never taught to answer them, so this section measures nothing about seeing here.</summary>"
                f"{body}</details>")
    return body


def build_report(out_dir, max_iterations, games_per_iteration, thumbnail_px):
    """The HTML text and the curves PNG of a run folder."""
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        fail(f"no metrics.jsonl in {out_dir}: not a training run folder (run bash run.sh first)")
    logged_rows = jsonl.read_jsonl(metrics_path)
    # a row whose iteration is not a number cannot be placed on the curves: the table says so
    readable = [is_iteration(row.get("iteration")) and isinstance(row.get("stage", ""), str) for row in logged_rows]
    metrics = [row for row, ok in zip(logged_rows, readable) if ok]
    if not metrics:
        fail(f"{metrics_path} holds no complete line yet (run bash run.sh first)")
    config, config_problem = read_json(os.path.join(out_dir, "config.json"))
    config = config if isinstance(config, dict) else {}
    evaluation, eval_problem = read_json(os.path.join(out_dir, "eval.json"))
    curves = draw_curves(metrics, config)
    thumbnails = Thumbnails(thumbnail_px)
    vqa_html = render_vqa(out_dir, thumbnails)

    games_dir = os.path.join(out_dir, "games")
    logged = sorted((int(m.group(1)), name) for name in (os.listdir(games_dir) if os.path.isdir(games_dir) else [])
                    if (m := re.fullmatch(r"iter_(\d+)\.jsonl", name)))
    sections, options, sampled_notes = [], [], []
    for iteration, name in sample_evenly(logged, max_iterations):
        played = jsonl.read_jsonl(os.path.join(games_dir, name))
        games, total = played[:games_per_iteration], len(played)
        if not games:
            continue
        options.append(f'<option value="{iteration}">iteration {iteration} ({esc(games[0].get("stage"))})</option>')
        sampled_notes.append(f"{iteration} ({len(games)}/{total})")
        sections += [render_record(game, thumbnails, iteration, index) for index, game in enumerate(games)]

    stages = [row.get("stage") for row in metrics]
    switches = sum(a != b for a, b in zip(stages, stages[1:]))
    summary = f"{len(metrics)} iterations logged, {switches} stage switches, last stage: {esc(metrics[-1].get('stage'))}."
    title, sentences = headline(evaluation, config, metrics)
    if isinstance(evaluation, dict):
        eval_html = "<table><tr><th>eval.json</th><th>value</th><th>meaning</th></tr>" + "".join(
            f"<tr><td>{esc(k)}</td><td>{esc(json.dumps(v)) if isinstance(v, (dict, list)) else fmt(v)}</td>"
            f"<td>{esc(EVAL_FIELDS.get(k, ''))}</td></tr>" for k, v in evaluation.items()) + "</table>"
    else:
        eval_html = "<p>no evaluation yet</p>" if eval_problem == "missing" else f"<p>eval.json {esc(eval_problem)}</p>"
    config_html = key_value_table(config) if config else f"<p>config.json {esc(config_problem or 'is empty')}</p>"
    if sections:
        games_note = (f"Games of {len(options)} of {len(logged)} logged iterations are embedded, at most "
                      f"{games_per_iteration} per iteration (iteration (shown/played)): {', '.join(sampled_notes)}.")
    else:
        games_note = "No games logged in games/ yet."
    columns = list(dict.fromkeys(key for row in metrics for key in row))
    metric_rows = "".join(
        f'<tr data-iteration="{row["iteration"]}">' + "".join(f"<td>{fmt(row.get(c))}</td>" for c in columns) + "</tr>"
        if ok else f'<tr><td colspan="{len(columns)}" class="bad">unreadable record</td></tr>'
        for row, ok in zip(logged_rows, readable))
    page = PAGE.format(
        title=esc(f"Vision-Zero run {os.path.basename(os.path.abspath(out_dir))}"), headline=esc(title),
        sentences="".join(f"<p>{esc(text)}</p>" for text in sentences),
        path=esc(os.path.abspath(out_dir)), summary=summary, eval_html=eval_html, vqa_html=vqa_html, config_html=config_html,
        curves=base64.b64encode(curves).decode("ascii"), games_note=esc(games_note), options="".join(options),
        games="\n".join(sections), columns="".join(f"<th>{esc(c)}</th>" for c in columns), metric_rows=metric_rows,
        # JSON inside <script>: only base64 strings, but never let "</" end the element early
        images=json.dumps(thumbnails.uris).replace("</", "<\\/"))
    return page, curves


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1250px; padding: 0 1em; color: #222; }}
h1 {{ margin-bottom: 0.2em; }} h2 {{ border-bottom: 2px solid #ddd; margin-top: 1.5em; }} h4 {{ margin: 1em 0 0.3em; }}
.path {{ color: #777; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }}
.kv {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 2px 1em; }}
.kv div {{ border-bottom: 1px solid #eee; overflow-wrap: anywhere; }} .kv span {{ color: #666; }}
.curves {{ width: 100%; max-width: 1170px; }}
.metrics {{ overflow-x: auto; font-size: 12px; }}
.browser {{ position: sticky; top: 0; background: #fff; padding: 0.5em 0; border-bottom: 1px solid #ddd; z-index: 2; }}
.game {{ border: 1px solid #ccc; border-radius: 6px; padding: 0.2em 1em 1em; margin: 1em 0; }}
.pair {{ display: flex; gap: 1.5em; flex-wrap: wrap; }} figure {{ margin: 0; }} figcaption {{ color: #555; }}
.thumb {{ position: relative; width: 320px; }} .thumb img {{ width: 100%; display: block; }}
figure img {{ box-sizing: border-box; border: 1px solid #555; }}
.headline p {{ font-size: 15px; margin: 0.4em 0; }}
.box {{ position: absolute; border: 2px solid #e00; box-shadow: 0 0 0 1px #fff; }}
.missing, .blank {{ width: 320px; height: 200px; display: flex; align-items: center; justify-content: center; text-align: center;
  border: 2px dashed #aaa; color: #777; background: #fafafa; overflow-wrap: anywhere; }}
.blank {{ background: #fff; border-style: solid; }}
.round {{ margin: 0.3em 0 0.6em; }}
.clue {{ margin: 0.25em 0 0.25em 1em; padding: 0.2em 0.5em; border-left: 4px solid #4c72b0; }}
.clue.spy, tr.spy {{ background: #fff0e0; border-color: #dd8452; }}
.who {{ font-weight: bold; }} .role {{ font-weight: normal; color: #666; }}
q, pre, td {{ unicode-bidi: isolate; }} summary {{ cursor: pointer; color: #555; }}
pre {{ white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f6f6; padding: 0.4em; margin: 0.2em 0; max-height: 20em; overflow-y: auto; }}
.civ {{ color: #1a7f37; }} .spywin {{ color: #c0392b; }} .vote.right {{ color: #1a7f37; font-weight: bold; }} .bad {{ color: #c0392b; }}
</style></head>
<body>
<h1 id="headline">{headline}</h1>
<div class="headline">{sentences}</div>
<div class="path">{title} · {path}</div>
<h2>curves</h2>
<p>{summary} Background: <span style="color:#4c72b0">decision stage</span> / <span style="color:#dd8452">clue stage</span>;
dashed lines: the thresholds of the stage switching rule.</p>
<img class="curves" id="curves" alt="training curves" src="data:image/png;base64,{curves}">
<h2 id="browse">games</h2>
<p>{games_note}</p>
<div class="browser">iteration <select id="iteration">{options}</select> game <select id="game"></select>
<button id="prev">◀ previous</button> <button id="next">next ▶</button></div>
<div id="games">
{games}
</div>
<h2>details: evaluation (eval.json)</h2>
{eval_html}
<h2>details: questions about held-out pictures (vqa.py)</h2>
{vqa_html}
<h2>details: config</h2>
<details><summary>the resolved flags of the run (config.json)</summary>
{config_html}</details>
<h2>details: all metrics</h2>
<details><summary>one row per iteration</summary>
<div class="metrics"><table id="metrics"><tr>{columns}</tr>{metric_rows}</table></div></details>
<script type="application/json" id="images">{images}</script>
<script>
"use strict";
// Show one game at a time, and decode its images only when it is first shown: a page with
// hundreds of thumbnails still opens at once.
const images = JSON.parse(document.getElementById("images").textContent);
const games = Array.from(document.querySelectorAll("section.game"));
const iterationSelect = document.getElementById("iteration");
const gameSelect = document.getElementById("game");
function show(section) {{
  for (const game of games) game.hidden = game !== section;
  if (!section) return;
  for (const img of section.querySelectorAll("img[data-image]")) {{
    if (!img.src) img.src = images[img.dataset.image];
  }}
}}
function fillGames() {{
  gameSelect.replaceChildren();
  for (const game of games.filter(g => g.dataset.iteration === iterationSelect.value)) {{
    gameSelect.add(new Option("game " + (Number(game.dataset.game) + 1), game.dataset.game));
  }}
  selectGame();
}}
function selectGame() {{
  show(games.find(g => g.dataset.iteration === iterationSelect.value && g.dataset.game === gameSelect.value));
}}
function step(delta) {{
  const flat = games.indexOf(games.find(g => !g.hidden)) + delta;
  if (flat < 0 || flat >= games.length) return;
  iterationSelect.value = games[flat].dataset.iteration;
  fillGames();
  gameSelect.value = games[flat].dataset.game;
  selectGame();
}}
iterationSelect.addEventListener("change", fillGames);
gameSelect.addEventListener("change", selectGame);
document.getElementById("prev").addEventListener("click", () => step(-1));
document.getElementById("next").addEventListener("click", () => step(1));
fillGames();
// read by the tests through chromium --dump-dom: set only when the script above ran cleanly
document.body.dataset.report = "ready";
document.body.dataset.shownImages = document.querySelectorAll("img[src^='data:']").length;
// where the game browser starts: test_report.py crops the docs screenshot there
document.body.dataset.browseTop = document.getElementById("browse").offsetTop;
</script>
</body></html>
"""


def main():
    parser = argparse.ArgumentParser(description="Write OUT_DIR/report.html and OUT_DIR/curves.png for a Vision-Zero run folder.",
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("out_dir", help="the run folder (the --out of rlvr.py / spo.py), with metrics.jsonl in it")
    parser.add_argument("--max-iterations", type=int, default=20, help="embed the games of at most this many iterations, evenly spaced")
    parser.add_argument("--games-per-iteration", type=int, default=8, help="embed at most this many games of each sampled iteration")
    parser.add_argument("--thumbnail", type=int, default=320, help="longest side in pixels of the embedded image thumbnails")
    args = parser.parse_args()
    page, curves = build_report(args.out_dir, args.max_iterations, args.games_per_iteration, args.thumbnail)
    with open(os.path.join(args.out_dir, "curves.png"), "wb") as f:
        f.write(curves)
    report_path = os.path.join(args.out_dir, "report.html")
    with open(report_path, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {report_path} ({len(page.encode('utf-8')) / 1e6:.2f} MB) and {os.path.join(args.out_dir, 'curves.png')}")
    print_headline(args.out_dir)


def print_headline(out_dir):
    """The report's headline on the terminal: the last thing run.sh prints before "Done"."""
    evaluation, _ = read_json(os.path.join(out_dir, "eval.json"))
    config, _ = read_json(os.path.join(out_dir, "config.json"))
    title, sentences = headline(evaluation, config if isinstance(config, dict) else {},
                                jsonl.read_jsonl(os.path.join(out_dir, "metrics.jsonl")))
    print("\n" + title + "\n" + "\n".join(f"- {text}" for text in sentences))


if __name__ == "__main__":
    main()
