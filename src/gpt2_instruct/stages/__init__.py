"""What each DVC stage does, one module a stage, and the frame its script runs in.

``stages/<name>.py`` (the script DVC runs) parses paths and calls one function of
``gpt2_instruct.stages.<name>``. Each of those modules holds only its own stage's code,
so dvc.yaml can list, for every stage, exactly the modules that decide its outputs
(``tests/test_params.py`` checks the lists against the imports): editing how answers are
generated reruns generate and evaluate, never the fine-tune. This module is plumbing
that cannot change what a stage writes: arguments, params, clean failure, logging.

Clean failure: an expected error (bad params, bad data, a missing or unreadable file, a
failed download...) is one line ``error: ...`` on stderr and exit code 1; Ctrl-C is one
line ``interrupted`` and exit code 130, also while the script is still importing torch.
Outputs are written atomically (``gpt2_instruct.io``), so neither leaves half a file.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from gpt2_instruct import devices, interrupted_while_starting
from gpt2_instruct.batching import SplitError
from gpt2_instruct.data import DataError
from gpt2_instruct.download import DownloadError
from gpt2_instruct.io import remove_stale_temps
from gpt2_instruct.judge import JudgeError
from gpt2_instruct.model_dir import ModelDirError
from gpt2_instruct.params import Params, ParamsError, load_params
from gpt2_instruct.safe_json import JSONError
from gpt2_instruct.tokenizer import TokenizerError
from gpt2_instruct.training import NonFiniteLossError
from gpt2_instruct.weights import WeightsError

# Errors that explain themselves: printed as one line, without a traceback. Every class
# raised on purpose for bad input belongs here; plain ValueError, TypeError... do not (bugs).
EXPECTED_ERRORS = (
    ParamsError,
    DataError,
    JSONError,
    SplitError,
    TokenizerError,
    DownloadError,
    WeightsError,
    ModelDirError,
    NonFiniteLossError,
    JudgeError,
    OSError,  # a missing, unreadable or unwritable path, a full disk: named by _one_line
)
MAX_MESSAGE_CHARS = 2000  # a message that quotes a huge value is cut (it stays one line)


def log(message: str) -> None:
    """A stage's progress line, on stderr (stdout stays free for DVC's own output)."""
    print(message, file=sys.stderr, flush=True)


def _path_text(path: object) -> str:
    return os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else str(path)


def _one_line(err: BaseException) -> str:
    """The error's message as one line of bounded length; OSErrors name their path first."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        text = f"{_path_text(err.filename)}: {err.strerror}"
        if err.filename2 is not None:
            text += f" ({_path_text(err.filename2)})"
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.splitlines())
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS] + "... (cut)"
    return text


def _configure_device(section: object, *, relaunch: bool) -> devices.Platform:
    """The device seam for a params section with a ``device`` (finetune, generate...)."""
    distributed = getattr(section, "distributed", None)
    return devices.configure(
        section.device,  # type: ignore[attr-defined]
        getattr(section, "precision", "fp32"),
        getattr(distributed, "strategy", "single"),
        relaunch=relaunch,
    )


def run_stage(
    description: str,
    paths: dict[str, str],
    body: Callable[[Params, dict[str, Path]], object],
    argv: list[str] | None = None,
    *,
    device_section: str | None = None,
) -> None:
    """Parse ``--name PATH`` options (defaults: dvc.yaml's paths), validate params, run ``body``.

    The whole params.yaml is validated before any work, so a typo in any
    section fails every stage at once instead of hours later. ``device_section`` names
    the params section whose ``device`` (and ``precision``, ``distributed.strategy``
    where it has them) the stage computes on: the device seam (``devices.configure``)
    is applied for it once, before the body; the finetune stage may restart there
    (``devices.relaunch_without_per_thread_cache``). Stages without one set nothing.
    An expected error (``EXPECTED_ERRORS``) exits 1 after one line ``error: ...``;
    Ctrl-C exits 130 after one line (``interrupted``, or the interrupt's own message).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    for name, default in paths.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, default=Path(default))
    args = vars(parser.parse_args(argv))
    try:
        if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # from here: below
        params = load_params(args.pop("params"))
        if device_section is not None:
            _configure_device(
                getattr(params, device_section), relaunch=device_section == "finetune"
            )
        for stale in remove_stale_temps(*args.values()):  # left by a killed run
            log(f"removed {stale}, left by an interrupted run")
        body(params, args)
    except EXPECTED_ERRORS as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:  # atomic writes: nothing half-written is left
        message = _one_line(err) if str(err) else "interrupted"
        if not message.startswith("interrupted"):
            message = f"interrupted: {message}"
        print(message, file=sys.stderr, flush=True)
        sys.exit(130)
