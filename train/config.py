"""The root config schema, its composition from conf/ with Hydra, and the checks made before any model loads.

Every failure here is one line (`ConfigError`) naming the key, raised before anything heavy is imported or loaded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from data.config import DataConfig
from distill.config import DistillConfig, StudentConfig, TeacherConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class TrainConfig:
    """Optimisation, precision, checkpointing and monitoring of one run."""

    output_dir: str = "runs/default"  # run directory, pinned (every process must agree; no ${now:})
    seed: int = 0  # base seed; each rank adds its index
    max_steps: int = 500_000  # optimizer steps (the paper: 500K)
    global_batch_size: int = 128  # images per optimizer step over all processes (the paper: 128)
    micro_batch_size: int = 8  # images per process per forward; accumulation = global / (procs x micro)
    lr: float = 1e-5  # AdamW learning rate (the paper: constant 1e-5)
    lr_schedule: str = "constant"  # constant | cosine (after warmup, down to 0 at max_steps)
    warmup_steps: int = 0  # linear warmup, in optimizer steps
    optimizer: str = "adamw"  # adamw (torch) | adamw8bit (bitsandbytes, low-memory profile)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2  # decoupled weight decay (torch AdamW's default)
    fused_adam: bool = False  # torch's fused AdamW kernel (CUDA, or CPU); with it a non-finite update is skipped
    # on the device (found_inf, as GradScaler does) and the skip counters are read only every log_every steps
    max_grad_norm: float = 1.0  # gradient clipping by global norm; 0 disables
    mixed_precision: str = "bf16"  # no | fp16 | bf16 (Accelerate autocast; master weights stay fp32)
    gradient_checkpointing: bool = False  # recompute student activations in the backward pass
    compile: bool = False  # torch.compile each transformer/resnet block forward (regional compilation)
    channels_last: bool = False  # NHWC memory format for the conv layers
    # --- speed switches (distill/perf.py); none changes what a step computes beyond float rounding ---
    checkpointing_blocks: list[str] = field(default_factory=list)  # student stages (DW-1.., Mid, UP-1..) whose
    # blocks are recomputed in the backward pass; empty: gradient_checkpointing decides (all stages or none)
    compile_mode: str = "default"  # torch.compile mode: default | max-autotune-no-cudagraphs (longer compile)
    compile_backend: str = "inductor"  # torch.compile backend: inductor | aot_eager (traces only; CPU tests)
    sdpa_backend: str = "auto"  # attention kernel of teacher and student: auto (PyTorch picks) | flash |
    # efficient | cudnn | math, forced with torch.nn.attention.sdpa_kernel around every attention call
    teacher_fp8: bool = False  # frozen teacher's linear layers in FP8 (e4m3, per-row scales; CUDA capability
    # >= 8.9 only, refused elsewhere): faster teacher forward at a small output error, see docs/PERFORMANCE.md
    ema: bool = False  # keep an exponential moving average of the student
    # EMA decay per optimizer step, reached gradually: diffusers' EMAModel uses min(ema_decay, (1 + n) / (10 + n))
    # at update n, counted from 0 (0.5 at n = 8, 0.99 at n = 890, 0.9999 at n = 89,990), so the early average
    # follows the weights
    ema_decay: float = 0.9999
    checkpoint_every: int = 5000  # optimizer steps between checkpoints; 0 disables (a final one is still written)
    keep_last: int = 3  # checkpoints kept on disk (older ones are deleted); 0 keeps every one
    resume: str | None = None  # null | latest | path to a checkpoint folder
    resume_data: str = "exact"  # exact: the data stream continues where it stopped (needs the same processes,
    # data.num_workers, micro_batch_size, seed and shard count) | next_epoch: any layout, from the next data epoch
    log_every: int = 10  # optimizer steps between logged scalars (host syncs happen only then)
    sample_every: int = 5000  # optimizer steps between teacher-vs-student sample grids; 0: none during the run
    sample_at_end: bool = True  # one more grid when the run ends (previews: README, 'Watching a run')
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a photograph of an astronaut riding a horse on the moon",
        "a cup of coffee on a wooden table, morning light",
        "a red sports car parked in front of a brick wall",
        "a watercolor painting of a fox in a snowy forest",
    ])
    sample_seed: int = 0  # seed of the fixed sample noise
    max_nonfinite: int = 10  # consecutive non-finite losses/gradients before the run stops
    export: bool = True  # write a complete SDXL pipeline folder with the student at the end
    audit: bool = False  # write <run>/audit/rank<r>.jsonl: sample keys and LR of every step, final weight hash
    collective_timeout_min: float = 30.0  # how long a rank waits in a collective (barrier, all-gather) before the
    # launch fails; covers rank 0's sample grids and export and the slowest rank's checkpoint write (NCCL: 10)


@dataclass
class TrackingConfig:
    """Experiment tracking through Accelerate's W&B tracker."""

    wandb: bool = True  # log to W&B
    mode: str = "auto"  # auto (online when an API key is configured, else offline) | online | offline | disabled
    project: str = "koala-distill"
    run_name: str | None = None  # defaults to the run directory's name
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    """The whole run: teacher, student, objective, data, training and tracking."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


class ConfigError(ValueError):
    """A bad config, in one line that names the key."""


def _register_schema() -> None:
    ConfigStore.instance().store(name="schema", node=Config)


def _one_line(exc: BaseException) -> str:
    """The most specific message in an exception chain, folded to one line, naming the full key when known."""
    chain: list[BaseException] = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
    chain = [e for e in chain if str(e).strip() not in ("", "None")] or chain  # parser internals say "None"
    keyed = [e for e in chain if getattr(e, "full_key", None)]
    inner = keyed[-1] if keyed else chain[-1]
    text = str(inner).strip()
    msg = text.splitlines()[0] if text else type(inner).__name__
    key = getattr(inner, "full_key", None)
    if key and key not in msg:
        msg = f"{key}: {msg}"
    outer = str(exc).strip().splitlines()[0]
    if outer and outer != msg and outer.startswith("Could not override"):
        return f"{outer} {msg}"
    return msg


_QUOTED_PART = re.compile(r"'[^']*'|\"[^\"]*\"")  # a quoted piece of an override's value


def _quoted(value: str) -> bool:
    return len(value) > 1 and value[0] == value[-1] and value[0] in "'\""


def repeated_keys(overrides: list[str]) -> str | None:
    """One line when a key is given more than once (None otherwise). Hydra keeps the last silently, and the usual
    cause is the shell: an unquoted data.shards=/d/{000..099}.tar reaches the program as 100 overrides, and the run
    would train on the last shard alone."""
    seen: dict[str, list[str]] = {}
    for o in overrides:
        key = o.partition("=")[0].lstrip("+~")
        seen.setdefault(key, []).append(o.partition("=")[2])
    key, values = next(((k, v) for k, v in seen.items() if len(v) > 1), (None, []))
    if key is None:
        return None
    shown = ", ".join(values[:2]) + (", ..." if len(values) > 2 else "")
    hint = (f"a brace pattern the shell expanded? Quote it for Hydra: \"{key}='/data/{{000000..000099}}.tar'\""
            if len(values) > 2 else "give each key once")
    return f"{key} is given {len(values)} times ({shown}): {hint}"


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose conf/<config_name>.yaml with Hydra overrides against the typed schema.

    Raises ConfigError (one line naming the key) on an unknown key, a wrong type or a missing group option.
    """
    _register_schema()
    for o in overrides or []:
        if o.startswith("-"):
            raise ConfigError(f"{o}: unknown option; settings are key=value overrides, e.g. train.max_steps=5 "
                              "(--help lists the groups)")
        if "=" not in o and not o.startswith("~"):
            raise ConfigError(f"{o!r} has no '=': settings are key=value overrides, e.g. train.max_steps=5")
        if o.startswith(("hydra.", "+hydra.", "++hydra.")):
            raise ConfigError(f"{o}: hydra.* settings do not apply here (the run writes into train.output_dir)")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
    except Exception as exc:  # Hydra and OmegaConf raise several types; all become one line
        msg = _one_line(exc)
        braced = [o for o in overrides or [] if "{" in o.partition("=")[2] and not _quoted(o.partition("=")[2])]
        if braced and "mismatched input" in msg:
            key, _, value = braced[0].partition("=")
            msg += f" (in {braced[0]}: quote a brace pattern for Hydra, e.g. \"{key}='{value}'\" in the shell)"
        compared = [o for o in overrides or [] if re.search(r"[<>]", _QUOTED_PART.sub("", o.partition("=")[2]))]
        lexer = any(w in msg for w in ("LexerNoViableAlt", "mismatched input", "token recognition error"))
        if compared and not braced and lexer:
            key, _, value = compared[0].partition("=")
            items = ",".join(f"'{v.strip().strip(chr(39) + chr(34))}'" for v in value.strip("[]").split(","))
            msg = (f"{compared[0]}: Hydra cannot parse an unquoted < or > ({msg}); quote each filter, e.g. "
                   f"\"{key}=[{items}]\" in the shell")
        raise ConfigError(msg) from exc
    finally:
        GlobalHydra.instance().clear()
    if unknown := _unknown_key(cfg, OmegaConf.structured(Config)):
        raise ConfigError(unknown)
    return cfg


def _unknown_key(node: DictConfig, schema: DictConfig, prefix: str = "") -> str | None:
    """One line naming a key of `node` that the schema lacks, or None. Hydra's `+key=value` adds a key even to the
    typed config, so `+train.max_stepz=3` or `+experimnt=demo` would otherwise pass unnoticed."""
    import difflib

    for key in node:
        full = f"{prefix}{key}"
        if key not in schema:
            groups = [p.name for p in CONF_DIR.iterdir() if p.is_dir()] if not prefix else []
            close = difflib.get_close_matches(str(key), [*map(str, schema), *groups], n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            return (f"{full} is not a config key (a leading + adds keys the schema lacks; set existing ones as "
                    f"section.key=value, choose groups as group=option or +experiment=name){hint}")
        child, child_schema = node[key], schema[key]
        if OmegaConf.is_dict(child) and OmegaConf.is_dict(child_schema) and not OmegaConf.is_missing(schema, key):
            if found := _unknown_key(child, child_schema, f"{full}."):
                return found
    return None


def config_help(doc: str) -> str:
    """`doc` (a script's usage) followed by every Hydra group under conf/ with its options, for -h/--help."""
    lines = [doc.strip(), "", "Config groups (conf/, choose with group=option; experiments with +experiment=name):"]
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("accelerate", "eval")):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"  {group.name}: {', '.join(options)}")
    lines += ["Keys are typed and documented in distill/config.py, data/config.py and train/config.py; "
              "any key is set as section.key=value (e.g. train.max_steps=1000)."]
    return "\n".join(lines)


_CHOICES = {
    "teacher.name": ("sdxl_base", "sdxl_turbo", "sdxl_lightning", "tiny"),
    "teacher.prediction_type": ("epsilon", "v_prediction", "sample"),
    "teacher.timesteps": ("uniform", "trailing"),
    "teacher.dtype": ("bf16", "fp16", "fp32"),
    "teacher.unet_config": ("sdxl_base", "tiny"),
    "distill.layer_map": ("bottom", "interleave", "up"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.optimizer": ("adamw", "adamw8bit"),
    "train.resume_data": ("exact", "next_epoch"),
    "train.compile_mode": ("default", "max-autotune-no-cudagraphs"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "train.sdpa_backend": ("auto", "flash", "efficient", "cudnn", "math"),
    "tracking.mode": ("auto", "online", "offline", "disabled"),
    "teacher.sampler.scheduler": ("euler",),
    "teacher.sampler.timestep_spacing": ("leading", "trailing", "linspace"),
}


# Numeric settings and the values they admit: (key, test, what the value must be).
_RANGES: tuple[tuple[str, Any, str], ...] = (
    ("train.max_steps", lambda v: v >= 1, "at least 1"),
    ("train.seed", lambda v: v >= 0, "0 or more"),
    ("train.lr", lambda v: v > 0, "positive"),
    ("train.warmup_steps", lambda v: v >= 0, "0 or more"),
    ("train.adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.adam_eps", lambda v: v > 0, "positive"),
    ("train.weight_decay", lambda v: v >= 0, "0 or more"),
    ("train.max_grad_norm", lambda v: v >= 0, "0 (no clipping) or more"),
    ("train.ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.checkpoint_every", lambda v: v >= 0, "0 (only the final checkpoint) or more"),
    ("train.keep_last", lambda v: v >= 0, "0 (keep all) or more"),
    ("train.log_every", lambda v: v >= 1, "at least 1"),
    ("train.sample_every", lambda v: v >= 0, "0 (none during the run) or more"),
    ("train.max_nonfinite", lambda v: v >= 1, "at least 1"),
    ("train.collective_timeout_min", lambda v: v > 0, "positive (minutes)"),
    ("distill.w_task", lambda v: v >= 0, "0 or more"),
    ("distill.w_out", lambda v: v >= 0, "0 or more"),
    ("distill.w_feat", lambda v: v >= 0, "0 or more"),
    ("distill.caption_dropout", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("teacher.resolution", lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8 px"),
    ("teacher.num_train_timesteps", lambda v: v >= 1, "at least 1"),
    ("teacher.trailing_steps", lambda v: 1 <= v, "at least 1"),
    ("teacher.sampler.steps", lambda v: v >= 1, "at least 1 (the export's and previews' denoising steps)"),
    ("teacher.sampler.guidance_scale", lambda v: v >= 0, "0 or more (0 or 1: no classifier-free guidance)"),
    ("data.min_side", lambda v: v >= 0, "0 (no filter) or more, px"),
    ("data.min_aspect", lambda v: v > 0, "a positive width/height ratio (or null: no filter)"),
    ("data.max_aspect", lambda v: v > 0, "a positive width/height ratio (or null: no filter)"),
)


def launch_uses_deepspeed() -> bool:
    """Whether this process was started by `accelerate launch` with DeepSpeed (the launcher sets
    ACCELERATE_USE_DEEPSPEED=true then, and nothing otherwise)."""
    import os

    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage `accelerate launch` passes to DeepSpeed (its zero_stage, or the stage in the DeepSpeed JSON
    file it names); None when neither says, or the file cannot be read (DeepSpeed then reports it)."""
    import json
    import os

    if stage := os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return int(stage) if stage.isdigit() else None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path == "none":
        return None
    try:
        stage = json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, int) else None


def validate(cfg: DictConfig, world_size: int = 1, *, launch_known: bool = True) -> None:
    """Semantic checks that need no model: choices, paths, shards, student vs teacher, batch arithmetic, the
    checkpoint a resume reads.

    launch_known: whether the launcher's environment says if this launch uses DeepSpeed; False for the check that
    `make train` and scripts/slurm_train.sh run before `accelerate launch`. A resume is then not compared with the
    checkpoint on that point; the launched ranks compare it, before any model loads.
    Raises ConfigError with one line naming the key.
    """
    from distill.teachers import TeacherError

    deepspeed = launch_uses_deepspeed() if launch_known else None
    if deepspeed and deepspeed_zero_stage() == 3:
        raise ConfigError("DeepSpeed ZeRO stage 3 is not supported (transformers then partitions the text encoders' "
                          "weights as they load, and the feature hooks and the export expect whole modules); launch "
                          "with --config_file conf/accelerate/deepspeed_zero2.yaml: ZeRO-2 shards the student's "
                          "gradients and optimizer state, and the student's weights fit on one GPU")
    try:
        _validate(cfg, world_size, deepspeed)
    except TeacherError as exc:  # a teacher folder whose files cannot be read, found while reading its configs
        raise ConfigError(str(exc)) from exc


def config_notes(cfg: DictConfig) -> list[str]:
    """Settings that are valid but probably not meant, each as one `note:` line the run prints and goes on."""
    notes = []
    tr = cfg.train
    if tr.warmup_steps > tr.max_steps:
        notes.append(f"note: train.warmup_steps={tr.warmup_steps} is more than train.max_steps={tr.max_steps}: the "
                     f"learning rate rises to {tr.max_steps / tr.warmup_steps:.3g} x train.lr by the last step and "
                     f"never reaches train.lr{' or decays' if tr.lr_schedule == 'cosine' else ''}")
    if tr.fused_adam and tr.optimizer != "adamw":
        notes.append(f"note: train.fused_adam=true has no effect with train.optimizer={tr.optimizer} (it is torch's "
                     "fused AdamW kernel); non-finite updates are then checked on the host")
    return notes


def check_choices(cfg: DictConfig) -> None:
    """ConfigError (one line) when a key with a fixed set of values holds another (teacher.name, ...)."""
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _validate(cfg: DictConfig, world_size: int, deepspeed: bool | None) -> None:
    check_choices(cfg)
    for key, admits, what in _RANGES:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, float) and math.isinf(value):  # inf passes the comparisons (lr=inf made NaN weights)
            raise ConfigError(f"{key}={value} must be a finite number, {what}")
        if value is not None and (math.isnan(value) or not admits(value)):  # NaN fails no comparison either
            raise ConfigError(f"{key}={value} must be {what}")
    if cfg.data.num_workers > 0 and cfg.data.prefetch_factor < 1:
        raise ConfigError(f"data.prefetch_factor={cfg.data.prefetch_factor} must be at least 1 (batches each loader "
                          "worker keeps ready) with data.num_workers > 0")
    t = cfg.teacher
    if t.timesteps == "trailing" and t.trailing_steps > t.num_train_timesteps:
        raise ConfigError(f"teacher.trailing_steps={t.trailing_steps} is more than teacher.num_train_timesteps="
                          f"{t.num_train_timesteps}: the trailing grid has no more distinct timesteps than that")
    d = cfg.distill
    if d.w_task == 0 and d.w_out == 0 and d.w_feat == 0:
        raise ConfigError("distill.w_task, w_out and w_feat are all 0: the loss would be 0 and the student would not "
                          "learn (the paper weighs all three 1)")
    for ftype in cfg.distill.feature_types:
        if ftype not in ("sa", "ca", "ffn", "res"):
            raise ConfigError(f"distill.feature_types: {ftype!r} is not one of sa, ca, ffn, res")
    for stage in cfg.distill.lf_stages:
        if not re.fullmatch(r"(DW|UP)-\d+|Mid", stage):
            raise ConfigError(f"distill.lf_stages: {stage!r} is not a stage name like DW-1, Mid or UP-3")
    tr = cfg.train
    for stage in tr.checkpointing_blocks:
        if not re.fullmatch(r"(DW|UP)-\d+|Mid", stage):
            raise ConfigError(f"train.checkpointing_blocks: {stage!r} is not a stage name like DW-1, Mid or UP-3")
    _check_student(cfg)
    grad_accum_steps(cfg, world_size)  # the batch split: one line when it does not divide
    t = cfg.teacher
    if t.random_init:
        if cfg.data.kind != "latents":
            raise ConfigError("teacher.random_init=true has no VAE or text encoders: it needs data.kind=latents")
        if cfg.train.export:
            raise ConfigError("teacher.random_init=true is for benchmarks: it cannot export (set train.export=false)")
    elif t.name != "tiny":
        if not t.path and t.name == "sdxl_lightning" and not t.unet_file:
            raise ConfigError(
                "teacher.path and teacher.unet_file are not set: point teacher.path at a local SDXL-Base-1.0 "
                "diffusers folder (text encoders, VAE, scheduler) and teacher.unet_file at a local "
                "sdxl_lightning_4step_unet.safetensors"
            )
        if not t.path:
            raise ConfigError(
                f"teacher.path is not set: point it at a local {t.name} diffusers folder "
                f"(e.g. teacher.path=/models/{t.name})"
            )
        if not Path(t.path).is_dir():
            raise ConfigError(f"teacher.path={t.path} {_absent(t.path)} (a local diffusers SDXL pipeline folder)")
    elif t.path and not Path(t.path).is_dir():
        raise ConfigError(f"teacher.path={t.path} {_absent(t.path)} (leave it null to build the tiny pipeline)")
    if t.unet_file and not Path(t.unet_file).is_file():
        what = "is a folder" if Path(t.unet_file).is_dir() else "does not exist"
        raise ConfigError(f"teacher.unet_file={t.unet_file} {what} (a .safetensors U-Net file)")
    if t.vae_path and not Path(t.vae_path).is_dir():
        raise ConfigError(f"teacher.vae_path={t.vae_path} {_absent(t.vae_path)} (a diffusers VAE folder)")
    from distill.files import weights_problem
    from distill.teachers import has_weights

    if t.vae_path and not ((Path(t.vae_path) / "config.json").is_file() and has_weights(Path(t.vae_path))):
        raise ConfigError(f"teacher.vae_path={t.vae_path} is not a diffusers VAE folder: it needs config.json and "
                          "its weights (e.g. diffusion_pytorch_model.safetensors)")
    if t.vae_path and (vae_problem := vae_folder_problem(t.vae_path)):
        raise ConfigError(f"teacher.vae_path={t.vae_path} {vae_problem}")
    if t.vae_path and (damage := weights_problem(t.vae_path)):
        raise ConfigError(f"teacher.vae_path={t.vae_path} has a damaged weight file: {damage}")
    if t.path and not t.random_init:
        _check_pipeline_folder(cfg)
    if t.unet_file and not t.random_init:
        _check_unet_file(t)
    if t.name == "sdxl_lightning" and not t.unet_file:
        raise ConfigError("teacher.unet_file is not set: point it at a local sdxl_lightning_4step_unet.safetensors")
    shards = cfg.data.shards
    if not shards:
        raise ConfigError("data.shards is not set: a brace pattern, folder or pipe: command of webdataset shards")
    if cfg.data.kind == "raw" and cfg.data.resolution != t.resolution:
        raise ConfigError(
            f"data.resolution={cfg.data.resolution} differs from teacher.resolution={t.resolution}, the side the "
            f"run trains, previews and exports at: set teacher.resolution={cfg.data.resolution} instead "
            "(data.resolution follows it)"
        )
    _check_data(cfg, world_size)
    _check_output_dir(tr.output_dir)
    if (tr.sample_every > 0 or tr.sample_at_end) and not tr.sample_prompts and not t.random_init:
        raise ConfigError("train.sample_prompts is empty: sample grids need at least one prompt (or set "
                          "train.sample_every=0 train.sample_at_end=false)")
    if tr.resume is None:
        from train.checkpoint import latest_checkpoint

        if (found := latest_checkpoint(tr.output_dir)) is not None:
            raise ConfigError(f"train.output_dir={tr.output_dir} already holds a run (checkpoint {found.name}): "
                              "continue it with train.resume=latest, or start a new run in another "
                              "train.output_dir (a fresh run here would mix with its checkpoints)")
    if tr.resume not in (None, "latest") and not Path(tr.resume).is_dir():
        raise ConfigError(f"train.resume={tr.resume} is neither 'latest' nor a checkpoint folder")
    if tr.resume is not None:
        _check_state_resume(cfg, world_size, deepspeed)
    if tr.resume is not None and tr.resume_data == "exact":
        _check_data_resume(cfg, world_size)


def data_resume_changes(cfg: DictConfig, ckpt_dir: Path, world_size: int) -> tuple[dict[str, tuple], int]:
    """How this run's data layout differs from the one that wrote `ckpt_dir` (config key -> (saved, now); empty
    when an exact resume is possible), and the last data epoch the checkpoint's readers reached."""
    from data.stream import last_epoch, state_mismatch
    from train.checkpoint import read_data_states

    saved = read_data_states(ckpt_dir)
    if not saved:
        return {}, -1
    rank0 = next((s for s in saved if s.get("rank") == 0), saved[0])
    mismatch = state_mismatch(rank0, data_identity(cfg, world_size, rank=0))
    changes = {_LAYOUT_KEYS.get(k, k): v for k, v in mismatch.items() if k != "rank"}
    return changes, last_epoch(saved)


def data_identity(cfg: DictConfig, world_size: int, rank: int) -> dict[str, Any]:
    """This run's data-stream identity on `rank` (see data.stream.stream_identity)."""
    from data.config import to_data_config
    from data.stream import expand_shards, stream_identity

    return stream_identity(to_data_config(cfg.data), shards=expand_shards(cfg.data.shards),
                           batch_size=cfg.train.micro_batch_size, rank=rank, world_size=world_size,
                           seed=cfg.train.seed)


# data-stream identity keys -> the setting that changes them
_LAYOUT_KEYS = {"world_size": "processes", "num_workers": "data.num_workers (min 1)",
                "batch_size": "train.micro_batch_size", "seed": "train.seed", "num_shards": "shards in data.shards",
                "shard_names": "the shard files' names or order in data.shards",
                "shuffle_buffer": "data.shuffle_buffer", "shuffle_group_shards": "data.shuffle_group_shards",
                "resampled": "data.resampled", "kind": "data.kind", "version": "loader state version"}


def resume_state_changes(cfg: DictConfig, ckpt_dir: Path, world_size: int = 1,
                         deepspeed: bool | None = None) -> list[str]:
    """What keeps this run from loading the training state of `ckpt_dir` (empty when it can): another student
    architecture (this run's student U-Net config against the checkpoint's student/config.json), another optimizer
    (its state has another layout), EMA turned on or off (Accelerate restores a fixed list of objects), DeepSpeed
    on one side only (another file layout), or another number of DeepSpeed ranks (partitioned optimizer states,
    which no launch of another size can load). deepspeed: whether this launch uses DeepSpeed (None: not known,
    see `validate`)."""
    import json

    from distill.students import derive_student_config, resolve_spec
    from distill.teachers import teacher_unet_config
    from train.checkpoint import read_meta

    changes: list[str] = []
    saved_unet = ckpt_dir / "student" / "config.json"
    if saved_unet.is_file():
        s = cfg.student
        now = derive_student_config(teacher_unet_config(cfg.teacher),
                                    resolve_spec(s.name, s.layers_per_block, s.transformer_layers_per_block,
                                                 s.mid_block))
        was = json.loads(saved_unet.read_text())
        for key in sorted(set(now) & set(was)):
            a, b = json.loads(json.dumps(was[key])), json.loads(json.dumps(now[key]))  # tuples as lists
            if a != b:
                changes.append(f"student U-Net {key} {a} -> {b}")
    saved = read_meta(ckpt_dir).get("config") or {}
    for key in ("optimizer", "ema"):
        was = (saved.get("train") or {}).get(key)
        if was is not None and was != cfg.train[key]:
            changes.append(f"train.{key} {json.dumps(was)} -> {json.dumps(cfg.train[key])}")
    saved_deepspeed = (ckpt_dir / "pytorch_model").is_dir()  # Accelerate's folder for the DeepSpeed engine
    if deepspeed is not None and saved_deepspeed != deepspeed:
        changes.append(f"written {'with' if saved_deepspeed else 'without'} DeepSpeed, launched "
                       f"{'with' if deepspeed else 'without'} it")
    saved_world = read_meta(ckpt_dir).get("world_size")
    if saved_deepspeed and deepspeed is not False and saved_world not in (None, world_size):
        changes.append(f"DeepSpeed ranks {saved_world} -> {world_size} (each holds its part of the optimizer state)")
    return changes


def _check_state_resume(cfg: DictConfig, world_size: int, deepspeed: bool | None) -> None:
    from train.checkpoint import checkpoint_problem, damaged_refusal, resolve_resume

    try:
        ckpt_dir = resolve_resume(cfg.train.resume, cfg.train.output_dir)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    if ckpt_dir is None:
        return
    if problem := checkpoint_problem(ckpt_dir):
        raise ConfigError(damaged_refusal(ckpt_dir, problem))
    changes = resume_state_changes(cfg, ckpt_dir, world_size, deepspeed)
    if changes:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise ConfigError(
            f"train.resume: {ckpt_dir.name} holds the training state of another setup ({shown}); a resume "
            "restores the student and its optimizer as they were. Resume with the checkpoint's settings and "
            "launcher (its meta.json holds its config), or start a new run in another train.output_dir"
        )


def _check_data_resume(cfg: DictConfig, world_size: int) -> None:
    from train.checkpoint import resolve_resume

    try:
        ckpt_dir = resolve_resume(cfg.train.resume, cfg.train.output_dir)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    if ckpt_dir is None:
        return
    changes, epoch = data_resume_changes(cfg, ckpt_dir, world_size)
    if changes:
        raise ConfigError(data_resume_refusal(ckpt_dir, changes, epoch))


def describe_changes(changes: dict[str, tuple]) -> str:
    """`key saved -> now, ...` for data_resume_changes' result."""
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())


def data_resume_refusal(ckpt_dir: Path, changes: dict[str, tuple], epoch: int) -> str:
    """The one line that refuses an exact resume across a data-layout change."""
    what = describe_changes(changes)
    return (f"train.resume: {ckpt_dir.name} was written with another data layout ({what}); an exact resume needs "
            f"the same one. Set train.resume_data=next_epoch to continue from data epoch {epoch + 1} (the rest of "
            f"epoch {epoch} is not seen)")


def grad_accum_steps(cfg: DictConfig, world_size: int) -> int:
    """Micro-batches accumulated per optimizer step so that the global batch holds for any process count; a
    ConfigError when the global batch does not divide into processes x micro-batches."""
    tr = cfg.train
    if tr.micro_batch_size < 1 or tr.global_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size={tr.micro_batch_size} and train.global_batch_size="
                          f"{tr.global_batch_size}: both are images and must be at least 1")
    if tr.global_batch_size % (world_size * tr.micro_batch_size):
        raise ConfigError(
            f"train.global_batch_size={tr.global_batch_size} is not divisible by processes x micro_batch_size "
            f"= {world_size} x {tr.micro_batch_size}"
        )
    return tr.global_batch_size // (world_size * tr.micro_batch_size)


def _check_data(cfg: DictConfig, world_size: int) -> None:
    """The data stream's own checks, and enough shards for every reader in non-resampled mode."""
    from data.config import to_data_config, validate_config
    from data.stream import expand_shards

    try:
        validate_config(to_data_config(cfg.data))
    except ValueError as exc:  # its messages name the data.* key
        raise ConfigError(str(exc).splitlines()[0]) from exc
    if cfg.data.kind == "latents":
        _check_latent_settings(cfg)
    try:
        shards = expand_shards(cfg.data.shards)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"data.shards={cfg.data.shards}: {str(exc).splitlines()[0]}") from exc
    readers = world_size * max(1, cfg.data.num_workers)
    if not cfg.data.resampled and len(shards) < readers:
        raise ConfigError(
            f"data.shards has {len(shards)} shards for {world_size} processes x {max(1, cfg.data.num_workers)} "
            f"workers = {readers} readers: set data.resampled=true, lower data.num_workers, or re-shard"
        )
    from data.decode import PROBE_SHARDS, shard_kind

    found = shard_kind(shards)
    if found and found[0] is None:
        more = f", nor do the next local shards (up to {PROBE_SHARDS} read)" if len(shards) > 1 else ""
        raise ConfigError(f"data.shards={cfg.data.shards}: {found[1]} holds no image or latent sample in its first "
                          f"16{more} (not a webdataset tar of images with captions, or of make latents' output)")
    if found and found[0] != cfg.data.kind:
        held = "images (raw shards)" if found[0] == "raw" else "precomputed latents (make latents)"
        raise ConfigError(f"data.shards={cfg.data.shards} holds {held}, e.g. sample {found[1]}, but "
                          f"data.kind={cfg.data.kind}: set data.kind={found[0]}")
    if cfg.data.kind == "latents":
        _check_latents(cfg, shards)
        from distill.teachers import zeros_for_empty_prompt

        if cfg.distill.caption_dropout > 0 and not zeros_for_empty_prompt(cfg.teacher.path):
            from data.latents import empty_prompt_path

            path = empty_prompt_path(cfg.data.shards)
            if not path.is_file():
                raise ConfigError(f"distill.caption_dropout={cfg.distill.caption_dropout} needs the empty caption's "
                                  f"embeddings in {path} (make latents writes them beside the shards), or set "
                                  "distill.caption_dropout=0")
            if problem := _empty_prompt_problem(path):
                raise ConfigError(f"distill.caption_dropout={cfg.distill.caption_dropout}: {path} is damaged "
                                  f"({problem}); run make latents again to rewrite it, or set "
                                  "distill.caption_dropout=0")


# Raw-stream settings that latent shards fixed when `make latents` made them (which samples, crops and captions)
_FIXED_BY_LATENTS = ("score_filters", "min_side", "min_aspect", "max_aspect", "max_pixels", "random_crop",
                     "random_flip", "caption_fields", "syncap", "alt_text_fields")


def _check_latent_settings(cfg: DictConfig) -> None:
    """ConfigError naming a data.* setting the latent stream would ignore (a filter, the crop or flip, the caption
    choice) while it differs from its default: the run would train on what the filter was meant to drop."""
    from data.config import DataConfig

    defaults = DataConfig()
    for key in _FIXED_BY_LATENTS:
        value = cfg.data[key]
        value = list(value) if OmegaConf.is_list(value) else value
        if value != getattr(defaults, key):
            raise ConfigError(
                f"data.{key}={value} has no effect with data.kind=latents: make latents fixed the samples, crops and "
                "captions; filter the raw shards (make data) and caption them (make latents --syncap) before, or "
                f"leave data.{key} unset")


def _empty_prompt_problem(path: Path) -> str | None:
    """None when `path` holds the empty caption's embeddings as make latents writes them (prompt_embeds
    [77, D], pooled_prompt_embeds [P]), else what is wrong."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as arrays:
            shapes = {k: arrays[k].shape for k in ("prompt_embeds", "pooled_prompt_embeds") if k in arrays}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        return f"not an .npz of arrays: {type(exc).__name__}"
    if len(shapes.get("prompt_embeds", ())) != 2 or len(shapes.get("pooled_prompt_embeds", ())) != 1:
        return f"prompt_embeds [77, D] and pooled_prompt_embeds [P] expected, found {shapes}"
    return None


def _check_latents(cfg: DictConfig, urls: list[str]) -> None:
    """Latent shards must fit the teacher: the first readable sample's latent channels, prompt-embedding and
    pooled widths against the teacher U-Net's config, and its crop size against teacher.resolution (within 10%,
    which admits SDXL's aspect buckets). Shards that are not local files (pipe:, URLs) are not opened."""
    from data.decode import first_latent_example
    from train.bench import latent_shape

    example = first_latent_example(urls)
    if example is None:
        return
    want = latent_shape(cfg)
    t = cfg.teacher
    found = {"latent channels": (example.latents.shape[0], want["latents"][0], "in_channels"),
             "prompt embeddings": (example.prompt_embeds.shape[-1], want["text_dim"], "cross_attention_dim"),
             "pooled embeddings": (example.pooled_prompt_embeds.shape[-1], want["pooled_dim"],
                                   "its pooled text width")}
    wrong = [f"{what} {got} wide where it takes {need} ({key})" for what, (got, need, key) in found.items()
             if got != need]
    if wrong:
        raise ConfigError(
            f"data.shards={cfg.data.shards}: these latents (sample {example.key}) do not fit the {t.name} "
            f"teacher's U-Net: {'; '.join(wrong)}. They were made with another pipeline: make them with the "
            "teacher's (make latents PIPELINE=<teacher.path>)"
        )
    height, width = example.target_size
    side = (height * width) ** 0.5
    if not 0.9 <= side / t.resolution <= 1.1:
        raise ConfigError(
            f"data.shards={cfg.data.shards}: these latents were made at {height}x{width} px (sample "
            f"{example.key}) but teacher.resolution={t.resolution}: make them at {t.resolution} px (make latents "
            f"ARGS='--resolution {t.resolution}'), or set teacher.resolution={round(side)}"
        )


def _absent(path: str) -> str:
    """How a path that should be a folder is not one: 'is a file, not a folder' or 'does not exist'."""
    return "is a file, not a folder" if Path(path).exists() else "does not exist"


def vae_folder_problem(folder: str | Path) -> str | None:
    """None when `folder`'s config.json is an AutoencoderKL's (or cannot be read: the loader then says why), else
    one line: a U-Net or text-encoder folder given as the VAE failed inside diffusers with a traceback."""
    import json

    try:
        name = json.loads((Path(folder) / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    if name is not None and name != "AutoencoderKL":
        return f"holds a {name}, not a VAE (AutoencoderKL): give a VAE folder, e.g. <sdxl pipeline>/vae"
    return None


def _check_output_dir(output_dir: str) -> None:
    """train.output_dir must be a folder this process can create or write in (nothing is created here)."""
    import os

    if not str(output_dir).strip():
        raise ConfigError("train.output_dir is empty: name the run's folder (checkpoints, logs and the export go "
                          "there), e.g. train.output_dir=runs/my_run")
    path = Path(output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"train.output_dir={output_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"train.output_dir={output_dir} {what} by this user; choose another folder")


def _check_pipeline_folder(cfg: DictConfig) -> None:
    """teacher.path must hold what this run loads from it: the U-Net (its config only when teacher.unet_file gives
    the weights) and scheduler always; the VAE and text encoders for raw images, previews or the export."""
    from distill.teachers import pipeline_folder_problem

    t, tr = cfg.teacher, cfg.train
    decodes = cfg.data.kind == "raw" or tr.sample_every > 0 or tr.sample_at_end or tr.export
    problem = pipeline_folder_problem(t.path, unet_weights=not t.unet_file, vae=decodes and not t.vae_path,
                                      text=decodes, index=tr.export)
    if problem:
        raise ConfigError(f"teacher.path={t.path} {problem}")
    if t.name != "tiny":  # SDXL-Base, -Turbo and -Lightning share SDXL's U-Net layout; a KOALA export does not
        from distill.students import sdxl_base_unet_config
        from distill.teachers import teacher_unet_config

        found, sdxl = teacher_unet_config(t), sdxl_base_unet_config()
        keys = ("block_out_channels", "layers_per_block", "transformer_layers_per_block", "cross_attention_dim")
        differ = [f"{k} {found.get(k)} (SDXL: {sdxl[k]})" for k in keys if found.get(k) != sdxl[k]]
        if differ:
            raise ConfigError(f"teacher.path={t.path}: its U-Net is not SDXL's ({'; '.join(differ)}): a "
                              f"{t.name} teacher is an SDXL-family pipeline, not a student export or another model")


def _check_unet_file(t: DictConfig) -> None:
    """teacher.unet_file must hold exactly the teacher U-Net's tensors at its shapes: read from the file's header
    only, against the U-Net built from the teacher's config on the meta device (no weights are loaded)."""
    from distill.teachers import TeacherError, teacher_unet_config, unet_file_mismatch

    try:
        problem = unet_file_mismatch(t.unet_file, teacher_unet_config(t))
    except TeacherError as exc:
        raise ConfigError(str(exc)) from exc
    if problem:
        raise ConfigError(f"teacher.unet_file={t.unet_file} is not a U-Net for this teacher: {problem}. Give the "
                          "full U-Net file (e.g. sdxl_lightning_4step_unet.safetensors, not a LoRA) or a whole "
                          "single-file SDXL checkpoint")


def _check_student(cfg: DictConfig) -> None:
    from distill.features import stage_names
    from distill.students import StudentSpecError, derive_student_config, resolve_spec
    from distill.teachers import teacher_unet_config

    s = cfg.student
    try:
        spec = resolve_spec(s.name, s.layers_per_block, s.transformer_layers_per_block, s.mid_block)
        student = derive_student_config(teacher_unet_config(cfg.teacher), spec)
    except StudentSpecError as exc:
        raise ConfigError(str(exc)) from exc
    stages = stage_names(student)
    for key, names in (("train.checkpointing_blocks", cfg.train.checkpointing_blocks),
                       ("distill.lf_stages", cfg.distill.lf_stages)):
        for stage in names:
            if stage not in stages:
                hint = (f"; name only those, e.g. distill.lf_stages=[{','.join(x for x in names if x in stages)}]"
                        if key == "distill.lf_stages" else "")
                raise ConfigError(f"{key}: this student has no stage {stage!r} (it has {', '.join(stages)}){hint}")
