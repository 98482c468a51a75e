"""Image decoding that never raises anything but SkipSample, mode conversion to RGB, and SDXL preprocessing.

SDXL preprocessing (as in diffusers' `train_text_to_image_sdxl.py`): resize so the image covers the target
(the shorter side becomes `resolution`, or the image covers its bucket), crop to the target (random or
center) recording the crop's top-left corner, optionally flip. `original_size` (before resize),
`crop_top_left` (in the resized, possibly flipped image) and `target_size` feed SDXL's `add_time_ids`. All
sizes are (height, width) in px.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps

from data.captions import SkipSample

# File extensions read as images inside a sample, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_TIFF_WIDTH, _TIFF_LENGTH = 256, 257  # ImageWidth, ImageLength: a TIFF's stored (unoriented) size
_SIXTEEN_BIT_MAX = 65535
_EIGHT_BIT_MAX = 255
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class CropInfo:
    """Where a training crop came from; sizes and positions are (height, width) / (top, left) in px."""

    original_size: tuple[int, int]  # image size before resize (after EXIF orientation)
    resized_size: tuple[int, int]  # size after the resize, before the crop
    crop_top_left: tuple[int, int]  # crop corner in the resized image (mirrored horizontally if flipped)
    target_size: tuple[int, int]  # crop size
    flipped: bool


def open_image(data: bytes | None, max_pixels: int) -> Image.Image:
    """Open an encoded image lazily (header only) and check its pixel count.

    Raises SkipSample: 'no_image' (absent), 'empty_image' (zero bytes), 'bad_image' (not an image),
    'too_many_pixels' (width x height > max_pixels, checked before any pixel is decoded).
    """
    if data is None:
        raise SkipSample("no_image")
    if len(data) == 0:
        raise SkipSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise SkipSample("too_many_pixels", str(exc)) from exc
    except Exception as exc:  # PIL raises several types for non-images
        raise SkipSample("bad_image", f"{type(exc).__name__}: {exc}") from exc
    width, height = img.size
    if width < 1 or height < 1:
        raise SkipSample("bad_image", f"size {width}x{height}")
    if width * height > max_pixels:
        raise SkipSample("too_many_pixels", f"{width}x{height} > {max_pixels}")
    return img


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) of the image as displayed, i.e. after its EXIF orientation; reads no pixels."""
    width, height = img.size
    tags = getattr(img, "tag_v2", None)
    if tags is not None:  # a TIFF: Pillow reports its size already oriented (and drops the tag once it is loaded),
        # so the displayed size comes from the stored one in its tags, turned by their orientation
        swapped = tags.get(ExifTags.Base.Orientation, 1) in _SWAPPING_ORIENTATIONS
        if swapped and _TIFF_WIDTH in tags and _TIFF_LENGTH in tags:
            return int(tags[_TIFF_WIDTH]), int(tags[_TIFF_LENGTH])
        return height, width
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a broken EXIF block is not worth a skip; the pixels may be fine
        orientation = 1
    return (width, height) if orientation in _SWAPPING_ORIENTATIONS else (height, width)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparent images (RGBA, LA, PA, P or L/RGB with a transparency key) are composited on white, 16-bit
    grayscale (I;16*, I) is scaled from 0..65535 to 0..255, float (F) is clipped to 0..255 (or scaled from
    0..1), CMYK, YCbCr, L, 1 and P go through PIL's own conversion.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I"):  # before the transparency branch, whose RGBA conversion clips 16-bit values at 255
        stored = np.asarray(img)
        values = stored.astype(np.float64)
        if mode.startswith("I;16") or values.max(initial=0) > _EIGHT_BIT_MAX:
            values = values * (_EIGHT_BIT_MAX / _SIXTEEN_BIT_MAX)
        gray = np.clip(np.rint(values), 0, _EIGHT_BIT_MAX).astype(np.uint8)
        key = img.info.get("transparency")
        if isinstance(key, int):  # the one see-through gray value: white, as transparent pixels are below
            gray[stored == key] = _EIGHT_BIT_MAX
        return Image.fromarray(gray).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode == "F":
        values = np.asarray(img).astype(np.float64)
        if values.max(initial=0) <= 1.0:
            values = values * _EIGHT_BIT_MAX
        gray = np.clip(np.rint(np.nan_to_num(values)), 0, _EIGHT_BIT_MAX).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return img.convert("RGB")


def decode_rgb(img: Image.Image, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode the pixels of an opened image, apply its EXIF orientation and convert to RGB.

    draft_size: (width, height) in px the decoded image must still cover, in the file's stored orientation;
    JPEGs are then decoded at the smallest DCT scale (1/2, 1/4, 1/8) that is at least that large, which is
    several times faster for large photos. Truncated or corrupt data raise SkipSample('bad_image').
    """
    try:
        if draft_size is not None and img.format in ("JPEG", "MPO"):  # MPO: a phone's multi-frame JPEG
            img.draft(None, draft_size)
        img.load()
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # broken EXIF: oriented_size() fell back to the stored orientation as well
            pass
        return to_rgb(img)
    except Exception as exc:
        raise SkipSample("bad_image", f"{type(exc).__name__}: {exc}") from exc


def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Smallest (height, width) of an aspect-preserving resize of `size` that covers `target` (px)."""
    height, width = size
    scale = max(target[0] / height, target[1] / width)
    return max(target[0], round(height * scale)), max(target[1], round(width * scale))


def sdxl_buckets(resolution: int, step: int = 64) -> list[tuple[int, int]]:
    """SDXL-style aspect buckets: (height, width) pairs, multiples of `step` px, area about resolution^2.

    For each short side from resolution/2 up to resolution, the long side is the multiple of `step` closest to
    resolution^2 / short side (aspect 1:4 to 4:1 at 1024 px); landscape and portrait are mirror images.
    """
    area = resolution * resolution
    lo = max(step, math.ceil(resolution / 2 / step) * step)
    buckets = set()
    for short in range(lo, resolution + 1, step):
        long = max(short, round(area / short / step) * step)
        buckets.update({(short, long), (long, short)})
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log ratio) to that of `size` (height, width)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def plan_crop(
    original_size: tuple[int, int],
    target_size: tuple[int, int],
    rng: random.Random,
    *,
    random_crop: bool,
    random_flip: bool,
) -> CropInfo:
    """Choose the resize, crop corner and flip for one image (sizes in px, (height, width))."""
    resized = cover_size(original_size, target_size)
    spare_h, spare_w = resized[0] - target_size[0], resized[1] - target_size[1]
    if random_crop:
        top, left = rng.randint(0, spare_h), rng.randint(0, spare_w)
    else:
        top, left = int(round(spare_h / 2.0)), int(round(spare_w / 2.0))
    flipped = random_flip and rng.random() < 0.5
    if flipped:  # the model sees the mirrored crop, whose left margin is the original right margin
        left = spare_w - left
    return CropInfo(original_size, resized, (top, left), target_size, flipped)


MAX_RESIZE_AREA = 16  # a planned resize over this many times the crop's area resizes the crop's region only


def apply_crop(img: Image.Image, crop: CropInfo) -> np.ndarray:
    """Resize (bilinear, antialiased), crop and flip an RGB image as planned; uint8 array [H, W, 3].

    A very thin image (e.g. 3 x 3000 px) would be resized to a strip of millions of pixels per side before the
    cut (about 9 GB for 1 x 3000 at 1024 px): its crop's region is resized alone instead (the same pixels up to
    rounding)."""
    resized_h, resized_w = crop.resized_size
    top, left = crop.crop_top_left
    target_h, target_w = crop.target_size
    if crop.flipped:  # crop_top_left is in the mirrored image: mirror it back to cut, then flip the cut
        left = resized_w - left - target_w
    if resized_h * resized_w > MAX_RESIZE_AREA * target_h * target_w:
        sx, sy = img.width / resized_w, img.height / resized_h
        box = (left * sx, top * sy, (left + target_w) * sx, (top + target_h) * sy)
        pixels = img.resize((target_w, target_h), Image.Resampling.BILINEAR, box=box)
    else:
        if img.size != (resized_w, resized_h):
            img = img.resize((resized_w, resized_h), Image.Resampling.BILINEAR)
        pixels = img.crop((left, top, left + target_w, top + target_h))
    if crop.flipped:
        pixels = pixels.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(pixels, dtype=np.uint8)


def draft_size_for(img: Image.Image, original_size: tuple[int, int], resized_size: tuple[int, int]) -> tuple:
    """(width, height) in the file's stored orientation that a JPEG draft decode must still cover."""
    height, width = math.ceil(resized_size[0]), math.ceil(resized_size[1])
    if (img.size[1], img.size[0]) != original_size:  # EXIF orientation swaps the stored sides
        height, width = width, height
    return width, height
