"""`make bench-train`: the project's own training step, timed at real shapes on random weights.

What runs is what the trainer runs: `train.loop.setup` (Accelerator, teacher, student initialised from it, speed
options, optimizer, data loader) on a config composed from conf/ like any experiment, then `train_one_step`
(micro-batches, accumulation, backward, clipping, the non-finite skip, LR step). The teacher has random weights
at SDXL's shapes (`teacher.random_init`); the data are synthetic latent shards in `make latents`' format at the
teacher's latent size (1024 px -> [4, 128, 128], text [77, 2048], pooled [1280]), read by the real loader.

Reported per configuration: img/s = global batch / median optimizer-step time after warm-up (CUDA events at step
boundaries, no extra synchronisation inside the timed steps; perf_counter on the CPU), where the step's time
goes (`phases_s`: data, inputs, noise, teacher_fwd, student_fwd, loss, backward, optimizer, per optimizer step,
from marks recorded in the same timed steps) and the TFLOP/s each compute phase achieves, the first (compiling)
step's time, MFU = (T + 3 S) x img/s / peak with T and S the teacher's and student's forward FLOPs for one image
(torch.utils.flop_counter on the meta device, so nothing is allocated), peak memory over the timed steps and
over set-up + warm-up, and the options. `compare_plain` measures the plain configuration (every switch off)
first, in the same process, and reports the speed-up. `tiny=True` (the default without CUDA) runs the tiny
teacher and student at 64 px so the CPU covers the same code path in seconds.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

PEAK_TFLOPS = 790.0  # bf16 dense matmul TFLOP/s measured on an H100/H200 (8192^3 product; ../shared/bench anchor)
N_TIME_IDS = 6  # SDXL micro-conditioning numbers per image
TEXT_TOKENS = 77  # CLIP context length
BIG = 10**9  # steps: no LR decay, no log/checkpoint step inside a benchmark

# The switches of each profile (train.* overrides). "plain" is the naive step (../shared/bench/anchor_unets.py):
# bf16 autocast over an fp32 student, bf16 teacher, eager, foreach AdamW, PyTorch's SDPA choice, a host check of
# every update. "fast" adds every switch that keeps the computation; "lowmem" is conf/train/lowmem.yaml as is.
PLAIN = ["train.compile=false", "train.channels_last=false", "train.fused_adam=false", "train.sdpa_backend=auto",
         "train.gradient_checkpointing=false", "train.checkpointing_blocks=[]", "train.teacher_fp8=false"]
FAST = ["train.compile=true", "train.channels_last=true", "train.fused_adam=true", "train.sdpa_backend=flash"]
PROFILES: dict[str, list[str]] = {"plain": PLAIN, "fast": FAST, "lowmem": []}
TINY_EXTRA = ["train.mixed_precision=no", "train.compile_backend=aot_eager"]  # CPU: fp32, trace-only compile
OPTION_KEYS = ("mixed_precision", "optimizer", "fused_adam", "compile", "compile_mode",
               "compile_backend", "channels_last", "sdpa_backend", "gradient_checkpointing", "checkpointing_blocks",
               "teacher_fp8", "max_grad_norm")


@dataclass
class BenchConfig:
    """What to measure. Batches in images; times in seconds."""

    student: str = "koala_1b"  # koala_1b | koala_700m (lowmem: koala_700m)
    profile: str = "fast"  # plain | fast | lowmem
    batch: int | None = None  # images per optimizer step (default 32; tiny 4)
    micro_batch: int | None = None  # images per forward (default: batch; lowmem: the profile's)
    steps: int = 5  # timed optimizer steps (median reported)
    warmup: int = 2  # untimed optimizer steps first (compilation happens here)
    tiny: bool = False  # tiny teacher/student at 64 px (CPU)
    compare_plain: bool = False  # measure the plain profile first, in the same process
    peak_tflops: float = PEAK_TFLOPS  # the MFU denominator, TFLOP/s
    overrides: list[str] = field(default_factory=list)  # Hydra overrides for every measured configuration
    plain_overrides: list[str] = field(default_factory=list)  # ... for the plain one only (e.g. checkpointing)
    data_dir: str | None = None  # synthetic latent shards (default outputs/bench_latents/<shape>; made if missing)
    workers: int | None = None  # data loader workers (default 4 on CUDA, 0 on the CPU)
    fp8_error: bool = False  # measure the FP8 teacher's output error against the bf16 teacher (CUDA >= 8.9)
    min_micro_batch: int = 1  # on out-of-memory the micro-batch is halved down to this, then given up
    dry_run: bool = False  # compose and check every configuration, make the data, build no model, measure nothing


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def environment(device: torch.device) -> dict[str, Any]:
    """Card, versions and date of a measurement."""
    import accelerate
    import diffusers

    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None, "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__, "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


# ------------------------------------------------------------------------------------------------ config


def experiment(bc: BenchConfig) -> str | None:
    """The experiment file a configuration starts from (None: the root config's tiny defaults)."""
    from train.config import ConfigError

    if bc.tiny:
        return None
    if bc.profile == "lowmem":
        if bc.student != "koala_700m":
            raise ConfigError("the lowmem profile is KOALA-700M's (conf/experiment/koala_700m_lowmem.yaml)")
        return "koala_700m_lowmem"
    if bc.student not in ("koala_1b", "koala_700m"):
        raise ConfigError(f"student={bc.student!r}: koala_1b or koala_700m")
    return bc.student


def compose(bc: BenchConfig, profile: str, shards: str, output_dir: str, *, workers: int,
            extra: list[str] | None = None) -> Any:
    """The run config of one measurement: the experiment, the benchmark's fixed settings, the profile's switches,
    then `bc.overrides` and `extra`; checked like a training run's."""
    from train.config import load_config, validate

    base = _base(bc)
    fixed = ["teacher.random_init=true", "data.kind=latents", f"data.shards={shards}", "data.resampled=true",
             f"data.num_workers={workers}", "tracking=none", "train.export=false", "train.sample_every=0",
             "train.sample_at_end=false", "train.checkpoint_every=0", "train.ema=false", f"train.max_steps={BIG}",
             f"train.log_every={BIG}", f"train.output_dir={output_dir}"]
    micro = bc.micro_batch or (None if profile == "lowmem" else bc.batch)  # lowmem keeps its own micro-batch
    batch = ([f"train.global_batch_size={bc.batch}"] if bc.batch else []) + (
        [f"train.micro_batch_size={micro}"] if micro else [])
    cfg = load_config(base + fixed + (TINY_EXTRA if bc.tiny else []) + PROFILES[profile] + batch
                      + list(bc.overrides) + list(extra or []))
    cfg.data.shuffle_buffer = max(4, 2 * cfg.train.micro_batch_size)
    validate(cfg)
    return cfg


def _base(bc: BenchConfig) -> list[str]:
    """The overrides that pick teacher, student and train group: an experiment file, or the tiny models."""
    exp = experiment(bc)
    if exp:
        return [f"+experiment={exp}"]
    return ["teacher=tiny", "student=tiny", *(["train=lowmem"] if bc.profile == "lowmem" else [])]


def latent_shape(cfg: Any) -> dict[str, Any]:
    """Latent [C, h, w], text [tokens, D] and pooled [P] of the teacher (its U-Net config's sample size)."""
    from distill.teachers import teacher_unet_config

    u = teacher_unet_config(cfg.teacher)
    return {"latents": (u["in_channels"], u["sample_size"], u["sample_size"]), "text_dim": u["cross_attention_dim"],
            "pooled_dim": u["projection_class_embeddings_input_dim"] - N_TIME_IDS * u["addition_time_embed_dim"]}


def ensure_shards(cfg: Any, folder: str | None, samples: int) -> str:
    """Synthetic latent shards at the teacher's shapes in `folder` (default outputs/bench_latents/<shape>); reused
    when a complete set with the same shapes is there. A folder that holds shards this function did not write
    (e.g. `make latents` output) is refused: ConfigError (one line), nothing overwritten."""
    from data.synthetic import write_synthetic_latent_shards

    shape = latent_shape(cfg)
    c, h, w = shape["latents"]
    root = Path(folder or Path(__file__).resolve().parents[1] / "outputs" / "bench_latents" /
                f"{c}x{h}x{w}_d{shape['text_dim']}_p{shape['pooled_dim']}")
    num_shards = 4
    per_shard = max(2, math.ceil(samples / num_shards))
    if root.exists() and not root.is_dir():
        from train.config import ConfigError

        raise ConfigError(f"--data {root} is a file: give a folder for the benchmark's synthetic shards")
    marker = root / "bench_shape.json"
    want = {**shape, "latents": list(shape["latents"]), "num_shards": num_shards, "per_shard": per_shard}
    if not (marker.is_file() and json.loads(marker.read_text()) == want):
        if not marker.is_file() and any(root.glob("*.tar")):
            from train.config import ConfigError

            raise ConfigError(f"{root} holds shards that the benchmark did not write (no {marker.name}): it writes "
                             "its own synthetic ones there, so give an empty or new folder")
        from distill.files import write_text_atomic

        resolution = cfg.teacher.resolution
        # claimed before the first byte: a run stopped while writing leaves a folder the next run knows as its own
        # (and rewrites), not shards it would refuse as someone else's, nor a marker vouching for half-written ones
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, json.dumps({"writing": True}))
        write_synthetic_latent_shards(str(root), num_shards=num_shards, samples_per_shard=per_shard,
                                      latent_shape=(c, h, w), text_tokens=TEXT_TOKENS, text_dim=shape["text_dim"],
                                      pooled_dim=shape["pooled_dim"], image_size=(resolution, resolution))
        write_text_atomic(marker, json.dumps(want))
    return str(root)


# ------------------------------------------------------------------------------------------------- FLOPs


def forward_flops(cfg: Any) -> tuple[int, int]:
    """(teacher, student) forward FLOPs for one image at the teacher's latent size, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from distill.students import build_unet, derive_student_config, resolve_spec
    from distill.teachers import teacher_unet_config

    t_cfg = teacher_unet_config(cfg.teacher)
    s = cfg.student
    s_cfg = derive_student_config(t_cfg, resolve_spec(s.name, s.layers_per_block, s.transformer_layers_per_block,
                                                      s.mid_block))
    shape = latent_shape(cfg)
    out = []
    for config in (t_cfg, s_cfg):
        unet = build_unet(config, "meta")
        with torch.device("meta"):
            kwargs = dict(encoder_hidden_states=torch.empty(1, TEXT_TOKENS, shape["text_dim"]),
                          added_cond_kwargs={"text_embeds": torch.empty(1, shape["pooled_dim"]),
                                             "time_ids": torch.empty(1, N_TIME_IDS)})
            sample, timestep = torch.empty(1, *shape["latents"]), torch.tensor([500])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(sample, timestep, **kwargs)
        out.append(int(counter.get_total_flops()))
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------ FP8 error


def fp8_teacher_error(cfg: Any, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """Relative error of the FP8 teacher against the bf16 teacher on the same random inputs: output eps and every
    self-attention feature (relative RMS error, and cosine similarity of the output). Random weights: real SDXL
    weights have outlier channels that per-row scales may handle worse; re-measure with teacher.path set.

    Returns {"skipped": reason} where FP8 cannot run (no CUDA, capability < 8.9)."""
    from distill.features import FeatureTap
    from distill.perf import fp8_refusal, quantize_teacher_fp8
    from distill.teachers import DTYPES, load_teacher

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (why := fp8_refusal(device)) is not None:
        return {"skipped": why}
    bundle = load_teacher(cfg.teacher, device=device, with_vae=False, with_text=False,
                          unet_dtype=DTYPES[cfg.teacher.dtype])
    unet = bundle.unet
    shape = latent_shape(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = unet.dtype
    x = torch.randn(batch, *shape["latents"], generator=g, device=device).to(dtype)
    kwargs = dict(encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, shape["text_dim"], generator=g,
                                                    device=device).to(dtype),
                  added_cond_kwargs={"text_embeds": torch.randn(batch, shape["pooled_dim"], generator=g,
                                                                device=device).to(dtype),
                                     "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch,
                                                              device=device, dtype=dtype)})
    t = torch.tensor([500] * batch, device=device)
    paths = {n: n for n, _ in unet.named_modules() if n.endswith(".attn1")}
    results = []
    for quantised in (False, True):
        if quantised:
            quantize_teacher_fp8(unet)
        with FeatureTap(unet, paths) as tap, torch.no_grad():
            out = unet(x, t, **kwargs).sample.float()
            feats = {k: v.float() for k, v in tap.features.items()}
        results.append((out, feats))
    (ref, ref_f), (q, q_f) = results

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp(min=1e-12))

    feat_errors = {k: rel(q_f[k], ref_f[k]) for k in ref_f}
    worst = max(feat_errors, key=feat_errors.get) if feat_errors else None
    result = {"out_rel_rms": round(rel(q, ref), 5),
              "out_cosine": round(float(torch.nn.functional.cosine_similarity(q.flatten(), ref.flatten(), dim=0)), 6),
              "feat_rel_rms_mean": round(statistics.fmean(feat_errors.values()), 5) if feat_errors else None,
              "feat_rel_rms_max": round(feat_errors[worst], 5) if worst else None, "feat_worst": worst,
              "batch": batch, "weights": "random N(0, 0.02)"}
    del unet, bundle, results
    _free(device)
    return result


# ------------------------------------------------------------------------------------------------ timing


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_steps(step: Callable[[], Any], device: torch.device, n: int) -> list[float]:
    """Seconds of each of n calls of `step`: CUDA events at the step boundaries (the host is never made to wait
    inside the timed steps), perf_counter on the CPU."""
    if device.type != "cuda":
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    events[0].record()
    for i in range(n):
        step()
        events[i + 1].record()
    torch.cuda.synchronize(device)
    return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(n)]


def step_stats(times: list[float], batch: int) -> dict[str, float]:
    """Step time (s) as the median of the timed steps, so one slow step (a recompile, a GC pause, a neighbour on
    the node) does not move it, with their min and max; img/s = `batch` images over the median step. Unrounded."""
    med = statistics.median(times)
    return {"step_s": med, "step_s_min": min(times), "step_s_max": max(times), "img_per_s": batch / med}


def phase_tflops(phases: dict[str, float], teacher_flops: int, student_flops: int, batch: int
                 ) -> dict[str, float]:
    """Achieved TFLOP/s of the compute phases: the teacher's and the student's forward, and the backward pass
    counted as 2x the student's forward (a recomputation under checkpointing is work not counted, so it shows as
    a lower rate). `phases` are seconds per optimizer step of `batch` images; FLOPs are per image."""
    work = {"teacher_fwd": teacher_flops, "student_fwd": student_flops, "backward": 2 * student_flops}
    return {k: _sig(work[k] * batch / phases[k] / 1e12) for k in work if phases.get(k)}


def measure(cfg: Any, bc: BenchConfig, profile: str, flops: tuple[int, int], log: Callable[[str], None] = _log
            ) -> dict[str, Any]:
    """Set up the run of `cfg` with the trainer's own `setup`, run warm-up steps, time `steps` steps."""
    from train.loop import reset_accelerate, setup, train_one_step

    reset_accelerate()
    if torch.cuda.is_available():  # the peak of this profile only, not of one measured before it in the process
        torch.cuda.reset_peak_memory_stats()
    t_setup = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # set-up's tables go to stderr: stdout carries the JSON only
        run = setup(cfg, show_progress=False)
    device = run.accelerator.device
    cuda = device.type == "cuda"
    run.loader_iter = iter(run.loader)
    setup_s = time.perf_counter() - t_setup
    log(f"[{profile}] set up in {setup_s:.1f} s; warm-up {bc.warmup} step(s)")
    warm = []
    last: dict[str, torch.Tensor] = {}
    for _ in range(bc.warmup):
        t0 = time.perf_counter()
        last = train_one_step(run)
        if cuda:
            torch.cuda.synchronize(device)
        warm.append(time.perf_counter() - t0)
        log(f"[{profile}] warm-up step: {warm[-1]:.2f} s")
    peak_warm = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    from distill.perf import PhaseTimer

    timer = run.distiller.phases = PhaseTimer(device)  # marks only: the host never waits for them

    def step() -> None:
        nonlocal last
        last = train_one_step(run)
        timer.end()

    t0 = time.perf_counter()
    times = time_steps(step, device, bc.steps)
    wall = time.perf_counter() - t0
    run.distiller.phases = None
    phases = {k: v / bc.steps for k, v in timer.totals().items()}
    tr = cfg.train
    stats = step_stats(times, tr.global_batch_size)
    teacher_flops, student_flops = flops
    per_img = teacher_flops + 3 * student_flops
    skip = run.device_skip or None
    nonfinite = skip.read()[0] if skip is not None else run.state.nonfinite_total
    rec = {
        "profile": profile, "teacher": cfg.teacher.name, "student": cfg.student.name, "tiny": bc.tiny,
        "resolution": cfg.teacher.resolution, "latent": list(latent_shape(cfg)["latents"]),
        "batch": tr.global_batch_size, "micro_batch": tr.micro_batch_size, "accum": run.accum,
        "teacher_dtype": cfg.teacher.dtype, "options": {k: _plain(tr[k]) for k in OPTION_KEYS},
        "warmup": bc.warmup, "steps": bc.steps, "setup_s": round(setup_s, 2),
        "first_step_s": round(warm[0], 3) if warm else None,
        **{k: round(v, 3 if k == "img_per_s" else 4) for k, v in stats.items()},
        "wall_img_per_s": round(tr.global_batch_size * bc.steps / wall, 3),
        "teacher_fwd_tflop": _sig(teacher_flops / 1e12), "student_fwd_tflop": _sig(student_flops / 1e12),
        "tflop_per_img": _sig(per_img / 1e12), "peak_tflops": bc.peak_tflops,
        "mfu": _sig(per_img * stats["img_per_s"] / (bc.peak_tflops * 1e12)),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "peak_gib_warmup": round(peak_warm, 2) if peak_warm is not None else None,
        "reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2) if cuda else None,
        "loss_total": float(last["total"]) if last else None, "loss_kd": float(last["kd"]) if last else None,
        "nonfinite_skipped": int(nonfinite),
        "phases_s": {k: round(v, 4) for k, v in phases.items()},
        "phase_tflops": phase_tflops(phases, teacher_flops, student_flops, tr.global_batch_size),
    }
    log(f"[{profile}] {rec['img_per_s']} img/s, step {rec['step_s']} s, MFU {rec['mfu']}, peak {rec['peak_gib']} GiB")
    close = getattr(run.distiller, "close", None)
    if callable(close):
        close()
    run.loader_iter = None
    run = None  # drop the models before the next configuration is set up
    _free(device)
    reset_accelerate()
    return rec


def _sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (tiny CPU MFUs stay non-zero)."""
    return float(f"{x:.{digits}g}")


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain lists/dicts for JSON."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def measure_or_shrink(bc: BenchConfig, profile: str, shards: str, output_dir: str, workers: int,
                      flops: tuple[int, int], log: Callable[[str], None], *, extra: list[str] | None = None
                      ) -> tuple[dict[str, Any], Any]:
    """`measure` one profile; when the GPU runs out of memory, halve the micro-batch (the optimizer step keeps its
    batch through accumulation) and measure again, down to `bc.min_micro_batch`. The record lists the micro-batches
    that did not fit under `oom_micro_batches`; returns (record, the config measured)."""
    from train.loop import reset_accelerate

    micro = bc.micro_batch
    failed: list[int] = []
    while True:
        cfg = compose(replace(bc, micro_batch=micro), profile, shards, output_dir, workers=workers, extra=extra)
        if failed and cfg.train.micro_batch_size >= failed[-1]:  # an override pins the micro-batch
            log(f"[{profile}] out of memory at micro-batch {failed[-1]}, which an override pins; not measured")
            return {"profile": profile, "oom_micro_batches": failed, "img_per_s": None}, cfg
        try:
            rec = measure(cfg, bc, profile, flops, log)
        except torch.OutOfMemoryError:
            rec = None
        if rec is not None:
            rec["oom_micro_batches"] = failed
            return rec, cfg
        # Outside the except block the traceback is gone, and with it the frames that held the models.
        failed.append(cfg.train.micro_batch_size)
        _free(torch.device("cuda"))
        reset_accelerate()
        micro = cfg.train.micro_batch_size // 2
        if micro < bc.min_micro_batch:
            log(f"[{profile}] out of memory at micro-batch {failed[-1]}; not measured")
            return {"profile": profile, "oom_micro_batches": failed, "img_per_s": None}, cfg
        log(f"[{profile}] out of memory at micro-batch {failed[-1]}; trying {micro}")


def dry_run(bc: BenchConfig, shards: str, output_dir: str, workers: int) -> dict[str, Any]:
    """What `run_bench(bc)` would measure, checked without a GPU: every configuration composed and validated like a
    training run's (one-line errors for a bad override), with its batch layout and switches. No model is built."""
    result: dict[str, Any] = {"bench": "train", "dry_run": True, "configs": {}}
    for profile in (["plain"] if bc.compare_plain else []) + [bc.profile]:
        extra = bc.plain_overrides if profile == "plain" else None
        cfg = compose(bc, profile, shards, f"{output_dir}/{profile}", workers=workers, extra=extra)
        tr = cfg.train
        result["configs"][profile] = {
            "teacher": cfg.teacher.name, "student": cfg.student.name, "teacher_dtype": cfg.teacher.dtype,
            "batch": tr.global_batch_size, "micro_batch": tr.micro_batch_size,
            "accum": tr.global_batch_size // tr.micro_batch_size, "options": {k: _plain(tr[k]) for k in OPTION_KEYS}}
    result["config"] = asdict(bc)
    return result


def run_bench(bc: BenchConfig, log: Callable[[str], None] = _log,
              on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure bc.profile (and first the plain profile with compare_plain); return one JSON-able dict: the
    environment, the measured profile's record at the top level, `plain` and `speedup_vs_plain` when compared,
    `fp8_error` when asked for. With compare_plain, on_result receives the plain record alone as soon as it is
    measured (with "partial": true), so that a time limit during the second measurement keeps the first."""
    if not bc.tiny and not bc.dry_run and not torch.cuda.is_available():
        raise RuntimeError("real shapes need CUDA: use tiny=True (--tiny) on the CPU")
    batch = bc.batch or (4 if bc.tiny else 32)
    bc = replace(bc, batch=batch, micro_batch=bc.micro_batch or (min(batch, 2) if bc.tiny else None))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = bc.workers if bc.workers is not None else (4 if device.type == "cuda" or bc.dry_run else 0)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        from train.config import load_config

        shape_cfg = load_config(_base(bc))
        micro = bc.micro_batch or bc.batch
        shards = ensure_shards(shape_cfg, bc.data_dir, samples=max(16, 2 * micro))
        if bc.dry_run:
            return dry_run(bc, shards, tmp, workers)
        flops = forward_flops(shape_cfg)
        result: dict[str, Any] = {"bench": "train", **environment(device)}
        plain = None
        if bc.compare_plain:
            plain, _ = measure_or_shrink(bc, "plain", shards, f"{tmp}/plain", workers, flops, log,
                                         extra=bc.plain_overrides)
            if on_result is not None:
                on_result({**result, **plain, "config": asdict(bc), "partial": True})
        rec, main_cfg = measure_or_shrink(bc, bc.profile, shards, f"{tmp}/{bc.profile}", workers, flops, log,
                                          extra=bc.plain_overrides if bc.profile == "plain" else None)
        result.update(rec)
        if plain is not None:
            result["plain"] = plain
            if result["img_per_s"] and plain["img_per_s"]:
                result["speedup_vs_plain"] = round(result["img_per_s"] / plain["img_per_s"], 3)
        if bc.fp8_error:
            result["fp8_error"] = fp8_teacher_error(main_cfg)
    result["config"] = asdict(bc)
    return result


# --------------------------------------------------------------------------------------------- reporting


def markdown(result: dict[str, Any]) -> str:
    """A Markdown table of the measured configuration(s), with the environment line above it."""
    env = (f"{result['device']}, torch {result['torch']}, CUDA {result['cuda']}, diffusers {result['diffusers']}, "
           f"accelerate {result['accelerate']}, {result['date']}")
    head = ("| profile | student | batch (micro x accum) | options | img/s | step s | MFU | peak GiB (warm-up) | "
            "first step s |\n|---|---|---|---|---|---|---|---|---|")
    rows = []
    for rec in [r for r in (result.get("plain"), result) if r]:
        if rec.get("img_per_s") is None:
            rows.append(f"| {rec['profile']} | out of memory at micro-batch {rec['oom_micro_batches']} |||||||")
            continue
        o = dict(rec["options"])
        if not o["compile"]:
            o.pop("compile_mode"), o.pop("compile_backend")
        opts = f"teacher {rec['teacher_dtype']}, " + ", ".join(f"{k}={v}" for k, v in o.items()
                         if v not in (False, None, [], "auto", "default", "inductor")
                         or k == "mixed_precision")
        peak = f"{rec['peak_gib']} ({rec['peak_gib_warmup']})" if rec["peak_gib"] is not None else "-"
        rows.append(f"| {rec['profile']} | {rec['student']} | {rec['batch']} ({rec['micro_batch']} x {rec['accum']}) "
                    f"| {opts} | {rec['img_per_s']} | {rec['step_s']} | {rec['mfu']} | {peak} | "
                    f"{rec['first_step_s']} |")
    lines = [env, "", head, *rows]
    if result.get("partial"):
        lines += ["", f"Partial: only the {result['profile']} measurement finished."]
    for rec in [r for r in (result.get("plain"), result) if r and r.get("phases_s")]:
        rates = rec.get("phase_tflops", {})
        parts = [f"{k} {v:.3g}" + (f" ({rates[k]:.3g} TFLOP/s)" if k in rates else "")
                 for k, v in rec["phases_s"].items()]
        lines += ["", f"{rec['profile']}, seconds per step: " + ", ".join(parts)]
    if result.get("speedup_vs_plain"):
        lines += ["", f"speed-up vs plain: {result['speedup_vs_plain']}x"]
    if result.get("fp8_error"):
        lines += ["", f"FP8 teacher error: {json.dumps(result['fp8_error'])}"]
    return "\n".join(lines) + "\n"
