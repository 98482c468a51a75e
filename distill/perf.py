"""Speed switches that do not change what the step computes (beyond float rounding), and their helpers; the one
exception is the optional FP8 teacher, an approximation of the teacher (a few percent relative error per layer,
measured by `make bench-train ARGS="--fp8-error"`).

- Regional torch.compile: the `forward` of every resnet, attention and feed-forward block is compiled separately:
  compile time stays in minutes for SDXL, identical block shapes share compiled code, and forward hooks registered
  on those modules keep firing because hooks run in `Module.__call__`, outside the compiled function. (Compiling
  whole transformer blocks puts the attn1 hooks inside the compiled region: dynamo then replays them into the
  feature dict it saw when tracing, and features went missing once the tap had been cleared; tried, not kept.)
- Selective gradient checkpointing: only the named student stages recompute their activations in the backward
  pass (memory roughly follows FLOPs per stage at 1024 px, so the list picks how much memory is traded for
  recomputation); forward hooks do not fire again during the recomputation, so feature taps do not keep the
  recomputed tensors alive until the next step.
- SDPA backend: `torch.nn.attention.sdpa_kernel` entered around every attention call (and so also around its
  recomputation under checkpointing), not around the whole step, because the step is not ours to wrap.
- channels_last for both U-Nets.
- FP8 teacher (optional, approximate): the frozen teacher's transformer linear layers run as e4m3 matmuls with
  per-row scales (`torch._scaled_mm`); refused unless CUDA capability >= 8.9.
- `DeviceSkip`: a non-finite gradient skips the update on the device (fused AdamW's `found_inf`, the mechanism
  GradScaler uses), so the step never waits for the host; counters are read at log/checkpoint steps.
- `move_batch`: host-to-device copies of a (pinned) batch without blocking the host.
- `PhaseTimer`: the benchmark's breakdown of a step into phases (data, teacher forward, student forward, loss,
  backward, optimizer), with events that never make the host wait.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import Tensor

COMPILED_TYPES = (ResnetBlock2D, Attention, FeedForward)
# All blocks of one class share one forward code object, so every distinct (shape, dtype, grad mode) is another
# compiled entry of it: SDXL teacher + KOALA student have 22 resnet variants, over dynamo's default limit of 8
# (past it dynamo silently runs the block eagerly).
REGIONAL_RECOMPILE_LIMIT = 64
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: float8 tensor cores
FP8_ROWWISE_CAPABILITY = (9, 0)  # per-row scales in torch._scaled_mm (Hopper); Ada uses one scale per tensor
_E4M3 = torch.float8_e4m3fn
_E4M3_MAX = float(torch.finfo(_E4M3).max)  # 448


# --------------------------------------------------------------------------------------------- compilation


def compile_blocks(model: torch.nn.Module, types: tuple[type, ...] = COMPILED_TYPES, **compile_kwargs: Any) -> int:
    """Replace the forward of each module of `types` by its compiled version; return the count.

    Identical block shapes share compiled code through dynamo's cache (the recompile limit is raised to
    REGIONAL_RECOMPILE_LIMIT so that SDXL's block variants all compile). compile_kwargs go to torch.compile.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, REGIONAL_RECOMPILE_LIMIT)
    n = 0
    for module in model.modules():
        if isinstance(module, types) and not getattr(module, "_koala_compiled", False):
            module.forward = torch.compile(module.forward, **compile_kwargs)
            module._koala_compiled = True
            n += 1
    return n


# ------------------------------------------------------------------------------------------ SDPA backend


def sdpa_context(name: str) -> contextlib.AbstractContextManager:
    """A context restricting F.scaled_dot_product_attention to one backend; "auto" leaves PyTorch's choice."""
    if name == "auto":
        return contextlib.nullcontext()
    if name not in SDPA_BACKENDS:
        raise ValueError(f"train.sdpa_backend={name!r} is not one of auto, {', '.join(SDPA_BACKENDS)}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


def force_sdpa_backend(model: torch.nn.Module, name: str, types: tuple[type, ...] = (Attention,)) -> int:
    """Run the forward of every module of `types` inside `sdpa_context(name)`; return the count (0 for auto).

    The wrapper sits outside a compiled forward (apply it after compiling), so tracing, running and checkpoint
    recomputation all see the same backend.
    """
    if name == "auto":
        return 0
    sdpa_context(name)  # fail early on a bad name
    n = 0
    for module in model.modules():
        if isinstance(module, types):
            inner = module.forward

            @functools.wraps(inner)
            def forward(*args: Any, _inner: Callable = inner, **kwargs: Any) -> Any:
                with sdpa_context(name):
                    return _inner(*args, **kwargs)

            module.forward = forward
            n += 1
    return n


# -------------------------------------------------------------------------------- gradient checkpointing


@contextlib.contextmanager
def _hooks_off(module: torch.nn.Module) -> Iterator[None]:
    """Forward hooks of `module` and its submodules silenced (restored on exit, also on early stop)."""
    saved = [(m, m._forward_hooks) for m in module.modules() if m._forward_hooks]
    for m, _ in saved:
        m._forward_hooks = OrderedDict()
    try:
        yield
    finally:
        for m, hooks in saved:
            m._forward_hooks = hooks


def checkpoint_without_hooks(module: torch.nn.Module, *args: Any) -> Any:
    """diffusers' gradient-checkpointing function (non-reentrant torch checkpoint) whose recomputation does not
    fire forward hooks: a feature tap keeps the first forward's output, not a recomputed copy."""
    return torch.utils.checkpoint.checkpoint(
        module.__call__, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _hooks_off(module)),
    )


def stage_module(unet: torch.nn.Module, stage: str) -> torch.nn.Module:
    """The block of a KOALA stage name: DW-i -> down_blocks[i-1], Mid -> mid_block, UP-i -> up_blocks[i-1]."""
    if stage == "Mid":
        if unet.mid_block is None:
            raise ValueError("train.checkpointing_blocks names Mid, but this student has no mid block")
        return unet.mid_block
    kind, _, index = stage.partition("-")
    blocks = {"DW": unet.down_blocks, "UP": unet.up_blocks}.get(kind)
    if blocks is None or not index.isdigit() or not 1 <= int(index) <= len(blocks):
        raise ValueError(f"train.checkpointing_blocks: no stage {stage!r} in this U-Net")
    return blocks[int(index) - 1]


def enable_checkpointing(unet: torch.nn.Module, stages: Sequence[str] = ()) -> int:
    """Gradient checkpointing of the named stages' blocks (all stages when `stages` is empty); return the number
    of modules switched (down/up/mid blocks recompute their resnets, Transformer2DModels their transformer
    blocks)."""
    roots = [stage_module(unet, s) for s in stages] if stages else [unet]
    n = 0
    for root in roots:
        for module in root.modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = checkpoint_without_hooks
                module.gradient_checkpointing = True
                n += 1
    if n == 0:
        raise ValueError(f"no module supports gradient checkpointing under {list(stages) or 'the U-Net'}")
    return n


# ---------------------------------------------------------------------------------------------- FP8 teacher


def sdpa_refusal(name: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str | None:
    """Why attention restricted to SDPA backend `name` cannot run on `device` with `dtype` inputs (None when it
    can): one tiny call, as the U-Nets' attention would make it (SDXL's 64-wide heads). Flash, for one, needs fp16
    or bf16 and a recent GPU; cuDNN needs CUDA."""
    if name == "auto":
        return None
    import warnings

    try:
        with sdpa_context(name), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch's per-kernel reasons: the refusal is the one line
            q = torch.zeros(1, 2, 8, 64, device=device, dtype=dtype)
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except (RuntimeError, NotImplementedError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"train.sdpa_backend={name} cannot run on {torch.device(device)} with {dtype} inputs ({reason})"
    return None


def fp8_refusal(device: torch.device | str) -> str | None:
    """Why the FP8 teacher cannot run on `device` (None when it can: CUDA capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"train.teacher_fp8=true needs a CUDA GPU of capability >= 8.9; the teacher is on {device}"
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        return f"train.teacher_fp8=true needs CUDA capability >= 8.9 (Ada/Hopper); this GPU has {cap[0]}.{cap[1]}"
    return None


class FP8Linear(torch.nn.Module):
    """A frozen linear layer as an e4m3 matmul: weight quantised once with one scale per output row, input
    quantised per call with one scale per row (rowwise) or per tensor; output in `out_dtype`, bias added after.

    Inference only (no gradient flows through it): for the frozen teacher.
    """

    def __init__(self, linear: torch.nn.Linear, out_dtype: torch.dtype = torch.bfloat16, rowwise: bool = True):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / _E4M3_MAX  # [N, 1]
        if not rowwise:
            scale = scale.amax().reshape(1, 1)
        self.register_buffer("weight_fp8", (w / scale).to(_E4M3))  # [N, K], row-major
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # [1, N] or [1, 1]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(out_dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype, self.rowwise = out_dtype, rowwise

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        amax = x2.abs().amax(dim=1, keepdim=True) if self.rowwise else x2.abs().amax().reshape(1, 1)
        x_scale = amax.clamp(min=1e-12) / _E4M3_MAX
        xq = (x2 / x_scale).to(_E4M3)
        out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               out_dtype=self.out_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rowwise={self.rowwise}"


def quantize_teacher_fp8(unet: torch.nn.Module, *, check_device: bool = True,
                         out_dtype: torch.dtype | None = None) -> int:
    """Replace every nn.Linear inside the teacher's transformer blocks (attention projections, feed-forward) by
    an FP8Linear; return the count. Convolutions, embeddings and norms keep their dtype.

    out_dtype: the layers' output dtype, by default the U-Net's own (a bf16 output in an fp16 teacher promoted its
    residual stream to fp32, and the next fp16 layer refused it). check_device=False skips the capability gate
    (tests of the arithmetic on the CPU's _scaled_mm).
    """
    first = next(unet.parameters())
    device, out_dtype = first.device, out_dtype or first.dtype
    if check_device and (why := fp8_refusal(device)) is not None:
        raise ValueError(why)
    rowwise = device.type != "cuda" or torch.cuda.get_device_capability(device) >= FP8_ROWWISE_CAPABILITY
    n = 0
    for block in [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]:
        for name, child in list(block.named_modules()):
            if isinstance(child, torch.nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, attr, FP8Linear(child, out_dtype=out_dtype, rowwise=rowwise))
                n += 1
    return n


# -------------------------------------------------------------------------------- no host sync in a step


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with every tensor on `device`, copied without blocking the host (pinned memory makes the copy
    asynchronous; the caching host allocator keeps the source alive until it is done). Other values unchanged."""
    if device.type != "cuda":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def supports_device_skip(optimizer: torch.optim.Optimizer, mixed_precision: str) -> bool:
    """Whether non-finite updates can be skipped on the device: torch's fused Adam/AdamW honours `found_inf`
    (fp16 runs leave that to Accelerate's GradScaler, which uses the same attribute)."""
    return (isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and mixed_precision != "fp16"
            and all(group.get("fused") for group in optimizer.param_groups))  # the groups: a loaded state sets them


class DeviceSkip:
    """Skip an optimizer update whose gradient norm is not finite, without a host sync, and count the skips.

    `step(optimizer, norm)` sets the optimizer's `found_inf` to 1.0 when `norm` is inf/NaN: the fused kernel then
    leaves parameters, moments and step counts untouched. Counters live on the device; `read()` syncs once and
    returns (skipped in total, skipped in a row up to now).
    """

    def __init__(self, device: torch.device, total: int = 0, in_a_row: int = 0) -> None:
        self.total = torch.tensor(float(total), device=device)
        self.in_a_row = torch.tensor(float(in_a_row), device=device)

    def step(self, optimizer: torch.optim.Optimizer, norm: Tensor, step: Callable[[], Any] | None = None) -> None:
        """One update of `optimizer` (through `step`, e.g. Accelerate's wrapper of it; default optimizer.step),
        skipped on the device when `norm` (the gradient norm, a device scalar) is not finite."""
        bad = (~torch.isfinite(norm.detach())).to(torch.float32).reshape(())
        optimizer.found_inf = bad
        try:
            (step or optimizer.step)()
        finally:
            del optimizer.found_inf
        self.total += bad
        self.in_a_row = (self.in_a_row + 1.0) * bad  # reset to 0 by an applied update

    def read(self) -> tuple[int, int]:
        values = torch.stack([self.total, self.in_a_row]).tolist()
        return int(values[0]), int(values[1])


# ------------------------------------------------------------------------------------------ phase timing


class PhaseTimer:
    """Where a step's time goes, without making the host wait inside it.

    `begin(name)` records a mark (a CUDA event on a GPU, `time.perf_counter` elsewhere) that opens phase `name`
    and closes the phase before it; `end()` closes the last one. `totals()` synchronises once and returns the
    seconds of each phase name, summed over everything recorded. On a GPU the events measure the device's
    timeline, so a phase is the kernels queued between two marks (plus any wait for the host in between).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list[tuple[str | None, Any]] = []

    def begin(self, name: str | None) -> None:
        if self.cuda:
            mark = torch.cuda.Event(enable_timing=True)
            mark.record()
        else:
            mark = time.perf_counter()
        self.marks.append((name, mark))

    def end(self) -> None:
        self.begin(None)

    def totals(self) -> dict[str, float]:
        """Seconds per phase name over all closed phases, in order of first appearance."""
        if self.cuda and self.marks:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (name, a), (_, b) in zip(self.marks, self.marks[1:], strict=False):
            if name is not None:
                out[name] = out.get(name, 0.0) + (a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        return out


def begin_phase(timer: PhaseTimer | None, name: str) -> None:
    """timer.begin(name) when a timer is attached (benchmarks); nothing otherwise."""
    if timer is not None:
        timer.begin(name)


# ------------------------------------------------------------------------------------------------ options


def apply_speed_options(tcfg_train: Any, teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """The train.* switches that change speed and memory but not what is computed: gradient checkpointing (all or
    selected student stages), channels_last (both models), FP8 teacher, regional compilation (both models; mode,
    backend) and the SDPA backend (both models). Order matters: FP8 layers are in place before compiling, and the
    SDPA context wraps the compiled attention forwards from outside."""
    get = functools.partial(getattr, tcfg_train)
    stages = list(get("checkpointing_blocks", []) or [])
    if stages or tcfg_train.gradient_checkpointing:
        enable_checkpointing(student, stages)
    if tcfg_train.channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    if get("teacher_fp8", False):
        quantize_teacher_fp8(teacher)
    if tcfg_train.compile:
        kwargs: dict[str, Any] = dict(backend=get("compile_backend", "inductor"), dynamic=False)
        if kwargs["backend"] == "inductor":
            kwargs["mode"] = get("compile_mode", "default")
        compile_blocks(teacher, **kwargs)
        compile_blocks(student, **kwargs)
    sdpa = get("sdpa_backend", "auto")
    force_sdpa_backend(teacher, sdpa)
    force_sdpa_backend(student, sdpa)
