"""SDXL conditioning: prompt embeddings from both text encoders, micro-conditioning ids, VAE latents.

Follows SDXL-Base: each encoder's penultimate hidden states are concatenated along the feature axis (768 + 1280 =
2048 channels for the real encoders), the pooled, projected output of the second encoder is the "text_embeds"
input, and `add_time_ids` = (original h, w, crop top, left, target h, w) per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def encode_prompts(
    tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module], captions: Sequence[str]
) -> tuple[Tensor, Tensor]:
    """Prompt embeddings [B, 77, sum of hidden sizes] and pooled embeddings [B, projection dim].

    The pooled embedding comes from the last encoder (SDXL's CLIPTextModelWithProjection).
    """
    hidden: list[Tensor] = []
    pooled: Tensor | None = None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    assert pooled is not None
    return torch.cat(hidden, dim=-1), pooled


def add_time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
    """SDXL micro-conditioning [B, 6] from per-sample (h, w) sizes and (top, left) crops, all in pixels."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1)


@torch.no_grad()
def encode_images(vae: torch.nn.Module, pixel_values: Tensor, *, sample: bool = False,
                  generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
    """Scaled latents of images in [-1, 1]: the latent distribution's mean, or with `sample` a draw from it (as
    SDXL training does: mean + std x N(0, 1)), times the VAE's own `scaling_factor` (after subtracting
    `shift_factor` where the VAE defines one). generator: one for the batch, or one per image; the normal draw
    is made on the generator's device, so a seeded draw does not depend on where the VAE runs."""
    dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = dist.mean
    if sample:
        if isinstance(generator, list):
            eps = torch.stack([torch.randn(z.shape[1:], generator=g, device=g.device) for g in generator])
        elif generator is not None:
            eps = torch.randn(z.shape, generator=generator, device=generator.device)
        else:
            eps = torch.randn(z.shape, device=z.device)
        z = z + dist.std * eps.to(z)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: Tensor) -> Tensor:
    """Images in [-1, 1] from scaled latents (inverse of `encode_images`)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
    return vae.decode(z).sample
