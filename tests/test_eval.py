"""Evaluation end to end on the tiny pipeline: agreement metrics, CLIP score from a local tiny CLIP, reports."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from distill.evaluation import PSNR_CAP_DB, EvalConfig, run_eval
from distill.metrics import Hpsv2Scorer, psnr, ssim
from distill.sampling import SettingsError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random 2-layer CLIP (text + vision) with a processor, saved to disk and loaded back by path."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from distill.tiny import write_tokenizer_files

    folder = tmp_path_factory.getbasetemp() / "tiny_clip"
    tok = CLIPTokenizer.from_pretrained(write_tokenizer_files(folder / "src"), model_max_length=77)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(small, vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(small, image_size=32, patch_size=8),
                                 projection_dim=16))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


def test_eval_script_student_vs_teacher(ckpt, tiny_clip, tmp_path, monkeypatch):
    from scripts.eval import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # W&B's files go beside the report, not into ./wandb
    out = tmp_path / "eval"
    report = main([f"student={ckpt}", "teacher=auto", "prompts=smoke", "max_prompts=4", "steps=2",
                   "height=32", "width=32", "batch_size=2", "warmup_batches=0", "device=cpu",
                   f"eval.clip_model={tiny_clip}", f"out_dir={out}", "wandb=true"])
    a = report["agreement"]
    assert set(a) == {"latent_mse", "psnr_db", "ssim"} and all(math.isfinite(v) for v in a.values())
    assert a["latent_mse"] > 0 and -1 <= a["ssim"] < 1 and a["psnr_db"] < PSNR_CAP_DB
    for role in ("student", "teacher"):
        m = report[role]
        assert m["images"] == 4 and m["images_per_s"] > 0 and 0 <= m["clip_score"] <= 100
    assert report["student"]["unet"] == "student_ema" and report["teacher"]["kind"] == "pipeline"
    assert any(n.startswith("HPSv2 skipped") for n in report["notes"])
    assert len(report["per_image"]) == 4 and "clip_score_teacher" in report["per_image"][0]
    for f in ("report.json", "report.md", "grid_teacher_student.png", "student/grid.png", "teacher/grid.png"):
        assert (out / f).is_file(), f
    assert json.loads((out / "report.json").read_text())["agreement"] == a
    assert list((out / "wandb").glob("offline-run-*")) and not (tmp_path / "cwd" / "wandb").exists()
    md = (out / "report.md").read_text()
    assert "| teacher vs student (same seeds) |" in md and "| student |" in md
    assert f"| mean over 4 images | {a['latent_mse']:.4f} | {a['psnr_db']:.2f} | {a['ssim']:.4f} |" in md

    # each per-image figure again from the images the report saved: a model's CLIP score is 100 x the cosine of
    # its own image with the prompt; PSNR is of the pixels in [0, 1]; latent MSE is not a pixel MSE
    import numpy as np
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    from distill.metrics import _features

    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    for row in report["per_image"]:
        pixels = {}
        for role in ("student", "teacher"):
            image = Image.open(out / role / f"{row['index']:04d}.png").convert("RGB")
            pixels[role] = np.asarray(image, dtype=np.float64) / 255
            inputs = processor(text=[row["prompt"]], images=[image], return_tensors="pt", padding=True,
                               truncation=True, max_length=77)
            with torch.no_grad():
                img = _features(model.get_image_features(pixel_values=inputs["pixel_values"]))
                txt = _features(model.get_text_features(input_ids=inputs["input_ids"],
                                                        attention_mask=inputs["attention_mask"]))
            cos = float(torch.nn.functional.cosine_similarity(img, txt, dim=-1)[0])
            assert row[f"clip_score_{role}"] == pytest.approx(100 * max(cos, 0.0), abs=1e-3), (role, row)
        mse = float(((pixels["student"] - pixels["teacher"]) ** 2).mean())
        assert row["psnr_db"] == pytest.approx(10 * math.log10(1 / mse), abs=0.3)
        assert row["latent_mse"] != pytest.approx(mse, rel=0.2) and row["latent_mse"] != pytest.approx(4 * mse, rel=0.2)


def test_teacher_at_its_own_steps_and_guidance(tiny_dir, tmp_path):
    """A few-step teacher evaluated at its native setting: the same U-Net as the student, but 1 step without CFG
    against 2 with, so the images differ, and the report and its notes say so."""
    cfg = EvalConfig(student=str(tiny_dir), teacher=str(tiny_dir), max_prompts=1, steps=2, height=32, width=32,
                     batch_size=1, warmup_batches=0, device="cpu", out_dir=str(tmp_path), teacher_steps=1,
                     teacher_guidance_scale=0.0)
    report = run_eval(cfg)
    assert (report["teacher"]["steps"], report["teacher"]["guidance_scale"]) == (1, 0.0)
    assert report["settings"]["steps"] == 2 and report["agreement"]["latent_mse"] > 0
    assert any("the teacher ran 1 step(s) at guidance 0.0" in n for n in report["notes"])
    with pytest.raises(SettingsError, match="teacher_steps must be at least 1"):
        EvalConfig(student=str(tiny_dir), teacher_steps=0)


def test_teacher_against_itself_agrees_exactly(tiny_dir, tmp_path):
    """Then a rerun into the same folder with fewer prompts and no teacher leaves only its own images there (before,
    the earlier run's 0001.png, teacher/ and pair grid stayed beside the new report); a file of the user's stays."""
    cfg = EvalConfig(student=str(tiny_dir), teacher=str(tiny_dir), max_prompts=2, steps=2, height=32, width=32,
                     batch_size=1, warmup_batches=0, device="cpu", out_dir=str(tmp_path))
    report = run_eval(cfg)
    assert report["agreement"] == {"latent_mse": 0.0, "psnr_db": PSNR_CAP_DB, "ssim": pytest.approx(1.0)}
    assert any(n.startswith("CLIP score skipped") for n in report["notes"])
    assert sorted(p.name for p in (tmp_path / "teacher").iterdir()) == ["0000.png", "0001.png", "grid.png",
                                                                         "prompts.json"]
    (tmp_path / "teacher" / "my_notes.txt").write_text("kept")
    (tmp_path / "student" / "2024.png").write_bytes(b"a photo of the user's, named like ours but not listed")
    run_eval(EvalConfig(student=str(tiny_dir), max_prompts=1, steps=1, height=32, width=32, batch_size=1,
                        warmup_batches=0, device="cpu", out_dir=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "student", "teacher"]
    assert sorted(p.name for p in (tmp_path / "student").iterdir()) == ["0000.png", "2024.png", "grid.png",
                                                                         "prompts.json"]
    assert [p.name for p in (tmp_path / "teacher").iterdir()] == ["my_notes.txt"]


def test_the_teacher_decodes_with_the_students_vae(tiny_dir, tmp_path):
    """A student whose VAE is not its teacher folder's (an export of a run with teacher.vae_path, e.g. the fp16-fix
    VAE): each decoded with its own, so PSNR and SSIM counted the VAEs' difference as the U-Nets'. Here the U-Nets
    are the same, so the images must be too."""
    import shutil

    from diffusers import AutoencoderKL

    student = tmp_path / "student_pipe"
    shutil.copytree(tiny_dir, student)
    vae = AutoencoderKL.from_pretrained(student / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(1.5)  # another decoder
    vae.save_pretrained(student / "vae")
    cfg = EvalConfig(student=str(student), teacher=str(tiny_dir), max_prompts=1, steps=2, height=32, width=32,
                     batch_size=1, warmup_batches=0, device="cpu", out_dir=str(tmp_path / "e"))
    assert run_eval(cfg)["agreement"] == {"latent_mse": 0.0, "psnr_db": PSNR_CAP_DB, "ssim": pytest.approx(1.0)}


def test_the_teacher_samples_with_the_students_prediction_type(ckpt, tmp_path):
    """Against an x0 (1-step Lightning) teacher, `teacher=auto` runs the teacher folder's U-Net with the sampler
    the student was trained for, not the folder's epsilon scheduler."""
    from conftest import x0_checkpoint

    cfg = EvalConfig(student=str(x0_checkpoint(ckpt, tmp_path / "x0")), teacher="auto", max_prompts=1, steps=1,
                     height=32, width=32, batch_size=1, warmup_batches=0, device="cpu", out_dir=str(tmp_path / "e"))
    report = run_eval(cfg)
    assert report["student"]["prediction_type"] == report["teacher"]["prediction_type"] == "sample"


def test_an_explicit_teacher_folder_takes_a_unet_file(tiny_dir, tmp_path, monkeypatch):
    """teacher=<folder> with teacher_unet_file (SDXL-Lightning's U-Net file over the SDXL-Base folder) runs that
    U-Net: against the folder's own U-Net as the student, the two no longer agree. A missing file is one error
    before the student loads, as is teacher=auto for a student that is not a checkpoint; the key without a teacher
    folder is a settings error."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from distill.sampling import SourceError

    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    torch.manual_seed(0)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in unet.state_dict().items()}
    unet_file = tmp_path / "lightning_like_unet.safetensors"
    save_file(state, str(unet_file))
    common = dict(student=str(tiny_dir), teacher=str(tiny_dir), max_prompts=1, steps=2, height=32, width=32,
                  batch_size=1, warmup_batches=0, device="cpu")
    report = run_eval(EvalConfig(**common, teacher_unet_file=str(unet_file), out_dir=str(tmp_path / "e")))
    assert report["teacher"]["unet"] == str(unet_file) and report["agreement"]["latent_mse"] > 0
    from distill import evaluation

    monkeypatch.setattr(evaluation, "load_source", lambda *a, **k: pytest.fail("the student was loaded first"))
    with pytest.raises(SourceError, match="nosuch.safetensors does not exist"):
        run_eval(EvalConfig(**common, teacher_unet_file=str(tmp_path / "nosuch.safetensors"),
                            out_dir=str(tmp_path / "missing")))
    assert not (tmp_path / "missing" / "student").exists()
    with pytest.raises(SourceError, match="teacher=auto needs a checkpoint student"):  # also before it loads
        run_eval(EvalConfig(**{**common, "teacher": "auto"}, out_dir=str(tmp_path / "auto")))
    with pytest.raises(SettingsError, match="needs teacher=<pipeline folder>"):
        EvalConfig(student=str(tiny_dir), teacher_unet_file=str(unet_file))


def test_psnr_ssim_match_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 40, 48, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    ours_ssim, ours_psnr = ssim(a, b), psnr(a, b)
    for i in range(2):
        x, y = a[i].permute(1, 2, 0).numpy(), b[i].permute(1, 2, 0).numpy()
        ref = metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                            data_range=1.0, channel_axis=2)
        assert ours_ssim[i].item() == pytest.approx(float(ref), abs=1e-5)
        assert ours_psnr[i].item() == pytest.approx(metrics.peak_signal_noise_ratio(x, y, data_range=1.0), rel=1e-5)
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0])


def test_hpsv2_missing_pieces_give_one_line(tmp_path):
    from scripts.eval import load_hpsv2

    for ckpt in (None, str(tmp_path / "missing.pt")):
        scorer, note = load_hpsv2(ckpt, torch.device("cpu"))
        assert scorer is None and note.startswith("HPSv2 skipped") and "\n" not in note
    present = tmp_path / "hps.pt"
    present.write_bytes(b"")
    try:
        import open_clip  # noqa: F401
    except ImportError:
        scorer, note = load_hpsv2(str(present), torch.device("cpu"))
        assert scorer is None and "open_clip" in note


def test_hpsv2_scorer_math_with_a_stand_in_model():
    """The scoring arithmetic (normalised image . text features), with a tiny OpenCLIP-shaped model."""

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.img = torch.nn.Linear(3, 4)
            self.txt = torch.nn.Embedding(10, 4)

        def encode_image(self, x):
            return self.img(x.mean((2, 3)))

        def encode_text(self, ids):
            return self.txt(ids).mean(1)

    from PIL import Image

    def preprocess(im):
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)

    def tokenizer(texts):
        return torch.tensor([[len(t) % 10, 1] for t in texts])

    scorer = Hpsv2Scorer(StandIn(), preprocess, tokenizer, batch_size=2)
    images = [Image.new("RGB", (8, 8), (i * 60, 20, 200)) for i in range(3)]
    prompts = ["a", "bb", "ccc"]
    scores = scorer(images, prompts)
    assert scores.shape == (3,) and bool((scores.abs() <= 1 + 1e-6).all())
    # each image against its own prompt: cos(image features, text features), by hand
    model = scorer.model
    for image, prompt, score in zip(images, prompts, scores, strict=True):
        img = model.encode_image(preprocess(image)[None])[0]
        txt = model.encode_text(tokenizer([prompt]))[0]
        assert float(score) == pytest.approx(float(img @ txt / (img.norm() * txt.norm())), abs=1e-6)


def test_config_rejects_unknown_keys():
    from omegaconf.errors import ConfigKeyError

    from scripts.eval import load_config

    cfg = load_config(["student=x", "eval.steps=3"])
    assert cfg.student == "x" and cfg.steps == 3 and cfg.prompts == "smoke"
    with pytest.raises(ConfigKeyError):
        load_config(["studnet=x"])


def test_a_wrong_clip_folder_is_one_note_said_before_sampling(tiny_clip, tmp_path):
    """A folder that is not a loadable CLIP model is found from its files alone; one that only fails while its
    weights load is a note too, so the images sampled before it are never lost to a traceback."""
    import shutil

    from PIL import Image

    from distill.evaluation import build_clip_scorer, clip_folder_problem

    assert clip_folder_problem(str(tiny_clip)) is None
    assert "is not a folder" in clip_folder_problem(str(tmp_path / "nowhere"))
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    assert "model_type None" in clip_folder_problem(str(other))
    no_processor = tmp_path / "no_processor"
    shutil.copytree(tiny_clip, no_processor, ignore=shutil.ignore_patterns("*processor_config.json"))
    assert "has no processor" in clip_folder_problem(str(no_processor))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert clip_folder_problem(str(broken)) is None
    scorer, note = build_clip_scorer(EvalConfig(clip_model=str(broken)), torch.device("cpu"))
    assert scorer is None and "did not load" in note and "\n" not in note
    scorer, note = build_clip_scorer(EvalConfig(clip_model=str(tiny_clip)), torch.device("cpu"))
    assert note is None and scorer([Image.new("RGB", (32, 32))], ["a photo"]).shape == (1,)


@pytest.mark.parametrize("args, needle", [
    (["prompts={empty}"], "holds no prompt (only blank and '#' lines)"),
    (["dtype=fp8"], "dtype=fp8 is not one of bf16, fp16, fp32"),
    (["timestep_spacing=trailng"], "timestep_spacing=trailng is not one of leading, trailing, linspace"),
    (["grid_max=0"], "grid_max must be at least 1, not 0"),
    (["teacher_guidance_scale=nan"], "teacher_guidance_scale must be a finite number"),
])
def test_bad_eval_values_are_one_line_before_any_model_loads(tmp_path, capsys, args, needle):
    """Each of these ended in a traceback, some only after the student had loaded or sampled."""
    from scripts.eval import entry

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing but a comment\n\n   \n")
    out = tmp_path / "out"
    code = entry(["student=/nowhere", f"out_dir={out}", *[a.format(empty=empty) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()


def test_a_wrong_teacher_is_one_line_before_the_student_samples(ckpt, tmp_path, monkeypatch):
    """A teacher folder that is not there (or not a pipeline) was found only after the student had sampled every
    prompt; now before any image is made."""
    import distill.evaluation as evaluation
    from distill.sampling import SourceError

    calls = []
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: calls.append(1))
    for teacher, needle in ((tmp_path / "gone", "is not a folder"), (tmp_path, "lacks model_index.json")):
        cfg = EvalConfig(student=str(ckpt), teacher=str(teacher), out_dir=str(tmp_path / "out"))
        with pytest.raises(SourceError, match=needle):
            run_eval(cfg)
    assert not calls
