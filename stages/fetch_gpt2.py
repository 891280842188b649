"""Stage fetch_gpt2: GPT-2's BPE files and base weights (hub, local directory or random).

The hub source honours HF_TOKEN, HF_ENDPOINT (while fetch_gpt2.hub_url is null), HF_HOME and
HF_HUB_OFFLINE; the commit it used and each file's sha256 go to <model>/source.json.
"""

from gpt2_instruct.stages import run_stage
from gpt2_instruct.stages.fetch_gpt2 import fetch_gpt2

if __name__ == "__main__":
    run_stage(
        __doc__,
        {"encoding": "data/gpt2/encoding", "model": "data/gpt2/base"},
        lambda p, a: fetch_gpt2(p.fetch_gpt2, a["encoding"], a["model"]),
    )
