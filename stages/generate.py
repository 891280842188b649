"""Stage generate: answer every test instruction with the fine-tuned model."""

from gpt2_instruct.stages import run_stage
from gpt2_instruct.stages.generate import generate_responses

if __name__ == "__main__":
    run_stage(
        __doc__,
        {
            "model": "data/model",
            "test": "data/prepared/test.json",
            "out": "data/responses/test.json",
            "metrics": "metrics/generate.json",
        },
        lambda p, a: generate_responses(p.generate, a["model"], a["test"], a["out"], a["metrics"]),
        device_section="generate",
    )
