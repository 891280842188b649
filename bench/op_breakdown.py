"""Where a training step or an evaluation of our model spends its time, op by op.

Every aten op that runs (forward, backward, optimizer) is timed with
``time.perf_counter`` by a ``TorchDispatchMode``, on the recipe's first shuffled
batches and random weights of the chosen shape:

* ``--phase train``: zero_grad, ``model.loss`` (under bf16 autocast with
  ``--dtype bf16``), backward, fused AdamW step: a step of ``train_step.py``;
* ``--phase eval``: ``model.loss`` under ``no_grad`` and one autocast region
  over all the batches, as ``Trainer.evaluate`` runs it.

Matrix products (``mm``, ``addmm``, ``bmm``) are counted in FLOPs, so their
achieved GFLOP/s can be set beside the square-matmul peak of the same run.
Casts (``_to_copy``) are split by direction and by what is cast: weights (a
parameter), weight gradients (a weight-shaped tensor cast to fp32) and
activations. Why not ``torch.profiler``: on this CPU it charged one cast of
gpt2's (50257, 768) embedding 82 ms where the cast, timed in place, takes 12-14 ms.

The mode costs ~10 us an op (``timer_overhead``: wall time with it over without);
ops run on the same threads as without it. CUDA ops are timed asynchronously
(launch time only), so the script runs on the CPU.

    python bench/op_breakdown.py --model gpt2-medium --dtype fp32 --phase train --steps 6
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Any

import torch
from common import (
    base_parser,
    build_model,
    collate_batches,
    first_batches,
    load_data,
    log,
    machine_info,
    matmul_peak,
    print_result,
    set_malloc,
    set_threads,
)
from torch.utils._python_dispatch import TorchDispatchMode

PRODUCTS = ("mm", "addmm", "bmm")


def product_flops(name: str, args: tuple[Any, ...]) -> int:
    """FLOPs of one matrix product from its operands (2 * M * K * N per matrix)."""
    a, b = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
    batch = a.shape[0] if name == "bmm" else 1
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


class OpTimer(TorchDispatchMode):
    """Seconds and calls per op name; FLOPs of matrix products; casts by what is cast."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.flops = 0
        self.casts: collections.Counter[str] = collections.Counter()
        self.weights = {p.data_ptr() for p in model.parameters()}
        self.weight_shapes = {tuple(p.shape) for p in model.parameters() if p.ndim == 2}

    def cast_kind(self, source: torch.Tensor, dtype: torch.dtype) -> str:
        """Weights (a parameter cast), their gradients (a weight-shaped cast to fp32), or
        activations (the rest), with the direction."""
        if source.data_ptr() in self.weights:
            what = "weights"
        elif dtype == torch.float32 and tuple(source.shape) in self.weight_shapes:
            what = "weight gradients"
        else:
            what = "activations"
        return f"{what} {source.dtype} -> {dtype}".replace("torch.", "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        start = time.perf_counter()
        out = func(*args, **kwargs)
        seconds = time.perf_counter() - start
        name = func.overloadpacket.__name__
        self.seconds[name] += seconds
        self.calls[name] += 1
        if name in PRODUCTS:
            self.flops += product_flops(name, args)
        elif name == "_to_copy" and "dtype" in kwargs:
            self.casts[self.cast_kind(args[0], kwargs["dtype"])] += seconds
        return out


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], default_model="gpt2")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--phase", choices=("train", "eval"), default="train")
    parser.add_argument("--steps", type=int, default=6, help="timed steps or eval batches")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="ops listed by time")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.device != "cpu":
        parser.error("--device: ops are timed on the CPU only (CUDA runs them asynchronously)")

    device = torch.device("cpu")
    threads = set_threads(args.threads)
    malloc = set_malloc(args.system_malloc, args.dtype)
    data = load_data(args.data_dir, synthetic=args.synthetic)
    n = args.warmup + args.steps
    batches = collate_batches(
        data.train, first_batches(data.train, n), pad_id=data.pad_id, device=device
    )
    model = build_model(args.model, args.seed)
    bf16 = args.dtype == "bf16"

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    if args.phase == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1, fused=True)

        def run(indices: range) -> None:
            for i in indices:
                x, y = batches[i]
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    loss = model.loss(x, y)
                loss.backward()
                optimizer.step()

    else:
        model.eval()

        def run(indices: range) -> None:
            with torch.no_grad(), autocast():
                for i in indices:
                    x, y = batches[i]
                    model.loss(x, y).item()

    log(f"{args.phase}: {args.warmup} warm-up, then {args.steps} timed without and with the timer")
    run(range(args.warmup))
    timed_range = range(args.warmup, n)
    start = time.perf_counter()
    run(timed_range)
    plain_s = (time.perf_counter() - start) / args.steps
    timer = OpTimer(model)
    start = time.perf_counter()
    with timer:
        run(timed_range)
    timed_s = (time.perf_counter() - start) / args.steps

    log(f"peak: timing square matmuls ({args.dtype})")
    peak, _ = matmul_peak(torch.bfloat16 if bf16 else torch.float32, device)
    per_step_ms = {k: v / args.steps * 1e3 for k, v in timer.seconds.most_common()}
    products_s = sum(timer.seconds[k] for k in PRODUCTS) / args.steps
    products_gflops = timer.flops / args.steps / products_s / 1e9 if products_s else 0.0
    ops_s = sum(timer.seconds.values()) / args.steps
    result: dict[str, Any] = {
        "benchmark": "op_breakdown",
        "phase": args.phase,
        "wall_ms": plain_s * 1e3,
        "timed_wall_ms": timed_s * 1e3,
        "timer_overhead": timed_s / plain_s,
        "ops_ms": ops_s * 1e3,
        "products_ms": products_s * 1e3,
        "products_share": products_s / ops_s,
        "products_gflops": products_gflops,
        "products_over_peak": products_gflops / peak,
        f"peak_{args.dtype}_gflops": peak,
        "top_ops_ms": dict(list(per_step_ms.items())[: args.top]),
        "casts_ms": {k: v / args.steps * 1e3 for k, v in timer.casts.most_common()},
        "calls_per_step": sum(timer.calls.values()) / args.steps,
        "model": args.model,
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "data": data.source,
        "threads": threads,
        "malloc": malloc,
        **machine_info(device),
    }
    print_result(result)


if __name__ == "__main__":
    main()
