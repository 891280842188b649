"""Every stage's function in one namespace, for notebooks, tests and benchmarks.

The code lives in ``gpt2_instruct.stages``, one module a stage, and the DVC stages import
from there, so that dvc.yaml can name each stage's code exactly. Nothing is defined here.
"""

from gpt2_instruct.data import SPLITS
from gpt2_instruct.stages.download import download
from gpt2_instruct.stages.dpo import dpo
from gpt2_instruct.stages.evaluate import evaluate, response_losses
from gpt2_instruct.stages.fetch_gpt2 import fetch_gpt2
from gpt2_instruct.stages.finetune import LOG_FIELDS, finetune, read_tsv
from gpt2_instruct.stages.generate import generate_responses, generation_prompt
from gpt2_instruct.stages.judge import judge
from gpt2_instruct.stages.prepare import prepare
from gpt2_instruct.stages.tokenize_data import GPT2_CONTEXT, tokenize, tokenize_entries
from gpt2_instruct.weights import CONFIG_KEY

__all__ = [
    "CONFIG_KEY",
    "GPT2_CONTEXT",
    "LOG_FIELDS",
    "SPLITS",
    "download",
    "dpo",
    "evaluate",
    "fetch_gpt2",
    "finetune",
    "generate_responses",
    "generation_prompt",
    "judge",
    "prepare",
    "read_tsv",
    "response_losses",
    "tokenize",
    "tokenize_entries",
]
