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

from distill.teachers import export_scheduler

_COPIED = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def export_pipeline(teacher_path: Path, tcfg: Any, student: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write the pipeline folder atomically (temporary folder, then rename) and return its path. A write that fails
    removes the temporary folder and leaves an earlier export untouched."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(teacher_path, tcfg, student, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _write(teacher_path: Path, tcfg: Any, student: torch.nn.Module, tmp: Path) -> None:
    tmp.mkdir(parents=True)
    for sub in _COPIED:
        shutil.copytree(teacher_path / sub, tmp / sub)
    shutil.copytree(Path(tcfg.vae_path) if tcfg.vae_path else teacher_path / "vae", tmp / "vae")
    student.save_pretrained(tmp / "unet")
    export_scheduler(tcfg, teacher_path).save_pretrained(tmp / "scheduler")
    index = json.loads((teacher_path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    s = tcfg.sampler
    (tmp / "koala_sampler.json").write_text(json.dumps({
        "teacher": tcfg.name, "num_inference_steps": s.steps, "guidance_scale": s.guidance_scale,
        "timestep_spacing": s.timestep_spacing, "resolution": tcfg.resolution,
    }, indent=2))
