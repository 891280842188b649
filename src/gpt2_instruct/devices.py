"""Which torch device a stage, the chat command or a rank runs on, and how it uses host memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

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


def _kept_memory_needs_per_thread_cache_off(strategy: str, precision: str) -> bool:
    """Whether this training keeps freed memory only with glibc's per-thread cache off:
    bf16 without FSDP (``tune_host_memory``, ``relaunch_without_per_thread_cache``)."""
    return precision == "bf16" and strategy != "fsdp"


def tune_host_memory(strategy: str, precision: str) -> bool:
    """Keep freed memory (``reuse_freed_memory``) for training without FSDP, where it pays.

    Kept memory pays only where every step allocates the same blocks, so the heap
    stops growing (fp32, gpt2 shape: 3.0 GB and no page faults from step 70 to 150).
    FSDP gathers and frees blocks of every size (2-rank gpt2-medium peak RSS
    5.0 -> 9.1 GiB per rank, and FSDP is chosen for its memory): glibc's defaults.
    bf16 keeps freed memory only with glibc's per-thread cache off
    (``relaunch_without_per_thread_cache``): with the cache on, the kept heap grew
    without end (gpt2 shape: 2.5 -> 8.9 GB over 150 steps); with it off it levels off
    where glibc's defaults do (gpt2 shape, 50 steps of mixed lengths: 4.6 against 4.7 GB).
    True when freed memory is kept.
    """
    if strategy == "fsdp" or (
        _kept_memory_needs_per_thread_cache_off(strategy, precision) and not per_thread_cache_off()
    ):
        return False
    return reuse_freed_memory()


def relaunch_without_per_thread_cache(precision: str, strategy: str) -> None:
    """For bf16 training on glibc, replace this process by itself with the per-thread cache off.

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
    if (
        not _kept_memory_needs_per_thread_cache_off(strategy, precision)
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
