"""Fine-tuning GPT-2 on instruction data, as a DVC pipeline (see README.md).

Run as a stage script (``python stages/<name>.py``), Ctrl-C before the stage's frame
starts (importing torch takes seconds) prints one line and exits 130, like Ctrl-C inside
it (``gpt2_instruct.stages.run_stage``), instead of a traceback from deep in an import:
nothing has been written yet. Every other program keeps Python's own Ctrl-C handling.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType


def interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    """SIGINT handler for a stage script until ``run_stage`` takes over."""
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)


def _started_as_stage_script() -> bool:
    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return Path(main_file).parent.name == "stages"


if _started_as_stage_script() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, interrupted_while_starting)
