"""
selfplay.py: play batches of "Who is the spy?" with pictures, using one vision-language model.

This is the game of Vision-Zero (Wang et al., arXiv 2509.25541, Sec. 3.1). N players (default 4)
sit in seats 1..N; one of them, at a uniformly random seat, is the spy. Civilians see the original
image of a pair, the spy its edited copy (or, with --spy-image blank, an empty picture). Each
player knows its own role, not the others'.

  clue stage      R rounds (default 2); in each round the seats speak in order 1..N. A speaker
                  sees its image, its role, the rules, every earlier clue (text only) and its own
                  earlier private reasoning, thinks, and gives one sentence inside \\boxed{}.
  decision stage  `judge` (default, the released code): a neutral judge sees the ORIGINAL image
                  and all clues and is sampled G times (default 8); each sample answers \\boxed{k}
                  or \\boxed{N/A}. `civilians` (the paper's main text): every civilian votes.

All games of a batch advance together: each clue turn (round r, seat p) is ONE batched generate
call over all games, and the decision stage is one call over all games x G samples. Every turn
is recorded (prompt, image, the sampled token ids, the parsed clue or vote), so that spo.py and
rlvr.py can train on exactly the tokens that were sampled.

Seats are 0-based in code and 1-based in every text a model or a person reads.

This file is also the home of what every script needs to talk to a model: sampling a batch of turns
and the per-token log-probabilities of a completion; loading models and processors, and what
differs between model families, is in models.py (re-exported here).
It has no command of its own: run `bash run.sh`, `python spo.py`, `python rlvr.py` or
`python evaluate.py`.
"""
import argparse
import hashlib
import os
import re
import sys
import zlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

import cli  # noqa: F401  (silences the known library warnings before any model loads)
import jsonl
import distributed
import models
# re-exported: the training scripts and other checks load models through selfplay
from models import load_model, load_processor, special_vision_ids  # noqa: F401

# -----------------------------------------------------------------------------
# Prompts (method.md section 1, in our own words)

GAME_INTRO = (
    'You are playing "Who is the spy?" with {n} players, seated 1 to {n}. Every player sees a '
    "picture. "
)
MODIFIED_INTRO = "The civilians all see the same picture; the spy sees a slightly different one. "
DOMAIN_RULES = {
    "clevr": "The spy's picture shows the same 3-D scene, except that two objects were replaced "
    "by objects of another shape and colour, standing in the same places.",
    "chart": "The spy's chart is the same chart, except that two of its values or attributes "
    "were swapped.",
    "photo": "The spy's photo is the same photo, except that some objects or parts of the "
    "scene differ.",
    "cells": "The spy's picture shows the same coloured squares in the same places, except that "
    "two squares have another colour.",
}
# --spy-image blank: the only rules are the blank game's, so nothing contradicts the empty picture
BLANK_RULE = ("The civilians all see the same picture; the spy sees only an empty picture and must "
              "guess the scene from the clues.")
CLUE_EXAMPLES = {
    "clevr": "\\boxed{A large shiny red cylinder stands at the back on the left.}",
    "chart": "\\boxed{The tallest bar belongs to the third quarter.}",
    "photo": "\\boxed{A white cup sits on the left side of the table.}",
    "cells": "\\boxed{a red square}",
}
CIVILIAN_TASK = (
    "You are a civilian. Give one specific, true feature of your picture that no earlier clue "
    "has mentioned, so that the other civilians can recognise you and the spy stands out."
)
SPY_TASK = (
    "You are the spy. Your picture differs from the others' in a way you do not know. Blend "
    "in: describe something the pictures most likely share, stay vague where they might "
    "differ, and never reveal what only your picture might show."
)
BLANK_SPY_TASK = (
    "You are the spy. Your picture is empty, so you do not know what the others see. Blend in: "
    "guess from the clues so far what their picture shows, describe something it most likely "
    "contains, stay vague, and never reveal that your picture is empty."
)
CLUE_FORMAT = (
    "Think it over privately, then give your clue as one sentence inside \\boxed{{}}, "
    "for example {example}"
)
JUDGE_TASK = (
    "You are the judge. You see the civilians' picture. Read the clues and decide which "
    "player is the spy: the one whose clues do not fit your picture."
)
VOTER_TASK = (
    "The clue stage is over. You are Player {seat}, a civilian, and you see the civilians' "
    "picture. Decide which other player is the spy: the one whose clues do not fit your picture."
)
VOTE_FORMAT = (
    "Reason briefly, then answer with the spy's seat number inside \\boxed{}, for example "
    "\\boxed{2}, or \\boxed{N/A} if you cannot tell."
)
SHORT_JUDGE_QUESTION = "Which player is the spy? Answer with the seat number inside \\boxed{}."
ROLE_NAMES = ("civilian", "spy")


def game_rules(n_players, domain, spy_image):
    """The rules every player and the judge read: the edited-picture game of the domain, or the
    blank-spy game alone."""
    rules = BLANK_RULE if spy_image == "blank" else MODIFIED_INTRO + DOMAIN_RULES[domain]
    return GAME_INTRO.format(n=n_players) + rules


def clue_history(clues):
    """Earlier clues, grouped by round, text only (nobody sees another player's reasoning)."""
    lines = []
    for r in sorted({c.round for c in clues}):
        said = [f'Player {c.seat + 1}: "{c.parsed or ""}"' for c in clues if c.round == r]
        lines.append(f"Round {r + 1}: " + " ".join(said))
    return "\n".join(lines) if lines else "(no clues yet)"


def clue_prompt(game, seat, round_, cfg):
    """The text a player reads before its clue turn (round_ and seat are 0-based)."""
    is_spy = seat == game.spy
    own_notes = [c.reasoning for c in game.clues if c.seat == seat and c.reasoning]
    parts = [
        game_rules(cfg.players, game.domain, cfg.spy_image),
        f"You are Player {seat + 1}. " + (CIVILIAN_TASK if not is_spy
                                          else BLANK_SPY_TASK if cfg.spy_image == "blank" else SPY_TASK),
        "Clues so far:\n" + clue_history(game.clues),
    ]
    if own_notes:
        parts.append("Your private notes from earlier rounds:\n" + "\n".join(own_notes))
    parts.append(f"This is round {round_ + 1} of {cfg.rounds}. "
                 + CLUE_FORMAT.format(example=CLUE_EXAMPLES[game.domain]))
    return "\n\n".join(parts)


def decision_prompt(game, voter, cfg):
    """The text the judge (voter None) or a voting civilian (voter = its seat) reads: the rules,
    the task, the clues and the answer format (--judge-prompt full, the paper's), or the clues and
    the question only (short: a tiny model reads whether a clue's colour is in its picture better
    from fewer words, docs/learn_cpu.md)."""
    clues = "All clues:\n" + clue_history(game.clues)
    if getattr(cfg, "judge_prompt", "full") == "short":  # run configs saved before the flag are full
        seat = [] if voter is None else [f"You are Player {voter + 1}, a civilian."]
        return "\n\n".join(seat + [clues, SHORT_JUDGE_QUESTION])
    task = JUDGE_TASK if voter is None else VOTER_TASK.format(seat=voter + 1)
    return "\n\n".join([game_rules(cfg.players, game.domain, cfg.spy_image), task, clues, VOTE_FORMAT])


def chat(processor, text):
    """One user message holding the image then the text, formatted by the model's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    # the tokenizer renders the processor's template: SmolVLM's own apply_chat_template reads the
    # video processor's settings, which an image-only processor has not
    return processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template,
                                                   add_generation_prompt=True, tokenize=False)


# -----------------------------------------------------------------------------
# Parsing model output: never raises, linear time; None means the output broke the format

# The whole (stripped) content of a vote box: a seat as "3", "3.", "Player 3", "player 3.",
# "Player-3", "seat 3" (at most 3 digits: a long digit run is no seat), or an abstention. Anything
# else is invalid: two seats, 2.5, 1e3, 1-2, a minus sign of any kind. No nested quantifiers and
# fullmatch only, so every pattern runs in linear time.
SEAT_VOTE = re.compile(r"(?:(?:player|seat)(?:\s+|\s*-\s*)?)?([0-9]{1,3})\.?", re.IGNORECASE)
NA_VOTE = re.compile(r"(?:n\s*/\s*a|n\.?a)\.?", re.IGNORECASE)
LONGEST_VOTE = 40  # characters; "Player 3." is 9: a longer box is invalid without matching it
# a clue needs one of these: what str.isalnum() accepts, found at regex speed
LETTER_OR_DIGIT = re.compile(r"[^\W_]")


def first_boxed(text):
    """Content of the first \\boxed{...}, braces balanced; None if there is none or it never closes.
    The brace depth is a cumulative sum over the code points (numpy), so that a megabyte of braces
    costs milliseconds, not a Python loop over every brace."""
    start = text.find("\\boxed{")
    if start < 0:
        return None
    begin = start + len("\\boxed{")
    # UTF-32: one number per code point, so that indices are string indices; surrogatepass: a lone
    # surrogate (which models can emit through a byte-level tokenizer) is a code point too
    codes = np.frombuffer(text[begin:].encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    depth = 1 + np.cumsum((codes == ord("{")).astype(np.int64) - (codes == ord("}")))
    closing = np.flatnonzero(depth == 0)
    return text[begin:begin + int(closing[0])] if closing.size else None


def parse_clue(text):
    """The clue of a clue turn: the stripped content of the first \\boxed{}; None if absent, or if it
    holds no letter or digit (empty, punctuation, zero-width or control characters only)."""
    content = first_boxed(text)
    if content is None or not LETTER_OR_DIGIT.search(content):
        return None
    return content.strip()


def parse_vote(text, n_players):
    """A vote: 0-based seat, "N/A" (abstention), or None (invalid), read from the first \\boxed{}.
    The box must hold exactly one seat (SEAT_VOTE) or an N/A (NA_VOTE), optionally wrapped once
    in {...} or \\text{...}."""
    content = first_boxed(text)
    if content is None:
        return None
    content = content.strip()
    for opening in ("\\text{", "{"):
        if content.startswith(opening) and content.endswith("}"):
            content = content[len(opening):-1].strip()
            break
    if len(content) > LONGEST_VOTE:
        return None
    if NA_VOTE.fullmatch(content):
        return "N/A"
    seat = SEAT_VOTE.fullmatch(content)
    if seat is None or not 1 <= int(seat.group(1)) <= n_players:
        return None
    return int(seat.group(1)) - 1


# -----------------------------------------------------------------------------
# Game records


@dataclass
class Turn:
    """One sampled completion: a clue turn (seat, round >= 0) or a decision sample (round -1)."""
    seat: int  # the speaker; -1 for the judge
    round: int
    prompt: str
    image: Image.Image
    completion_ids: list = field(default_factory=list)
    text: str = ""
    parsed: object = None  # clue text, or vote (0-based seat / "N/A" / None)
    reward: float = None  # decision samples: Eq. 4, set by rlvr.score_decisions
    advantage: float = None  # decision samples: Eq. 5, set when the decision stage trains on it
    truncated: bool = False  # cut at --max-new-tokens before a stop token
    # log pi_sampling of each completion token, log_softmax(raw logits / T) as generate saw them:
    # the trainer compares it with its recomputed log-probs (sampling/sampling_logp_difference)
    sampling_logps: list = None

    @property
    def reasoning(self):
        """The private part of a clue turn: everything before the box."""
        cut = self.text.find("\\boxed{")
        return (self.text if cut < 0 else self.text[:cut]).strip()


@dataclass
class Game:
    pair: dict
    spy: int  # 0-based seat
    clues: list = field(default_factory=list)  # Turns in speaking order
    decisions: list = field(default_factory=list)  # Turns of the judge's samples or voters
    rewards: list = None  # per seat: Eq. 1, set by spo.score_clues
    advantages: list = None  # per seat: Eq. 2, set when the clue stage trains on the game

    @property
    def domain(self):
        return self.pair["domain"]

    def votes(self, n_players):
        """v_k of Eq. 1: how many decision samples name seat k (N/A and invalid are not counted)."""
        counts = [0] * n_players
        for d in self.decisions:
            if isinstance(d.parsed, int):
                counts[d.parsed] += 1
        return counts

    def spy_found(self, n_players):
        """The civilians win when the spy's seat gets strictly more votes than any other seat."""
        v = self.votes(n_players)
        return v[self.spy] > max(x for k, x in enumerate(v) if k != self.spy)


# -----------------------------------------------------------------------------
# Data: the layout make_games.py writes (DIR/pairs.jsonl + DIR/images/<id>_{original,modified}.png)


def image_problem(pair, decode=False):
    """None when both images of a pair open, else why not. verify() only reads a file's structure
    (0.2 s of CPU for 2,000 CLEVR pairs); decode=True decodes every pixel (load()), which also
    finds a truncated file that verify() passes, but costs 20x more (4.3 s of CPU for 2,000 pairs,
    25 s on a busy machine): read_pairs verifies, decodable_pairs decodes one batch at a time."""
    try:
        for key in ("original", "modified"):
            with Image.open(pair[key]) as im:
                im.load() if decode else im.verify()
    except Exception as e:  # any unreadable file, whatever PIL raises for it
        return f"cannot read its images ({type(e).__name__}: {e})"
    return None


def decodable_pairs(pairs, spares=()):
    """The pairs whose images decode completely. Each one that does not is named, in one line, and
    replaced by the next of `spares` (an iterable of pairs, e.g. those that follow the batch in
    the epoch order) that decodes, or dropped when none is left: a truncated image costs one
    game, never the run, and with spares every rank of a torchrun run still plays its full share."""
    kept, spares = [], iter(spares)
    for pair in pairs:
        problem = image_problem(pair, decode=True)
        if not problem:
            kept.append(pair)
            continue
        spare = next((s for s in spares if image_problem(s, decode=True) is None), None)
        instead = "" if spare is None else f"; pair {spare['id']} plays in its place"
        if distributed.is_main():  # every rank makes the same batch: one line for all of them
            print(f"dropping pair {pair['id']} from this batch: {problem}{instead}")
        if spare is not None:
            kept.append(spare)
    return kept


def read_pairs(data_dir, split="train", eval_percent=10, domain=None):
    """Pairs of a data folder, split by a hash of the id so that train and eval never overlap.

    A folder with no pairs.jsonl (e.g. a released Vision-Zero dataset) is read by file name:
    every <id>_original.<ext> with its <id>_modified.<ext>. `domain` sets the game rules the pairs
    are played under; None keeps each pair's own (pairs.jsonl), "photo" for a folder without
    pairs.jsonl. Malformed lines and pairs whose images do not open are skipped with a message.
    """
    index = os.path.join(data_dir, "pairs.jsonl")
    skipped = 0
    if os.path.exists(index):
        def bad_line(number, why):
            nonlocal skipped
            skipped += 1
            print(f"skipping line {number} of {index}: {why}")
        pairs = jsonl.read_jsonl(index, warn=bad_line)
    elif os.path.isdir(data_dir):
        pairs = []
        for root, _, files in sorted(os.walk(data_dir)):
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if stem.endswith("_original"):
                    pid = stem[: -len("_original")]
                    twin = [m for m in files if os.path.splitext(m)[0] == pid + "_modified"]
                    if twin:
                        rel = os.path.relpath(root, data_dir)
                        pairs.append({"id": pid, "domain": "photo", "original": os.path.join(rel, name),
                                      "modified": os.path.join(rel, twin[0])})
    else:
        sys.exit(f"error: data folder {data_dir} does not exist; make pairs with make_games.py first")
    wanted = []
    for pair in pairs:
        if not all(isinstance(pair.get(key), str) for key in ("original", "modified")) or "id" not in pair:
            skipped += 1
            print(f"skipping pair {str(pair.get('id'))[:80]} of {index}: it needs an id and the paths original and modified")
            continue
        held_out = zlib.crc32(str(pair["id"]).encode()) % 100 < eval_percent
        if held_out != (split == "eval"):
            continue
        for key in ("original", "modified"):
            pair[key] = os.path.join(data_dir, pair[key])
        problem = image_problem(pair)  # decoding every image up front would take too long: see decodable_pairs
        if problem:
            skipped += 1
            print(f"skipping pair {pair['id']}: {problem}")
            continue
        pair["domain"] = domain or pair.get("domain") or "photo"
        if not isinstance(pair["domain"], str) or pair["domain"] not in DOMAIN_RULES:
            skipped += 1
            print(f"skipping pair {pair['id']}: unknown domain {str(pair['domain'])[:80]!r} (one of {', '.join(DOMAIN_RULES)})")
            continue
        wanted.append(pair)
    if skipped:
        print(f"{data_dir}: skipped {skipped} unreadable pairs or lines, kept {len(wanted)} {split} pairs")
    return wanted


def load_image(path):
    with Image.open(path) as im:
        return im.convert("RGB")


# -----------------------------------------------------------------------------
# Models (loading and what differs between families: models.py)


class Policy:
    """A model as a player: `adapter=False` plays a LoRA model with its adapter switched off,
    which is the frozen initial policy, so the reference needs no second copy in memory.
    `autocast` (a dtype) computes in that dtype over fp32 weights: full fine-tuning in bf16 keeps
    fp32 master weights, since AdamW steps of lr 1e-5 mostly round away in bf16 weights."""

    def __init__(self, model, adapter=True, autocast=None):
        self.model, self.adapter, self.autocast = model, adapter, autocast

    def active(self):
        """The context in which the policy plays and is scored."""
        context = ExitStack()
        if not self.adapter and hasattr(self.model, "disable_adapter"):
            context.enter_context(self.model.disable_adapter())
        if self.autocast is not None:
            context.enter_context(torch.autocast(self.model.device.type, dtype=self.autocast))
        return context


# -----------------------------------------------------------------------------
# Generation and log-probs


def stop_ids(model):
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def sampling_settings(model, processor, cfg):
    """The generation settings of every turn, built in full: sampling is exactly softmax(logits / T)
    over the whole vocabulary minus the suppressed vision tokens. Every logits processor of
    transformers' generate is named here and switched off, because any field left unset is filled
    from the checkpoint's generation_config (Qwen2.5-VL-7B-Instruct's sets repetition_penalty 1.05,
    top_k, top_p and a temperature of its own); only its special token ids are kept."""
    from transformers import GenerationConfig
    checkpoint = model.generation_config
    # temperature 0 means greedy decoding (vqa.py's exact answers); games always sample
    sampling = dict(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                    epsilon_cutoff=0.0, eta_cutoff=0.0) if cfg.temperature > 0 else dict(do_sample=False)
    return GenerationConfig(
        **sampling, max_new_tokens=cfg.max_new_tokens, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, min_length=0, guidance_scale=1.0,
        renormalize_logits=False, remove_invalid_values=False, num_beams=1, num_return_sequences=1,
        suppress_tokens=special_vision_ids(processor), begin_suppress_tokens=[],
        bos_token_id=checkpoint.bos_token_id, eos_token_id=checkpoint.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id)


class SampledLogprobs:
    """A logits processor that keeps, at every decode step, the log-prob of the token sampled at
    the step before under log_softmax(raw logits / T): what the sampling policy gave each token,
    for the drift metric. It also suppresses the vision tokens (instead of generate's own
    SuppressTokensLogitsProcessor, which runs first and would hide their raw logits from it).
    Holds one step's [B, vocab] log-probs at a time, never every step's logits."""

    def __init__(self, suppressed, temperature):
        self.suppressed, self.temperature = suppressed, temperature
        self.previous, self.kept = None, []

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self.kept.append(self.previous.gather(1, input_ids[:, -1:]))
        self.previous = torch.log_softmax(scores.float() / self.temperature, -1)
        scores = scores.clone()
        scores[:, self.suppressed] = -float("inf")
        return scores

    def logprobs(self, completions):
        """[B, n] log-probs of the n sampled columns; generate may have run (and undone) a step more."""
        if len(self.kept) < completions.shape[1]:
            self.kept.append(self.previous.gather(1, completions[:, -1:]))
        return torch.cat(self.kept, 1)[:, : completions.shape[1]]


# -----------------------------------------------------------------------------
# Rollout levers: the same samples for less work (docs/gpu-speed.md)


def lever(cfg, name, model):
    """Whether a rollout lever is on: its flag (--merged-rollouts, --static-cache, --vision-cache, --shared-prefill),
    or, when the flag is unset (None, or absent from a cfg that predates it: vqa.py's, warm_start.py's,
    an older run's config.json), on CUDA only."""
    value = getattr(cfg, name, None)
    return model.device.type == "cuda" if value is None else bool(value)


@contextmanager
def merged_adapter(model):
    """Generation through the LoRA delta merged into the base weights, W + scale B A, with the
    adapter's branches switched off: a decode step then runs the plain model's ops (40 ATen ops per
    layer instead of 82). The base weights are restored bit for bit from a copy on their own device:
    merging then unmerging is not exact in bf16, (W + D) - D rounds twice and the error would pile up
    over iterations. The copy costs the adapted weights' size during rollouts (13 GB at 7B with every
    projection adapted); copying back, rather than swapping tensors, keeps the weights' addresses,
    which a compiled, CUDA-graphed decode has recorded."""
    layers = [m for m in model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")]
    originals = []
    with torch.no_grad():
        for layer in layers:
            weight = layer.base_layer.weight
            originals.append(weight.detach().clone())
            delta = sum(layer.get_delta_weight(name).float() for name in layer.active_adapters)
            weight.copy_((weight.float() + delta).to(weight.dtype))
    try:
        with model.disable_adapter():
            yield
    finally:
        with torch.no_grad():
            for layer, original in zip(layers, originals):
                layer.base_layer.weight.copy_(original)


def picture_key(image):
    """A picture's identity for the vision cache: a digest of its pixels, size and mode."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(f"{image.size} {image.mode}".encode())
    return digest.hexdigest()


class VisionCache:
    """The vision tower's features of each distinct picture, computed once and reused: by the clue
    turns of every round and the judge's G samples (which see the same pictures), and, while the
    tower is frozen (LoRA trains the text model only), by the update's reference and policy passes.
    It replaces the model's get_image_features; a pass uses it only inside `expecting(keys)`, which
    names the pictures of the batch in order (picture_key), so any other pass encodes as before.
    Cleared by play_games at the start of every batch of games (memory), and whenever a tower
    parameter has changed in place since the features were computed (an optimiser step of a full
    fine-tune), so that no stale feature is ever used, and when it holds more than `most` pictures
    (1.3 MB each at 7B), so that scripts that never call play_games (vqa.py) stay bounded."""

    most = 1024

    def __init__(self, owner):
        self.owner, self.encode = owner, owner.get_image_features
        self.features, self.keys, self.weights_version = {}, None, None
        owner.get_image_features = self.image_features

    @contextmanager
    def expecting(self, keys):
        version = sum(p._version for p in self.owner.visual.parameters())  # bumped by every in-place update
        if version != self.weights_version or len(self.features) > self.most:
            self.features.clear()
            self.weights_version = version
        self.keys = list(keys)
        try:
            yield
        finally:
            self.keys = None

    def clear(self):
        self.features.clear()

    def image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        if self.keys is None:
            return self.encode(pixel_values, image_grid_thw, **kwargs)
        keys, self.keys = self.keys, None  # one pass per expecting(): the prefill, not the decode steps
        chunks = pixel_values.split(image_grid_thw.prod(-1).tolist())
        first = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        missing = [i for key, i in first.items() if key not in self.features]  # each distinct new picture once
        if missing:
            encoded = self.encode(torch.cat([chunks[i] for i in missing]), image_grid_thw[missing], **kwargs)
            for i, features in zip(missing, encoded.pooler_output):
                self.features[keys[i]] = features.detach()
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        return BaseModelOutputWithPooling(pooler_output=tuple(self.features[k] for k in keys))


def vision_cache(model):
    """The model's VisionCache, installed on first use; None for a model without get_image_features."""
    owner = next((m for m in model.modules() if "get_image_features" in type(m).__dict__ and hasattr(m, "visual")), None)
    if owner is None:
        return None
    if not isinstance(getattr(owner, "_vision_cache", None), VisionCache):
        owner._vision_cache = VisionCache(owner)
    return owner._vision_cache


def reused_vision(model, turns, cfg):
    """The context of an update pass of `model` over `turns`: the rollouts' picture features when
    the vision cache is on and the tower is frozen (LoRA on the text model: no gradient could reach
    it, so skipping it changes nothing); otherwise the tower runs as usual."""
    cache = vision_cache(model) if lever(cfg, "vision_cache", model) else None
    if cache is None or any(p.requires_grad for p in cache.owner.visual.parameters()):
        return ExitStack()
    return cache.expecting(picture_key(t.image) for t in turns)


def prefilled_once(model, inputs, turns, pictures):
    """The KV cache of a batch's prompts but their last token, each distinct (prompt, picture)
    prefilled once and copied to the rows that repeat it (the judge's G samples of a game), as the
    keyword generate takes it (`cache` in transformers 5, `past_key_values` in 4); None when
    no row repeats another, or for a model without Qwen-VL's image inputs. It also sets the model's
    3-D rotary offsets (rope_deltas) for every row, which generate reads when it finds a cache.
    pictures: the vision cache, or None."""
    keys = [(t.prompt, picture_key(t.image)) for t in turns]
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    if len(first) == len(keys) or "image_grid_thw" not in inputs:
        return None
    unique, position = list(first.values()), {key: j for j, key in enumerate(first)}
    rows = torch.tensor([position[key] for key in keys], device=model.device)
    chunks = inputs["pixel_values"].split(inputs["image_grid_thw"].prod(-1).tolist())
    prefix = {name: inputs[name][unique, :-1] for name in ("input_ids", "attention_mask", "mm_token_type_ids") if name in inputs}
    prefix.update(pixel_values=torch.cat([chunks[i] for i in unique]), image_grid_thw=inputs["image_grid_thw"][unique])
    with pictures.expecting(picture_key(turns[i].image) for i in unique) if pictures is not None else ExitStack():
        out = model(**prefix, use_cache=True, logits_to_keep=1)
    name = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
    kv = getattr(out, name)
    kv.batch_select_indices(rows)
    for module in model.modules():
        deltas = vars(module).get("rope_deltas")  # Qwen-VL keeps the prefill's offsets on its inner model
        if isinstance(deltas, torch.Tensor):
            module.rope_deltas = deltas[rows]
    return {name: kv}


def static_cache_length(width, max_new_tokens, step=256):
    """The static KV cache's length, rounded up so that calls with other prompt widths reuse one
    compiled decode (transformers keeps the largest length it has seen)."""
    return -(-(width + max_new_tokens) // step) * step


def generate(policy, processor, turns, cfg):
    """Sample one completion per turn (greedy when cfg.temperature is 0) in a single batched call;
    fills completion_ids, text and sampling_logps. Returns the number of tokens generated.
    The levers (lever()) change how, not what: merged LoRA weights, a static KV cache (compiled on
    CUDA), each distinct picture encoded once, each distinct prompt prefilled once (with the
    dynamic cache: the static one is sized and compiled by generate itself)."""
    model = policy.model
    inputs = models.processor_inputs(processor, [t.prompt for t in turns], [t.image for t in turns]).to(model.device)
    width = inputs["input_ids"].shape[1]
    settings = sampling_settings(model, processor, cfg)
    recorder = SampledLogprobs(settings.suppress_tokens, cfg.temperature or 1.0)
    settings.suppress_tokens = []  # the recorder suppresses them, after reading the raw logits
    sharded = distributed.is_sharded(model)
    static = lever(cfg, "static_cache", model) and not sharded
    if static:  # on CUDA generate compiles the decode step for it
        settings.cache_implementation = "static"
        settings.max_cache_len = static_cache_length(width, settings.max_new_tokens)
    with ExitStack() as context:
        context.enter_context(policy.active())
        context.enter_context(torch.no_grad())
        if policy.adapter and hasattr(model, "disable_adapter") and lever(cfg, "merged_rollouts", model):
            context.enter_context(merged_adapter(model))
        # not under FSDP2: a rank that skipped the tower would leave the others waiting in its all-gather
        cache = vision_cache(model) if lever(cfg, "vision_cache", model) and not sharded else None
        prefilled = None
        if lever(cfg, "shared_prefill", model) and not static and not sharded:
            prefilled = prefilled_once(model, inputs, turns, cache)
        if prefilled:  # the pictures are in the cache already: only the prompts' last tokens go in
            inputs = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
        elif cache is not None:
            context.enter_context(cache.expecting(picture_key(t.image) for t in turns))
        out = model.generate(**inputs, **(prefilled or {}), generation_config=settings, logits_processor=[recorder],
                             synced_gpus=sharded)  # FSDP2: ranks step together
    completions = out[:, width:]
    logps = recorder.logprobs(completions).tolist()
    stops, n_tokens = stop_ids(model), 0
    for turn, row, row_logps in zip(turns, completions.tolist(), logps):
        end = next((i + 1 for i, tok in enumerate(row) if tok in stops), len(row))
        turn.completion_ids = row[:end]  # the stop token is trained too: it decides the length
        turn.sampling_logps = row_logps[:end]
        turn.truncated = row[end - 1] not in stops
        turn.text = processor.tokenizer.decode(turn.completion_ids, skip_special_tokens=True)
        n_tokens += end
    return n_tokens


def completion_batch(processor, turns, device):
    """Model inputs for prompt + sampled completion, and the completion ids and mask [B, T].
    Prompts are left-padded, so every completion starts at the same column."""
    inputs = models.processor_inputs(processor, [t.prompt for t in turns], [t.image for t in turns])
    width = max(len(t.completion_ids) for t in turns)
    ids = torch.full((len(turns), width), processor.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(turns), width))
    for i, t in enumerate(turns):
        ids[i, : len(t.completion_ids)] = torch.tensor(t.completion_ids)
        mask[i, : len(t.completion_ids)] = 1
    inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], mask.long()], 1)
    inputs = models.extend_over_completion(inputs, ids)
    return inputs.to(device), ids.to(device), mask.to(device)


def sampling_logprob_batch(turns, device):
    """The sampling policy's log-probs of the turns' completion tokens, [B, T] as completion_batch
    lays them out (0 past a completion's end); None when a turn was not sampled by generate."""
    if any(t.sampling_logps is None for t in turns):
        return None
    width = max(len(t.completion_ids) for t in turns)
    return torch.tensor([t.sampling_logps + [0.0] * (width - len(t.sampling_logps)) for t in turns], device=device)


def token_logprobs(model, inputs, completion_ids, temperature=1.0, with_entropy=False):
    """log pi(token | prefix) of every completion token under softmax(logits / temperature), [B, T];
    the one log-prob computation used for the policy, the old policy and the reference. Pass the
    sampling temperature to score a rollout under the policy that sampled it (as TRL, verl and
    NeMo-RL do); 1.0 is the model's own distribution (supervised warm start). No KV cache: these
    passes never decode further, and the cache would cost ~57 KB per token at 7B shape.
    with_entropy=True also returns the entropy of that distribution at every completion
    position, [B, T], from the same logits (no gradient)."""
    width = completion_ids.shape[1]
    logits = model(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :-1].float() / temperature
    # gather - logsumexp: the same value as log_softmax without a second [B, T, vocab] tensor
    logp = logits.gather(2, completion_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return (logp, token_entropy(logits)) if with_entropy else logp


def token_entropy(logits, positions_per_chunk=16):
    """Entropy of softmax(logits) at every position, [B, T], as logsumexp(l) - sum(softmax(l) l).
    A diagnostic, computed without gradient and a few positions at a time, so that it never holds
    a second [B, T, vocab] tensor beside the logits."""
    entropies = []
    with torch.no_grad():
        for chunk in logits.detach().split(positions_per_chunk, dim=1):
            log_norm = torch.logsumexp(chunk, -1)
            entropies.append(log_norm - (torch.softmax(chunk, -1) * chunk).sum(-1))
    return torch.cat(entropies, 1)


# -----------------------------------------------------------------------------
# Playing a batch of games


def add_game_args(parser):
    """Flags of the game itself, shared by training and evaluation."""
    parser.add_argument("--players", type=int, default=4, help="players per game, one of them the spy (>= 3)")
    parser.add_argument("--rounds", type=int, default=2, help="clue rounds per game")
    parser.add_argument("--decision", choices=["judge", "civilians"], default="judge",
                        help="who decides: a neutral judge sampled G times (released code) or the civilians' votes (paper)")
    parser.add_argument("--samples", type=int, default=8, help="G: judge samples per game")
    parser.add_argument("--spy-image", choices=["modified", "blank"], default="modified",
                        help="what the spy sees: the edited image (v1, code) or an empty picture (v2 text)")
    parser.add_argument("--judge-prompt", choices=["full", "short"], default="full",
                        help="what a decision turn reads: the rules, task, clues and format (full, the paper's) or the "
                        "clues and 'Which player is the spy?' only (short)")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="longest clue or decision completion")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of every turn")
    parser.add_argument("--merged-rollouts", action=argparse.BooleanOptionalAction,
                        help="sample through the LoRA merged into the base weights (restored bit for bit after); default: on CUDA")
    parser.add_argument("--static-cache", action=argparse.BooleanOptionalAction,
                        help="static KV cache, with which generate compiles the decode step on CUDA; default: on CUDA")
    parser.add_argument("--vision-cache", action=argparse.BooleanOptionalAction,
                        help="encode each distinct picture once per batch of games and reuse it in the update while the "
                        "vision tower is frozen; default: on CUDA")
    parser.add_argument("--shared-prefill", action=argparse.BooleanOptionalAction,
                        help="prefill each distinct prompt of a call once (the judge's G samples) and copy its KV cache; "
                        "with --no-static-cache only; default: on CUDA")
    parser.add_argument("--domain", choices=sorted(DOMAIN_RULES),
                        help="game rules the pairs are played under (default: each pair's own domain from pairs.jsonl; "
                             "photo for a folder without pairs.jsonl, so give --domain clevr for the released CLEVR pairs)")


def check_game_args(cfg):
    if cfg.players < 3:
        sys.exit(f"error: --players {cfg.players}: the game needs at least 3 players (2 civilians and a spy)")
    if cfg.rounds < 1 or cfg.samples < 1 or cfg.max_new_tokens < 1 or cfg.temperature <= 0:
        sys.exit("error: --rounds, --samples (G), --max-new-tokens and --temperature must all be positive")


def blank_picture(image):
    """The empty picture the spy sees with --spy-image blank: white, the size of the original."""
    return Image.new("RGB", image.size, "white")


def play_games(pairs, spy_seats, sides, processor, cfg):
    """Play one game per pair, all games advancing together.

    sides[g] = (civilian Policy, spy Policy) of game g: the same policy twice in training; the
    trained and the reference model in evaluation. The civilians' policy also decides.
    Returns (games, generated token count).
    """
    games = [Game(pair=p, spy=s) for p, s in zip(pairs, spy_seats)]
    for policy in {id(side.model): side for pair_sides in sides for side in pair_sides}.values():
        if lever(cfg, "vision_cache", policy.model) and vision_cache(policy.model) is not None:
            vision_cache(policy.model).clear()  # the features of this batch's pictures only
    originals = [load_image(p["original"]) for p in pairs]
    spy_views = [blank_picture(im) if cfg.spy_image == "blank" else load_image(p["modified"])
                 for p, im in zip(pairs, originals)]
    n_tokens = 0

    def run(requests):  # requests: list of (game index, role, Turn); one generate call per policy
        nonlocal n_tokens
        for policy in {id(sides[g][r]): sides[g][r] for g, r, _ in requests}.values():
            turns = [t for g, r, t in requests if sides[g][r] is policy]
            n_tokens += generate(policy, processor, turns, cfg)

    for round_ in range(cfg.rounds):
        for seat in range(cfg.players):
            requests = []
            for g, game in enumerate(games):
                role = int(seat == game.spy)
                image = spy_views[g] if role else originals[g]
                requests.append((g, role, Turn(seat, round_, chat(processor, clue_prompt(game, seat, round_, cfg)), image)))
            run(requests)
            for g, _, turn in requests:
                turn.parsed = parse_clue(turn.text)
                games[g].clues.append(turn)

    requests = decision_requests(games, originals, processor, cfg)
    run(requests)
    for g, _, turn in requests:
        turn.parsed = parse_vote(turn.text, cfg.players)
        games[g].decisions.append(turn)
    return games, n_tokens


def decision_requests(games, pictures, processor, cfg):
    """The decision stage's turns, (game index, 0 = the civilians' side, Turn): the judge's G samples
    or the civilians' votes of every game, each seeing pictures[g] (the game's original in play)."""
    requests = []
    for g, game in enumerate(games):
        voters = [None] * cfg.samples if cfg.decision == "judge" else [s for s in range(cfg.players) if s != game.spy]
        for voter in voters:
            prompt = chat(processor, decision_prompt(game, voter, cfg))
            requests.append((g, 0, Turn(-1 if voter is None else voter, -1, prompt, pictures[g])))
    return requests


def decision_stats(games):
    """Fractions of all decision samples that name the spy (acc), abstain (na), or are unparsable."""
    votes = [(d.parsed, g.spy) for g in games for d in g.decisions]
    return {"acc": sum(v == spy for v, spy in votes) / len(votes),
            "na": sum(v == "N/A" for v, _ in votes) / len(votes),
            "invalid_vote_rate": sum(v is None for v, _ in votes) / len(votes)}


def game_record(game, cfg, **extra):
    """A game as one JSON line: every clue and vote, the pair it was played on and the spy's seat."""
    return {
        **extra,
        "pair_id": game.pair["id"], "domain": game.domain, "original": game.pair["original"],
        "modified": game.pair["modified"], "changes": game.pair.get("changes", []),
        "spy_image": cfg.spy_image, "spy": game.spy, "votes": game.votes(cfg.players),
        "spy_found": game.spy_found(cfg.players),
        "players": [{"seat": s, "role": ROLE_NAMES[s == game.spy], "reward": game.rewards and game.rewards[s],
                     "advantage": game.advantages and game.advantages[s]} for s in range(cfg.players)],
        "clues": [{"round": t.round, "seat": t.seat, "role": ROLE_NAMES[t.seat == game.spy],
                   "reasoning": t.reasoning, "clue": t.parsed, "tokens": len(t.completion_ids)}
                  for t in game.clues],
        "decisions": [{"voter": "judge" if t.seat < 0 else t.seat, "text": t.text, "vote": t.parsed,
                       "tokens": len(t.completion_ids), "reward": t.reward, "advantage": t.advantage}
                      for t in game.decisions],
    }
