"""The frame every ``stages/*.py`` script runs in: arguments, params, clean failure."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from gpt2_instruct.data import DataError
from gpt2_instruct.devices import tune_host_memory
from gpt2_instruct.download import DownloadError
from gpt2_instruct.params import Params, ParamsError, load_params
from gpt2_instruct.training import NonFiniteLossError
from gpt2_instruct.weights import WeightsError

# Errors that explain themselves: printed as one line, without a traceback.
EXPECTED_ERRORS = (
    ParamsError,
    DataError,
    DownloadError,
    WeightsError,
    NonFiniteLossError,
    FileNotFoundError,
)


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
