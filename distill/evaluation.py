"""Evaluate a student on a prompt set: images, throughput, alignment scores and, on request, agreement with
its teacher on the same prompts and seeds. Writes report.json, report.md and image grids.

Agreement metrics compare what the teacher and the student make from identical noise: latent MSE (U-Net latent
space, before the VAE), PSNR and SSIM of the decoded images in [0, 1]. They measure how faithfully the student
imitates its teacher, not image quality; CLIP score and HPSv2 (when their weights are on disk) measure quality.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from distill.metrics import ClipScorer, ImageTextScorer, latent_mse, psnr, ssim
from distill.sampling import (
    DTYPES,
    SAMPLER_DEFAULTS,
    TIMESTEP_SPACINGS,
    Generation,
    LoadedSource,
    SettingsError,
    SourceError,
    check_settings,
    clear_images,
    generate,
    image_grid,
    load_source,
    pick_device,
    read_prompts,
    resolve_settings,
    save_images,
    teacher_source_for,
)

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; capped so the report stays valid JSON
CLIP_HINT = ("set eval.clip_model=/path/to/clip (a local transformers CLIPModel folder with its "
             "processor, e.g. a save_pretrained copy of openai/clip-vit-large-patch14)")


@dataclass
class EvalConfig:
    """Settings of one evaluation (mirrors conf/eval/default.yaml; None = the student family's default)."""

    student: str = ""  # exported pipeline folder or checkpoint folder
    teacher: str | None = None  # None: student only; a pipeline folder; "auto": the checkpoint's meta teacher
    # with a teacher folder: a single-file U-Net replacing the folder's own (an SDXL-Lightning teacher); auto reads it
    # from the checkpoint
    teacher_unet_file: str | None = None
    prompts: str = "smoke"  # "smoke", "eval" (shipped sets) or a text file, one prompt per line
    max_prompts: int | None = None  # keep the first N prompts
    seed: int = 0  # image i uses seed + i, for the student and the teacher alike
    steps: int | None = None  # denoising steps
    guidance_scale: float | None = None  # CFG weight
    height: int | None = None  # px
    width: int | None = None  # px
    timestep_spacing: str | None = None  # "leading" / "trailing"; None keeps the source's scheduler
    teacher_steps: int | None = None  # the teacher's own steps (e.g. 4 for SDXL-Lightning); None: the student's
    teacher_guidance_scale: float | None = None  # the teacher's own CFG weight (0 for Turbo/Lightning); None: same
    family: str | None = None  # teacher family for the defaults (inferred when None)
    use_ema: bool = True  # sample a checkpoint's student_ema/ when present
    batch_size: int = 4  # images per pipeline call
    warmup_batches: int = 1  # untimed batches before throughput is measured
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    dtype: str = "fp32"  # fp32 / fp16 / bf16 (a force_upcast VAE still decodes in fp32)
    clip_model: str | None = None  # local CLIP folder for CLIP score
    hpsv2_checkpoint: str | None = None  # local HPSv2 .pt checkpoint (needs open_clip)
    out_dir: str = "outputs/eval"  # where images and reports go
    grid_max: int = 16  # prompts shown in the grids
    wandb: bool = False  # log to W&B (scripts/eval.py)
    wandb_project: str = "koala-distill"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes copied into the report

    def __post_init__(self) -> None:
        check_settings(steps=self.steps, guidance_scale=self.guidance_scale, height=self.height, width=self.width,
                       batch_size=self.batch_size)
        for name in ("teacher_steps", "teacher_guidance_scale"):
            value, low = getattr(self, name), 1 if name == "teacher_steps" else 0
            if value is not None and not math.isfinite(value):
                raise SettingsError(f"{name} must be a finite number, not {value}")
            if value is not None and value < low:
                raise SettingsError(f"{name} must be at least {low}, not {value}")
        if self.dtype not in DTYPES:
            raise SettingsError(f"dtype={self.dtype} is not one of {', '.join(DTYPES)}")
        if self.timestep_spacing not in (None, *TIMESTEP_SPACINGS):
            raise SettingsError(f"timestep_spacing={self.timestep_spacing} is not one of "
                                f"{', '.join(TIMESTEP_SPACINGS)}")
        if self.grid_max < 1:
            raise SettingsError(f"grid_max must be at least 1, not {self.grid_max}")
        if self.family is not None and self.family not in SAMPLER_DEFAULTS:  # said before any model loads
            raise SettingsError(f"family={self.family} is not one of {', '.join(SAMPLER_DEFAULTS)}")
        if self.teacher_unet_file and self.teacher in (None, "", "auto"):
            raise SettingsError(f"teacher_unet_file={self.teacher_unet_file} needs teacher=<pipeline folder> ("
                                "teacher=auto takes the checkpoint's own U-Net file)")


def _teacher_problem(folder: Path, unet_file: str | None) -> str | None:
    """What keeps `folder` from being loaded as the teacher pipeline (None when nothing), from its files alone;
    with `unet_file` (SDXL-Lightning) the folder's own U-Net weights are not needed."""
    from distill.teachers import pipeline_folder_problem

    if not folder.is_dir():
        return f"{folder} is not a folder (a teacher pipeline folder, or auto for a checkpoint's own)"
    if unet_file is not None and not Path(unet_file).is_file():
        return f"its U-Net file {unet_file} does not exist (teacher_unet_file, or the checkpoint's teacher.unet_file)"
    problem = pipeline_folder_problem(folder, unet_weights=unet_file is None)
    return f"{folder} {problem}" if problem else None


def clip_folder_problem(path: str | None) -> str | None:
    """None when `path` looks like a loadable CLIP folder, else the one-line note saying why CLIP score is skipped.

    Read from the folder's files alone (no weights), so that run_eval can say it before sampling for minutes."""
    if not path:
        return "CLIP score skipped: " + CLIP_HINT
    folder = Path(path)
    if not folder.is_dir():
        return f"CLIP score skipped: eval.clip_model={path} is not a folder; " + CLIP_HINT
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != "clip":
        return (f"CLIP score skipped: eval.clip_model={path} has no config.json of a CLIPModel (model_type "
                f"{model_type!r}); " + CLIP_HINT)
    if not _has_any(folder, "preprocessor_config.json", "processor_config.json") or not _has_any(
            folder, "tokenizer.json", "vocab.json"):
        return (f"CLIP score skipped: eval.clip_model={path} has no processor (preprocessor_config.json or "
                "processor_config.json, and a tokenizer); " + CLIP_HINT)
    return None


def _has_any(folder: Path, *names: str) -> bool:
    return any((folder / n).is_file() for n in names)


def build_clip_scorer(cfg: EvalConfig, device: torch.device) -> tuple[ClipScorer | None, str | None]:
    """The CLIP scorer when cfg.clip_model is a loadable CLIP folder, else (None, one line saying why not)."""
    problem = clip_folder_problem(cfg.clip_model)
    if problem:
        return None, problem
    try:
        return ClipScorer(cfg.clip_model, device=device), None
    except Exception as exc:  # missing or corrupt weights (safetensors raises its own type): keep the sampled images
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"CLIP score skipped: eval.clip_model={cfg.clip_model} did not load ({first}); " + CLIP_HINT


def _free(loaded: LoadedSource) -> None:
    device = loaded.pipe.device
    del loaded.pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else float("nan")


def _model_summary(loaded: LoadedSource, gen: Generation, scheduler_spacing: str | None) -> dict[str, Any]:
    return {
        "source": str(loaded.path), "kind": loaded.kind, "family": loaded.family, "unet": loaded.unet_folder,
        "step": loaded.step, "timestep_spacing": scheduler_spacing,
        "prediction_type": loaded.pipe.scheduler.config.get("prediction_type"), "images": len(gen.images),
        "seconds": gen.seconds, "images_per_s": gen.images_per_s,
    }


def pair_grid(teacher: Sequence[Image.Image], student: Sequence[Image.Image], max_rows: int) -> Image.Image:
    """Rows: prompts; columns: teacher, student."""
    pairs = [im for t, s in list(zip(teacher, student, strict=True))[:max_rows] for im in (t, s)]
    return image_grid(pairs, cols=2)


def run_eval(cfg: EvalConfig, scorers: Sequence[ImageTextScorer] = (), notes: Sequence[str] = ()) -> dict[str, Any]:
    """Run one evaluation; write <out_dir>/{report.json, report.md, student/, teacher/, grids}; return the report.

    scorers: extra image-text scorers (HPSv2 from scripts/eval.py); CLIP score is added here when
    cfg.clip_model is set. notes: lines about skipped metrics, copied into the report.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    prompts = read_prompts(cfg.prompts, cfg.max_prompts)
    notes = list(notes)
    clip_problem = clip_folder_problem(cfg.clip_model)
    if clip_problem and cfg.clip_model:  # said now, not after minutes of sampling
        logging.getLogger(__name__).warning(clip_problem)

    # a wrong teacher is said before the student loads, not after sampling (a missing student: load_source says so)
    teacher_src = teacher_source_for(cfg.student, cfg.teacher, cfg.teacher_unet_file) if Path(
        cfg.student).is_dir() else None
    if teacher_src is not None and (problem := _teacher_problem(*teacher_src)):
        raise SourceError(f"teacher={cfg.teacher}: {problem}")
    student = load_source(cfg.student, family=cfg.family, use_ema=cfg.use_ema, device=device, dtype=dtype)
    settings = resolve_settings(student.defaults, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                                height=cfg.height, width=cfg.width, timestep_spacing=cfg.timestep_spacing)
    gen_s = generate(student.pipe, prompts, settings, seed=cfg.seed, batch_size=cfg.batch_size,
                     warmup_batches=cfg.warmup_batches)
    spacing = student.pipe.scheduler.config.get("timestep_spacing")
    report: dict[str, Any] = {
        "config": asdict(cfg), "prompts": len(prompts), "settings": asdict(settings),
        "device": str(device), "dtype": cfg.dtype,
        "student": _model_summary(student, gen_s, spacing),
    }
    files = {"student": save_images(gen_s, out / "student", grid_max=cfg.grid_max)}
    if teacher_src is None:  # an earlier run's teacher images would sit beside this report as if they were its own
        clear_images(out / "teacher")
        (out / "grid_teacher_student.png").unlink(missing_ok=True)
    student_scheduler = dict(student.pipe.scheduler.config)
    # The teacher decodes with the student's VAE (a run's teacher.vae_path, e.g. the fp16-fix VAE, or an export's
    # own): with its folder's VAE, PSNR and SSIM would count the two VAEs' difference as the U-Nets'.
    shared_vae = student.pipe.vae if teacher_src is not None else None
    _free(student)

    gen_t = None
    if teacher_src is not None:
        teacher = load_source(teacher_src[0], family=student.family, device=device, dtype=dtype,
                              unet_file=teacher_src[1], vae=shared_vae)
        del shared_vae
        # The teacher runs with the student's sampler (schedule, spacing, and the prediction type both were trained
        # on), so differences come from the U-Nets alone; teacher_steps / teacher_guidance_scale change only the
        # step count and CFG weight (a few-step teacher at its native setting).
        teacher.pipe.scheduler = EulerDiscreteScheduler.from_config(student_scheduler)
        t_settings = resolve_settings(settings, timestep_spacing=spacing, steps=cfg.teacher_steps,
                                      guidance_scale=cfg.teacher_guidance_scale)
        gen_t = generate(teacher.pipe, prompts, t_settings, seed=cfg.seed, batch_size=cfg.batch_size,
                         warmup_batches=cfg.warmup_batches)
        report["teacher"] = _model_summary(teacher, gen_t, teacher.pipe.scheduler.config.get("timestep_spacing"))
        report["teacher"].update(steps=t_settings.steps, guidance_scale=t_settings.guidance_scale)
        if (t_settings.steps, t_settings.guidance_scale) != (settings.steps, settings.guidance_scale):
            notes.append(f"the teacher ran {t_settings.steps} step(s) at guidance {t_settings.guidance_scale}, the "
                         f"student {settings.steps} at {settings.guidance_scale}: agreement then compares samplers "
                         "as well as U-Nets")
        files["teacher"] = save_images(gen_t, out / "teacher", grid_max=cfg.grid_max)
        pair = out / "grid_teacher_student.png"
        pair_grid(gen_t.images, gen_s.images, cfg.grid_max).save(pair)
        files["grid_teacher_student"] = {"grid": str(pair)}
        _free(teacher)

    per_image: dict[str, torch.Tensor] = {}
    if gen_t is not None:
        per_image["latent_mse"] = latent_mse(gen_t.latents, gen_s.latents)
        per_image["psnr_db"] = psnr(gen_t.pixels, gen_s.pixels).clamp(max=PSNR_CAP_DB)
        per_image["ssim"] = ssim(gen_t.pixels, gen_s.pixels)
        report["agreement"] = {k: _mean(v) for k, v in per_image.items()}

    clip, note = build_clip_scorer(cfg, device)
    if note:
        notes.append(note)
    for scorer in ([clip] if clip else []) + list(scorers):
        per_image[f"{scorer.name}_student"] = scorer(gen_s.images, prompts)
        report["student"][scorer.name] = _mean(per_image[f"{scorer.name}_student"])
        if gen_t is not None:
            per_image[f"{scorer.name}_teacher"] = scorer(gen_t.images, prompts)
            report["teacher"][scorer.name] = _mean(per_image[f"{scorer.name}_teacher"])

    report["per_image"] = [
        {"index": i, "seed": gen_s.seeds[i], "prompt": p, **{k: float(v[i]) for k, v in per_image.items()}}
        for i, p in enumerate(prompts)
    ]
    report["notes"] = notes
    report["files"] = files
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report))
    return report


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown: a model table, an agreement table and the skipped-metric notes."""
    s = report["settings"]
    lines = [
        f"Prompts: {report['prompts']} ({report['config']['prompts']}), seed {report['config']['seed']}, "
        f"{s['steps']} steps, guidance {s['guidance_scale']}, {s['width']}x{s['height']} px, "
        f"{report['device']} {report['dtype']}.",
        "",
        "| model | source | spacing | images | img/s | CLIP score | HPSv2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for role in ("student", "teacher"):
        m = report.get(role)
        if m:
            src = f"{m['source']} ({m['kind']}, {m['unet']})"
            lines.append(f"| {role} | {src} | {m['timestep_spacing']} | {m['images']} | "
                         f"{_fmt(m['images_per_s'])} | {_fmt(m.get('clip_score'), 2)} | {_fmt(m.get('hpsv2'), 4)} |")
    if "agreement" in report:
        a = report["agreement"]
        lines += ["", "| teacher vs student (same seeds) | latent MSE | PSNR (dB) | SSIM |", "|---|---|---|---|",
                  f"| mean over {report['prompts']} images | {_fmt(a['latent_mse'], 4)} | {_fmt(a['psnr_db'], 2)} | "
                  f"{_fmt(a['ssim'], 4)} |"]
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"
