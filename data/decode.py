"""One webdataset sample (a dict of raw bytes) to one training example, or SkipSample with a reason.

Raw samples: an image (jpg/jpeg/png/webp) + json metadata with caption fields (+ optional txt). Latent
samples (written by `make latents`): latents.npy, prompt_embeds.npy, pooled_prompt_embeds.npy + json with
the caption and the SDXL sizes. The checks run cheapest first, so most bad samples are skipped before any
pixel is decoded.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from data.captions import SkipSample, check_scores, choose_caption, decode_json, decode_text
from data.config import DataConfig, parse_score_filters
from data.images import (
    IMAGE_EXTENSIONS,
    apply_crop,
    decode_rgb,
    draft_size_for,
    nearest_bucket,
    open_image,
    oriented_size,
    plan_crop,
    sdxl_buckets,
)

# File names (after the key) of a latent sample.
LATENT_FILES = ("latents.npy", "prompt_embeds.npy", "pooled_prompt_embeds.npy")
# The settings a latent shard set was made with (`make latents`, data/latents.py), beside its shards.
MANIFEST_FILE = "latents.json"
# Skip reason of a latent sample whose arrays have the right dimensions but not the shard set's shape.
BAD_LATENT_SHAPE = "bad_latent_shape"


@dataclass
class Example:
    """One decoded training example. Sizes are (height, width) in px; arrays are numpy."""

    key: str
    caption: str
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    flipped: bool
    pixels: np.ndarray | None = None  # uint8 [H, W, 3] (raw kind)
    latents: np.ndarray | None = None  # [4, h, w], already scaled by the VAE's scaling_factor (latent kind)
    prompt_embeds: np.ndarray | None = None  # [77, D]
    pooled_prompt_embeds: np.ndarray | None = None  # [P]

    @property
    def shape_key(self) -> tuple[int, ...]:
        """Examples with equal shape keys can share a batch."""
        if self.pixels is not None:
            return tuple(self.pixels.shape)
        return tuple(self.latents.shape) + tuple(self.prompt_embeds.shape)


Decoder = Callable[[dict[str, Any], random.Random], Example]


def _image_bytes(sample: dict[str, Any]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None


class RawDecoder:
    """Decode, filter and SDXL-preprocess raw image samples according to a DataConfig."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.score_filters = parse_score_filters(cfg.score_filters)
        self.buckets = sdxl_buckets(cfg.resolution, cfg.bucket_step) if cfg.buckets else None

    def target_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the crop for an image of `original_size`: its bucket, or a square."""
        if self.buckets:
            return nearest_bucket(original_size, self.buckets)
        return self.cfg.resolution, self.cfg.resolution

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> Example:
        """The example for one raw sample; `rng` drives the random crop and flip. Raises SkipSample."""
        cfg = self.cfg
        data = _image_bytes(sample)
        if data is None:
            raise SkipSample("no_image", f"no {'/'.join(IMAGE_EXTENSIONS)} in {sorted(sample)}")
        meta = decode_json(sample.get("json"))
        txt = decode_text(sample.get("txt"))
        if meta is None and txt is None:
            raise SkipSample("missing_json", "neither json nor txt")
        if meta is None and self.score_filters:
            raise SkipSample("missing_json", "score filters need json metadata")
        caption = choose_caption(meta, txt, cfg.caption_fields, syncap=cfg.syncap, alt_text_fields=cfg.alt_text_fields)
        check_scores(meta, self.score_filters)

        img = open_image(data, cfg.max_pixels)
        original_size = oriented_size(img)
        height, width = original_size
        if min(height, width) < cfg.min_side:
            raise SkipSample("too_small", f"{width}x{height} < {cfg.min_side}")
        aspect = width / height
        if (cfg.min_aspect is not None and aspect < cfg.min_aspect) or (
            cfg.max_aspect is not None and aspect > cfg.max_aspect
        ):
            raise SkipSample("bad_aspect", f"width/height {aspect:.3f}")

        crop = plan_crop(
            original_size,
            self.target_size(original_size),
            rng,
            random_crop=cfg.random_crop,
            random_flip=cfg.random_flip,
        )
        rgb = decode_rgb(img, draft_size_for(img, original_size, crop.resized_size))
        pixels = apply_crop(rgb, crop)
        return Example(
            key=sample["__key__"],
            caption=caption,
            original_size=crop.original_size,
            crop_top_left=crop.crop_top_left,
            target_size=crop.target_size,
            flipped=crop.flipped,
            pixels=pixels,
        )


def _load_npy(data: bytes | None, name: str) -> np.ndarray:
    if not data:
        raise SkipSample("bad_latents", f"{name} missing or empty")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise SkipSample("bad_latents", f"{name}: {type(exc).__name__}: {exc}") from exc
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise SkipSample("bad_latents", f"{name}: dtype {array.dtype} or non-finite values")
    return array.astype(np.float32, copy=False)


def _pair(meta: dict[str, Any], name: str) -> tuple[int, int]:
    """Two pixel counts (a size or a crop offset) from a latent sample's json: whole numbers in [0, 2**31), which
    collate's int64 tensor and SDXL's time ids hold (JSON's integers are unbounded; a bool is not a count)."""
    value = meta.get(name)
    if not (isinstance(value, list) and len(value) == 2
            and all(type(v) is int and 0 <= v < 2**31 for v in value)):
        raise SkipSample("bad_latents", f"json {name} is {value!r}, not [int, int] in px")
    return value[0], value[1]


@dataclass
class LatentShapes:
    """The shapes every latent sample of one shard set has; None where not known (the first sample that fits the
    known ones then fixes it for its reader)."""

    channels: int | None = None  # latent channels (SDXL's VAE: 4)
    factor: int | None = None  # px of the crop per latent cell, the VAE's downsampling (SDXL: 8; the tiny one: 2)
    prompt_embeds: tuple[int, int] | None = None  # (tokens, width) (SDXL: (77, 2048))
    pooled: int | None = None  # pooled width (SDXL: 1280)
    # The (height, width) crops in px that latents.json's resolution and buckets allow; never learned from a sample
    # (a shard set with buckets legitimately holds several).
    target_sizes: frozenset[tuple[int, int]] | None = None

    @property
    def arrays(self) -> tuple[Any, ...]:
        """(channels, factor, prompt_embeds, pooled): what a sample's arrays fix."""
        return self.channels, self.factor, self.prompt_embeds, self.pooled

    def check(self, seen: LatentShapes, target_size: tuple[int, int]) -> None:
        """Raise SkipSample(BAD_LATENT_SHAPE) naming every known shape that `seen` (one sample's) differs from."""
        wrong = [f"{name} {got} where the shards have {want}"
                 for name, got, want in zip(("latent channels", "VAE factor", "prompt_embeds", "pooled width"),
                                            seen.arrays, self.arrays, strict=True)
                 if want is not None and got != want]
        if self.target_sizes is not None and target_size not in self.target_sizes:
            wrong.append(f"target_size {target_size} is not a crop of latents.json's resolution and buckets")
        if wrong:
            raise SkipSample(BAD_LATENT_SHAPE, "; ".join(wrong))

    def learn(self, seen: LatentShapes) -> None:
        """Fix the unknown array shapes to those of `seen` (a sample that passed check)."""
        for name in ("channels", "factor", "prompt_embeds", "pooled"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(seen, name))


def _seen_shapes(latents: np.ndarray, prompt_embeds: np.ndarray, pooled: np.ndarray,
                 target_size: tuple[int, int]) -> LatentShapes:
    """The shapes one latent sample has; SkipSample(BAD_LATENT_SHAPE) when its latent grid does not tile its crop
    (target_size, px) with one whole VAE factor, e.g. 16x16 latents of a 64x48 crop."""
    channels, height, width = latents.shape
    crop_h, crop_w = target_size
    if min(height, width, crop_h, crop_w) < 1 or crop_h % height or crop_w % width or (
        crop_h // height != crop_w // width
    ):
        raise SkipSample(BAD_LATENT_SHAPE, f"latents {list(latents.shape)} do not tile the {crop_h}x{crop_w} px crop "
                                           "(target_size) with one VAE factor")
    return LatentShapes(channels, crop_h // height, tuple(prompt_embeds.shape), pooled.shape[0])


class LatentDecoder:
    """Read latent samples written by `make latents` (no VAE or text encoder needed).

    `shapes` are what every sample must have (latent_shapes() of the shard set); a sample that differs is skipped
    as BAD_LATENT_SHAPE. With `learn` the shapes still unknown are fixed by the first sample that fits, so one
    reader's batches always stack; without it only the given ones are checked.
    """

    def __init__(self, cfg: DataConfig, shapes: LatentShapes | None = None, *, learn: bool = True):
        self.cfg = cfg
        self.shapes = dataclasses.replace(shapes) if shapes is not None else LatentShapes()  # a copy: it learns
        self.learn = learn

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> Example:
        """The example for one latent sample; `rng` is unused (crops were fixed when latents were made)."""
        meta = decode_json(sample.get("json"))
        if meta is None:
            raise SkipSample("missing_json", "latent sample without json")
        caption = meta.get("caption")
        if not isinstance(caption, str):
            raise SkipSample("bad_latents", "json has no caption string")
        latents, prompt_embeds, pooled = (_load_npy(sample.get(name), name) for name in LATENT_FILES)
        dims = (latents.ndim, prompt_embeds.ndim, pooled.ndim)
        if dims != (3, 2, 1):
            raise SkipSample("bad_latents", f"latents, prompt_embeds, pooled_prompt_embeds have {dims} dimensions, "
                                            "not (3, 2, 1)")
        target_size = _pair(meta, "target_size")
        seen = _seen_shapes(latents, prompt_embeds, pooled, target_size)
        self.shapes.check(seen, target_size)
        if self.learn:
            self.shapes.learn(seen)
        return Example(
            key=sample["__key__"],
            caption=caption,
            original_size=_pair(meta, "original_size"),
            crop_top_left=_pair(meta, "crop_top_left"),
            target_size=target_size,
            flipped=bool(meta.get("flipped", False)),
            latents=latents,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
        )


def make_decoder(cfg: DataConfig, shapes: LatentShapes | None = None) -> Decoder:
    """The decoder for cfg.kind; `shapes` are the latent shapes every latent sample must have (latent_shapes())."""
    return LatentDecoder(cfg, shapes) if cfg.kind == "latents" else RawDecoder(cfg)


def _tar_samples(path: str) -> Iterator[dict[str, Any]]:
    """The samples of one local tar in order, as webdataset groups them: consecutive members sharing the part of
    the file name before its first dot. Stops quietly at a damaged part."""
    sample: dict[str, Any] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, name = os.path.split(member.name)
                key, _, ext = name.partition(".")
                key = os.path.join(folder, key)
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample.setdefault("__key__", key)
                handle = tar.extractfile(member)
                sample[ext] = handle.read() if handle else b""
    except (tarfile.TarError, OSError, EOFError):
        return
    if sample:
        yield sample


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The settings latents.json in `folder` records (see data/latents.py: made_with), or None when there is none.
    Raises ValueError when it is there but not a JSON object (damaged, or not a manifest)."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            made = json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise ValueError(f"{path} cannot be read as JSON ({type(exc).__name__})") from exc
    if not isinstance(made, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return made


def _manifest_shapes(folder: str) -> LatentShapes:
    """The crop sizes latents.json in `folder` allows (its resolution, and its buckets if it made them); nothing
    known when it is absent or unreadable (shards made before manifests, or copied without theirs)."""
    try:
        made = read_manifest(folder)
        resolution, buckets, step = made["resolution"], made.get("buckets", False), made.get("bucket_step", 64)
    except (ValueError, KeyError, TypeError):  # TypeError: no manifest (None)
        return LatentShapes()
    if not (isinstance(resolution, int) and resolution > 0 and isinstance(buckets, bool) and isinstance(step, int)
            and step > 0):
        return LatentShapes()
    sizes = sdxl_buckets(resolution, step) if buckets else [(resolution, resolution)]
    return LatentShapes(target_sizes=frozenset(sizes))


# How many local shards the checks before training read, in order, before concluding: a first shard that is
# damaged or empty (which the stream skips and counts) does not decide for the whole set.
PROBE_SHARDS = 4


def _probe_shards(urls: Sequence[str]) -> list[str]:
    """The first PROBE_SHARDS local files of `urls` (pipe: and remote URLs are not read before training)."""
    return list(itertools.islice((u for u in urls if os.path.isfile(u)), PROBE_SHARDS))


def _reference(urls: Sequence[str], max_samples: int) -> tuple[LatentShapes, Example | None]:
    """(the shard set's latent shapes, the first example that has them), from the first `max_samples` samples of
    the first local shard in `urls` that holds a usable one (of the first PROBE_SHARDS): the crop sizes from
    latents.json beside it, the array shapes those of most of its samples that fit them (the first one's on a
    tie), so one misshapen first sample does not set them. Nothing is known without a local shard (pipe:, URLs)."""
    local = _probe_shards(urls)
    if not local:
        return LatentShapes(), None
    known = _manifest_shapes(os.path.dirname(local[0]))
    for path in local:
        decoder = LatentDecoder(DataConfig(shards=path, kind="latents"), known, learn=False)
        examples: list[tuple[tuple[Any, ...], Example]] = []
        for n, sample in enumerate(_tar_samples(path)):
            if n >= max_samples:
                break
            try:
                example = decoder(sample, random.Random(0))
            except SkipSample:
                continue
            seen = _seen_shapes(example.latents, example.prompt_embeds, example.pooled_prompt_embeds,
                                example.target_size)
            examples.append((seen.arrays, example))
        if examples:
            arrays = Counter(a for a, _ in examples).most_common(1)[0][0]  # equal counts keep first-seen order
            shapes = LatentShapes(*arrays, target_sizes=known.target_sizes)
            return shapes, next(ex for a, ex in examples if a == arrays)
    return known, None


def latent_shapes(urls: Sequence[str], max_samples: int = 16) -> LatentShapes:
    """The shapes every latent sample of the shard set `urls` must have, read once before training (see
    _reference); every reader checks its samples against them, so resumed and parallel readers skip the same ones.
    What is not known is fixed per reader by its first sample that fits."""
    return _reference(urls, max_samples)[0]


def first_latent_example(urls: Sequence[str], max_samples: int = 16) -> Example | None:
    """The first latent sample of the first local shard in `urls` that has the shard set's shapes (of its first
    `max_samples`; see _reference), or None when there is none: a config check reads it to compare the shards'
    shapes with the teacher's."""
    return _reference(urls, max_samples)[1]


def shard_kind(urls: Sequence[str], max_samples: int = 16) -> tuple[str | None, str] | None:
    """("raw" or "latents", sample key) for the first sample that holds an image or the latents file, in the first
    `max_samples` samples of each of the first PROBE_SHARDS local shards in `urls` in turn; (None, first shard's
    path) when none of them holds one (not tars, or tars of something else); None when no shard is a local file.
    A config check compares it with data.kind."""
    local = _probe_shards(urls)
    if not local:
        return None
    for path in local:
        for n, sample in enumerate(_tar_samples(path)):
            if n >= max_samples:
                break
            if LATENT_FILES[0] in sample:
                return "latents", sample["__key__"]
            if _image_bytes(sample) is not None:
                return "raw", sample["__key__"]
    return None, local[0]
