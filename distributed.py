"""
distributed.py: data-parallel training over several processes with torch.distributed, started by
torchrun; every function here is a no-op (or the identity) in a plain `python rlvr.py` run.

What is split and what is synchronised (docs/multi-gpu.md says more):
  - each rank plays a contiguous share of the iteration's games (`my_share`); the games of all
    ranks are then gathered in rank order (`gather_games`), so every rank scores, logs and computes
    the RAE baselines and the decision statistics over the same global batch, in the order of a
    one-process run;
  - each rank trains on the samples of its own games (`own_samples`); the gradients are averaged
    by DistributedDataParallel (LoRA: only the adapter is trainable, so only it is synchronised) or
    reduce-scattered by FSDP2's fully_shard (full fine-tuning, the reference model sharded too);
  - the loss is the mean over ALL ranks' sequences: with unequal shares each rank scales its loss
    by world_size * local count / global count, since both wrappers average gradients over ranks.

    torchrun --nproc_per_node 2 rlvr.py --model tiny-vlm --data games/clevr --out runs/ddp
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import models


def init():
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...): nccl on
    GPUs, gloo on the CPU. Without torchrun (no WORLD_SIZE) nothing happens."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def active():
    return dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """Rank 0 alone writes metrics, games, checkpoints and the config."""
    return rank() == 0


def device(requested):
    """This rank's GPU under torchrun (cuda:LOCAL_RANK), else the device asked for."""
    if active() and requested == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    return requested


def check_split(cfg):
    """Every rank needs games. FSDP2 runs collectives in every forward pass, and --minibatches > 1
    needs the same number of optimiser steps everywhere: both need equal shares."""
    w = world_size()
    if cfg.games < w:
        sys.exit(f"error: --games {cfg.games} is fewer than the {w} processes: give each at least one game")
    if (cfg.lora_rank == 0 or cfg.minibatches > 1) and cfg.games % w:
        sys.exit(f"error: --games {cfg.games} must be a multiple of the {w} processes with --lora-rank 0 "
                 "(FSDP2) or --minibatches > 1")


def check_resume(saved_world_size, out):
    """A run replays exactly only with its own number of processes (sampling seeds and shares)."""
    if saved_world_size != world_size():
        sys.exit(f"error: the run in {out} was trained with {saved_world_size} processes, not {world_size()}: "
                 f"resume it with torchrun --nproc_per_node {saved_world_size} (or python for 1)")


def my_share(n):
    """The slice of n global items (an iteration's games) that this rank plays: contiguous, so
    the shares concatenated in rank order are the one-process order."""
    r, w = rank(), world_size()
    return slice(r * n // w, (r + 1) * n // w)


def total(value):
    """The sum of a number over all ranks (the number itself in one process)."""
    if not active():
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return type(value)(tensor.item()) if isinstance(value, int) else tensor.item()


def largest(value):
    """The largest of a number over all ranks (the number itself in one process), of its type."""
    if not active():
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return type(value)(tensor.item())


def _collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_games(games):
    """All ranks' games in rank order. The other ranks' games travel without their pictures (the
    scores, logs and statistics need only the text); this rank's own games are kept as they are."""
    if not active():
        return games
    from dataclasses import replace
    light = [replace(g, clues=[replace(t, image=None) for t in g.clues],
                     decisions=[replace(t, image=None) for t in g.decisions]) for g in games]
    shares = [None] * world_size()
    dist.all_gather_object(shares, light)
    shares[rank()] = games
    return [g for share in shares for g in share]


def own_samples(turns, advantages, games):
    """The training samples that belong to this rank's games (all of them in one process)."""
    if not active():
        return turns, advantages
    mine = {id(t) for g in games for t in g.clues + g.decisions}
    kept = [(t, a) for t, a in zip(turns, advantages) if id(t) in mine]
    return [t for t, _ in kept], [a for _, a in kept]


class DataParallel(DistributedDataParallel):
    """DDP that still looks like the Hugging Face model it wraps (generate, save_pretrained,
    disable_adapter, config): forward passes that train go through DDP, the rest to the model."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model, cfg):
    """LoRA: DDP over the adapter (the frozen base is not synchronised). Full fine-tuning: FSDP2,
    one shard unit per decoder layer plus the root, fp32 master parameters and cfg.dtype compute.
    The identity in one process."""
    if not active():
        return model
    if cfg.lora_rank > 0:
        # no buffer broadcast: forward passes then need no collective, so ranks may run different
        # numbers of them (generation, micro-batches); only each optimiser step's backward syncs
        return DataParallel(model, broadcast_buffers=False)
    return shard(model.float(), cfg.dtype)


def shard(model, compute_dtype):
    """fully_shard every decoder layer and vision tower layer, the vision tower (generate runs it
    outside the model's forward) and the whole model, innermost first (models.shard_units). Also
    used for the frozen reference."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    precision = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for module in models.shard_units(model):
        fully_shard(module, mp_policy=precision)
    fully_shard(model, mp_policy=precision)
    # FSDP2 takes the module of the first forward pass for the root; generate runs the vision
    # tower before any, so one token goes through the whole model first. The root stays gathered
    # after a forward pass: reshard it, so that the optimizer is given the shards.
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=model.device))
    model.reshard()
    return model


def wrap_reference(model, cfg):
    """The frozen reference of a full fine-tune is sharded like the policy (in cfg.dtype)."""
    return shard(model, cfg.dtype) if active() else model


def is_sharded(model):
    """Generation on a sharded model must keep every rank stepping until all have finished."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def sync_gradients(model, last):
    """Whether the next backward synchronises gradients across ranks. DDP: only the last
    micro-batch of an optimiser step all-reduces, the others accumulate locally (the adapter's
    gradient is small). FSDP2 reduce-scatters after every micro-batch whatever `last` says: turning
    that off would make it accumulate the whole model's gradient unsharded, in fp32, on every rank
    (33 GB at 7B)."""
    if isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = last  # what DDP's no_sync() context sets


def full_states(model, optimizer):
    """(full model state dict or None, optimizer state dict) to save. Under FSDP2 both are gathered
    from the shards (a collective: every rank calls it) onto the CPU; otherwise the model saves
    itself and the optimizer's state is the same on every rank."""
    if not is_sharded(model):
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def save_pretrained(model, folder, weights):
    """model.save_pretrained, from the gathered full state dict under FSDP2."""
    if weights is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, state_dict=weights)


def load_optimizer(model, optimizer, path):
    """Load the optimizer.pt that full_states saved, memory-mapped: its pages are read as they are
    copied, never the whole file into host memory at once. Under FSDP2 rank 0 alone reads it and
    broadcasts it tensor by tensor, each rank keeping its shard (at 7B the file is 66 GB: every rank
    loading it whole took ~530 GB of host memory on 8 ranks). Otherwise (one process, or DDP's
    adapter-sized state) each rank maps the file; the ranks of a node share its page cache."""
    def read():
        return torch.load(path, weights_only=True, mmap=True, map_location="cpu")

    if not is_sharded(model):
        optimizer.load_state_dict(read())
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, read() if is_main() else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def finish():
    """Leave the process group at the end of a run (torchrun otherwise warns)."""
    if dist.is_initialized():
        dist.destroy_process_group()
