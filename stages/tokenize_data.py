"""Stage tokenize: format each entry with the prompt style and encode it with GPT-2's BPE."""

from gpt2_instruct import pipeline
from gpt2_instruct.stage import run_stage

if __name__ == "__main__":
    run_stage(
        __doc__,
        {
            "prepared": "data/prepared",
            "encoding": "data/gpt2/encoding",
            "out": "data/tokenized",
            "metrics": "metrics/tokenize.json",
        },
        lambda p, a: pipeline.tokenize(
            p.tokenize, a["prepared"], a["encoding"], a["out"], a["metrics"]
        ),
    )
