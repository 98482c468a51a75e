"""Peak GPU memory of a training configuration, estimated on the CPU in under a minute: `make plan-memory`.

The run's own pieces (teacher and student at the config's shapes and dtypes, the student's gradient checkpointing,
the feature taps, `Distiller.forward`, autocast, backward, clipping, the optimizer) execute on fake tensors
(torch's FakeTensorMode: shapes and dtypes, no storage, no arithmetic). A dispatch mode adds up the bytes of every
live tensor storage and keeps the maximum. Two optimizer steps of min(accumulation, 2) micro-batches are played,
so optimizer state and accumulated gradients are live in the second one, as in training. The first is cut short to
its optimizer update, on zero gradients and untracked, since its forward and backward peak no higher than the
second's: that saves a third of the time or more and leaves the estimate as it was.

What it does not see, and how the estimate relates to measurements:
- The CUDA caching allocator's rounding and fragmentation, CUDA kernels' workspaces, and CUDA autocast's op lists
  (the fake run uses the CPU's). The same tracker run over ../shared/bench/anchor_unets.py's naive train step
  (`--anchor`) estimates 46.0 / 37.6 / 35.7 / 31.4 GiB where the anchor measured max_memory_allocated 53.4 / 41.3 /
  42.1 / 34.9 GiB on an H200 (KOALA-1B b8, b32 + checkpointing, KOALA-700M b8, b32 + checkpointing): the
  measurement was 1.10-1.18x the estimate. `plan_gib` is the estimate x CALIBRATION, the worst of those ratios.
- torch.compile (the anchor's compiled step peaked at 44.4 instead of 53.4 GiB), channels_last and the FP8
  teacher are not modelled: the estimate is for the eager step, an upper bound for the compiled one.
- bitsandbytes' 8-bit AdamW cannot run on fake tensors; its state (two uint8 moments and one fp32 scale per
  256-value block for tensors of at least 4096 values, fp32 moments otherwise) is allocated without its kernel.
- Under DeepSpeed ZeRO-2 gradients and optimizer state are split across ranks; the estimate is per GPU without it.
- Under DDP (several processes without DeepSpeed) the gradients are views into DDP's all-reduce buckets (the
  trainer sets gradient_as_bucket_view), so the same estimate holds per GPU: DDP keeps no second copy of them.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

GIB = 2**30
CALIBRATION = 1.18  # measured / estimated peak, the worst of the anchor's four configurations (module docstring)
BNB_BLOCK = 256  # values per absmax scale in bitsandbytes' blockwise 8-bit optimizer state
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps fp32 state for smaller tensors (its min_8bit_size default)


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages, counted once per storage (views share it), freed with the storage; keeps the
    peak and the phase it happened in. Tensors created before the mode was entered are added with `track`."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = 0  # bytes
        self.peak = 0  # bytes
        self.phase = "set-up"
        self.peak_phase = self.phase

    def track(self, tensors: Iterable[Any]) -> None:
        """Count the storages of `tensors` (non-tensors are ignored) that are not counted yet."""
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen[storage] = nbytes
            self.live += nbytes
            weakref.finalize(storage, self._free, nbytes)
            if self.live > self.peak:
                self.peak, self.peak_phase = self.live, self.phase

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.track(tree_flatten(out)[0])
        return out


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class StatesOnly8bitAdam(torch.optim.Optimizer):
    """bitsandbytes AdamW8bit's state layout, allocated on the first step, with no update (memory estimates
    only: its CUDA/CPU kernels read values that fake tensors do not have)."""

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or self.state[p]:
                    continue
                if p.numel() >= BNB_MIN_8BIT_SIZE:
                    blocks = -(-p.numel() // BNB_BLOCK)
                    self.state[p] = {"state1": torch.empty_like(p, dtype=torch.uint8),
                                     "state2": torch.empty_like(p, dtype=torch.uint8),
                                     "absmax1": p.new_empty(blocks), "absmax2": p.new_empty(blocks)}
                else:
                    self.state[p] = {"state1": torch.empty_like(p), "state2": torch.empty_like(p)}


def _optimizer(tr: Any, student: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in student.parameters() if p.requires_grad]
    if tr.optimizer == "adamw8bit":
        return StatesOnly8bitAdam(params)
    fused = bool(tr.fused_adam)  # otherwise foreach, CUDA's default, with its full-size temporaries
    return torch.optim.AdamW(params, lr=tr.lr, fused=fused, foreach=not fused)


def _inputs(cfg: Any, batch: int) -> Any:
    """A precomputed-latent batch's conditioning at the teacher's shapes (fp32, as the trainer feeds it)."""
    from distill.step import UNetInputs
    from train.bench import N_TIME_IDS, TEXT_TOKENS, latent_shape

    shape = latent_shape(cfg)
    return UNetInputs(latents=torch.empty(batch, *shape["latents"]),
                      prompt_embeds=torch.empty(batch, TEXT_TOKENS, shape["text_dim"]),
                      pooled=torch.empty(batch, shape["pooled_dim"]), time_ids=torch.empty(batch, N_TIME_IDS))


def estimate_memory(cfg: Any, *, world_size: int = 1, optimizer_steps: int = 2,
                    cut_first_step: bool = True) -> dict[str, Any]:
    """Estimated peak memory of one GPU of `cfg`'s run (a composed config; paths need not exist), in GiB, with its
    parts.

    Keys: peak_gib (the eager step as tracked), plan_gib (peak x CALIBRATION: what to budget), peak_phase
    (inputs | teacher forward | student forward | backward | optimizer), teacher/student weights, gradients,
    optimizer state, EMA copy, activations (with temporaries: the peak minus all of those), micro-batch and
    accumulation, `not_modelled` (the switches of this config that the estimate ignores) and peak_bytes (the peak
    unrounded).

    cut_first_step=False plays the first optimizer step in full as well (slower; the tests check that it gives the
    same estimate)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from distill.features import match_features
    from distill.perf import enable_checkpointing
    from distill.step import Distiller
    from distill.students import build_unet, derive_student_config, resolve_spec
    from distill.teachers import DTYPES, TeacherBundle, sdxl_noise_scheduler, teacher_unet_config
    from train.config import grad_accum_steps

    tr, s = cfg.train, cfg.student
    t_config = teacher_unet_config(cfg.teacher)
    s_config = derive_student_config(t_config, resolve_spec(s.name, s.layers_per_block,
                                                            s.transformer_layers_per_block, s.mid_block))
    accum = grad_accum_steps(cfg, world_size)
    micro_batches = min(accum, 2)  # the second one runs with the first one's gradients live
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tr.mixed_precision)
    teacher_meta = build_unet(t_config, "meta").to(DTYPES[cfg.teacher.dtype]).requires_grad_(False)
    student_meta = build_unet(s_config, "meta")
    tracker = LiveBytes()
    with FakeTensorMode(allow_non_fake_inputs=True):
        teacher = teacher_meta.to_empty(device="cpu").eval()
        student = student_meta.to_empty(device="cpu").train()
        stages = list(tr.checkpointing_blocks or [])
        if stages or tr.gradient_checkpointing:
            enable_checkpointing(student, stages)
        optimizer = _optimizer(tr, student)
        pairs = match_features(teacher, student, cfg.distill.feature_types, cfg.distill.lf_stages,
                               cfg.distill.layer_map)
        bundle = TeacherBundle(unet=teacher, noise_scheduler=sdxl_noise_scheduler(cfg.teacher), path=None)
        distiller = Distiller(bundle, student, pairs, cfg.teacher, cfg.distill)

        def phase(name: str) -> Any:
            return lambda *_: setattr(tracker, "phase", name)

        handles = [teacher.register_forward_pre_hook(phase("teacher forward")),
                   student.register_forward_pre_hook(phase("student forward"))]
        tracker.track([*teacher.parameters(), *teacher.buffers(), *student.parameters(), *student.buffers()])
        cut = cut_first_step and optimizer_steps > 1
        if cut:  # the first step, cut short (module docstring): the state it leaves is live from now on
            for param in student.parameters():
                if param.requires_grad:
                    param.grad = torch.zeros_like(param)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tracker.track(t for st in optimizer.state.values() for t in st.values())
        generator = torch.Generator().manual_seed(0)
        with tracker:
            for _ in range(optimizer_steps - 1 if cut else max(1, optimizer_steps)):
                for _ in range(micro_batches):
                    tracker.phase = "inputs"
                    inputs = _inputs(cfg, tr.micro_batch_size)
                    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                                        enabled=autocast_dtype is not None):
                        losses = distiller.forward(inputs, generator)
                    tracker.phase = "backward"
                    losses["total"].backward()
                    del losses, inputs
                tracker.phase = "optimizer"
                if tr.max_grad_norm and tr.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), tr.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                gc.collect()  # anything held only by reference cycles goes before the next step
        for h in handles:
            h.remove()
        distiller.close()
        state_bytes = _bytes(t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))
        teacher_bytes = _bytes([*teacher.parameters(), *teacher.buffers()])
        student_bytes = _bytes([*student.parameters(), *student.buffers()])
        grad_bytes = _bytes(p for p in student.parameters() if p.requires_grad)
    ema_bytes = _bytes(p for p in student.parameters()) if tr.ema else 0  # EMAModel: an fp32 copy on the GPU
    peak = tracker.peak + ema_bytes
    fixed = teacher_bytes + student_bytes + state_bytes + ema_bytes + grad_bytes
    not_modelled = [name for name, on in (("compile", tr.compile), ("channels_last", tr.channels_last),
                                          ("teacher_fp8", tr.teacher_fp8)) if on]
    if cfg.data.kind != "latents":
        not_modelled.append("data.kind=raw: the VAE and both text encoders (0.9 B parameters in SDXL)")
    return {
        "peak_gib": _gib(peak), "peak_bytes": int(peak), "plan_gib": _gib(peak * CALIBRATION),
        "calibration": CALIBRATION,
        "peak_phase": tracker.peak_phase, "micro_batch": tr.micro_batch_size, "accum": accum,
        "teacher_weights_gib": _gib(teacher_bytes), "student_weights_gib": _gib(student_bytes),
        "gradients_gib": _gib(grad_bytes), "optimizer_state_gib": _gib(state_bytes), "ema_gib": _gib(ema_bytes),
        "activations_gib": _gib(max(peak - fixed, 0)), "optimizer": tr.optimizer,
        "mixed_precision": tr.mixed_precision, "teacher_dtype": cfg.teacher.dtype,
        "checkpointing": "all" if tr.gradient_checkpointing and not tr.checkpointing_blocks
        else list(tr.checkpointing_blocks or []), "not_modelled": not_modelled,
    }


def largest_micro_batch(overrides: list[str], budget_gib: float, *, world_size: int = 1
                        ) -> tuple[int | None, list[dict[str, Any]]]:
    """The largest micro-batch (a divisor of the per-process batch, so accumulation keeps the global batch) whose
    `plan_gib` fits in `budget_gib`, by bisection (peak memory grows with the micro-batch); None if even 1 does
    not fit. Returns it with the estimates made on the way."""
    from train.config import load_config

    cfg = load_config(overrides)
    per_process, rest = divmod(cfg.train.global_batch_size, world_size)
    if rest:
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by {world_size} "
                         "processes")
    sizes = [m for m in range(1, per_process + 1) if per_process % m == 0]
    tried: list[dict[str, Any]] = []
    lo, hi, best = 0, len(sizes) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        est = estimate_memory(load_config([*overrides, f"train.micro_batch_size={sizes[mid]}"]),
                              world_size=world_size)
        tried.append(est)
        if est["plan_gib"] <= budget_gib:
            best, lo = sizes[mid], mid + 1
        else:
            hi = mid - 1
    return best, tried


def _gib(nbytes: float) -> float:
    return round(nbytes / GIB, 3)
