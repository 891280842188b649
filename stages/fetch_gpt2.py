"""Stage fetch_gpt2: GPT-2's BPE files and base weights (hub, local directory or random)."""

from gpt2_instruct.stages import run_stage
from gpt2_instruct.stages.fetch_gpt2 import fetch_gpt2

if __name__ == "__main__":
    run_stage(
        __doc__,
        {"encoding": "data/gpt2/encoding", "model": "data/gpt2/base"},
        lambda p, a: fetch_gpt2(p.fetch_gpt2, a["encoding"], a["model"]),
    )
