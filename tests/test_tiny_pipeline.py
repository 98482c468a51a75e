"""The tiny SDXL pipeline loads with diffusers, samples, tokenizes to 77 ids and is reproducible."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from distill.students import STUDENTS, build_unet, derive_student_config, init_student_from_teacher
from distill.tiny import (
    MAX_TOKENS,
    VAE_SCALING_FACTOR,
    build_tiny_pipeline,
    is_complete_pipeline,
    measure_vae_scaling_factor,
    tiny_unet_config,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LONG_CAPTION = "a detailed photo of a small red house near a river in the mountains at sunset " * 12


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return StableDiffusionXLPipeline.from_pretrained(tiny_dir)


def test_pipeline_loads_and_samples_requested_size(pipe):
    out = pipe(
        "a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(0),
    )
    image = out.images[0]
    assert image.size == (64, 64)
    # the decoded floats, before a NaN would become a black uint8 pixel: finite and not one flat colour
    arrays = pipe("a photo of a cat", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert arrays.shape == (1, 64, 64, 3) and np.isfinite(arrays).all() and arrays.std() > 0.01


def test_tokenizers_pad_and_truncate_to_77(pipe):
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        ids = tok(LONG_CAPTION, padding="max_length", truncation=True, max_length=tok.model_max_length)
        ids = ids.input_ids
        assert tok.model_max_length == MAX_TOKENS
        assert len(ids) == MAX_TOKENS
    assert pipe.tokenizer_2.pad_token == "!"
    # Learned merges: common caption words are single tokens.
    assert len(pipe.tokenizer("a photo of the city").input_ids) == 2 + 5


def test_build_is_idempotent_and_seeded(tiny_dir, tmp_path):
    marker = tiny_dir / "unet" / "config.json"
    mtime = marker.stat().st_mtime_ns
    assert build_tiny_pipeline(tiny_dir, seed=0) == tiny_dir
    assert marker.stat().st_mtime_ns == mtime  # complete folder: not rebuilt

    again = build_tiny_pipeline(tmp_path / "again", seed=0)
    other = build_tiny_pipeline(tmp_path / "other", seed=1)
    a = UNet2DConditionModel.from_pretrained(tiny_dir / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(again / "unet").state_dict()
    c = UNet2DConditionModel.from_pretrained(other / "unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_incomplete_folder_is_rebuilt(tmp_path):
    folder = tmp_path / "half"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    assert not is_complete_pipeline(folder)
    build_tiny_pipeline(folder)
    assert is_complete_pipeline(folder)


def test_tiny_student_derives_and_initialises(pipe):
    cfg = derive_student_config(tiny_unet_config(), STUDENTS["tiny"])
    student = build_unet(cfg)
    mapping = init_student_from_teacher(student, pipe.unet)
    assert len(mapping) == len(student.state_dict())
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in pipe.unet.parameters())


def test_vae_scaling_factor_gives_unit_std_latents(pipe):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    names += ("retina",)
    photos = []
    for name in names:
        rgb = np.array(getattr(skimage_data, name)())[..., :3]
        small = np.array(Image.fromarray(rgb).resize((64, 64), Image.BICUBIC), dtype=np.float32)
        photos.append(torch.from_numpy(small).permute(2, 0, 1) / 127.5 - 1.0)
    measured = measure_vae_scaling_factor(pipe.vae, torch.stack(photos))
    assert pipe.vae.config.scaling_factor == VAE_SCALING_FACTOR
    assert 0.8 < measured / VAE_SCALING_FACTOR < 1.25
