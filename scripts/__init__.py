"""Command-line tools behind the Make targets."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that an error found after the flags were parsed (a missing path, a folder of the
    wrong kind, a value out of range) is one `error: <message>` line and exit code 2, without the usage block, which
    says nothing about it. A flag argparse itself refuses (unknown, malformed) still prints the usage first."""

    _parsing = False

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._parsing = True
        try:
            return super().parse_args(args, namespace)
        finally:
            self._parsing = False

    def error(self, message: str) -> NoReturn:
        if self._parsing:
            super().error(message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None, *,
        errors: tuple[type[BaseException], ...] = (), help_text: str | None = None) -> int:
    """Run a script's `main(argv)` and return its exit code. The errors a user causes (`errors`: a missing path, a
    folder of the wrong kind, an unknown key) become one line `error: <message>` on stderr and exit code 2 instead
    of a traceback; a main that returns an int returns it, anything else is 0. With help_text (for scripts that
    take key=value arguments rather than argparse flags), -h or --help prints it and returns 0."""
    args = sys.argv[1:] if argv is None else argv
    if help_text is not None and ("-h" in args or "--help" in args):
        print(help_text.strip())
        return 0
    try:
        result = main(argv)
    except errors as exc:
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"error: {message}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def write_results(folder: Path, stem: str, json_text: str, markdown_text: str, partial: bool) -> None:
    """Write a benchmark's <stem>.json and <stem>.md in `folder`, each replaced whole (never half written).

    A partial result (the rows measured so far) goes to <stem>.partial.json/.md, so that a run cut short by a time
    limit keeps what it measured without replacing an earlier complete result; the final write removes them."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{stem}.partial" if partial else stem
    from distill.files import write_text_atomic

    for suffix, text in ((".json", json_text), (".md", markdown_text)):
        write_text_atomic(folder / f"{name}{suffix}", text)
    if not partial:
        for suffix in (".json", ".md"):
            (folder / f"{stem}.partial{suffix}").unlink(missing_ok=True)
