"""KOALA students: specs, their derivation from a teacher U-Net config, and initialisation from the teacher.

A student is the teacher's `UNet2DConditionModel` config with fewer resnets per stage, shallower transformer
stacks and optionally no mid block (KOALA paper, Table 1; parameter counts in ../shared/KOALA.md). Every student
tensor is copied from a same-shaped teacher tensor "at the exact block location"; a tensor without a source is
an error.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from diffusers import UNet2DConditionModel


@dataclass(frozen=True)
class StudentSpec:
    """How a student differs from its teacher, stage by stage (encoder order, highest resolution first).

    layers_per_block: resnets per encoder stage (an int applies to every stage); each decoder stage gets one more,
        as in diffusers.
    transformer_layers_per_block: transformer depth per stage (None keeps the teacher's); stages without
        transformers ignore their entry. The mid block takes the last stage's depth.
    mid_block: keep the mid block (KOALA-700M drops it).
    """

    name: str
    layers_per_block: int | tuple[int, ...]
    transformer_layers_per_block: tuple[int, ...] | None
    mid_block: bool = True


# The KOALA model card's students (arXiv 2312.04005, Table 1) and a tiny flavour for the tiny teacher.
STUDENTS: dict[str, StudentSpec] = {
    "koala_1b": StudentSpec("koala_1b", 1, (1, 2, 6), mid_block=True),
    "koala_700m": StudentSpec("koala_700m", 1, (1, 2, 5), mid_block=False),
    "tiny": StudentSpec("tiny", 1, (1, 2, 2), mid_block=True),
}


class StudentSpecError(ValueError):
    """A student spec that cannot be derived from (or initialised by) its teacher."""


def sdxl_base_unet_config() -> dict[str, Any]:
    """SDXL-Base-1.0's U-Net config, shipped with the project so shapes are known without weights."""
    text = resources.files("distill").joinpath("unet_configs/sdxl_base.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def resolve_spec(
    name: str,
    layers_per_block: Sequence[int] | int | None = None,
    transformer_layers_per_block: Sequence[int] | None = None,
    mid_block: bool | None = None,
) -> StudentSpec:
    """A registry entry with optional per-field overrides; name "custom" needs every field."""
    if name == "custom":
        if layers_per_block is None or transformer_layers_per_block is None or mid_block is None:
            raise StudentSpecError(
                "student=custom needs student.layers_per_block, student.transformer_layers_per_block "
                "and student.mid_block"
            )
        base = StudentSpec("custom", 1, None, True)
    elif name in STUDENTS:
        base = STUDENTS[name]
    else:
        raise StudentSpecError(f"student.name={name!r} is not one of {sorted(STUDENTS) + ['custom']}")
    lpb = base.layers_per_block if layers_per_block is None else layers_per_block
    return StudentSpec(
        name=name,
        layers_per_block=lpb if isinstance(lpb, int) else tuple(int(x) for x in lpb),
        transformer_layers_per_block=(
            base.transformer_layers_per_block
            if transformer_layers_per_block is None
            else tuple(int(x) for x in transformer_layers_per_block)
        ),
        mid_block=base.mid_block if mid_block is None else bool(mid_block),
    )


def _per_stage(value: int | Sequence[int], n: int, key: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    values = [int(v) for v in value]
    if len(values) != n:
        raise StudentSpecError(f"{key} has {len(values)} entries; the teacher has {n} stages")
    return values


def derive_student_config(teacher_config: dict[str, Any], spec: StudentSpec) -> dict[str, Any]:
    """The student's `UNet2DConditionModel` config: the teacher's with the spec's depths.

    Raises StudentSpecError when the student would be deeper than the teacher anywhere (it could not be
    initialised from it) or when the spec does not fit the teacher's number of stages.
    """
    cfg = {k: copy.deepcopy(v) for k, v in teacher_config.items() if not k.startswith("_")}
    n = len(cfg["block_out_channels"])
    t_res = _per_stage(cfg["layers_per_block"], n, "teacher layers_per_block")
    t_tf = _per_stage(cfg.get("transformer_layers_per_block", 1), n, "teacher transformer_layers_per_block")
    s_res = _per_stage(spec.layers_per_block, n, "student.layers_per_block")
    s_tf = list(t_tf if spec.transformer_layers_per_block is None else _per_stage(
        spec.transformer_layers_per_block, n, "student.transformer_layers_per_block"
    ))
    for i in range(n):
        if not 1 <= s_res[i] <= t_res[i]:
            raise StudentSpecError(
                f"student stage {i} has {s_res[i]} resnets; it needs 1..{t_res[i]} (the teacher's count)"
            )
        if "CrossAttn" not in cfg["down_block_types"][i]:  # no transformers here (SDXL's first stage): "-" or 0
            s_tf[i] = t_tf[i]
            continue
        if not 1 <= s_tf[i] <= t_tf[i]:
            raise StudentSpecError(
                f"student stage {i} has transformer depth {s_tf[i]}; it needs 1..{t_tf[i]} (the teacher's depth)"
            )
    if cfg.get("reverse_transformer_layers_per_block") is not None:
        raise StudentSpecError("teachers with reverse_transformer_layers_per_block are not supported")
    if spec.mid_block and cfg.get("mid_block_type") is None:
        raise StudentSpecError("the student keeps a mid block but the teacher has none to initialise it from")
    cfg["layers_per_block"] = s_res[0] if len(set(s_res)) == 1 else s_res
    cfg["transformer_layers_per_block"] = s_tf
    if not spec.mid_block:
        cfg["mid_block_type"] = None
    return cfg


def build_unet(config: dict[str, Any], device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """A `UNet2DConditionModel` from a config dict; on "meta" no memory is allocated (for counting)."""
    with torch.device(device):
        return UNet2DConditionModel(**config)


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------- initialisation

_BLOCK = re.compile(r"^(?P<kind>down_blocks|up_blocks)\.(?P<b>\d+)\.(?P<part>resnets|attentions)\.(?P<j>\d+)\.")
_STACK = re.compile(r"\.transformer_blocks\.(?P<k>\d+)\.")


def _children(model: torch.nn.Module, kind: str, b: int, part: str) -> int:
    block = getattr(model, kind)[b]
    return len(getattr(block, part, None) or [])


def teacher_key_for(student_key: str, student: torch.nn.Module, teacher: torch.nn.Module) -> str:
    """The teacher parameter a student parameter is copied from.

    Encoder: block j <- teacher block j. Decoder: the last resnet/attention of an up stage <- the teacher's last
    (its skip connection carries the same channels, as in BK-SDM), the others <- the same index. Transformer
    stacks: the student's k-deep stack takes the teacher's first k blocks. Everything else keeps its name.
    """
    key = student_key
    m = _BLOCK.match(key)
    if m and m["kind"] == "up_blocks":
        b, j = int(m["b"]), int(m["j"])
        n_s = _children(student, "up_blocks", b, "resnets")
        n_t = _children(teacher, "up_blocks", b, "resnets")
        j_t = n_t - 1 if j == n_s - 1 else j
        key = f"up_blocks.{b}.{m['part']}.{j_t}." + key[m.end():]
    # transformer_blocks.k keeps k: the bottom of the teacher's stack.
    return key


def init_student_from_teacher(
    student: torch.nn.Module, teacher: torch.nn.Module, *, copy_values: bool = True
) -> dict[str, str]:
    """Copy every student tensor (parameters and buffers) from its teacher tensor; return the mapping.

    With copy_values=False only the mapping is computed and checked (meta-device models). Raises
    StudentSpecError naming the tensors without a same-shaped source.
    """
    t_state = teacher.state_dict()
    mapping: dict[str, str] = {}
    problems: list[str] = []
    for name, tensor in student.state_dict().items():
        src = teacher_key_for(name, student, teacher)
        if src not in t_state:
            problems.append(f"{name}: no teacher tensor {src}")
        elif tuple(t_state[src].shape) != tuple(tensor.shape):
            problems.append(f"{name} {tuple(tensor.shape)} <- {src} {tuple(t_state[src].shape)}: shapes differ")
        else:
            mapping[name] = src
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise StudentSpecError("student tensors without a source: " + "; ".join(problems[:3]) + more)
    if copy_values:
        s_state = student.state_dict()
        with torch.no_grad():
            for name, src in mapping.items():
                s_state[name].copy_(t_state[src].to(s_state[name].dtype))
    return mapping


def summarize_mapping(mapping: dict[str, str]) -> list[str]:
    """One line per student module whose source differs from its own name (tensor names folded to modules)."""
    lines: dict[str, str] = {}
    for s, t in mapping.items():
        s_mod = _module_of(s)
        t_mod = _module_of(t)
        if s_mod != t_mod:
            lines.setdefault(s_mod, f"{s_mod} <- {t_mod}")
    kept = len({_module_of(s) for s in mapping}) - len(lines)
    return [*lines.values(), f"({kept} other modules copied from the same name)"]


def _module_of(key: str) -> str:
    m = _BLOCK.match(key)
    if not m:
        return key.split(".")[0]
    return key[: m.end() - 1]


# ------------------------------------------------------------------------------------------------ stage table


@dataclass
class StageRow:
    """One row of the per-stage table: resnets, transformer depth and parameters of one U-Net stage."""

    stage: str
    resnets: int
    depth: int
    params: int


def stage_table(unet: UNet2DConditionModel) -> list[StageRow]:
    """Per-stage structure of a U-Net in KOALA's naming (DW-1.., Mid, UP-1..; 'other' for stem and head)."""
    rows: list[StageRow] = []

    def row(name: str, block: torch.nn.Module | None) -> None:
        if block is None:
            rows.append(StageRow(name, 0, 0, 0))
            return
        atts = getattr(block, "attentions", None) or []
        depth = len(atts[0].transformer_blocks) if len(atts) else 0
        rows.append(StageRow(name, len(block.resnets), depth, count_params(block)))

    for i, b in enumerate(unet.down_blocks):
        row(f"DW-{i + 1}", b)
    row("Mid", unet.mid_block)
    for i, b in enumerate(unet.up_blocks):
        row(f"UP-{i + 1}", b)
    rest = count_params(unet) - sum(r.params for r in rows)
    rows.append(StageRow("other", 0, 0, rest))
    return rows


def format_stage_tables(teacher: UNet2DConditionModel, student: UNet2DConditionModel) -> str:
    """Side-by-side text table of teacher and student stages (parameters in millions)."""
    head = f"{'stage':<6} | {'teacher res/depth':>17} {'params (M)':>11} | {'student res/depth':>17} {'params (M)':>11}"
    lines = [head, "-" * len(head)]
    for t, s in zip(stage_table(teacher), stage_table(student), strict=True):
        lines.append(
            f"{t.stage:<6} | {f'{t.resnets}/{t.depth}':>17} {t.params / 1e6:>11.2f} |"
            f" {f'{s.resnets}/{s.depth}':>17} {s.params / 1e6:>11.2f}"
        )
    tp, sp = count_params(teacher), count_params(student)
    lines.append(f"{'total':<6} | {'':>17} {tp / 1e6:>11.2f} | {'':>17} {sp / 1e6:>11.2f}")
    return "\n".join(lines)
