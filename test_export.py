"""Tests of export.py: a LoRA run exported as a plain model folder gives the adapter model's logits,
loads without peft, and bad input fails with one line.

    python -m pytest -q test_export.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import checkpoints
import export
import selfplay
import trainer

HERE = os.path.dirname(os.path.abspath(__file__))


def run(args):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def lora_run(tiny_model, pairs_dir, tmp_path_factory):
    """A one-iteration LoRA run whose adapter is then set to random non-zero weights: a random tiny
    model's advantages are all 0, so training alone would leave the adapter at its zero init."""
    out = str(tmp_path_factory.mktemp("runs") / "lora")
    result = run(["rlvr.py", "--model", tiny_model, "--data", pairs_dir, "--out", out, "--iterations", "1",
                  "--games", "2", "--rounds", "1", "--samples", "2", "--max-new-tokens", "4", "--lora-rank", "4"])
    assert result.returncode == 0, result.stderr
    cfg, checkpoint = checkpoints.load_run_config(out), checkpoints.resume_point(out)[0]
    randomise_adapter(trainer.build_policy(cfg, checkpoint)[0], checkpoint)
    return out


def randomise_adapter(policy, checkpoint):
    """Set every LoRA matrix of the policy to seeded random values and overwrite the checkpoint's
    adapter with them."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    policy.model.save_pretrained(checkpoint)  # overwrite the adapter in place


def game_batch(processor, pairs_dir):
    """Eight game prompts (clue and decision texts) with their pictures, as the models see them."""
    pairs = selfplay.read_pairs(pairs_dir, "train")[:4]
    cfg = trainer.argparse.Namespace(players=4, rounds=2, spy_image="modified")
    texts, images = [], []
    for pair in pairs:
        game = selfplay.Game(pair=pair, spy=1)
        texts += [selfplay.clue_prompt(game, 0, 0, cfg), selfplay.decision_prompt(game, None, cfg)]
        images += [selfplay.load_image(pair["original"]), selfplay.load_image(pair["modified"])]
    return processor(text=[selfplay.chat(processor, t) for t in texts], images=images, padding=True,
                     padding_side="left", return_tensors="pt")


@pytest.mark.slow
def test_export_matches_the_adapter_model_and_loads_without_peft(lora_run, pairs_dir, tmp_path):
    from transformers import AutoModelForImageTextToText
    target = str(tmp_path / "exported")
    result = run(["export.py", lora_run, "--to", target, "--dtype", "float32"])
    assert result.returncode == 0, result.stderr
    files = os.listdir(target)
    assert not [f for f in files if f.startswith("adapter_") or f in ("optimizer.pt", "state.json")]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "chat_template.jinja", "preprocessor_config.json"} <= set(files)
    with open(os.path.join(target, "preprocessor_config.json")) as f:
        assert json.load(f)["processor_class"] == "Qwen2_5_VLProcessor"  # the stock class, as a released folder
    assert not [p for p in os.listdir(tmp_path) if p != "exported"]  # no staging folder left behind

    cfg = checkpoints.load_run_config(lora_run)
    adapter_policy, processor = trainer.build_policy(cfg, checkpoints.resume_point(lora_run)[0])
    exported = AutoModelForImageTextToText.from_pretrained(target, dtype=torch.float32).eval()
    inputs = game_batch(processor, pairs_dir)
    with torch.no_grad():
        adapter_logits = adapter_policy.model(**inputs).logits
        with adapter_policy.model.disable_adapter():
            base_logits = adapter_policy.model(**inputs).logits
        exported_logits = exported(**inputs).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the model
    assert (exported_logits - adapter_logits).abs().max() < 1e-4

    peft_free = (  # a machine without peft: importing it fails
        "import sys; sys.modules['peft'] = None\n"
        "import torch, selfplay\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"model = AutoModelForImageTextToText.from_pretrained({target!r})\n"
        f"processor = selfplay.load_processor({target!r})\n"
        "print(type(model).__name__, 'peft' in sys.modules and sys.modules['peft'] is not None)\n")
    result = run(["-c", peft_free])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["Qwen2_5_VLForConditionalGeneration", "False"]


@pytest.mark.slow
def test_default_dtype_is_bfloat16(lora_run, tmp_path):
    target = str(tmp_path / "bf16")
    os.makedirs(target)  # an empty folder is fine
    assert run(["export.py", lora_run, "--to", target]).returncode == 0
    with safe_open(os.path.join(target, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_bad_input_fails_with_one_line(lora_run, tiny_model, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("keep me")
    (tmp_path / "empty-run").mkdir()
    with open(os.path.join(lora_run, "config.json")) as f:
        (tmp_path / "empty-run" / "config.json").write_text(f.read())
    cases = [
        ([lora_run, "--to", str(tmp_path / "full")], "already exists and is not empty"),
        ([tiny_model, "--to", str(tmp_path / "a")], "is not a training run"),
        ([str(tmp_path / "no-such-run"), "--to", str(tmp_path / "b")], "is not a training run"),
        ([str(tmp_path / "empty-run"), "--to", str(tmp_path / "c")], "has no checkpoint yet"),
    ]
    for args, message in cases:
        result = run(["export.py", *args])
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "full" / "something").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["empty-run", "full"]  # nothing half-written


QWEN_DECODING = {"do_sample": True, "repetition_penalty": 1.05, "top_k": 1, "top_p": 0.001, "temperature": 0.1}


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_export_and_full_checkpoints_keep_the_initial_decoding_defaults(tiny_model, tmp_path, lora_rank):
    """An initial model with Qwen2.5-VL-7B-Instruct's decoding defaults: the export (LoRA merged or
    a full fine-tune) and a full checkpoint keep them in generation_config.json, while the model
    loaded for training, also from that checkpoint, has none of them (sampling is softmax(logits / T))."""
    import shutil
    from transformers import GenerationConfig
    initial = str(tmp_path / "initial")
    shutil.copytree(tiny_model, initial)
    config = GenerationConfig.from_pretrained(initial)
    config.update(**QWEN_DECODING)
    config.save_pretrained(initial)
    out = str(tmp_path / "run")
    cfg = trainer.argparse.Namespace(model=initial, lora_rank=lora_rank, device="cpu", dtype=torch.float32,
                                     gradient_checkpointing=False)
    policy, processor = trainer.build_policy(cfg)
    assert all(getattr(policy.model.generation_config, key) is None for key in QWEN_DECODING)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad])
    checkpoints.save_checkpoint(out, policy, processor, optimizer, {"iteration": 1, "stage": "decision"})
    game = dict(data=str(tmp_path), schedule="decision", players=4, rounds=2, games=16, spy_image="modified",
                lr=1e-4, kl=0.04)  # the rest of a run's config, which the export's model card reads
    checkpoints.write_json_atomic(os.path.join(out, "config.json"), {**vars(cfg), **game, "dtype": "float32"})

    def decoding(folder):
        with open(os.path.join(folder, "generation_config.json")) as f:
            saved = json.load(f)
        return {key: saved.get(key) for key in QWEN_DECODING}

    folders = [str(tmp_path / "exported")]
    export.export(out, folders[0], torch.bfloat16)
    if lora_rank == 0:  # the full checkpoint itself, and the model a resume loads from it
        folders.append(os.path.join(out, "ckpt-000001"))
        resumed = selfplay.load_model(folders[1], "cpu", torch.float32).generation_config
        assert all(getattr(resumed, key) is None for key in QWEN_DECODING)
    for folder in folders:
        assert decoding(folder) == QWEN_DECODING, folder
