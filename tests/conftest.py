"""Shared fixtures. Nothing reaches for a hub or a tracking server: the environment is set before imports."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip cleanly without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny SDXL pipeline folder built once per test session."""
    from distill.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_unets(tiny_pipeline_dir):
    """(teacher, student) tiny U-Nets: the teacher loaded from the tiny pipeline, the student initialised from it."""
    from diffusers import UNet2DConditionModel

    from distill.students import STUDENTS, build_unet, derive_student_config, init_student_from_teacher

    teacher = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet").eval()
    student = build_unet(derive_student_config(dict(teacher.config), STUDENTS["tiny"]))
    init_student_from_teacher(student, teacher)
    return teacher, student


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The demo dataset (scikit-image photos + written captions) as shards, built once per session."""
    from data.demo import build_demo_shards

    out = tmp_path_factory.mktemp("demo_data")
    build_demo_shards(str(out))
    return out
