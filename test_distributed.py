"""Tests of data-parallel training (distributed.py) on the CPU: the gloo backend, 2 processes, the
tiny model. The tiny model's votes never parse, so its advantages are all 0: the gradient tests
call trainer.train_step in the workers with forced advantages, so that the weights really move.

    python -m pytest -q test_distributed.py
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import distributed
import rlvr
import selfplay
import spo
import checkpoints
import trainer
from test_smoke import game_cfg, run, sample_turns

HERE = os.path.dirname(os.path.abspath(__file__))
FORCED_ADVANTAGES = [1.0, -0.5, 2.0, -1.5, 0.5, 1.0, -1.0, 0.25]


def test_shares_are_contiguous_and_cover_every_game(monkeypatch):
    for world in (1, 2, 3):
        for n in range(world, 8):
            shares = []
            for r in range(world):
                monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                monkeypatch.setattr(distributed, "world_size", lambda: world)
                shares += list(range(n))[distributed.my_share(n)]
            assert shares == list(range(n))  # rank order = the one-process order


def scripted_games(n=5, players=4):
    """Games with fixed votes (no model): rewards, and so RAE baselines, that are not all 0."""
    from PIL import Image
    games = []
    for g in range(n):
        game = selfplay.Game(pair={"id": f"{g:06d}", "domain": "photo"}, spy=g % players)
        game.clues = [selfplay.Turn(seat, 0, f"clue {g} {seat}", Image.new("RGB", (8, 8))) for seat in range(players)]
        game.decisions = [selfplay.Turn(-1, -1, f"vote {g} {k}", Image.new("RGB", (8, 8)), parsed=(g + k * k) % players)
                          for k in range(3)]
        games.append(game)
    return games


def games_worker(rank, world, port, out):
    """One rank: play its share of the scripted games, gather, score and take its own samples."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.init()
    cfg = game_cfg()
    own = scripted_games()[distributed.my_share(5)]
    games = distributed.gather_games(own)
    spo.score_clues(games, cfg)
    rlvr.score_decisions(games, cfg)
    baselines = {"spy": 0.1, "civilian": -0.2, "updates": 3}
    turns, advantages = distributed.own_samples(*spo.clue_samples(games, baselines, cfg), own)
    torch.save({"ids": [g.pair["id"] for g in games], "baselines": baselines, "stats": selfplay.decision_stats(games),
                "turns": [t.prompt for t in turns], "advantages": advantages,
                "pictures": all(t.image is not None for t in turns),
                "decisions": [t.prompt for t in distributed.own_samples(*rlvr.decision_samples(games, cfg), own)[0]]},
               os.path.join(out, f"rank{rank}.pt"))
    distributed.finish()


def test_ranks_score_the_global_batch_and_train_on_their_own_games(tmp_path):
    """Role baselines (Eq. 2) and decision statistics come from all ranks' games, identically on
    every rank; each rank trains on its own games' samples, with the one-process advantages."""
    mp.spawn(games_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    cfg = game_cfg()
    games = scripted_games()
    spo.score_clues(games, cfg)
    rlvr.score_decisions(games, cfg)
    baselines = {"spy": 0.1, "civilian": -0.2, "updates": 3}
    turns, advantages = spo.clue_samples(games, baselines, cfg)
    assert baselines != {"spy": 0.1, "civilian": -0.2, "updates": 3}  # the rewards moved them
    for r in ranks:
        assert r["ids"] == [g.pair["id"] for g in games]
        assert r["baselines"] == baselines and r["stats"] == selfplay.decision_stats(games)
        assert r["pictures"]  # a rank's own games keep their pictures for the update
    assert ranks[0]["turns"] + ranks[1]["turns"] == [t.prompt for t in turns]
    assert ranks[0]["advantages"] + ranks[1]["advantages"] == advantages
    assert len(ranks[0]["turns"]) == 4 * 2 and len(ranks[1]["turns"]) == 4 * 3  # 2 and 3 of the 5 games
    assert ranks[0]["decisions"] + ranks[1]["decisions"] == [t.prompt for g in games for t in g.decisions]


def fixed_turns(processor, pairs):
    """Eight turns with fixed completions of different lengths: the same on every rank."""
    turns = sample_turns(processor, pairs, len(FORCED_ADVANTAGES))
    for i, turn in enumerate(turns):
        turn.completion_ids = [(7 * i + 3 * k) % 400 + 10 for k in range(2 + i % 3)]
    return turns


def step_cfg(model, lora_rank):
    # no gradient clipping: the step is then exactly -lr * gradient; checkpointing must not change it
    return game_cfg(model=model, lora_rank=lora_rank, micro_batch=2, grad_clip=1e9, gradient_checkpointing=True)


def trainable(model):
    return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def gradient_holdings(model):
    """Under FSDP2: (parameters holding an unsharded accumulated gradient, gradients that are not
    this rank's shard, gradients held)."""
    from torch.distributed.fsdp import FSDPModule
    unsharded, not_a_shard, held = 0, 0, 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                for param in group.fsdp_params:
                    unsharded += getattr(param, "unsharded_accumulated_grad", None) is not None
                    grad = param.sharded_param.grad
                    held += grad is not None
                    not_a_shard += grad is not None and grad.to_local().shape != param.sharded_param.to_local().shape
    return unsharded, not_a_shard, held


def record_gradient_holdings(model, monkeypatch_target):
    """Record gradient_holdings before every micro-batch and before every clipping: after every
    backward of train_step."""
    seen = []
    build, clip = selfplay.completion_batch, torch.nn.utils.clip_grad_norm_

    def building(*args, **kwargs):
        seen.append(gradient_holdings(model))
        return build(*args, **kwargs)

    def clipping(*args, **kwargs):
        seen.append(gradient_holdings(model))
        return clip(*args, **kwargs)

    monkeypatch_target.completion_batch, torch.nn.utils.clip_grad_norm_ = building, clipping
    return seen


def worker(rank, world, port, model_dir, pairs_dir, out, lora_rank, split):
    """One rank: an SGD step (lr 1) on its share `split` of the fixed turns, then two AdamW steps;
    checkpoints after the SGD step (out/sgd) and at the end (out); each rank's weights (DDP) or
    what gradients it held after each backward (FSDP2)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init()
    cfg = step_cfg(model_dir, lora_rank)
    torch.manual_seed(0)
    policy, processor = trainer.build_policy(cfg)
    holdings = record_gradient_holdings(policy.model, selfplay) if not lora_rank else []
    reference = trainer.reference_policy(policy, cfg)
    turns = fixed_turns(processor, selfplay.read_pairs(pairs_dir, "train"))
    mine = slice(*split[rank])
    weights = {"before": trainable(policy.model)}
    sgd = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=1.0)
    result = trainer.train_step(policy, reference, sgd, processor, turns[mine], FORCED_ADVANTAGES[mine], cfg, lr=1.0)
    weights["sgd"] = trainable(policy.model)
    checkpoints.save_checkpoint(os.path.join(out, "sgd"), policy, processor, sgd, {"iteration": 1, "stage": "decision"})
    adam = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        trainer.train_step(policy, reference, adam, processor, turns[mine], FORCED_ADVANTAGES[mine], cfg, lr=1e-2)
    weights["end"] = trainable(policy.model)
    checkpoints.save_checkpoint(out, policy, processor, adam, {"iteration": 3, "stage": "decision"})
    resumed = {}
    if not lora_rank:  # a resume: a fresh model and optimizer take the saved AdamW state
        fresh, _ = trainer.build_policy(cfg)
        fresh_adam = torch.optim.AdamW([p for p in fresh.model.parameters() if p.requires_grad], lr=1e-2)
        load, reads = torch.load, []
        def reading(source, *args, **kwargs):  # files only: a broadcast unpickles objects through torch.load too
            if isinstance(source, (str, os.PathLike)):
                reads.append(kwargs.get("mmap"))
            return load(source, *args, **kwargs)
        torch.load = reading
        distributed.load_optimizer(fresh.model, fresh_adam, os.path.join(out, "ckpt-000003", "optimizer.pt"))
        torch.load = load
        pairs_of_states = [(adam.state[p], fresh_adam.state[q]) for p, q in zip(adam.param_groups[0]["params"],
                                                                             fresh_adam.param_groups[0]["params"])]
        resumed = {"reads": reads, "equal": all(
            torch.equal(a[key].to_local(), b[key].to_local()) for a, b in pairs_of_states for key in ("exp_avg", "exp_avg_sq"))
            and all(float(a["step"]) == float(b["step"]) == 2 for a, b in pairs_of_states)}
    torch.save({"weights": weights if lora_rank else None, "result": result, "holdings": holdings, "resumed": resumed},
               os.path.join(out, f"rank{rank}.pt"))  # with DDP every rank holds the whole adapter
    distributed.finish()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process_step(tiny_model, pairs_dir, lora_rank):
    """The same SGD step on all eight turns in one process: weights before and after, result."""
    cfg = step_cfg(tiny_model, lora_rank)
    torch.manual_seed(0)
    policy, processor = trainer.build_policy(cfg)
    reference = trainer.reference_policy(policy, cfg)
    turns = fixed_turns(processor, selfplay.read_pairs(pairs_dir, "train"))
    before = trainable(policy.model)
    sgd = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=1.0)
    result = trainer.train_step(policy, reference, sgd, processor, turns, FORCED_ADVANTAGES, cfg, lr=1.0)
    return before, trainable(policy.model), result


@pytest.mark.slow
def test_ddp_step_equals_one_process_step_and_ranks_stay_identical(tiny_model, pairs_dir, tmp_path):
    """LoRA under DDP, unequal shares (3 and 5 turns, 2 and 3 micro-batches): the step is the
    one-process step on all eight turns (the loss is the mean over all ranks' sequences), and after
    three steps the adapters of both ranks are bit-identical."""
    os.makedirs(tmp_path / "sgd")
    mp.spawn(worker, args=(2, free_port(), tiny_model, pairs_dir, str(tmp_path), 4, [(0, 3), (3, 8)]), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    before, after, result = one_process_step(tiny_model, pairs_dir, 4)
    for name in before:
        assert torch.equal(ranks[0]["weights"]["end"][name], ranks[1]["weights"]["end"][name]), name
        torch.testing.assert_close(ranks[0]["weights"]["sgd"][name] - ranks[0]["weights"]["before"][name],
                                   after[name] - before[name], atol=1e-6, rtol=1e-5)
    moved = max((after[n] - before[n]).abs().max().item() for n in before)
    assert moved > 1e-3  # the forced advantages really move the adapter
    for rank in ranks:  # loss, kl and grad norm: the same global numbers as one process
        assert rank["result"]["loss"] == pytest.approx(result["loss"], abs=1e-6)
        assert rank["result"]["grad_norm"] == pytest.approx(result["grad_norm"], rel=1e-5)
    # the adapter checkpoint (rank 0's) holds the trained weights
    assert open(tmp_path / "latest").read() == "ckpt-000003"
    assert os.path.exists(tmp_path / "ckpt-000003" / "adapter_model.safetensors")


@pytest.mark.slow
def test_ddp_rank_without_turns_joins_the_step(tiny_model, pairs_dir, tmp_path):
    """LoRA under DDP, all eight turns on rank 0 and none on rank 1 (a short batch): rank 1 runs
    filler passes that train nothing, so the step still equals the one-process step."""
    os.makedirs(tmp_path / "sgd")
    mp.spawn(worker, args=(2, free_port(), tiny_model, pairs_dir, str(tmp_path), 4, [(0, 8), (8, 8)]), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    before, after, result = one_process_step(tiny_model, pairs_dir, 4)
    for name in before:
        assert torch.equal(ranks[0]["weights"]["end"][name], ranks[1]["weights"]["end"][name]), name
        torch.testing.assert_close(ranks[1]["weights"]["sgd"][name] - ranks[1]["weights"]["before"][name],
                                   after[name] - before[name], atol=1e-6, rtol=1e-5)
    for rank in ranks:
        assert rank["result"]["loss"] == pytest.approx(result["loss"], abs=1e-6)


@pytest.mark.slow
def test_fsdp2_step_gathers_a_full_checkpoint(tiny_model, pairs_dir, tmp_path):
    """Full fine-tuning under FSDP2 (4 turns per rank, 2 micro-batches): after every backward each
    rank holds only its shard of the gradients (reduce-scattered at once, never accumulated whole),
    the checkpoint gathered from the shards loads with from_pretrained, its optimizer state loads
    back from rank 0's memory map into every rank's shard, and its first step equals the
    one-process step."""
    os.makedirs(tmp_path / "sgd")
    mp.spawn(worker, args=(2, free_port(), tiny_model, pairs_dir, str(tmp_path), 0, [(0, 4), (4, 8)]), nprocs=2)
    for rank in range(2):
        holdings = torch.load(tmp_path / f"rank{rank}.pt")["holdings"]
        assert len(holdings) == 3 * 3  # 3 steps: before each of 2 micro-batches and before the clip
        assert all(unsharded == 0 and not_a_shard == 0 for unsharded, not_a_shard, _ in holdings), holdings
        assert all(held > 0 for _, _, held in holdings[1::3] + holdings[2::3])  # gradients after each backward
        # the resume's optimizer state: read memory-mapped by rank 0 alone, each rank's shard as it was saved
        resumed = torch.load(tmp_path / f"rank{rank}.pt")["resumed"]
        assert resumed["reads"] == ([True] if rank == 0 else []) and resumed["equal"]
    initial = selfplay.load_model(tiny_model, "cpu", torch.float32)
    end = selfplay.load_model(str(tmp_path / "ckpt-000003"), "cpu", torch.float32).state_dict()
    assert end.keys() == initial.state_dict().keys()
    assert all(not torch.equal(end[k], v) for k, v in initial.state_dict().items() if k.endswith("proj.weight"))
    optimizer_state = torch.load(tmp_path / "ckpt-000003" / "optimizer.pt", weights_only=True)
    assert len(optimizer_state["state"]) == len(list(initial.parameters()))  # gathered whole, every parameter
    sgd = selfplay.load_model(str(tmp_path / "sgd" / "ckpt-000001"), "cpu", torch.float32).state_dict()
    before, after, _ = one_process_step(tiny_model, pairs_dir, 0)
    assert max((after[n] - before[n]).abs().max().item() for n in before) > 1e-3
    for name in before:
        torch.testing.assert_close(sgd[name] - before[name], after[name] - before[name], atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# torchrun end to end


def torchrun(script, args, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]
    return subprocess.Popen(command, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def played(out, iteration):
    return [(g["pair_id"], g["spy"]) for g in map(json.loads, open(os.path.join(out, "games", f"iter_{iteration:06d}.jsonl")))]


@pytest.mark.slow
def test_run_sh_with_two_processes_plays_the_one_process_games(tiny_model, pairs_dir, tmp_path):
    """GPUS=2 run.sh: both stages, one metrics row per iteration, --games games per iteration (3
    games: shares of 1 and 2), the same pairs and spy seats as a one-process run."""
    env = {"QUICK": "1", "MODEL": tiny_model, "DATA": pairs_dir, "GAMES": "3", "EVAL_GAMES": "2", "ITERATIONS": "3",
           "EXTRA": "--max-new-tokens 6 --k-min 1 --patience 2 --samples 4 --lora-rank 4"}
    for gpus in ("1", "2"):
        result = run(["bash", "run.sh"], {**env, "GPUS": gpus, "OUT": str(tmp_path / gpus)})
        assert result.returncode == 0, result.stderr[-2000:]
    metrics = [json.loads(line) for line in open(tmp_path / "2" / "metrics.jsonl")]
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    assert [m["stage"] for m in metrics] == ["decision", "decision", "clue"]
    for iteration in (1, 2, 3):
        assert len(played(tmp_path / "2", iteration)) == 3
        assert played(tmp_path / "2", iteration) == played(tmp_path / "1", iteration)
    state = json.load(open(tmp_path / "2" / "ckpt-000003" / "state.json"))
    assert state["world_size"] == 2 and state["stage"] == "decision"
    # another number of processes says so in one line
    other = run([sys.executable, "rlvr.py", "--model", tiny_model, "--data", pairs_dir, "--out", str(tmp_path / "2"),
                 "--iterations", "5", "--games", "3", "--lora-rank", "4"])
    assert other.returncode != 0 and "trained with 2 processes" in other.stderr and "Traceback" not in other.stderr


@pytest.mark.slow
def test_killed_torchrun_resumes_without_logging_twice(tiny_model, pairs_dir, tmp_path):
    out = str(tmp_path / "run")
    args = ["--model", tiny_model, "--data", pairs_dir, "--out", out, "--iterations", "6", "--games", "2",
            "--max-new-tokens", "6", "--samples", "4", "--lora-rank", "4", "--schedule", "decision"]
    first = torchrun("rlvr.py", args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 2:
            break
        time.sleep(0.2)
    assert first.poll() is None, "the run ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    first.wait()
    killed_at = len(open(metrics).readlines())
    assert killed_at < 6
    second = torchrun("rlvr.py", args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr[-2000:]
    assert [json.loads(line)["iteration"] for line in open(metrics)] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(os.path.join(out, "games"))) == [f"iter_{i:06d}.jsonl" for i in range(1, 7)]
    assert json.load(open(os.path.join(out, "ckpt-000006", "state.json")))["iteration"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [4, 0])  # DDP, FSDP2
def test_cut_picture_in_a_torchrun_batch_is_replaced_and_the_run_resumes(tiny_model, pairs_dir, tmp_path, lora_rank):
    """A picture of iteration 1's batch that does not decode (rank 1's game): the next pair of the
    epoch order plays in its place, said in one line, so both ranks play a game and the run
    finishes (it hung under FSDP2, and stopped with 0 games on a rank under DDP); then it resumes."""
    from test_bad_data import copy_pairs, cut_picture
    data, out = tmp_path / "data", str(tmp_path / "run")
    copy_pairs(pairs_dir, data, 20)
    pairs = selfplay.read_pairs(str(data), "train")
    cfg = argparse.Namespace(seed=0, games=2)
    first, second = trainer.batch_pairs(pairs, 1, cfg), trainer.batch_pairs(pairs, 2, cfg)
    cut_picture(first[1])
    args = ["--model", tiny_model, "--data", str(data), "--out", out, "--games", "2", "--rounds", "1",
            "--max-new-tokens", "4", "--samples", "2", "--lora-rank", str(lora_rank), "--schedule", "decision"]
    for iterations in ("2", "3"):  # a run, then its resume
        process = torchrun("rlvr.py", [*args, "--iterations", iterations], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"the {iterations}-iteration run did not finish in 300 s")
        assert process.returncode == 0, stderr[-2000:]
        if iterations == "2":
            said = [line for line in stdout.splitlines() if line.startswith("dropping pair")]
            assert said == [line for line in said if line.endswith(f"; pair {second[0]['id']} plays in its place")]
            assert len(said) == 1 and said[0].startswith(f"dropping pair {first[1]['id']} from this batch")
    assert [pair_id for pair_id, _ in played(out, 1)] == [first[0]["id"], second[0]["id"]]
    assert [json.loads(line)["iteration"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]
