"""The training run: set-up (`setup`) and the loop (`train`), with checkpoints, resume and pre-emption.

Only the student goes through `accelerator.prepare`; the frozen teacher, the data loader and the LR scheduler
stay outside it (the scheduler is stepped once per optimizer step by this loop, so its schedule does not depend
on the number of processes). Randomness of a step (timesteps, noise, caption dropout) comes from a generator
seeded by (seed, rank, step, micro-batch), so a resumed run draws exactly what the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError

from distill.files import fsync_tree
from train import checkpoint as ckpt
from train.callbacks import EMA, Audit, Callback, SampleGrid, ScalarLogger
from train.config import config_notes, grad_accum_steps


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


@dataclass
class TrainState:
    """Counters saved in every checkpoint (identical on all ranks)."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # images consumed, all processes together
    nonfinite_total: int = 0  # updates skipped for a non-finite loss or gradient
    nonfinite_run: int = 0  # ... of which in a row, up to now
    wandb_run_id: str | None = None
    kd_first: list = field(default_factory=list)  # kd loss of the first 20 steps (main process; floats or
    kd_last: list = field(default_factory=list)  # ... and of the last 20            device scalars until saved)

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["kd_first"] = [float(x) for x in self.kd_first]
        state["kd_last"] = [float(x) for x in self.kd_last]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class StopFlag:
    """A request to stop: SIGTERM, SIGUSR1 or SIGINT received, or a file `<run>/STOP` created (launchers and
    schedulers do not always relay signals to every rank; a file on the shared run directory reaches them all).
    The loop finishes the step, writes a checkpoint and exits 0 so that a scheduler can requeue the job."""

    FILE = "STOP"

    def __init__(self) -> None:
        self.signum: int | None = None
        self.file: Path | None = None
        self.stale_mtime: int | None = None
        self._previous: dict[int, Any] = {}

    def note_existing(self, output_dir: Path) -> None:
        """Remember the STOP file as it is now, at the start of the run: one older than the run (left by hand, or by
        the stop that ended the run it resumes) does not stop it; only a new one (or a touch: a new mtime) does,
        even one made while the models load."""
        self.file = output_dir / self.FILE
        self.stale_mtime = self._mtime()

    def install(self, output_dir: Path) -> None:
        """Catch SIGTERM, SIGUSR1 and SIGINT from now on; the STOP file is judged against note_existing's record
        (made here when the run did not make one)."""
        if self.file is None:
            self.note_existing(output_dir)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def requested(self) -> bool:
        if self.signum is not None:
            return True
        mtime = self._mtime()
        return mtime is not None and mtime != self.stale_mtime

    def _mtime(self) -> int | None:
        try:
            return None if self.file is None else self.file.stat().st_mtime_ns
        except OSError:
            return None

    def _handler(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signum = signum


def lr_lambda(warmup_steps: int, max_steps: int, schedule: str):
    """LR multiplier per optimizer step: linear warmup, then constant or cosine to zero at max_steps."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """A generator for one micro-batch, the same whether or not the run was interrupted before it."""
    value = int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(value % (2**63))


@dataclass
class Run:
    """Everything a loop, a callback or a test needs about a run in progress."""

    cfg: DictConfig
    accelerator: Any
    teacher: Any  # distill.teachers.TeacherBundle
    student: torch.nn.Module  # prepared (possibly wrapped) student
    distiller: Any  # distill.step.Distiller
    optimizer: Any
    lr_scheduler: Any
    loader: Any
    state: TrainState
    output_dir: Path
    accum: int
    callbacks: list[Callback]
    ema: EMA | None = None
    loader_iter: Any = None
    last_keys: list[str] = field(default_factory=list)  # sample keys of the last step (this rank)
    last_grad_norm: torch.Tensor | float | None = None  # a device scalar (read by the logger at log steps)
    last_lr: float | None = None  # the LR of the last step's update (the scheduler has moved on to the next one)
    checkpoint_pending: bool = False  # a periodic checkpoint put off until a step's loss is finite again
    paused_s: float = 0.0  # seconds spent writing checkpoints and drawing preview grids (not in the logged img/s)
    stopping: bool = False  # the ranks agreed to stop on request (callbacks may still meet in collectives)
    device_skip: Any = None  # distill.perf.DeviceSkip, or False where the host checks every update (set lazily)
    stop: StopFlag = field(default_factory=StopFlag)
    _components: dict[str, Any] | None = None
    _preview_only: list[torch.nn.Module] = field(default_factory=list)  # loaded for previews, kept on the host

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.student)

    def gather_fp32_master(self) -> dict[str, torch.Tensor] | None:
        """Under DeepSpeed's bf16/fp16 mode, the student's fp32 master weights (CPU tensors on the main process,
        None on the others); None when the student's own weights are fp32. Every rank must call it: the weights
        are assembled from the optimizer's partitions by a collective."""
        params = dict(self.unwrapped.named_parameters())
        if self.accelerator.state.deepspeed_plugin is None or all(p.dtype == torch.float32 for p in params.values()):
            return None
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in params.items():
            full = safe_get_full_fp32_param(param)  # collective
            if self.accelerator.is_main_process:
                out[name] = (param.float() if full is None else full).detach().cpu()
        return out if self.accelerator.is_main_process else None

    def _fp32_copy(self, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A CPU fp32 student holding `weights` (built on the meta device, so nothing is initialised twice)."""
        model = self.unwrapped
        with torch.device("meta"):
            copy = type(model).from_config(model.config)
        copy.load_state_dict(weights, strict=True, assign=True)
        return copy.eval()

    @contextlib.contextmanager
    def student_for_export(self) -> Iterator[torch.nn.Module]:
        """The unwrapped student holding the weights to export: with EMA on, the EMA weights while inside (the
        live weights wait in host memory and come back bit for bit on exit, so no second copy of the student
        sits on the GPU); else the live weights."""
        if self.ema is None:
            yield self.unwrapped
            return
        params = list(self.unwrapped.parameters())
        self.ema.model.store(params)  # a CPU copy
        self.ema.copy_to(self.unwrapped)
        try:
            yield self.unwrapped
        finally:
            self.ema.model.restore(params)

    @contextlib.contextmanager
    def student_to_save(self, *, ema: bool, master: dict[str, torch.Tensor] | None = None
                        ) -> Iterator[torch.nn.Module]:
        """The student whose weights a folder gets: the EMA average (`ema`) or the live weights, in fp32. Weights
        that are fp32 already come as student_for_export does; under DeepSpeed's bf16/fp16 mode a CPU fp32 copy
        of the EMA's fp32 average, or of `master` (gather_fp32_master) for the live weights, never bf16 ones."""
        half = any(p.dtype != torch.float32 for p in self.unwrapped.parameters())
        if half and ema:
            names = [name for name, _ in self.unwrapped.named_parameters()]
            yield self._fp32_copy({n: s.detach().float().cpu() for n, s in
                                   zip(names, self.ema.model.shadow_params, strict=True)})
        elif half and master is not None:
            yield self._fp32_copy(master)
        elif ema:
            with self.student_for_export() as student:
                yield student
        else:
            yield self.unwrapped

    def skip_counts(self) -> dict[str, int]:
        """This rank's skipped samples per reason."""
        counts = getattr(self.loader, "skip_counts", None)
        return dict(counts()) if callable(counts) else {}

    def skip_counts_all_ranks(self) -> dict[str, int]:
        """Skipped samples per reason, summed over every rank (a collective: every rank must call it)."""
        from accelerate.utils import gather_object

        return sum_counts(gather_object([self.skip_counts()]))

    def teacher_components(self) -> dict[str, Any]:
        """Teacher pipeline parts for previews. The VAE and text encoders that training does not use (the latent
        path) are loaded once into host memory and stay there between previews: `preview_components` moves them
        to the device only while a grid is drawn (about 3.6 GB in fp32 for SDXL's)."""
        if self._components is None:
            from diffusers import EulerDiscreteScheduler

            from distill.teachers import load_text_encoders, load_vae

            t = self.teacher
            vae = t.vae or load_vae(t.path, device="cpu", vae_path=self.cfg.teacher.vae_path)
            tokenizers, encoders = ((t.tokenizers, t.text_encoders) if t.text_encoders
                                    else load_text_encoders(t.path, device="cpu"))
            self._preview_only = ([vae] if t.vae is None else []) + ([] if t.text_encoders else list(encoders))
            self._components = {
                "unet": t.unet, "vae": vae, "text_encoder": encoders[0], "text_encoder_2": encoders[1],
                "tokenizer": tokenizers[0], "tokenizer_2": tokenizers[1],
                "scheduler": EulerDiscreteScheduler.from_config(  # the teacher predicts what the run trains on
                    EulerDiscreteScheduler.load_config(str(t.path), subfolder="scheduler"),
                    prediction_type=self.cfg.teacher.prediction_type),
            }
        return self._components

    @contextlib.contextmanager
    def preview_components(self) -> Iterator[dict[str, Any]]:
        """`teacher_components` with the preview-only modules on the training device while inside, back in host
        memory on exit (also when drawing fails), so training never carries them. The feature taps keep nothing
        meanwhile."""
        components = self.teacher_components()
        device = self.accelerator.device
        try:
            for module in self._preview_only:
                module.to(device)
            with self.distiller.tap_t.paused(), self.distiller.tap_s.paused():
                yield components
        finally:
            for module in self._preview_only:
                module.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def log_image(self, key: str, path: Path) -> None:
        """Log an image file to W&B when it is tracking (main process)."""
        if self.cfg.tracking.wandb and self.accelerator.is_main_process:
            import wandb

            self.accelerator.log({key: wandb.Image(str(path))}, step=self.state.step)


def _wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    import os

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online":
        return "online"
    netrc = Path.home() / ".netrc"
    return "online" if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore") else "offline"


def sum_counts(per_rank: list[dict[str, int]]) -> dict[str, int]:
    """Per-reason counts of several ranks added up, by reason name."""
    total: Counter[str] = Counter()
    for counts in per_rank:
        total.update(counts)
    return dict(sorted(total.items()))


def _process_group(timeout_min: float) -> tuple[bool, int]:
    """Form the process group before the `Accelerator`; returns (run on the CPU, number of processes).

    timeout_min: minutes a rank waits in a collective before it fails (NCCL's own default is 10, too short for
    a slow checkpoint write of a 1B student while the other ranks wait for it).

    Without CUDA, Accelerate forms a multi-process (gloo) group only when told it runs on the CPU, and under
    DeepSpeed it picks no backend at all (every rank would believe it is alone while DeepSpeed's engine sees them
    all); gloo is named for that case, which is how the tests run ZeRO-2 on the CPU.
    """
    from datetime import timedelta

    from accelerate import PartialState

    from train.config import launch_uses_deepspeed

    timeout = timedelta(minutes=timeout_min)
    if torch.cuda.is_available():
        return False, PartialState(timeout=timeout).num_processes
    if launch_uses_deepspeed():
        return False, PartialState(cpu=False, backend="gloo", timeout=timeout).num_processes
    return True, PartialState(cpu=True, timeout=timeout).num_processes


def _pin_launcher_env(accum: int, max_grad_norm: float) -> None:
    """Make the Hydra config the only source of accumulation steps and clipping.

    `accelerate launch` exports the accelerate config's `gradient_accumulation_steps` / `gradient_clipping` as
    environment variables, and `Accelerator` prefers them to its arguments: a DeepSpeed config's `auto` would crash
    `int()`, and a number there would silently replace the accumulation the global batch needs.
    """
    import sys

    for key, value in (("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", str(accum)),
                       ("ACCELERATE_GRADIENT_CLIPPING", str(float(max_grad_norm)))):
        given = os.environ.get(key)
        if given not in (None, "auto", value):
            print(f"warning: {key}={given} from the accelerate config is replaced by {value} from the Hydra config "
                  "(train.global_batch_size, train.micro_batch_size, train.max_grad_norm)", file=sys.stderr)
        os.environ[key] = value


def _resume_data_state(cfg: DictConfig, ckpt_dir: Path, rank: int, world: int, say: Any) -> dict[str, Any] | None:
    """This rank's loader state from a checkpoint: its own saved position when the data layout is unchanged; with
    train.resume_data=next_epoch and another layout, a start at the next data epoch (see next_epoch_state)."""
    from data.stream import next_epoch_state
    from train.config import ConfigError, data_identity, data_resume_changes, data_resume_refusal, describe_changes

    saved = ckpt.read_data_states(ckpt_dir)
    changes, epoch = data_resume_changes(cfg, ckpt_dir, world)
    if not changes:
        return next((s for s in saved if s.get("rank") == rank), None)
    if cfg.train.resume_data != "next_epoch":  # train/main.py refuses this in validate(), before models load
        raise ConfigError(data_resume_refusal(ckpt_dir, changes, epoch))
    say(f"warning: the data layout changed since {ckpt_dir.name} ({describe_changes(changes)}): the data stream "
        f"restarts at epoch {epoch + 1}; the rest of epoch {epoch} is not seen (train.resume_data=next_epoch)")
    return next_epoch_state(saved, data_identity(cfg, world, rank))


def reset_accelerate() -> None:
    """A fresh Accelerate singleton state, so that several runs can be set up one after another in one process
    (benchmarks, tests)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def setup(cfg: DictConfig, *, callbacks: list[Callback] | None = None, show_progress: bool = True) -> Run:
    """Build the accelerator, teacher, student, optimizer, data stream and callbacks; resume if asked."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from data.stream import build_loader
    from distill.features import format_pairs, match_features
    from distill.perf import apply_speed_options
    from distill.step import Distiller
    from distill.students import (
        build_unet,
        derive_student_config,
        format_stage_tables,
        init_student_from_teacher,
        resolve_spec,
        summarize_mapping,
    )
    from distill.teachers import DTYPES, load_teacher

    tr = cfg.train
    output_dir = Path(tr.output_dir)
    stop = StopFlag()
    stop.note_existing(output_dir)  # before the models load, which can take minutes: a STOP made meanwhile counts
    use_wandb = cfg.tracking.wandb and cfg.tracking.mode != "disabled"
    on_cpu, processes = _process_group(tr.collective_timeout_min)
    accum = grad_accum_steps(cfg, processes)
    _pin_launcher_env(accum, tr.max_grad_norm)
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=tr.mixed_precision,
        gradient_accumulation_steps=accum,
        # DDP's gradients are views into its all-reduce buckets: without this it keeps a second copy of every
        # gradient (about 2.9 GiB for KOALA-700M in fp32), which the memory planner does not count
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
        log_with="wandb" if use_wandb else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), automatic_checkpoint_naming=False),
    )
    world = accelerator.num_processes
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None:  # micro-batch, accumulation and clipping come from the Hydra config only
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = tr.micro_batch_size
        ds_plugin.deepspeed_config["gradient_accumulation_steps"] = accum
        ds_plugin.deepspeed_config["gradient_clipping"] = tr.max_grad_norm
        if ds_plugin.deepspeed_config.get("bf16", {}).get("enabled"):  # skip non-finite updates, as without it
            ds_plugin.deepspeed_config["bf16"].setdefault("check_grad_overflow", True)
    main = accelerator.is_main_process
    say = accelerator.print
    if accelerator.device.type == "cpu" and tr.mixed_precision == "fp16":
        say("warning: train.mixed_precision=fp16 has no effect on the CPU (Accelerate autocasts fp16 on GPUs only): "
            "this run computes in fp32; bf16 works on both")
    for note in config_notes(cfg):
        say(note)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_run_file(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        ckpt.remove_stale_temps(output_dir)
    accelerator.wait_for_everyone()

    device = accelerator.device
    precomputed = cfg.data.kind == "latents"
    teacher = load_teacher(cfg.teacher, device=device, with_vae=not precomputed, with_text=not precomputed,
                           unet_dtype=torch.float32)
    spec = resolve_spec(cfg.student.name, cfg.student.layers_per_block, cfg.student.transformer_layers_per_block,
                        cfg.student.mid_block)
    student = build_unet(derive_student_config(dict(teacher.unet.config), spec), device=device)
    mapping = init_student_from_teacher(student, teacher.unet)  # from the fp32 teacher weights
    teacher.unet.to(DTYPES[cfg.teacher.dtype])
    student.train()
    say(format_stage_tables(teacher.unet, student))
    say("student initialised from the teacher:\n  " + "\n  ".join(summarize_mapping(mapping)))
    apply_speed_options(tr, teacher.unet, student)

    optimizer = _optimizer(cfg, student, device)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tr.warmup_steps, tr.max_steps, tr.lr_schedule))
    state = TrainState()
    ema = EMA(student, tr.ema_decay) if tr.ema else None
    prepared, optimizer = accelerator.prepare(student, optimizer)
    for obj in (state, lr_scheduler, *([ema] if ema else [])):
        accelerator.register_for_checkpointing(obj)

    pairs = match_features(teacher.unet, accelerator.unwrap_model(prepared), cfg.distill.feature_types,
                           cfg.distill.lf_stages, cfg.distill.layer_map)
    distiller = Distiller(teacher, prepared, pairs, cfg.teacher, cfg.distill,
                          student_unwrapped=accelerator.unwrap_model(prepared),
                          empty_prompt=_empty_prompt(cfg) if precomputed else None)
    say("feature KD pairs:\n" + format_pairs(pairs))

    data_state = None
    resume_from = ckpt.resolve_resume(tr.resume, output_dir)
    wandb_name_suffix = ""  # a rollback's continuation is a new W&B run, named for the step it continues from
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except torch.OutOfMemoryError:
            raise
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
            raise ckpt.load_failure(resume_from, exc) from exc
        # load_state restores Accelerate's micro-batch counter, which decides the syncing micro-batch; checkpoints
        # are written between optimizer steps, so 0 is right, and a new accumulation count stays in phase
        accelerator.step = 0
        changed = apply_optimizer_settings(lr_scheduler, tr)
        if ema is not None and ema.model.decay != tr.ema_decay:  # EMAModel.load_state_dict restored the saved one
            changed.append(f"train.ema_decay {_short(ema.model.decay)} -> {_short(tr.ema_decay)}")
            ema.model.decay = tr.ema_decay
        if changed:
            say(f"note: from step {state.step} on, {'; '.join(changed)} (the config's values replace those the "
                "checkpoint held)")
        data_state = _resume_data_state(cfg, resume_from, accelerator.process_index, world, say)
        say(f"resumed from {resume_from} at step {state.step} ({state.samples_seen} samples seen)")
        saved = ((ckpt.read_meta(resume_from).get("config") or {}).get("train") or {}).get("global_batch_size")
        if saved is not None and saved != tr.global_batch_size:
            say(f"note: the global batch changes from {saved} to {tr.global_batch_size} images per optimizer step "
                f"at step {state.step} ({accum} accumulation step(s) of {world} x {tr.micro_batch_size})")
        if state.step >= tr.max_steps:
            say(f"step {state.step} is already at train.max_steps={tr.max_steps}: nothing to train (raise "
                "train.max_steps to go on); the run only ends as a finished one would (final grid, export)")
        if main:
            aside = ckpt.set_aside_later(output_dir, state.step)
            if aside is not None:
                say(f"this run's checkpoints after step {state.step} belong to the abandoned continuation: moved "
                    f"to {aside} (kept; not resumed from or pruned)")
                if use_wandb and state.wandb_run_id:  # W&B ignores steps below a run's last logged one
                    rolled_back_from, state.wandb_run_id = state.wandb_run_id, None  # a new run below
                    wandb_name_suffix = f"-from-step{state.step}"
                    say(f"note: W&B logs this continuation as a new run (it would drop the redone steps of run "
                        f"{rolled_back_from}, whose history goes past step {state.step})")
        accelerator.wait_for_everyone()
    loader = build_loader(cfg.data, batch_size=tr.micro_batch_size, rank=accelerator.process_index,
                          world_size=world, seed=tr.seed, state=data_state)

    if use_wandb:
        import wandb

        name = (cfg.tracking.run_name or output_dir.name) + wandb_name_suffix
        state.wandb_run_id = state.wandb_run_id or uuid.uuid4().hex[:8]  # kept in checkpoints
        accelerator.init_trackers(
            cfg.tracking.project, config=OmegaConf.to_container(cfg, resolve=True),
            init_kwargs={"wandb": {"id": state.wandb_run_id, "resume": "allow", "dir": str(output_dir),
                                   "name": name,
                                   "mode": _wandb_mode(cfg.tracking.mode), "tags": list(cfg.tracking.tags)}},
        )
        if main:
            table = wandb.Table(columns=["feature", "teacher", "student"],
                                data=[[p.label, p.teacher, p.student] for p in pairs])
            accelerator.log({"feature_pairs": table}, step=state.step)
    if main:
        _write_run_file(output_dir / "feature_pairs.txt", format_pairs(pairs) + "\n")
    cbs: list[Callback] = [*([ema] if ema else []), ScalarLogger(tr.log_every, show_progress),
                           SampleGrid(tr.sample_every, tr.sample_at_end), *([Audit()] if tr.audit else [])]
    return Run(cfg=cfg, accelerator=accelerator, teacher=teacher, student=prepared, distiller=distiller,
               optimizer=optimizer, lr_scheduler=lr_scheduler, loader=loader, state=state, output_dir=output_dir,
               accum=accum, callbacks=cbs + list(callbacks or []), ema=ema, stop=stop)


def _write_run_file(path: Path, text: str) -> None:
    """Write one of the run folder's own files; a full disk or a quota is CheckpointWriteError (one line, exit 5)
    instead of a traceback."""
    try:
        path.write_text(text)
    except OSError as exc:
        reason = ckpt.write_error_reason(exc) or type(exc).__name__
        raise ckpt.CheckpointWriteError(f"{path} could not be written: {reason}; free space there (or pick another "
                                        "train.output_dir) and start again") from exc


def _empty_prompt(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The empty caption's embeddings saved beside latent shards by `make latents` (for caption dropout with a
    teacher whose unconditional input is not all zeros)."""
    from data.latents import empty_prompt_path
    from distill.teachers import zeros_for_empty_prompt

    path = empty_prompt_path(cfg.data.shards)
    if cfg.distill.caption_dropout == 0 or zeros_for_empty_prompt(cfg.teacher.path) or not path.is_file():
        return None
    arrays = np.load(path)
    return torch.from_numpy(arrays["prompt_embeds"]), torch.from_numpy(arrays["pooled_prompt_embeds"])


def apply_optimizer_settings(lr_scheduler: torch.optim.lr_scheduler.LambdaLR, tr: DictConfig) -> list[str]:
    """After a resume, give the optimizer the config's settings; returns the changes, e.g. ["train.lr 1e-05 ->
    5e-06"].

    Loading an optimizer's state replaces its hyperparameters with the saved ones, and loading the LR scheduler
    replaces its base LR: without this, a rollback with a lower `train.lr` trained on at the old one, and
    `train.fused_adam` turned on at a resume left the non-fused AdamW that the on-device skip cannot drive. The
    schedule's shape (warmup, max_steps, cosine) is the config's already: its function is not saved. The moments and
    step counts stay as saved; a step count moves to where the (non-)fused kernel keeps it."""
    optimizer = lr_scheduler.optimizer  # the torch optimizer (DeepSpeed's ZeRO optimizer shares its groups)
    wanted = {"lr": ("train.lr", tr.lr), "weight_decay": ("train.weight_decay", tr.weight_decay),
              "betas": ("train.adam_beta1/2", (tr.adam_beta1, tr.adam_beta2)), "eps": ("train.adam_eps", tr.adam_eps)}
    if isinstance(optimizer, torch.optim.AdamW):
        wanted["fused"] = ("train.fused_adam", bool(tr.fused_adam))
    changed: dict[str, str] = {}
    for i, group in enumerate(optimizer.param_groups):
        for key, (name, value) in wanted.items():
            was = lr_scheduler.base_lrs[i] if key == "lr" else group.get(key)
            if key == "betas":
                was = tuple(was)
            if was != value and not (key == "fused" and not was and not value):
                changed[name] = f"{name} {_short(was)} -> {_short(value)}"
        lr_scheduler.base_lrs[i] = group["initial_lr"] = tr.lr
        group["lr"] = tr.lr * lr_scheduler.lr_lambdas[i](lr_scheduler.last_epoch)
        group["weight_decay"], group["betas"], group["eps"] = tr.weight_decay, wanted["betas"][1], tr.adam_eps
        if "fused" in wanted and bool(group.get("fused")) != bool(tr.fused_adam):
            group["fused"], group["foreach"] = bool(tr.fused_adam), None
            for p in group["params"]:  # the fused kernel keeps step counts on the parameter's device
                state = optimizer.state.get(p) or {}
                if torch.is_tensor(state.get("step")):
                    on_device = group["fused"] or group.get("capturable")
                    state["step"] = state["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return list(changed.values())


def _short(value: Any) -> str:
    """1e-05 for a float, (0.9, 0.999) for a tuple, str() otherwise."""
    if isinstance(value, tuple):
        return f"({', '.join(_short(v) for v in value)})"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _optimizer(cfg: DictConfig, student: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    tr = cfg.train
    kwargs = dict(lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps, weight_decay=tr.weight_decay)
    params = [p for p in student.parameters() if p.requires_grad]
    if tr.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # the low-memory profile's 8-bit AdamW
        except ImportError as exc:
            raise ImportError('train.optimizer=adamw8bit needs bitsandbytes: pip install -e ".[lowmem]"') from exc

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=bool(tr.fused_adam), **kwargs)  # fused: CUDA and CPU kernels


def save_checkpoint(run: Run) -> Path:
    """Write a complete checkpoint of the current step on every rank; the main process renames it into place.

    A write error on any rank (disk full, quota, permissions) becomes CheckpointWriteError on every rank at the
    same point: the ranks exchange their outcome before the rename, so none is left waiting for another and no
    rank removes a folder that another is still writing into. Weights that are not finite (an update that
    overflowed, although its loss and gradients were finite) are not written: NonFiniteError on every rank."""
    acc, step = run.accelerator, run.state.step
    params = [p.detach() for p in run.unwrapped.parameters()]
    if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):  # one host sync per checkpoint
        latest = ckpt.latest_checkpoint(run.output_dir)
        raise NonFiniteError(f"the student's weights hold non-finite values at step {step}, so no checkpoint was "
                             f"written; {f'the last good one is {latest}' if latest else 'none was written before'}"
                             " (lower train.lr, or raise train.warmup_steps)")
    tmp = ckpt.temp_dir(run.output_dir, step)
    # The folder exists for every rank before any of them writes into it; a rank that could not create it (a full
    # node-local disk) must not leave the others alone in DeepSpeed's collectives: the ranks agree first.
    _raise_write_failure(run, _agree(acc, _attempt(lambda: tmp.mkdir(parents=True, exist_ok=True))))
    with _deepspeed_writes_recorded(run) as deepspeed_failures:
        failed = _attempt(lambda: _write_state(run, tmp))
    failed = next(iter(deepspeed_failures), failed)  # the first error in time
    master = run.gather_fp32_master()  # every rank, even after a failure (a collective under DeepSpeed's half mode)
    if failed is None and acc.is_main_process:
        failed = _attempt(lambda: _write_students(run, tmp, master))
    _raise_write_failure(run, _agree(acc, failed))
    failed = None
    if acc.is_main_process:
        meta = {"step": step, "samples_seen": run.state.samples_seen, "teacher_name": run.cfg.teacher.name,
                "teacher_path": str(run.teacher.path),
                "teacher_unet_file": run.cfg.teacher.unet_file, "wandb_run_id": run.state.wandb_run_id,
                "world_size": acc.num_processes, "config": OmegaConf.to_container(run.cfg, resolve=True)}
        failed = _attempt(lambda: ckpt.finalize(run.output_dir, step, meta, run.cfg.train.keep_last))
    _raise_write_failure(run, _agree(acc, failed))
    return ckpt.checkpoint_root(run.output_dir) / ckpt.checkpoint_name(step)


def _write_state(run: Run, tmp: Path) -> None:
    """This rank's part: Accelerate's state (every rank calls it; DeepSpeed needs all of them) and its data
    position."""
    acc = run.accelerator
    acc.save_state(str(tmp))
    ckpt.data_state_file(tmp, acc.process_index).write_text(json.dumps(run.loader.state_dict()))
    if not acc.is_main_process:  # flushed from the node that wrote them (the main process flushes the whole folder
        fsync_tree(tmp, missing_ok=True)  # before the rename, which covers its own node); others may still write
    ckpt.fault_injection_pause()


def _write_students(run: Run, tmp: Path, master: dict[str, torch.Tensor] | None) -> None:
    """The student (and its EMA) in `save_pretrained` layout (main process)."""
    for folder, ema in (("student", False), *([("student_ema", True)] if run.ema is not None else [])):
        with run.student_to_save(ema=ema, master=master) as student:
            student.save_pretrained(tmp / folder)


@contextlib.contextmanager
def _deepspeed_writes_recorded(run: Run) -> Iterator[list[str]]:
    """Under DeepSpeed, keep a write error from leaving the other ranks waiting: DeepSpeed's save_checkpoint ends
    with a barrier, which a rank that raised in the middle would skip.

    - Its checkpoint engine's writes (the model states and optimizer partitions) record their error (the yielded
      list of reasons) instead of raising it, and the files after a failed one are not written.
    - Its other writes (the recovery scripts and the `latest` file, after its last collective before the
      barrier) still raise: the rank then joins the barrier before the error goes on.
    Without DeepSpeed: nothing to do (Accelerate's own save has no collective)."""
    failures: list[str] = []
    engine = run.student
    writer = getattr(engine, "checkpoint_engine", None)
    if writer is None:
        yield failures
        return
    save, save_checkpoint = writer.save, engine.save_checkpoint

    def recording_save(*args: Any, **kwargs: Any) -> None:
        if not failures:
            reason = _attempt(lambda: save(*args, **kwargs))
            if reason is not None:
                failures.append(reason)

    def barrier_kept(*args: Any, **kwargs: Any) -> Any:
        try:
            return save_checkpoint(*args, **kwargs)
        except BaseException as exc:
            if ckpt.write_error_reason(exc) is not None:
                import torch.distributed as dist

                dist.barrier()  # the one that ends save_checkpoint, where the other ranks wait
            raise

    with _shadowed(writer, "save", recording_save), _shadowed(engine, "save_checkpoint", barrier_kept):
        yield failures


@contextlib.contextmanager
def _shadowed(obj: Any, name: str, replacement: Any) -> Iterator[None]:
    """`obj.name` is `replacement` (an instance attribute over the class's method) inside the block."""
    own = name in vars(obj)
    previous = getattr(obj, name)
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)


def _attempt(write: Any) -> str | None:
    """Call `write()`; the one-line reason of the write error it raised (checkpoint.write_error_reason), or None
    when it succeeded. Any other error propagates."""
    try:
        write()
    except BaseException as exc:
        reason = ckpt.write_error_reason(exc)
        if reason is None:
            raise
        return reason
    return None


def _agree(acc: Any, failed: str | None) -> str | None:
    """Every rank's outcome of a write, exchanged (a collective): the first failure ("reason (rank r)" when there
    are several ranks), or None when every rank succeeded."""
    if acc.num_processes == 1:
        return failed
    import torch.distributed as dist

    outcomes: list[str | None] = [None] * acc.num_processes
    dist.all_gather_object(outcomes, failed)
    return next((f"{reason} (rank {rank})" for rank, reason in enumerate(outcomes) if reason is not None), None)


def _raise_write_failure(run: Run, failure: str | None) -> None:
    """Raise CheckpointWriteError on every rank when any rank failed; the partial folder is removed first (by every
    rank: each node may write to its own disk)."""
    if failure is not None:
        raise ckpt.write_failed(run.output_dir, run.state.step, failure)


def _grad_norm(run: Run) -> torch.Tensor | None:
    max_norm = run.cfg.train.max_grad_norm
    params = [p for p in run.student.parameters() if p.grad is not None]
    norm = run.accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if norm is not None and not isinstance(norm, torch.Tensor):
        # DeepSpeed clips inside its engine step (run by accelerator.backward) and reports that norm as a float;
        # its ZeRO optimizer skips a non-finite update itself (step_was_skipped)
        norm = torch.tensor(float(norm), device=run.accelerator.device)
    return norm


def _device_skip(run: Run) -> Any:
    """distill.perf.DeviceSkip when non-finite updates can be skipped without a host sync: the optimizer is torch's
    fused AdamW and no callback needs to know, step by step, whether an update was applied (on_update, e.g. EMA);
    else None (the host checks the gradient norm every optimizer step)."""
    if run.device_skip is None:
        from distill.perf import DeviceSkip, supports_device_skip

        inner = getattr(run.optimizer, "optimizer", run.optimizer)
        wants_updates = any(getattr(type(cb), "on_update", None) is not Callback.on_update for cb in run.callbacks)
        ok = supports_device_skip(inner, run.cfg.train.mixed_precision) and not wants_updates
        run.device_skip = (DeviceSkip(run.accelerator.device, run.state.nonfinite_total, run.state.nonfinite_run)
                           if ok else False)
    return run.device_skip or None


def _counters_due(run: Run) -> bool:
    """Whether the on-device skip counters are read after this step: log, checkpoint and last steps, a stop, or a
    put-off checkpoint waiting for a finite step."""
    tr, step = run.cfg.train, run.state.step
    return (step % max(1, tr.log_every) == 0 or step == tr.max_steps or run.stop.requested() or run.checkpoint_pending
            or bool(tr.checkpoint_every and step % tr.checkpoint_every == 0))


def train_one_step(run: Run) -> dict[str, torch.Tensor]:
    """One optimizer step over `accum` micro-batches; returns the detached loss sums (per micro-batch mean)."""
    from distill.perf import begin_phase, move_batch

    acc, st = run.accelerator, run.state
    sums: dict[str, torch.Tensor] = {}
    applied = False
    skip = _device_skip(run)
    phases = getattr(run.distiller, "phases", None)  # a PhaseTimer only when a benchmark breaks the step down
    run.last_keys = []
    for micro in range(run.accum):
        begin_phase(phases, "data")
        batch = move_batch(next(run.loader_iter), acc.device)  # asynchronous copy: no host sync
        run.last_keys.extend(batch.get("keys", []))
        gen = step_generator(run.cfg.train.seed, acc.process_index, st.step, micro, acc.device)
        with acc.accumulate(run.student):
            with acc.autocast():
                losses = run.distiller(batch, gen)
            begin_phase(phases, "backward")
            acc.backward(losses["total"])
            if acc.sync_gradients:
                begin_phase(phases, "optimizer")
                norm = _grad_norm(run)
                # The norm is of the all-reduced gradient, so every rank takes the same decision.
                if skip is not None and norm is not None:  # the fused kernel skips a non-finite update itself
                    skip.step(getattr(run.optimizer, "optimizer", run.optimizer), norm, run.optimizer.step)
                elif norm is None or acc.scaler is not None or bool(torch.isfinite(norm)):  # host sync
                    # fp16: the GradScaler must see every step; it skips a non-finite update itself (counted
                    # below through step_was_skipped) and lowers its scale, or the next unscale_ would raise
                    run.optimizer.step()
                    applied = True
                run.optimizer.zero_grad(set_to_none=True)
                run.last_grad_norm = None if norm is None else norm.detach()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0) + v.detach() / run.accum
    if skip is None:
        if applied and not run.optimizer.step_was_skipped:
            st.nonfinite_run = 0
            for cb in run.callbacks:
                cb.on_update(run)
        else:  # not applied: a non-finite norm; or the GradScaler (fp16) or DeepSpeed skipped the update
            st.nonfinite_total += 1
            st.nonfinite_run += 1
    run.last_lr = run.lr_scheduler.get_last_lr()[0]  # a list of floats: no device sync
    run.lr_scheduler.step()
    st.step += 1
    st.samples_seen += run.cfg.train.global_batch_size
    if skip is not None and _counters_due(run):  # the only host sync of the on-device skip
        st.nonfinite_total, st.nonfinite_run = skip.read()
    return sums


def train(run: Run) -> dict[str, Any]:
    """The loop: steps until max_steps or a stop signal; checkpoints; ends with the export and a summary."""
    cfg, acc, st = run.cfg, run.accelerator, run.state
    run.loader_iter = iter(run.loader)
    run.stop.install(run.output_dir)
    if run.stop.stale_mtime is not None:
        acc.print(f"note: {run.stop.file} is older than this run and is ignored; touch it again to stop the run")
    for cb in run.callbacks:
        cb.on_start(run)
    t0, preempted = time.perf_counter(), False
    try:
        while st.step < cfg.train.max_steps:
            sums = train_one_step(run)
            _track_kd(run, sums["kd"])
            if st.nonfinite_run >= cfg.train.max_nonfinite:
                raise NonFiniteError(
                    f"{st.nonfinite_run} consecutive non-finite losses/gradients at step {st.step}; "
                    f"the last good checkpoint is intact (train.max_nonfinite={cfg.train.max_nonfinite})")
            for cb in run.callbacks:
                cb.on_step_end(run, sums)
            every = cfg.train.checkpoint_every
            stop = _should_stop(run)
            due = bool(every and st.step % every == 0) or run.checkpoint_pending
            if due and st.nonfinite_run and not stop and st.step != cfg.train.max_steps:
                # inside a streak of skipped updates the weights may be what makes the losses non-finite: with
                # keep_last such checkpoints would replace the good ones before max_nonfinite ends the run
                if not run.checkpoint_pending:
                    _progress_note(run, f"checkpoint of step {st.step} put off: its loss was not finite "
                                        f"({st.nonfinite_run} step(s) in a row); written at the next finite step")
                run.checkpoint_pending = True
            elif due or stop or st.step == cfg.train.max_steps:
                started = time.perf_counter()
                written = save_checkpoint(run)
                run.paused_s += time.perf_counter() - started
                run.checkpoint_pending = False
                if not stop:  # a stop says so in its own line
                    _progress_note(run, f"checkpoint written: {written}")
            if stop:
                preempted, run.stopping = True, True
                if acc.is_main_process and run.stop.file is not None:
                    run.stop.file.unlink(missing_ok=True)  # a requeued job must not stop again at once
                for cb in run.callbacks:
                    cb.on_stop(run)
                acc.print(f"stop requested: checkpoint written at step {st.step}, exiting with code 0")
                break
    except BaseException:
        for cb in run.callbacks:
            cb.on_stop(run)
        raise
    finally:
        run.stop.uninstall()
    summary: dict[str, Any] = {"steps": st.step, "preempted": preempted,
                               "seconds": round(time.perf_counter() - t0, 1),
                               "data_skipped": run.skip_counts_all_ranks()}  # every rank
    if not preempted:
        if st.nonfinite_run:  # read at the last step (counters are due there)
            acc.print(f"warning: the last {st.nonfinite_run} step(s) had non-finite losses and skipped their updates: "
                      "the final checkpoint" + (" and the export hold" if cfg.train.export else " holds") +
                      " the weights of the last applied update, which may be what makes the losses non-finite")
        for cb in run.callbacks:
            cb.on_end(run)
        master = run.gather_fp32_master() if cfg.train.export and run.ema is None else None  # every rank
        failed = None
        if cfg.train.export and acc.is_main_process:
            from train.export import export_pipeline

            def export() -> None:
                with run.student_to_save(ema=run.ema is not None, master=master) as student:
                    summary["export_dir"] = str(export_pipeline(run.teacher.path, cfg.teacher, student,
                                                                run.output_dir / "export"))

            failed = _attempt(export)
        failure = _agree(acc, failed)
        if failure is not None:
            raise ckpt.export_failed(run.output_dir, run.output_dir / "export", failure)
        grid = next((cb.last_path for cb in run.callbacks if isinstance(cb, SampleGrid)), None)
        summary["samples"] = str(grid) if grid else None
    summary["kd_loss_first"] = float(np.mean([float(x) for x in st.kd_first])) if st.kd_first else None
    summary["kd_loss_last"] = float(np.mean([float(x) for x in st.kd_last])) if st.kd_last else None
    acc.wait_for_everyone()
    acc.end_training()
    return summary


def _progress_note(run: Run, text: str) -> None:
    """One line on the main process, above the progress bar when there is one (the bar stays intact)."""
    bar = next((cb.bar for cb in run.callbacks if isinstance(cb, ScalarLogger) and cb.bar is not None), None)
    if bar is not None:
        bar.write(text)
    else:
        run.accelerator.print(text)


_KD_WINDOW = 20  # steps averaged for the demo's first/last KD loss


def _track_kd(run: Run, kd: torch.Tensor) -> None:
    """Keep the KD loss of the first and the last 20 steps as device scalars (read only when saved/summarised)."""
    if not run.accelerator.is_main_process:
        return
    value = kd.detach()
    st = run.state
    if len(st.kd_first) < _KD_WINDOW:
        st.kd_first.append(value)
    st.kd_last = (st.kd_last + [value])[-_KD_WINDOW:]


def _should_stop(run: Run) -> bool:
    """Whether any rank received a stop signal (all ranks agree, so all of them checkpoint and exit)."""
    flag = run.stop.requested()
    if run.accelerator.num_processes == 1:
        return flag
    if run.state.step % run.cfg.train.log_every and run.state.step != run.cfg.train.max_steps:
        return False  # ranks compare flags only every log_every steps: no host sync in the other steps
    t = torch.tensor([1.0 if flag else 0.0], device=run.accelerator.device)
    return bool(run.accelerator.reduce(t, reduction="sum").item() > 0)
