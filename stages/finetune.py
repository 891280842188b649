"""Stage finetune: instruction-fine-tune the base model; save it with losses and plots."""

from gpt2_instruct import pipeline
from gpt2_instruct.stage import run_stage

if __name__ == "__main__":
    run_stage(
        __doc__,
        {
            "tokenized": "data/tokenized",
            "base_model": "data/gpt2/base",
            "encoding": "data/gpt2/encoding",
            "out": "data/model",
            "checkpoints": "data/checkpoints",
            "metrics": "metrics/train.json",
            "log": "metrics/train_log.tsv",
            "plot": "plots/loss.png",
            "live": "dvclive",
        },
        lambda p, a: pipeline.finetune(
            p.finetune,
            a["tokenized"],
            a["base_model"],
            a["encoding"],
            a["out"],
            a["checkpoints"],
            a["metrics"],
            a["log"],
            a["plot"],
            a["live"],
        ),
    )
