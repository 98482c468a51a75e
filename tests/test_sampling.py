"""Sampling from pipeline folders and checkpoints on the tiny pipeline: defaults, seeds, EMA, files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import x0_checkpoint

from distill.sampling import (
    SAMPLER_DEFAULTS,
    SampleSettings,
    SourceError,
    family_settings,
    generate,
    infer_family,
    load_source,
    read_prompts,
    resolve_settings,
    sample,
    teacher_settings,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
FAST = dict(steps=2, height=32, width=32)  # 2 steps at 32 px (16x16 latents) keep each image fast


def make_exported(teacher_dir: Path, ckpt: Path, folder: Path, family: str = "sdxl_lightning") -> Path:
    """An exported student folder: the teacher's pipeline with unet/ replaced and koala_sampler.json."""
    if (folder / "model_index.json").is_file():
        return folder
    shutil.copytree(teacher_dir, folder)
    shutil.rmtree(folder / "unet")
    shutil.copytree(ckpt / "student", folder / "unet")
    d = SAMPLER_DEFAULTS[family]
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    sched["timestep_spacing"] = d.timestep_spacing
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    (folder / "koala_sampler.json").write_text(json.dumps({
        "teacher": family, "num_inference_steps": d.steps, "guidance_scale": d.guidance_scale,
        "timestep_spacing": d.timestep_spacing, "resolution": 64,
    }))
    return folder


@pytest.fixture(scope="module")
def exported(tiny_dir, ckpt, tmp_path_factory):
    return make_exported(tiny_dir, ckpt, tmp_path_factory.getbasetemp() / "exported_lightning")


def test_sampler_table_has_every_family():
    assert set(SAMPLER_DEFAULTS) == {"sdxl_base", "sdxl_turbo", "sdxl_lightning", "tiny"}
    assert SAMPLER_DEFAULTS["sdxl_lightning"].steps == 10
    assert SAMPLER_DEFAULTS["sdxl_lightning"].guidance_scale == 3.5
    assert SAMPLER_DEFAULTS["sdxl_lightning"].timestep_spacing == "trailing"
    assert SAMPLER_DEFAULTS["sdxl_base"].steps == 25 and SAMPLER_DEFAULTS["sdxl_base"].guidance_scale == 5.0


def test_sampler_table_agrees_with_teacher_configs():
    """conf/teacher/*.yaml carries the same sampler settings (written into exported students)."""
    import omegaconf

    base = REPO / "conf" / "teacher" / "sdxl_base.yaml"
    for family, d in SAMPLER_DEFAULTS.items():
        cfg = omegaconf.OmegaConf.load(REPO / "conf" / "teacher" / f"{family}.yaml")
        if "defaults" in cfg:  # the Turbo/Lightning files extend sdxl_base.yaml
            cfg = omegaconf.OmegaConf.merge(omegaconf.OmegaConf.load(base), cfg)
        s = cfg.sampler
        assert (s.timestep_spacing, s.steps, s.guidance_scale) == (d.timestep_spacing, d.steps, d.guidance_scale)
        assert cfg.resolution == d.resolution


def test_shipped_prompt_sets(tmp_path):
    prompts = read_prompts("eval")
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    assert 5 <= len(read_prompts("smoke")) <= 16
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\na cat\n  a dog  \n")
    assert read_prompts(f) == ["a cat", "a dog"]
    assert read_prompts("eval", limit=3) == prompts[:3]


def test_checkpoint_source_uses_ema_and_family_spacing(ckpt):
    loaded = load_source(ckpt)
    assert loaded.kind == "checkpoint" and loaded.family == "tiny" and loaded.step == 7
    assert loaded.unet_folder == "student_ema"
    assert loaded.defaults.steps == SAMPLER_DEFAULTS["tiny"].steps
    assert loaded.pipe.scheduler.config.timestep_spacing == "leading"
    live = load_source(ckpt, use_ema=False)
    assert live.unet_folder == "student"
    from safetensors.torch import load_file

    for source, folder in ((loaded, "student_ema"), (live, "student")):  # the weights themselves, not the label
        saved = load_file(str(ckpt / folder / "diffusion_pytorch_model.safetensors"))
        weights = source.pipe.unet.state_dict()
        assert saved.keys() == weights.keys()
        assert all(torch.equal(weights[k], v) for k, v in saved.items()), folder
    lightning = load_source(ckpt, family="sdxl_lightning")
    assert lightning.pipe.scheduler.config.timestep_spacing == "trailing"


def test_a_checkpoint_samples_with_its_runs_sampler_settings(ckpt, tmp_path):
    """A run's teacher.sampler and resolution (written into its export's koala_sampler.json) are its checkpoints'
    defaults too, and its teacher.vae_path decodes: they used the family's table and the teacher folder's VAE, so
    a checkpoint and its export sampled differently. An explicit family still asks for that family's defaults."""
    import shutil

    from omegaconf import OmegaConf

    from train.config import load_config

    run = tmp_path / "step_000000007"
    shutil.copytree(ckpt, run)
    meta = json.loads((run / "meta.json").read_text())
    teacher = OmegaConf.to_container(load_config(["teacher=tiny", "teacher.sampler.steps=2",
                                                  "teacher.sampler.guidance_scale=0", "teacher.resolution=32",
                                                  "teacher.sampler.timestep_spacing=trailing"]).teacher)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(meta["teacher_path"]) / "vae")  # another VAE: the run's vae_path
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)
    vae.save_pretrained(tmp_path / "vae_fix")
    meta["config"] = {"teacher": {**teacher, "vae_path": str(tmp_path / "vae_fix")}}
    (run / "meta.json").write_text(json.dumps(meta))
    loaded = load_source(run)
    torch.testing.assert_close(loaded.pipe.vae.decoder.conv_out.bias, vae.decoder.conv_out.bias)  # as its export
    d = loaded.defaults
    assert (d.steps, d.guidance_scale, d.height, d.width, d.timestep_spacing) == (2, 0.0, 32, 32, "trailing")
    assert loaded.pipe.scheduler.config.timestep_spacing == "trailing"
    assert load_source(run, family="tiny").defaults.steps == SAMPLER_DEFAULTS["tiny"].steps


def test_a_checkpoint_samples_with_the_prediction_type_it_was_trained_on(ckpt, tmp_path):
    """The teacher folder's scheduler says epsilon; a student trained on an x0 teacher must be sampled as x0."""
    assert load_source(ckpt).pipe.scheduler.config.prediction_type == "epsilon"
    x0 = load_source(x0_checkpoint(ckpt, tmp_path / "x0"))
    assert x0.pipe.scheduler.config.prediction_type == "sample"
    assert x0.pipe.scheduler.config.timestep_spacing == "leading"  # the rest of the sampler is unchanged


def test_exported_folder_keeps_its_scheduler_and_sampler_file(exported, tiny_dir):
    assert infer_family(exported) == "sdxl_lightning"
    assert infer_family(tiny_dir) == "tiny"
    loaded = load_source(exported)
    assert loaded.kind == "pipeline" and loaded.family == "sdxl_lightning"
    assert loaded.pipe.scheduler.config.timestep_spacing == "trailing"
    assert loaded.defaults.timestep_spacing is None  # the folder's scheduler is kept
    assert (loaded.defaults.steps, loaded.defaults.guidance_scale, loaded.defaults.height) == (10, 3.5, 64)
    assert family_settings("sdxl_turbo").height == 512


def test_not_a_source(tmp_path):
    with pytest.raises(SourceError):
        load_source(tmp_path)


def test_damaged_sources_are_one_line(ckpt, tiny_dir, tmp_path):
    """A weight file cut short, or a meta.json that is not JSON, was a diffusers or json traceback in sample and
    eval; now each is a SourceError naming the file (which the scripts print as one line)."""
    cut = tmp_path / "ckpt"
    shutil.copytree(ckpt, cut)
    weights = cut / "student_ema" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SourceError, match="has a damaged weight file: student_ema/diffusion_pytorch_model.safetens"):
        load_source(cut)
    (cut / "meta.json").write_text('{"step": 2, ')
    with pytest.raises(SourceError, match="meta.json is damaged: not JSON"):
        load_source(cut)
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_dir, pipe)
    (pipe / "text_encoder" / "model.safetensors").write_bytes(b"")
    with pytest.raises(SourceError, match="has a damaged weight file: text_encoder/model.safetensors is not a whole"):
        load_source(pipe)


def test_seeds_are_per_image_and_batch_independent(tiny_dir):
    loaded = load_source(tiny_dir)
    s = resolve_settings(loaded.defaults, **FAST)
    prompts = ["a red car", "a photo of a cat", "a house"]
    one = generate(loaded.pipe, prompts, s, seed=3, batch_size=1)
    batched = generate(loaded.pipe, prompts, s, seed=3, batch_size=2)
    assert one.seeds == [3, 4, 5]
    assert one.latents.shape == (3, 4, 16, 16) and one.pixels.shape == (3, 3, 32, 32)
    assert torch.allclose(one.latents, batched.latents, atol=1e-4)
    assert not torch.allclose(one.latents[0], one.latents[1])
    assert one.images_per_s > 0 and [im.size for im in one.images] == [(32, 32)] * 3


def test_sample_script_end_to_end(ckpt, tmp_path):
    from scripts.sample import main

    out = tmp_path / "samples"
    summary = main(["--source", str(ckpt), "--prompt", "a lighthouse at night", "--prompts", "smoke",
                    "--max-prompts", "2", "--out", str(out), "--steps", "2", "--seed", "5", "--device", "cpu",
                    "--height", "32", "--width", "32"])
    assert summary["images"] == 3 and summary["unet"] == "student_ema" and summary["settings"]["steps"] == 2
    assert summary["settings"]["guidance_scale"] == SAMPLER_DEFAULTS["tiny"].guidance_scale
    assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png", "0002.png", "grid.png"]
    records = json.loads((out / "prompts.json").read_text())
    assert [r["seed"] for r in records] == [5, 6, 7] and records[0]["prompt"] == "a lighthouse at night"
    again = sample(ckpt, ["a lighthouse at night"], tmp_path / "again", seed=5, steps=2, device="cpu",
                   height=32, width=32)
    assert again["images"] == 1
    assert (out / "0000.png").read_bytes() == (tmp_path / "again" / "0000.png").read_bytes()


def test_an_output_path_that_cannot_be_a_folder_is_one_line_before_sampling(tmp_path, capsys):
    """sample.py used to sample every prompt and then die on mkdir with a traceback."""
    from distill.files import out_folder_problem
    from scripts import eval as eval_script
    from scripts import sample as sample_script

    (tmp_path / "file").write_text("x")
    assert out_folder_problem("--out", str(tmp_path / "new" / "deeper")) is None
    assert out_folder_problem("--out", str(tmp_path)) is None
    assert out_folder_problem("--out", str(tmp_path / "file")) == f"--out {tmp_path / 'file'} is a file: give a folder"
    assert "is a file, so no folder can be made there" in out_folder_problem("--out", str(tmp_path / "file" / "x"))
    with pytest.raises(SystemExit) as info:  # one error line, exit 2
        sample_script.main(["--source", str(tmp_path / "nowhere"), "--prompt", "a", "--out", str(tmp_path / "file")])
    assert info.value.code == 2 and "is a file: give a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # it caps --prompts; with --prompt alone it did nothing
        sample_script.main(["--source", str(tmp_path), "--prompt", "a", "--prompt", "b", "--max-prompts", "1"])
    assert info.value.code == 2 and "--max-prompts keeps the first N prompts of --prompts" in capsys.readouterr().err
    assert eval_script.entry([f"student={tmp_path}", f"out_dir={tmp_path / 'file' / 'eval'}"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: out_dir ")


@pytest.mark.parametrize("spacing, sample_size, family", [("trailing", 64, "sdxl_turbo"),
                                                          ("trailing", 128, "sdxl_lightning"),
                                                          ("leading", 128, "sdxl_base")])
def test_a_plain_sdxl_folder_is_told_by_its_scheduler_and_latent_size(tmp_path, spacing, sample_size, family):
    """A diffusers folder without koala_sampler.json: SDXL-Turbo (512 px: 64-latent U-Net, trailing), Lightning
    (1024 px, trailing), Base (leading): the families whose sampler defaults differ."""
    for sub, config in (("scheduler/scheduler_config.json", {"timestep_spacing": spacing}),
                        ("unet/config.json", {"sample_size": sample_size})):
        (tmp_path / sub).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / sub).write_text(json.dumps(config))
    assert infer_family(tmp_path) == family


def test_a_teacher_folder_samples_at_its_own_settings():
    """Turbo and Lightning sample themselves in a few steps without CFG, not at their students' 10 steps and 3.5;
    a Lightning U-Net file named for its steps sets them, and the 1-step one predicts x0."""
    assert teacher_settings("sdxl_turbo") == (SampleSettings(4, 0.0, 512, 512, "trailing"), None)
    assert teacher_settings("sdxl_lightning", "/m/sdxl_lightning_2step_unet.safetensors") == (
        SampleSettings(2, 0.0, 1024, 1024, "trailing"), None)
    assert teacher_settings("sdxl_lightning", "sdxl_lightning_1step_unet_x0.safetensors")[1] == "sample"
    assert teacher_settings("sdxl_lightning", "lightning.safetensors")[0].steps == 4
    assert teacher_settings("sdxl_turbo", "/m/custom_2step_unet.safetensors")[0].steps == 4  # Lightning's names only
    assert teacher_settings("sdxl_base")[0] == SampleSettings(25, 5.0, 1024, 1024, "leading")


def test_sampling_a_lightning_teacher_folder_with_its_unet_file(tiny_dir, tmp_path):
    """`make sample` of an SDXL-Base folder with Lightning's 1-step U-Net file (a stand-in with the tiny U-Net's
    weights): the file's U-Net, 1 step, no CFG, trailing, x0 prediction."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from distill.sampling import TINY_MARKER
    from scripts.sample import main

    folder = tmp_path / "base"
    shutil.copytree(tiny_dir, folder)
    (folder / TINY_MARKER).unlink()  # a plain diffusers folder, as a downloaded teacher is
    unet_file = tmp_path / "sdxl_lightning_1step_unet_x0.safetensors"
    save_file(UNet2DConditionModel.from_pretrained(tiny_dir / "unet").state_dict(), str(unet_file))
    summary = main(["--source", str(folder), "--unet-file", str(unet_file), "--prompt", "a red bicycle",
                    "--out", str(tmp_path / "out"), "--height", "32", "--width", "32", "--device", "cpu"])
    assert (summary["kind"], summary["family"], summary["unet"]) == ("teacher", "sdxl_lightning", str(unet_file))
    assert summary["settings"]["steps"] == 1 and summary["settings"]["guidance_scale"] == 0.0
    assert summary["scheduler_spacing"] == "trailing" and summary["prediction_type"] == "sample"
    assert summary["images"] == 1
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["timestep_spacing"] == "leading"
