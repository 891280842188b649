"""Stage fetch_gpt2: GPT-2's BPE files and base weights (hub, local directory or random)."""

from gpt2_instruct import pipeline
from gpt2_instruct.stage import run_stage

if __name__ == "__main__":
    run_stage(
        __doc__,
        {"encoding": "data/gpt2/encoding", "model": "data/gpt2/base"},
        lambda p, a: pipeline.fetch_gpt2(p.fetch_gpt2, a["encoding"], a["model"]),
    )
