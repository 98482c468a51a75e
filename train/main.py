"""Entry point: `accelerate launch train/main.py +experiment=koala_lightning_1b [key=value ...]`.

Composes the Hydra config from conf/, checks it (one line on error, before any model loads), trains, and prints
one JSON summary line on the main process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python train/main.py` from anywhere

from train.config import ConfigError, load_config, validate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run training with Hydra overrides from argv; return the process exit code."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(overrides)
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from train.loop import NonFiniteError, setup, train

    run = setup(cfg)
    try:
        summary = train(run)
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if run.accelerator.is_main_process:
        wandb_dir = Path(cfg.train.output_dir) / "wandb"
        summary["wandb_dir"] = str(wandb_dir) if wandb_dir.exists() else None
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
