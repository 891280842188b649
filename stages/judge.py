"""Stage judge: score the test answers 0-100 with an LLM judge (judge.backend none: skip)."""

from gpt2_instruct.stages import run_stage
from gpt2_instruct.stages.judge import judge

if __name__ == "__main__":
    run_stage(
        __doc__,
        {
            "responses": "data/responses/test.json",
            "metrics": "metrics/judge.json",
            "per_entry": "metrics/judge_per_entry.csv",
            "scores": "metrics/judge_scores.csv",
        },
        lambda p, a: judge(p.judge, a["responses"], a["metrics"], a["per_entry"], a["scores"]),
    )
