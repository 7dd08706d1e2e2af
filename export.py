"""
export.py: turn a training run into a plain Hugging Face model folder, for benchmark tools.

    python export.py runs/clevr-qwen7b --to exported/clevr-qwen7b            # bf16 weights
    python export.py runs/cpu-demo --to exported/cpu-demo --dtype float32

Takes the run's latest checkpoint. A LoRA run's adapter is merged into the base model (the run's
--model) with peft's merge_and_unload, in float32, then cast to --dtype; a full fine-tune's weights
are re-saved in --dtype. The folder holds config.json, generation_config.json, safetensors weights,
the tokenizer, the processor and its chat template, and no adapter or optimiser files: it loads
with AutoModelForImageTextToText / AutoProcessor.from_pretrained without peft, and vLLM, lmms-eval
and VLMEvalKit take it as a local model path (docs/benchmarks.md has their commands).

On a machine without torchvision the project plays most families with an image-only stand-in of
their processor class (models.py); the export names the family's stock processor class instead
(Qwen2_5_VLProcessor, InternVLProcessor, ...), in the layout of a released folder (a flat
preprocessor_config.json), so that the stock classes load it on a machine with torchvision.

The folder is written under a temporary name next to --to and renamed when complete: an error or
a crash never leaves a half-written model at --to.
"""
import argparse
import json
import os
import shutil
import sys

import torch

import checkpoints
import models
import trainer

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
        processor.save_pretrained(staging)  # tokenizer, image processor, chat template
        models.write_stock_processor_files(staging, checkpoints.write_json_atomic)
        if os.path.isdir(target):
            os.rmdir(target)  # an empty folder the user made for it
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return checkpoint


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run folder of a training run (its latest checkpoint is exported)")
    p.add_argument("--to", required=True, help="new folder for the exported model (must not exist or be empty)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of the saved weights")
    args = p.parse_args()
    checkpoint = export(args.run, args.to, getattr(torch, args.dtype))
    print(f"exported {checkpoint} as a {args.dtype} model folder: {args.to}")


if __name__ == "__main__":
    main()
