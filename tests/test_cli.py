"""The command-line tools turn the mistakes users make (missing paths, folders of the wrong kind, unknown keys)
into one `error:` line and exit code 2, not a traceback."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("script, argv, needle", [
    ("sample", ["--source", "{tmp}/nope", "--prompt", "a cat"], "nope does not exist"),
    ("sample", ["--source", "{tmp}", "--prompt", "a cat"], "is neither a pipeline folder"),
    ("sample", ["--source", "{tiny}", "--prompts", "{tmp}/prompts.txt"],
     "prompts.txt: neither a shipped set (smoke, eval) nor a readable text file (No such file or directory)"),
    ("eval", ["student={tiny}", "prompts=evall"], "prompts evall: neither a shipped set (smoke, eval)"),
    ("eval", ["student={tiny}", "max_prompts=0"], "max_prompts must be at least 1, not 0"),
    ("sample", ["--source", "{tiny}", "--prompts", "smoke", "--max-prompts", "-1"], "max_prompts must be at least 1"),
    ("sample", ["--source", "{tiny}", "--prompt", "a", "--device", "cuda:7"], "device='cuda:7': this machine has"),
    ("eval", ["student={tiny}", "device=gpu"], "device='gpu' is not a device name"),
    ("eval", ["student={tmp}/nope"], "nope does not exist"),
    ("eval", ["student={tiny}", "nonsense=1"], "Key 'nonsense' not in 'EvalConfig'"),
    ("prep_data", ["--src", "{tmp}/nope", "--out", "{tmp}/out"], "does not exist"),
    ("prep_data", ["--src", "{tiny}/vae/diffusion_pytorch_model.safetensors", "--out", "{tmp}/out"],
     "must be a .parquet or .jsonl"),
    ("make_latents", ["--pipeline", "{tiny}", "--shards", "{tmp}/nope.tar", "--out", "{tmp}/out"],
     "shards do not exist"),
    ("eval", ["student={tiny}", "steps=0"], "steps must be at least 1, not 0"),
    ("eval", ["student={tiny}", "height=30"], "height must be a positive multiple of 8 px"),
    ("bench_data", ["--shards", "{tmp}/nope"], "shards do not exist"),
    ("eval", ["student", "{tiny}"], "'student' has no '=': settings are key=value"),  # named no key before
    ("eval", ["student={tiny}", "family=sdxl"], "family=sdxl is not one of sdxl_base"),  # after the student loaded
    ("prep_data", ["--src", "{tmp}/src", "--out", "{tmp}/out"], "--src {tmp}/src holds no images"),  # exit 0 before
])
def test_user_errors_are_one_line_and_exit_2(script, argv, needle, tmp_path, tiny_pipeline_dir, capsys):
    module = importlib.import_module(f"scripts.{script}")
    args = [a.format(tmp=tmp_path, tiny=tiny_pipeline_dir) for a in argv]
    (tmp_path / "src").mkdir()  # an empty folder
    assert module.entry(args) == 2
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle.format(tmp=tmp_path) in lines[0], captured.err


@pytest.mark.parametrize("script, argv, needle", [
    ("make_latents", ["--pipeline", "{tmp}/nope", "--shards", "x", "--out", "{tmp}"], "--pipeline {tmp}/nope is not"),
    # an existing folder without the pipeline's parts: before, a traceback after latents.json was written
    ("make_latents", ["--pipeline", "{tmp}", "--shards", "x", "--out", "{tmp}/o"],
     "--pipeline {tmp} lacks vae/config.json, text_encoder/config.json, text_encoder_2/config.json, tokenizer/, "
     "tokenizer_2/: it is not"),
    ("sample", ["--source", "{tiny}", "--prompt", "a", "--width", "12"], "width must be a positive multiple of 8"),
    ("sample", ["--source", "{tiny}", "--prompt", "a", "--steps", "0"], "steps must be at least 1"),
    ("sample", ["--source", "{tiny}", "--prompt", "a", "--guidance", "nan"], "guidance_scale must be a finite number"),
    ("bench_infer", ["--unet", "koala_1b={tmp}/nope"], "--unet koala_1b={tmp}/nope is not a local folder"),
    ("bench_infer", ["--vae", "{tmp}/nope"], "--vae {tmp}/nope is not a local folder"),
    ("bench_data", ["--batches", "0"], "--batches must be at least 1"),
    ("prep_data", ["--src", "{tmp}", "--out", "{tiny}/vae/config.json"], "config.json is a file: give a folder"),
    ("prep_data", ["--src", "{tmp}", "--out", "{tmp}/o", "--format", "manifest"], "--src {tmp} is a folder; a"),
    ("make_latents", ["--pipeline", "{tiny}", "--shards", "x", "--out", "{tiny}/model_index.json"], "is a file"),
    ("make_latents", ["--pipeline", "{tiny}", "--shards", "x", "--out", "{tmp}/o", "--resolution", "60"],
     "--resolution 60 must be a positive multiple of 8 px"),
    ("make_demo_data", ["--out", "{tiny}/model_index.json/demo"], "is a file, so no folder can be made there"),
    # /proc takes no new folders, even from root: the write itself fails, as on a read-only or full disk
    ("make_demo_data", ["--out", "/proc/koala_demo"], "--out /proc/koala_demo: cannot write there"),
    ("make_tiny_pipeline", ["--out", "/proc/koala_tiny"], "--out /proc/koala_tiny: cannot write there"),
    # each was a traceback (bench_infer's --out only after the benchmark had run)
    ("bench_infer", ["--unet", "koala_1b"], "--unet koala_1b: give MODEL=DIR"),
    ("bench_infer", ["--device", "banana"], "device='banana' is not a device name"),
    ("bench_infer", ["--image-model", "koala_2b"], "--image-model koala_2b: one of sdxl, koala_1b, koala_700m"),
    ("bench_infer", ["--compile-mode", "bogus"], "--compile-mode bogus: one of default"),
    ("bench_infer", ["--vae", "{tiny}/unet"], "holds a UNet2DConditionModel, not a VAE"),
    ("bench_infer", ["--out", "{tiny}/model_index.json"], "model_index.json is a file: give a folder"),
    ("estimate_memory", ["--anchor", "{tmp}/nope.py"], "--anchor {tmp}/nope.py is not a file"),
    ("make_latents", ["--pipeline", "{tiny}", "--shards", "x", "--out", "{tmp}/o", "--device", "banana"],
     "--device: device='banana' is not a device name"),
])
def test_bad_arguments_stop_before_any_model_in_one_line(script, argv, needle, tmp_path, tiny_pipeline_dir, capsys):
    """After the flags parse, a bad path or value is one `error:` line (argparse's usage block, printed before it,
    said nothing about it)."""
    module = importlib.import_module(f"scripts.{script}")
    with pytest.raises(SystemExit) as exc:
        getattr(module, "entry", module.main)([a.format(tmp=tmp_path, tiny=tiny_pipeline_dir) for a in argv])
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and needle.format(tmp=tmp_path) in line


def test_a_flag_argparse_refuses_still_shows_the_usage(capsys):
    from scripts import sample

    with pytest.raises(SystemExit) as exc:
        sample.main(["--source", "x", "--promt", "a typo"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("usage: ") and "unrecognized arguments: --promt" in err
