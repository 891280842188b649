"""SDPA kernels for training-shaped causal attention: flash against math, fp32 and bf16.

``MultiHeadAttention`` trains with the math kernel when q is bf16 on the CPU and leaves
the choice to PyTorch otherwise (``cpu.attention_backend``); this is the measurement
behind that rule. One call is ``scaled_dot_product_attention(q, k, v, is_causal=True)``
on (batch, heads, positions, head size) tensors, then ``backward`` of its sum; the
forward alone is timed under ``no_grad``. Median of ``--repeats`` after two warm-up calls.

    python bench/attention.py --batch 8 --heads 12 --positions 70 --head-size 64
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import log, machine_info, print_result, set_malloc, set_threads, time_steps
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU = torch.device("cpu")


def _median_ms(fn: Callable[[], None], repeats: int) -> float:
    times, _ = time_steps(lambda _: fn(), warmup=2, steps=repeats, device=CPU)
    return statistics.median(times) * 1e3


def _time_kernel(
    kernel: SDPBackend, qkv: tuple[torch.Tensor, ...], repeats: int
) -> tuple[float, float]:
    """(forward + backward ms, forward ms) of one kernel."""
    q, k, v = qkv

    def train() -> None:
        with sdpa_kernel(kernel):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def forward() -> None:
        with sdpa_kernel(kernel), torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return _median_ms(train, repeats), _median_ms(forward, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--positions", type=int, default=70, help="the recipe's mean width")
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--system-malloc", action="store_true")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    malloc = set_malloc(args.system_malloc)

    shape = (args.batch, args.heads, args.positions, args.head_size)
    result: dict[str, object] = {"benchmark": "attention", "shape": list(shape)}
    for dtype_name, dtype in DTYPES.items():
        qkv = tuple(torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
        train_ms = {}
        for kernel_name, kernel in KERNELS.items():
            log(f"{dtype_name} {kernel_name}")
            key = f"{dtype_name}_{kernel_name}"
            train_ms[kernel_name], result[f"{key}_forward_ms"] = _time_kernel(
                kernel, qkv, args.repeats
            )
            result[f"{key}_train_ms"] = train_ms[kernel_name]
        result[f"{dtype_name}_ratio_train_flash_over_math"] = train_ms["flash"] / train_ms["math"]
    result.update({"threads": threads, "malloc": malloc, **machine_info(CPU)})
    print_result(result)


if __name__ == "__main__":
    main()
