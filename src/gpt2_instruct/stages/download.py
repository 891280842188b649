"""Stage download: the raw data set, from a URL, a file:// URL or a local path."""

from __future__ import annotations

from pathlib import Path

from gpt2_instruct.deadline import redact
from gpt2_instruct.download import fetch
from gpt2_instruct.io import remove_stale_temps
from gpt2_instruct.params import DownloadParams
from gpt2_instruct.stages import log

# Sizes of the data sets whose sha256 we know, so a pin of one also caps the download at
# its exact size (``download.size`` names it for any other pin).
KNOWN_SIZES = {
    # rasbt/LLMs-from-scratch ch07 instruction-data.json (1100 entries)
    "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944": 203_524,
}


def download(params: DownloadParams, out: Path) -> None:
    """Fetch the data set to ``out``: size-capped, checked against the pins, retried."""
    for stale in remove_stale_temps(out):
        log(f"download: removed {stale}, left by an interrupted run")
    size = params.size if params.size is not None else KNOWN_SIZES.get(params.sha256 or "")
    fetch(
        params.url,
        out,
        sha256=params.sha256,
        size=size,
        max_bytes=params.max_bytes,
        timeout=params.timeout,
        deadline_s=params.deadline_s,
        retries=params.retries,
        progress=True,
    )
    log(f"download: {redact(params.url)} -> {out} ({out.stat().st_size:,} bytes)")
