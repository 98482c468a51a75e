"""Build webdataset shards from a folder of captioned images, a parquet/jsonl manifest or img2dataset output.

Usage: python scripts/prep_data.py --src SRC --out DIR [--format folder|manifest|img2dataset]
       [--samples-per-shard N] [--min-side PX] [--min-aspect W/H] [--max-aspect W/H] [--max-pixels N]
       [--image-column COL] [--workers N] [--overwrite]
Prints one line per skip reason, then one JSON line {"written", "skipped", "shards", "out", "reasons"}.
A killed run resumes when the same command runs again (its whole shards are kept); --overwrite starts again.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from data.prep import PrepOptions, detect_format, prep_shards, report_lines
from distill.files import out_folder_problem
from scripts import ArgumentParser, cli


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="image folder, .parquet/.jsonl manifest or img2dataset folder")
    parser.add_argument("--out", required=True, help="folder for the shards (000000.tar, ...)")
    parser.add_argument("--format", choices=["folder", "manifest", "img2dataset"], help="default: detected")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard")
    parser.add_argument("--min-side", type=int, default=0, help="skip images whose shorter side is below (px)")
    parser.add_argument("--min-aspect", type=float, help="skip images with width/height below this")
    parser.add_argument("--max-aspect", type=float, help="skip images with width/height above this")
    parser.add_argument("--max-pixels", type=int, help="skip images with more pixels (width x height)")
    parser.add_argument("--image-column", help="manifest column with the image path (default: detected)")
    parser.add_argument("--image-root", help="base folder of relative manifest paths (default: its folder)")
    parser.add_argument("--key-prefix", default="", help="prefix of the sample keys (no dots or slashes)")
    parser.add_argument("--workers", type=int, default=1, help="processes that read and check images")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards already in --out (without it, an unfinished prep of the same source "
                             "and options resumes)")
    args = parser.parse_args(argv)
    src = Path(args.src)
    if args.format == "manifest" and src.is_dir():
        parser.error(f"--format manifest: --src {args.src} is a folder; a manifest is a .parquet or .jsonl file")
    if args.format in ("folder", "img2dataset") and src.is_file():
        parser.error(f"--format {args.format}: --src {args.src} is a file; give the folder")
    if problem := out_folder_problem("--out", args.out):
        parser.error(problem)
    if args.image_column or args.image_root:  # read from manifests only: elsewhere they would do nothing
        fmt = args.format or (detect_format(args.src) if src.exists() else None)
        if fmt not in (None, "manifest"):
            parser.error(f"--image-column and --image-root name a manifest's image paths; --src {args.src} is "
                         f"a{'n' if fmt.startswith('i') else ''} {fmt} source")
    opts = PrepOptions(
        samples_per_shard=args.samples_per_shard,
        min_side=args.min_side,
        min_aspect=args.min_aspect,
        max_aspect=args.max_aspect,
        max_pixels=args.max_pixels,
        image_column=args.image_column,
        image_root=args.image_root,
        key_prefix=args.key_prefix,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # resume and per-shard lines
    summary = prep_shards(args.src, args.out, args.format, opts)
    for line in report_lines(summary):
        print(line, flush=True)
    if summary["written"] == 0:  # every record was skipped: nothing to train on is a failed prep, not a success
        print(f"error: none of the {summary['skipped']} source records was kept (reasons above): {args.out} holds no "
              "shard", file=sys.stderr)
        return 2
    return 0


def entry(argv: list[str] | None = None) -> int:
    """main() with one-line errors for bad paths and arguments (exit code 2)."""
    try:
        return cli(main, argv, errors=(FileNotFoundError, FileExistsError, NotADirectoryError, ValueError))
    except KeyboardInterrupt:
        print("interrupted: the whole shards written so far are kept; run the same command again to resume (or "
              "pass --overwrite to start again)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(entry())
