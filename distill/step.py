"""The distillation step: a batch in, a dict of loss tensors out.

The trainer, the benchmarks and the tests all call `Distiller.__call__`; there is no second copy of the step.
Mixed precision for the student is the caller's business (the trainer wraps the call in `accelerator.autocast()`);
the frozen teacher runs in its own dtype without gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distill.conditioning import add_time_ids, encode_images, encode_prompts
from distill.features import FeaturePair, FeatureTap, tap_pair
from distill.losses import koala_loss
from distill.perf import PhaseTimer, begin_phase
from distill.teachers import TeacherBundle, sample_timesteps, task_target, zeros_for_empty_prompt


@dataclass
class UNetInputs:
    """Conditioning of one batch: scaled latents z0 [B,4,h,w], prompt embeds [B,77,D], pooled [B,P], ids [B,6]."""

    latents: Tensor
    prompt_embeds: Tensor
    pooled: Tensor
    time_ids: Tensor


def prepare_inputs(
    batch: dict[str, Any], teacher: TeacherBundle, *, device: torch.device, generator: torch.Generator,
    caption_dropout: float = 0.0, empty_prompt: tuple[Tensor, Tensor] | None = None, zero_uncond: bool = True,
) -> UNetInputs:
    """Turn a raw (pixels + captions) or precomputed (latents + embeddings) batch into U-Net conditioning.

    Caption dropout gives a caption the unconditional input that guidance will feed the exported student: with
    `zero_uncond` (the teacher pipeline's force_zeros_for_empty_prompt, SDXL's default) all-zero prompt and pooled
    embeddings; else the encoding of "", which for precomputed embeddings is `empty_prompt` = (prompt embeds
    [77, D], pooled [P]), saved by `make latents`.
    """
    n = len(batch["captions"])
    drop = torch.rand(n, generator=generator, device=generator.device) < caption_dropout
    drop = drop.to(device)
    if "latents" in batch:
        latents = batch["latents"].to(device, torch.float32)
        prompt = batch["prompt_embeds"].to(device, torch.float32)
        pooled = batch["pooled_prompt_embeds"].to(device, torch.float32)
        if caption_dropout > 0 and zero_uncond:
            prompt = torch.where(drop[:, None, None], 0.0, prompt)
            pooled = torch.where(drop[:, None], 0.0, pooled)
        elif caption_dropout > 0:
            if empty_prompt is None:
                raise ValueError("caption dropout on latent shards needs the empty caption's embeddings "
                                 "(empty_prompt.npz, written by make latents)")
            prompt = torch.where(drop[:, None, None], empty_prompt[0].to(device), prompt)
            pooled = torch.where(drop[:, None], empty_prompt[1].to(device), pooled)
    else:
        if teacher.vae is None or not teacher.text_encoders:
            raise ValueError("a raw batch needs the teacher's VAE and text encoders (data.kind=raw loads them)")
        latents = encode_images(teacher.vae, batch["pixel_values"].to(device), sample=True,
                                generator=generator).float()  # a posterior sample, as SDXL training draws
        captions = ["" if d else c for c, d in zip(batch["captions"], drop.tolist(), strict=True)]
        prompt, pooled = encode_prompts(teacher.tokenizers, teacher.text_encoders, captions)
        prompt, pooled = prompt.float(), pooled.float()
        if zero_uncond:
            prompt = torch.where(drop[:, None, None], 0.0, prompt)
            pooled = torch.where(drop[:, None], 0.0, pooled)
    ids = add_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"]).to(device)
    return UNetInputs(latents, prompt, pooled, ids.float())


class Distiller:
    """Teacher + student + feature taps + objective. Call it on a batch to get the loss dict.

    `student` is the module to call (it may be DDP/DeepSpeed-wrapped or compiled); `student_unwrapped` is the
    plain module whose submodules are hooked. Hooks are attached at construction; `close()` removes them.
    """

    def __init__(
        self,
        teacher: TeacherBundle,
        student: torch.nn.Module,
        pairs: Sequence[FeaturePair],
        tcfg: Any,
        dcfg: Any,
        *,
        student_unwrapped: torch.nn.Module | None = None,
        empty_prompt: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.teacher = teacher
        self.student = student
        self.pairs = list(pairs)
        self.tcfg = tcfg
        self.dcfg = dcfg
        self.empty_prompt = empty_prompt
        self.zero_uncond = zeros_for_empty_prompt(teacher.path)  # what guidance will feed the exported student
        self.tap_t, self.tap_s = tap_pair(teacher.unet, student_unwrapped or student, self.pairs)
        self.phases: PhaseTimer | None = None  # a benchmark attaches one to see where the step's time goes
        # The student's inputs go in its weights' dtype when that is a half type: DeepSpeed's bf16/fp16 mode casts
        # the weights and, unlike autocast, not the inputs. An fp32 student (autocast, the default) gets fp32.
        # The time ids (sizes and crops in pixels) stay fp32 for both models (see forward).
        weights = next((p.dtype for p in (student_unwrapped or student).parameters() if p.is_floating_point()),
                       torch.float32)
        self.student_input_dtype = weights if weights in (torch.bfloat16, torch.float16) else None

    @property
    def taps(self) -> tuple[FeatureTap, FeatureTap]:
        return self.tap_t, self.tap_s

    def close(self) -> None:
        """Remove the feature hooks from both models."""
        self.tap_t.remove()
        self.tap_s.remove()

    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        """One forward of teacher and student on a batch; returns koala_loss's dict (see distill.losses)."""
        device = self.teacher.unet.device
        begin_phase(self.phases, "inputs")
        # The trainer calls this inside the student's autocast: the VAE (fp32: SDXL's overflows in fp16) and the text
        # encoders run in their own dtypes, not the autocast one.
        with torch.autocast(device.type, enabled=False):
            inputs = prepare_inputs(batch, self.teacher, device=device, generator=generator,
                                    caption_dropout=self.dcfg.caption_dropout, empty_prompt=self.empty_prompt,
                                    zero_uncond=self.zero_uncond)
        return self.forward(inputs, generator)

    def forward(self, x: UNetInputs, generator: torch.Generator) -> dict[str, Tensor]:
        """The step on prepared conditioning (benchmarks call this with synthetic inputs)."""
        begin_phase(self.phases, "noise")
        sched = self.teacher.noise_scheduler
        bsz = x.latents.shape[0]
        device = x.latents.device
        timesteps = sample_timesteps(self.tcfg, bsz, device=generator.device, generator=generator).to(device)
        noise = torch.randn(x.latents.shape, generator=generator, device=generator.device).to(device)
        noisy = sched.add_noise(x.latents, noise, timesteps)
        target = task_target(sched, x.latents, noise, timesteps)

        t_dtype = self.teacher.unet.dtype
        begin_phase(self.phases, "teacher_fwd")
        self.tap_t.clear()
        # SDXL's size and crop conditioning stays fp32 for both models: bf16 holds whole numbers exactly only up to
        # 256 (1457 px would reach the U-Net as 1456), and diffusers embeds time ids in fp32 whatever the weights.
        time_ids = x.time_ids.float()
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # teacher.dtype, not the student's autocast
            teacher_out = self.teacher.unet(
                noisy.to(t_dtype), timesteps, encoder_hidden_states=x.prompt_embeds.to(t_dtype),
                added_cond_kwargs={"text_embeds": x.pooled.to(t_dtype), "time_ids": time_ids},
            ).sample
        begin_phase(self.phases, "student_fwd")
        self.tap_s.clear()
        s_in = self.student_input_dtype
        student_out = self.student(
            noisy.to(s_in or noisy.dtype), timesteps,
            encoder_hidden_states=x.prompt_embeds.to(s_in or x.prompt_embeds.dtype),
            added_cond_kwargs={"text_embeds": x.pooled.to(s_in or x.pooled.dtype),
                               "time_ids": time_ids},
        ).sample
        if len(self.tap_s.features) != len(self.pairs) or len(self.tap_t.features) != len(self.pairs):
            # e.g. a wrapper or a compiled region that bypasses Module.__call__: never train without the features
            missing = sorted({p.label for p in self.pairs} - (set(self.tap_s.features) & set(self.tap_t.features)))
            raise RuntimeError(f"feature hooks did not fire for {len(missing)} of {len(self.pairs)} pairs, "
                               f"e.g. {missing[:3]}")
        begin_phase(self.phases, "loss")
        losses = koala_loss(
            student_out, teacher_out, target, self.tap_s.features, self.tap_t.features,
            w_task=self.dcfg.w_task, w_out=self.dcfg.w_out, w_feat=self.dcfg.w_feat,
        )
        self.tap_t.clear()
        self.tap_s.clear()
        return losses
