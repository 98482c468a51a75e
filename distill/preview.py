"""Teacher-vs-student preview grids for fixed prompts and seeds (used by the trainer's sample callback)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from distill.sampling import image_grid


@torch.no_grad()
def teacher_student_grid(
    components: dict[str, Any], student: torch.nn.Module, prompts: Sequence[str], *, seed: int, steps: int,
    guidance_scale: float, resolution: int, timestep_spacing: str = "leading",
) -> Image.Image:
    """Rows: prompts; columns: teacher, student. Same prompt and seed for both, so differences are the models'.

    `components` are the teacher pipeline's parts (unet, vae, text encoders, tokenizers, scheduler); the
    student replaces the U-Net in the second column.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler.from_config(components["scheduler"].config, timestep_spacing=timestep_spacing)
    parts = {**components, "scheduler": scheduler}
    images: list[Image.Image] = []
    for unet in (components["unet"], student):
        pipe = StableDiffusionXLPipeline(**{**parts, "unet": unet})
        pipe.set_progress_bar_config(disable=True)
        param = next(unet.parameters())
        # A bf16/fp16 teacher beside fp32 text encoders and student: autocast makes the dtypes meet.
        amp = torch.autocast(param.device.type, dtype=param.dtype, enabled=param.dtype != torch.float32)
        with amp:
            for i, prompt in enumerate(prompts):
                gen = torch.Generator(device="cpu").manual_seed(seed + i)
                images.append(pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                                   height=resolution, width=resolution, generator=gen,
                                   output_type="pil").images[0])
    n = len(prompts)
    ordered = [img for i in range(n) for img in (images[i], images[n + i])]
    return image_grid(ordered, cols=2)
