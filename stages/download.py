"""Stage download: fetch the instruction data set (URL, file:// URL or local path)."""

from gpt2_instruct import pipeline
from gpt2_instruct.stage import run_stage

if __name__ == "__main__":
    run_stage(
        __doc__,
        {"out": "data/raw/instruction-data.json"},
        lambda p, a: pipeline.download(p.download, a["out"]),
    )
