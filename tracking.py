"""
tracking.py: optional experiment trackers, for those who follow runs as with TRL, verl or EasyR1.

    bash run.sh                                   # REPORT_TO=none: metrics.jsonl and report.html only
    REPORT_TO=tensorboard bash run.sh             # + OUT/tensorboard; view: tensorboard --logdir OUT/tensorboard
    REPORT_TO=wandb bash run.sh                   # + a wandb run (WANDB_MODE=offline: OUT/wandb, `wandb sync` later)
    REPORT_TO=trackio bash run.sh                 # + a local trackio project "vision-zero"; view: trackio show
    python rlvr.py ... --report-to tensorboard    # the same flag on the stage scripts

What each tracker gets, once per iteration from trainer.py on rank 0 only:
  - every number of the iteration's metrics.jsonl line under its own name (`acc`, `acc_ema`,
    `loss`, `lr`, ...; true/false as 1/0), at step = iteration;
  - a table of the first GAMES_LOGGED games: the civilians' and the spy's pictures, the clues round
    by round, the votes, the spy's seat and whether it was found;
  - and, when a stage script starts, the run's resolved config (config.json).
The run is named after OUT; the stage scripts that run.sh alternates log into the same run
(wandb resumes the id kept in OUT/tracking.json). The tracker packages are not requirements of the
project: a missing one ends the script in one line that says what to install.
"""
import json
import os
import sys
import uuid

import numpy as np
from PIL import Image

TRACKERS = ("none", "tensorboard", "wandb", "trackio")
PROJECT = "vision-zero"  # the wandb and trackio project
GAMES_LOGGED = 4  # games per iteration in the games table
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def add_args(parser):
    parser.add_argument("--report-to", choices=TRACKERS, default="none",
                        help="also log metrics, learning rate, config and a table of games to this tracker "
                        "(its package must be installed; see tracking.py)")


def scalars(metrics):
    """The numbers of a metrics.jsonl line under their names (true/false as 1/0); strings such as
    `stage` are left out, `iteration` is the step."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and k != "iteration"}


def clue_text(record):
    """A game's clues, one line per clue: 'round 1, player 2 (spy): a red square'."""
    return "\n".join(f"round {c['round'] + 1}, player {c['seat'] + 1} ({c['role']}): {c['clue']}"
                     for c in record["clues"])


def vote_text(record):
    """A game's votes per seat, the spy marked: 'player 1: 0, player 2 (spy): 5, ...'."""
    return ", ".join(f"player {seat + 1}{' (spy)' if seat == record['spy'] else ''}: {count}"
                     for seat, count in enumerate(record["votes"]))


def pictures(record):
    """(what the civilians see, what the spy sees) as RGB arrays of one size (imported photo pairs
    may differ: the spy's is resized), so that they sit side by side; the blank picture as white."""
    with Image.open(record["original"]) as image:
        original = image.convert("RGB")
    if record.get("spy_image") == "blank":
        return np.asarray(original), np.full_like(np.asarray(original), 255)
    with Image.open(record["modified"]) as image:
        return np.asarray(original), np.asarray(image.convert("RGB").resize(original.size))


class Tracker:
    """One tracker for one stage script's process. log() each iteration; close() at the end."""

    def __init__(self, kind, out, config):
        self.kind, self.name = kind, os.path.basename(os.path.abspath(out))
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=os.path.join(out, "tensorboard"))
                self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in config.items()))
            elif kind == "wandb":
                import wandb
                self.backend = wandb
                wandb.init(project=PROJECT, name=self.name, id=run_id(out), resume="allow", dir=out, config=config)
            elif kind == "trackio":
                import trackio
                self.backend = trackio
                trackio.init(project=PROJECT, name=self.name, config=config, resume="allow")
        except ImportError:
            sys.exit(f"error: --report-to {kind} needs the {PACKAGES[kind]} package: pip install {PACKAGES[kind]} "
                     f"(or REPORT_TO=none)")

    def log(self, metrics, records):
        """One iteration: its metrics line and the records (selfplay.game_record) of its games."""
        step, numbers, shown = metrics["iteration"], scalars(metrics), records[:GAMES_LOGGED]
        rows = [[g + 1, *pictures(r), clue_text(r), vote_text(r), r["spy"] + 1, r["spy_found"]]
                for g, r in enumerate(shown)]
        columns = ["game", "civilians see", "spy sees", "clues", "votes", "spy (player)", "spy found"]
        if self.kind == "tensorboard":
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
            for row in rows:
                self.writer.add_image(f"games/{row[0]}", np.concatenate([row[1], row[2]], axis=1), step, dataformats="HWC")
            table = "| " + " | ".join(c for c in columns if c not in ("civilians see", "spy sees")) + " |\n|---|---|---|---|---|\n"
            table += "".join(f"| {row[0]} | {row[3].replace(chr(10), '<br>')} | {row[4]} | {row[5]} | {row[6]} |\n" for row in rows)
            self.writer.add_text("games", table, step)
            self.writer.flush()
        elif self.kind in ("wandb", "trackio"):
            backend = self.backend
            data = [[row[0], backend.Image(row[1]), backend.Image(row[2]), *row[3:]] for row in rows]
            backend.log({**numbers, "games": backend.Table(columns=columns, data=data)}, step=step)

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind in ("wandb", "trackio"):
            self.backend.finish()


def open_tracker(kind, out, config):
    """A Tracker, or None for --report-to none."""
    return None if kind == "none" else Tracker(kind, out, config)


def run_id(out):
    """The wandb run id of a run folder, made once and kept in OUT/tracking.json, so that every
    stage script of the run logs into the same wandb run."""
    path = os.path.join(out, "tracking.json")
    try:
        with open(path) as f:
            return json.load(f)["wandb_id"]
    except (OSError, ValueError, KeyError, TypeError):
        run = uuid.uuid4().hex[:12]
        with open(path + ".tmp", "w") as f:
            json.dump({"wandb_id": run}, f)
        os.replace(path + ".tmp", path)
        return run
