"""File permissions of what the project writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def process_umask() -> int:
    """The process umask (read from /proc on Linux, which leaves it untouched; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def widen_to_umask(folder: str | Path) -> None:
    """Give every file and folder under `folder` at least the permissions the umask allows (0o666 / 0o777 minus
    the umask; never fewer than they have): safetensors 0.8 writes owner-only files (0600), which teammates on a
    shared cluster could not load."""
    mask = process_umask()
    for root, dirs, files in os.walk(folder):
        for name, full in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files] + [("", 0o777)]:
            path = os.path.join(root, name) if name else root
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            wanted = mode | (full & ~mask)
            if wanted != mode and not os.path.islink(path):
                os.chmod(path, wanted)


def out_folder_problem(flag: str, path: str) -> str | None:
    """None when `path` is, or can be made as, a folder; else one line saying why not (checked before any work,
    so that a long sampling run does not end on a mkdir error)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        return f"{flag} {path} is a file: give a folder"
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        return f"{flag} {path}: {above} is a file, so no folder can be made there"
    return None
