"""
checkpoints.py: what a run folder holds between iterations, written so that a kill at any moment
or a damaged file later never loses the run.

  OUT/ckpt-NNNNNN/   the LoRA adapter or the whole model (safetensors), the processor,
                     optimizer.pt, and state.json (iteration, stage, EMAs, RAE baselines) written
                     last; the two newest complete checkpoints are kept
  OUT/latest         the newest checkpoint's name, moved by an atomic rename after the folder was
                     written and read back
  OUT/config.json    the resolved flags of the run
  OUT/metrics.jsonl  one line per iteration; lines after the checkpoint are dropped on resume

On resume, the newest checkpoint that reads back whole is used (resume_point); run.sh asks the
same function where the run stands (`python -c "import checkpoints; print(checkpoints.progress(OUT))"`).
Before anything, run.sh has check_run_folder refuse an OUT that holds files no run wrote, or a
run of another MODEL or DATA, so that it never writes over somebody else's folder.
"""
import argparse
import json
import os
import re
import shutil
import sys

import torch

import distributed
import jsonl
import models

CHECKPOINT_NAME = re.compile(r"ckpt-(\d+)")
# what the project writes into a run folder: trainer.py, evaluate.py, vqa.py, report.py, the
# trackers of tracking.py, and the .tmp files of atomic writes
RUN_FOLDER_NAMES = re.compile(r"config\.json|metrics\.jsonl|games|latest|ckpt-\d+|eval\.json|eval_games\.jsonl|"
                              r"vqa\.json|vqa_questions\.jsonl|vqa_answers\.jsonl|report\.html|curves\.png|"
                              r"tensorboard|wandb|tracking\.json|.*\.tmp")


def load_run_config(out):
    """The config.json a training run wrote, as the namespace the scripts use (dtype a torch dtype);
    None when out is not a run folder."""
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):  # cut or unreadable: not a config this run can be read from
        return None
    if not isinstance(saved, dict) or not {"model", "lora_rank", "dtype"} <= set(saved):  # e.g. a model folder's config.json
        return None
    cfg = argparse.Namespace(**saved)
    cfg.dtype = getattr(torch, cfg.dtype.replace("torch.", ""))
    cfg.gradient_checkpointing = False  # only training needs it
    return cfg


def run_folder_problem(out, model, data):
    """None when `out` may be used as the run folder of MODEL on DATA: missing, empty, or a run of
    the same model and data; otherwise one line that says why not and what to do. Hidden files
    (an editor's, the OS's) are ignored."""
    names = sorted(n for n in (os.listdir(out) if os.path.isdir(out) else []) if not n.startswith("."))
    foreign = [n for n in names if not RUN_FOLDER_NAMES.fullmatch(n)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"{out} holds files no run wrote ({shown}); choose another OUT, or empty it if it is yours to lose"
    if "config.json" not in names:
        return None
    cfg = load_run_config(out)
    if cfg is None:
        return f"{out}/config.json is not a run's config; choose another OUT"
    differ = [f"{name}={given}" for name, saved, given in
              [("MODEL", getattr(cfg, "model", None), model), ("DATA", getattr(cfg, "data", None), data)]
              if given and os.path.normpath(str(saved)) != os.path.normpath(given)]
    if differ:
        return (f"{out} is a run of MODEL={cfg.model} on DATA={cfg.data}, and this command gives {' and '.join(differ)}; "
                f"resume it with the same MODEL and DATA, or choose another OUT")
    return None


def check_run_folder(out, model, data):
    """run_folder_problem as run.sh uses it: one line on stderr and exit status 1."""
    problem = run_folder_problem(out, model, data)
    if problem:
        sys.exit(f"error: {problem}")


def write_json_atomic(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def checkpoint_problem(folder):
    """(state, None) when a checkpoint folder reads back whole, else (None, what is wrong). Cheap
    at any model size: safetensors headers are checked against the file sizes and optimizer.pt is
    memory-mapped, so a truncated or empty file is found without reading the weights."""
    from safetensors import safe_open
    try:
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
        if not (isinstance(state, dict) and isinstance(state.get("iteration"), int) and isinstance(state.get("stage"), str)):
            return None, "state.json holds no iteration and stage"
    except (OSError, ValueError) as e:
        return None, f"state.json unreadable ({type(e).__name__})"
    weights = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if not weights:
        return None, "no weights (*.safetensors)"
    index = os.path.join(folder, "model.safetensors.index.json")  # a model saved in shards
    if os.path.exists(index):
        try:
            with open(index) as f:
                missing = set(json.load(f)["weight_map"].values()) - set(weights)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return None, f"model.safetensors.index.json unreadable ({type(e).__name__})"
        if missing:
            return None, f"weight shards missing ({', '.join(sorted(missing))})"
    for name in weights:
        try:
            with safe_open(os.path.join(folder, name), "pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error type for a damaged file
            return None, f"{name} unreadable ({str(e).splitlines()[0][:80]})"
    try:
        torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True, mmap=True, map_location="cpu")
    except Exception as e:  # a missing, empty or truncated file: OSError or RuntimeError
        return None, f"optimizer.pt unreadable ({type(e).__name__})"
    return state, None


def checkpoint_folders(out):
    """The ckpt-NNNNNN folders of a run folder, newest first, as (iteration, name)."""
    found = [(int(m.group(1)), name) for name in (os.listdir(out) if os.path.isdir(out) else [])
             if (m := CHECKPOINT_NAME.fullmatch(name)) and os.path.isdir(os.path.join(out, name))]
    return sorted(found, reverse=True)


def resume_point(out):
    """(folder, state, note) of the newest checkpoint of a run folder that reads back whole;
    (None, None, None) for a run not started. The note (None when all is well) is one line that
    names the damaged newer checkpoints and the iterations that will be redone. A run folder
    with checkpoints, none of them usable, ends the program with one line that says what to do."""
    pointer, claimed = os.path.join(out, "latest"), []
    if os.path.exists(pointer):  # `latest` names the last checkpoint saved; it may be empty or stale
        try:
            with open(pointer) as f:
                named = f.read().strip()
        except OSError:
            named = ""
        m = CHECKPOINT_NAME.fullmatch(named)
        if m is None:
            claimed.append((0, "latest is empty or unreadable"))
        elif not os.path.isdir(os.path.join(out, named)):
            claimed.append((int(m.group(1)), f"latest names {named}, which is missing"))
    for iteration, name in checkpoint_folders(out):
        state, problem = checkpoint_problem(os.path.join(out, name))
        if problem is None:
            redo = max([k for k, _ in claimed], default=0)
            damaged = "; ".join(why for _, why in claimed)
            redone = f"iteration {redo}" if redo == iteration + 1 else f"iterations {iteration + 1}-{redo}"
            note = (f"{out}: {damaged}; resuming from {name}" + (f", {redone} will be redone" if redo > iteration else "")
                    if claimed else None)
            return os.path.join(out, name), state, note
        claimed.append((iteration, f"{name} is damaged ({problem})"))
    if claimed:
        sys.exit(f"error: no usable checkpoint in {out} ({'; '.join(why for _, why in claimed)}); "
                 f"start again with another --out, or delete {out} to restart this run from iteration 0")
    return None, None, None


def progress(out):
    """'iteration stage' of the checkpoint a resume would start from, or '0 start': what run.sh
    reads between stages, so that it sees exactly what the stage scripts will resume from."""
    _, state, _ = resume_point(out)
    return f"{state['iteration']} {state['stage']}" if state else "0 start"


def save_checkpoint(out, policy, processor, optimizer, state):
    """Write ckpt-NNNNNN completely, check that it reads back, point `latest` at it (an atomic
    rename), then drop every other checkpoint folder but the newest good older one: a crash at
    any moment, or a newest checkpoint damaged later, leaves a whole checkpoint to resume from.
    Every rank calls it (FSDP2 gathers the shards); rank 0 alone writes."""
    weights, optimizer_state = distributed.full_states(policy.model, optimizer)
    if not distributed.is_main():
        return
    name = f"ckpt-{state['iteration']:06d}"
    folder = os.path.join(out, name)
    shutil.rmtree(folder, ignore_errors=True)  # a leftover of a crash before `latest` moved
    distributed.save_pretrained(policy.model, folder, weights)  # safetensors: the LoRA adapter, or the whole model
    if os.path.exists(os.path.join(folder, "generation_config.json")):  # a whole model: its decoding defaults
        models.write_generation_config(policy.model, folder)
    processor.save_pretrained(folder)
    torch.save(optimizer_state, os.path.join(folder, "optimizer.pt"))
    write_json_atomic(os.path.join(folder, "state.json"), state)  # last: its presence marks a whole folder
    _, problem = checkpoint_problem(folder)
    if problem:
        sys.exit(f"error: the checkpoint just written, {folder}, does not read back ({problem}); "
                 "the previous one is kept: free some disk space and rerun to resume")
    with open(os.path.join(out, "latest.tmp"), "w") as f:
        f.write(name)
    os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
    older = [n for k, n in checkpoint_folders(out) if k < state["iteration"]]
    previous = next((n for n in older if checkpoint_problem(os.path.join(out, n))[1] is None), None)
    for _, other in checkpoint_folders(out):  # older ones, damaged ones, empty leftovers of a kill
        if other not in (name, previous):
            shutil.rmtree(os.path.join(out, other), ignore_errors=True)


def clue_iterations_logged(path, last_iteration):
    """How many clue iterations metrics.jsonl records up to last_iteration: the role baselines'
    update count of a checkpoint written before the count was kept (one update per clue iteration)."""
    if not os.path.exists(path):
        return 0
    return sum(1 for m in jsonl.read_jsonl(path) if m.get("stage") == "clue"
               and isinstance(m.get("iteration"), int) and m["iteration"] <= last_iteration)


def trim_log(path, last_iteration):
    """Keep the metric lines of iterations up to the checkpoint's: drops those logged after it (a
    crash between log and save) and a line cut short by a kill while it was written."""
    if not os.path.exists(path):
        return
    rows = [row for row in jsonl.read_jsonl(path)
            if isinstance(row.get("iteration"), int) and row["iteration"] <= last_iteration]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)
