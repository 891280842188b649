"""Stage evaluate: score the test answers offline (losses, ROUGE, chrF, exact match)."""

from gpt2_instruct.stages import run_stage
from gpt2_instruct.stages.evaluate import evaluate

if __name__ == "__main__":
    run_stage(
        __doc__,
        {
            "responses": "data/responses/test.json",
            "model": "data/model",
            "tokenized": "data/tokenized",
            "metrics": "metrics/eval.json",
            "per_entry": "metrics/eval_per_entry.csv",
            "scores": "metrics/eval_scores.csv",
            "plots": "plots/eval",
        },
        lambda p, a: evaluate(
            p.evaluate,
            a["responses"],
            a["model"],
            a["tokenized"],
            a["metrics"],
            a["per_entry"],
            a["plots"],
            a["scores"],
        ),
        device_section="evaluate",
    )
