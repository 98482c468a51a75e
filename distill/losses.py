"""The KOALA objective: L = w_task L_task + w_out L_outKD + w_feat sum_l MSE(f_T^l, f_S^l).

All terms are mean-reduced MSEs computed in fp32 (BK-SDM's reduction: mean per layer, summed over layers).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return F.mse_loss(a.float(), b.float(), reduction="mean")


class FeatureMSE(torch.autograd.Function):
    """mean((a - b)^2) in fp32, like `_mse`, but its backward keeps only a and b themselves (the feature taps hold
    them anyway) and makes the fp32 difference when it runs. Autograd through `_mse` would keep two fp32 copies of
    every bf16 feature until the backward pass: with KOALA's 32 self-attention pairs at 1024 px that is about
    0.4 GiB per image (train/memory.py estimates it)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return _mse(a, b)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, b = ctx.saved_tensors
        diff = (2.0 / a.numel()) * (a.float() - b.float()) * grad  # mse_loss's gradient, in its order
        grad_a = diff.to(a.dtype) if ctx.needs_input_grad[0] else None
        grad_b = (-diff).to(b.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def koala_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    target: Tensor,
    student_feats: Mapping[str, Tensor],
    teacher_feats: Mapping[str, Tensor],
    *,
    w_task: float = 1.0,
    w_out: float = 1.0,
    w_feat: float = 1.0,
) -> dict[str, Tensor]:
    """Every loss term as a scalar tensor: task, out_kd, feat_kd, feat/<label> per layer, kd and total.

    `kd` = out_kd + feat_kd (unweighted) is what the demo reports; `total` is the weighted sum that is optimised.
    Raises KeyError if a teacher feature is missing for a student feature (a hook that did not fire).
    """
    losses: dict[str, Tensor] = {"task": _mse(student_out, target), "out_kd": _mse(student_out, teacher_out)}
    feat_total = student_out.new_zeros((), dtype=losses["task"].dtype)
    for label, f_s in student_feats.items():
        f_t = teacher_feats[label]
        if f_t.shape != f_s.shape:
            raise ValueError(f"feature {label}: teacher {tuple(f_t.shape)} vs student {tuple(f_s.shape)}")
        layer = FeatureMSE.apply(f_s, f_t)
        losses[f"feat/{label}"] = layer
        feat_total = feat_total + layer
    losses["feat_kd"] = feat_total
    losses["kd"] = losses["out_kd"] + feat_total
    losses["total"] = w_task * losses["task"] + w_out * losses["out_kd"] + w_feat * feat_total
    return losses
