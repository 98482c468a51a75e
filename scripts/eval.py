"""Evaluate a student on a prompt set (and, with teacher=..., against its teacher on the same seeds).

Configuration: conf/eval/default.yaml, overridden by key=value arguments (an `eval.` prefix is accepted), e.g.
    python scripts/eval.py student=runs/x/checkpoints/step_000001000 teacher=auto prompts=eval
Writes report.json, report.md, images and grids to out_dir, logs to W&B with wandb=true, prints a JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.evaluation import EvalConfig, run_eval
from distill.files import out_folder_problem
from distill.metrics import Hpsv2Scorer
from distill.sampling import SettingsError, SourceError, pick_device, read_prompts
from scripts import cli

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "eval" / "default.yaml"
HPS_ARCH = "ViT-H-14"  # HPSv2 fine-tunes OpenCLIP ViT-H/14
HPS_HINT = ("set eval.hpsv2_checkpoint=/path/HPS_v2.1_compressed.pt (from the HPSv2 release) and "
            "pip install open_clip_torch; the checkpoint holds the whole ViT-H-14, nothing else is downloaded")


def load_config(argv: list[str], path: Path = DEFAULT_CONFIG) -> EvalConfig:
    """The YAML defaults merged with key=value overrides, checked against EvalConfig (unknown keys fail)."""
    for arg in argv:
        if "=" not in arg:
            raise SettingsError(f"{arg!r} has no '=': settings are key=value, e.g. student=runs/x/export")
    overrides = OmegaConf.from_dotlist([a.removeprefix("eval.") for a in argv])
    merged = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(path), overrides)
    return EvalConfig(**OmegaConf.to_container(merged))  # type: ignore[arg-type]


def load_hpsv2(checkpoint: str | None, device: torch.device) -> tuple[Hpsv2Scorer | None, str | None]:
    """The HPSv2 scorer when the checkpoint exists and open_clip imports, else (None, one line how to get it)."""
    if not checkpoint:
        return None, "HPSv2 skipped: " + HPS_HINT
    if not Path(checkpoint).is_file():
        return None, f"HPSv2 skipped: eval.hpsv2_checkpoint={checkpoint} does not exist: " + HPS_HINT
    try:
        import open_clip
    except ImportError:
        return None, ("HPSv2 skipped: open_clip is not installed: pip install open_clip_torch (the checkpoint "
                      "holds the whole ViT-H-14, nothing else is downloaded)")
    model, _, preprocess = open_clip.create_model_and_transforms(HPS_ARCH, pretrained=None, device=device)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        # The released checkpoints were saved from a DDP-wrapped model; strip its "module." prefix where present.
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model.load_state_dict(state)
    except Exception as exc:  # damaged, or another model's: the other metrics still run, as for a CLIP folder
        from distill.files import error_summary

        return None, f"HPSv2 skipped: eval.hpsv2_checkpoint={checkpoint} cannot be loaded ({error_summary(exc)})"
    return Hpsv2Scorer(model, preprocess, open_clip.get_tokenizer(HPS_ARCH), device=device), None


def log_wandb(report: dict[str, Any], cfg: EvalConfig) -> None:
    """Log the means and the grids of a report as one W&B step (honours WANDB_MODE)."""
    import wandb

    # the run's files go beside the report, not into ./wandb of whatever folder eval was started from
    run = wandb.init(project=cfg.wandb_project, job_type="eval", config=report["config"], dir=cfg.out_dir)
    metrics: dict[str, Any] = {f"eval/agreement/{k}": v for k, v in report.get("agreement", {}).items()}
    for role in ("student", "teacher"):
        for key in ("images_per_s", "clip_score", "hpsv2"):
            if key in report.get(role, {}):
                metrics[f"eval/{role}/{key}"] = report[role][key]
    for name, files in report["files"].items():
        metrics[f"eval/grid/{name}"] = wandb.Image(files["grid"])
    run.log(metrics)
    run.finish()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    if not cfg.student:
        raise SettingsError("student=... is required (an exported pipeline folder or a checkpoint folder); "
                            "--help lists the keys")
    if not cfg.out_dir:
        raise SettingsError("out_dir is empty: give the folder for the report and images")
    if problem := out_folder_problem("out_dir", cfg.out_dir):
        raise SettingsError(problem)
    read_prompts(cfg.prompts, cfg.max_prompts)  # a wrong prompt set or count is said before any model loads
    hps, note = load_hpsv2(cfg.hpsv2_checkpoint, pick_device(cfg.device))
    report = run_eval(cfg, scorers=[hps] if hps else [], notes=[note] if note else [])
    for line in report["notes"]:
        print(line)
    if cfg.wandb:
        log_wandb(report, cfg)
    summary = {k: report.get(k) for k in ("prompts", "settings", "agreement")}
    summary.update(out=cfg.out_dir, student=report["student"], teacher=report.get("teacher"))
    print(json.dumps(summary))
    return report


def entry(argv: list[str] | None = None) -> int:
    """main() with one-line errors for bad paths and arguments (exit code 2)."""
    return cli(main, argv, errors=(SourceError, SettingsError, FileNotFoundError, OmegaConfBaseException),
               help_text=f"{__doc__}\nKeys and defaults ({DEFAULT_CONFIG}):\n{DEFAULT_CONFIG.read_text()}")


if __name__ == "__main__":
    sys.exit(entry())
