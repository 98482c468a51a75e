"""Entry point: `accelerate launch train/main.py +experiment=koala_lightning_1b [key=value ...]`.

Composes the Hydra config from conf/, checks it (one line on error, before any model loads), trains, and prints
one JSON summary line on the main process. `python train/main.py --check [key=value ...]` only composes and checks
the config: `make train` and scripts/slurm_train.sh run it before `accelerate launch`, whose launcher would
otherwise follow a config error's line with its own traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python train/main.py` from anywhere

from omegaconf import DictConfig  # noqa: E402

from train.config import ConfigError, config_help, load_config, repeated_keys, validate  # noqa: E402

LAUNCHER_ENV = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")  # set by accelerate launch / torchrun


def follow_launcher() -> bool:
    """Under a launcher (accelerate launch, torchrun), ask Linux to send this process SIGTERM when the launcher
    dies: a SIGTERM to `accelerate launch` with one process ended the launcher but not the trainer, which trained
    on unseen. SIGTERM then stops the run as any stop request does (a checkpoint, exit 0). Returns whether it was
    set (Linux only, and only under a launcher, so that `nohup python train/main.py` outlives its shell)."""
    if not sys.platform.startswith("linux") or not any(k in os.environ for k in LAUNCHER_ENV):
        return False
    import ctypes
    import signal

    parent = os.getppid()  # may be 1 in a container whose first process is the launcher
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        return False
    if os.getppid() != parent:  # the launcher died before the request (this process was re-parented): act now
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def launch_refusal(cfg: Any) -> str | None:
    """What this process cannot run of `cfg` (None when nothing), found with the libraries and the device the run
    will use: the FP8 teacher's GPU, the SDPA backend, the 8-bit optimizer's library. One line, with the fix."""
    import torch

    from distill.perf import fp8_refusal, sdpa_refusal

    tr = cfg.train
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    if tr.teacher_fp8 and (refusal := fp8_refusal(device)):
        return f"{refusal} (set train.teacher_fp8=false)"
    # the attention inputs' dtype under autocast (Accelerate autocasts fp16 on GPUs only)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16 if device != "cpu" else torch.float32}.get(
        tr.mixed_precision, torch.float32)
    if refusal := sdpa_refusal(tr.sdpa_backend, device, dtype):
        return f"{refusal}; set train.sdpa_backend=auto"
    if tr.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # not installed, or installed without a usable native library
            return (f"train.optimizer=adamw8bit needs bitsandbytes, which cannot be imported here "
                    f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}): "
                    'pip install -e ".[lowmem]", or set train.optimizer=adamw')
    return None


def main(argv: list[str] | None = None) -> int:
    """Run training with Hydra overrides from argv; return the process exit code.

    Errors that every rank meets alike (a bad config, non-finite losses, a checkpoint or export that cannot be
    written: the ranks agree on those) are printed by global rank 0 only, so a launch of N processes says them
    once; out-of-memory, which one rank can meet alone, is printed by the rank that met it."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    if "-h" in overrides or "--help" in overrides:
        print(config_help(__doc__ or ""))
        return 0
    check_only = "--check" in overrides
    overrides = [o for o in overrides if o != "--check"]
    first_rank = os.environ.get("RANK", "0") == "0"
    world_size_text = os.environ.get("WORLD_SIZE", "1")
    if not world_size_text.isdigit() or int(world_size_text) < 1:
        print(f"config error: WORLD_SIZE={world_size_text!r} in the environment is not a process count (a whole "
              "number from 1; accelerate launch sets it)", file=sys.stderr)
        return 2
    world_size = int(world_size_text)
    # Before `accelerate launch` (make train, scripts/slurm_train.sh) whether the launch will use DeepSpeed is
    # not known here; the launched ranks check that against a resumed checkpoint.
    launched = any(k in os.environ for k in LAUNCHER_ENV)
    try:
        if repeated := repeated_keys(overrides):
            raise ConfigError(repeated)
        cfg = load_config(overrides)
        validate(cfg, world_size=world_size, launch_known=launched or not check_only)
    except ConfigError as exc:
        if first_rank:
            print(f"config error: {exc}", file=sys.stderr)
        return 2
    if check_only:
        print(f"config ok: {describe_run(cfg, world_size)}")
        return 0
    follow_launcher()
    import torch

    if refusal := launch_refusal(cfg):  # said before any model loads, not after minutes of loading
        if first_rank:
            print(f"config error: {refusal}", file=sys.stderr)
        return 2
    try:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a path the access check could not foresee (e.g. under /proc, a read-only mount)
        if first_rank:
            print(f"config error: train.output_dir={cfg.train.output_dir} cannot be created: "
                  f"{exc.strerror or exc}", file=sys.stderr)
        return 2

    from data.stream import NoUsableSamples, one_line
    from distill.teachers import TeacherError
    from train.checkpoint import CheckpointLoadError, CheckpointWriteError, RunLockedError, run_lock
    from train.loop import NonFiniteError, setup, train

    try:
        # rank 0 alone holds the run folder's lock; the launcher ends the other ranks when it exits with 2
        with run_lock(cfg.train.output_dir) if first_rank else contextlib.nullcontext():
            run = setup(cfg)
            summary = train(run)
    except RunLockedError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except NoUsableSamples as exc:  # every sample of a reader's shards was skipped (all corrupt, or all misshapen)
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except TeacherError as exc:  # found while loading, e.g. a folder that changed after the checks
        if first_rank:
            print(f"config error: {exc}", file=sys.stderr)
        return 2
    except CheckpointLoadError as exc:  # from the rank that read the damaged file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        if first_rank:
            print(f"error: {exc}", file=sys.stderr)
        return 3
    except CheckpointWriteError as exc:
        if first_rank:
            print(f"error: {exc}", file=sys.stderr)
        return 5
    except torch.OutOfMemoryError:
        print(f"error: {out_of_memory_advice(cfg, overrides)}", file=sys.stderr)
        return 4
    if run.accelerator.is_main_process:
        wandb_dir = Path(cfg.train.output_dir) / "wandb"
        logged = cfg.tracking.wandb and cfg.tracking.mode != "disabled"  # not a folder an earlier run left
        summary["wandb_dir"] = str(wandb_dir) if logged and wandb_dir.exists() else None
        print(json.dumps(summary), flush=True)
    return 0


def describe_run(cfg: DictConfig, world_size: int) -> str:
    """One line naming what a checked config would train: models, steps, batch arithmetic and output folder."""
    from train.config import grad_accum_steps

    tr, t = cfg.train, cfg.teacher
    teacher = t.name + (f" ({t.path})" if t.path else "") + (f" + {t.unet_file}" if t.unet_file else "")
    return (f"teacher {teacher}, student {cfg.student.name}, {tr.max_steps} steps of {tr.global_batch_size} images "
            f"= {world_size} process(es) x micro-batch {tr.micro_batch_size} x {grad_accum_steps(cfg, world_size)} "
            f"accumulation, mixed precision {tr.mixed_precision}, into {tr.output_dir}")


def out_of_memory_advice(cfg: object, overrides: list[str]) -> str:
    """One line for a CUDA out-of-memory error: where, at which micro-batch, and what to change."""
    import shlex

    import torch

    where = "the GPU"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        where = f"{props.name} ({props.total_memory / 2**30:.1f} GiB)"
    tr = cfg.train
    return (f"out of memory on {where} at train.micro_batch_size={tr.micro_batch_size}: lower it (accumulation "
            f"keeps train.global_batch_size={tr.global_batch_size}), or recompute stages with "
            f"train.checkpointing_blocks=[UP-1,UP-2]; `make plan-memory ARGS={shlex.quote(' '.join(overrides))}` "
            "estimates the peak on the CPU in under a minute. Checkpoints already written are intact "
            "(train.resume=latest)")


if __name__ == "__main__":
    sys.exit(main())
