"""`make latents`: precompute VAE latents and both text encoders' embeddings into latent shards.

Each raw input shard becomes one latent shard (same index, `{index:06d}.tar` in the output folder), written to a
temporary name and renamed when complete, so an interrupted run resumes shard by shard: finished shards are
skipped. `latents.json` in the output folder records the settings the shards were made with (preprocessing, caption
keys, storage, seed, dtypes, the raw shard names; the pipeline's path for reference); a rerun with other settings
into a folder that holds finished shards is refused in one line instead of mixing two kinds of latents. A latent
sample is {key}.latents.npy [4, h, w] (one draw from the VAE posterior, seeded by the sample's key, times the VAE's
scaling_factor), {key}.prompt_embeds.npy [77, D], {key}.pooled_prompt_embeds.npy [P] and {key}.json (caption,
original_size, crop_top_left, target_size, flipped). Training reads them with `data.kind=latents`, without the VAE
encoder or the text encoders; `empty_prompt.npz` in the same folder holds the empty caption's embeddings for
caption dropout.

Crops are fixed here: each sample's crop (and flip) comes from an RNG seeded by (seed, key), so reruns give the
same latents. Preprocessing, caption choice and filters follow the same DataConfig keys as raw training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from data.captions import SkipSample
from data.config import DataConfig
from data.decode import MANIFEST_FILE, Example, RawDecoder, read_manifest
from data.stream import Batcher, collate, expand_shards
from distill.conditioning import encode_images, encode_prompts
from distill.files import replace_durably, write_text_atomic

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORAGE = {"float32": np.float32, "float16": np.float16}
# Embeddings of the empty caption, next to the latent shards (the loader reads only *.tar).
EMPTY_PROMPT_FILE = "empty_prompt.npz"
# MANIFEST_FILE, the settings a latent shard set was made with, beside its shards, is defined in data/decode.py:
# the loader reads the crop sizes it allows.
# DataConfig keys that change what a latent sample holds (the others only change how shards are streamed).
_MADE_WITH = ("resolution", "buckets", "bucket_step", "random_crop", "random_flip", "caption_fields", "syncap",
              "alt_text_fields", "min_side", "min_aspect", "max_aspect", "score_filters", "max_pixels")


def empty_prompt_path(shards: str) -> Path:
    """Where the empty caption's embeddings of a latent shard set are: beside its first shard."""
    return Path(expand_shards(shards)[0]).parent / EMPTY_PROMPT_FILE


def native_resolution(pipeline_dir: str) -> int | None:
    """The side in px a pipeline generates at: its U-Net's sample_size times the VAE's downsampling factor (SDXL
    1024, SDXL-Turbo 512, the tiny pipeline 64); None when the folder's configs do not say."""
    try:
        unet = json.loads((Path(pipeline_dir) / "unet" / "config.json").read_text())
        vae = json.loads((Path(pipeline_dir) / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_encoders(pipeline_dir: str, device: str, text_dtype: str = "float32", vae_dtype: str = "float32"):
    """(vae, [tokenizer, tokenizer_2], [text_encoder, text_encoder_2]) of an SDXL pipeline folder, frozen.

    Only these parts are loaded (not the U-Net). SDXL's original VAE overflows in float16: keep vae_dtype at
    float32 (or bfloat16) unless the folder holds the fp16-fix VAE.
    """
    from distill.teachers import load_text_encoders, load_vae

    vae = load_vae(pipeline_dir, device=device, dtype=_DTYPES[vae_dtype])
    tokenizers, encoders = load_text_encoders(pipeline_dir, device=device, dtype=_DTYPES[text_dtype])
    return vae, tokenizers, encoders


def _vae_needs_fp32(pipeline_dir: str) -> bool:
    """Whether the pipeline's vae/config.json sets force_upcast (diffusers' mark of a VAE that overflows in fp16)."""
    try:
        return bool(json.loads((Path(pipeline_dir) / "vae" / "config.json").read_text()).get("force_upcast"))
    except (OSError, ValueError, AttributeError):
        return False  # load_vae reports a missing or damaged folder


def write_empty_prompt(path: str, tokenizers: list, encoders: list) -> None:
    """Save the embeddings of the empty caption (float32 prompt_embeds [77, D], pooled_prompt_embeds [P]).

    A trainer on latent shards needs them for caption dropout when its teacher pipeline guides with the encoding
    of "" rather than all-zero embeddings (force_zeros_for_empty_prompt false).
    """
    prompt_embeds, pooled = encode_prompts(tokenizers, encoders, [""])
    tmp = f"{path}.partial-{os.getpid()}.npz"
    np.savez(
        tmp, prompt_embeds=prompt_embeds[0].float().cpu().numpy(), pooled_prompt_embeds=pooled[0].float().cpu().numpy()
    )
    replace_durably(tmp, path)


def sample_rng(seed: int, key: str) -> random.Random:
    """The crop/flip RNG of one sample when its latents are made."""
    return random.Random(f"{seed}:latents:{key}")


def _raw_examples(url: str, decoder: RawDecoder, seed: int, skips: Counter[str]) -> Iterator[Example]:
    def on_error(exc: Exception) -> bool:
        skips["tar_error"] += 1
        log.warning("skipping a bad part of %s: %s", url, exc)
        return True

    for raw in wds.tarfile_samples([{"url": url}], handler=on_error):
        try:
            yield decoder(raw, sample_rng(seed, raw["__key__"]))
        except SkipSample as skip:
            skips[skip.reason] += 1


def latent_generator(seed: int, key: str) -> torch.Generator:
    """The CPU generator of one sample's VAE posterior draw when its latents are made (seeded by its key)."""
    digest = hashlib.sha256(f"{seed}:posterior:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def encode_batch(items: list, vae, tokenizers, encoders, storage: str, seed: int = 0) -> list[dict[str, Any]]:
    """Latent samples (webdataset dicts) for a list of (position, Example) of one shape. The latents are one
    draw from the VAE posterior per sample, seeded by `seed` and the sample's key (as the pixel path draws one
    per step)."""
    batch = collate(items)
    gens = [latent_generator(seed, ex.key) for _, ex in items]
    latents = encode_images(vae, batch["pixel_values"], sample=True, generator=gens).float().cpu().numpy()
    prompt_embeds, pooled = encode_prompts(tokenizers, encoders, batch["captions"])
    prompt_embeds, pooled = prompt_embeds.float().cpu().numpy(), pooled.float().cpu().numpy()
    dtype = _STORAGE[storage]
    samples = []
    for i, (_, ex) in enumerate(items):
        meta = {
            "caption": ex.caption,
            "original_size": list(ex.original_size),
            "crop_top_left": list(ex.crop_top_left),
            "target_size": list(ex.target_size),
            "flipped": ex.flipped,
            "vae_scaling_factor": float(vae.config.scaling_factor),
        }
        samples.append(
            {
                "__key__": ex.key,
                "latents.npy": latents[i].astype(dtype),
                "prompt_embeds.npy": prompt_embeds[i].astype(dtype),
                "pooled_prompt_embeds.npy": pooled[i].astype(dtype),
                "json": json.dumps(meta).encode("utf-8"),
            }
        )
    return samples


def make_latents(
    pipeline_dir: str,
    shards: str,
    out: str,
    cfg: DataConfig | None = None,
    *,
    batch_size: int = 8,
    device: str | None = None,
    text_dtype: str | None = None,
    vae_dtype: str = "float32",
    storage: str = "float16",
    seed: int = 0,
    part: int = 0,
    num_parts: int = 1,
) -> dict[str, Any]:
    """Encode the raw `shards` into latent shards in `out`; return a summary.

    cfg: preprocessing, caption and filter keys (its `shards` is ignored; default DataConfig()).
    batch_size: images per VAE / text-encoder call. device: default cuda if available, else cpu.
    text_dtype: text-encoder dtype (default float16 on cuda, float32 on cpu). storage: dtype of the arrays
    in the shards (float16 halves the disk; float32 keeps them bit-exact). part / num_parts: this process
    makes the shards with index % num_parts == part (several GPUs share one output folder).
    Summary: {"made", "skipped_existing", "written", "skipped", "reasons", "out"}.
    """
    cfg = replace(cfg or DataConfig(), shards=shards, kind="raw")
    if storage not in _STORAGE:
        raise ValueError(f"storage must be one of {sorted(_STORAGE)}, got {storage!r}")
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"--part {part} --num-parts {num_parts}: num-parts must be at least 1 and part in "
                         "0..num_parts-1")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: at least 1 image per encoder call")
    if vae_dtype == "float16" and _vae_needs_fp32(pipeline_dir):
        raise ValueError(f"--vae-dtype float16: the VAE in {pipeline_dir} says force_upcast (SDXL's original VAE "
                         "overflows in float16, and every latent would be NaN); use float32 or bfloat16, or a "
                         "pipeline with the fp16-fix VAE")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    text_dtype = text_dtype or ("float16" if device.startswith("cuda") else "float32")
    urls = expand_shards(shards)
    out_dir = Path(out).resolve()
    inside = [u for u in urls if not (u.startswith("pipe:") or "://" in u) and Path(u).resolve().parent == out_dir]
    if inside:
        raise ValueError(f"--out {out} holds the raw shards being read ({Path(inside[0]).name}): latent shards "
                         "take the same names, so give another folder")
    os.makedirs(out, exist_ok=True)
    check_manifest(out, made_with(pipeline_dir, cfg, storage, seed, vae_dtype, text_dtype, urls))
    todo = [
        (i, url)
        for i, url in enumerate(urls)
        if i % num_parts == part and not os.path.exists(os.path.join(out, f"{i:06d}.tar"))
    ]
    summary: dict[str, Any] = {"made": 0, "skipped_existing": 0, "written": 0, "skipped": 0, "reasons": {}}
    summary["skipped_existing"] = sum(1 for i in range(len(urls)) if i % num_parts == part) - len(todo)
    skips: Counter[str] = Counter()
    empty_prompt = os.path.join(out, EMPTY_PROMPT_FILE)
    if todo or not os.path.exists(empty_prompt):
        vae, tokenizers, encoders = load_encoders(pipeline_dir, device, text_dtype, vae_dtype)
        if not os.path.exists(empty_prompt):
            write_empty_prompt(empty_prompt, tokenizers, encoders)
        decoder = RawDecoder(cfg)
        for index, url in todo:
            summary["written"] += _make_one(
                index, url, out, decoder, seed, batch_size, skips, (vae, tokenizers, encoders), storage
            )
            summary["made"] += 1
    summary.update(skipped=sum(skips.values()), reasons=dict(sorted(skips.items())), out=os.path.abspath(out))
    return summary


def made_with(pipeline_dir: str, cfg: DataConfig, storage: str, seed: int, vae_dtype: str, text_dtype: str,
              urls: list[str]) -> dict[str, Any]:
    """The settings that decide latent shard contents, as recorded in latents.json. `raw_shards` are the input
    shards' file names in index order (latent shard i is made from raw shard i)."""
    return {"manifest_version": 1, "pipeline": str(Path(pipeline_dir).resolve()), "storage": storage, "seed": seed,
            "vae_dtype": vae_dtype, "text_dtype": text_dtype, **{k: getattr(cfg, k) for k in _MADE_WITH},
            "raw_shards": [u.rstrip("/").rsplit("/", 1)[-1] for u in urls]}


def check_manifest(out: str, settings: dict[str, Any]) -> None:
    """Record `settings` in `out`/latents.json, or raise ValueError (one line) if the latent shards already there
    were made with other ones.

    Compared: every recorded key but the pipeline's path (the folder may have moved; its encoders show in the
    embedding widths, which training checks) and keys one side does not know (a newer or older manifest). The raw
    shard list may grow or shrink at its end, keeping each index's shard; the manifest then records the longer
    list. A manifest beside no finished shard (a run stopped before its first) is simply replaced. Shards without
    a manifest (made before manifests existed) are made with the new settings unchecked, with a warning, and get
    none. Parts started at the same moment with different settings are not told apart."""
    path = Path(out) / MANIFEST_FILE
    finished = any(Path(out).glob("[0-9]*.tar"))
    if finished and not path.is_file():
        log.warning("%s holds latent shards made before latents.json existed: their settings are not checked", out)
        return
    if finished:
        try:
            recorded = read_manifest(out)
        except ValueError:
            recorded = None
        if recorded is None:
            raise ValueError(f"{path} is not a latents manifest: remove it, or give another --out")
        changed = [f"{k} {recorded[k]!r} -> {v!r}" for k, v in settings.items()
                   if k not in ("pipeline", "raw_shards") and k in recorded and recorded[k] != v]
        old, new = list(recorded.get("raw_shards") or []), settings["raw_shards"]
        common = min(len(old), len(new))
        if old[:common] != new[:common]:
            i = next(i for i in range(common) if old[i] != new[i])
            changed.append(f"raw shard {i} {old[i]!r} -> {new[i]!r}")
        if changed:
            raise ValueError(f"--out {out} holds latents made with other settings ({'; '.join(changed)}): give "
                             "another --out, or the settings it was made with to finish it")
        if len(new) <= len(old):
            return
        settings = {**recorded, "raw_shards": new}
    write_text_atomic(path, json.dumps(settings, indent=2) + "\n")


def _make_one(index, url, out, decoder, seed, batch_size, skips, models, storage) -> int:
    """Write the latent shard of one raw shard; return its number of samples."""
    final = Path(out) / f"{index:06d}.tar"
    partial = final.with_suffix(f".tar.partial-{os.getpid()}")
    batcher, written = Batcher(batch_size), 0
    with torch.inference_mode(), wds.TarWriter(str(partial), mtime=0) as writer:

        def flush(items: list) -> None:
            nonlocal written
            for sample in encode_batch(items, *models, storage, seed):
                writer.write(sample)
                written += 1

        for n, example in enumerate(_raw_examples(url, decoder, seed, skips)):
            full = batcher.add((0, 0, n), example)
            if full is not None:
                flush(full)
        for items in list(batcher.buckets.values()):  # partly filled buckets at the shard's end
            flush(items)
    replace_durably(partial, final)  # atomic: a shard either exists complete or not at all, crash or not
    log.info("latent shard %s: %d samples", final, written)
    return written
