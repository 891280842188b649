"""Stage finetune: instruction-fine-tune the base model; save it with losses and plots.

With ``finetune.distributed.nproc_per_node > 1`` the script relaunches itself under
torchrun, one process per GPU; ``torchrun --nproc-per-node N stages/finetune.py`` works too.
"""

import sys
from pathlib import Path

from gpt2_instruct import distributed
from gpt2_instruct.params import Params
from gpt2_instruct.stages import run_stage
from gpt2_instruct.stages.finetune import finetune


def main(p: Params, a: dict[str, Path]) -> None:
    """Train here, or, when several processes are asked for, under torchrun and exit as it did."""
    code = distributed.maybe_relaunch(p.finetune.distributed.nproc_per_node, sys.argv)
    if code is not None:
        sys.exit(code)
    finetune(
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
        max_new_tokens=p.generate.max_new_tokens,  # the model folder's generation_config.json
        fetch=p.fetch_gpt2,  # the model card names the base model it fetched
    )


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
        main,
        device_section="finetune",
    )
