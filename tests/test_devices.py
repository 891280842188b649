"""Host memory: freed tensors are reused instead of faulted in afresh every step."""

from __future__ import annotations

import json
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


def _faults(mode: str) -> tuple[bool | None, list[int]]:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
    )
    applied, per_step = json.loads(out.stdout)
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
