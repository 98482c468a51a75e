"""Export a trained student as a complete SDXL pipeline folder.

The folder holds the teacher's text encoders, tokenizers and VAE (copied byte for byte), the student U-Net
(`save_pretrained`) and an EulerDiscreteScheduler set for the teacher family, so that
`StableDiffusionXLPipeline.from_pretrained(folder)` loads it and the KOALA model card's code runs unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from distill.files import out_folder_problem, swap_into_place, weights_problem, widen_to_umask
from distill.teachers import export_scheduler, pipeline_folder_problem

_COPIED = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def export_pipeline(teacher_path: Path, tcfg: Any, student: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write the pipeline folder atomically (temporary folder, then rename) and return its path. A write that fails
    removes the temporary folder and leaves an earlier export untouched. An earlier export is renamed aside before
    the new one takes its name and deleted after, so a kill at any point leaves one whole export on disk."""
    out = Path(out_dir)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed export's
    if out.exists():  # a killed export's `old` goes too; killed between the renames, `old` is the whole one: kept
        shutil.rmtree(old, ignore_errors=True)
    try:
        _write(teacher_path, tcfg, student, tmp)
        widen_to_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_into_place(tmp, out, old)
    return out


def _write(teacher_path: Path, tcfg: Any, student: torch.nn.Module, tmp: Path) -> None:
    scheduler = export_scheduler(tcfg, teacher_path)  # before the copies: a setting it refuses costs no GB copied
    tmp.mkdir(parents=True)
    for sub in _COPIED:
        shutil.copytree(teacher_path / sub, tmp / sub)
    shutil.copytree(Path(tcfg.vae_path) if tcfg.vae_path else teacher_path / "vae", tmp / "vae")
    student.save_pretrained(tmp / "unet")
    scheduler.save_pretrained(tmp / "scheduler")
    index = json.loads((teacher_path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    s = tcfg.sampler
    (tmp / "koala_sampler.json").write_text(json.dumps({
        "teacher": tcfg.name, "num_inference_steps": s.steps, "guidance_scale": s.guidance_scale,
        "timestep_spacing": s.timestep_spacing, "resolution": tcfg.resolution,
    }, indent=2))


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked, in one line that says what to give instead."""


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, *, weights: str = "auto",
                      teacher_path: str | Path | None = None, dtype: str = "fp32",
                      vae_path: str | Path | None = None) -> dict[str, Any]:
    """Export a training checkpoint's student as a pipeline folder, as the trainer exports at the end of a run.

    weights: "auto" (the EMA average when the checkpoint has one, as the trainer's own export), "ema" or "live".
    teacher_path: the teacher pipeline folder whose text encoders, tokenizers and VAE are copied (default: the one
    meta.json records; give it when the run was made on another machine). The teacher's config (family, sampler
    settings, VAE override) comes from the checkpoint's resolved config, or from conf/teacher/<name>.yaml for a
    checkpoint without one. dtype: fp32 (the checkpoint's own), fp16 or bf16 for half the disk. vae_path: the VAE
    folder to copy instead of the run's teacher.vae_path (e.g. on another machine).
    Returns {"export_dir", "checkpoint", "step", "weights", "dtype", "teacher", "unet_params"}.
    """
    from omegaconf import OmegaConf
    from safetensors import SafetensorError

    from distill.files import error_summary
    from distill.sampling import SourceError, is_checkpoint, read_checkpoint_meta
    from distill.teachers import DTYPES

    ckpt = Path(ckpt_dir)
    if not is_checkpoint(ckpt):
        raise ExportError(f"{ckpt} is not a training checkpoint folder (meta.json + student/), e.g. "
                          "runs/<name>/checkpoints/step_000010000")
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        meta = read_checkpoint_meta(ckpt)
    except SourceError as exc:
        raise ExportError(str(exc)) from exc
    folders = {"ema": "student_ema", "live": "student",
               "auto": "student_ema" if (ckpt / "student_ema").is_dir() else "student"}
    if weights not in folders:
        raise ExportError(f"weights={weights!r} is not one of auto, ema, live")
    folder = folders[weights]
    if not (ckpt / folder).is_dir():
        raise ExportError(f"{ckpt} has no {folder}/ (the run had train.ema=false): export weights=live or auto")
    if damage := weights_problem(ckpt / folder):  # else its read error would pass for a failed write (exit 5)
        raise ExportError(f"{ckpt} has a damaged weight file: {folder}/{damage}; export another checkpoint")
    teacher = Path(teacher_path or meta["teacher_path"])
    saved = (meta.get("config") or {}).get("teacher")
    if saved:
        tcfg = OmegaConf.create(saved)
    else:
        from train.config import load_config

        tcfg = load_config([f"teacher={meta['teacher_name']}"]).teacher
    if vae_path is not None:
        tcfg.vae_path = str(vae_path)
    if tcfg.get("vae_path") and not (Path(tcfg.vae_path) / "config.json").is_file():
        given = "--vae-path" if vae_path is not None else "the run's teacher.vae_path"
        raise ExportError(f"{given} {tcfg.vae_path} is not a VAE folder (config.json and weights): give the VAE "
                          "to copy with --vae-path (e.g. <teacher>/vae for the teacher's own)")
    if tcfg.get("vae_path"):
        from train.config import vae_folder_problem

        if problem := vae_folder_problem(tcfg.vae_path):
            given = "--vae-path" if vae_path is not None else "the run's teacher.vae_path"
            raise ExportError(f"{given} {tcfg.vae_path} {problem}")
    hint = ("give the teacher's local diffusers folder with --teacher-path (its text encoders, tokenizers and VAE "
            "are copied)")
    if not teacher.is_dir():
        what = "is a file, not a folder" if teacher.exists() else "is not there"
        raise ExportError(f"the teacher pipeline folder {teacher} {what}: {hint}")
    if problem := pipeline_folder_problem(teacher, unet=False, vae=not tcfg.get("vae_path")):
        raise ExportError(f"the teacher pipeline folder {teacher} {problem}; {hint}")
    _check_target(Path(out_dir), ckpt, teacher)
    try:  # a read error is a damaged checkpoint (exit 2), not a failed write (exit 5)
        student = _load_unet(ckpt / folder, DTYPES[dtype])
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        raise ExportError(f"{ckpt}/{folder} cannot be loaded: {error_summary(exc)}; export another checkpoint") from exc
    out = export_pipeline(teacher, tcfg, student, out_dir)
    return {"export_dir": str(out), "checkpoint": str(ckpt), "step": meta.get("step"), "weights": folder,
            "dtype": dtype, "teacher": tcfg.name, "unet_params": sum(p.numel() for p in student.parameters())}


def _check_target(out: Path, ckpt: Path, teacher: Path) -> None:
    """The export replaces `out` whole: only a new or empty folder or an earlier export may be replaced, never a
    folder holding (or held by) the checkpoint or the teacher, such as the run folder itself."""
    target = out.resolve()
    for name, kept in (("the checkpoint", ckpt.resolve()), ("the teacher folder", teacher.resolve())):
        if target == kept or target in kept.parents or kept in target.parents:
            raise ExportError(f"--out {out} would replace {name} {kept}: give a new folder")
    if problem := out_folder_problem("--out", str(out)):
        raise ExportError(problem)
    earlier_export = (out / "model_index.json").is_file() and (out / "koala_sampler.json").is_file()
    if out.is_dir() and any(out.iterdir()) and not earlier_export:
        raise ExportError(f"--out {out} holds other files and would be replaced whole: give a new or empty folder "
                          "(an earlier export there is replaced)")


def _load_unet(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A U-Net from a `save_pretrained` folder, in `dtype`, whose config is the saved one as it is (from_pretrained
    would add the folder's local path to it, and the export would carry that path)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder} holds no .safetensors weights")
    state = {k: v.to(dtype) for f in files for k, v in load_file(str(f)).items()}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.eval()
