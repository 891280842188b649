"""Host memory: freed tensors are reused instead of faulted in afresh every step, and bf16
training restarts with glibc's per-thread cache off so that they can be."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

SIZES_MB = (40, 96, 60)  # a "step": three large tensors, each one glibc would mmap
PAGES_PER_STEP = sum(SIZES_MB) * 2**20 // 4096
_FAULTS = f"""
import json, resource, sys, torch
from gpt2_instruct.devices import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
per_step = []
for _ in range(12):
    before = faults()
    tensors = [torch.empty(mb * 2**18, dtype=torch.float32).fill_(1.0) for mb in {SIZES_MB}]
    del tensors
    per_step.append(faults() - before)
print(json.dumps([applied, per_step]))
"""


def _python(script: str, *args: str, tunables: str | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter, ``GLIBC_TUNABLES=tunables`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=True, env=env
    )


def _faults(mode: str) -> tuple[bool | None, list[int]]:
    applied, per_step = json.loads(_python(_FAULTS, mode).stdout)
    return applied, per_step


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_not_faulted_in_again() -> None:
    _, system = _faults("system")
    applied, reused = _faults("reuse")
    assert applied is True
    # glibc's defaults unmap every large block on free: each step faults all its pages in.
    assert all(n >= PAGES_PER_STEP for n in system)
    # Kept for reuse: once the heap holds a step's blocks, later steps fault in nothing.
    assert sum(reused[-3:]) < PAGES_PER_STEP // 10
    assert sum(reused) < sum(system) / 2


_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
BLOCK = 64 * 2**20
_KEPT_HEAP = f"""
import json, torch
from gpt2_instruct.devices import reuse_freed_memory
assert reuse_freed_memory()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
sizes = []
for _ in range(8):
    block = torch.zeros({BLOCK} // 4)
    small = torch.zeros(2**18)  # allocated while the block is live, freed a step later
    del block
    sizes.append(rss())
print(json.dumps([size - sizes[0] for size in sizes]))
"""


@pytest.mark.skipif(not _GLIBC, reason="glibc's per-thread cache")
def test_kept_memory_serves_a_freed_block_again_only_with_the_per_thread_cache_off() -> None:
    cached = json.loads(_python(_KEPT_HEAP).stdout)
    uncached = json.loads(_python(_KEPT_HEAP, tunables="glibc.malloc.tcache_count=0").stdout)
    # The bytes trimmed off each aligned block wait in the cache and keep the freed
    # block from merging back: the same request takes new memory, again and again.
    assert cached[-1] >= 2 * BLOCK
    assert uncached[-1] <= BLOCK + 16 * 2**20


_RELAUNCH = """
import json, os, sys
from gpt2_instruct.devices import per_thread_cache_off, relaunch_without_per_thread_cache
info = [os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], per_thread_cache_off()]
print(json.dumps(info), flush=True)
relaunch_without_per_thread_cache(sys.argv[1], sys.argv[2])
print(json.dumps("trained"))
"""


def _relaunch(precision: str, strategy: str, tunables: str | None) -> tuple[list[object], str]:
    out = _python(_RELAUNCH, precision, strategy, tunables=tunables)
    return [json.loads(line) for line in out.stdout.splitlines()], out.stderr


@pytest.mark.skipif(not _GLIBC, reason="glibc's tunables")
@pytest.mark.parametrize(
    ("tunables", "expected"),
    [
        (None, "glibc.malloc.tcache_count=0"),
        ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0"),
    ],
)
def test_bf16_training_restarts_once_as_the_same_process_with_the_cache_off(
    tunables: str | None, expected: str
) -> None:
    (first, second, last), stderr = _relaunch("bf16", "ddp", tunables)
    assert stderr.splitlines() == [
        f"restarting with GLIBC_TUNABLES={expected} (bf16: freed memory kept for reuse; "
        "gpt2_instruct.devices.relaunch_without_per_thread_cache)"
    ]
    assert first == [first[0], tunables, ["bf16", "ddp"], False]
    # exec: the same PID and arguments, the tunable added to the user's own.
    assert second == [first[0], expected, ["bf16", "ddp"], True]
    assert last == "trained"


@pytest.mark.skipif(not _GLIBC, reason="glibc's tunables")
@pytest.mark.parametrize(
    ("precision", "strategy", "tunables"),
    [
        ("fp32", "ddp", None),  # fp32 is not hurt by the cache
        ("bf16", "fsdp", None),  # FSDP keeps glibc's defaults
        ("bf16", "ddp", "glibc.malloc.tcache_count=7"),  # the user's own choice
    ],
)
def test_no_restart_for_fp32_fsdp_or_a_cache_setting_of_the_users(
    precision: str, strategy: str, tunables: str | None
) -> None:
    (first, last), stderr = _relaunch(precision, strategy, tunables)
    assert first[1] == tunables and last == "trained" and stderr == ""
