"""Precompute VAE latents and text embeddings of raw shards with a teacher pipeline, into latent shards.

Usage: python scripts/make_latents.py --pipeline DIR --shards PATTERN --out DIR [--batch-size N]
       [--resolution PX] [--buckets] [--random-crop] [--syncap] [--storage float16|float32]
Resumable: finished output shards are skipped. Ends with one JSON line (made, written, skipped, out,
resolution, ...).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from data.config import DataConfig
from data.latents import make_latents, native_resolution
from distill.files import out_folder_problem
from distill.teachers import pipeline_folder_problem
from scripts import ArgumentParser, cli


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="SDXL pipeline folder (VAE, tokenizers, text encoders)")
    parser.add_argument("--shards", required=True, help="raw shards: brace pattern, folder, glob or pipe:")
    parser.add_argument("--out", required=True, help="folder for the latent shards")
    parser.add_argument("--batch-size", type=int, default=8, help="images per encoder call")
    parser.add_argument("--resolution", type=int, default=None,
                        help="crop side in px (bucket area with --buckets); default: the pipeline's own (its U-Net's "
                             "sample_size x the VAE's factor: 1024 for SDXL, 512 for SDXL-Turbo)")
    parser.add_argument("--buckets", action="store_true", help="SDXL aspect buckets instead of square crops")
    parser.add_argument("--random-crop", action="store_true", help="seeded random crops (default: center)")
    parser.add_argument("--syncap", action="store_true", help="alt text + generated caption (KOALA synCap)")
    parser.add_argument("--storage", choices=["float16", "float32"], default="float16", help="array dtype on disk")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--vae-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    parser.add_argument("--part", type=int, default=0, help="make shards with index %% num-parts == part")
    parser.add_argument("--num-parts", type=int, default=1, help="processes sharing the work")
    args = parser.parse_args(argv)
    if problem := out_folder_problem("--out", args.out):
        parser.error(problem)
    if not Path(args.pipeline).is_dir():
        parser.error(f"--pipeline {args.pipeline} is not a folder (a diffusers SDXL pipeline: vae/, text encoders)")
    if problem := pipeline_folder_problem(args.pipeline, unet=False, index=False, scheduler=False):
        parser.error(f"--pipeline {args.pipeline} {problem}")
    if args.device is not None:
        from distill.sampling import SettingsError, pick_device

        try:
            pick_device(args.device)
        except SettingsError as exc:
            parser.error(f"--device: {exc}")
    resolution = args.resolution or native_resolution(args.pipeline)
    if resolution is None:
        parser.error(f"--resolution: {args.pipeline} has no unet/ and vae/ configs to take it from; give it")
    if resolution < 8 or resolution % 8:
        parser.error(f"--resolution {resolution} must be a positive multiple of 8 px (the VAE's factor)")
    from data.decode import shard_kind
    from data.stream import expand_shards

    kind = shard_kind(expand_shards(args.shards))
    if kind and kind[0] != "raw":
        held = "latents already (make latents' output)" if kind[0] else "no image sample in its first 16"
        parser.error(f"--shards {args.shards}: {kind[1] if kind[0] is None else 'the first shard'} holds {held}; "
                     "give the raw image shards")
    cfg = DataConfig(
        shards=args.shards,
        resolution=resolution,
        buckets=args.buckets,
        random_crop=args.random_crop,
        random_flip=False,
        syncap=args.syncap,
    )
    summary = make_latents(
        args.pipeline,
        args.shards,
        args.out,
        cfg,
        batch_size=args.batch_size,
        device=args.device,
        vae_dtype=args.vae_dtype,
        storage=args.storage,
        seed=args.seed,
        part=args.part,
        num_parts=args.num_parts,
    )
    print(json.dumps({**summary, "resolution": resolution}), flush=True)
    if summary.get("made") and not summary.get("written"):
        print(f"error: no sample could be encoded (skipped: {summary.get('reasons')}); the latent shards are empty",
              file=sys.stderr)
        return 2
    return 0


def entry(argv: list[str] | None = None) -> int:
    """main() with one-line errors for bad paths and arguments (exit code 2)."""
    return cli(main, argv, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(entry())
