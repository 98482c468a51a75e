"""Teacher-vs-student preview grids for fixed prompts and seeds (used by the trainer's sample callback)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from distill.sampling import SampleSettings, generate, image_grid


@torch.no_grad()
def teacher_student_grid(
    components: dict[str, Any], student: torch.nn.Module, prompts: Sequence[str], *, seed: int, steps: int,
    guidance_scale: float, resolution: int, timestep_spacing: str = "leading",
) -> Image.Image:
    """Rows: prompts; columns: teacher, student. Same prompt and seed for both, so differences are the models'.

    `components` are the teacher pipeline's parts (unet, vae, text encoders, tokenizers, scheduler); the
    student replaces the U-Net in the second column. Image i uses seed + i (`distill.sampling.generate`).
    """
    from diffusers import StableDiffusionXLPipeline

    settings = SampleSettings(steps=steps, guidance_scale=guidance_scale, height=resolution, width=resolution,
                              timestep_spacing=timestep_spacing)
    columns: list[list[Image.Image]] = []
    for unet in (components["unet"], student):
        pipe = StableDiffusionXLPipeline(**{**components, "unet": unet})
        pipe.set_progress_bar_config(disable=True)
        param = next(unet.parameters())
        # A bf16/fp16 teacher beside fp32 text encoders and student: autocast makes the dtypes meet.
        with torch.autocast(param.device.type, dtype=param.dtype, enabled=param.dtype != torch.float32):
            columns.append(generate(pipe, prompts, settings, seed=seed).images)
    return image_grid([img for pair in zip(*columns, strict=True) for img in pair], cols=2)
