"""Inference benchmarks in the KOALA model card's shape: U-Net denoising latency with CFG, VAE decode, one image.

Measured at batch 1 with classifier-free guidance (the U-Net sees batch 2), prompt embeddings precomputed (text
encoders are not timed): for each U-Net (SDXL, KOALA-1B, KOALA-700M; random weights unless a path is given)
the whole `steps`-step Euler loop; the VAE decode of one image; and the full "U-Net with CFG x steps + VAE decode"
image for one model. Latency is the median over `repeats` runs after `warmup` runs, timed with CUDA events on a
GPU (perf_counter on the CPU); peak memory is torch.cuda.max_memory_allocated over the timed runs (weights
included, warm-up and compilation excluded). Speed switches: fp16/bf16, channels_last, fused QKV projections,
torch.compile (whole model or per block, any mode; "max-autotune"/"reduce-overhead" add CUDA graphs), inductor
tuning flags, SDPA backend.

With `tiny=True` the same code runs the tiny teacher and its students at 64 px so the CPU tests cover it.
"""

from __future__ import annotations

import contextlib
import gc
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

from distill.students import STUDENTS, StudentSpec, count_params, derive_student_config, sdxl_base_unet_config
from distill.teachers import DTYPES

PROMPT_TOKENS = 77  # CLIP context length: the cross-attention sequence
N_TIME_IDS = 6  # SDXL micro-conditioning numbers per image
MODELS = ("sdxl", "koala_1b", "koala_700m")
REGIONAL_RECOMPILE_LIMIT = 64  # compiled shape variants allowed per block class with compile=regional

# SDXL-Base-1.0's VAE (shapes only; weights come from vae_path, e.g. madebyollin/sdxl-vae-fp16-fix for fp16).
SDXL_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True,
)
SDXL_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1,
)
_SDPA = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


@dataclass
class SpeedOptions:
    """Switches that trade nothing but compile time for speed (all off = plain eager diffusers)."""

    dtype: str = "fp16"  # weights and activations: fp16 | bf16 | fp32
    channels_last: bool = False  # NHWC memory format for convolutions
    fuse_qkv: bool = False  # diffusers fuse_qkv_projections: one matmul for Q, K, V (K, V in cross-attention)
    compile: str = "none"  # none | full (the whole U-Net / VAE decoder) | regional (every transformer/resnet block)
    compile_mode: str = "default"  # torch.compile mode: default | max-autotune | max-autotune-no-cudagraphs | ...
    compile_backend: str = "inductor"  # "eager" only traces (fast; used by the CPU tests)
    fullgraph: bool = False  # fail instead of falling back on graph breaks (compile=full)
    cuda_graphs: bool = False  # needs compile: picks the CUDA-graph flavour of compile_mode
    inductor_tuning: bool = False  # conv 1x1 as matmul, coordinate-descent tuning, no epilogue fusion
    sdpa: str = "auto"  # scaled-dot-product attention backend: auto | flash | efficient | cudnn | math
    compile_vae: bool = True  # apply compile to the VAE decoder as well


@dataclass
class BenchConfig:
    """What to measure (sizes in px, latency in s)."""

    models: list[str] = field(default_factory=lambda: list(MODELS))
    resolution: int = 1024  # image side; 512 for Turbo shapes
    steps: list[int] = field(default_factory=lambda: [25, 10])
    guidance_scale: float = 5.0  # only the arithmetic of CFG; batch 2 is what costs
    warmup: int = 2  # untimed runs per measurement (compilation happens here)
    repeats: int = 5  # timed runs; the median is reported
    vae: bool = True  # time the VAE decode of one image
    image_model: str | None = "koala_700m"  # time the full image (U-Net x steps + decode) for this model
    image_steps: int = 10
    unet_paths: dict[str, str] = field(default_factory=dict)  # model -> U-Net or pipeline folder (real weights)
    vae_path: str | None = None  # VAE or pipeline folder
    tiny: bool = False  # tiny teacher/student shapes (CPU tests)
    device: str = "auto"
    seed: int = 0
    speed: SpeedOptions = field(default_factory=SpeedOptions)


@dataclass
class Timing:
    """Latency statistics over the timed runs (seconds) and peak memory (GiB, None on the CPU)."""

    median_s: float
    min_s: float
    max_s: float
    runs: int
    peak_gib: float | None


# ------------------------------------------------------------------------------------------------- models


def unet_configs(tiny: bool = False) -> dict[str, dict[str, Any]]:
    """U-Net configs by benchmark name; tiny: the tiny teacher and its students (700m-like: no mid block)."""
    if tiny:
        from distill.tiny import tiny_unet_config

        teacher = tiny_unet_config()
        no_mid = StudentSpec("tiny_no_mid", 1, STUDENTS["tiny"].transformer_layers_per_block, mid_block=False)
        return {"sdxl": teacher, "koala_1b": derive_student_config(teacher, STUDENTS["tiny"]),
                "koala_700m": derive_student_config(teacher, no_mid)}
    base = sdxl_base_unet_config()
    return {"sdxl": base, "koala_1b": derive_student_config(base, STUDENTS["koala_1b"]),
            "koala_700m": derive_student_config(base, STUDENTS["koala_700m"])}


def _weights_folder(path: str | Path, sub: str) -> Path:
    path = Path(path)
    return path / sub if (path / sub / "config.json").is_file() else path


def load_unet(config: dict[str, Any], path: str | None, device: torch.device, dtype: torch.dtype,
              seed: int = 0) -> UNet2DConditionModel:
    """Real weights from a U-Net (or pipeline) folder, else a seeded random U-Net built on the device."""
    if path:
        unet = UNet2DConditionModel.from_pretrained(_weights_folder(path, "unet"), dtype=dtype)
    else:
        torch.manual_seed(seed)
        with torch.device(device):
            unet = UNet2DConditionModel(**config)
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_vae(tiny: bool, path: str | None, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """SDXL's VAE (random unless path is given) or the tiny VAE, in `dtype` (fp16 assumes the fp16-fix VAE)."""
    if path:
        vae = AutoencoderKL.from_pretrained(_weights_folder(path, "vae"), dtype=dtype)
    elif tiny:
        from distill.tiny import tiny_vae

        vae = tiny_vae()
    else:
        with torch.device(device):
            vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def vae_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent pixel (8 for SDXL's VAE, 2 for the tiny one)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ----------------------------------------------------------------------------------------------- speedups


def _compile_mode(opts: SpeedOptions) -> str:
    if not opts.cuda_graphs:
        return opts.compile_mode
    return {"default": "reduce-overhead", "max-autotune-no-cudagraphs": "max-autotune"}.get(
        opts.compile_mode, opts.compile_mode)


def apply_speedups(model: torch.nn.Module, opts: SpeedOptions, *, compile_target: torch.nn.Module | None = None,
                   blocks: tuple[type, ...] = ()) -> torch.nn.Module:
    """Apply the switches in place and return the model.

    compile_target: the submodule compiled with compile=full (default: the model). blocks: the module types
    compiled one by one with compile=regional. Compilation itself happens on the first (warm-up) call.
    """
    if opts.cuda_graphs and opts.compile == "none":
        raise ValueError("cuda_graphs needs compile=full or compile=regional (graphs come from torch.compile)")
    if opts.fuse_qkv and hasattr(model, "fuse_qkv_projections"):
        model.fuse_qkv_projections()
    if opts.channels_last:
        model.to(memory_format=torch.channels_last)
    if opts.inductor_tuning:
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True
        inductor.coordinate_descent_tuning = True
        inductor.coordinate_descent_check_all_directions = True
        inductor.epilogue_fusion = False
    kwargs = dict(mode=_compile_mode(opts), backend=opts.compile_backend)
    if opts.compile_backend != "inductor":
        kwargs.pop("mode")  # modes are inductor options
    if opts.compile == "full":
        (compile_target or model).compile(fullgraph=opts.fullgraph, **kwargs)
    elif opts.compile == "regional":
        # All blocks of one class share one forward code object, so every distinct input shape is another
        # compiled entry for it (SDXL's resnets alone have more than dynamo's default limit of 8). Static
        # shapes keep each entry specialised, as a full compile would be.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, REGIONAL_RECOMPILE_LIMIT)
        for m in model.modules():
            if isinstance(m, blocks):
                m.compile(dynamic=False, **kwargs)
    elif opts.compile != "none":
        raise ValueError(f"compile={opts.compile!r}: one of none, full, regional")
    return model


def speed_up_unet(unet: UNet2DConditionModel, opts: SpeedOptions) -> UNet2DConditionModel:
    """apply_speedups with the U-Net's repeated blocks (transformer blocks and resnets) for regional compile."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return apply_speedups(unet, opts, blocks=(BasicTransformerBlock, ResnetBlock2D))


def speed_up_vae(vae: AutoencoderKL, opts: SpeedOptions) -> AutoencoderKL:
    """apply_speedups on the decoder path (compile=full compiles vae.decoder)."""
    from diffusers.models.resnet import ResnetBlock2D

    if not opts.compile_vae:
        opts = SpeedOptions(**{**asdict(opts), "compile": "none", "cuda_graphs": False})
    return apply_speedups(vae, opts, compile_target=vae.decoder, blocks=(ResnetBlock2D,))


@contextlib.contextmanager
def sdpa_backend(name: str) -> Iterator[None]:
    """Restrict F.scaled_dot_product_attention to one backend ("auto" = PyTorch's choice)."""
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name not in _SDPA:
        raise ValueError(f"sdpa={name!r}: one of auto, {', '.join(_SDPA)}")
    with sdpa_kernel([getattr(SDPBackend, _SDPA[name])]):
        yield


# ------------------------------------------------------------------------------------------------- timing


def time_it(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Timing:
    """Median latency of fn() after warm-up: CUDA events on a GPU, perf_counter on the CPU."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:  # the peak is taken after warm-up so compilation and autotuning workspaces are not counted
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return Timing(statistics.median(times), min(times), max(times), repeats, peak)


def conditioning(config: dict[str, Any], resolution: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> dict[str, Any]:
    """Random CFG-batch (2) prompt embeddings, pooled embeddings and SDXL size/crop ids for one image."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    pooled = config["projection_class_embeddings_input_dim"] - N_TIME_IDS * config["addition_time_embed_dim"]
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2, dtype=dtype)
    return {
        "encoder_hidden_states": torch.randn(2, PROMPT_TOKENS, config["cross_attention_dim"], generator=g)
        .to(device, dtype),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=g).to(device, dtype),
                              "time_ids": time_ids.to(device)},
    }


@torch.no_grad()
def denoise(unet: torch.nn.Module, scheduler: EulerDiscreteScheduler, latents: torch.Tensor, cond: dict[str, Any],
            steps: int, guidance_scale: float, cuda_graphs: bool = False) -> torch.Tensor:
    """The pipeline's Euler loop with CFG (batch 2 through the U-Net); returns the final latents."""
    scheduler.set_timesteps(steps, device=latents.device)
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous output buffer may be reused
        eps = unet(inp, t, return_dict=False, **cond)[0]
        uncond, text = eps.chunk(2)
        x = scheduler.step(uncond + guidance_scale * (text - uncond), t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, cuda_graphs: bool = False) -> torch.Tensor:
    """Latents (scaled space) -> image in [-1, 1], in the VAE's dtype."""
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------- benchmark


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, for the report."""
    import diffusers

    env = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _row(model: str, part: str, steps: int | None, resolution: int, t: Timing, **extra: Any) -> dict[str, Any]:
    row = {"model": model, "part": part, "steps": steps, "resolution": resolution, "latency_s": t.median_s,
           "min_s": t.min_s, "max_s": t.max_s, "runs": t.runs, "peak_gib": t.peak_gib}
    if steps:
        row["per_step_ms"] = 1000 * t.median_s / steps
    row.update(extra)
    return row


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print,
              on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every requested row; returns {"env", "config", "rows"} (JSON-ready).

    on_result, when given, receives the result so far after each row (with "partial": true), so that a run cut
    short by a time limit keeps what it measured."""
    from distill.sampling import pick_device

    device = pick_device(cfg.device)
    opts = cfg.speed
    dtype = DTYPES[opts.dtype]
    configs = unet_configs(cfg.tiny)
    unknown = [m for m in cfg.models + [cfg.image_model or "sdxl"] if m not in configs]
    if unknown:
        raise ValueError(f"unknown models {unknown}; one of {sorted(configs)}")
    rows: list[dict[str, Any]] = []
    env = environment(device)

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_result is not None:
            on_result({"env": env, "config": asdict(cfg), "rows": list(rows), "partial": True})

    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    factor = 2 if cfg.tiny else 8  # the VAE's spatial factor, known before the VAE is loaded
    latent_hw = cfg.resolution // factor
    latents = torch.randn(1, 4, latent_hw, latent_hw, generator=g).to(device, dtype)
    memory = torch.channels_last if opts.channels_last else torch.contiguous_format

    with sdpa_backend(opts.sdpa):
        # Each row's peak memory counts only what it needs resident: the VAE alone, a U-Net alone, or both
        # (the image row, which loads the VAE again next to its U-Net).
        if cfg.vae:
            vae = load_vae(cfg.tiny, cfg.vae_path, device, dtype)
            vae_params = count_params(vae)
            vae = speed_up_vae(vae, opts)
            if vae_factor(vae) != factor:
                raise ValueError(f"the VAE's spatial factor is {vae_factor(vae)}, expected {factor}")
            graphs = opts.cuda_graphs and opts.compile_vae
            t = time_it(lambda: decode(vae, latents.to(memory_format=memory), graphs), device, cfg.warmup,
                        cfg.repeats)
            add(_row("vae", "vae_decode", None, cfg.resolution, t, params=vae_params))
            log(f"vae decode {cfg.resolution}px: {t.median_s * 1000:.1f} ms")
            del vae
            _free()
        models = list(dict.fromkeys(cfg.models + ([cfg.image_model] if cfg.image_model else [])))
        for name in models:
            _bench_unet(cfg, name, configs[name], latents.to(memory_format=memory), device, log, add)
            _free()
    return {"env": env, "config": asdict(cfg), "rows": rows}


def _bench_unet(cfg: BenchConfig, name: str, config: dict[str, Any], latents: torch.Tensor, device: torch.device,
                log: Callable[[str], None], add: Callable[[dict[str, Any]], None]) -> None:
    """Measure the U-Net rows of one model (one per step count) and, for cfg.image_model, the full-image row;
    each row goes to `add` as soon as it is measured."""
    opts, dtype = cfg.speed, DTYPES[cfg.speed.dtype]
    unet = load_unet(config, cfg.unet_paths.get(name), device, dtype, cfg.seed)
    params = count_params(unet)  # before fuse_qkv, which adds fused copies of the projections
    unet = speed_up_unet(unet, opts)
    cond = conditioning(config, cfg.resolution, device, dtype, cfg.seed)
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)

    def unet_loop(steps: int) -> torch.Tensor:
        return denoise(unet, scheduler, latents, cond, steps, cfg.guidance_scale, opts.cuda_graphs)

    if name in cfg.models:
        for steps in cfg.steps:
            t = time_it(lambda s=steps: unet_loop(s), device, cfg.warmup, cfg.repeats)
            add(_row(name, "unet_cfg", steps, cfg.resolution, t, params=params))
            log(f"{name} U-Net x{steps} (CFG): {t.median_s:.4f} s")
    if name == cfg.image_model:
        vae = speed_up_vae(load_vae(cfg.tiny, cfg.vae_path, device, dtype), opts)
        graphs = opts.cuda_graphs and opts.compile_vae
        t = time_it(lambda: decode(vae, unet_loop(cfg.image_steps), graphs), device, cfg.warmup, cfg.repeats)
        add(_row(name, "image", cfg.image_steps, cfg.resolution, t, params=params))
        log(f"{name} image ({cfg.image_steps} steps + decode): {t.median_s:.4f} s")


def speed_summary(opts: dict[str, Any]) -> str:
    """The switches that are on, in one short string."""
    on = [opts["dtype"]]
    on += [k for k in ("channels_last", "fuse_qkv", "cuda_graphs", "inductor_tuning") if opts.get(k)]
    if opts.get("compile", "none") != "none":
        on.append(f"compile={opts['compile']}:{opts['compile_mode']}:{opts['compile_backend']}")
    if opts.get("sdpa", "auto") != "auto":
        on.append(f"sdpa={opts['sdpa']}")
    return ", ".join(on)


def markdown_table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table with the environment and switches on top."""
    env, cfg = result["env"], result["config"]
    where = env.get("gpu") or f"{env.get('cpu')} ({env.get('threads')} threads)"
    lines = [
        f"{where}, torch {env['torch']}, diffusers {env['diffusers']}, {env['date']}. "
        f"Batch 1 with CFG, {'tiny shapes' if cfg['tiny'] else 'real shapes'}, "
        f"median of {cfg['repeats']} after {cfg['warmup']} warm-up. Switches: {speed_summary(cfg['speed'])}."
        + (" Partial: the run stopped before its last row." if result.get("partial") else ""),
        "",
        "| model | params (M) | part | steps | px | latency (s) | per step (ms) | peak (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        per_step = f"{r['per_step_ms']:.1f}" if r.get("per_step_ms") else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['part']} | {r['steps'] or '-'} | "
                     f"{r['resolution']} | {r['latency_s']:.4f} | {per_step} | {peak} |")
    return "\n".join(lines) + "\n"
