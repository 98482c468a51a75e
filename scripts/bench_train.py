"""Training-step benchmark: the trainer's own step (train.loop.setup + train_one_step) at real shapes, random weights.

Prints progress on stderr and one JSON line on stdout; writes <out>/bench_train_<name>.json and .md. Without a GPU
(or with --tiny) the tiny teacher and student run at 64 px so the code path is exercised.

    python scripts/bench_train.py                                        # KOALA-1B, batch 32, fast profile
    python scripts/bench_train.py --compare-plain                        # plain first, same process, speed-up
    python scripts/bench_train.py --compare-plain --micro-batch 16 --plain-set train.gradient_checkpointing=true
    python scripts/bench_train.py --student koala_700m --profile lowmem  # the 24 GB profile
    python scripts/bench_train.py --set train.checkpointing_blocks=[UP-1,DW-2] --set train.teacher_fp8=true
    python scripts/bench_train.py --compare-plain --dry-run              # check a command on the CPU first
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from scripts import ArgumentParser, write_results
from train.bench import PEAK_TFLOPS, PROFILES, BenchConfig, markdown, run_bench


def parse(argv: list[str] | None = None) -> tuple[BenchConfig, Path, str | None]:
    """The benchmark config, the output folder and the result files' name from command-line arguments."""
    p = ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--student", choices=["koala_1b", "koala_700m"], default="koala_1b")
    p.add_argument("--profile", choices=sorted(PROFILES), default="fast",
                   help="plain: every switch off; fast: every switch on; lowmem: conf/train/lowmem.yaml")
    p.add_argument("--batch", type=int, default=None, help="images per optimizer step (default 32; 4 with --tiny)")
    p.add_argument("--micro-batch", type=int, default=None, help="images per forward (default: --batch)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 5; 3 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (default when no GPU is present)")
    p.add_argument("--compare-plain", action="store_true", help="measure the plain profile first, same process")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="MFU denominator, TFLOP/s")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Hydra override (repeatable)")
    p.add_argument("--plain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="Hydra override of the plain measurement only (e.g. train.gradient_checkpointing=true)")
    p.add_argument("--fp8-error", action="store_true", help="also measure the FP8 teacher's output error")
    p.add_argument("--data", default=None, help="folder of the benchmark's synthetic latent shards (made if missing; "
                   "a folder of other shards is refused, never overwritten)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default 4 on CUDA, 0 on CPU)")
    p.add_argument("--out", default="outputs/bench_train", help="folder for bench_train_<name>.json/.md")
    p.add_argument("--name", default=None, help="result files' name (default <profile>_<student>_b<batch>)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the command without a GPU: compose and validate every configuration it would "
                        "measure (real shapes unless --tiny) and print them as one JSON line; builds no model, "
                        "makes only the synthetic shards (when missing)")
    a = p.parse_args(argv)
    for flag, value, low in (("--batch", a.batch, 1), ("--micro-batch", a.micro_batch, 1), ("--steps", a.steps, 1),
                             ("--warmup", a.warmup, 0), ("--workers", a.workers, 0)):
        if value is not None and value < low:  # 0 fell back to the default; -1 failed after the models loaded
            p.error(f"{flag} must be at least {low}, not {value}")
    if not a.peak_tflops > 0:
        p.error(f"--peak-tflops must be positive, not {a.peak_tflops}")
    tiny = a.tiny or (not torch.cuda.is_available() and not a.dry_run)
    warmup = a.warmup if a.warmup is not None else (1 if tiny else 2)
    bc = BenchConfig(student=a.student, profile=a.profile, batch=a.batch, micro_batch=a.micro_batch,
                     steps=a.steps if a.steps is not None else (3 if tiny else 5), warmup=warmup,
                     tiny=tiny, compare_plain=a.compare_plain, peak_tflops=a.peak_tflops, overrides=a.set,
                     plain_overrides=a.plain_set, data_dir=a.data, workers=a.workers, fp8_error=a.fp8_error,
                     dry_run=a.dry_run)
    return bc, Path(a.out), a.name


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; a bad option or override is one `config error:` line on stderr and exit code 2."""
    from train.config import ConfigError

    bc, out, name = parse(argv)

    # the files' name comes from the command, not the result: a partial result (the plain measurement alone, or
    # its out-of-memory record) is named like the final one, with .partial
    batch = bc.batch or (4 if bc.tiny else 32)  # run_bench's default
    stem = "bench_train_" + (name or f"{bc.profile}_{'tiny' if bc.tiny else bc.student}_b{batch}")

    def save(result: dict) -> None:
        write_results(out, stem, json.dumps(result, indent=2), markdown(result), partial=bool(result.get("partial")))

    try:
        result = run_bench(bc, on_result=save)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if bc.dry_run:
        print(json.dumps(result), flush=True)
        return result
    save(result)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
