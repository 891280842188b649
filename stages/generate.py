"""Stage generate: answer every test instruction with the fine-tuned model."""

from gpt2_instruct import pipeline
from gpt2_instruct.stage import run_stage

if __name__ == "__main__":
    run_stage(
        __doc__,
        {
            "model": "data/model",
            "test": "data/prepared/test.json",
            "out": "data/responses/test.json",
        },
        lambda p, a: pipeline.generate_responses(p.generate, a["model"], a["test"], a["out"]),
    )
