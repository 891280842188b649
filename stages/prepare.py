"""Stage prepare: validate the entries and split them into train / val / test."""

from gpt2_instruct.stages import run_stage
from gpt2_instruct.stages.prepare import prepare

if __name__ == "__main__":
    run_stage(
        __doc__,
        {
            "raw": "data/raw/instruction-data.json",
            "out": "data/prepared",
            "metrics": "metrics/prepare.json",
        },
        lambda p, a: prepare(p.prepare, a["raw"], a["out"], a["metrics"]),
    )
