"""Checkpoints: atomic, complete, the last k kept; `resume=latest` never picks a half-written one.

A checkpoint folder `<run>/checkpoints/step_<N>/` holds Accelerate's state (student, optimizer, grad scaler,
every rank's RNG states, and the registered stateful objects: train state, LR scheduler, EMA), the student (and
EMA) in `save_pretrained` layout, one data-stream position file per rank, and `meta.json` (step, teacher, W&B run
id, resolved config, every file's size). It is written under `.tmp-step_<N>` and renamed when every rank has
finished, so a kill during the write leaves the previous checkpoint as the latest; a checkpoint damaged later is
refused before a resume loads anything (checkpoint_problem).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill.files import error_summary, swap_into_place, widen_to_umask

CKPT_RE = re.compile(r"^step_(\d{9})$")
META = "meta.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(output_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after `step` optimizer steps (zero-padded so names sort by step)."""
    return f"step_{step:09d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (renamed into place and holding meta.json), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CKPT_RE.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name)[1]))  # type: ignore[index]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """train.resume -> a checkpoint folder: None stays None; `latest` may find none (a fresh start)."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / META).is_file():
        raise FileNotFoundError(f"train.resume={resume} is not a complete checkpoint (no {META})")
    return path


def set_aside_later(output_dir: str | Path, step: int) -> Path | None:
    """A run resumed at `step` (a rollback, e.g. after a loss spike) moves this run's later checkpoints into
    checkpoints/abandoned_after_<step>[_k]/, where `latest` and pruning do not see them and nothing is lost;
    returns that folder, or None when there were none (main process only)."""
    later = [p for p in list_checkpoints(output_dir) if int(CKPT_RE.match(p.name)[1]) > step]  # type: ignore[index]
    if not later:
        return None
    base = checkpoint_root(output_dir) / f"abandoned_after_{checkpoint_name(step)}"
    aside, k = base, 1
    while aside.exists():
        k += 1
        aside = base.with_name(f"{base.name}_{k}")
    aside.mkdir()
    for p in later:
        p.rename(aside / p.name)
    return aside


def temp_dir(output_dir: str | Path, step: int) -> Path:
    """The folder a checkpoint is written into before it is renamed."""
    return checkpoint_root(output_dir) / f".tmp-{checkpoint_name(step)}"


def remove_stale_temps(output_dir: str | Path) -> None:
    """Delete half-written checkpoints left by a killed run, and put back a checkpoint that `finalize` had set aside
    to replace it when the run was killed between its two renames (main process only)."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(_ASIDE + "step_*"):
            target = root / p.name.removeprefix(_ASIDE)
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.rename(target)


_ASIDE = ".replaced-"  # prefix of a checkpoint that finalize is replacing by a new one of the same step


def finalize(output_dir: str | Path, step: int, meta: dict[str, Any], keep_last: int) -> Path:
    """Write meta.json, rename the temporary folder into place and prune to the last `keep_last` (main only)."""
    tmp = temp_dir(output_dir, step)
    # every file's size, so that a resume can tell a checkpoint damaged later (a copy cut short, a file deleted)
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / META).write_text(json.dumps({**meta, "files": files}, indent=2, default=str))
    final = checkpoint_root(output_dir) / checkpoint_name(step)
    widen_to_umask(tmp)
    # a checkpoint of the same step (e.g. written again after a resume) is replaced; remove_stale_temps puts it
    # back when the run was killed between the renames
    swap_into_place(tmp, final, final.with_name(_ASIDE + final.name))
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            if old != final:  # never the one just written
                shutil.rmtree(old, ignore_errors=True)
    return final


LOCK = ".run.lock"  # in the run folder: held (lockf) by the run's global rank 0 while it trains


class RunLockedError(RuntimeError):
    """Another live process trains into this run folder; the message is one line naming it."""


@contextlib.contextmanager
def run_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold the run folder's lock while training, so that a second run into the same folder (a requeued job whose
    predecessor still runs, a resume typed twice) stops before it loads anything, instead of the two deleting
    and replacing each other's checkpoints. A POSIX record lock (lockf): the kernel releases it when the holder
    dies, so a killed run leaves nothing stale, and unlike flock it is not shared with forked data-loader
    workers, which can outlive a killed trainer by seconds. Works on NFS with the lock service Linux clients use."""
    import fcntl
    import socket

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN / EACCES: held by a live process
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunLockedError(f"train.output_dir={output_dir} is in use by a live run ({holder}): wait for it to "
                                 f"end, or stop it (touch {folder / 'STOP'}) and then resume") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


class CheckpointLoadError(RuntimeError):
    """A checkpoint that passed checkpoint_problem but failed to load (damage its sizes and headers do not show);
    the message is damaged_refusal's one line."""


def load_failure(ckpt: Path, exc: BaseException) -> CheckpointLoadError:
    """CheckpointLoadError for `exc`, raised while loading `ckpt`."""
    return CheckpointLoadError(damaged_refusal(ckpt, error_summary(exc)))


class CheckpointWriteError(OSError):
    """A checkpoint (or the final export) could not be written (disk full, quota, permissions); its half-written
    folder was removed and the complete checkpoints are untouched. The message is one line that says which one a
    resume would use. Every rank raises it together (they agree on the failure first), so none waits on another."""


# torch's zip writer (torch.save, DeepSpeed's checkpoint engine) on a full disk or a file-size limit
_TORCH_WRITE_ERROR = re.compile(r"inline_container|PytorchStreamWriter|write failed|I/O error|No space|quota", re.I)


def write_error_reason(exc: BaseException) -> str | None:
    """The one-line reason of an error raised while writing files, or None when `exc` is not a write error.

    A full disk does not always surface as OSError: torch.save raises RuntimeError from its zip writer
    ("[enforce fail at inline_container.cc:...] . unexpected pos ...", or "... file write failed") and safetensors
    raises SafetensorError with an I/O message. Another RuntimeError (a CUDA or NCCL error while the state is
    gathered) and out-of-memory are not write errors: they keep their traceback."""
    import torch
    from safetensors import SafetensorError

    if isinstance(exc, torch.OutOfMemoryError) or not isinstance(exc, (OSError, RuntimeError, SafetensorError)):
        return None
    if isinstance(exc, RuntimeError) and not _TORCH_WRITE_ERROR.search(str(exc)):
        return None
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        return str(exc.args[0][0][-1])  # copytree's list of (source, destination, why): the first why
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    first = (str(exc).strip().splitlines() or [""])[0].strip()
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _free_space(path: Path) -> str:
    """'N GiB free' on the filesystem of `path` (or its nearest existing parent); '' when unknown."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return f"{shutil.disk_usage(p).free / 2**30:.1f} GiB free there"
            except OSError:
                return ""
    return ""


def write_failed(output_dir: str | Path, step: int, reason: str) -> CheckpointWriteError:
    """Remove the half-written folder of `step` (which frees the space it took) and describe the failure. Every rank
    calls it once all of them have stopped writing (a node may write to its own disk)."""
    tmp = temp_dir(output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    latest = latest_checkpoint(output_dir)
    kept = (f"the latest complete checkpoint is {latest} (train.resume=latest resumes from it)" if latest
            else "no complete checkpoint exists yet")
    free = _free_space(checkpoint_root(output_dir))
    return CheckpointWriteError(f"the checkpoint of step {step} could not be written under "
                                f"{checkpoint_root(output_dir)}{f' ({free})' if free else ''}: {reason}; "
                                f"its partial folder was removed and {kept}")


def export_failed(output_dir: str | Path | None, export_dir: str | Path, reason: str) -> CheckpointWriteError:
    """Describe a failed export (its temporary folder was removed by the caller): of a run's last step when
    `output_dir` is given, else of a checkpoint (scripts/export.py), which only needs the command again."""
    free = _free_space(Path(export_dir))
    if output_dir is None:
        full = any(w in reason.lower() for w in ("no space", "quota", "file too large"))
        again = ("an earlier export there is untouched; " + ("free space and run the export again" if full else
                 "run the export again once that is fixed"))
    else:
        latest = latest_checkpoint(output_dir)
        again = (f"the checkpoint {latest} is complete: rerun with train.resume=latest to export again" if latest
                 else "no complete checkpoint exists")
    return CheckpointWriteError(f"the export to {export_dir}{f' ({free})' if free else ''} could not be written: "
                                f"{reason}; {again}")


def data_state_file(ckpt: Path, rank: int) -> Path:
    """The data-stream position of one rank inside a checkpoint."""
    return ckpt / f"data_state_rank{rank}.json"


def read_data_states(ckpt: Path) -> list[dict[str, Any]]:
    """Every rank's data-stream state saved in a checkpoint, in rank order (empty when there are none)."""
    files = sorted(ckpt.glob("data_state_rank*.json"), key=lambda f: int(f.stem.removeprefix("data_state_rank")))
    return [json.loads(f.read_text()) for f in files]


def read_meta(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's meta.json."""
    return json.loads((ckpt / META).read_text())


def checkpoint_problem(ckpt: Path) -> str | None:
    """None when a checkpoint looks whole, else one line saying what is damaged: meta.json or another JSON file
    that does not parse, a file missing or of another size than when it was written (meta.json's "files"; older
    checkpoints lack that list), a weight file cut short. Reads sizes, headers and the small JSON files only."""
    from distill.files import weights_file_problem

    try:
        meta = read_meta(ckpt)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{META} cannot be read ({type(exc).__name__})"
    if not isinstance(meta, dict):
        return f"{META} does not hold a JSON object"
    for rel, size in (meta.get("files") or {}).items():
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, {size} were written"
    for path in sorted(ckpt.rglob("*")):
        if not path.is_file() or path.name == META:
            continue
        if path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                return f"{path.relative_to(ckpt)} is not valid JSON"
        elif problem := weights_file_problem(path):
            return f"{path.parent.relative_to(ckpt)}/{problem}" if path.parent != ckpt else problem
    return None


def damaged_refusal(ckpt: Path, problem: str) -> str:
    """The one line that refuses to resume from a damaged checkpoint, naming the newest whole one before it."""
    before = previous_checkpoint(ckpt)
    then = (f"resume from the one before with train.resume={before} (the damaged one is then moved aside, not "
            "deleted)" if before else "no whole checkpoint precedes it: start a new run in another train.output_dir")
    return f"train.resume: the checkpoint {ckpt} is damaged ({problem}); {then}"


def previous_checkpoint(ckpt: Path) -> Path | None:
    """The newest complete checkpoint of the same run before `ckpt` that checkpoint_problem finds whole."""
    match = CKPT_RE.match(ckpt.name)
    if match is None:
        return None
    step = int(match[1])
    earlier = [p for p in list_checkpoints(ckpt.parent.parent) if int(CKPT_RE.match(p.name)[1]) < step]  # type: ignore[index]
    return next((p for p in reversed(earlier) if checkpoint_problem(p) is None), None)


FAULT_PAUSE_ENV = "KOALA_FAULT_CHECKPOINT_PAUSE_S"


def fault_injection_pause() -> None:
    """Fault injection for tests: with $KOALA_FAULT_CHECKPOINT_PAUSE_S set, hold a checkpoint half-written for that
    many seconds, so that a test can kill the run in the middle of the write. Unset in real runs: no effect."""
    seconds = float(os.environ.get(FAULT_PAUSE_ENV, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)
