"""Estimate one GPU's peak training memory for a config, on the CPU in under a minute, before renting the GPU.

Prints one JSON line (GiB; see train/memory.py for what is and is not modelled). Arguments are Hydra overrides,
as for train/main.py; paths need not exist (the shapes come from the shipped U-Net configs).

    python scripts/estimate_memory.py +experiment=koala_1b train.micro_batch_size=16
    python scripts/estimate_memory.py +experiment=koala_700m_lowmem
    python scripts/estimate_memory.py --fit 80 +experiment=koala_1b               # largest micro-batch for 80 GiB
    python scripts/estimate_memory.py --anchor ../shared/bench/anchor_unets.py   # the calibration runs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scripts import ArgumentParser

ANCHOR_RUNS = [("koala_1b", 8, False), ("koala_1b", 32, True), ("koala_700m", 8, False), ("koala_700m", 32, True)]


def anchor_estimates(anchor_path: str, only: list[tuple[str, int, bool]] | None = None) -> list[dict[str, Any]]:
    """The anchor's naive train step (its own model builders, inputs and hooks; its loop body restated) on fake
    tensors, for the (student, batch, checkpointing) runs whose peaks it measured (`only`: a subset): the estimates
    that CALIBRATION compares with."""
    from diffusers import UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    from train.memory import GIB, LiveBytes

    spec = importlib.util.spec_from_file_location("anchor_unets", anchor_path)
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)
    lat = 128  # 1024 px
    results = []
    shapes = {"koala_1b": anchor.KOALA_1B, "koala_700m": anchor.KOALA_700M}
    for name, batch, checkpointing in only or ANCHOR_RUNS:
        shape = shapes[name]
        with torch.device("meta"):
            t_meta = UNet2DConditionModel(**anchor.SDXL).to(torch.bfloat16).requires_grad_(False)
            s_meta = UNet2DConditionModel(**shape)
        tracker = LiveBytes()
        with FakeTensorMode(allow_non_fake_inputs=True):
            teacher, student = t_meta.to_empty(device="cpu").eval(), s_meta.to_empty(device="cpu").train()
            if checkpointing:
                student.enable_gradient_checkpointing()
            opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
            t_feats, s_feats = {}, {}
            t_keys = anchor.self_attn_outputs(teacher, t_feats)
            pairs = [k for k in anchor.self_attn_outputs(student, s_feats) if k in t_keys]
            kw = anchor.inputs(shape, batch, lat, "cpu", torch.float32)
            noise, t = torch.randn_like(kw["sample"]), torch.randint(0, 1000, (batch,))
            tracker.track([*teacher.parameters(), *teacher.buffers(), *student.parameters(),
                           *student.buffers(), noise, t, *tree_tensors(kw)])
            with tracker:
                for _ in range(2):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        with torch.no_grad():
                            t_out = teacher(timestep=t, **kw).sample
                        s_out = student(timestep=t, **kw).sample
                        loss = F.mse_loss(s_out.float(), noise) + F.mse_loss(s_out.float(), t_out.float())
                        loss = loss + sum(F.mse_loss(s_feats[k].float(), t_feats[k].float()) for k in pairs)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    del t_out, s_out, loss
        results.append({"student": name, "batch": batch, "grad_ckpt": checkpointing,
                        "estimate_gib": round(tracker.peak / GIB, 1)})
    return results


def tree_tensors(tree: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def main(argv: list[str] | None = None) -> dict[str, Any] | list[dict[str, Any]]:
    p = ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--anchor", default=None, help="estimate ../shared/bench/anchor_unets.py's measured configs")
    p.add_argument("--world-size", type=int, default=1, help="processes (sets the accumulation)")
    p.add_argument("--fit", type=float, default=None, metavar="GIB",
                   help="find the largest micro-batch whose planned peak fits in GIB (a few estimates)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +experiment=koala_1b")
    a = p.parse_args(argv)
    if a.fit is not None and a.fit <= 0:
        p.error(f"--fit {a.fit}: the budget is a GPU's memory in GiB, more than 0")
    if a.world_size < 1:
        p.error(f"--world-size {a.world_size}: at least 1 process")
    if a.anchor and not Path(a.anchor).is_file():
        p.error(f"--anchor {a.anchor} is not a file (../shared/bench/anchor_unets.py)")
    if a.anchor and (a.fit is not None or a.world_size != 1 or a.overrides):  # the anchor's configs are its own
        p.error("--anchor estimates the anchor's own configurations: it takes no --fit, --world-size or overrides")
    if a.anchor:
        out: Any = anchor_estimates(a.anchor)
        for rec in out:
            print(json.dumps(rec), flush=True)
        return out
    from train.config import load_config
    from train.memory import estimate_memory, largest_micro_batch

    try:
        if a.fit is not None:
            best, tried = largest_micro_batch(list(a.overrides), a.fit, world_size=a.world_size)
            result = {"overrides": list(a.overrides), "budget_gib": a.fit, "micro_batch": best,
                      "tried": {t["micro_batch"]: t["plan_gib"] for t in tried}}
            fitting = [t for t in tried if t["micro_batch"] == best]
            if fitting:
                result["estimate"] = fitting[0]
            elif tried:
                smallest = min(tried, key=lambda t: t["micro_batch"])
                result["note"] = (f"nothing fits: micro-batch {smallest['micro_batch']} already plans "
                                  f"{smallest['plan_gib']} GiB against {a.fit}")
            print(json.dumps(result), flush=True)
            return result
        cfg = load_config(list(a.overrides))
        result = {"overrides": list(a.overrides), **estimate_memory(cfg, world_size=a.world_size)}
    except ValueError as exc:  # config errors included: one line
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
