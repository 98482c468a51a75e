"""Export a training checkpoint's student as a complete SDXL pipeline folder (`make export`).

The trainer exports the last step; this exports any checkpoint, e.g. the one with the best eval scores. The folder
loads with `StableDiffusionXLPipeline.from_pretrained(folder)` and carries the teacher family's sampler settings.
Prints one JSON line {"export_dir", "checkpoint", "step", "weights", "dtype", "teacher", "unet_params"}; a bad
argument is one line on stderr and exit code 2, a write failure (disk full) one line and exit code 5.

Usage: python scripts/export.py --checkpoint runs/koala_1b/checkpoints/step_000100000 --out exports/k1b_100k
       [--weights auto|ema|live] [--dtype fp32|fp16|bf16] [--teacher-path /models/sdxl-base]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.teachers import TeacherError  # noqa: E402
from scripts import ArgumentParser  # noqa: E402
from train.checkpoint import export_failed, write_error_reason  # noqa: E402
from train.export import ExportError, export_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder: <run>/checkpoints/step_N")
    p.add_argument("--out", required=True, help="the pipeline folder to write (replaced atomically if it exists)")
    p.add_argument("--weights", choices=["auto", "ema", "live"], default="auto",
                   help="auto: the EMA average when the checkpoint has one, as the trainer's export")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="U-Net weights as saved: fp32 (as trained) or half the disk")
    p.add_argument("--teacher-path", default=None,
                   help="the teacher's diffusers folder (default: the one the checkpoint records)")
    p.add_argument("--vae-path", default=None,
                   help="the VAE folder to copy (default: the run's teacher.vae_path, else the teacher's vae/)")
    args = p.parse_args(argv)
    try:
        summary = export_checkpoint(args.checkpoint, args.out, weights=args.weights, teacher_path=args.teacher_path,
                                    dtype=args.dtype, vae_path=args.vae_path)
    except (ExportError, TeacherError) as exc:  # TeacherError: the run's saved teacher settings do not load
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        reason = write_error_reason(exc)
        if reason is None:
            raise
        print(f"error: {export_failed(None, args.out, reason)}", file=sys.stderr)
        return 5
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
