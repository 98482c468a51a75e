"""Teachers: loading SDXL-family pipelines from local disk, timestep sampling, prediction targets, export scheduler.

Three real families (SDXL-Base, SDXL-Turbo, SDXL-Lightning) and `tiny`, the project's own seeded tiny pipeline.
Only local folders and files are read; nothing reaches for a hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from torch import Tensor

from distill.files import error_summary, safetensors_problem, weights_problem

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TeacherError(ValueError):
    """A teacher that cannot be loaded, in one line naming the config key."""


def teacher_pipeline_dir(tcfg: Any) -> Path:
    """The teacher's pipeline folder: teacher.path, or the tiny pipeline built on first use."""
    if tcfg.path:
        path = Path(tcfg.path)
        if not path.is_dir():
            raise TeacherError(f"teacher.path={path} does not exist (a local diffusers SDXL pipeline folder)")
        return path
    if tcfg.name != "tiny":
        raise TeacherError(f"teacher.path is not set: point it at a local {tcfg.name} diffusers folder")
    from distill.tiny import build_tiny_pipeline, default_tiny_pipeline_dir

    return build_tiny_pipeline(default_tiny_pipeline_dir())


def zeros_for_empty_prompt(path: str | Path | None) -> bool:
    """Whether the teacher pipeline at `path` takes all-zero text embeddings as its unconditional input: its
    model_index.json's force_zeros_for_empty_prompt, which an exported student's pipeline copies and which decides
    what classifier-free guidance feeds the U-Net when no negative prompt is given. diffusers' SDXL default (True)
    when the folder or the key is absent (e.g. the tiny pipeline before it is built)."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text()) if path else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        index = {}
    value = index.get("force_zeros_for_empty_prompt", True) if isinstance(index, dict) else True
    return bool(value)


def _weight_files(folder: Path) -> list[Path]:
    return [*folder.glob("*.safetensors"), *folder.glob("*.bin")]


def has_weights(folder: Path) -> bool:
    """Whether a model folder holds weight files (.safetensors or .bin) that `from_pretrained` loads: not only
    variant files (model.fp16.safetensors, read only when a variant is asked for)."""
    return any(f.name.count(".") == 1 for f in _weight_files(folder))


def variant_only(folder: Path) -> str | None:
    """The name of a variant weight file (x.fp16.safetensors) in a folder that holds no plain one, else None."""
    files = _weight_files(folder)
    return None if not files or has_weights(folder) else sorted(f.name for f in files)[0]


def _json_object(path: Path) -> bool:
    """Whether `path` holds a JSON object (the form of every diffusers config file)."""
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def pipeline_folder_problem(folder: str | Path, *, unet: bool = True, unet_weights: bool = True,
                            vae: bool = True, text: bool = True, index: bool = True, scheduler: bool = True
                            ) -> str | None:
    """What a diffusers SDXL pipeline folder lacks for the parts asked for (None when nothing): model_index.json,
    scheduler/, unet/ config (and weights unless `unet_weights` is False, for a U-Net read from a file), vae/,
    both text encoders and tokenizers; else the first config file that is not JSON or weight file that is cut
    short (files.weights_problem reads their headers; nothing is loaded)."""
    folder = Path(folder)
    wanted: list[tuple[str, bool]] = [("unet", unet_weights)] if unet else []  # (sub-folder, needs weights)
    if vae:
        wanted.append(("vae", True))
    if text:
        wanted += [("text_encoder", True), ("text_encoder_2", True), ("tokenizer", False), ("tokenizer_2", False)]
    missing = [] if not index or (folder / "model_index.json").is_file() else ["model_index.json"]
    damaged: str | None = None
    if scheduler and not (folder / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler/scheduler_config.json")
    for sub, weights in wanted:
        d = folder / sub
        if sub.startswith("tokenizer"):
            if not d.is_dir() or not any(d.iterdir()):
                missing.append(f"{sub}/")
        elif not (d / "config.json").is_file():
            missing.append(f"{sub}/config.json")
        elif weights and (variant := variant_only(d)):  # e.g. a download of the *.fp16.safetensors files alone
            missing.append(f"{sub}/ weights other than variant files such as {variant} (from_pretrained reads "
                           "the plain ones: download diffusion_pytorch_model.safetensors / model.safetensors too)")
        elif weights and not has_weights(d):
            missing.append(f"{sub}/ weights")
        elif weights and not damaged and (damage := weights_problem(d)):
            damaged = f"has a damaged weight file: {sub}/{damage}"
    if not missing:
        configs = ["model_index.json"] * index + ["scheduler/scheduler_config.json"] * scheduler + [
            f"{sub}/config.json" for sub, _ in wanted if not sub.startswith("tokenizer")]
        return next((f"has a damaged {c}: not a JSON object" for c in configs if not _json_object(folder / c)),
                    damaged)
    return f"lacks {', '.join(missing)}: it is not a diffusers SDXL pipeline folder (the save_pretrained layout)"


def teacher_unet_config(tcfg: Any) -> dict[str, Any]:
    """The teacher U-Net's config without loading weights: the folder's, else the shipped one named in config.
    Raises TeacherError when the folder's is not JSON."""
    if tcfg.path and (Path(tcfg.path) / "unet" / "config.json").is_file():
        if not _json_object(Path(tcfg.path) / "unet" / "config.json"):
            raise TeacherError(f"teacher.path={tcfg.path} has a damaged unet/config.json: not a JSON object")
        raw = json.loads((Path(tcfg.path) / "unet" / "config.json").read_text())
        return {k: v for k, v in raw.items() if not k.startswith("_")}
    if tcfg.unet_config == "tiny":
        from distill.tiny import tiny_unet_config

        return tiny_unet_config()
    from distill.students import sdxl_base_unet_config

    return sdxl_base_unet_config()


@dataclass
class TeacherBundle:
    """The frozen parts of a teacher pipeline. vae / text encoders are None when latents are precomputed."""

    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    path: Path | None
    vae: AutoencoderKL | None = None
    tokenizers: list[Any] = field(default_factory=list)
    text_encoders: list[torch.nn.Module] = field(default_factory=list)


def _frozen(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


ORIGINAL_UNET_PREFIX = "model.diffusion_model."  # U-Net tensors in Stability's (A1111/ComfyUI) checkpoint layout


def _unet_file_header(unet_file: str | Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a safetensors file (its header only). Raises TeacherError."""
    from safetensors import SafetensorError, safe_open

    if Path(unet_file).is_file() and (damage := safetensors_problem(unet_file)):
        raise TeacherError(f"teacher.unet_file={unet_file}: {damage}")
    try:
        with safe_open(str(unet_file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise TeacherError(f"teacher.unet_file={unet_file} cannot be read as safetensors: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def _from_original_layout(tensors: dict[str, Tensor], unet_config: dict[str, Any]) -> dict[str, Tensor]:
    """Diffusers names for the U-Net tensors of an original-layout SDXL checkpoint (`model.diffusion_model.*`;
    the VAE and text-encoder tensors beside them are ignored), renamed by diffusers' own single-file converter.
    Works on meta tensors too: the conversion only renames."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(tensors, unet_config)


def unet_file_mismatch(unet_file: str | Path, unet_config: dict[str, Any]) -> str | None:
    """How a safetensors U-Net file differs from a U-Net built from `unet_config` (names and shapes, read from the
    file's header; nothing is loaded), or None when it fits. The file holds either a diffusers U-Net state dict
    (e.g. sdxl_lightning_4step_unet.safetensors) or a whole original-layout SDXL checkpoint, whose U-Net part is
    compared after renaming. Raises TeacherError when the file cannot be read."""
    have = _unet_file_header(unet_file)
    if any(k.startswith(ORIGINAL_UNET_PREFIX) for k in have):
        original = {k: torch.empty(shape, device="meta") for k, shape in have.items()
                    if k.startswith(ORIGINAL_UNET_PREFIX)}
        try:
            have = {k: tuple(v.shape) for k, v in _from_original_layout(original, unet_config).items()}
        except (KeyError, IndexError, ValueError) as exc:  # the converter indexes blocks the file may lack
            return (f"its {len(original)} {ORIGINAL_UNET_PREFIX}* tensors do not convert to this U-Net "
                    f"({type(exc).__name__}: {exc})")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({k: v for k, v in unet_config.items() if not k.startswith("_")})
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if not (missing or unexpected or shapes):
        return None
    parts = [f"{len(missing)} missing (first: {missing[0]})" if missing else "",
             f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else "",
             f"{len(shapes)} of other shapes (first: {shapes[0]} {list(have[shapes[0]])} where the U-Net has "
             f"{list(want[shapes[0]])})" if shapes else ""]
    return f"of its {len(have)} tensors, " + ", ".join(p for p in parts if p)


def read_unet_file(unet_file: str | Path, unet_config: dict[str, Any], device: torch.device | str
                    ) -> dict[str, Tensor]:
    """The U-Net state dict in a checked teacher.unet_file, diffusers names; of an original-layout checkpoint
    only the U-Net tensors are read (its VAE and text encoders stay on disk)."""
    from safetensors import safe_open

    with safe_open(str(unet_file), framework="pt", device=str(device)) as f:
        names = list(f.keys())
        if not any(k.startswith(ORIGINAL_UNET_PREFIX) for k in names):
            return {k: f.get_tensor(k) for k in names}
        original = {k: f.get_tensor(k) for k in names if k.startswith(ORIGINAL_UNET_PREFIX)}
    return _from_original_layout(original, unet_config)


def load_teacher_unet(
    tcfg: Any, path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> UNet2DConditionModel:
    """The teacher U-Net from path/unet, or from teacher.unet_file if set (a diffusers U-Net state dict or an
    original-layout SDXL checkpoint, as safetensors; path/unet gives its config), in `dtype` (default
    teacher.dtype)."""
    dtype = dtype or DTYPES[tcfg.dtype]
    if tcfg.unet_file:
        config = UNet2DConditionModel.load_config(str(path), subfolder="unet")
        problem = unet_file_mismatch(tcfg.unet_file, config)
        if problem:
            raise TeacherError(f"teacher.unet_file={tcfg.unet_file} does not fit {path}/unet: {problem}")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        unet.load_state_dict(read_unet_file(tcfg.unet_file, config, device), strict=True, assign=True)
    else:
        unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", dtype=dtype)
    return _frozen(unet, device, dtype)


def load_vae(path: Path | str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             vae_path: str | None = None) -> AutoencoderKL:
    """The frozen VAE of a pipeline folder (or the folder `vae_path`, e.g. the fp16-fix VAE)."""
    vae = (AutoencoderKL.from_pretrained(str(vae_path), dtype=dtype) if vae_path
           else AutoencoderKL.from_pretrained(str(path), subfolder="vae", dtype=dtype))
    return _frozen(vae, device, dtype)


def load_text_encoders(
    path: Path | str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[list[Any], list[torch.nn.Module]]:
    """SDXL's two tokenizers and frozen text encoders (CLIPTextModel, CLIPTextModelWithProjection)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(str(path), subfolder=sub) for sub in ("tokenizer", "tokenizer_2")]
    encoders = [
        CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder", dtype=dtype),
        CLIPTextModelWithProjection.from_pretrained(str(path), subfolder="text_encoder_2", dtype=dtype),
    ]
    return tokenizers, [_frozen(e, device, dtype) for e in encoders]


def load_teacher(
    tcfg: Any, *, device: torch.device | str = "cpu", with_vae: bool = True, with_text: bool = True,
    vae_dtype: torch.dtype = torch.float32, text_dtype: torch.dtype | None = None,
    unet_dtype: torch.dtype | None = None,
) -> TeacherBundle:
    """Load the frozen teacher: U-Net (in teacher.dtype), noise scheduler and, on request, VAE and text encoders.

    The VAE defaults to fp32 because SDXL's original VAE overflows in fp16 (use teacher.vae_path for the
    fp16-fix VAE). `unet_dtype` overrides teacher.dtype for the U-Net (the trainer loads it in fp32, initialises
    the student from those weights, then casts the teacher down).
    """
    if tcfg.random_init:
        return random_teacher(tcfg, device=device, dtype=unet_dtype)
    from safetensors import SafetensorError

    path = teacher_pipeline_dir(tcfg)
    try:
        return _load_parts(tcfg, path, device, with_vae, with_text, vae_dtype, text_dtype, unet_dtype)
    except (OSError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        # a file damaged in a way its header does not show (the config checks read headers and sizes only)
        raise TeacherError(f"teacher.path={path} cannot be loaded: {error_summary(exc)}") from exc


def _load_parts(tcfg: Any, path: Path, device: torch.device | str, with_vae: bool, with_text: bool,
                vae_dtype: torch.dtype, text_dtype: torch.dtype | None, unet_dtype: torch.dtype | None
                ) -> TeacherBundle:
    unet = load_teacher_unet(tcfg, path, device, dtype=unet_dtype)
    sched_cfg = DDPMScheduler.load_config(str(path), subfolder="scheduler")
    noise_scheduler = DDPMScheduler.from_config(
        sched_cfg, num_train_timesteps=tcfg.num_train_timesteps, prediction_type=tcfg.prediction_type
    )
    bundle = TeacherBundle(unet=unet, noise_scheduler=noise_scheduler, path=path)
    if with_vae:
        bundle.vae = load_vae(path, device=device, dtype=vae_dtype, vae_path=tcfg.vae_path)
    if with_text:
        bundle.tokenizers, bundle.text_encoders = load_text_encoders(
            path, device=device, dtype=text_dtype or DTYPES[tcfg.dtype])
    return bundle


# SDXL-Base-1.0's scheduler config (its scheduler/scheduler_config.json): the tiny pipeline writes it, and teachers
# built without a folder take their noise schedule from it.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def random_teacher(tcfg: Any, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                   std: float = 0.02, seed: int = 0) -> TeacherBundle:
    """A teacher U-Net of teacher.unet_config's shapes with N(0, std) weights and SDXL's noise schedule (no
    VAE or text encoders): for benchmarks at real shapes without weights on disk."""
    from distill.students import build_unet

    unet = build_unet(teacher_unet_config(tcfg), "meta").to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, std, generator=gen)
    unet = _frozen(unet, device, dtype or DTYPES[tcfg.dtype])
    return TeacherBundle(unet=unet, noise_scheduler=sdxl_noise_scheduler(tcfg), path=None)


def sdxl_noise_scheduler(tcfg: Any) -> DDPMScheduler:
    """SDXL's training noise schedule with the teacher's length and prediction type (for teachers without a
    folder: random weights, memory estimates)."""
    return DDPMScheduler(num_train_timesteps=tcfg.num_train_timesteps, prediction_type=tcfg.prediction_type,
                         **{k: SDXL_SCHEDULER_CONFIG[k] for k in ("beta_start", "beta_end", "beta_schedule")})


def trailing_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The few-step "trailing" grid, e.g. 1000 steps, 4 -> [999, 749, 499, 249] (SDXL-Lightning/Turbo); rounded
    to the nearest step as diffusers' trailing spacing does (3 steps: 999, 666, 332)."""
    stride = num_train_timesteps / steps
    return [round(num_train_timesteps - i * stride) - 1 for i in range(steps)]


def sample_timesteps(tcfg: Any, batch: int, *, device: torch.device | str, generator: torch.Generator) -> Tensor:
    """Training timesteps [B] (long): uniform over all training steps (the paper) or from the trailing grid."""
    if tcfg.timesteps == "uniform":
        return torch.randint(0, tcfg.num_train_timesteps, (batch,), device=device, generator=generator)
    grid = torch.tensor(trailing_timesteps(tcfg.num_train_timesteps, tcfg.trailing_steps), device=device)
    return grid[torch.randint(0, len(grid), (batch,), device=device, generator=generator)]


def task_target(scheduler: DDPMScheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the U-Net should predict for the denoising loss, by the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise TeacherError(f"teacher.prediction_type={kind!r} is not supported")


def export_scheduler(tcfg: Any, path: Path) -> EulerDiscreteScheduler:
    """The scheduler written into an exported student pipeline: the teacher's config with its sampler settings."""
    if tcfg.sampler.scheduler != "euler":
        raise TeacherError(f"teacher.sampler.scheduler={tcfg.sampler.scheduler!r} is not supported (euler)")
    cfg = EulerDiscreteScheduler.load_config(str(path), subfolder="scheduler")
    return EulerDiscreteScheduler.from_config(
        cfg, timestep_spacing=tcfg.sampler.timestep_spacing, prediction_type=tcfg.prediction_type
    )
