"""Prepare + tokenize on growing data sets (up to Alpaca-52k size): time and peak memory.

The data set is the real one from ../shared/data repeated with each copy perturbed
(a copy number appended to the instruction, so no two entries are equal), or
synthetic entries when the shared data is absent. Each size runs in a fresh
process so its peak RSS is its own. Prints one JSON line last.

    python bench/large_data.py --sizes 1100 13000 26000 52000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _entries(size: int) -> tuple[list[dict[str, str]], str]:
    source = SHARED / "instruction-data.json"
    if source.is_file():
        base = json.loads(source.read_text(encoding="utf-8"))
        kind = "real data repeated and perturbed"
    else:
        base = [
            {"instruction": f"Rewrite sentence {i} in the passive voice.",
             "input": f"The cat {i} chased the mouse." if i % 2 else "",
             "output": f"The mouse was chased by cat {i}."}
            for i in range(1100)
        ]  # fmt: skip
        kind = "synthetic"
    out = []
    for i in range(size):
        entry = dict(base[i % len(base)])
        copy = i // len(base)
        if copy:
            entry["instruction"] = f"{entry['instruction']} (variant {copy})"
        out.append(entry)
    return out, kind


def _child(size: int, encoding: str) -> None:
    """Run prepare + tokenize once and print timings; runs in its own process."""
    from gpt2_instruct import pipeline
    from gpt2_instruct.params import PrepareParams, TokenizeParams

    entries, kind = _entries(size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw = root / "raw.json"
        raw.write_text(json.dumps(entries), encoding="utf-8")
        started = time.perf_counter()
        pipeline.prepare(PrepareParams(), raw, root / "prepared", root / "prepare.json")
        prepared = time.perf_counter()
        pipeline.tokenize(
            TokenizeParams(), root / "prepared", Path(encoding), root / "tokenized",
            root / "tokenize.json",
        )  # fmt: skip
        done = time.perf_counter()
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        json.dumps(
            {
                "size": size,
                "data": kind,
                "prepare_s": round(prepared - started, 3),
                "tokenize_s": round(done - prepared, 3),
                "peak_rss_gb": round(rss_gb, 3),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1100, 13000, 26000, 52000])
    parser.add_argument("--encoding", default=str(SHARED / "gpt2-encoding"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.encoding)
        return
    if not Path(args.encoding, "encoder.json").is_file():
        sys.exit(f"{args.encoding}: GPT-2 BPE files needed (encoder.json, vocab.bpe)")
    rows = []
    for size in args.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(size), "--encoding", args.encoding],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["tokenize_us_per_entry"] = round(1e6 * row["tokenize_s"] / size, 1)
        row["prepare_us_per_entry"] = round(1e6 * row["prepare_s"] / size, 1)
        print(
            f"{size:>7} entries: prepare {row['prepare_s']:.2f} s, "
            f"tokenize {row['tokenize_s']:.2f} s, peak RSS {row['peak_rss_gb']:.2f} GB"
        )
        rows.append(row)
    first, last = rows[0], rows[-1]
    growth = last["size"] / first["size"]
    print(
        json.dumps(
            {
                "rows": rows,
                "size_ratio": round(growth, 2),
                "tokenize_time_ratio": round(last["tokenize_s"] / first["tokenize_s"], 2),
                "prepare_time_ratio": round(last["prepare_s"] / max(first["prepare_s"], 1e-9), 2),
                "rss_ratio": round(last["peak_rss_gb"] / first["peak_rss_gb"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
