"""Every key of the data stream, with its unit and default.

`DataConfig` is an OmegaConf structured config (only str/int/float/bool, Optional, list and nested
dataclasses), so the Hydra schema can import it unchanged. Defaults suit a LAION-POP-like raw stream at
1024 px.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

# "field>=value" etc.; the field is a key of the sample's json metadata.
_SCORE_FILTER = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass
class DataConfig:
    """The training stream: where the shards are, how samples are chosen, filtered and preprocessed."""

    # Shard source: a brace pattern ("data/{000000..000099}.tar"), a local file, directory (all *.tar in it)
    # or glob, or a "pipe:" command that writes one tar to stdout ("pipe:aws s3 cp s3://b/{0..9}.tar -").
    # Several sources can be joined with "::".
    shards: str = ""
    # "raw" (images + json captions, decoded and preprocessed here) or "latents" (shards from `make latents`:
    # VAE latents + text embeddings, so training needs neither the VAE encoder nor the text encoders).
    kind: str = "raw"
    # Target side in px: a square crop of resolution x resolution, or with buckets an area of about
    # resolution^2 px. Ignored for kind="latents" (the shapes are fixed when the latents are made). In a training
    # config it follows teacher.resolution (conf/data/laion_pop.yaml), and the two must agree (train/config.py).
    resolution: int = 1024
    # True: every (rank, worker) draws shards with replacement from its own seeded RNG (multi-node runs; no
    # reader can starve). False: each epoch the shard list is shuffled (same order on every rank) and split
    # exactly by (rank, worker), so every sample is seen once per epoch; needs shards >= ranks x workers.
    resampled: bool = False
    # Shuffle buffer, in samples. The buffer mixes the raw (undecoded) samples of one shard group.
    shuffle_buffer: int = 1000
    # Shards per shuffle group: a reader reads a group's shards interleaved at random, mixes them through the
    # shuffle buffer and flushes the buffer at the group's end, so a resume re-reads at most one group.
    shuffle_group_shards: int = 4
    # DataLoader worker processes per rank (0: read in the training process); batches are made in the workers.
    num_workers: int = 4
    # Batches each worker keeps ready (torch DataLoader prefetch_factor; ignored with num_workers=0).
    prefetch_factor: int = 2
    # Page-lock batches for faster host-to-GPU copies (only where CUDA is available).
    pin_memory: bool = True

    # Caption: the first non-empty json field in this order; "txt" names the sample's .txt file.
    caption_fields: list[str] = field(default_factory=lambda: ["cogvlm_caption", "llava_caption", "caption", "txt"])
    # synCap (KOALA): caption = original alt text + " " + generated caption (the first of caption_fields that
    # is not an alt-text field). Either part alone is used when the other is missing.
    syncap: bool = False
    # Where the original alt text is, in order ("txt" = the .txt file). LAION-POP's column is "alt_txt";
    # img2dataset stores the column it was given as --caption_col under "caption".
    alt_text_fields: list[str] = field(default_factory=lambda: ["alt_txt", "alt_text", "caption"])

    # Filters on the original image (before any resize). 0 / None switch a filter off.
    min_side: int = 0  # px, shorter side
    min_aspect: float | None = None  # width / height lower bound
    max_aspect: float | None = None  # width / height upper bound
    # Metadata thresholds, "field>=value" / "field<=value" (also > and <) on json fields, e.g.
    # ["aesthetic_score>=5.0", "pwatermark<=0.5"]. A sample without the field (or non-numeric) is skipped.
    score_filters: list[str] = field(default_factory=list)
    # Width x height limit in px: larger images are skipped before their pixels are decoded.
    max_pixels: int = 50_000_000

    # SDXL preprocessing: resize the shorter side (or cover the bucket), crop, optionally flip.
    random_crop: bool = True  # False: center crop
    random_flip: bool = False  # horizontal flip with p=0.5 (crop_top_left is then given in the flipped image)
    # Aspect-ratio buckets: SDXL-style sizes of about resolution^2 px (sides multiples of bucket_step, from
    # resolution/2 to 2*resolution); a batch holds one bucket's shape.
    buckets: bool = False
    bucket_step: int = 64  # px; 64 keeps latent sides divisible by 8 (three U-Net downsamplings)


def to_data_config(cfg: Any) -> DataConfig:
    """Return a plain DataConfig from a DataConfig, an OmegaConf DictConfig or any object with its keys."""
    if isinstance(cfg, DataConfig):
        return cfg
    values = {}
    for f in fields(DataConfig):
        if hasattr(cfg, f.name):
            value = getattr(cfg, f.name)
            values[f.name] = list(value) if f.name in _LIST_KEYS and value is not None else value
    return DataConfig(**values)


_LIST_KEYS = {"caption_fields", "alt_text_fields", "score_filters"}


def parse_score_filters(filters: list[str]) -> list[tuple[str, str, float]]:
    """Parse ["field>=1.5", ...] into (field, op, value) triples; raise ValueError on a malformed entry."""
    parsed = []
    for text in filters:
        m = _SCORE_FILTER.match(text)
        if not m:
            raise ValueError(f"data.score_filters entry {text!r} is not 'field>=value' (or <=, >, <)")
        parsed.append((m.group(1), m.group(2), float(m.group(3))))
    return parsed


def validate_config(cfg: DataConfig) -> None:
    """Raise ValueError with one clear line for a config the stream cannot run with."""
    if cfg.kind not in ("raw", "latents"):
        raise ValueError(f"data.kind must be 'raw' or 'latents', got {cfg.kind!r}")
    if not cfg.shards:
        raise ValueError("data.shards is empty: give a brace pattern, path, directory or pipe: command")
    for name in ("resolution", "shuffle_buffer", "shuffle_group_shards", "bucket_step", "max_pixels"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"data.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
    if cfg.min_aspect is not None and cfg.max_aspect is not None and cfg.min_aspect > cfg.max_aspect:
        raise ValueError(f"data.min_aspect {cfg.min_aspect} > data.max_aspect {cfg.max_aspect}")
    if not cfg.caption_fields and not cfg.syncap:
        raise ValueError("data.caption_fields is empty: name at least one caption field (or 'txt')")
    parse_score_filters(cfg.score_filters)
