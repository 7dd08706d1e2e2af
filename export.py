"""
export.py: turn a training run into a plain Hugging Face model folder, for benchmark tools.

    python export.py runs/clevr-qwen7b --to exported/clevr-qwen7b            # bf16 weights
    python export.py runs/cpu-demo --to exported/cpu-demo --dtype float32

Takes the run's latest checkpoint. A LoRA run's adapter is merged into the base model (the run's
--model) with peft's merge_and_unload, in float32, then cast to --dtype; a full fine-tune's weights
are re-saved in --dtype. The folder holds config.json, generation_config.json (the initial model's
decoding defaults: training samples without them, the exported model keeps them), safetensors weights,
the tokenizer, the processor and its chat template, and no adapter or optimiser files: it loads
with AutoModelForImageTextToText / AutoProcessor.from_pretrained without peft, and vLLM, lmms-eval
and VLMEvalKit take it as a local model path (docs/benchmarks.md has their commands).

On a machine without torchvision the project plays most families with an image-only stand-in of
their processor class (models.py); the export names the family's stock processor class instead
(Qwen2_5_VLProcessor, InternVLProcessor, ...), in the layout of a released folder (a flat
preprocessor_config.json), so that the stock classes load it on a machine with torchvision.

The folder also carries a model card, README.md in the Hugging Face Hub's format (model_card():
YAML front matter with base_model, library_name, pipeline_tag and tags; the method, data and
iterations from config.json and metrics.jsonl; the in-game results from eval.json and the
questions about held-out pictures from vqa.json; the command that trained it), so that it can be
pushed to the Hub as it is.

The folder is written under a temporary name next to --to and renamed when complete: an error or
a crash never leaves a half-written model at --to.
"""
import argparse
import json
import os
import re
import shutil
import sys

import torch

import cli
import checkpoints
import jsonl
import models
import report
import trainer

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def read_result(run, name):
    """A run's eval.json or vqa.json as a dict; {} when it is missing or unreadable."""
    found, _ = report.read_json(os.path.join(run, name))
    return found if isinstance(found, dict) else {}


def model_card(run, cfg, target, dtype, model_type):
    """README.md of the exported folder: a Hub model card (see the module docstring)."""
    evaluation, vqa = read_result(run, "eval.json"), read_result(run, "vqa.json")
    log = os.path.join(run, "metrics.jsonl")  # a run folder that lost its log still exports, with no stage counts
    metrics = [row for row in jsonl.read_jsonl(log) if isinstance(row.get("stage"), str)] if os.path.exists(log) else []
    stages = {stage: sum(row["stage"] == stage for row in metrics) for stage in ("decision", "clue")}
    on_hub = HUB_ID.fullmatch(str(cfg.model)) and not os.path.exists(cfg.model)  # the Hub accepts only its own ids here
    front = ["---", *([f"base_model: {cfg.model}"] if on_hub else []), "library_name: transformers",
             "pipeline_tag: image-text-to-text", "tags:", "- vision-zero", "- self-play", "- reinforcement-learning",
             f"- {model_type}", "---"]
    tuning = f"LoRA rank {cfg.lora_rank}, merged into the weights" if cfg.lora_rank > 0 else "full fine-tuning"
    spy_sees = "a blank picture" if cfg.spy_image == "blank" else "an edited copy of the picture"
    lines = [
        *front, "", f"# {os.path.basename(os.path.abspath(target))}", "",
        f"`{cfg.model}` trained by self-play in \"Who is the spy?\" with pictures, the method of Vision-Zero "
        "(Wang et al., arXiv 2509.25541), with the vision-zero code. No human labels: the game scores itself.", "",
        "## Training", "",
        f"- method: Iterative-SPO, schedule `{cfg.schedule}`: {stages['decision']} decision-stage iterations (RLVR on "
        f"the judge's vote) and {stages['clue']} clue-stage iterations (SPO with role advantage estimation); {tuning}; "
        f"learning rate {cfg.lr:g}, KL weight {cfg.kl:g}",
        f"- data: `{cfg.data}` ({getattr(cfg, 'domain', None) or 'domain per pair'}); {cfg.players} players, "
        f"{cfg.rounds} clue round(s); the spy sees {spy_sees}; {cfg.games} games per iteration",
        f"- iterations: {len(metrics)}; weights saved as {str(dtype).replace('torch.', '')}",
        f"- command: `{getattr(cfg, 'command', 'not recorded (a run from before the command was kept)')}` "
        f"(run.sh alternates rlvr.py and spo.py with these flags); exported with `python export.py {run} --to {target}`",
        "", "## Results in the game (evaluate.py, held-out pairs)", ""]
    title, sentences = report.headline(evaluation, vars(cfg), metrics)
    lines += [f"**{title}**", "", *[f"- {text}" for text in sentences], ""]
    if evaluation:
        lines += ["| eval.json | value | meaning |", "|---|---|---|"]
        lines += [f"| `{key}` | {json.dumps(value)} | {report.EVAL_FIELDS.get(key, '')} |" for key, value in evaluation.items()]
    lines += ["", "## Questions about held-out pictures (vqa.py)", ""]
    overall = vqa.get("overall")
    if isinstance(overall, dict) and isinstance(vqa.get("kinds"), dict):
        models = list(vqa.get("models") or {})
        lines += ["| kind | questions | chance | " + " | ".join(models) + " | difference |", "|---" * (len(models) + 4) + "|"]
        for kind, row in [*vqa["kinds"].items(), ("overall", overall)]:
            scores = [f"{row[m]['accuracy']:.3f} ± {row[m]['se']:.3f}" if isinstance(row.get(m), dict) else "" for m in models]
            chance = f"{row['chance']:.3f}" if isinstance(row.get("chance"), (int, float)) else ""
            difference = (f"{row['difference']:.3f} ± {row['se_difference']:.3f}"
                          if isinstance(row.get("difference"), (int, float)) else "")
            lines.append(f"| {kind} | {row.get('questions')} | {chance} | " + " | ".join(scores) + f" | {difference} |")
        if report.vqa_not_taught(vqa):
            lines += ["", "The initial model answers these no better than chance: it was never taught to answer such "
                      "questions, so the table measures nothing about seeing here."]
    else:
        lines.append("Not measured in this run (no vqa.json).")
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForImageTextToText, AutoProcessor",
              f'model = AutoModelForImageTextToText.from_pretrained("{target}")',
              f'processor = AutoProcessor.from_pretrained("{target}")', "```", "",
              "## Citation", "", "```bibtex", "@inproceedings{wang2026visionzero,",
              "  title = {Vision-Zero: Scalable {VLM} Self-Improvement via Strategic Gamified Self-Play},",
              "  author = {Wang, Qinsi and others}, booktitle = {ICLR}, year = {2026}, eprint = {2509.25541}", "}", "```", ""]
    return "\n".join(lines)


def export(run, target, dtype):
    """Write the run's latest checkpoint as a plain model folder at target (see the docstring)."""
    cfg = checkpoints.load_run_config(run)
    if cfg is None:
        sys.exit(f"error: {run} is not a training run (no config.json); give the --out folder of rlvr.py, spo.py or run.sh")
    checkpoint, _, _ = checkpoints.resume_point(run)  # the newest checkpoint that reads back whole
    if checkpoint is None or not os.path.isdir(checkpoint):
        sys.exit(f"error: {run} has no checkpoint yet; train it first (`bash run.sh` with OUT={run})")
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        sys.exit(f"error: {target} already exists and is not empty; remove it or choose another --to")

    cfg.device, cfg.dtype = "cpu", torch.float32  # merge in full precision, cast once at the end
    policy, processor = trainer.build_policy(cfg, checkpoint)
    model = policy.model.merge_and_unload() if cfg.lora_rank > 0 else policy.model
    model = model.to(dtype)

    staging = os.path.join(os.path.dirname(os.path.abspath(target)), f".{os.path.basename(os.path.abspath(target))}.exporting")
    shutil.rmtree(staging, ignore_errors=True)  # the leftover of an export that crashed
    try:
        model.save_pretrained(staging)  # config, generation_config, safetensors weights
        models.write_generation_config(model, staging)  # the initial checkpoint's decoding defaults, not training's
        processor.save_pretrained(staging)  # tokenizer, image processor, chat template
        models.write_stock_processor_files(staging, checkpoints.write_json_atomic)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(run, cfg, target, dtype, model.config.model_type))
        if os.path.isdir(target):
            os.rmdir(target)  # an empty folder the user made for it
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return checkpoint


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("run", help="run folder of a training run (its latest checkpoint is exported)")
    p.add_argument("--to", required=True, help="new folder for the exported model (must not exist or be empty)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of the saved weights")
    args = p.parse_args()
    checkpoint = export(args.run, args.to, getattr(torch, args.dtype))
    print(f"exported {checkpoint} as a {args.dtype} model folder: {args.to}")


if __name__ == "__main__":
    main()
