"""Tests of models.py over the six model families: a tiny random model of each (make_tiny_model.py
--family F, its own tokenizer and chat template, no torchvision) loads, samples, scores and trains
through the same code as Qwen2.5-VL.

    python -m pytest -q test_families.py              # quick: loading, log-probs, suppression, one update
    python -m pytest -q -m slow test_families.py      # resume, export and a 2-process torchrun per family
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import checkpoints
import make_tiny_model
import models
import selfplay
import trainer
from test_export import randomise_adapter
from test_on_policy import assert_recomputed_logprobs_match
from test_smoke import game_cfg
from test_warm_start import cells_dir, warm_start  # noqa: F401  (cells_dir: a fixture)

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = sorted(models.FAMILIES)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """model_type -> folder of a tiny model of that family, built on first use."""
    built = {}

    def folder(model_type):
        if model_type not in built:
            out = str(tmp_path_factory.mktemp("families") / model_type)
            make_tiny_model.build(argparse.Namespace(out=out, family=model_type, vocab_size=512, seed=0))
            built[model_type] = out
        return built[model_type]
    return folder


def pictures():
    """Pictures of two sizes and aspect ratios, so that a batch mixes visual token counts."""
    return [Image.new("RGB", (64, 80), "red"), Image.new("RGB", (112, 56), "blue"),
            Image.new("RGB", (96, 64), "green"), Image.new("RGB", (48, 48), "white")]


def turns_of(processor, n=4):
    texts = ["Give a clue.", "You are Player 2. " * 3, "Who is the spy?", "Round 1: Player 1: a red cube."]
    return [selfplay.Turn(0, 0, selfplay.chat(processor, texts[i % 4]), pictures()[i % 4]) for i in range(n)]


def same_inputs(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_saves_and_reloads_from_a_project_and_a_released_folder(family_models, model_type, tmp_path):
    """The project's loaders give the family's processor (not a bare tokenizer) from the folder the
    project built, from its re-save, and from a copy in the released layout naming the stock class
    (what export.py writes); all three turn the same prompts into the same inputs."""
    from transformers.processing_utils import ProcessorMixin
    folder = family_models(model_type)
    processor = selfplay.load_processor(folder)
    model = selfplay.load_model(folder, "cpu", torch.float32)
    assert isinstance(processor, ProcessorMixin) and model.config.model_type == model_type
    assert models.family_of_processor(processor) is models.FAMILIES[model_type]
    turns = turns_of(processor)
    expected = models.processor_inputs(processor, [t.prompt for t in turns], [t.image for t in turns])
    assert (expected["input_ids"] == processor.tokenizer.pad_token_id).any()  # left-padded: prompts differ

    processor.save_pretrained(tmp_path / "again")
    model.save_pretrained(tmp_path / "again")
    released = str(tmp_path / "released")
    shutil.copytree(folder, released)
    models.write_stock_processor_files(released, checkpoints.write_json_atomic)
    stock = models.FAMILIES[model_type].processor_class
    with open(os.path.join(released, "preprocessor_config.json")) as f:
        assert json.load(f)["processor_class"] == stock
    for path in (str(tmp_path / "again"), released):
        again = selfplay.load_processor(path)
        assert models.family_of_processor(again) is models.FAMILIES[model_type]
        assert same_inputs(models.processor_inputs(again, [t.prompt for t in turns], [t.image for t in turns]), expected)
        assert selfplay.load_model(path, "cpu", torch.float32).config.model_type == model_type


def test_an_unknown_family_is_one_line_naming_the_supported_ones(family_models, tmp_path):
    folder = str(tmp_path / "other")
    shutil.copytree(family_models("gemma3"), folder)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["model_type"] = "paligemma"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    for load in (lambda: selfplay.load_model(folder, "cpu", None), lambda: selfplay.load_processor(folder)):
        with pytest.raises(SystemExit) as stop:
            load()
        message = str(stop.value)
        assert message.startswith("error: model type 'paligemma' is not supported") and "\n" not in message
        assert all(f in message for f in FAMILIES)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_logprobs_equal_generate_alone_and_in_a_left_padded_batch(family_models, model_type):
    """token_logprobs at T equals log_softmax(output_logits / T) of generate within 1e-4 on a
    left-padded batch of pictures of different sizes; each turn scores the same alone, also after a
    generate call of another batch size (no state of one call leaks into the next)."""
    temperature = 0.7
    folder = family_models(model_type)
    processor = selfplay.load_processor(folder)
    model = selfplay.load_model(folder, "cpu", torch.float32).eval()
    turns = turns_of(processor)
    cfg = game_cfg(temperature=temperature, max_new_tokens=6)
    settings = selfplay.sampling_settings(model, processor, cfg)
    settings.output_logits, settings.return_dict_in_generate = True, True
    inputs = models.processor_inputs(processor, [t.prompt for t in turns], [t.image for t in turns])
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=settings)
    together, ids = assert_recomputed_logprobs_match(model, processor, turns, inputs, out, temperature)
    with torch.no_grad():
        selfplay.generate(selfplay.Policy(model), processor, turns_of(processor, 3), cfg)  # another batch size
        for i, turn in enumerate(turns):
            alone, _, _ = selfplay.completion_batch(processor, [turn], "cpu")
            n = len(turn.completion_ids)
            lp = selfplay.token_logprobs(model, alone, ids[i: i + 1, :n], temperature)
            assert torch.allclose(lp[0], together[i, :n], atol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_placeholder_tokens_are_never_sampled(family_models, model_type):
    """An output layer that makes the family's placeholder and marker tokens by far the most likely:
    none is sampled, and the completions go through the next forward pass."""
    folder = family_models(model_type)
    processor = selfplay.load_processor(folder)
    model = selfplay.load_model(folder, "cpu", torch.float32).eval()
    placeholders = selfplay.special_vision_ids(processor)
    assert placeholders and model.config.get_text_config().vocab_size > max(placeholders)
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, len(processor.tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[placeholders] = 30.0
    model.set_output_embeddings(head)
    with torch.no_grad():
        first = model(**models.processor_inputs(processor, [turns_of(processor, 1)[0].prompt], [pictures()[0]])).logits[0, -1]
    assert set(first.topk(len(placeholders)).indices.tolist()) == set(placeholders)
    torch.manual_seed(0)
    turns = turns_of(processor)
    selfplay.generate(selfplay.Policy(model), processor, turns, game_cfg(temperature=1.0, max_new_tokens=8))
    assert not {i for t in turns for i in t.completion_ids} & set(placeholders)
    batch, ids, _ = selfplay.completion_batch(processor, turns, "cpu")
    with torch.no_grad():
        assert torch.isfinite(selfplay.token_logprobs(model, batch, ids)).all()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_one_update_with_forced_advantages_moves_every_lora_b_and_the_full_weights(family_models, model_type):
    """A random model's advantages are all 0, so the step is given advantages: with LoRA every B
    matrix (zero at init) moves; with full fine-tuning every text projection moves."""
    folder = family_models(model_type)
    for lora_rank in (4, 0):
        cfg = game_cfg(model=folder, lora_rank=lora_rank)
        policy, processor = trainer.build_policy(cfg)
        reference = trainer.reference_policy(policy, cfg)
        turns = turns_of(processor)
        for i, turn in enumerate(turns):
            turn.completion_ids = processor.tokenizer("a red cube" if i % 2 else "\\boxed{2}", add_special_tokens=False)["input_ids"]
        names = [n for n, _ in policy.model.named_parameters() if ("lora_B" in n if lora_rank else n.endswith("proj.weight")
                                                                       and ("language_model" in n or "text_model" in n))]
        before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if n in names}
        assert before
        optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.1)
        trainer.train_step(policy, reference, optimizer, processor, turns, [1.0, -1.0, 0.5, -0.5], cfg, lr=0.1)
        after = dict(policy.model.named_parameters())
        assert all(not torch.equal(after[n], before[n]) for n in names), f"lora_rank {lora_rank}: a matrix did not move"


# -----------------------------------------------------------------------------
# Whole runs (slow): resume, export, torchrun


def run(args, **env):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def rlvr(model, data, out, iterations, *extra):
    return run(["rlvr.py", "--model", model, "--data", data, "--out", out, "--iterations", str(iterations), "--games", "2",
                "--rounds", "1", "--samples", "2", "--max-new-tokens", "4", *extra])


def played(out, iteration):
    with open(os.path.join(out, "games", f"iter_{iteration:06d}.jsonl")) as f:
        return [{k: g[k] for k in ("pair_id", "spy", "clues", "decisions")} for g in map(json.loads, f)]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_resumed_run_replays_the_uninterrupted_one_and_exports(family_models, model_type, pairs_dir, tmp_path):
    """A LoRA run resumed after iteration 1 plays the games of an uninterrupted one; its checkpoint
    (adapter set to random values) exports as a folder that names the stock processor class, gives
    the adapter model's logits within 1e-4 in float32, and loads with peft blocked."""
    model = family_models(model_type)
    whole, halves, target = str(tmp_path / "whole"), str(tmp_path / "halves"), str(tmp_path / "exported")
    assert rlvr(model, pairs_dir, whole, 2, "--lora-rank", "4").returncode == 0
    assert rlvr(model, pairs_dir, halves, 1, "--lora-rank", "4").returncode == 0
    resumed = rlvr(model, pairs_dir, halves, 2, "--lora-rank", "4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [json.loads(line)["iteration"] for line in open(os.path.join(halves, "metrics.jsonl"))] == [1, 2]
    assert played(halves, 2) == played(whole, 2)

    cfg, checkpoint = checkpoints.load_run_config(halves), checkpoints.resume_point(halves)[0]
    policy, processor = trainer.build_policy(cfg, checkpoint)
    randomise_adapter(policy, checkpoint)
    result = run(["export.py", halves, "--to", target, "--dtype", "float32"])
    assert result.returncode == 0, result.stderr[-2000:]
    with open(os.path.join(target, "preprocessor_config.json")) as f:
        assert json.load(f)["processor_class"] == models.FAMILIES[model_type].processor_class

    from transformers import AutoModelForImageTextToText
    exported = AutoModelForImageTextToText.from_pretrained(target, dtype=torch.float32).eval()
    turns = turns_of(processor)
    inputs = models.processor_inputs(processor, [t.prompt for t in turns], [t.image for t in turns])
    with torch.no_grad():
        adapter_logits = policy.model(**inputs).logits
        with policy.model.disable_adapter():
            base_logits = policy.model(**inputs).logits
        exported_logits = exported(**inputs).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-2
    assert (exported_logits - adapter_logits).abs().max() < 1e-4
    peft_free = ("import sys; sys.modules['peft'] = None\n"
                 "import torch, selfplay\n"
                 f"model = selfplay.load_model({target!r}, 'cpu', torch.float32)\n"
                 f"processor = selfplay.load_processor({target!r})\n"
                 "print(model.config.model_type, sys.modules['peft'] is not None)\n")
    result = run(["-c", peft_free])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == [model_type, "False"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [f for f in FAMILIES if f != "qwen2_5_vl"])
def test_run_sh_trains_both_stages_evaluates_asks_and_reports(family_models, model_type, cells_dir, tmp_path):
    """QUICK=1 run.sh with the family's tiny model: rlvr.py, spo.py, evaluate.py, vqa.py (cells
    pairs: vqa.py asks nothing about photos) and report.py."""
    out = tmp_path / "run"
    env = {"QUICK": "1", "MODEL": family_models(model_type), "DATA": cells_dir, "OUT": str(out), "GAMES": "2",
           "EVAL_GAMES": "2", "ITERATIONS": "2", "LORA_RANK": "4",
           "EXTRA": "--max-new-tokens 4 --samples 2 --rounds 1 --k-min 1 --patience 1"}
    result = subprocess.run(["bash", "run.sh"], cwd=HERE, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(line)["stage"] for line in open(out / "metrics.jsonl")] == ["decision", "clue"]
    assert json.load(open(out / "eval.json"))["games"] == 2
    assert json.load(open(out / "vqa.json")) and (out / "report.html").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [f for f in FAMILIES if f != "qwen2_5_vl"])
def test_warm_start_trains_every_family(family_models, model_type, cells_dir, tmp_path):
    """warm_start.py ends its targets with the family's stop token and trains the model."""
    from safetensors.torch import load_file
    result = warm_start(family_models(model_type), cells_dir, str(tmp_path / "warm"))
    assert result.returncode == 0, result.stderr[-2000:]
    start = load_file(os.path.join(family_models(model_type), "model.safetensors"))
    trained = load_file(str(tmp_path / "warm" / "model.safetensors"))
    assert any((trained[k] != start[k]).any() for k in start)


@pytest.mark.slow
def test_two_process_torchrun_of_gemma3_with_lora_ddp_and_full_fsdp2(family_models, pairs_dir, tmp_path):
    """Gemma 3 (token_type_ids, pictures as one list per prompt, a SigLIP tower) over 2 gloo
    processes: LoRA under DDP and full fine-tuning under FSDP2 each train two iterations and write
    a checkpoint that loads."""
    model = family_models("gemma3")
    for lora_rank in ("4", "0"):
        out = str(tmp_path / f"lora{lora_rank}")
        result = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "rlvr.py", "--model", model,
                      "--data", pairs_dir, "--out", out, "--iterations", "2", "--games", "2", "--rounds", "1",
                      "--samples", "2", "--max-new-tokens", "4", "--lora-rank", lora_rank])
        assert result.returncode == 0, result.stderr[-3000:]
        assert [json.loads(line)["iteration"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2]
        assert json.load(open(os.path.join(out, "ckpt-000002", "state.json")))["world_size"] == 2
    full = selfplay.load_model(os.path.join(str(tmp_path / "lora0"), "ckpt-000002"), "cpu", torch.float32)
    assert full.config.model_type == "gemma3"


@pytest.mark.slow
@pytest.mark.parametrize("shape, model_type, visual_tokens", [("qwen3-vl-8b", "qwen3_vl", 150), ("internvl3-8b", "internvl", 256)])
def test_real_layer_shapes_load_count_visual_tokens_and_train(shape, model_type, visual_tokens, tmp_path):
    """make_tiny_model.py --shape at one text layer and one vision layer: every layer has the
    released model's shape, a 480x320 picture costs the released processor's visual tokens under
    the game's pixel budget (Qwen3-VL: one per 32x32 pixels; InternVL3: at most 4 tiles, here one
    of 256), and a LoRA step with forced advantages moves every B (in float32: bfloat16 matmuls
    are 15x slower on a CPU; test_7b_shape.py checks the bfloat16 step at the 7B's shape)."""
    from transformers import AutoConfig
    folder = str(tmp_path / shape)
    make_tiny_model.build(argparse.Namespace(out=folder, shape=shape, layers=1, vision_depth=1, vocab_size=512, seed=0))
    config = AutoConfig.from_pretrained(folder)
    expected = make_tiny_model.SHAPES[shape]
    text = config.get_text_config()
    assert config.model_type == model_type and text.num_hidden_layers == 1
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.intermediate_size) == \
        (expected["hidden"], expected["heads"], expected["kv_heads"], expected["intermediate"])
    assert (config.vision_config.hidden_size, config.vision_config.intermediate_size) == \
        (expected["vision_hidden"], expected["vision_intermediate"])
    cfg = game_cfg(model=folder, lora_rank=8)
    policy, processor = trainer.build_policy(cfg)
    picture = Image.new("RGB", (480, 320), "gray")
    turns = [selfplay.Turn(0, 0, selfplay.chat(processor, "Who is the spy?"), picture) for _ in range(2)]
    inputs = models.processor_inputs(processor, [t.prompt for t in turns], [t.image for t in turns])
    image_token = getattr(config, "image_token_id", None)
    assert (inputs["input_ids"][0] == image_token).sum().item() == visual_tokens
    # Different completions: one answer with the same advantage of +1 and -1 would cancel to a zero gradient.
    for turn, answer in zip(turns, ["\\boxed{2}", "\\boxed{1}"]):
        turn.completion_ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_B" in n}
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.1)
    trainer.train_step(policy, trainer.reference_policy(policy, cfg), optimizer, processor, turns, [1.0, -1.0], cfg, lr=0.1)
    assert all(not torch.equal(p, before[n]) for n, p in policy.model.named_parameters() if n in before)
