"""Write the tiny seeded SDXL pipeline (the project's default teacher) to a folder and print the folder.

Usage: python scripts/make_tiny_pipeline.py [--out DIR] [--seed N] [--overwrite]
"""

from __future__ import annotations

from distill.files import out_folder_problem
from distill.tiny import build_tiny_pipeline, default_tiny_pipeline_dir
from scripts import ArgumentParser


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(default_tiny_pipeline_dir()), help="pipeline folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the folder is complete")
    args = parser.parse_args(argv)
    if problem := out_folder_problem("--out", args.out):
        parser.error(problem)
    try:
        print(build_tiny_pipeline(args.out, seed=args.seed, overwrite=args.overwrite))
    except OSError as exc:  # a read-only or full disk, a folder that refuses new entries: one line, exit 2
        parser.error(f"--out {args.out}: cannot write there ({exc.strerror or exc})")


if __name__ == "__main__":
    main()
