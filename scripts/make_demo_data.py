"""Write the demo shards: scikit-image's bundled photographs with captions written for this project.

Usage: python scripts/make_demo_data.py --out DIR
Idempotent (the shards are byte-for-byte reproducible). Ends with one JSON line like `make data`.
"""

from __future__ import annotations

from data.demo import build_demo_shards
from data.prep import report_lines
from distill.files import out_folder_problem
from scripts import ArgumentParser


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo_data", help="folder for the demo shards")
    args = parser.parse_args(argv)
    if problem := out_folder_problem("--out", args.out):
        parser.error(problem)
    try:
        for line in report_lines(build_demo_shards(args.out)):
            print(line, flush=True)
    except FileExistsError as exc:  # another data set's shards: never deleted
        parser.error(str(exc))
    except OSError as exc:  # a read-only or full disk, a folder that refuses new entries: one line, exit 2
        parser.error(f"--out {args.out}: cannot write there ({exc.strerror or exc})")


if __name__ == "__main__":
    main()
