"""Generate images with fixed seeds from an exported pipeline folder, a training checkpoint or a teacher.

Unset sampler settings take the source's defaults (distill/sampling.py: an exported folder's koala_sampler.json, a
checkpoint's run, a teacher folder's own TEACHER_DEFAULTS, else the family's SAMPLER_DEFAULTS).
Writes <out>/0000.png..., grid.png, prompts.json, sample.json; prints a JSON line.

Usage: python scripts/sample.py --source DIR (--prompt TEXT ... | --prompts smoke|eval|FILE) [--out DIR] ...
"""

from __future__ import annotations

import json
import sys

from distill.files import out_folder_problem
from distill.sampling import (
    DTYPES,
    SAMPLER_DEFAULTS,
    TIMESTEP_SPACINGS,
    SettingsError,
    SourceError,
    check_settings,
    read_prompts,
    sample,
)
from scripts import ArgumentParser, cli


def main(argv: list[str] | None = None) -> dict:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="pipeline folder or checkpoint folder (meta.json + student/)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="prompt set (smoke, eval) or a text file, one per line")
    p.add_argument("--max-prompts", type=int, default=None, help="keep the first N prompts of --prompts")
    p.add_argument("--out", default="outputs/samples", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (family default)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (family default)")
    p.add_argument("--height", type=int, default=None, help="px (family default)")
    p.add_argument("--width", type=int, default=None, help="px (family default)")
    p.add_argument("--spacing", choices=TIMESTEP_SPACINGS, default=None,
                   help="timestep spacing (default: the folder's scheduler; a checkpoint's family)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--family", choices=sorted(SAMPLER_DEFAULTS), default=None,
                   help="defaults of this family (a teacher folder: the teacher's own settings)")
    p.add_argument("--unet-file", default=None,
                   help="U-Net safetensors replacing a teacher folder's (SDXL-Lightning: sdxl_lightning_4step_unet)")
    p.add_argument("--no-ema", action="store_true", help="use a checkpoint's student/ even if student_ema/ exists")
    p.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--grid-cols", type=int, default=4)
    args = p.parse_args(argv)
    try:
        check_settings(steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width,
                       batch_size=args.batch_size)
    except SettingsError as exc:
        p.error(str(exc))
    if args.grid_cols < 1:
        p.error(f"--grid-cols must be at least 1, not {args.grid_cols}")
    if problem := out_folder_problem("--out", args.out):
        p.error(problem)

    if args.max_prompts is not None and not args.prompts:
        p.error("--max-prompts keeps the first N prompts of --prompts: give --prompts smoke|eval|FILE with it")
    prompts = list(args.prompt)
    if args.prompts:
        prompts += read_prompts(args.prompts, args.max_prompts)
    if not prompts:
        p.error("give --prompt TEXT or --prompts smoke|eval|FILE")
    summary = sample(
        args.source, prompts, args.out, seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
        height=args.height, width=args.width, timestep_spacing=args.spacing, negative_prompt=args.negative_prompt,
        family=args.family, use_ema=not args.no_ema, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, grid_cols=args.grid_cols, unet_file=args.unet_file,
    )
    print(json.dumps(summary))
    return summary


def entry(argv: list[str] | None = None) -> int:
    """main() with one-line errors for bad paths and arguments (exit code 2)."""
    return cli(main, argv, errors=(SourceError, SettingsError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(entry())
