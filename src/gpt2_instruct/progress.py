"""Progress with an ETA for the long loops of finetune, generate, evaluate and judge.

On a terminal it is a live tqdm bar on stderr (stdout stays free for DVC's own output).
In a log (stderr not a TTY: CI, ``nohup``, ``dvc exp run --queue``) a redrawn bar would
be one endless line of carriage returns, so there it prints whole lines instead, at
most one every :data:`LOG_EVERY_S` seconds plus one at the end: a line a time rather
than a line a percent, so a 5-second run does not log ten lines and a 10-hour run does
not stay silent for an hour. Each line has the count, the percentage, elapsed time,
the ETA and the rate. ``TQDM_DISABLE=1`` in the environment turns both off.
"""

from __future__ import annotations

import io
import sys
from typing import TextIO

from tqdm import tqdm

__all__ = ["LOG_EVERY_S", "LOG_FORMAT", "progress_bar"]

LOG_EVERY_S = 30.0
"""Seconds between two progress lines when stderr is not a terminal."""

TTY_EVERY_S = 0.5
"""Seconds between two redraws of the live bar (tqdm's 0.1 s costs CPU for nothing)."""

LOG_FORMAT = (
    "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) "
    "[{elapsed} elapsed, ETA {remaining}, {rate_fmt}{postfix}]"
)
"""One progress line in a log; no bar characters (they mean nothing in a log)."""


class _Lines(io.TextIOBase):
    """Turns tqdm's in-place redraws (``\\r`` + text + padding) into one line each.

    A line equal to the one before is dropped: closing a bar that has not moved since
    its last line (a run stopped early) redraws the same text.
    """

    def __init__(self, out: TextIO) -> None:
        super().__init__()
        self._out = out
        self._last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line and line != self._last:  # tqdm's lone "\r" and "\n" carry no text
            self._out.write(line + "\n")
            self._out.flush()
            self._last = line
        return len(text)

    def flush(self) -> None:
        self._out.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    total: int,
    desc: str,
    unit: str,
    *,
    file: TextIO | None = None,
    enabled: bool = True,
    initial: int = 0,
) -> tqdm:
    """A bar for ``total`` items (live on a terminal, timed lines in a log); close it after.

    ``file`` defaults to ``sys.stderr`` as it is when called (so tests can capture it);
    ``enabled=False`` gives a silent bar, so callers need no second code path;
    ``initial``: items already done (a resumed run).
    """
    stream = sys.stderr if file is None else file
    if not enabled:
        return tqdm(total=total, disable=True)
    if _is_terminal(stream):
        return tqdm(
            total=total, desc=desc, unit=unit, file=stream, mininterval=TTY_EVERY_S,
            initial=initial,
        )  # fmt: skip
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(stream),
        initial=initial,
        mininterval=LOG_EVERY_S,
        miniters=1,  # no dynamic miniters: tqdm's monitor thread would print between lines
        bar_format=LOG_FORMAT,
        ascii=True,
    )
