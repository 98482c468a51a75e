"""Speed switches that do not change what the step computes: regional torch.compile.

Regional compilation compiles the `forward` of every resnet, attention and feed-forward block separately:
compile time stays in minutes for SDXL, and forward hooks registered on those modules keep firing because the
hooks run in `Module.__call__`, outside the compiled function (compiling a whole BasicTransformerBlock with
`module.compile()` silenced the hooks on its attn1; ../shared/KOALA.md).
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

COMPILED_TYPES = (ResnetBlock2D, Attention, FeedForward)


def compile_blocks(model: torch.nn.Module, **compile_kwargs) -> int:
    """Replace the forward of each resnet/attention/feed-forward module by its compiled version; return the count.

    Identical block shapes share compiled code through dynamo's cache, so SDXL compiles a handful of graphs.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, COMPILED_TYPES) and not getattr(module, "_koala_compiled", False):
            module.forward = torch.compile(module.forward, **compile_kwargs)
            module._koala_compiled = True
            n += 1
    return n


def apply_speed_options(tcfg_train, teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """The train.* switches that change speed and memory but not what is computed: gradient checkpointing
    (student), channels_last and regional compilation (both models)."""
    if tcfg_train.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    if tcfg_train.channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    if tcfg_train.compile:
        compile_blocks(teacher)
        compile_blocks(student)
