"""run.sh's GPU settings and bench_gpu.sh on the CPU; Qwen2.5-VL-7B's real layer shapes.

    OMP_NUM_THREADS=1 python -m pytest -q -m slow test_7b_shape.py     # slow: about 3 CPU-minutes

1. A random-weight model with every layer of the 7B's shape (make_tiny_model.py --shape 7b, 1 text
   layer, 2 vision blocks, the real processor's pixel limits): the config a training script reads,
   187 visual tokens for a 480x320 picture, and one optimiser step of LoRA 64 with gradient
   checkpointing and forced advantages that moves the adapter the right way. In float32: bfloat16
   matmuls are ~15x slower on a CPU, and the bfloat16 path is the same code at every shape (the
   tiny run below and test_on_policy.py train in it).
2. bench_gpu.sh end to end with its CPU fallback on the tiny model (SHAPE=tiny): the lever step
   (bench_levers.py: the plain path against every lever on, one game), then run.sh's GPU branch
   (LoRA 64 on the text projections, gradient checkpointing, micro-batch 4, bfloat16) for one
   decision-stage and one clue-stage iteration of 2 games with 4-token turns, then evaluate.py and
   report.py. A random model's votes never parse, so there every advantage is 0; step 1 is the
   update that moves.
"""
import argparse
import json
import math
import os
import subprocess

import pytest
import torch
from PIL import Image
from transformers import AutoConfig

import make_tiny_model
import models
import selfplay
import trainer
from test_smoke import game_cfg

HERE = os.path.dirname(os.path.abspath(__file__))


def test_shape_presets_fill_only_the_sizes_left_unset():
    tiny = make_tiny_model.resolve_shape(argparse.Namespace(hidden=64, layers=2, heads=4, vision_hidden=32, vision_depth=2))
    assert (tiny.shape, tiny.kv_heads, tiny.intermediate, tiny.vision_heads, tiny.vision_intermediate, tiny.window,
            tiny.fullatt_blocks, tiny.dtype) == ("tiny", 2, 192, 2, 64, 56, [1], "float32")
    seven = make_tiny_model.resolve_shape(argparse.Namespace(shape="7b", layers=1, vision_depth=16, hidden=None))
    assert (seven.hidden, seven.layers, seven.heads, seven.kv_heads, seven.intermediate) == (3584, 1, 28, 4, 18944)
    assert (seven.vision_hidden, seven.vision_heads, seven.vision_intermediate, seven.window) == (1280, 16, 3420, 112)
    assert seven.fullatt_blocks == [7, 15]  # the 7B's full-attention blocks that a 16-block tower has
    assert (seven.min_pixels, seven.max_pixels, seven.dtype) == (3136, 12845056, "bfloat16")


@pytest.fixture(scope="module")
def seven_b(tmp_path_factory):
    """A folder with the 7B's layer shapes at 1 text layer and 2 vision blocks (320M parameters)."""
    folder = str(tmp_path_factory.mktemp("seven-b") / "model")
    make_tiny_model.build(argparse.Namespace(out=folder, shape="7b", layers=1, vision_depth=2, vocab_size=512, seed=0))
    return folder


@pytest.mark.slow
def test_every_layer_has_the_7b_shape_and_a_480x320_picture_costs_187_tokens(seven_b):
    config = AutoConfig.from_pretrained(seven_b)  # as the training scripts read it
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.intermediate_size) \
        == (3584, 28, 4, 18944)
    assert text.rope_scaling["mrope_section"] == [16, 24, 24] and text.num_hidden_layers == 1
    assert (vision.hidden_size, vision.num_heads, vision.intermediate_size, vision.out_hidden_size) == (1280, 16, 3420, 3584)
    assert (vision.window_size, vision.patch_size, vision.spatial_merge_size, vision.depth) == (112, 14, 2, 2)
    assert vision.fullatt_block_indexes == []  # the 7B's are blocks 7, 15, 23, 31
    processor = selfplay.load_processor(seven_b)
    picture = Image.new("RGB", (480, 320), "gray")  # make_games.py's CLEVR size
    inputs = processor(text=[selfplay.chat(processor, "Describe it.")], images=[picture], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 22, 34]]  # 14-pixel patches
    assert (inputs["input_ids"] == config.image_token_id).sum().item() == 22 * 34 // 4 == 187


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The folder of one CPU run of bench_gpu.sh on the tiny model (model, games, run) and its printed output."""
    folder = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "BENCH": str(folder), "SHAPE": "tiny", "EVAL_GAMES": "2", "CONFIGS": "plain,all",
           "CUDA_VISIBLE_DEVICES": ""}  # the CPU fallback even on a machine with a GPU
    result = subprocess.run(["bash", "bench_gpu.sh"], cwd=HERE, capture_output=True, text=True, timeout=1200, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, result.stdout


@pytest.mark.slow
def test_gpu_settings_run_both_stages_then_evaluate_and_report(bench):
    folder, stdout = bench
    run = folder / "run"
    config = json.load(open(run / "config.json"))
    assert (config["lora_rank"], config["gradient_checkpointing"], config["micro_batch"], config["dtype"]) \
        == (64, True, 4, "torch.bfloat16")
    assert (config["games"], config["max_new_tokens"]) == (2, 4)
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [m["stage"] for m in metrics] == ["decision", "clue"]
    for m in metrics:
        numbers = [v for v in m.values() if isinstance(v, (int, float))]
        assert all(math.isfinite(v) for v in numbers) and not m["skipped_update"], m
    assert metrics[0]["kl"] == 0.0  # the adapter starts at exactly the reference
    assert all(len(open(run / "games" / name).readlines()) == 2 for name in os.listdir(run / "games"))
    assert json.load(open(run / "eval.json"))["games"] == 2
    assert os.path.getsize(run / "report.html") > 0
    table = stdout[stdout.index("bench_gpu.sh on CPU"):].splitlines()
    assert [row.split()[:2] for row in table[2:4]] == [["1", "decision"], ["2", "clue"]]


@pytest.mark.slow
def test_levers_are_measured_against_the_plain_path(bench):
    """bench_gpu.sh's first step: the same games with every lever off and on. With the levers the
    tower encodes each distinct picture once in rollouts and never in the update, and a decode
    step issues fewer ATen ops (merged LoRA)."""
    folder, stdout = bench
    results = json.load(open(folder / "levers.json"))["results"]
    plain, every = results["plain"], results["all"]
    assert "ratio to plain" in stdout and "| all |" in stdout
    assert plain["decode_steps"] == every["decode_steps"] == 5 * 4  # 4 clue calls and the judge's, 4 tokens each
    assert plain["encodes_rollouts"] == 4 + 2 and every["encodes_rollouts"] == 2  # one game: its 2 pictures
    assert plain["encodes_update"] == 4 + 2 and every["encodes_update"] == 0  # --kl 0: the policy pass only
    # measured on the tiny model's 1 text layer: 722 ops plain, 587 with every lever
    assert every["launches_per_decode_step"] < 0.85 * plain["launches_per_decode_step"]


@pytest.mark.slow
def test_one_step_with_forced_advantages_moves_the_adapter_the_right_way(seven_b):
    """Backward through LoRA 64 on the text projections + gradient checkpointing at the 7B's layer
    shapes, in two micro-batches: the adapter moves, the base weights do not, and the log-probs of
    the completions with a positive advantage rise against those with a negative one."""
    cfg = game_cfg(model=seven_b, lora_rank=64, gradient_checkpointing=True, micro_batch=4, kl=0.0)
    torch.manual_seed(0)
    policy, processor = trainer.build_policy(cfg)
    reference = trainer.reference_policy(policy, cfg)
    model = policy.model
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    colours = ["red", "green", "blue", "gray", "white"]
    turns = []
    for colour, text in zip(colours, ["I think Player 2 is the spy. \\boxed{2}", "\\boxed{N/A}",
                                      "Player 3 said cube. \\boxed{3}", "no idea \\boxed{1}", "\\boxed{4}"]):
        # 112x112: 16 visual tokens keep the step to seconds; the 480x320 count is checked above
        turn = selfplay.Turn(-1, -1, selfplay.chat(processor, "Who is the spy?"), Image.new("RGB", (112, 112), colour))
        turn.completion_ids = processor.tokenizer.encode(text) + [models.stop_token_id(processor)]
        turns.append(turn)
    advantages = [1.0, -1.0, 1.0, -1.0, 0.5]  # 5 turns: two micro-batches of at most 4
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base_name = next(n for n in lora if "lora_B" in n).replace("lora_B.default", "base_layer")
    base = dict(model.named_parameters())[base_name].detach().clone()
    assert lora and all(lora[n].abs().max() == 0 for n in lora if "lora_B" in n)

    def logps():
        inputs, ids, mask = selfplay.completion_batch(processor, turns, "cpu")
        with torch.no_grad():
            return trainer.sequence_mean(selfplay.token_logprobs(model, inputs, ids), mask)

    before = logps()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    step = trainer.train_step(policy, reference, optimizer, processor, turns, advantages, cfg, 1e-4)
    assert not step["skipped_update"] and math.isfinite(step["loss"]) and step["grad_norm"] > 0
    params = dict(model.named_parameters())
    assert all(params[n].abs().max() > 0 for n in lora if "lora_B" in n)  # every LoRA B left zero
    assert torch.equal(params[base_name], base)
    change = logps() - before
    assert sum(a * c for a, c in zip(advantages, change.tolist())) > 0, change
