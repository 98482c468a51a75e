"""Benchmark the raw data stream: 1024 px decode + crop + to-tensor samples/s per loader worker, as JSON.

Usage: python scripts/bench_data.py [--shards DIR_OR_PATTERN] [--workers 1 2] [--batches N]
Without --shards, LAION-POP-sized JPEG shards are made from the demo photos in a temporary folder.
"""

from __future__ import annotations

import json
import sys
import tempfile

from data.bench import run_bench, write_bench_shards
from scripts import ArgumentParser, cli


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="shards to read (default: made from the demo photos)")
    parser.add_argument("--resolution", type=int, default=1024, help="crop side in px")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per batch")
    parser.add_argument("--batches", type=int, default=12, help="batches timed per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    args = parser.parse_args(argv)
    for name in ("resolution", "batch_size", "batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.workers) < 0:
        parser.error("--workers must be 0 or more")
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or tmp
        if not args.shards:
            write_bench_shards(tmp)
        result = run_bench(shards, args.resolution, args.batch_size, args.batches, tuple(args.workers))
    print(json.dumps(result), flush=True)


def entry(argv: list[str] | None = None) -> int:
    """main() with one-line errors for bad paths and arguments (exit code 2)."""
    from data.stream import NoUsableSamples

    return cli(main, argv, errors=(FileNotFoundError, ValueError, NoUsableSamples))


if __name__ == "__main__":
    sys.exit(entry())
