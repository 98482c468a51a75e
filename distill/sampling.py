"""Sampling from exported students, training checkpoints and teachers: fixed seeds, family sampler defaults.

A *source* is either
- a pipeline folder (`model_index.json`): a teacher, or a student exported as a complete SDXL pipeline; or
- a checkpoint folder: `student/` (and optionally `student_ema/`) in `UNet2DConditionModel.save_pretrained`
  layout plus `meta.json` with at least {"teacher_path", "teacher_name", "step"}. It is sampled by loading the
  teacher pipeline from teacher_path and swapping in the student U-Net (the EMA one when present).

Image i of a run always uses seed `seed + i`, so a teacher and a student given the same prompts and seed start
from the same noise and their images can be compared pixel by pixel.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from distill.teachers import DTYPES


@dataclass(frozen=True)
class SamplerDefaults:
    """How a teacher family's students are sampled by default (every field can be overridden).

    scheduler: diffusers scheduler ("euler" = EulerDiscreteScheduler).
    timestep_spacing: "leading" (SDXL-Base) or "trailing" (few-step, step-distilled families).
    steps: denoising steps. guidance_scale: classifier-free guidance weight (1.0 = no CFG).
    resolution: image side in pixels.
    """

    scheduler: str
    timestep_spacing: str
    steps: int
    guidance_scale: float
    resolution: int


# One row per teacher family; the trainer writes the same settings into an exported student's scheduler.
SAMPLER_DEFAULTS: dict[str, SamplerDefaults] = {
    # KOALA-1B/700M model card: 25 steps, guidance 5.0, SDXL-Base's Euler scheduler (leading spacing).
    "sdxl_base": SamplerDefaults("euler", "leading", 25, 5.0, 1024),
    # The KOALA-Turbo card's sampler is not recorded in ../shared/KOALA.md: Euler, trailing, 10 steps and
    # guidance 3.5 are assumed (the Lightning students' settings) at Turbo's 512 px.
    "sdxl_turbo": SamplerDefaults("euler", "trailing", 10, 3.5, 512),
    # KOALA-Lightning model card: Euler, trailing spacing, 10 steps, guidance 3.5.
    "sdxl_lightning": SamplerDefaults("euler", "trailing", 10, 3.5, 1024),
    # The tiny CPU teacher (distill/tiny.py): a few steps at 64 px are enough to exercise every code path.
    "tiny": SamplerDefaults("euler", "leading", 4, 3.5, 64),
}

# A teacher pipeline sampled as itself (a folder without an export's koala_sampler.json): its own few-step
# settings, not its students' (../shared/KOALA.md: Turbo 1 to 4 steps without CFG at 512 px; Lightning's 1, 2, 4 or
# 8-step U-Net files, Euler trailing, without CFG). Guidance 0 turns CFG off in diffusers (it needs > 1).
TEACHER_DEFAULTS: dict[str, SamplerDefaults] = {
    "sdxl_base": SAMPLER_DEFAULTS["sdxl_base"],
    "sdxl_turbo": SamplerDefaults("euler", "trailing", 4, 0.0, 512),
    "sdxl_lightning": SamplerDefaults("euler", "trailing", 4, 0.0, 1024),  # steps: the U-Net file's, when named
    "tiny": SAMPLER_DEFAULTS["tiny"],
}

CHECKPOINT_META = "meta.json"
EXPORT_SAMPLER_FILE = "koala_sampler.json"  # written by train/export.py next to model_index.json
TINY_MARKER = "tiny_build.json"  # written by distill/tiny.py
PROMPT_SETS = ("smoke", "eval")  # files distill/prompts/<name>.txt


class SourceError(ValueError):
    """A folder that is neither a pipeline folder nor a checkpoint folder, or an incomplete one."""


class SettingsError(ValueError):
    """Sampler settings a pipeline cannot run (one line naming the setting)."""


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # what diffusers' Euler scheduler accepts


def check_settings(*, steps: int | None = None, guidance_scale: float | None = None, height: int | None = None,
                   width: int | None = None, batch_size: int | None = None) -> None:
    """Raise SettingsError for settings SDXL pipelines cannot run: fewer than 1 step or image per batch, a negative
    guidance scale, or a side (px) that is not a positive multiple of 8. None means the family default."""
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("guidance_scale", guidance_scale, 0)):
        if value is not None and not math.isfinite(value):  # NaN passes `< low` and ended as NaN in the JSON
            raise SettingsError(f"{name} must be a finite number, not {value}")
        if value is not None and value < low:
            raise SettingsError(f"{name} must be at least {low}, not {value}")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value < 8 or value % 8):
            raise SettingsError(f"{name} must be a positive multiple of 8 px (SDXL pipelines need it), not {value}")


@dataclass
class SampleSettings:
    """Resolved sampler settings for one run (sizes in px)."""

    steps: int
    guidance_scale: float
    height: int
    width: int
    timestep_spacing: str | None  # None keeps the loaded scheduler's spacing
    negative_prompt: str | None = None


@dataclass
class LoadedSource:
    """A ready pipeline and where its defaults came from."""

    pipe: StableDiffusionXLPipeline
    kind: str  # "pipeline" (an export, or the tiny pipeline), "teacher" (any other pipeline folder) or "checkpoint"
    path: Path
    family: str  # a key of SAMPLER_DEFAULTS
    defaults: SampleSettings
    unet_folder: str  # which U-Net weights: "unet", "student" or "student_ema"
    step: int | None = None  # training step of a checkpoint
    teacher_path: Path | None = None  # the checkpoint's teacher pipeline folder


@dataclass
class Generation:
    """Images of one run in prompt order, with the final latents and timing.

    latents: (N, C, h, w) float32 on the CPU, in the U-Net's (scaled) latent space, before the VAE decode.
    pixels: (N, 3, H, W) float32 in [0, 1] on the CPU. seconds: wall time of the timed batches.
    """

    images: list[Image.Image]
    latents: torch.Tensor
    pixels: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    seconds: float
    timed_images: int

    @property
    def images_per_s(self) -> float:
        """Throughput of the timed batches, images per second (warm-up excluded)."""
        return self.timed_images / self.seconds if self.seconds > 0 else float("nan")


# --------------------------------------------------------------------------------------------------- sources


def is_checkpoint(path: str | Path) -> bool:
    """True for a training checkpoint folder (meta.json + student/)."""
    path = Path(path)
    return (path / CHECKPOINT_META).is_file() and (path / "student").is_dir()


def is_pipeline(path: str | Path) -> bool:
    """True for a diffusers pipeline folder."""
    return (Path(path) / "model_index.json").is_file()


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json, checked for the keys sampling needs."""
    try:
        meta = json.loads((Path(path) / CHECKPOINT_META).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}/{CHECKPOINT_META} is damaged: not JSON ({exc.__class__.__name__})") from exc
    if not isinstance(meta, dict):
        raise SourceError(f"{path}/{CHECKPOINT_META} is damaged: not a JSON object")
    missing = [k for k in ("teacher_path", "teacher_name") if not meta.get(k)]
    if missing:
        raise SourceError(f"{path}/{CHECKPOINT_META} lacks {missing}; it needs teacher_path and teacher_name")
    return meta


def checkpoint_teacher_unet_file(meta: dict[str, Any]) -> str | None:
    """A teacher U-Net file replacing teacher_path/unet (SDXL-Lightning), from meta.json if recorded."""
    if meta.get("teacher_unet_file"):
        return str(meta["teacher_unet_file"])
    teacher_cfg = (meta.get("config") or {}).get("teacher") or {}
    return teacher_cfg.get("unet_file") or None


def infer_family(folder: str | Path) -> str:
    """The teacher family of a pipeline folder, for its sampler defaults.

    In order: koala_sampler.json's "teacher" (exported students), the tiny builder's marker, else the scheduler's
    spacing and the U-Net's latent size (trailing + 64 -> sdxl_turbo, trailing -> sdxl_lightning, else sdxl_base).
    """
    folder = Path(folder)
    exported = folder / EXPORT_SAMPLER_FILE
    if exported.is_file():
        name = json.loads(exported.read_text()).get("teacher")
        if name in SAMPLER_DEFAULTS:
            return name
    if (folder / TINY_MARKER).is_file():
        return "tiny"
    sched = _read_json(folder / "scheduler" / "scheduler_config.json")
    unet = _read_json(folder / "unet" / "config.json")
    if sched.get("timestep_spacing") == "trailing":
        return "sdxl_turbo" if unet.get("sample_size") == 64 else "sdxl_lightning"
    return "sdxl_base"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def family_settings(family: str, folder: str | Path | None = None) -> SampleSettings:
    """Default settings of a family; an exported folder's koala_sampler.json takes precedence."""
    if family not in SAMPLER_DEFAULTS:
        raise SourceError(f"unknown teacher family {family!r}; one of {sorted(SAMPLER_DEFAULTS)}")
    d = SAMPLER_DEFAULTS[family]
    settings = SampleSettings(d.steps, d.guidance_scale, d.resolution, d.resolution, d.timestep_spacing)
    exported = _read_json(Path(folder) / EXPORT_SAMPLER_FILE) if folder else {}
    if exported:
        res = int(exported.get("resolution", d.resolution))
        settings = replace(
            settings,
            steps=int(exported.get("num_inference_steps", d.steps)),
            guidance_scale=float(exported.get("guidance_scale", d.guidance_scale)),
            height=res,
            width=res,
        )
    return settings


def teacher_settings(family: str, unet_file: str | Path | None = None) -> tuple[SampleSettings, str | None]:
    """A teacher's own sampler settings (TEACHER_DEFAULTS) and the prediction type its scheduler needs (None: the
    folder's). An SDXL-Lightning U-Net file named for its step count (sdxl_lightning_2step_unet.safetensors) sets
    the steps; the 1-step file predicts x0 ("sample")."""
    if family not in TEACHER_DEFAULTS:
        raise SourceError(f"unknown teacher family {family!r}; one of {sorted(TEACHER_DEFAULTS)}")
    d = TEACHER_DEFAULTS[family]
    steps, prediction_type = d.steps, None
    named = re.search(r"(\d+)[-_]?steps?", Path(unet_file).name) if unet_file else None
    if family == "sdxl_lightning" and named:
        steps = int(named.group(1))
        prediction_type = "sample" if steps == 1 else None
    return SampleSettings(steps, d.guidance_scale, d.resolution, d.resolution, d.timestep_spacing), prediction_type


def checkpoint_settings(meta: dict[str, Any]) -> SampleSettings | None:
    """The sampler settings a checkpoint's run recorded (its resolved config's teacher.sampler and resolution, as
    the run's export writes them to koala_sampler.json); None for a checkpoint without them."""
    teacher = (meta.get("config") or {}).get("teacher") or {}
    sampler, resolution = teacher.get("sampler") or {}, teacher.get("resolution")
    if not all(k in sampler for k in ("steps", "guidance_scale", "timestep_spacing")) or not resolution:
        return None
    return SampleSettings(int(sampler["steps"]), float(sampler["guidance_scale"]), int(resolution), int(resolution),
                          str(sampler["timestep_spacing"]))


def load_source(
    source: str | Path,
    *,
    family: str | None = None,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    unet_file: str | None = None,
    vae: Any = None,
) -> LoadedSource:
    """Load a pipeline folder or a checkpoint folder as a ready `StableDiffusionXLPipeline`.

    family: teacher family for the defaults (inferred when None). use_ema: prefer student_ema/ in a checkpoint.
    unet_file: a safetensors U-Net state dict replacing the pipeline's U-Net (SDXL-Lightning teachers).
    vae: an AutoencoderKL to decode with instead of the source's own (eval gives the teacher the student's).
    For a pipeline folder the folder's own scheduler is kept (an exported student's carries its spacing); for a
    checkpoint the teacher's scheduler gets the family's spacing. A float16 VAE with force_upcast is decoded
    in float32 by the pipeline.
    """
    from safetensors import SafetensorError

    from distill.files import error_summary

    try:
        return _load_source(Path(source), family, use_ema, device, dtype, unet_file, vae)
    except (OSError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        # damage that the file checks below do not show (they read names, sizes and headers)
        raise SourceError(f"{source} cannot be loaded: {error_summary(exc)}") from exc


def _load_source(path: Path, family: str | None, use_ema: bool, device: str | torch.device, dtype: torch.dtype,
                 unet_file: str | None, vae: Any = None) -> LoadedSource:
    from distill.files import weights_problem
    from distill.teachers import pipeline_folder_problem

    if is_checkpoint(path):
        meta = read_checkpoint_meta(path)
        teacher_path = Path(meta["teacher_path"])
        run_settings = None if family else checkpoint_settings(meta)  # an explicit family asks for its defaults
        family = family or meta["teacher_name"]
        unet_folder = "student_ema" if use_ema and (path / "student_ema").is_dir() else "student"
        if damage := weights_problem(path / unet_folder):
            raise SourceError(f"{path} has a damaged weight file: {unet_folder}/{damage}")
        if not teacher_path.is_dir():
            raise SourceError(f"the teacher folder {teacher_path} named in {path}/{CHECKPOINT_META} is not there "
                              "(its text encoders, VAE and scheduler complete the student's pipeline)")
        if problem := pipeline_folder_problem(teacher_path, unet=False, index=False):  # the student is the U-Net
            raise SourceError(f"the teacher folder {teacher_path} named in {path}/{CHECKPOINT_META} {problem}")
        student = UNet2DConditionModel.from_pretrained(path / unet_folder, dtype=dtype)
        parts: dict[str, Any] = {"unet": student}
        vae_path = ((meta.get("config") or {}).get("teacher") or {}).get("vae_path")
        if vae is not None:
            parts["vae"] = vae
        elif vae_path and (Path(vae_path) / "config.json").is_file():  # the VAE the run's previews and export use
            from diffusers import AutoencoderKL

            parts["vae"] = AutoencoderKL.from_pretrained(vae_path, dtype=dtype)
        elif vae_path:
            import logging

            logging.getLogger(__name__).warning("the run's teacher.vae_path %s is not here: the teacher folder's "
                                                "VAE decodes instead", vae_path)
        pipe = StableDiffusionXLPipeline.from_pretrained(teacher_path, dtype=dtype, **parts)
        defaults = run_settings or family_settings(family)
        # the student predicts what its teacher predicts (teacher.prediction_type of the run, e.g. x0 for the
        # 1-step Lightning U-Net), whatever the teacher folder's scheduler says
        trained = ((meta.get("config") or {}).get("teacher") or {}).get("prediction_type")
        pipe.scheduler = _euler(pipe.scheduler.config, defaults.timestep_spacing, trained)
        loaded = LoadedSource(pipe, "checkpoint", path, family, defaults, unet_folder,
                              step=meta.get("step"), teacher_path=teacher_path)
    elif is_pipeline(path):
        if problem := pipeline_folder_problem(path):
            raise SourceError(f"{path} {problem}")
        pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype, **({"vae": vae} if vae is not None else {}))
        if (path / EXPORT_SAMPLER_FILE).is_file() or (path / TINY_MARKER).is_file():
            family = family or infer_family(path)
            defaults = replace(family_settings(family, path), timestep_spacing=None)  # the folder's scheduler
            kind = "pipeline"
        else:  # a teacher: its own sampler (a U-Net file replacing the folder's is SDXL-Lightning's)
            family = family or ("sdxl_lightning" if unet_file else infer_family(path))
            defaults, prediction_type = teacher_settings(family, unet_file)
            if prediction_type:
                pipe.scheduler = _euler(pipe.scheduler.config, defaults.timestep_spacing, prediction_type)
            kind = "teacher"
        loaded = LoadedSource(pipe, kind, path, family, defaults, "unet")
    elif not path.exists():
        raise SourceError(f"{path} does not exist (give an exported pipeline folder or a checkpoint folder)")
    elif (path / "checkpoints").is_dir() or (path / "export").is_dir():
        raise SourceError(f"{path} is a run folder: give its export ({path / 'export'}) or one of its checkpoints "
                          f"({path / 'checkpoints'}/step_N)")
    else:
        raise SourceError(
            f"{path} is neither a pipeline folder (model_index.json) nor a checkpoint folder (meta.json + student/)"
        )
    if unet_file:
        load_unet_file(pipe.unet, unet_file)
        loaded.unet_folder = str(unet_file)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return loaded


def load_unet_file(unet: UNet2DConditionModel, unet_file: str | Path) -> None:
    """Replace a U-Net's weights with a safetensors U-Net file: a diffusers state dict or a whole single-file SDXL
    checkpoint (every tensor must fit)."""
    from distill.teachers import TeacherError, read_unet_file, unet_file_mismatch

    config = dict(unet.config)
    try:
        problem = unet_file_mismatch(unet_file, config)
    except TeacherError as exc:
        raise SourceError(str(exc)) from exc
    if problem:
        raise SourceError(f"{unet_file} does not fit this U-Net: {problem}")
    unet.load_state_dict(read_unet_file(unet_file, config, unet.device), strict=True)


def teacher_source_for(student: str | Path, teacher: str | Path | None,
                       unet_file: str | None = None) -> tuple[Path, str | None] | None:
    """Where the teacher of the student at `student` (a checkpoint or pipeline folder) comes from: an explicit folder
    (with `unet_file`, a single-file U-Net that replaces the folder's own, as for SDXL-Lightning), or "auto" = the
    checkpoint's meta.json (folder and file). Read from files alone, before any model loads.

    Returns (pipeline folder, optional U-Net file) or None when no teacher was requested.
    """
    if teacher is None or teacher == "":
        return None
    if str(teacher) != "auto":
        return Path(teacher), unet_file or None
    if not is_checkpoint(student):
        raise SourceError("teacher=auto needs a checkpoint student (its meta.json names the teacher)")
    meta = read_checkpoint_meta(student)
    return Path(meta["teacher_path"]), checkpoint_teacher_unet_file(meta)


def _euler(config: Any, spacing: str | None, prediction_type: str | None = None) -> EulerDiscreteScheduler:
    overrides = {"timestep_spacing": spacing} if spacing else {}
    if prediction_type:
        overrides["prediction_type"] = prediction_type
    return EulerDiscreteScheduler.from_config(config, **overrides)


def resolve_settings(
    defaults: SampleSettings,
    *,
    steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    timestep_spacing: str | None = None,
    negative_prompt: str | None = None,
) -> SampleSettings:
    """The defaults with every given (non-None) override applied."""
    given = dict(steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                 timestep_spacing=timestep_spacing, negative_prompt=negative_prompt)
    return replace(defaults, **{k: v for k, v in given.items() if v is not None})


# ------------------------------------------------------------------------------------------------- prompts


def read_prompts(name_or_path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts from a shipped set ("smoke", "eval") or a text file: one per line, '#' lines and blanks skipped; the
    first `limit` (at least 1) when given."""
    if limit is not None and limit < 1:
        raise SettingsError(f"max_prompts must be at least 1, not {limit} (leave it unset for all)")
    if str(name_or_path) in PROMPT_SETS:
        text = resources.files("distill").joinpath(f"prompts/{name_or_path}.txt").read_text()
    else:
        try:
            text = Path(name_or_path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise SettingsError(f"prompts {name_or_path!s}: neither a shipped set ({', '.join(PROMPT_SETS)}) nor a "
                                f"readable text file ({reason})") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise SettingsError(f"prompts {name_or_path!s} holds no prompt (only blank and '#' lines)")
    return prompts[:limit] if limit else prompts


# ---------------------------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(
    pipe: StableDiffusionXLPipeline,
    prompts: Sequence[str],
    settings: SampleSettings,
    *,
    seed: int = 0,
    batch_size: int = 1,
    warmup_batches: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Generation:
    """Generate one image per prompt; image i uses a CPU generator seeded with `seed + i`.

    The scheduler's spacing is switched when settings.timestep_spacing is set. warmup_batches untimed
    batches (of the first prompts) run first so that throughput excludes one-off costs. progress(done, total)
    is called after each batch.
    """
    if settings.timestep_spacing and pipe.scheduler.config.get("timestep_spacing") != settings.timestep_spacing:
        pipe.scheduler = _euler(pipe.scheduler.config, settings.timestep_spacing)
    prompts = list(prompts)
    seeds = [seed + i for i in range(len(prompts))]
    device = pipe._execution_device
    for _ in range(warmup_batches):
        _run_batch(pipe, prompts[:batch_size], seeds[:batch_size], settings)
    images, latents, pixels = [], [], []
    seconds = 0.0
    for start in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
        _sync(device)
        t0 = time.perf_counter()
        lat, pix = _run_batch(pipe, chunk, chunk_seeds, settings)
        _sync(device)
        seconds += time.perf_counter() - t0
        latents.append(lat.float().cpu())
        pixels.append(pix.float().cpu())
        images += to_pil(pixels[-1])
        if progress:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    return Generation(images, torch.cat(latents), torch.cat(pixels), prompts, seeds, seconds, len(prompts))


def _run_batch(
    pipe: StableDiffusionXLPipeline, prompts: list[str], seeds: list[int], s: SampleSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    final: dict[str, torch.Tensor] = {}

    def keep_latents(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        final["latents"] = kwargs["latents"]  # after the last step: what the VAE decodes (scaled space)
        return kwargs

    out = pipe(
        prompt=prompts,
        negative_prompt=[s.negative_prompt] * len(prompts) if s.negative_prompt else None,
        num_inference_steps=s.steps,
        guidance_scale=s.guidance_scale,
        height=s.height,
        width=s.width,
        generator=[torch.Generator("cpu").manual_seed(x) for x in seeds],
        output_type="pt",
        callback_on_step_end=keep_latents,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    return final["latents"], out.images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) floats in [0, 1] -> RGB PIL images."""
    arr = (pixels.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def image_grid(images: Sequence[Image.Image], cols: int, pad: int = 2) -> Image.Image:
    """Equally sized images pasted row by row on a white canvas, `pad` px apart."""
    w, h = images[0].size
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid


def clear_images(folder: str | Path) -> None:
    """Remove an earlier save_images run from `folder`: the images its prompts.json lists, its grid.png and the
    prompts.json itself, then the folder when that leaves it empty. Nothing else is touched (a folder without
    prompts.json holds no earlier run). A rerun with fewer prompts, or without a teacher, then leaves no image of the
    earlier run beside the new ones."""
    folder = Path(folder)
    listing = folder / "prompts.json"
    try:
        records = json.loads(listing.read_text())
    except (OSError, ValueError):
        return
    names = [r.get("file") for r in records if isinstance(r, dict)] if isinstance(records, list) else []
    for name in names:
        if isinstance(name, str) and re.fullmatch(r"\d{4,}\.png", name):  # never a path out of the folder
            (folder / name).unlink(missing_ok=True)
    (folder / "grid.png").unlink(missing_ok=True)
    listing.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def save_images(generation: Generation, folder: str | Path, grid_cols: int = 4, grid_max: int = 64) -> dict:
    """Write <folder>/<i>.png per image, grid.png (the first grid_max images) and prompts.json, replacing the images
    of an earlier run there; return the paths."""
    folder = Path(folder)
    clear_images(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(generation.images):
        paths.append(folder / f"{i:04d}.png")
        img.save(paths[-1])
    grid = folder / "grid.png"
    image_grid(generation.images[:grid_max], grid_cols).save(grid)
    records = [{"index": i, "seed": s, "prompt": p, "file": f.name}
               for i, (s, p, f) in enumerate(zip(generation.seeds, generation.prompts, paths, strict=True))]
    (folder / "prompts.json").write_text(json.dumps(records, indent=2))
    return {"images": [str(p) for p in paths], "grid": str(grid)}


def pick_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu. A device this machine lacks (cuda without CUDA, cuda:3 with two
    GPUs, a misspelt name) is a SettingsError naming it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError as exc:
        raise SettingsError(f"device={device!r} is not a device name (auto, cpu, cuda, cuda:N)") from exc
    if picked.type == "cuda" and (not torch.cuda.is_available() or (picked.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA"
        raise SettingsError(f"device={device!r}: this machine has {found} (use device=auto or cpu)")
    return picked


def sample(
    source: str | Path,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    timestep_spacing: str | None = None,
    negative_prompt: str | None = None,
    family: str | None = None,
    use_ema: bool = True,
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "fp32",
    grid_cols: int = 4,
    unet_file: str | None = None,
) -> dict[str, Any]:
    """Load a source, generate one image per prompt with fixed seeds, write images and a grid; return a summary.

    Unset settings take the source's defaults: an exported folder's koala_sampler.json, a checkpoint's run, a
    teacher folder's own (TEACHER_DEFAULTS), else the family's (SAMPLER_DEFAULTS). unet_file: a U-Net file replacing
    the folder's (an SDXL-Lightning teacher). The summary (JSON-ready) holds the resolved settings, paths and images/s.
    """
    dev = pick_device(device)
    loaded = load_source(source, family=family, use_ema=use_ema, device=dev, dtype=DTYPES[dtype], unet_file=unet_file)
    settings = resolve_settings(loaded.defaults, steps=steps, guidance_scale=guidance_scale, height=height,
                                width=width, timestep_spacing=timestep_spacing, negative_prompt=negative_prompt)
    gen = generate(loaded.pipe, prompts, settings, seed=seed, batch_size=batch_size)
    files = save_images(gen, out_dir, grid_cols=grid_cols)
    summary = {
        "source": str(loaded.path), "kind": loaded.kind, "family": loaded.family, "unet": loaded.unet_folder,
        "step": loaded.step, "seed": seed, "settings": asdict(settings),
        "scheduler_spacing": loaded.pipe.scheduler.config.get("timestep_spacing"),
        "prediction_type": loaded.pipe.scheduler.config.get("prediction_type"),
        "images": len(gen.images), "images_per_s": gen.images_per_s, "grid": files["grid"], "out": str(out_dir),
        "device": str(dev), "dtype": dtype,
    }
    (Path(out_dir) / "sample.json").write_text(json.dumps(summary, indent=2))
    return summary
