"""Inference benchmark (the KOALA model card's table): U-Net latency with CFG, VAE decode, one full image.

Prints one line per measurement, writes <out>/bench_infer.json and bench_infer.md, and ends with a JSON line.
Without a GPU (or with --tiny) the tiny shapes run at 64 px so the code path is exercised.

    python scripts/bench_infer.py                                  # SDXL, KOALA-1B, KOALA-700M, 1024 px, 25 & 10 steps
    python scripts/bench_infer.py --fast                           # every speed switch on (see --help)
    python scripts/bench_infer.py --resolution 512                 # Turbo shapes
    python scripts/bench_infer.py --unet koala_700m=/path/to/koala-700m --vae /path/to/sdxl-vae-fp16-fix
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from distill.files import out_folder_problem
from distill.inference_bench import MODELS, BenchConfig, SpeedOptions, markdown_table, run_bench
from distill.sampling import SettingsError, pick_device
from scripts import ArgumentParser, cli, write_results
from train.config import vae_folder_problem

COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")

# --fast: the switches meant to reach a 10-step 1024 px KOALA-700M image in <= 0.15 s on an H100/H200.
FAST = dict(dtype="fp16", channels_last=True, fuse_qkv=True, compile="full", compile_mode="max-autotune",
            cuda_graphs=True, inductor_tuning=True)


def parse(argv: list[str] | None = None) -> tuple[BenchConfig, Path]:
    """The benchmark config and the output folder from command-line arguments."""
    p = ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--resolution", type=int, default=None, help="px (default 1024; 64 with --tiny)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="step counts (default 25 10; 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs (default 2; 1 with --tiny)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs, median reported (default 5; 2 tiny)")
    p.add_argument("--no-vae", action="store_true", help="skip the VAE decode row")
    p.add_argument("--image-model", default="koala_700m", help="model of the full-image row ('none' to skip)")
    p.add_argument("--image-steps", type=int, default=None, help="steps of the full-image row (10; 2 with --tiny)")
    p.add_argument("--unet", action="append", default=[], metavar="MODEL=DIR",
                   help="real U-Net (or pipeline) folder for a model; repeatable")
    p.add_argument("--vae", default=None, help="real VAE (or pipeline) folder (fp16: the fp16-fix VAE)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (default when no GPU is present)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="outputs/bench_infer", help="folder for bench_infer.json/.md")
    s = p.add_argument_group("speed switches")
    s.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default fp16 (fp32 on CPU)")
    s.add_argument("--channels-last", action="store_true")
    s.add_argument("--fuse-qkv", action="store_true", help="diffusers fuse_qkv_projections")
    s.add_argument("--compile", choices=["none", "full", "regional"], default="none")
    s.add_argument("--compile-mode", default="default",
                   help="torch.compile mode: default, max-autotune, max-autotune-no-cudagraphs, reduce-overhead")
    s.add_argument("--compile-backend", default="inductor", help="inductor, or eager/aot_eager to test tracing")
    s.add_argument("--fullgraph", action="store_true")
    s.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs through torch.compile")
    s.add_argument("--inductor-tuning", action="store_true",
                   help="conv 1x1 as matmul, coordinate-descent tuning, no epilogue fusion")
    s.add_argument("--sdpa", choices=["auto", "flash", "efficient", "cudnn", "math"], default="auto")
    s.add_argument("--no-compile-vae", action="store_true", help="leave the VAE decoder eager")
    s.add_argument("--fast", action="store_true", help="fp16 + channels_last + fused QKV + compile max-autotune "
                                                        "+ CUDA graphs + inductor tuning")
    a = p.parse_args(argv)
    for flag, values, least in (("--steps", a.steps or [], 1), ("--warmup", [a.warmup or 0], 0),
                                ("--repeats", [1 if a.repeats is None else a.repeats], 1),
                                ("--image-steps", [1 if a.image_steps is None else a.image_steps], 1)):
        if any(v < least for v in values):
            p.error(f"{flag} must be at least {least}")
    if a.resolution is not None and (a.resolution < 32 or a.resolution % 32):
        p.error(f"--resolution {a.resolution}: a multiple of 32 px (the VAE downsamples 8x, the U-Net 4x more)")

    gpu = torch.cuda.is_available() and a.device != "cpu"
    tiny = a.tiny or not gpu
    speed = dict(dtype=a.dtype or ("fp16" if gpu else "fp32"), channels_last=a.channels_last,
                 fuse_qkv=a.fuse_qkv, compile=a.compile, compile_mode=a.compile_mode,
                 compile_backend=a.compile_backend, fullgraph=a.fullgraph, cuda_graphs=a.cuda_graphs,
                 inductor_tuning=a.inductor_tuning, sdpa=a.sdpa, compile_vae=not a.no_compile_vae)
    if a.fast:
        speed.update(FAST, dtype=speed["dtype"])  # fp16 on a GPU unless --dtype says otherwise; fp32 on the CPU
    if any("=" not in item for item in a.unet):
        p.error(f"--unet {next(i for i in a.unet if '=' not in i)}: give MODEL=DIR, e.g. --unet koala_700m=/models/k7")
    if a.image_model != "none" and a.image_model not in MODELS:
        p.error(f"--image-model {a.image_model}: one of {', '.join(MODELS)} or none")
    if a.compile_mode not in COMPILE_MODES:
        p.error(f"--compile-mode {a.compile_mode}: one of {', '.join(COMPILE_MODES)}")
    if a.compile_backend not in ("inductor", "eager", "aot_eager"):
        p.error(f"--compile-backend {a.compile_backend}: inductor, eager or aot_eager")
    if problem := out_folder_problem("--out", a.out):
        p.error(problem)
    try:
        pick_device(a.device)
    except SettingsError as exc:
        p.error(f"--device: {exc}")
    unet_paths = dict(item.split("=", 1) for item in a.unet)
    bad = sorted(set(unet_paths) - set(MODELS))
    if bad:
        p.error(f"--unet names unknown models {bad}; one of {list(MODELS)}")
    for flag, path in [*((f"--unet {m}=", d) for m, d in unet_paths.items()), ("--vae ", a.vae)]:
        if path is not None and not Path(path).is_dir():
            p.error(f"{flag}{path} is not a local folder (nothing is downloaded)")
    if a.vae is not None:
        vae_folder = Path(a.vae) / "vae" if (Path(a.vae) / "vae").is_dir() else Path(a.vae)
        if problem := vae_folder_problem(vae_folder):
            p.error(f"--vae {a.vae} {problem}")
    return BenchConfig(
        models=a.models, resolution=a.resolution or (64 if tiny else 1024),
        steps=a.steps or ([2] if tiny else [25, 10]), warmup=a.warmup if a.warmup is not None else (1 if tiny else 2),
        repeats=a.repeats or (2 if tiny else 5), vae=not a.no_vae,
        image_model=None if a.image_model == "none" else a.image_model,
        image_steps=a.image_steps or (2 if tiny else 10), unet_paths=unet_paths,
        vae_path=a.vae, tiny=tiny, device=a.device, speed=SpeedOptions(**speed),
    ), Path(a.out)


def save(result: dict, out: Path) -> None:
    """bench_infer.json and .md in `out`; bench_infer.partial.json/.md while rows are still being measured."""
    write_results(out, "bench_infer", json.dumps(result, indent=2), markdown_table(result),
                  partial=bool(result.get("partial")))


def main(argv: list[str] | None = None) -> dict:
    cfg, out = parse(argv)
    result = run_bench(cfg, on_result=lambda partial: save(partial, out))  # the rows so far survive a time limit
    save(result, out)
    print(markdown_table(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(cli(main))
