"""Data-parallel fine-tuning with PyTorch's own engine: torchrun + DistributedDataParallel.

How to run it
-------------
* ``finetune.distributed.nproc_per_node: N`` (N > 1) in ``params.yaml``: ``dvc repro`` /
  ``python stages/finetune.py`` relaunches itself as
  ``python -m torch.distributed.run --standalone --nproc-per-node N stages/finetune.py ...``
  (:func:`maybe_relaunch`), one process per GPU (or N CPU processes with gloo).
* Or start torchrun yourself: ``torchrun --nproc-per-node 4 stages/finetune.py``. Several
  machines: torchrun's own flags on each node, e.g. ``torchrun --nnodes 2 --nproc-per-node 8
  --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id job1 stages/finetune.py``; the
  checkpoint directory must then be on a filesystem every node shares (resume checks that
  all ranks agree). Under torchrun the world size comes from torchrun, not from params.
  torchrun's parser reads ``--log`` as an abbreviation of its ``--log-dir``: on a
  hand-written torchrun line keep the stage's default paths (the relaunch is immune).

What each rank does
-------------------
Every rank builds the same :class:`~gpt2_instruct.batching.BatchOrder` (same seed), so all
agree on each global batch; rank r trains on the r-th contiguous share of it, so
``batch_size`` is the global batch and must be divisible by the world size. A rank's loss
is its summed token losses over the global number of counted targets, times the world size:
DDP averages gradients over ranks, so the update is the single-process update of the whole
batch (up to float summation order). Rank 0 alone evaluates, logs and writes checkpoints
and outputs; the other ranks still make the random draws that evaluation makes on the batch
order, so every rank's shuffle stays in step. A checkpoint resumes under any world size.

Failure and shutdown: a rank that raises exits; torchrun then stops the others and exits
non-zero with its summary. A rank stuck in a collective fails after ``timeout_s``
(gloo, and NCCL's watchdog). Ctrl-C is agreed on by all ranks at a step boundary, so they
stop together and rank 0 writes a checkpoint (torchrun waits 30 s before SIGKILL).

FSDP (``strategy: fsdp``)
------------------------
DDP keeps a full replica per process, plus its all-reduce buckets (~4 bytes per parameter).
Full fine-tuning with fp32 AdamW needs ~16 bytes per parameter (4 weight + 4 gradient +
8 for Adam's two moments) plus activations: gpt2-medium (355M) ~5.7 GB, gpt2-large (774M)
~12.4 GB, gpt2-xl (1.56B) ~25 GB before activations, beyond one 24 GB GPU. FSDP2
(``torch.distributed.fsdp.fully_shard``, ZeRO-3) keeps 1/N of the weights, gradients and
optimizer state on each of N ranks and gathers one transformer block's weights at a time
for the forward and backward passes: gpt2-xl's 25 GB become ~6.3 GB per GPU on 4 GPUs,
plus one block's full weights and the activations. ``bench/fsdp_memory.py`` measures it.

The recipe is the same: every rank trains its share of the global batch and the
reduce-scatter averages gradients as DDP's all-reduce does. What differs: the forward
passes are collective, so every rank runs the periodic evaluation (on the same batches,
rank 0 logs it); checkpoints hold full (gathered) weights and optimizer state in the
single-process layout, so a run resumes under any strategy and world size; at the end
the ranks gather the weights once and rank 0 keeps a plain model for export.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gpt2_instruct.devices import resolve_device
from gpt2_instruct.model import GPTModel
from gpt2_instruct.params import DistributedParams

TORCHRUN_ENV = ("LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; the default is a single process."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes; the others only train."""
        return self.rank == 0


def under_torchrun() -> bool:
    """True in a process that torchrun (or another env:// launcher) started."""
    return any(name in os.environ for name in TORCHRUN_ENV)


def world_from_env() -> World:
    """The world torchrun describes in the environment; a single process otherwise."""
    if not under_torchrun():
        return World()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return World(rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", str(rank))), size=size)


def maybe_relaunch(nproc: int, argv: list[str]) -> int | None:
    """Run ``argv`` (script + args) under torchrun with ``nproc`` processes; its exit code.

    None when there is nothing to do (one process, or already under torchrun): the
    caller then trains in this process. torchrun runs in this process as the agent, so
    Ctrl-C reaches the workers the way it does when a user starts torchrun.
    """
    if nproc <= 1 or under_torchrun():
        return None
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.run import parse_args, run

    # The script's own options are set aside, not parsed: argparse would take an
    # abbreviation such as --log for one of torchrun's options (--log-dir).
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", argv[0]])
    args.training_script_args = list(argv[1:])
    try:
        record(run)(args)  # what torchrun's main does, less the parsing
    except ChildFailedError as err:
        print(err, file=sys.stderr, flush=True)
        code = err.get_first_failure()[1].exitcode
        if code < 0:  # killed by a signal: the shell's convention
            return 128 - code
        return code or 1
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


def rank_device(name: str, world: World) -> torch.device:
    """The device of this rank: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` when distributed."""
    if world.size > 1 and name.startswith("cuda:"):
        raise ValueError(
            f"device {name!r} pins one GPU for every rank; with distributed training use "
            "'auto' or 'cuda' (each rank takes cuda:LOCAL_RANK)"
        )
    device = resolve_device(name)
    if world.size == 1 or device.type != "cuda":
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"local rank {world.local_rank} has no GPU: only {torch.cuda.device_count()} "
            "visible; lower finetune.distributed.nproc_per_node"
        )
    return torch.device("cuda", world.local_rank)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: NCCL for CUDA tensors, gloo for CPU ones."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend nccl needs CUDA devices, but training runs on {device}")
    return backend


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def process_group(params: DistributedParams, device: str) -> Iterator[World]:
    """Join torchrun's process group for the duration; a no-op for a single process.

    The group is destroyed on the way out whatever happens, so a failing rank exits
    promptly (torchrun then stops the others) instead of holding its peers.
    """
    world = world_from_env()
    if world.size == 1:
        if params.nproc_per_node > 1 and not under_torchrun():
            _log(
                f"distributed: nproc_per_node is {params.nproc_per_node} but this process was "
                "not started by torchrun: training in one process (stages/finetune.py relaunches)"
            )
        yield world
        return
    rank_dev = rank_device(device, world)
    backend = resolve_backend(params.backend, rank_dev)
    if rank_dev.type == "cuda":
        torch.cuda.set_device(rank_dev)
    dist.init_process_group(
        backend,
        timeout=timedelta(seconds=params.timeout_s),
        device_id=rank_dev if rank_dev.type == "cuda" else None,
    )
    try:
        if world.is_main:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
            note = (
                f" (torchrun's {local} per node, not params' {params.nproc_per_node})"
                if local != params.nproc_per_node
                else ""
            )
            _log(f"distributed: {world.size} processes{note}, backend {backend}")
        yield world
        # Clean exit: all ranks meet, then give gloo's worker threads a moment to release
        # finished work. They need the GIL for that, and destroying the group below joins
        # them while holding it: without the pause that join can deadlock.
        dist.barrier()
        time.sleep(0.2)
    finally:
        dist.destroy_process_group()


class _LossForward(nn.Module):
    """Makes ``GPTModel.loss`` the forward: DDP arms its gradient sync only inside forward."""

    def __init__(self, model: GPTModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "sum"
    ) -> torch.Tensor:
        return self.model.loss(inputs, targets, reduction=reduction)


def wrap_ddp(model: GPTModel, device: torch.device) -> DistributedDataParallel:
    """DDP over ``model``'s loss; construction broadcasts rank 0's weights to every rank."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(_LossForward(model), device_ids=device_ids)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over all ranks of a few numbers (float64: counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_equal(value: int, device: torch.device) -> bool:
    """Whether every rank passed the same integer (one all-reduce of max(v), max(-v))."""
    tensor = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor[0].item() == -tensor[1].item()


def barrier(device: torch.device) -> None:
    """Wait for every rank; an all-reduce, which needs no device hint on any backend."""
    all_reduce_sum([0.0], device)


# ---------------------------------------------------------------------- FSDP
def shard_fsdp(model: GPTModel, device: torch.device, world: World) -> None:
    """Shard ``model`` in place over every rank: one FSDP unit per block, the rest in the root.

    The root unit holds the embeddings, the output head (tied or separate), the final
    norm and any head adapter; ``GPTModel.loss`` becomes a method that gathers them.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world.size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "loss")


def _full_options(*, gather: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=gather)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gathered weights of a sharded model, on CPU on rank 0 ({} on the others).

    Every rank must call it (the gathers are collective).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(gather=True))


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Each optimizer group's parameter names, in the group's order."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [[names[id(param)] for param in group["params"]] for group in optimizer.param_groups]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The gathered optimizer state in ``optimizer.state_dict()``'s layout, on rank 0.

    PyTorch's full state dict names parameters; a single process numbers them in group
    order. Numbering them here lets a sharded run's checkpoint resume in one process
    (and the other way round). {} on ranks other than 0; every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=_full_options(gather=True))
    if not named:
        return {}
    index = {
        name: i for i, name in enumerate(n for g in _optimizer_names(model, optimizer) for n in g)
    }
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]
    return {"state": {index[n]: v for n, v in named["state"].items()}, "param_groups": groups}


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Shard a full (single-process layout) checkpoint into this rank's model and optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    group_names = _optimizer_names(model, optimizer)
    flat = [name for names in group_names for name in names]
    named = {
        "state": {flat[int(i)]: v for i, v in optimizer_state["state"].items()},
        "param_groups": [
            {**saved, "params": names}
            for saved, names in zip(optimizer_state["param_groups"], group_names, strict=True)
        ],
    }
    set_model_state_dict(model, model_state, options=_full_options(gather=False))
    set_optimizer_state_dict(model, optimizer, named, options=_full_options(gather=False))
