"""Stage dpo: preference-tune the instruction-fine-tuned model (DPO); off unless dpo.enabled."""

from gpt2_instruct.stages import run_stage
from gpt2_instruct.stages.dpo import dpo

if __name__ == "__main__":
    run_stage(
        __doc__,
        {
            "model": "data/model",
            "out": "data/dpo/model",
            "prepared": "data/dpo/prepared",
            "reference": "data/dpo/reference_logprobs.safetensors",
            "checkpoints": "data/dpo/checkpoints",
            "metrics": "metrics/dpo.json",
            "log": "metrics/dpo_log.tsv",
            "plot": "plots/dpo.png",
            "live": "dvclive_dpo",
        },
        lambda p, a: dpo(
            p.dpo,
            p.prepare,  # the instruction data's split, applied to the preference data
            a["model"],
            a["out"],
            a["prepared"],
            a["reference"],
            a["metrics"],
            a["log"],
            a["plot"],
            a["live"],
            checkpoints=a["checkpoints"],
            max_new_tokens=p.generate.max_new_tokens,  # the model folder's generation_config
        ),
        device_section="dpo",
    )
