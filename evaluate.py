"""
evaluate.py: the trained model against the frozen initial model, on held-out games (paper Sec. 4.4).

Half of the games seat the trained model as the civilians and the reference as the spy, the other
half the other way round. The civilians' side also decides (its judge, or its civilians' votes)
and wins when the spy's seat gets the most votes; the spy's side wins otherwise. The pairs come
from the held-out split of the data folder (read_pairs(..., "eval"): never used in training).

    python evaluate.py --out runs/demo                 # model, data and game flags from the run
    python evaluate.py --out runs/demo --games 100 --data games/clevr

Writes OUT/eval.json: games, win_rate (of the trained model; 0.5 = no better than the start),
the win rate on each side, the decision accuracy and N/A rate of each model when it decides.
The games the trained model decided are then played once more by the initial model on both
sides: decision_acc_baseline is the start's accuracy in exactly those games (pairs and spy
seats), so decision_acc - decision_acc_baseline is what training changed; chance (1 / players),
the standard errors of both over games and the win rate's 95% Wilson interval say how sure it is. In the cells game with
the edited picture, decision_acc_colour_check is the ceiling of those same games: the accuracy of a
judge that checks each clue's colour words against its picture (colour_check_accuracy).
decision_acc_wrong_picture is the control that shows whether the trained judge looks: the same
judge in the same games (clues and spy seats) seeing the original picture of another held-out
pair instead of the game's own. A judge that reads only the clues scores the same as
decision_acc; one that checks the clues against its picture scores lower. In the cells game,
heldout_yes_no and heldout_yes_no_reference are the trained and the initial model's accuracy on
warm_start.py's 400 held-out "is there a <colour> square?" questions.
"""
import argparse
import json
import math
import os
import random
import sys

import torch
from tqdm import tqdm

import cli
import models
import selfplay
import checkpoints
import trainer
import warm_start
from make_games import cells_colours, colours_named


def colour_check_accuracy(games, n_players):
    """Expected accuracy of a judge that checks every clue against its picture (the original): it
    names a seat whose clues name a colour its picture lacks, at random among such seats, or any
    seat at random when no clue is false. The most a judge can reach from what it sees and hears
    in the cells game; it misses when the spy only names colours its edited picture shares with
    the original (the spy's copy keeps one of its three squares)."""
    right = 0.0
    for game in games:
        present = set(cells_colours(game.pair)[0])
        false = {c.seat for c in game.clues if colours_named(c.parsed) - present}
        right += (game.spy in false) / len(false) if false else 1 / n_players
    return right / len(games)


def per_game_se(games):
    """Standard error of a decision accuracy over games: the judge samples of one game share its
    clues, so the game, not the sample, is the independent unit."""
    accuracies = [selfplay.decision_stats([g])["acc"] for g in games]
    if len(accuracies) < 2:
        return None
    mean = sum(accuracies) / len(accuracies)
    return math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1) / len(accuracies))


def wilson_interval(wins, n, z=1.96):
    """95% Wilson score interval of a win rate of `wins` in `n` games."""
    rate = wins / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def uncertainty(as_civilians, replayed, wins, n_games, n_players):
    """What the headline numbers mean against chance: a judge voting at random is right 1 / players
    of the time; standard errors of both accuracies over games; the win rate's 95% interval."""
    return {"chance": 1 / n_players, "decision_acc_se": per_game_se(as_civilians),
            "decision_acc_baseline_se": per_game_se(replayed), "win_rate_ci95": wilson_interval(wins, n_games)}
def other_pairs(games, pairs, rng):
    """For each game a held-out pair other than its own (by id), uniformly: whose picture its judge
    sees in the wrong-picture control."""
    chosen = []
    for game in games:
        others = [p for p in pairs if p["id"] != game.pair["id"]]
        if not others:
            sys.exit("error: the wrong-picture control needs at least 2 held-out pairs; make more pairs")
        chosen.append(rng.choice(others))
    return chosen


def wrong_picture_accuracy(games, pairs, policy, processor, cfg, seed, batch):
    """Decision accuracy of `policy` in `games` (their clues and spy seats) when its judge or voters
    see another held-out pair's original picture (other_pairs) instead of the game's own."""
    replays = [selfplay.Game(pair=g.pair, spy=g.spy, clues=g.clues) for g in games]
    pictures = [selfplay.load_image(p["original"]) for p in other_pairs(games, pairs, random.Random(seed))]
    torch.manual_seed(seed)
    for start in range(0, len(replays), batch):
        requests = selfplay.decision_requests(replays[start:start + batch], pictures[start:start + batch], processor, cfg)
        selfplay.generate(policy, processor, [turn for _, _, turn in requests], cfg)
        for g, _, turn in requests:
            turn.parsed = selfplay.parse_vote(turn.text, cfg.players)
            replays[start + g].decisions.append(turn)
    return selfplay.decision_stats(replays)["acc"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--out", required=True, help="run folder of a training run (its latest checkpoint is evaluated)")
    p.add_argument("--data", help="pairs folder (default: the run's); only its held-out split is played")
    p.add_argument("--games", type=int, default=100, help="games to play, half with the trained model as the civilians")
    p.add_argument("--batch", type=int, default=16, help="games played together in one batch")
    p.add_argument("--seed", type=int, default=1234, help="seed of pairs, spy seats and sampling")
    p.add_argument("--max-new-tokens", type=int, help="override the run's longest completion")
    args = p.parse_args()
    if args.games < 2 or args.batch < 1:
        p.error("--games must be at least 2 (one game per side) and --batch at least 1")
    checkpoint, _, note = checkpoints.resume_point(args.out)
    if note:
        print(note)
    cfg = checkpoints.load_run_config(args.out)
    if checkpoint is None or cfg is None:
        sys.exit(f"error: {args.out} holds no trained checkpoint; train first with `bash run.sh`")
    cfg.data = args.data or cfg.data
    cfg.max_new_tokens = args.max_new_tokens or cfg.max_new_tokens
    # the held-out split is small: decode all of it now rather than drop games from a batch
    pairs = selfplay.decodable_pairs(selfplay.read_pairs(cfg.data, "eval", domain=getattr(cfg, "domain", None)))
    if not pairs:
        sys.exit(f"error: no held-out pairs in {cfg.data} (about 10% of the ids are held out); make more pairs")

    trained, reference, processor = trainer.evaluation_policies(cfg, checkpoint)
    rng = random.Random(args.seed)
    order = [pairs[k % len(pairs)] for k in range(args.games)]
    trained_civilians = [k % 2 == 0 for k in range(args.games)]  # alternate sides: half and half
    spy_seats = [rng.randrange(cfg.players) for _ in order]

    def play(indices, sides_of, desc):  # games `indices` in batches; sides_of(k) = (civilians, spy) of game k
        games = []
        for start in tqdm(range(0, len(indices), args.batch), desc=desc, unit="batch"):
            batch = indices[start:start + args.batch]
            torch.manual_seed(args.seed + batch[0])  # reproducible, whatever ran before
            played, _ = selfplay.play_games([order[k] for k in batch], [spy_seats[k] for k in batch],
                                            [sides_of(k) for k in batch], processor, cfg)
            games += played
        return games

    games = play(list(range(args.games)), lambda k: (trained, reference) if trained_civilians[k] else (reference, trained),
                 "evaluate")

    as_civilians = [g for g, t in zip(games, trained_civilians) if t]
    as_spy = [g for g, t in zip(games, trained_civilians) if not t]
    civilian_wins = sum(g.spy_found(cfg.players) for g in as_civilians)
    spy_wins = sum(not g.spy_found(cfg.players) for g in as_spy)
    trained_stats, reference_stats = selfplay.decision_stats(as_civilians), selfplay.decision_stats(as_spy)
    # the trained civilians' games replayed by the initial model alone: the accuracy it started from
    replayed = play([k for k in range(args.games) if trained_civilians[k]], lambda k: (reference, reference), "baseline")
    wrong_picture = wrong_picture_accuracy(as_civilians, pairs, trained, processor, cfg, args.seed, args.batch)
    seeing = {}
    if all(g.domain == "cells" for g in games):  # the yes/no check needs the generator's scene records
        try:
            questions = warm_start.held_out_questions(*warm_start.cells_pairs(cfg.data, "eval"), 0)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            questions = []
        if questions:
            eos = models.stop_token_id(processor)
            for key, policy in (("heldout_yes_no", trained), ("heldout_yes_no_reference", reference)):
                with policy.active():
                    seeing[key] = warm_start.attribute_accuracy(policy.model, processor, questions, eos)
                policy.model.eval()
    ceiling = None  # only the cells game with the edited picture has one
    if cfg.spy_image == "modified" and all(g.domain == "cells" for g in games):
        try:
            ceiling = colour_check_accuracy(as_civilians, cfg.players)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            print("note: these cells pairs lack make_games.py's scene records (source objects): no colour-check ceiling")
    result = {
        "games": len(games), "win_rate": (civilian_wins + spy_wins) / len(games),
        "win_rate_civilian_side": civilian_wins / len(as_civilians), "win_rate_spy_side": spy_wins / len(as_spy),
        "decision_acc": trained_stats["acc"], "decision_acc_reference": reference_stats["acc"],
        "na_rate": trained_stats["na"], "na_rate_reference": reference_stats["na"],
        "invalid_vote_rate": trained_stats["invalid_vote_rate"],
        "decision_acc_baseline": selfplay.decision_stats(replayed)["acc"],
        "decision_acc_colour_check": ceiling, "decision_acc_wrong_picture": wrong_picture, **seeing,
        "trained": checkpoint, "reference": cfg.model, "data": cfg.data, "held_out_pairs": len(pairs),
        "seed": args.seed,
    }
    result.update(uncertainty(as_civilians, replayed, civilian_wins + spy_wins, len(games), cfg.players))
    checkpoints.write_json_atomic(os.path.join(args.out, "eval.json"), result)
    with open(os.path.join(args.out, "eval_games.jsonl"), "w") as f:
        for game, t in zip(games, trained_civilians):
            f.write(json.dumps(selfplay.game_record(game, cfg, trained_side="civilians" if t else "spy")) + "\n")
    print(f"win rate {result['win_rate']:.3f} over {len(games)} held-out games "
          f"(as civilians {result['win_rate_civilian_side']:.3f}, as spy {result['win_rate_spy_side']:.3f}); "
          f"decision accuracy {result['decision_acc']:.3f} vs reference {result['decision_acc_reference']:.3f}"
          f" (the initial model in the same games: {result['decision_acc_baseline']:.3f}; the trained judge "
          f"seeing another game's picture: {wrong_picture:.3f}); "
          f"written to {os.path.join(args.out, 'eval.json')}")


if __name__ == "__main__":
    main()
