"""The device seam: every platform-specific choice is decided here, and applied once.

A stage's frame (``gpt2_instruct.stages.run_stage``), the CLI and the benches call
``configure(device, precision, strategy)`` once, before any work. It resolves the device,
builds a ``Platform`` (a frozen record of every decision, each a plain function of the
device type, the precision and the parallel strategy, so it can be tested for CUDA on a
machine without one) and applies the process-wide ones:

============================  ================================  ============================
decision                      CPU                               CUDA
============================  ================================  ============================
vector math settled           yes (``cpu.settle_vector_math``)  no (no MKL VML)
freed host memory kept        yes, unless FSDP (``mallopt``)    no (glibc's defaults)
bf16 relaunch, no tcache      bf16 without FSDP, on glibc       no
products shaped for kernels   yes (``cpu.linear``)              no: ``F.linear``
loss on counted targets only  yes (``loss.Packing`` & co)       no: dense, no host syncs
updates in backward (auto)    yes (saves a gradient's memory)   no: one fused step
matmul precision              fp32 exact                        fp32 exact, or TF32 (tf32)
autocast                      bf16                              bf16
============================  ================================  ============================

The per-tensor choices (products, loss path, attention kernel) are asked of the
functions below with the tensor's device, so a model moved between devices follows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from dataclasses import dataclass
from typing import Literal

import torch

# glibc's mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's tunable for its per-thread cache of small freed chunks (read at process start).
_TCACHE_SETTING = "glibc.malloc.tcache_count"
_TCACHE_OFF = f"{_TCACHE_SETTING}=0"


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; a named device must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return device


Precision = Literal["fp32", "tf32", "bf16"]
Strategy = Literal["single", "ddp", "fsdp"]


def shapes_products(device: torch.device) -> bool:
    """Whether products are arranged for the CPU's kernels (``cpu.linear``): CPU only."""
    return device.type == "cpu"


def counts_only_targets(device: torch.device) -> bool:
    """Whether the loss runs the blocks and the head only where targets count (``loss``).

    On the CPU the saved work is most of a step (padding and prompts are half the
    positions of the reference's batches). Finding those positions reads a mask on the
    host (``nonzero``, boolean indexing): on CUDA that is a sync per forward, which
    stalls the GPU's queue and rules out CUDA graphs, and ``index_add_`` makes the tied
    gradient non-deterministic; the GPU computes the dense loss instead, same formula.
    """
    return device.type == "cpu"


def updates_in_backward(setting: bool | Literal["auto"], device: torch.device) -> bool:
    """``optimizer_in_backward``: ``auto`` is on where it pays, the CPU.

    Updating each weight in backward never holds all gradients (4 bytes a parameter,
    1.4 GB for gpt2-medium), which matters in a laptop's RAM; on a GPU it turns one
    fused AdamW launch into ~290 single-tensor steps, for memory a GPU does not miss.
    """
    return device.type == "cpu" if setting == "auto" else bool(setting)


@dataclass(frozen=True)
class Platform:
    """Every platform-specific choice of one process (see the module's table)."""

    device: torch.device
    precision: Precision = "fp32"
    strategy: Strategy = "single"

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def settles_vector_math(self) -> bool:
        return self.on_cpu

    @property
    def keeps_freed_memory(self) -> bool:
        """``tune_host_memory``'s choice: CPU training without FSDP, bf16 only once
        relaunched without glibc's per-thread cache."""
        if not self.on_cpu or self.strategy == "fsdp":
            return False
        return self.precision != "bf16" or per_thread_cache_off()

    @property
    def relaunches_without_per_thread_cache(self) -> bool:
        """``relaunch_without_per_thread_cache``'s choice (before the environment's say)."""
        return self.on_cpu and self.precision == "bf16" and self.strategy != "fsdp"

    @property
    def tf32_matmul(self) -> bool:
        """TF32 products: CUDA, ``precision: tf32`` only; fp32 stays exact."""
        return self.device.type == "cuda" and self.precision == "tf32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    @property
    def shapes_products(self) -> bool:
        return shapes_products(self.device)

    @property
    def counts_only_targets(self) -> bool:
        return counts_only_targets(self.device)

    def updates_in_backward(self, setting: bool | Literal["auto"]) -> bool:
        return updates_in_backward(setting, self.device)


def configure(
    device: str | torch.device = "auto",
    precision: Precision = "fp32",
    strategy: Strategy = "single",
    *,
    relaunch: bool = False,
) -> Platform:
    """Decide this process's platform and apply its process-wide choices, once, before work.

    ``relaunch``: the finetune stage's frame may replace the process by itself with
    glibc's per-thread cache off (``relaunch_without_per_thread_cache``); nothing else
    should. Calling it again (a torchrun rank) applies the same choices again: harmless.
    """
    resolved = device if isinstance(device, torch.device) else resolve_device(device)
    chosen = Platform(resolved, precision, strategy)
    if relaunch and chosen.relaunches_without_per_thread_cache:
        relaunch_without_per_thread_cache(precision, strategy, chosen.device)
    if chosen.settles_vector_math:
        from gpt2_instruct.cpu import settle_vector_math  # torch-only; no cycle at import

        settle_vector_math()
    if chosen.keeps_freed_memory:
        reuse_freed_memory()
    if chosen.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = chosen.tf32_matmul
        torch.backends.cudnn.allow_tf32 = chosen.tf32_matmul
    return chosen


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for the next allocation instead of unmapping it.

    PyTorch's CPU tensors come straight from malloc. glibc serves blocks over 32 MB
    (logits, the tied embedding's gradient, activations of a long batch) with a fresh
    ``mmap`` and unmaps them on free, so every training step faults in ~1 GB of new
    zeroed pages. Serving every block from the heap and never trimming it keeps those
    pages: a gpt2-medium fp32 step on our 2-core machine takes 4.1 s instead of 5.0 s
    (``bench/train_step.py`` with and without ``--system-malloc``) at the same peak RSS;
    RSS no longer falls between steps. Nothing computed changes. True when applied;
    False off glibc (a no-op).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both documented in mallopt(3): 0 mmaps for large blocks, -1 disables trimming.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def _glibc_tunables() -> list[str]:
    """This process's ``GLIBC_TUNABLES`` entries (``name=value``), in order."""
    return [entry for entry in os.environ.get("GLIBC_TUNABLES", "").split(":") if entry]


def per_thread_cache_off() -> bool:
    """Whether this process started with glibc's per-thread cache off (``GLIBC_TUNABLES``)."""
    return _TCACHE_OFF in _glibc_tunables()


def tune_host_memory(strategy: str, precision: str, device: str | torch.device = "cpu") -> bool:
    """Keep freed memory (``reuse_freed_memory``) for CPU training without FSDP, where it pays.

    Kept memory pays only where every step allocates the same blocks, so the heap
    stops growing (fp32, gpt2 shape: 3.0 GB and no page faults from step 70 to 150).
    FSDP gathers and frees blocks of every size (2-rank gpt2-medium peak RSS
    5.0 -> 9.1 GiB per rank, and FSDP is chosen for its memory): glibc's defaults.
    bf16 keeps freed memory only with glibc's per-thread cache off
    (``relaunch_without_per_thread_cache``): with the cache on, the kept heap grew
    without end (gpt2 shape: 2.5 -> 8.9 GB over 150 steps); with it off it levels off
    where glibc's defaults do (gpt2 shape, 50 steps of mixed lengths: 4.6 against 4.7 GB).
    On CUDA the host holds no activations: glibc's defaults. True when freed memory is kept.
    """
    chosen = Platform(torch.device(device), precision, strategy)  # type: ignore[arg-type]
    return chosen.keeps_freed_memory and reuse_freed_memory()


def relaunch_without_per_thread_cache(
    precision: str, strategy: str, device: str | torch.device = "cpu"
) -> None:
    """For bf16 CPU training on glibc, replace this process by itself with the per-thread cache off.

    torch allocates with ``posix_memalign``, and glibc frees the few bytes it trims off
    each aligned block into its per-thread cache, where they never merge with their
    neighbours; a freed block then cannot serve the same request again (with memory
    kept, a 64 MB ``torch.zeros`` in a loop grew the heap by 64 MB three times over).
    fp32 steps repeat the same blocks and are not hurt; bf16's casts and mixed sizes
    are. The cache can only be turned off before a process starts, hence the ``exec``:
    same PID, same arguments, ``GLIBC_TUNABLES`` extended. gpt2-medium, bf16, on the
    reference's batches, the same hour: 2.80 s a step and 6.5 s an evaluation, against
    3.67 s and 9.8 s with glibc's defaults; the finetune stage 1.24-1.35x faster at a
    peak RSS of 7.42 against 7.61-7.67 GiB (``bench/README.md``). Since bf16 products
    stopped compiling a kernel per row count (``cpu.linear``), a gpt2 bf16 run keeps a
    flat heap from its third step with the cache off (2.81 GB over 60 steps) and still
    grows with it on (2.65 -> 3.39 GB). What is computed does not change. A
    ``glibc.malloc.tcache_count`` the user set is left alone
    (``GLIBC_TUNABLES=glibc.malloc.tcache_count=7`` keeps glibc's defaults).
    """
    tunables = _glibc_tunables()
    chosen = Platform(torch.device(device), precision, strategy)  # type: ignore[arg-type]
    if (
        not chosen.relaunches_without_per_thread_cache
        or any(entry.partition("=")[0] == _TCACHE_SETTING for entry in tunables)
        or not sys.platform.startswith("linux")
        or platform.libc_ver()[0] != "glibc"
    ):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join([*tunables, _TCACHE_OFF]))
    print(
        f"restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (bf16: freed memory kept for "
        "reuse; gpt2_instruct.devices.relaunch_without_per_thread_cache)",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
