"""Small synthetic LAION-POP-shaped shards for tests and benchmarks (seeded, no downloads)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import numpy as np
import webdataset as wds
from PIL import Image

_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


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
