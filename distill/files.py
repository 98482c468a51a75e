"""What the project writes: file permissions, atomic replacement, and flushing to the disk."""

from __future__ import annotations

import os
import re
import shutil
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


def swap_into_place(new: Path, final: Path, aside: Path) -> None:
    """Rename the whole folder `new` to `final`. A `final` already there is renamed to `aside` first and deleted
    after, so a kill at any point leaves one whole folder: `final`, or (between the two renames) `aside`. `new` is
    flushed to the disk first and the renames after them, so that a crash or a power cut does the same."""
    fsync_tree(new)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)  # a killed swap's leftover: `final` is the whole one
        final.rename(aside)
    new.rename(final)
    fsync_dir(final.parent)  # the renames reach the disk before `aside`, the older whole one, is deleted
    shutil.rmtree(aside, ignore_errors=True)


def fsync_file(path: str | Path, missing_ok: bool = False) -> None:
    """Flush a file's data to the disk, whichever process wrote it: after a crash or a power cut it holds what was
    written, not zeros or nothing (a rename alone is not enough: the name can reach the disk before the data).
    missing_ok: a file gone meanwhile (another process renamed or removed it) is passed over."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it). Filesystems that cannot open or flush a
    folder are left as they are: there the rename is as durable as they make it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path, missing_ok: bool = False) -> None:
    """fsync_file every file under `folder`, then fsync_dir every folder in it, deepest first. missing_ok: as for
    fsync_file, for a folder other processes are still writing into."""
    walked = list(os.walk(folder))
    for root, _dirs, files in walked:
        for name in files:
            fsync_file(os.path.join(root, name), missing_ok)
    for root, _dirs, _files in reversed(walked):
        fsync_dir(root)


def replace_durably(tmp: str | Path, path: str | Path) -> None:
    """os.replace(tmp, path) after flushing `tmp`'s data, then flush the folder's entry: after a crash `path` is the
    old file or the whole new one."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and a rename: a kill or a crash leaves the old file
    or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    replace_durably(tmp, path)


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


def safetensors_problem(path: str | Path) -> str | None:
    """None when `path` holds a whole safetensors file, else one line saying why not: its header must be there and
    parse, and the file must hold every byte range the header names (a truncated copy or download does not).
    Reads the header only."""
    import json

    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 2 or 8 + header_len > size:
            return f"{path.name} is not a whole safetensors file ({size} bytes, no complete header)"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{path.name} is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{path.name} is not a safetensors file (its header is not a JSON object)"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        return f"{path.name} is cut short: {size} bytes, its header names {needed} (an interrupted copy or download?)"
    return None


def weights_file_problem(path: str | Path) -> str | None:
    """None when a weight file looks whole, else one line saying why not, read from its index alone (no tensor is
    loaded): .safetensors as safetensors_problem; a .bin/.pt/.pkl written by torch.save is a zip whose directory
    sits at the end, so a truncated one has none. Other files (legacy pickles) are not judged."""
    import zipfile

    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    if path.suffix in (".bin", ".pt", ".pkl") and path.stat().st_size >= 4:
        with path.open("rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        if zipped and not zipfile.is_zipfile(path):
            return (f"{path.name} is cut short: {path.stat().st_size} bytes and no zip directory at its end (an "
                    "interrupted copy?)")
    return None


def weights_problem(folder: str | Path) -> str | None:
    """The first weights_file_problem among the weight files directly in `folder` (None when all look whole)."""
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt"):
            if problem := weights_file_problem(path):
                return problem
    return None


def error_summary(exc: BaseException) -> str:
    """`Type: first sentence` of an exception's message (at most 300 characters), or `Type` when it has none:
    library load errors (torch's unpickling advice, diffusers' weight-loading hints) go on for lines that do not
    apply to a damaged file."""
    first = (str(exc).strip().splitlines() or [""])[0].strip()
    first = re.split(r"(?<=[.!?:])\s", first)[0].rstrip(".:")[:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
