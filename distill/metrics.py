"""Image metrics for teacher-student agreement and text-image alignment.

Agreement (same prompt, same seed): latent MSE, PSNR and SSIM of the decoded images. Alignment: CLIP score
from a local transformers CLIP folder and HPSv2 from an OpenCLIP model handed in by the caller (open_clip is
not a dependency of distill/). Every function returns one value per image so callers can average or keep them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image

SSIM_WINDOW = 11  # Gaussian window side, px (Wang et al. 2004)
SSIM_SIGMA = 1.5  # Gaussian window std, px
SSIM_K1, SSIM_K2 = 0.01, 0.03  # stabilising constants, as fractions of the data range


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample of two (N, ...) latent batches -> (N,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image of two (N, C, H, W) batches with values in [0, data_range] -> (N,).

    Identical images give +inf.
    """
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> torch.Tensor:
    """Mean SSIM per image of two (N, C, H, W) batches -> (N,).

    Gaussian-weighted local statistics over the valid region (no padding), population (co)variances, SSIM
    averaged over pixels and channels; equal to skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=...) per channel, averaged.
    """
    a, b = a.double(), b.double()
    c = a.shape[1]
    w = _gaussian_window(window, sigma, c).to(a.device)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


class ImageTextScorer(Protocol):
    """Scores (image, prompt) pairs; higher is better."""

    name: str

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor: ...


class ClipScorer:
    """CLIP score = 100 * max(cos(image embedding, text embedding), 0), from a local CLIPModel folder.

    The folder needs the model weights plus a processor (tokenizer and image processor), as written by
    `CLIPModel.save_pretrained` and `CLIPProcessor.save_pretrained`, e.g. openai/clip-vit-large-patch14.
    """

    name = "clip_score"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 16):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(str(path)).to(device).eval().requires_grad_(False)
        self.processor = CLIPProcessor.from_pretrained(str(path))
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """One score per pair, in [0, 100]."""
        scores = []
        for i in range(0, len(images), self.batch_size):
            inputs = self.processor(
                text=list(prompts[i:i + self.batch_size]), images=list(images[i:i + self.batch_size]),
                return_tensors="pt", padding=True, truncation=True, max_length=self.max_tokens,
            ).to(self.device)
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            img, txt = _features(img), _features(txt)
            cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
            scores.append(100.0 * cos.clamp(min=0).cpu())
        return torch.cat(scores)


def _features(out: Any) -> torch.Tensor:
    """get_*_features returns a tensor in some transformers versions and an output object in others."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


class Hpsv2Scorer:
    """HPSv2 (Human Preference Score v2): the dot product of normalised OpenCLIP image and text features.

    Takes an already built OpenCLIP ViT-H-14 with the HPSv2 checkpoint loaded (model), its validation image
    transform (preprocess: PIL -> tensor) and tokenizer (list[str] -> ids); scripts/eval.py builds them when
    open_clip is installed. Scores are around 0.2-0.3 for typical images.
    """

    name = "hpsv2"

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, device: str | torch.device = "cpu",
                 batch_size: int = 8):
        self.model = model.to(device).eval().requires_grad_(False)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """One score per pair."""
        scores = []
        for i in range(0, len(images), self.batch_size):
            pix = torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]]).to(self.device)
            ids = self.tokenizer(list(prompts[i:i + self.batch_size])).to(self.device)
            img = F.normalize(self.model.encode_image(pix).float(), dim=-1)
            txt = F.normalize(self.model.encode_text(ids).float(), dim=-1)
            scores.append((img * txt).sum(-1).cpu())
        return torch.cat(scores)
