"""Per-rank memory of data-parallel training, DDP against FSDP: the figures behind ``fsdp``.

Each strategy runs as its own torchrun job of ``--nproc`` CPU ranks (gloo) started the way
the finetune stage starts one (``distributed.maybe_relaunch``). Every rank trains
``--steps`` steps of the recipe (global batch 8, the reference's first batches, fused
AdamW) on a randomly initialised ``--model`` and reports what it holds afterwards: the
bytes of its weights, gradients and AdamW moments (its shards under FSDP), its peak RSS
and its time per step. Prints readable lines, then one JSON line last.

    python bench/fsdp_memory.py --model gpt2-medium --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import (
    GIB,
    build_model,
    load_data,
    log,
    machine_info,
    peak_rss_gb,
    print_result,
)

STRATEGIES = ("ddp", "fsdp")


def _local_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes this rank stores for ``tensors`` (a DTensor's local shard only)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def _worker(args: argparse.Namespace) -> None:
    """One rank: train a few steps, then write what it holds to ``args.out/rank{r}.json``."""
    from gpt2_instruct import distributed
    from gpt2_instruct.devices import tune_host_memory
    from gpt2_instruct.params import DistributedParams, FinetuneParams
    from gpt2_instruct.training import Trainer

    torch.set_num_threads(args.threads)
    tune_host_memory(args.worker, "fp32")  # as the finetune stage's ranks do
    dist_params = DistributedParams(nproc_per_node=args.nproc, timeout_s=1800, strategy=args.worker)
    with distributed.process_group(dist_params, "cpu") as world:
        data = load_data(synthetic=args.synthetic)
        model = build_model(args.model, args.seed)
        n_params = model.num_parameters()
        params = FinetuneParams(
            batch_size=8, max_steps=args.steps, eval_every=10**6, eval_batches=1,
            device="cpu", distributed=dist_params,
        )  # fmt: skip
        trainer = Trainer(
            model, data.train, data.val, params, pad_id=data.pad_id, progress=False, world=world
        )
        state = trainer.train()
        parameters = list(trainer.model.parameters())
        moments = [
            value
            for per_param in trainer.optimizer.state.values()
            for value in per_param.values()
            if isinstance(value, torch.Tensor) and value.numel() > 1
        ]
        report = {
            "rank": world.rank,
            "weights_gb": _local_bytes(parameters) / GIB,
            "gradients_gb": _local_bytes([p.grad for p in parameters if p.grad is not None]) / GIB,
            "adam_gb": _local_bytes(moments) / GIB,
            "peak_rss_gb": peak_rss_gb(),
            # Includes the reference's step-0 evaluation (one batch here).
            "seconds_per_step": state.seconds / args.steps,
            "parameters": n_params,
        }
        report["training_state_gb"] = sum(
            report[k] for k in ("weights_gb", "gradients_gb", "adam_gb")
        )
        trainer.release_distributed()
    (Path(args.out) / f"rank{world.rank}.json").write_text(json.dumps(report), encoding="utf-8")


def _run(strategy: str, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """One torchrun job with ``strategy``; the per-rank reports."""
    log(f"{strategy}: {args.nproc} ranks, {args.model}, {args.steps} steps")
    code = (
        "import sys; from gpt2_instruct.distributed import maybe_relaunch; "
        f"sys.exit(maybe_relaunch({args.nproc}, sys.argv[1:]))"
    )
    worker_args = [
        "--worker", strategy, "--out", str(out), "--model", args.model,
        "--steps", str(args.steps), "--nproc", str(args.nproc), "--threads", str(args.threads),
        "--seed", str(args.seed), *(["--synthetic"] if args.synthetic else []),
    ]  # fmt: skip
    subprocess.run(
        [sys.executable, "-c", code, __file__, *worker_args],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    return [
        json.loads((out / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(args.nproc)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="GPT-2 shape (gpt2, gpt2-medium, ...)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2, help="ranks (CPU processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--synthetic", action="store_true", help="ignore ../shared/data")
    parser.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    result: dict[str, Any] = {
        "model": args.model, "nproc": args.nproc, "steps": args.steps,
        **machine_info(torch.device("cpu")),
    }  # fmt: skip
    for strategy in STRATEGIES:
        with tempfile.TemporaryDirectory() as tmp:
            ranks = _run(strategy, args, Path(tmp))
        result["parameters"] = ranks[0]["parameters"]
        for key in ("training_state_gb", "weights_gb", "gradients_gb", "adam_gb", "peak_rss_gb"):
            result[f"{strategy}_{key}"] = max(r[key] for r in ranks)  # the fullest rank
        result[f"{strategy}_seconds_per_step"] = max(r["seconds_per_step"] for r in ranks)
    result["ratio_training_state"] = (
        result["fsdp_training_state_gb"] / result["ddp_training_state_gb"]
    )
    result["ratio_peak_rss"] = result["fsdp_peak_rss_gb"] / result["ddp_peak_rss_gb"]
    result["ratio_seconds_per_step"] = (
        result["fsdp_seconds_per_step"] / result["ddp_seconds_per_step"]
    )
    print_result(result)


if __name__ == "__main__":
    main()
