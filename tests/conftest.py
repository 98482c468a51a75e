"""Shared fixtures. Nothing reaches for a hub or a tracking server: the environment is set before imports."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from distill.students import STUDENTS, build_unet, derive_student_config, init_student_from_teacher  # noqa: E402
from distill.tiny import tiny_unet_config  # noqa: E402


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


def make_tiny_checkpoint(teacher_dir: Path, folder: Path, ema: bool = True) -> Path:
    """A checkpoint folder in the trainer's contract: student/, student_ema/, meta.json (teacher-initialised)."""
    if (folder / "meta.json").is_file():
        return folder
    teacher = UNet2DConditionModel.from_pretrained(teacher_dir / "unet")
    torch.manual_seed(0)
    student = build_unet(derive_student_config(tiny_unet_config(), STUDENTS["tiny"]))
    init_student_from_teacher(student, teacher)
    student.save_pretrained(folder / "student")
    if ema:
        with torch.no_grad():  # an EMA that differs from the raw student, so the test can tell them apart
            for p in student.parameters():
                p.add_(0.01 * torch.randn_like(p))
        student.save_pretrained(folder / "student_ema")
    meta = {"teacher_path": str(teacher_dir), "teacher_name": "tiny", "step": 7}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def x0_checkpoint(ckpt: Path, folder: Path) -> Path:
    """A copy of a tiny checkpoint as if trained against a teacher that predicts x0 (the 1-step Lightning U-Net)."""
    import shutil

    shutil.copytree(ckpt, folder)
    meta = json.loads((folder / "meta.json").read_text())
    meta["config"] = {"teacher": {"prediction_type": "sample"}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tiny_pipeline_dir):
    """The tiny pipeline folder under the name the sampling and eval tests use."""
    return tiny_pipeline_dir


@pytest.fixture(scope="session")
def ckpt(tiny_pipeline_dir, tmp_path_factory):
    """A tiny checkpoint in the trainer's layout (student/, student_ema/, meta.json)."""
    return make_tiny_checkpoint(tiny_pipeline_dir, tmp_path_factory.getbasetemp() / "ckpt_tiny")


@pytest.fixture
def fresh_accelerate():
    """A fresh Accelerate singleton state around an in-process training run."""
    from train.loop import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture
def inject_nan():
    """make(at_steps) -> a patch for a set-up run: the total loss of those steps (0-based state.step) becomes NaN."""
    return _nan_patch


class _NanSteps:
    """The run's Distiller (its taps and all), with the total loss of chosen steps turned to NaN."""

    def __init__(self, run, inner, at_steps: set[int]) -> None:
        self._run, self._inner, self._at = run, inner, at_steps

    def __call__(self, batch, gen):
        losses = self._inner(batch, gen)
        if self._run.state.step in self._at:
            losses["total"] = losses["total"] * float("nan")
        return losses

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def _nan_patch(at_steps: set[int]):
    def patch(run):
        run.distiller = _NanSteps(run, run.distiller, at_steps)

    return patch


def record_file_ops(monkeypatch) -> list[tuple[str, ...]]:
    """("fsync", path), ("rename", source, target) and ("replace", source, target) in the order this process does
    them (paths read back from /proc/self/fd; the test is skipped where there is none)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("reads file names back from /proc/self/fd")
    events: list[tuple[str, ...]] = []
    real = {"fsync": os.fsync, "rename": os.rename, "replace": os.replace}

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real["fsync"](fd)

    def renamer(name):
        def move(src, dst, *args, **kwargs):
            events.append((name, str(src), str(dst)))
            return real[name](src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", renamer("rename"))
    monkeypatch.setattr(os, "replace", renamer("replace"))
    return events
