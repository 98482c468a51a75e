"""SDXL preprocessing: crop coordinates and sizes agree with the pixels; buckets; EXIF orientation; drafts."""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import pytest
from PIL import Image

from data.config import DataConfig
from data.decode import RawDecoder
from data.images import cover_size, nearest_bucket, sdxl_buckets
from data.synthetic import encode_image, synthetic_image

CAPTION = json.dumps({"caption": "c"}).encode()


def _sample(pixels: np.ndarray, fmt: str = "png") -> dict:
    return {"__key__": "k", fmt: encode_image(pixels, fmt), "json": CAPTION}


def _expected(pixels: np.ndarray, ex) -> np.ndarray:
    """Resize the whole image, flip it if the example was flipped, cut at crop_top_left: the SDXL reading."""
    resized_h, resized_w = cover_size(ex.original_size, ex.target_size)
    img = Image.fromarray(pixels).resize((resized_w, resized_h), Image.Resampling.BILINEAR)
    if ex.flipped:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left = ex.crop_top_left
    return np.asarray(img)[top : top + ex.target_size[0], left : left + ex.target_size[1]]


@pytest.mark.parametrize("height,width", [(80, 120), (120, 80), (48, 48)])
def test_random_crop_and_flip_agree_with_the_pixels(height, width):
    pixels = synthetic_image(np.random.default_rng(1), height, width)
    decoder = RawDecoder(DataConfig(shards="x", resolution=48, random_crop=True, random_flip=True))
    corners, flips = set(), set()
    for seed in range(24):
        ex = decoder(_sample(pixels), random.Random(seed))
        assert ex.original_size == (height, width) and ex.target_size == (48, 48)
        assert ex.pixels.shape == (48, 48, 3)
        resized = cover_size((height, width), (48, 48))
        assert min(resized) == 48
        top, left = ex.crop_top_left
        assert 0 <= top <= resized[0] - 48 and 0 <= left <= resized[1] - 48
        np.testing.assert_array_equal(ex.pixels, _expected(pixels, ex))
        corners.add((top, left))
        flips.add(ex.flipped)
    assert flips == {True, False}
    if (height, width) != (48, 48):
        assert len(corners) > 3, "random crops should move"


def test_center_crop_is_centred():
    pixels = synthetic_image(np.random.default_rng(2), 80, 120)
    ex = RawDecoder(DataConfig(shards="x", resolution=48, random_crop=False))(_sample(pixels), random.Random(0))
    assert ex.crop_top_left == (0, 12) and not ex.flipped  # resized to 48x72: (72 - 48) / 2 = 12
    np.testing.assert_array_equal(ex.pixels, _expected(pixels, ex))


def test_bucketed_crop_agrees_with_the_pixels():
    cfg = DataConfig(shards="x", resolution=64, buckets=True, bucket_step=16, random_flip=True)
    decoder = RawDecoder(cfg)
    for size in [(80, 120), (130, 40), (60, 60)]:
        pixels = synthetic_image(np.random.default_rng(3), *size)
        for seed in range(6):
            ex = decoder(_sample(pixels), random.Random(seed))
            assert ex.target_size == nearest_bucket(size, decoder.buckets)
            assert ex.pixels.shape[:2] == ex.target_size
            np.testing.assert_array_equal(ex.pixels, _expected(pixels, ex))


def test_sdxl_buckets_at_1024():
    buckets = sdxl_buckets(1024, 64)
    assert (1024, 1024) in buckets and (512, 2048) in buckets and (2048, 512) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert abs(h * w / 1024**2 - 1) < 0.07, (h, w)
    assert buckets == sorted({(w, h) for h, w in buckets}), "portrait and landscape mirror each other"
    assert nearest_bucket((1457, 1274), buckets) == (1088, 960)  # LAION-POP's mean image, portrait
    assert nearest_bucket((1000, 1500), buckets) == (832, 1280)


def test_exif_orientation_is_applied_before_sizes_are_recorded():
    pixels = synthetic_image(np.random.default_rng(4), 40, 60)  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown: portrait
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    decoder = RawDecoder(DataConfig(shards="x", resolution=32, random_crop=False))
    ex = decoder({"__key__": "k", "jpg": buffer.getvalue(), "json": CAPTION}, random.Random(0))
    assert ex.original_size == (60, 40)
    assert ex.crop_top_left == (8, 0)  # 60x40 -> 48x32, centre crop 32x32


def test_jpeg_draft_decoding_matches_a_full_decode():
    pixels = synthetic_image(np.random.default_rng(5), 512, 768)
    sample = _sample(pixels, "jpg")
    decoder = RawDecoder(DataConfig(shards="x", resolution=64, random_crop=False))
    ex = decoder(sample, random.Random(0))
    assert ex.original_size == (512, 768) and ex.pixels.shape == (64, 64, 3)
    full = Image.open(io.BytesIO(sample["jpg"])).convert("RGB").resize((96, 64), Image.Resampling.BILINEAR)
    reference = np.asarray(full)[:, 16:80].astype(float)
    assert math.isclose(np.abs(ex.pixels - reference).mean(), 0, abs_tol=4.0)


@pytest.mark.parametrize("height,width", [(4, 900), (900, 4)])
def test_a_very_thin_image_resizes_only_its_crop(height, width):
    """A 4 x 900 px image at 48 px would be resized to 48 x 10800 before the cut (a 1 x 3000 one at 1024 px: about
    9 GB, which ended make latents and raw training with MemoryError); its crop's region is resized alone, to the
    same pixels up to rounding."""
    pixels = synthetic_image(np.random.default_rng(4), height, width)
    decoder = RawDecoder(DataConfig(shards="x", resolution=48, random_crop=True, random_flip=True))
    for seed in range(4):
        ex = decoder(_sample(pixels), random.Random(seed))
        assert ex.pixels.shape == (48, 48, 3) and ex.original_size == (height, width)
        diff = np.abs(ex.pixels.astype(int) - _expected(pixels, ex).astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())
