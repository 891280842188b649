"""Which torch device a stage, the chat command or a rank runs on, and how it uses host memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

# glibc's mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


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


def tune_host_memory(strategy: str, precision: str) -> bool:
    """Keep freed memory (``reuse_freed_memory``) for fp32 training without FSDP.

    Kept memory pays only where every step allocates the same blocks, so the heap
    stops growing (fp32, gpt2 shape: 3.0 GB and no page faults from step 70 to 150).
    FSDP gathers and frees blocks of every size (2-rank gpt2-medium peak RSS
    5.0 -> 9.1 GiB per rank, and FSDP is chosen for its memory); bf16 autocast adds
    bf16 copies of every weight and gradient between the activations, and the kept
    heap grew without end (gpt2 shape: 2.5 -> 8.9 GB over 150 steps, against 1 GB
    with glibc's defaults). Both keep glibc's defaults. True when freed memory is kept.
    """
    return strategy != "fsdp" and precision == "fp32" and reuse_freed_memory()
