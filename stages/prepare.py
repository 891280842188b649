"""Stage prepare: validate the entries and split them into train / val / test."""

from gpt2_instruct import pipeline
from gpt2_instruct.stage import run_stage

if __name__ == "__main__":
    run_stage(
        __doc__,
        {
            "raw": "data/raw/instruction-data.json",
            "out": "data/prepared",
            "metrics": "metrics/prepare.json",
        },
        lambda p, a: pipeline.prepare(p.prepare, a["raw"], a["out"], a["metrics"]),
    )
