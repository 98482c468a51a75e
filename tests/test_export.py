"""Exporting a checkpoint (scripts/export.py): which weights, which dtype, a folder diffusers loads, one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_checkpoint
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from scripts import export as script


def _unet(folder) -> dict[str, torch.Tensor]:
    """The tensors as stored (from_pretrained would cast them)."""
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("weights, dtype, folder", [("auto", "fp32", "student_ema"), ("live", "fp16", "student")])
def test_export_writes_the_chosen_weights_as_a_pipeline_that_samples(ckpt, tmp_path, capsys, weights, dtype, folder):
    out = tmp_path / "export"
    assert script.main(["--checkpoint", str(ckpt), "--out", str(out), "--weights", weights, "--dtype", dtype]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["weights"] == folder and summary["step"] == 7 and summary["teacher"] == "tiny"
    exported, source = _unet(out / "unet"), _unet(ckpt / folder)
    assert exported.keys() == source.keys() and summary["unet_params"] == sum(v.numel() for v in source.values())
    want = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    for k, v in source.items():
        assert exported[k].dtype == want and torch.equal(exported[k], v.to(want)), k
    sampler = json.loads((out / "koala_sampler.json").read_text())
    assert sampler["teacher"] == "tiny" and sampler["num_inference_steps"] == 4  # conf/teacher/tiny.yaml's
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    image = pipe("a red bicycle", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_export_errors_are_one_line(ckpt, tiny_pipeline_dir, tmp_path, capsys):
    no_ema = make_tiny_checkpoint(tiny_pipeline_dir, tmp_path / "no_ema", ema=False)
    cases = [
        (["--checkpoint", str(tmp_path), "--out", str(tmp_path / "a")], 2, "is not a training checkpoint folder"),
        (["--checkpoint", str(no_ema), "--out", str(tmp_path / "b"), "--weights", "ema"], 2, "has no student_ema/"),
        (["--checkpoint", str(ckpt), "--out", str(tmp_path / "c"), "--teacher-path", str(tmp_path / "gone")], 2,
         "--teacher-path"),
        # an existing folder that is not the teacher's pipeline: what it lacks, not "is not there"
        (["--checkpoint", str(ckpt), "--out", str(tmp_path / "d"), "--teacher-path", str(tmp_path / "no_ema")], 2,
         "lacks model_index.json, scheduler/scheduler_config.json, vae/config.json"),
    ]
    (tmp_path / "file").write_text("not a folder")
    cases.append((["--checkpoint", str(ckpt), "--out", str(tmp_path / "file" / "export")], 2,
                  f"{tmp_path / 'file'} is a file, so no folder can be made there"))
    # the export replaces --out whole: never a run folder holding the checkpoint, nor a folder of other files
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    mine = tmp_path / "run" / "checkpoints" / "step_000000007"
    shutil.copytree(ckpt, mine)
    cases += [(["--checkpoint", str(mine), "--out", str(tmp_path / "run")], 2, "would replace the checkpoint"),
              (["--checkpoint", str(mine), "--out", str(mine)], 2, "would replace the checkpoint"),
              (["--checkpoint", str(ckpt), "--out", str(tmp_path / "notes")], 2, "holds other files")]
    # a weight file cut short (a copy interrupted): a damaged input, not a failed write (which is exit code 5)
    cut = tmp_path / "run" / "checkpoints" / "step_000000008"
    shutil.copytree(ckpt, cut)
    weights = cut / "student_ema" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    cases.append((["--checkpoint", str(cut), "--out", str(tmp_path / "e")], 2,
                  f"{cut} has a damaged weight file: student_ema/diffusion_pytorch_model.safetensors is cut short"))
    # a run trained with teacher.vae_path (e.g. the fp16-fix VAE) exported where that folder is not: not a failed
    # write (exit code 5) but one line naming the way out, --vae-path
    moved = tmp_path / "run" / "checkpoints" / "step_000000009"
    shutil.copytree(ckpt, moved)
    from omegaconf import OmegaConf

    from train.config import load_config

    meta = json.loads((moved / "meta.json").read_text())
    teacher = OmegaConf.to_container(load_config(["teacher=tiny"]).teacher)
    meta["config"] = {"teacher": {**teacher, "vae_path": str(tmp_path / "gone_vae")}}
    (moved / "meta.json").write_text(json.dumps(meta))
    cases += [(["--checkpoint", str(moved), "--out", str(tmp_path / "f")], 2,
               f"the run's teacher.vae_path {tmp_path / 'gone_vae'} is not a VAE folder"),
              (["--checkpoint", str(ckpt), "--out", str(tmp_path / "g"), "--vae-path", str(tmp_path / "nope")], 2,
               "--vae-path")]
    # weights that do not fit their config.json (a mixed-up copy): damaged input (exit 2), not a failed write (5)
    mixed = tmp_path / "run" / "checkpoints" / "step_000000010"
    shutil.copytree(ckpt, mixed)
    config = json.loads((mixed / "student_ema" / "config.json").read_text())
    config["cross_attention_dim"] = config["cross_attention_dim"] * 2
    (mixed / "student_ema" / "config.json").write_text(json.dumps(config))
    cases.append((["--checkpoint", str(mixed), "--out", str(tmp_path / "h")], 2,
                  f"{mixed}/student_ema cannot be loaded: RuntimeError"))
    # a checkpoint whose saved teacher settings name a sampler the export cannot write (an edited meta.json)
    other = tmp_path / "run" / "checkpoints" / "step_000000011"
    shutil.copytree(ckpt, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["config"] = {"teacher": {**teacher, "sampler": {**teacher["sampler"], "scheduler": "dpmpp"}}}
    (other / "meta.json").write_text(json.dumps(meta))
    cases.append((["--checkpoint", str(other), "--out", str(tmp_path / "i")], 2,
                  "teacher.sampler.scheduler='dpmpp' is not supported (euler)"))
    for argv, code, needle in cases:
        assert script.main(argv) == code, argv
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert script.main(["--checkpoint", str(moved), "--out", str(tmp_path / "run" / "export"), "--vae-path",
                        str(tiny_pipeline_dir / "vae")]) == 0
    StableDiffusionXLPipeline.from_pretrained(tmp_path / "run" / "export")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine" and (mine / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "no_ema", "notes", "run"]  # no temporary left


def test_a_failed_export_advises_free_space_only_for_a_full_disk(tmp_path):
    from train.checkpoint import export_failed

    full = str(export_failed(None, tmp_path / "x", "No space left on device"))
    other = str(export_failed(None, tmp_path / "x", "Permission denied"))
    assert "free space and run the export again" in full and "GiB free there" in full
    assert "free space" not in other and "run the export again once that is fixed" in other


def test_written_files_get_the_umask_permissions(tmp_path, tiny_pipeline_dir):
    """safetensors 0.8 writes owner-only files (0600): teammates could not load an export or a checkpoint.
    Files and folders are widened to what the umask allows, never narrowed."""
    import os
    import stat

    from distill.files import widen_to_umask

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    assert mode(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors") & 0o044 == 0o044  # built here
    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "d" / "w.safetensors").write_bytes(b"x")
    (tmp_path / "d" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "d" / "w.safetensors", 0o600)
    os.chmod(tmp_path / "d" / "run.sh", 0o700)
    old = os.umask(0o077)
    try:
        widen_to_umask(tmp_path / "d")  # a private umask: nothing changes
        assert (mode(tmp_path / "d"), mode(tmp_path / "d" / "w.safetensors")) == (0o700, 0o600)
        os.umask(0o022)
        widen_to_umask(tmp_path / "d")
    finally:
        os.umask(old)
    assert (mode(tmp_path / "d"), mode(tmp_path / "d" / "w.safetensors")) == (0o755, 0o644)
    assert mode(tmp_path / "d" / "run.sh") == 0o744  # widened like any file, its owner bits kept


def test_an_export_killed_between_its_renames_keeps_a_whole_one(tmp_path, tiny_pipeline_dir, tiny_unets, monkeypatch):
    """A new export replaces an earlier one by renaming the earlier one aside, then the new one into place. Killed
    between the two renames, the earlier one is still whole (under export.old); the next export takes over and
    leaves no leftover."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from distill.config import TeacherConfig
    from train.export import export_pipeline

    tcfg = OmegaConf.structured(TeacherConfig(path=str(tiny_pipeline_dir), dtype="fp32"))
    student = tiny_unets[1]
    out = tmp_path / "export"
    export_pipeline(tiny_pipeline_dir, tcfg, student, out)
    first = _unet(out / "unet")
    real_rename = Path.rename

    def killed_at_the_second(self, target):
        if Path(target) == out:
            raise KeyboardInterrupt  # the new export is whole under export.tmp, the earlier one under export.old
        return real_rename(self, target)

    changed = type(student).from_config(student.config)
    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", killed_at_the_second)
        with pytest.raises(KeyboardInterrupt):
            export_pipeline(tiny_pipeline_dir, tcfg, changed, out)
    assert not out.exists()
    kept = _unet(tmp_path / "export.old" / "unet")
    assert kept.keys() == first.keys() and all(torch.equal(kept[k], first[k]) for k in first)
    export_pipeline(tiny_pipeline_dir, tcfg, changed, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    again = _unet(out / "unet")
    assert any(not torch.equal(again[k], first[k]) for k in first)  # the new student's weights
    StableDiffusionXLPipeline.from_pretrained(out)


def test_export_carries_the_runs_prediction_type_and_chosen_vae(ckpt, tiny_pipeline_dir, tmp_path, capsys):
    """A run against an x0 teacher (the 1-step Lightning U-Net) exports a scheduler that samples x0, and a VAE given
    with --vae-path (e.g. SDXL's fp16-fix VAE) is the one copied, not the teacher's."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from train.config import load_config

    x0 = tmp_path / "x0"
    shutil.copytree(ckpt, x0)
    meta = json.loads((x0 / "meta.json").read_text())
    teacher = OmegaConf.to_container(load_config(["teacher=tiny"]).teacher)
    meta["config"] = {"teacher": {**teacher, "prediction_type": "sample"}}
    (x0 / "meta.json").write_text(json.dumps(meta))
    vae = tmp_path / "other_vae"
    shutil.copytree(tiny_pipeline_dir / "vae", vae)
    weights = _unet(vae)  # the same file name as a U-Net's
    save_file({k: v + 0.5 for k, v in weights.items()}, str(vae / "diffusion_pytorch_model.safetensors"))
    out = tmp_path / "export"
    assert script.main(["--checkpoint", str(x0), "--out", str(out), "--vae-path", str(vae)]) == 0
    capsys.readouterr()
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "sample"
    exported = _unet(out / "vae")
    assert all(torch.equal(exported[k], v + 0.5) for k, v in weights.items())
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "sample"
