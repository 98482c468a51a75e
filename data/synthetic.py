"""Small synthetic LAION-POP-shaped raw shards, and latent shards at real shapes, for tests and benchmarks (seeded,
no downloads)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import numpy as np
import webdataset as wds
from PIL import Image

_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
_LATENT_STORAGE = {"float32": np.float32, "float16": np.float16}  # array dtypes of latent shards


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 [height, width, 3] image: colour gradients plus noise (crops and flips are distinguishable)."""
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    phase = rng.uniform(0.0, 1.0, size=(1, 1, 3))
    base = 0.5 + 0.25 * np.sin(2 * np.pi * (x * (1 + 2 * phase) + y * (2 - phase)))
    noise = rng.normal(0.0, 0.08, size=(height, width, 3))
    return (np.clip(base + noise, 0.0, 1.0) * 255).astype(np.uint8)


def encode_image(pixels: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """Encode a uint8 HxWx3 (or HxW) array as png / jpg / webp bytes."""
    buffer = io.BytesIO()
    kwargs = {"quality": quality} if fmt in ("jpg", "webp") else {}
    Image.fromarray(pixels).save(buffer, format=_FORMATS[fmt], **kwargs)
    return buffer.getvalue()


def laion_pop_json(rng: np.random.Generator, key: str, width: int, height: int) -> dict:
    """LAION-POP-shaped metadata: alt text, two generated captions and a few scores."""
    return {
        "key": key,
        "url": f"https://example.invalid/{key}.jpg",
        "alt_txt": f"alt text of {key}",
        "cogvlm_caption": f"A detailed CogVLM-style description of sample {key}, with colours and layout.",
        "llava_caption": f"A LLaVA-style caption of {key}.",
        "width": width,
        "height": height,
        "aesthetic_score": round(float(rng.uniform(4.0, 7.0)), 3),
        "pwatermark": round(float(rng.uniform(0.0, 1.0)), 3),
    }


def write_synthetic_shards(
    out: str,
    *,
    num_shards: int,
    samples_per_shard: int | Sequence[int],
    sizes: Sequence[tuple[int, int]] = ((48, 64), (64, 48), (56, 56)),
    fmt: str = "png",
    seed: int = 0,
    key_prefix: str = "s",
) -> list[str]:
    """Write `num_shards` shards of synthetic samples to `out`; return their paths.

    samples_per_shard: one count for all shards, or one per shard. sizes: (height, width) in px, cycled.
    Keys are f"{key_prefix}{shard:04d}x{index:04d}" and unique across shards.
    """
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = [samples_per_shard] * num_shards if isinstance(samples_per_shard, int) else list(samples_per_shard)
    paths, n = [], 0
    for shard, count in enumerate(counts):
        path = os.path.join(out, f"{shard:06d}.tar")
        with wds.TarWriter(path, mtime=0) as writer:
            for index in range(count):
                height, width = sizes[n % len(sizes)]
                key = f"{key_prefix}{shard:04d}x{index:04d}"
                writer.write(
                    {
                        "__key__": key,
                        fmt: encode_image(synthetic_image(rng, height, width), fmt),
                        "json": json.dumps(laion_pop_json(rng, key, width, height)).encode("utf-8"),
                    }
                )
                n += 1
        paths.append(path)
    return paths


def write_synthetic_latent_shards(
    out: str,
    *,
    num_shards: int,
    samples_per_shard: int,
    latent_shape: tuple[int, int, int] = (4, 128, 128),
    text_tokens: int = 77,
    text_dim: int = 2048,
    pooled_dim: int = 1280,
    image_size: tuple[int, int] = (1024, 1024),
    storage: str = "float16",
    vae_scaling_factor: float = 0.13025,
    seed: int = 0,
    key_prefix: str = "l",
) -> list[str]:
    """Write latent shards in `make latents`' format (data/latents.py) with seeded N(0, 1) arrays; return their paths.

    Each sample has latents.npy `latent_shape` ([C, h, w]; SDXL at 1024 px: [4, 128, 128]), prompt_embeds.npy
    [text_tokens, text_dim] (SDXL: [77, 2048]), pooled_prompt_embeds.npy [pooled_dim] (SDXL: 1280), stored as
    `storage` (float16 like `make latents`' default, or float32), and a json with caption, original_size,
    crop_top_left, target_size (image_size as (height, width) px), flipped and vae_scaling_factor (the value
    recorded only; SDXL's VAE has 0.13025). `empty_prompt.npz` (float32, for caption dropout) is written beside
    the shards. For benchmarks of the latent training path at real shapes: the values carry no image.
    """
    from data.latents import EMPTY_PROMPT_FILE

    if storage not in _LATENT_STORAGE:
        raise ValueError(f"storage must be one of {sorted(_LATENT_STORAGE)}, got {storage!r}")
    dtype = _LATENT_STORAGE[storage]
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    height, width = image_size
    paths = []
    for shard in range(num_shards):
        path = os.path.join(out, f"{shard:06d}.tar")
        with wds.TarWriter(path, mtime=0) as writer:
            for index in range(samples_per_shard):
                key = f"{key_prefix}{shard:04d}x{index:04d}"
                meta = {"caption": f"synthetic latent sample {key}", "original_size": [height, width],
                        "crop_top_left": [0, 0], "target_size": [height, width], "flipped": False,
                        "vae_scaling_factor": vae_scaling_factor}
                writer.write({
                    "__key__": key,
                    "latents.npy": rng.standard_normal(latent_shape, dtype=np.float32).astype(dtype),
                    "prompt_embeds.npy": rng.standard_normal((text_tokens, text_dim), dtype=np.float32).astype(dtype),
                    "pooled_prompt_embeds.npy": rng.standard_normal(pooled_dim, dtype=np.float32).astype(dtype),
                    "json": json.dumps(meta).encode("utf-8"),
                })
        paths.append(path)
    np.savez(os.path.join(out, EMPTY_PROMPT_FILE),
             prompt_embeds=np.zeros((text_tokens, text_dim), dtype=np.float32),
             pooled_prompt_embeds=np.zeros(pooled_dim, dtype=np.float32))
    return paths
