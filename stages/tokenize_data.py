"""Stage tokenize: format each entry with the prompt style and encode it with GPT-2's BPE."""

from gpt2_instruct.stages import run_stage
from gpt2_instruct.stages.tokenize_data import tokenize

if __name__ == "__main__":
    run_stage(
        __doc__,
        {
            "prepared": "data/prepared",
            "encoding": "data/gpt2/encoding",
            "out": "data/tokenized",
            "metrics": "metrics/tokenize.json",
        },
        lambda p, a: tokenize(p.tokenize, a["prepared"], a["encoding"], a["out"], a["metrics"]),
    )
