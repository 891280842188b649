"""Stage download: fetch the instruction data set (URL, file:// URL or local path)."""

from gpt2_instruct.stages import run_stage
from gpt2_instruct.stages.download import download

if __name__ == "__main__":
    run_stage(
        __doc__,
        {"out": "data/raw/instruction-data.json"},
        lambda p, a: download(p.download, a["out"]),
    )
