"""Feature taps: which teacher and student modules are matched for feature KD, and forward hooks that collect them.

Kinds (KOALA paper, Sec. 3): `sa` self-attention (attn1) output of each transformer block, `ca` cross-attention
(attn2), `ffn` feed-forward, `res` resnet outputs, `lf` a stage's last output (BK-SDM's "last feature"). KOALA's
recipe is SA at every transformer stage with the `bottom` layer map, plus LF at DW-1 and UP-3, which have no
transformers. Hooks go on the *unwrapped* models (a DDP/DeepSpeed wrapper or a compiled block forward keeps the
same module objects), and store references to the outputs: no copies.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_SUBMODULE = {"sa": "attn1", "ca": "attn2", "ffn": "ff"}


@dataclass(frozen=True)
class FeaturePair:
    """One matched feature: a label for logs and the module paths in teacher and student."""

    label: str
    kind: str
    teacher: str
    student: str


def layer_indices(teacher_depth: int, student_depth: int, how: str) -> list[int]:
    """Teacher transformer-block index for each student block of a shallower stack.

    bottom: k <- k (KOALA's choice); up: the teacher's last blocks; interleave: every ceil(T/S)-th block from the
    first, capped at the last (in the paper's 1-based numbering, 10 -> 6 gives teacher blocks 1, 3, 5, 7, 9, 10
    and 10 -> 5 gives 1, 3, 5, 7, 9), or evenly spaced when the cap would repeat a block.
    """
    if student_depth > teacher_depth:
        raise ValueError(f"student stack deeper ({student_depth}) than teacher stack ({teacher_depth})")
    if how == "bottom":
        return list(range(student_depth))
    if how == "up":
        return list(range(teacher_depth - student_depth, teacher_depth))
    if how == "interleave":
        if student_depth == 1:
            return [teacher_depth - 1]
        stride = math.ceil(teacher_depth / student_depth)
        idx = [min(k * stride, teacher_depth - 1) for k in range(student_depth)]
        if len(set(idx)) < student_depth:
            idx = [round(k * (teacher_depth - 1) / (student_depth - 1)) for k in range(student_depth)]
        return idx
    raise ValueError(f"unknown layer map {how!r}")


def stage_names(unet_config: Any) -> list[str]:
    """The KOALA stage names of a U-Net config, no model needed: DW-1.., Mid (when it has a mid block), UP-1.."""
    n = len(unet_config["down_block_types"])
    mid = ["Mid"] if unet_config.get("mid_block_type") else []
    return [f"DW-{i}" for i in range(1, n + 1)] + mid + [f"UP-{i}" for i in range(1, n + 1)]


def _stages(unet: torch.nn.Module) -> Iterator[tuple[str, str, torch.nn.Module]]:
    """(KOALA stage name, module path, block) for every stage: DW-1.., Mid, UP-1.."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [("mid_block", unet.mid_block)] if unet.mid_block is not None else []
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for name, (path, block) in zip(stage_names(unet.config), blocks, strict=True):
        yield name, path, block


def _source_index(stage: str, j: int, n_student: int, n_teacher: int) -> int:
    """Teacher resnet/attention index for student index j, as in students.teacher_key_for (decoder: last <- last)."""
    if stage.startswith("UP") and j == n_student - 1:
        return n_teacher - 1
    return j


def match_features(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    feature_types: Sequence[str] = ("sa",),
    lf_stages: Sequence[str] = ("DW-1", "UP-3"),
    layer_map: str = "bottom",
) -> list[FeaturePair]:
    """The matched teacher/student module pairs of a feature recipe, in forward order."""
    t_stages = {name: (path, block) for name, path, block in _stages(teacher)}
    pairs: list[FeaturePair] = []
    for stage, s_path, s_block in _stages(student):
        if stage not in t_stages:
            raise ValueError(f"student stage {stage} has no teacher counterpart")
        t_path, t_block = t_stages[stage]
        s_atts = list(getattr(s_block, "attentions", None) or [])
        t_atts = list(getattr(t_block, "attentions", None) or [])
        for kind in feature_types:
            if kind == "res":
                n_s, n_t = len(s_block.resnets), len(t_block.resnets)
                for j in range(n_s):
                    jt = _source_index(stage, j, n_s, n_t)
                    pairs.append(FeaturePair(f"res/{stage}.{j}", "res", f"{t_path}.resnets.{jt}",
                                             f"{s_path}.resnets.{j}"))
                continue
            sub = _SUBMODULE[kind]
            for j, s_att in enumerate(s_atts):
                jt = _source_index(stage, j, len(s_atts), len(t_atts))
                d_s, d_t = len(s_att.transformer_blocks), len(t_atts[jt].transformer_blocks)
                for k, kt in enumerate(layer_indices(d_t, d_s, layer_map)):
                    pairs.append(FeaturePair(
                        f"{kind}/{stage}.{j}.{k}", kind,
                        f"{t_path}.attentions.{jt}.transformer_blocks.{kt}.{sub}",
                        f"{s_path}.attentions.{j}.transformer_blocks.{k}.{sub}",
                    ))
        if stage in lf_stages:
            pairs.append(FeaturePair(f"lf/{stage}", "lf", t_path, s_path))
    missing = set(lf_stages) - {p.label[3:] for p in pairs if p.kind == "lf"}
    if missing:
        raise ValueError(f"distill.lf_stages names stages the student lacks: {sorted(missing)}")
    return pairs


def format_pairs(pairs: Sequence[FeaturePair]) -> str:
    """A text table of the matched pairs, printed and logged at the start of a run."""
    width = max((len(p.label) for p in pairs), default=5)
    t_width = max((len(p.teacher) for p in pairs), default=7)
    lines = [f"{'feature':<{width}}  {'teacher module':<{t_width}}  student module"]
    lines += [f"{p.label:<{width}}  {p.teacher:<{t_width}}  {p.student}" for p in pairs]
    return "\n".join(lines)


def _first_tensor(output: object) -> Tensor:
    """A block's feature: the tensor itself, or the first element of a tuple (down blocks return (h, skips))."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"hooked module returned {type(output).__name__}, not a tensor")
    return output


class FeatureTap:
    """Forward hooks on named modules of one model; `features[label]` holds the latest output of each.

    Use `clear()` before each forward and `remove()` (or the context manager) to detach the hooks.
    """

    def __init__(self, model: torch.nn.Module, paths: dict[str, str]) -> None:
        self.features: dict[str, Tensor] = {}
        self.active = True  # False: the hooks keep nothing (see `paused`)
        self._handles = []
        modules = dict(model.named_modules())
        for label, path in paths.items():
            if path not in modules:
                raise KeyError(f"no module {path!r} to hook for feature {label}")
            self._handles.append(modules[path].register_forward_hook(self._hook(label)))

    def _hook(self, label: str):
        def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
            if self.active:
                self.features[label] = _first_tensor(output)

        return hook

    def clear(self) -> None:
        """Drop the stored features (call before a forward)."""
        self.features = {}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Keep nothing while inside, e.g. while a preview samples with the hooked model: its features would
        otherwise stay referenced (activations of the last denoising step) until the next training step."""
        self.clear()
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def remove(self) -> None:
        """Detach all hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def tap_pair(
    teacher: torch.nn.Module, student: torch.nn.Module, pairs: Sequence[FeaturePair]
) -> tuple[FeatureTap, FeatureTap]:
    """Hook both models for the given pairs; features are keyed by the pair label in both taps."""
    return (FeatureTap(teacher, {p.label: p.teacher for p in pairs}),
            FeatureTap(student, {p.label: p.student for p in pairs}))
