"""Typed schemas of the teacher, student and distillation config groups (OmegaConf structured configs).

The YAML files under conf/ fill these; an unknown key or a wrong type is rejected when the config is composed.
Each field's meaning and unit is documented here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplerConfig:
    """How the exported student samples by default (written into its scheduler config and used by `sample`)."""

    scheduler: str = "euler"  # scheduler class: euler (EulerDiscreteScheduler)
    timestep_spacing: str = "leading"  # leading | trailing | linspace (diffusers' names)
    steps: int = 25  # number of denoising steps
    guidance_scale: float = 5.0  # classifier-free guidance scale; 0 or 1 disables CFG


@dataclass
class TeacherConfig:
    """A frozen SDXL-family teacher loaded from local disk."""

    name: str = "tiny"  # family: sdxl_base | sdxl_turbo | sdxl_lightning | tiny
    path: str | None = None  # local diffusers SDXL pipeline folder (text encoders, tokenizers, VAE, U-Net)
    unet_file: str | None = None  # optional single .safetensors U-Net that replaces path/unet (SDXL-Lightning)
    vae_path: str | None = None  # optional VAE folder replacing path/vae (e.g. the fp16-fix VAE)
    unet_config: str = "tiny"  # U-Net shapes without weights: sdxl_base (shipped with the project) | tiny
    prediction_type: str = "epsilon"  # what the teacher U-Net predicts: epsilon | v_prediction | sample
    resolution: int = 64  # training image side in pixels (1024 for SDXL/Lightning, 512 for Turbo)
    timesteps: str = "uniform"  # training timestep sampling: uniform over all steps | trailing (few-step grid)
    trailing_steps: int = 4  # size of the trailing grid when timesteps=trailing (4 -> 999, 749, 499, 249)
    num_train_timesteps: int = 1000  # length of the discrete DDPM schedule
    dtype: str = "bf16"  # dtype the frozen teacher U-Net is held in: bf16 | fp16 | fp32
    random_init: bool = False  # benchmarks only: a randomly initialised U-Net of unet_config's shapes, no
    # VAE or text encoders (needs data.kind=latents); timing and memory do not depend on the weights' values
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass
class StudentConfig:
    """A student derived from the teacher's U-Net config; null fields take the named registry entry's value."""

    name: str = "tiny"  # koala_1b | koala_700m | tiny | custom (custom needs the three fields below)
    layers_per_block: list[int] | None = None  # resnets per encoder stage; decoder stages get one more
    transformer_layers_per_block: list[int] | None = None  # transformer depth per stage
    mid_block: bool | None = None  # keep the mid block (KOALA-700M drops it)


@dataclass
class DistillConfig:
    """The KOALA objective L = w_task L_task + w_out L_outKD + w_feat sum_l MSE(f_T^l, f_S^l)."""

    w_task: float = 1.0  # weight of the denoising loss against the true noise
    w_out: float = 1.0  # weight of the output KD loss against the teacher's prediction
    w_feat: float = 1.0  # weight of the summed per-layer feature KD losses
    feature_types: list[str] = field(default_factory=lambda: ["sa"])  # taken at every transformer stage:
    # sa (attn1 output) | ca (attn2) | ffn | res (resnet outputs, at every stage)
    lf_stages: list[str] = field(default_factory=lambda: ["DW-1", "UP-3"])  # stages whose last output is
    # matched (BK-SDM "last feature"); KOALA uses it where there are no transformers
    layer_map: str = "bottom"  # deeper teacher stacks: bottom (student k <- teacher k) | interleave | up
    # probability that a caption is dropped (0 in the paper): it gets the unconditional input guidance feeds the
    # exported student (all-zero embeddings for SDXL's pipelines, else the encoding of "")
    caption_dropout: float = 0.0
