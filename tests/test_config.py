"""The Hydra config tree: every experiment composes; bad keys, types and values fail with one line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.config import CONF_DIR, ConfigError, config_notes, load_config, validate

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_all_experiments_listed():
    assert set(EXPERIMENTS) >= {"koala_1b", "koala_700m", "koala_turbo_1b", "koala_turbo_700m",
                                "koala_lightning_1b", "koala_lightning_700m", "demo"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    cfg = load_config([f"+experiment={name}"])
    assert cfg.train.output_dir == f"runs/{name}"
    if name != "demo":  # the paper's recipe
        assert cfg.train.lr == 1e-5 and cfg.train.lr_schedule == "constant"
        assert cfg.train.global_batch_size == 128
        assert cfg.train.optimizer == ("adamw8bit" if name.endswith("_lowmem") else "adamw")
        assert cfg.teacher.resolution == (512 if "turbo" in name else 1024)
        assert cfg.student.name == ("koala_700m" if name.removesuffix("_lowmem").endswith("700m") else "koala_1b")
        assert cfg.teacher.name == {"turbo": "sdxl_turbo", "lightning": "sdxl_lightning"}.get(
            name.split("_")[1], "sdxl_base")
    assert cfg.data.resolution == cfg.teacher.resolution  # Turbo students train at 512 px, as in the paper


def test_lightning_sampler_settings():
    cfg = load_config(["+experiment=koala_lightning_1b"])
    s = cfg.teacher.sampler
    assert (s.scheduler, s.timestep_spacing, s.steps, s.guidance_scale) == ("euler", "trailing", 10, 3.5)
    assert cfg.distill.feature_types == ["sa"] and cfg.distill.layer_map == "bottom"


@pytest.mark.parametrize("override, needle", [
    (["train.max_stepz=3"], "train.max_stepz"),
    (["teacher.pathh=/x"], "teacher.pathh"),
    (["train.max_steps=abc"], "train.max_steps"),
    (["distill.w_feat=heavy"], "distill.w_feat"),
    (["student=koala_2b"], "student/koala_2b"),
    (["--max_steps", "5"], "--max_steps: unknown option; settings are key=value overrides"),  # was a lexer error
    (["train.max_steps", "5"], "'train.max_steps' has no '='"),
    (["hydra.run.dir=/x"], "hydra.* settings do not apply here"),  # was silently ignored
    # a leading + added a misspelt key to the typed config, and the run went on without it
    (["+train.max_stepz=3"], "train.max_stepz is not a config key"),
    (["++train.max_stepz=3"], "did you mean train.max_steps?"),
    (["+experimnt=demo"], "did you mean experiment?"),
    (["+teacher.sampler.stepz=3"], "teacher.sampler.stepz is not a config key"),
    # Hydra's lexer stops at an unquoted > or <: the message named neither the key nor the fix
    (["data.score_filters=[aesthetic>5]"], "quote each filter, e.g. \"data.score_filters=['aesthetic>5']\""),
    # ... but a quoted filter beside another mistake leaves that mistake's own line
    (["data.score_filters=['aesthetic>5']", "train.max_steps=abc"], "train.max_steps: Value 'abc'"),
])
def test_bad_override_is_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(override)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def _sdxl_layout(folder: Path, skip: tuple[str, ...] = ()) -> Path:
    """The file names of an SDXL diffusers folder, with empty files (what the config check looks at), and the
    SDXL-Base U-Net config, so that the KOALA students derive from it. `skip`: relative paths left out."""
    from safetensors.torch import save

    from distill.students import sdxl_base_unet_config

    weights = save({"w": torch.zeros(2)})  # a whole safetensors file (the check reads headers and sizes)
    files = {"model_index.json": "{}", "scheduler/scheduler_config.json": "{}",
             "unet/config.json": json.dumps({"_class_name": "UNet2DConditionModel", **sdxl_base_unet_config()}),
             "unet/diffusion_pytorch_model.safetensors": weights,
             "vae/config.json": '{"_class_name": "AutoencoderKL"}', "vae/diffusion_pytorch_model.safetensors": weights,
             "text_encoder/config.json": "{}", "text_encoder/model.safetensors": weights,
             "text_encoder_2/config.json": "{}", "text_encoder_2/model.safetensors": weights,
             "tokenizer/vocab.json": "{}", "tokenizer_2/vocab.json": "{}"}
    for rel, content in files.items():
        if rel not in skip:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                (folder / rel).write_bytes(content)
            else:
                (folder / rel).write_text(content)
    return folder


@pytest.fixture(scope="module")
def sdxl_layout(tmp_path_factory):
    return _sdxl_layout(tmp_path_factory.mktemp("sdxl"))


@pytest.mark.parametrize("skip, overrides, needle", [
    (("unet/diffusion_pytorch_model.safetensors",), [], "lacks unet/ weights"),
    (("tokenizer_2/vocab.json", "text_encoder/config.json"), [], "lacks text_encoder/config.json, tokenizer_2/:"),
    # on latents without previews or export, the VAE and text encoders are not loaded
    (("tokenizer_2/vocab.json", "vae/config.json"), ["data.kind=latents", "train.sample_every=0",
                                                     "train.sample_at_end=false", "train.export=false"], None),
    (("vae/config.json",), ["data.kind=latents", "train.sample_at_end=false"], "lacks vae/config.json"),
    # with teacher.unet_file, the folder's U-Net gives the config only
    (("unet/diffusion_pytorch_model.safetensors", "model_index.json"), ["train.export=false", "teacher.unet_file=F"],
     "F: F is not a whole safetensors file"),  # the folder passed; the file's own check came next
    # a KOALA-1B export as an SDXL-Base teacher: the student would distill from a student
    ((), ["KOALA"], "transformer_layers_per_block [1, 2, 6] (SDXL: [1, 2, 10])): a sdxl_base teacher is an SDXL"),
])
def test_teacher_folder_is_checked_for_the_parts_the_run_loads(skip, overrides, needle, tmp_path):
    """An existing teacher.path without the pipeline's files was a diffusers traceback after the run folder was
    made; now it is one line naming what is missing. None: the folder passes and the next check (data.shards,
    unset here) speaks."""
    folder = _sdxl_layout(tmp_path / "sdxl", skip)
    if overrides == ["KOALA"]:
        from distill.students import STUDENTS, derive_student_config, sdxl_base_unet_config

        koala = derive_student_config(sdxl_base_unet_config(), STUDENTS["koala_1b"])
        (folder / "unet" / "config.json").write_text(json.dumps(koala))
        overrides = []
    (tmp_path / "F").write_text("not safetensors")
    overrides = [o.replace("=F", f"={tmp_path / 'F'}") for o in overrides]
    cfg = load_config(["+experiment=koala_1b", f"teacher.path={folder}", *overrides])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert (needle or "data.shards is not set") in str(info.value) and "\n" not in str(info.value)


def test_a_teacher_folder_with_only_fp16_variant_weights_is_one_line(tmp_path):
    """A download of the *.fp16.safetensors files alone passed the check (any .safetensors counted), and loading
    then failed on a diffusers message naming a .bin file."""
    folder = _sdxl_layout(tmp_path / "sdxl")
    (folder / "text_encoder" / "model.safetensors").rename(folder / "text_encoder" / "model.fp16.safetensors")
    with pytest.raises(ConfigError, match=r"lacks text_encoder/ weights other than variant files such as "
                                          r"model\.fp16\.safetensors"):
        validate(load_config(["+experiment=koala_1b", f"teacher.path={folder}"]))


@pytest.mark.parametrize("damage, needle", [
    ("unet/diffusion_pytorch_model.safetensors", "has a damaged weight file: unet/diffusion_pytorch_model.safetensors "
     "is cut short: 64 bytes, its header names 72 (an interrupted copy or download?)"),
    ("text_encoder_2/model.safetensors", "has a damaged weight file: text_encoder_2/model.safetensors is cut short"),
    ("vae/config.json", "has a damaged vae/config.json: not a JSON object"),
    ("scheduler/scheduler_config.json", "has a damaged scheduler/scheduler_config.json"),
    ("unet/config.json", "has a damaged unet/config.json: not a JSON object"),  # read by the student check first
])
def test_a_damaged_teacher_folder_is_one_line(damage, needle, tmp_path):
    """A weight file cut short or a config that is not JSON passed the check (names only) and ended in a
    diffusers traceback once the teacher loaded."""
    folder = _sdxl_layout(tmp_path / "sdxl")
    path = folder / damage
    if path.suffix == ".json":
        path.write_text('{"_class_name": ')
    else:
        path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ConfigError) as info:
        validate(load_config(["+experiment=koala_1b", f"teacher.path={folder}"]))
    assert f"teacher.path={folder} {needle}" in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("override, needle", [
    (["+experiment=koala_1b"], "teacher.path is not set"),
    (["+experiment=koala_lightning_1b"], "teacher.path and teacher.unet_file are not set"),
    (["data.resolution=128"], "set teacher.resolution=128 instead"),
    ([f"train.output_dir={CONF_DIR}/config.yaml/run"], "config.yaml is a file, not a folder"),
    (["train.ema_decay=1.5"], "train.ema_decay=1.5 must be in [0, 1)"),  # the average would diverge
    (["train.checkpointing_blocks=[UP-9]"], "this student has no stage 'UP-9'"),
    (["student=custom", "student.layers_per_block=[1,1,1]", "student.transformer_layers_per_block=[1,1,2]",
      "student.mid_block=false", "train.checkpointing_blocks=[Mid]"], "this student has no stage 'Mid'"),
    (["train.lr=-1"], "train.lr=-1.0 must be positive"),
    (["train.lr=inf"], "train.lr=inf must be a finite number, positive"),  # passed, and trained NaN weights
    (["train.max_grad_norm=inf"], "train.max_grad_norm=inf must be a finite number"),
    (["train.seed=-1"], "train.seed=-1 must be 0 or more"),  # passed, and failed at the first step
    (["distill.caption_dropout=1.5"], "distill.caption_dropout=1.5 must be a probability in [0, 1]"),
    (["distill.w_feat=-1"], "distill.w_feat=-1.0 must be 0 or more"),  # would push the features apart
    (["train.max_nonfinite=0"], "train.max_nonfinite=0 must be at least 1"),
    (["teacher.resolution=100"], "teacher.resolution=100 must be a positive multiple of 8 px"),
    (["+experiment=koala_lightning_1b", "teacher.path=/nonexistent"], "teacher.path=/nonexistent"),
    (["+experiment=koala_lightning_1b", "teacher.path=SDXL"], "teacher.unet_file is not set"),
    (["+experiment=koala_1b", "teacher.path=SDXL", "data.shards=''"], "data.shards is not set"),
    (["+experiment=koala_1b", f"teacher.path={CONF_DIR}"], "lacks model_index.json, scheduler/scheduler_config"),
    (["+experiment=koala_1b", "teacher.path=SDXL", "teacher.vae_path=SDXL/tokenizer"], "is not a diffusers VAE folder"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size=10"),
    (["teacher.timesteps=random"], "teacher.timesteps"),
    (["data.shards='/nonexistent/{0..3}.tar'"], "data.shards"),
    (["data.resampled=false", "data.num_workers=8"], "re-shard"),
    (["data.num_workers=-1"], "data.num_workers must be >= 0, got -1"),  # no longer filed under data.shards
    (["data.shards=pipe:"], "'pipe:' is a pipe: source without a command"),  # ten tar errors, then a late error
    (["student=custom", "student.layers_per_block=[1,1,1]", "student.transformer_layers_per_block=[1,2,9]",
      "student.mid_block=true"], "transformer depth 9"),
    # found after training (the export's scheduler) or in the end-of-run grid (steps=0 divided by zero) before
    (["teacher.sampler.scheduler=ddim"], "teacher.sampler.scheduler='ddim' is not one of euler"),
    (["teacher.sampler.steps=0"], "teacher.sampler.steps=0 must be at least 1"),
    (["teacher.sampler.guidance_scale=nan"], "teacher.sampler.guidance_scale=nan must be 0 or more"),
    (["teacher.sampler.timestep_spacing=weird"], "teacher.sampler.timestep_spacing='weird' is not one of"),
    # the trailing grid reached timestep -1 (trained with exit 0); the next ones failed after the models loaded
    (["teacher.timesteps=trailing", "teacher.trailing_steps=2000"], "the trailing grid has no more distinct timesteps"),
    (["distill.lf_stages=[DW-9]"], "distill.lf_stages: this student has no stage 'DW-9'"),
    (["+experiment=koala_700m", "teacher.path=SDXL", "distill=bksdm"],  # KOALA-700M has no mid block
     "no stage 'Mid' (it has DW-1, DW-2, DW-3, UP-1, UP-2, UP-3); name only those, e.g. distill.lf_stages=[DW-1,"),
    (["data.num_workers=1", "data.prefetch_factor=0"], "data.prefetch_factor=0 must be at least 1"),
    (["data.max_aspect=0"], "data.max_aspect=0.0 must be a positive width/height ratio"),
    (["data.min_side=-5"], "data.min_side=-5 must be 0 (no filter) or more"),
    (["distill.w_task=0", "distill.w_out=0", "distill.w_feat=0"], "the loss would be 0"),
    (["train.output_dir=''"], "train.output_dir is empty"),  # would have written into the current folder
    (["+experiment=koala_1b", "teacher.path=SDXL", "teacher.vae_path=SDXL/unet"],
     "holds a UNet2DConditionModel, not a VAE"),  # failed inside diffusers with a traceback
])
def test_semantic_errors_before_any_model(override, needle, demo_shards, sdxl_layout):
    cfg = load_config([f"data.shards={demo_shards}", *(o.replace("SDXL", str(sdxl_layout)) for o in override)])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_fresh_run_in_a_folder_holding_a_run_is_refused(tmp_path, demo_shards):
    """Before, it mixed with the old run: keep_last pruned the new checkpoints (lower step numbers) and
    train.resume=latest then went back to the old run."""
    (tmp_path / "checkpoints" / "step_000000020").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000000020" / "meta.json").write_text("{}")
    with pytest.raises(ConfigError) as info:
        validate(load_config([f"data.shards={demo_shards}", f"train.output_dir={tmp_path}"]))
    assert "already holds a run (checkpoint step_000000020): continue it with train.resume=latest" in str(
        info.value)


def test_empty_sample_prompts_are_refused_when_grids_are_drawn(demo_shards):
    """A grid of no prompts failed at the end of the run (after training, before the export)."""
    with pytest.raises(ConfigError, match="train.sample_prompts is empty"):
        validate(load_config([f"data.shards={demo_shards}", "train.sample_prompts=[]"]))
    validate(load_config([f"data.shards={demo_shards}", "train.sample_prompts=[]", "train.sample_every=0",
                          "train.sample_at_end=false"]))


def test_settings_probably_not_meant_are_notes_not_errors():
    """The LR multiplier at the last step is max_steps / warmup_steps: the run trains, and says it."""
    assert config_notes(load_config(["train.max_steps=100", "train.warmup_steps=100"])) == []
    (note,) = config_notes(load_config(["train.max_steps=100", "train.warmup_steps=400",
                                        "train.lr_schedule=cosine"]))
    assert "rises to 0.25 x train.lr by the last step and never reaches train.lr or decays" in note
    (note,) = config_notes(load_config(["train.optimizer=adamw8bit", "train.fused_adam=true"]))
    assert note.startswith("note: train.fused_adam=true has no effect with train.optimizer=adamw8bit")
    assert config_notes(load_config(["train.optimizer=adamw", "train.fused_adam=true"])) == []
    assert config_notes(load_config(["train.optimizer=adamw8bit"])) == []  # the low-memory profile's own setting


def test_a_key_given_twice_is_named():
    from train.config import repeated_keys

    assert repeated_keys(["train.lr=1", "train.lr=2"]) == "train.lr is given 2 times (1, 2): give each key once"
    assert repeated_keys(["+train.foo=1", "train.foo=2"]).startswith("train.foo is given 2 times")
    assert repeated_keys(["train.lr=1", "train.seed=2", "+experiment=demo"]) is None


def test_batch_divisibility_depends_on_processes(demo_shards):
    cfg = load_config(["train.global_batch_size=8", "train.micro_batch_size=2", f"data.shards={demo_shards}"])
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="3 x 2"):
        validate(cfg, world_size=3)


@pytest.mark.parametrize("args, needle", [
    (["train.max_stepz=3"], "train.max_stepz"),
    # a semantic error found after the model code is imported: no library warning before the line either
    (["+experiment=demo", "train.micro_batch_size=3"], "train.global_batch_size=4"),
    # an unquoted brace pattern, expanded by the shell: Hydra kept the last shard alone, and the run trained on it
    (["data.shards=/d/000000.tar", "data.shards=/d/000001.tar", "data.shards=/d/000002.tar"],
     "data.shards is given 4 times (/d/000000.tar, /d/000001.tar, ...): a brace pattern the shell expanded? Quote"),
])
def test_main_prints_one_error_line_and_exits_2(args, needle, demo_shards):
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "train" / "main.py"), *args, f"data.shards={demo_shards}"],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("config error:") and needle in lines[0], proc.stderr


@pytest.mark.parametrize("rank, lines", [(None, 1), ("0", 1), ("1", 0)])
def test_a_launch_of_several_ranks_says_a_config_error_once(rank, lines, monkeypatch, capsys):
    """Every rank finds the same config error; global rank 0 (or a process without RANK) prints it."""
    from train import main as entry

    monkeypatch.delenv("RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    assert entry.main(["train.max_stepz=3"]) == 2
    assert len([ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("config error:")]) == lines


def test_launch_problems_are_one_line_before_any_model(monkeypatch, capsys, demo_shards, tmp_path):
    """Found by train/main.py after the config checks and before setup: each was a traceback, the FP8 one after
    the models had loaded."""
    from train import loop
    from train import main as entry

    monkeypatch.setattr(loop, "setup", lambda cfg: pytest.fail("setup reached"))
    base = ["+experiment=demo", f"data.shards={demo_shards}", f"train.output_dir={tmp_path / 'run'}"]
    monkeypatch.setenv("WORLD_SIZE", "eight")
    assert entry.main(base) == 2
    monkeypatch.delenv("WORLD_SIZE")
    if not torch.cuda.is_available():
        assert entry.main([*base, "train.teacher_fp8=true"]) == 2
    if Path("/proc/self").is_dir():  # os.access passes it for root; mkdir fails
        assert entry.main([*base[:2], "train.output_dir=/proc/koala_distill_test/run"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert all(ln.startswith("config error: ") for ln in lines), lines
    assert "WORLD_SIZE='eight'" in lines[0]
    assert torch.cuda.is_available() or "train.teacher_fp8=true needs a CUDA GPU" in lines[1]
    assert not Path("/proc/self").is_dir() or "cannot be created" in lines[-1]

    # an SDPA backend this device lacks, and an 8-bit optimizer without its library: each was a traceback after the
    # models had loaded
    if not torch.cuda.is_available():
        assert entry.main([*base, "train.sdpa_backend=cudnn"]) == 2
    assert entry.launch_refusal(load_config([*base, "train.sdpa_backend=math"])) is None  # runs everywhere
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    assert entry.main([*base, "train.optimizer=adamw8bit"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert all(ln.startswith("config error: ") for ln in lines), lines
    assert torch.cuda.is_available() or lines[0].startswith("config error: train.sdpa_backend=cudnn cannot run on cpu")
    assert lines[-1].startswith("config error: train.optimizer=adamw8bit needs bitsandbytes")


def test_unquoted_brace_pattern_says_how_to_quote_it():
    """The shell strips one level of quotes, so data.shards='/d/{0..3}.tar' reaches Hydra unquoted."""
    with pytest.raises(ConfigError) as info:
        load_config(["data.shards=/d/{000..003}.tar"])
    msg = str(info.value)
    assert "None" not in msg and "\n" not in msg
    assert "quote a brace pattern" in msg and """"data.shards='/d/{000..003}.tar'\"""" in msg


TINY_LATENTS = dict(latent_shape=(4, 32, 32), text_dim=64, pooled_dim=32, image_size=(64, 64))  # tiny teacher's


@pytest.mark.parametrize("change, needle", [
    ({}, None),
    ({"image_size": (56, 72)}, None),  # an aspect bucket of about the same area
    ({"image_size": (128, 128)}, "made at 128x128 px (sample l0000x0000) but teacher.resolution=64"),
    ({"text_dim": 2048, "pooled_dim": 1280}, "prompt embeddings 2048 wide where it takes 64 (cross_attention_dim); "
                                             "pooled embeddings 1280 wide where it takes 32"),
    ({"latent_shape": (16, 32, 32)}, "latent channels 16 wide where it takes 4"),
])
def test_latent_shards_that_do_not_fit_the_teacher_are_one_line(tmp_path, change, needle):
    """Latents made for another resolution or with another pipeline's encoders: found from the first sample,
    before any model loads."""
    from data.synthetic import write_synthetic_latent_shards

    write_synthetic_latent_shards(str(tmp_path), num_shards=1, samples_per_shard=2, **{**TINY_LATENTS, **change})
    cfg = load_config(["data.kind=latents", f"data.shards={tmp_path}", "data.num_workers=1"])
    if needle is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("setting", ["data.random_flip=true", "data.min_side=512", "data.syncap=true",
                                     "data.score_filters=['aesthetic_score>=5']", "data.caption_fields=[txt]",
                                     "data.random_crop=false", "data.min_aspect=0.5", "data.max_aspect=1.5",
                                     "data.max_pixels=1000", "data.alt_text_fields=[x]"])
def test_raw_stream_settings_that_latent_shards_ignore_are_one_line(tmp_path, setting):
    """Latent shards fixed their samples, crops and captions when they were made: a filter, flip or caption choice
    set for the run was silently ignored, and the run trained on what it was meant to drop."""
    from data.synthetic import write_synthetic_latent_shards

    write_synthetic_latent_shards(str(tmp_path), num_shards=1, samples_per_shard=2, **TINY_LATENTS)
    common = ["data.kind=latents", f"data.shards={tmp_path}", "data.num_workers=1"]
    validate(load_config(common))
    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.* has no effect with data\.kind=latents"):
        validate(load_config([*common, setting]))


@pytest.mark.parametrize("kind", ["raw", "latents"])
def test_data_kind_that_does_not_match_the_shards_is_one_line(kind, tmp_path, demo_shards):
    """Raw shards read as latents (or latents as raw) skipped every sample and failed in the loader after the
    models had loaded; the first sample says which kind the shards are."""
    from data.synthetic import write_synthetic_latent_shards

    if kind == "raw":
        shards, wrong = str(demo_shards), "latents"
    else:
        write_synthetic_latent_shards(str(tmp_path), num_shards=1, samples_per_shard=2, **TINY_LATENTS)
        shards, wrong = str(tmp_path), "raw"
    with pytest.raises(ConfigError) as info:
        validate(load_config([f"data.kind={wrong}", f"data.shards={shards}", "data.num_workers=1"]))
    msg = str(info.value)
    assert f"but data.kind={wrong}: set data.kind={kind}" in msg and "\n" not in msg


def test_shards_without_any_sample_are_one_line(tmp_path):
    """A file that is not a shard of either kind passed the check and failed in the loader's worker."""
    (tmp_path / "notes.tar").write_text("not a tar")
    with pytest.raises(ConfigError, match="notes.tar holds no image or latent sample in its first 16"):
        validate(load_config([f"data.shards={tmp_path / 'notes.tar'}", "data.num_workers=1"]))


def test_a_damaged_first_shard_does_not_decide_for_the_set(tmp_path, demo_shards):
    """The kind check and the latent-shape reference read the first 16 samples of the first local shard; a first
    shard cut short (which the stream skips and counts) refused the whole set as holding no sample."""
    import shutil

    from data.decode import PROBE_SHARDS, first_latent_example
    from data.synthetic import write_synthetic_latent_shards

    raw = tmp_path / "raw"
    shutil.copytree(demo_shards, raw)
    first = sorted(raw.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[:700])  # the first member's header and a part of its data
    validate(load_config([f"data.shards={raw}", "data.num_workers=1"]))
    with pytest.raises(ConfigError, match="holds images \\(raw shards\\).*but data.kind=latents"):
        validate(load_config(["data.kind=latents", f"data.shards={raw}", "data.num_workers=1"]))

    latents = tmp_path / "latents"
    write_synthetic_latent_shards(str(latents), num_shards=2, samples_per_shard=2, **TINY_LATENTS)
    first = sorted(latents.glob("*.tar"))[0]
    first.write_bytes(b"")
    assert first_latent_example([str(p) for p in sorted(latents.glob("*.tar"))]) is not None
    validate(load_config(["data.kind=latents", f"data.shards={latents}", "data.num_workers=1"]))

    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(PROBE_SHARDS + 1):  # only the first PROBE_SHARDS are read: the last one is never reached
        (junk / f"{i:06d}.tar").write_bytes(b"not a tar" if i < PROBE_SHARDS else (raw / "000003.tar").read_bytes())
    with pytest.raises(ConfigError, match=f"000000.tar holds no image or latent sample in its first 16, nor do the "
                                          f"next local shards \\(up to {PROBE_SHARDS} read\\)"):
        validate(load_config([f"data.shards={junk}", "data.num_workers=1"]))


def test_caption_dropout_on_latents_needs_the_empty_caption_file(tmp_path, tiny_pipeline_dir):
    """Only for a teacher whose unconditional input is the encoding of "" (force_zeros_for_empty_prompt false);
    SDXL's (and the tiny pipeline's) is all zeros, which needs no file."""
    from data.latents import EMPTY_PROMPT_FILE
    from data.synthetic import write_synthetic_latent_shards

    shards = tmp_path / "latents"
    write_synthetic_latent_shards(str(shards), num_shards=1, samples_per_shard=2, **TINY_LATENTS)
    teacher = tmp_path / "teacher"  # the tiny pipeline, but guided with the encoding of ""
    teacher.mkdir()
    for part in tiny_pipeline_dir.iterdir():
        if part.name != "model_index.json":
            (teacher / part.name).symlink_to(part)
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    (teacher / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    common = ["data.kind=latents", f"data.shards={shards}", "data.num_workers=1", "distill.caption_dropout=0.1"]
    cfg = load_config([*common, f"teacher.path={teacher}"])
    validate(cfg)  # written beside the shards
    (shards / EMPTY_PROMPT_FILE).write_bytes(b"garbage")  # passed, then np.load raised after the models loaded
    with pytest.raises(ConfigError, match=f"{EMPTY_PROMPT_FILE} is damaged \\(not an .npz of arrays: "):
        validate(cfg)
    (shards / EMPTY_PROMPT_FILE).unlink()
    with pytest.raises(ConfigError, match=f"needs the empty caption's embeddings in .*{EMPTY_PROMPT_FILE}"):
        validate(cfg)
    validate(load_config([*common, f"teacher.path={tiny_pipeline_dir}"]))  # all zeros: no file needed
    validate(load_config(common[:3] + [f"teacher.path={teacher}"]))  # no dropout


def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path, demo_shards, monkeypatch):
    import os

    cfg = load_config([f"data.shards={demo_shards}", f"train.output_dir={tmp_path}/a/b"])
    validate(cfg)
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path))  # as if tmp_path were read-only
    with pytest.raises(ConfigError, match=f"cannot be created: {tmp_path} is not writable"):
        validate(cfg)


def test_the_latent_check_reads_past_an_unreadable_first_sample(tmp_path):
    import io
    import json

    import numpy as np
    import webdataset as wds

    from data.decode import first_latent_example

    def npy(shape: tuple[int, ...]) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(shape, np.float16))
        return buffer.getvalue()

    meta = json.dumps({"caption": "c", "original_size": [64, 64], "crop_top_left": [0, 0],
                       "target_size": [128, 128]}).encode()
    shard = tmp_path / "000000.tar"
    with wds.TarWriter(str(shard)) as writer:
        writer.write({"__key__": "flat", "latents.npy": npy((4, 1024)), "prompt_embeds.npy": npy((77, 64)),
                      "pooled_prompt_embeds.npy": npy((32,)), "json": meta})
        writer.write({"__key__": "good", "latents.npy": npy((4, 16, 16)), "prompt_embeds.npy": npy((77, 64)),
                      "pooled_prompt_embeds.npy": npy((32,)), "json": meta})
    example = first_latent_example([str(shard)])
    assert example.key == "good" and example.latents.shape == (4, 16, 16) and example.target_size == (128, 128)
    assert first_latent_example(["pipe:cat x.tar"]) is None
    cfg = load_config(["data.kind=latents", f"data.shards={tmp_path}", "data.num_workers=1"])
    with pytest.raises(ConfigError, match=r"made at 128x128 px \(sample good\)"):
        validate(cfg)


@pytest.mark.parametrize("saved_deepspeed, saved_world, launch_deepspeed, world, needle", [
    (False, 1, True, 2, "written without DeepSpeed, launched with it"),
    (True, 2, False, 1, "written with DeepSpeed, launched without it"),
    (True, 2, True, 4, "DeepSpeed ranks 2 -> 4"),
    (True, 2, True, 2, None),
    (False, 2, False, 4, None),  # Accelerate's DDP state loads on any number of processes
    # the check before `accelerate launch` (make train, slurm_train.sh) cannot know whether it will use DeepSpeed
    (True, 2, None, 2, None),
    (False, 2, None, 4, None),
    (True, 2, None, 4, "DeepSpeed ranks 2 -> 4"),  # refused with DeepSpeed or without it
])
def test_a_resume_across_launchers_is_one_line(tmp_path, demo_shards, monkeypatch, saved_deepspeed, saved_world,
                                                launch_deepspeed, world, needle):
    """The checkpoint's layout (Accelerate's pytorch_model/ folder for a DeepSpeed engine) and meta.json's
    world_size against this launch (`accelerate launch` sets ACCELERATE_USE_DEEPSPEED)."""
    import json

    ckpt = tmp_path / "checkpoints" / "step_000000004"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 4, "world_size": saved_world}))
    if saved_deepspeed:
        (ckpt / "pytorch_model").mkdir()
    if launch_deepspeed is None:  # as in the pre-launch check: the environment says nothing
        monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true" if launch_deepspeed else "false")
    cfg = load_config([f"data.shards={demo_shards}", "data.num_workers=1", f"train.resume={ckpt}",
                       "train.global_batch_size=8", "train.micro_batch_size=2"])
    known = launch_deepspeed is not None
    if needle is None:
        validate(cfg, world_size=world, launch_known=known)
        return
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world, launch_known=known)
    assert needle in str(info.value) and "step_000000004" in str(info.value)


def test_a_teacher_unet_file_must_be_a_whole_unet_for_the_teacher(tmp_path, demo_shards, tiny_pipeline_dir):
    """SDXL-Lightning's U-Net file replaces the teacher's U-Net: its names and shapes are read from the file's
    header before any model loads, and checked again when the teacher loads (one line, not a state-dict dump)."""
    from safetensors.torch import load_file, save_file

    from distill.teachers import TeacherError, load_teacher_unet

    good = tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(good))
    first = sorted(state)[0]
    cases = {"lora": ({"lora_unet_down_blocks_0.alpha": torch.zeros(1)}, f"{len(state)} missing"),
             "shape": ({**state, first: torch.zeros(3, 3)}, f"1 of other shapes (first: {first} [3, 3] where")}
    for name, (tensors, _) in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    cases["text"] = ({}, "text.safetensors is not a whole safetensors file")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-100])  # an interrupted download
    cases["cut"] = ({}, "cut.safetensors is cut short")

    def cfg(unet_file):
        return load_config([f"data.shards={demo_shards}", "data.num_workers=1", f"teacher.path={tiny_pipeline_dir}",
                            f"teacher.unet_file={unet_file}"])

    validate(cfg(good))
    for name, (_, needle) in cases.items():
        with pytest.raises(ConfigError) as info:
            validate(cfg(tmp_path / f"{name}.safetensors"))
        assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(TeacherError, match=f"does not fit .*{len(state)} missing"):
        load_teacher_unet(cfg(tmp_path / "lora.safetensors").teacher, tiny_pipeline_dir)
    unet = load_teacher_unet(cfg(good).teacher, tiny_pipeline_dir, dtype=torch.float32)
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())


def _to_original_layout(state: dict, config: dict) -> dict:
    """A diffusers SDXL U-Net state dict renamed to Stability's checkpoint layout (`model.diffusion_model.*`),
    written here from the layout's block structure, independently of diffusers' converter (which the loader uses
    the other way round)."""
    per_down = per_up = config["layers_per_block"] + 1  # down: resnets + a downsampler; up: resnets
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}

    def rename(key: str) -> str:
        parts = key.split(".")
        for n in (1, 2):
            if ".".join(parts[:n]) in fixed:
                return "model.diffusion_model." + ".".join([fixed[".".join(parts[:n])], *parts[n:]])
        if parts[0] == "mid_block":
            slot = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}[".".join(parts[1:3])]
            block, rest = f"middle_block.{slot}", parts[3:]
        else:
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if parts[0] == "down_blocks":
                n = 1 + i * per_down + (per_down - 1 if kind == "downsamplers" else j)
                block = f"input_blocks.{n}." + {"resnets": "0", "attentions": "1", "downsamplers": "0.op"}[kind]
            else:
                n = i * per_up + (per_up - 1 if kind == "upsamplers" else j)  # upsampler beside the last resnet
                has_attn = "CrossAttn" in config["up_block_types"][i]
                block = f"output_blocks.{n}." + {"resnets": "0", "attentions": "1",
                                                 "upsamplers": "2.conv" if has_attn else "1.conv"}[kind]
            if kind in ("downsamplers", "upsamplers"):
                rest = rest[1:]  # downsamplers.0.conv -> 0.op, upsamplers.0.conv -> 2.conv (1.conv without attention)
        if parts[0] in ("down_blocks", "up_blocks", "mid_block") and "resnets" in parts and rest[0] in resnet:
            rest = [*resnet[rest[0]].split("."), *rest[1:]]
        return "model.diffusion_model." + ".".join([block, *rest])

    return {rename(k): v for k, v in state.items()}


def test_a_teacher_unet_file_may_be_an_original_layout_sdxl_checkpoint(tmp_path, demo_shards, tiny_pipeline_dir):
    """A whole SDXL checkpoint in Stability's layout (A1111/ComfyUI, e.g. a community fine-tune or SDXL-Lightning's
    full checkpoint) serves as teacher.unet_file: its U-Net part is checked from the header, then loaded and
    renamed; the VAE and text-encoder tensors beside it are ignored."""
    import json

    from safetensors.torch import load_file, save_file

    from distill.teachers import load_teacher_unet

    state = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    config = json.loads((tiny_pipeline_dir / "unet" / "config.json").read_text())
    original = {k: v.half() for k, v in _to_original_layout(state, config).items()}
    assert len(set(original)) == len(state)
    others = {"first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
              "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": torch.zeros(64)}
    save_file({**original, **others}, str(tmp_path / "full.safetensors"))
    short = {k: v for k, v in original.items() if "output_blocks.8." not in k}  # the last up resnet is gone
    save_file(short, str(tmp_path / "short.safetensors"))

    def cfg(unet_file):
        return load_config([f"data.shards={demo_shards}", "data.num_workers=1", f"teacher.path={tiny_pipeline_dir}",
                            f"teacher.unet_file={unet_file}"])

    validate(cfg(tmp_path / "full.safetensors"))
    unet = load_teacher_unet(cfg(tmp_path / "full.safetensors").teacher, tiny_pipeline_dir, dtype=torch.float32)
    loaded = unet.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k].half().float()) for k in state)  # every tensor in its place
    with pytest.raises(ConfigError) as info:
        validate(cfg(tmp_path / "short.safetensors"))
    assert "is not a U-Net for this teacher" in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_readme_training_commands_compose():
    """Every `train/main.py` command in the README, split like a shell would, composes with Hydra."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    commands = [c for c in re.sub(r"\\\n\s*", " ", readme).splitlines()
                if "train/main.py" in c and c.lstrip().startswith("accelerate launch") and "..." not in c]
    assert len(commands) >= 3
    for command in commands:
        args = shlex.split(command)
        cfg = load_config(args[args.index("train/main.py") + 1:])
        assert cfg.data.shards, command


def test_inspect_student_json(capsys):
    """KOALA-1B through the script as a process (the command-line contract), KOALA-700M in-process (same code)."""
    import json

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "scripts" / "inspect_student.py"), "student=koala_1b",
                           "teacher=sdxl_base"], capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "DW-3" in proc.stdout and "UP-1" in proc.stdout
    out = {"koala_1b": json.loads(proc.stdout.strip().splitlines()[-1])}
    from scripts.inspect_student import inspect

    out["koala_700m"] = inspect(["student=koala_700m", "teacher=sdxl_base"])
    assert "DW-3" in capsys.readouterr().out
    assert out["koala_1b"]["teacher_params"] == 2_567_463_684
    assert out["koala_1b"]["student_params"] == 1_161_184_324
    assert out["koala_700m"]["student_params"] == 782_822_724
    assert out["koala_700m"]["ratio"] == round(782_822_724 / 2_567_463_684, 4)


def test_out_of_memory_is_one_line_with_advice_and_exit_4(monkeypatch, capsys, demo_shards):
    from train import loop
    from train import main as entry

    def no_memory(cfg, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "setup", no_memory)
    code = entry.main([f"data.shards={demo_shards}", "train.micro_batch_size=2", "train.global_batch_size=4"])
    assert code == 4
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: out of memory")
    assert "train.micro_batch_size=2" in lines[0] and "make plan-memory" in lines[0]
    assert "train.global_batch_size=4" in lines[0]


def test_check_only_says_the_run_in_one_line_and_help_lists_the_groups(demo_shards, capsys, monkeypatch, tmp_path):
    """`train/main.py --check` (run by `make train` and slurm_train.sh before `accelerate launch`) composes and checks
    with WORLD_SIZE's process count, trains nothing, and names what a run would do; --help lists the options."""
    from train import main as entry

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    shards = f"data.shards={demo_shards}"
    args = ["--check", "+experiment=demo", shards, "train.micro_batch_size=2"]
    assert entry.main([*args, f"train.output_dir={tmp_path / 'nowhere' / 'run'}"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("config ok: teacher tiny, student tiny, 300 steps of 4 images = 2 process(es) x "
                          "micro-batch 2 x 1 accumulation") and out.endswith(f"into {tmp_path / 'nowhere' / 'run'}")
    assert not (tmp_path / "nowhere").exists()
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert entry.main(args) == 2
    assert "3 x 2" in capsys.readouterr().err
    # A resume of a DeepSpeed checkpoint: before `accelerate launch` it is not known whether the launch will use
    # DeepSpeed, so the check passes it (before, every `make train` or requeued Slurm job was refused here); the
    # launched ranks, whose environment says, compare it.
    ckpt = tmp_path / "ds" / "checkpoints" / "step_000000004"
    (ckpt / "pytorch_model").mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 4, "world_size": 2}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("ACCELERATE_USE_DEEPSPEED", *entry.LAUNCHER_ENV):
        monkeypatch.delenv(key, raising=False)
    resume = [*args, f"train.output_dir={tmp_path / 'ds'}", "train.resume=latest"]
    assert entry.main(resume) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("config ok:")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # launched, without DeepSpeed
    assert entry.main(resume) == 2
    assert "written with DeepSpeed, launched without it" in capsys.readouterr().err
    assert entry.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "experiment: demo, koala_1b," in text and "teacher: sdxl_base, sdxl_lightning, sdxl_turbo, tiny" in text


def test_slurm_script_checks_once_and_passes_overrides_intact(demo_shards, tmp_path):
    """scripts/slurm_train.sh with stand-ins for srun, scontrol, nvidia-smi and accelerate: a bad config is one line
    and exit code 2 before srun; a good one reaches `accelerate launch` with a quoted brace pattern unchanged."""
    import os
    import stat

    root = Path(__file__).resolve().parent.parent
    fake = tmp_path / "bin"
    env_dir = tmp_path / "env"
    (env_dir / "bin").mkdir(parents=True)
    fake.mkdir()
    launched = tmp_path / "launched.txt"
    scripts = {
        fake / "nvidia-smi": "echo 'GPU 0: A'; echo 'GPU 1: B'",
        fake / "scontrol": "echo node1",
        fake / "srun": 'while [[ $1 == --* ]]; do shift; done; SLURM_PROCID=0 exec "$@"',
        env_dir / "bin" / "accelerate": f"printf '%s\\n' \"$@\" > {launched}",
        env_dir / "bin" / "python": f'exec {sys.executable} "$@"',
    }
    for path, body in scripts.items():
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    (env_dir / "bin" / "activate").write_text(f"export PATH={env_dir / 'bin'}:$PATH\n")
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "RUN_DIR": str(tmp_path / "run"),
           "PYTHON_ENV": str(env_dir), "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "WANDB_MODE": "disabled"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)

    def slurm(*overrides):
        return subprocess.run(["bash", str(root / "scripts" / "slurm_train.sh"), *overrides], capture_output=True,
                              text=True, env=env, cwd=root, timeout=300)

    bad = slurm("+experiment=demo", f"data.shards={demo_shards}", "train.max_stepz=3")
    assert bad.returncode == 2 and not launched.exists()
    assert [ln for ln in bad.stderr.splitlines() if ln.strip()] == [
        "config error: Could not override 'train.max_stepz'. train.max_stepz: Key 'max_stepz' not in 'TrainConfig'"]
    shards = f"data.shards='{demo_shards}/{{000000..000003}}.tar'"
    good = slurm("+experiment=demo", shards, "train.micro_batch_size=2")  # 2 processes x 2 = the demo's batch 4
    assert good.returncode == 0, good.stderr
    assert "config ok: teacher tiny, student tiny, 300 steps of 4 images = 2 process(es)" in good.stdout
    args = launched.read_text().splitlines()
    assert args[0] == "launch" and args[args.index("--num_processes") + 1] == "2"
    assert args[args.index("train/main.py") + 1:] == [f"train.output_dir={tmp_path / 'run'}", "train.resume=latest",
                                                      "+experiment=demo", shards, "train.micro_batch_size=2"]


def _checkpoint(run: Path, step: int, manifest: bool = True) -> Path:
    """A checkpoint folder in the trainer's layout (weights, optimizer, RNG, data state), finalized as the trainer
    does, i.e. with meta.json's list of file sizes unless `manifest` is False (an older checkpoint)."""
    from safetensors.torch import save_file

    from train import checkpoint

    tmp = checkpoint.temp_dir(run, step)
    (tmp / "student").mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, str(tmp / "student" / "diffusion_pytorch_model.safetensors"))
    (tmp / "student" / "config.json").write_text("{}")
    torch.save({"state": {0: {"exp_avg": torch.zeros(64)}}}, tmp / "optimizer.bin")
    torch.save({"step": step}, tmp / "random_states_0.pkl")
    (tmp / "data_state_rank0.json").write_text(json.dumps({"rank": 0, "epoch": 0}))
    final = checkpoint.finalize(run, step, {"step": step}, keep_last=0)
    if not manifest:
        meta = json.loads((final / "meta.json").read_text())
        del meta["files"]
        (final / "meta.json").write_text(json.dumps(meta))
    return final


@pytest.mark.parametrize("damage, needle", [
    ("truncate student/diffusion_pytorch_model.safetensors",
     "student/diffusion_pytorch_model.safetensors has 320 bytes, 328 were written"),
    ("delete optimizer.bin", "optimizer.bin is missing"),
    ("garble meta.json", "meta.json cannot be read (JSONDecodeError)"),
    ("garble data_state_rank0.json", "data_state_rank0.json is not valid JSON"),  # same size: the parse tells
    ("truncate-old optimizer.bin", "optimizer.bin is cut short"),  # no size list: the zip's directory tells
    ("truncate-old student/diffusion_pytorch_model.safetensors",
     "student/diffusion_pytorch_model.safetensors is cut short: 320 bytes, its header names 328"),
])
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_the_one_before(damage, needle, tmp_path, demo_shards):
    """A checkpoint cut short by a copy, or with a file deleted, failed after the models loaded with a traceback
    (Accelerate's or safetensors'), and `latest` kept choosing it; now the config check says what is damaged and
    which checkpoint to resume from instead."""
    from train.checkpoint import checkpoint_problem

    action, rel = damage.split(" ")
    run = tmp_path / "run"
    before = _checkpoint(run, 2)
    latest = _checkpoint(run, 4, manifest=not action.endswith("-old"))
    assert checkpoint_problem(before) is None and checkpoint_problem(latest) is None
    path = latest / rel
    if action.startswith("truncate"):
        path.write_bytes(path.read_bytes()[:-8])
    elif action == "delete":
        path.unlink()
    else:
        path.write_text("x" * len(path.read_text()))
    cfg = load_config([f"data.shards={demo_shards}", f"train.output_dir={run}", "train.resume=latest"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    line = str(info.value)
    assert line.startswith(f"train.resume: the checkpoint {latest} is damaged ({needle}") and "\n" not in line, line
    assert line.endswith(f"); resume from the one before with train.resume={before} (the damaged one is then moved "
                         "aside, not deleted)"), line


def test_deepspeed_zero3_is_one_line_before_any_model_loads(tmp_path, demo_shards, monkeypatch):
    """A ZeRO-3 launch (zero_stage: 3 in the accelerate config, or stage 3 in a DeepSpeed JSON file it names) ended
    in a traceback from the text encoders, whose weights transformers had partitioned as they loaded."""
    cfg = load_config([f"data.shards={demo_shards}", "data.num_workers=1"])
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match=r"ZeRO stage 3 is not supported.*deepspeed_zero2\.yaml"):
        validate(cfg)
    validate(cfg, launch_known=False)  # before `accelerate launch`: the launched ranks check it
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    validate(cfg)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    ds_json = tmp_path / "ds.json"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_json))
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        validate(cfg)
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    validate(cfg)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")  # a ZeRO-3 file without DeepSpeed is not used
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    validate(cfg)


def test_a_checkpoint_replaced_by_one_of_the_same_step_survives_a_kill_between_the_renames(tmp_path, monkeypatch):
    """finalize deleted the older checkpoint of the same step before renaming the new one into place: a kill in
    between left neither. It is now renamed aside first, and the next start puts it back."""
    from train import checkpoint

    run = tmp_path / "run"
    old = _checkpoint(run, 4)
    old_meta = (old / "meta.json").read_text()
    tmp = checkpoint.temp_dir(run, 4)
    shutil.copytree(old, tmp)
    (tmp / "meta.json").unlink()
    real_rename = Path.rename

    def killed_at_the_second(self, target):
        if self == tmp:
            raise KeyboardInterrupt
        return real_rename(self, target)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", killed_at_the_second)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.finalize(run, 4, {"step": 4, "again": True}, keep_last=0)
    assert not old.exists() and checkpoint.latest_checkpoint(run) is None
    checkpoint.remove_stale_temps(run)  # what the next run does first
    assert checkpoint.latest_checkpoint(run) == old and (old / "meta.json").read_text() == old_meta
    assert sorted(p.name for p in checkpoint.checkpoint_root(run).iterdir()) == ["step_000000004"]
    shutil.copytree(old, tmp)  # replaced without a kill: the new one, and nothing aside
    checkpoint.finalize(run, 4, {"step": 4, "again": True}, keep_last=0)
    assert json.loads((old / "meta.json").read_text())["again"] is True
    assert sorted(p.name for p in checkpoint.checkpoint_root(run).iterdir()) == ["step_000000004"]
