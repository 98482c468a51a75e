"""Checkpoints: atomic, complete, the last k kept; `resume=latest` never picks a half-written one.

A checkpoint folder `<run>/checkpoints/step_<N>/` holds Accelerate's state (student, optimizer, grad scaler,
every rank's RNG states, and the registered stateful objects: train state, LR scheduler, EMA), the student (and
EMA) in `save_pretrained` layout, one data-stream position file per rank, and `meta.json` (step, teacher, W&B run
id, resolved config). It is written under `.tmp-step_<N>` and renamed when every rank has finished, so a kill
during the write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from distill.files import widen_to_umask

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
    """Delete half-written checkpoints left by a killed run (main process only)."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)


def finalize(output_dir: str | Path, step: int, meta: dict[str, Any], keep_last: int) -> Path:
    """Write meta.json, rename the temporary folder into place and prune to the last `keep_last` (main only)."""
    tmp = temp_dir(output_dir, step)
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    final = checkpoint_root(output_dir) / checkpoint_name(step)
    widen_to_umask(tmp)
    if final.exists():  # a checkpoint of the same step (e.g. written again after a resume) is replaced
        shutil.rmtree(final)
    tmp.rename(final)
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            if old != final:  # never the one just written
                shutil.rmtree(old, ignore_errors=True)
    return final


class CheckpointWriteError(OSError):
    """A checkpoint (or the final export) could not be written (disk full, quota, permissions); its half-written
    folder was removed and the complete checkpoints are untouched. The message is one line that says which one a
    resume would use. Every rank raises it together (they agree on the failure first), so none waits on another."""


def write_error_reason(exc: BaseException) -> str | None:
    """The one-line reason of an error raised while writing files, or None when `exc` is not a write error.

    A full disk does not always surface as OSError: torch.save raises RuntimeError from its zip writer and
    safetensors raises SafetensorError, each with an I/O message. Out-of-memory is never a write error."""
    import torch
    from safetensors import SafetensorError

    if isinstance(exc, torch.OutOfMemoryError) or not isinstance(exc, (OSError, RuntimeError, SafetensorError)):
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


FAULT_PAUSE_ENV = "KOALA_FAULT_CHECKPOINT_PAUSE_S"


def fault_injection_pause() -> None:
    """Fault injection for tests: with $KOALA_FAULT_CHECKPOINT_PAUSE_S set, hold a checkpoint half-written for that
    many seconds, so that a test can kill the run in the middle of the write. Unset in real runs: no effect."""
    seconds = float(os.environ.get(FAULT_PAUSE_ENV, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)
