"""What each DVC stage does, one module a stage, and the frame its script runs in.

``stages/<name>.py`` (the script DVC runs) parses paths and calls one function of
``gpt2_instruct.stages.<name>``. Each of those modules holds only its own stage's code,
so dvc.yaml can list, for every stage, exactly the modules that decide its outputs
(``tests/test_params.py`` checks the lists against the imports): editing how answers are
generated reruns generate and evaluate, never the fine-tune. This module is plumbing
that cannot change what a stage writes: arguments, params, clean failure, logging.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from gpt2_instruct.data import DataError
from gpt2_instruct.devices import tune_host_memory
from gpt2_instruct.download import DownloadError
from gpt2_instruct.model_dir import ModelDirError
from gpt2_instruct.params import Params, ParamsError, load_params
from gpt2_instruct.training import NonFiniteLossError
from gpt2_instruct.weights import WeightsError

# Errors that explain themselves: printed as one line, without a traceback.
EXPECTED_ERRORS = (
    ParamsError,
    DataError,
    DownloadError,
    WeightsError,
    ModelDirError,
    NonFiniteLossError,
    FileNotFoundError,
)


def log(message: str) -> None:
    """A stage's progress line, on stderr (stdout stays free for DVC's own output)."""
    print(message, file=sys.stderr, flush=True)


def run_stage(
    description: str,
    paths: dict[str, str],
    body: Callable[[Params, dict[str, Path]], object],
    argv: list[str] | None = None,
) -> None:
    """Parse ``--name PATH`` options (defaults: dvc.yaml's paths), validate params, run ``body``.

    The whole params.yaml is validated before any work, so a typo in any
    section fails every stage at once instead of hours later. Freed memory is kept
    for reuse (``devices.tune_host_memory``): large tensors are allocated every step.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    for name, default in paths.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, default=Path(default))
    args = vars(parser.parse_args(argv))
    try:
        params = load_params(args.pop("params"))
        tune_host_memory(params.finetune.distributed.strategy, params.finetune.precision)
        body(params, args)
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
