"""The KOALA objective: L = w_task L_task + w_out L_outKD + w_feat sum_l MSE(f_T^l, f_S^l).

All terms are mean-reduced MSEs computed in fp32 (BK-SDM's reduction: mean per layer, summed over layers).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return F.mse_loss(a.float(), b.float(), reduction="mean")


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
        layer = _mse(f_s, f_t)
        losses[f"feat/{label}"] = layer
        feat_total = feat_total + layer
    losses["feat_kd"] = feat_total
    losses["kd"] = losses["out_kd"] + feat_total
    losses["total"] = w_task * losses["task"] + w_out * losses["out_kd"] + w_feat * feat_total
    return losses
