"""The trainer in-process on the tiny teacher and the demo shards: the KD loss falls, resume is exact, the export
loads in diffusers, numerical faults are skipped and counted."""

from __future__ import annotations

import json
import math
import re
import stat
from pathlib import Path

import pytest
import torch
from conftest import record_file_ops
from safetensors.torch import load_file

from train.callbacks import Callback, ScalarLogger
from train.config import ConfigError, load_config, validate

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def tiny_cfg(out, shards, tiny_dir, *extra: str):
    cfg = load_config([
        "+experiment=demo", f"train.output_dir={out}", f"data.shards={shards}", f"teacher.path={tiny_dir}",
        "data.num_workers=0", "tracking=none", "train.micro_batch_size=2", "train.global_batch_size=2",
        "train.export=false", "train.log_every=5", "train.sample_at_end=false", *extra,
    ])
    validate(cfg)
    return cfg


def run_cfg(cfg, callbacks=None, patch=None):
    from train.loop import setup, train

    run = setup(cfg, callbacks=callbacks, show_progress=False)
    if patch:
        patch(run)
    return run, train(run)


def test_thirty_steps_lower_the_kd_loss(tmp_path, demo_shards, tiny_pipeline_dir):
    cfg = tiny_cfg(tmp_path / "run", demo_shards, tiny_pipeline_dir, "train.max_steps=30",
                   "train.checkpoint_every=0", "train.ema=false", "train.sample_at_end=true")
    run, summary = run_cfg(cfg)
    assert summary["steps"] == 30 and not summary["preempted"]
    first, last = run.state.kd_first, run.state.kd_last
    assert len(first) == len(last) == 20
    assert summary["kd_loss_last"] < 0.8 * summary["kd_loss_first"]
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert "sa/UP-1.1.1" in (tmp_path / "run" / "feature_pairs.txt").read_text()
    assert summary["samples"] and (tmp_path / "run" / "samples").is_dir()
    # the preview grid: a row per prompt, teacher then student, and the two columns are different models' images
    import numpy as np
    from PIL import Image

    grid = np.asarray(Image.open(summary["samples"]).convert("RGB")).astype(np.int16)
    side, rows, pad = cfg.teacher.resolution, len(cfg.train.sample_prompts), 2  # image_grid's padding
    assert grid.shape == (rows * side + (rows - 1) * pad, 2 * side + pad, 3)
    for r in range(rows):
        top = r * (side + pad)
        teacher_img, student_img = grid[top:top + side, :side], grid[top:top + side, side + pad:]
        assert teacher_img.std() > 1 and student_img.std() > 1  # not blank
        assert np.abs(teacher_img - student_img).mean() > 1


def test_the_run_pairs_features_by_the_configured_layer_map(tmp_path, demo_shards, tiny_pipeline_dir):
    """distill.layer_map reaches the run's pairs (tiny teacher DW-3: 4 blocks, student 2): up takes blocks 2 and 3."""
    from train.loop import setup

    run = setup(tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, "distill.layer_map=up"), show_progress=False)
    by_label = {p.label: p.teacher for p in run.distiller.pairs}
    run.distiller.close()
    assert [by_label[f"sa/DW-3.0.{k}"] for k in (0, 1)] == [
        f"down_blocks.2.attentions.0.transformer_blocks.{i}.attn1" for i in (2, 3)]
    assert "down_blocks.2.attentions.0.transformer_blocks.3.attn1" in (tmp_path / "feature_pairs.txt").read_text()


def test_a_run_counts_the_corrupt_samples_it_skipped(tmp_path, demo_shards, tiny_pipeline_dir):
    """Four demo samples and two damaged ones in one shard: two steps of two read the shard once; the run's summary
    and its logged scalars give each skip reason's count (a shuffle buffer of 1 reads the shard in order)."""
    import webdataset as wds

    good = [s for shard in ("000000.tar", "000001.tar") for s in wds.WebDataset(str(demo_shards / shard),
                                                                                  shardshuffle=False)][:4]
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "000000.tar")) as writer:
        for i, sample in enumerate(good):
            writer.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
            if i == 0:
                writer.write({"__key__": "bad_image", "png": b"<html>404 not found</html>", "txt": b"a cat"})
            if i == 1:
                writer.write({"__key__": "bad_json", "png": good[0]["png"], "json": b'{"caption": "unterminated'})
    run, summary = run_cfg(tiny_cfg(tmp_path / "run", shards, tiny_pipeline_dir, "train.max_steps=2",
                                    "train.checkpoint_every=0", "train.ema=false", "train.log_every=1",
                                    "data.shuffle_buffer=1", "data.buckets=false"))  # read in order
    assert summary["steps"] == 2 and summary["data_skipped"] == {"bad_image": 1, "bad_json": 1}
    logger = next(cb for cb in run.callbacks if type(cb).__name__ == "ScalarLogger")
    assert logger.last["data/skipped_bad_image"] == 1 and logger.last["data/skipped_bad_json"] == 1


def test_lr_schedule_and_per_micro_batch_generators():
    """Warmup reaches train.lr at its last step (the first update is not at LR 0); cosine starts after the warmup
    and is at half at the midpoint of the rest; each micro-batch of a step draws its own timesteps and noise."""
    from train.loop import lr_lambda, step_generator

    warm = lr_lambda(4, 10, "constant")
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = lr_lambda(2, 10, "cosine")
    assert cosine(0) == 0.5 and cosine(2) == 1.0 and cosine(6) == pytest.approx(0.5) and cosine(10) == 0.0
    cpu = torch.device("cpu")
    draws = {(r, t, m): torch.randn(4, generator=step_generator(0, r, t, m, cpu)) for r in (0, 1) for t in (0, 1)
             for m in (0, 1)}
    assert len({tuple(v.tolist()) for v in draws.values()}) == 8  # rank, step and micro-batch each change it
    assert torch.equal(draws[(0, 1, 1)], torch.randn(4, generator=step_generator(0, 0, 1, 1, cpu)))


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_gradients_are_clipped_and_logged_losses_average_the_micro_batches(tmp_path, demo_shards, tiny_pipeline_dir):
    """train.max_grad_norm: the optimizer steps on gradients whose norm is at most it (the logged norm is the one
    before clipping); with 2 micro-batches per step the step's losses are the mean of theirs."""
    cfg = tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, "train.max_steps=2", "train.checkpoint_every=0",
                   "train.ema=false", "train.global_batch_size=4", "train.max_grad_norm=0.001")
    seen = {"norms": [], "totals": [], "steps": []}

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            losses = self.inner(*args, **kwargs)
            seen["totals"].append(float(losses["total"].detach()))
            return losses

        def __getattr__(self, name):
            return getattr(self.inner, name)

    class StepEnd(Callback):
        def on_step_end(self, run, losses):
            seen["steps"].append((float(losses["total"]), float(run.last_grad_norm)))

    def patch(run):
        inner = run.optimizer.optimizer
        real_step = inner.step

        def step(*args, **kwargs):
            grads = [p.grad for group in inner.param_groups for p in group["params"] if p.grad is not None]
            seen["norms"].append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            return real_step(*args, **kwargs)

        inner.step = step
        run.distiller = Recording(run.distiller)

    run, _ = run_cfg(cfg, callbacks=[StepEnd()], patch=patch)
    assert run.state.samples_seen == 8  # 2 steps of the global batch, 4
    assert len(seen["norms"]) == 2 and all(n <= 0.001 * (1 + 1e-4) for n in seen["norms"])
    assert all(before > 0.01 for _, before in seen["steps"])  # the logged norm: before clipping, far above
    assert len(seen["totals"]) == 4
    for i, (total, _) in enumerate(seen["steps"]):
        assert total == pytest.approx((seen["totals"][2 * i] + seen["totals"][2 * i + 1]) / 2, rel=1e-5)


def test_a_resume_with_another_accumulation_syncs_on_the_last_micro_batch(tmp_path, demo_shards, tiny_pipeline_dir,
                                                                          capsys):
    """Accelerate's load_state restores its micro-batch counter (1 after one step of 1 micro-batch). Resumed with 2
    micro-batches per step, the update came after the first and the second's gradients were left behind; now each
    step ends with the update and no gradient left. The change of global batch is said."""
    common = ("train.checkpoint_every=1", "train.ema=false")
    run_cfg(tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, *common, "train.max_steps=1"))
    run, summary = run_cfg(tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, *common, "train.max_steps=2",
                                    "train.global_batch_size=4", "train.resume=latest"))
    assert run.accum == 2 and summary["steps"] == 2
    assert all(p.grad is None for p in run.student.parameters())
    assert "the global batch changes from 2 to 4 images per optimizer step at step 1" in capsys.readouterr().out


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """The first SIGINT asks for a checkpoint and a clean stop; a second one interrupts (a stuck step)."""
    import os
    import signal

    from train.loop import StopFlag

    flag = StopFlag()
    flag.install(tmp_path)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # after another signal: still the clean stop
        assert flag.requested() and flag.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.uninstall()


def test_a_stop_file_made_while_the_models_load_stops_the_run(tmp_path, demo_shards, tiny_pipeline_dir, capsys):
    """The scheduler's STOP can come while the run is still loading (minutes for SDXL): it counts, as one made
    during training does (before, the run took it for an old one and trained on until it was killed)."""
    cfg = tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, "train.max_steps=3", "train.checkpoint_every=0",
                   "train.ema=false")
    _, summary = run_cfg(cfg, patch=lambda run: (tmp_path / "STOP").touch())  # after setup, before the loop
    assert summary["steps"] == 1 and summary["preempted"]
    assert "older than this run" not in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "step_000000001" / "meta.json").is_file()


def test_a_stop_file_older_than_the_run_is_ignored(tmp_path, demo_shards, tiny_pipeline_dir, capsys):
    """A STOP left in the folder before the run stopped it after its first step; now only a new one does (and the
    run says it ignores the old one). Each checkpoint written is one line, its files readable as the umask allows
    (safetensors writes 0600). fp16 on the CPU computes in fp32, and says so; so does a warmup longer than the run."""
    from distill.files import process_umask

    tmp_path.joinpath("STOP").touch()
    _, summary = run_cfg(tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, "train.max_steps=3",
                                  "train.checkpoint_every=0", "train.ema=false", "train.mixed_precision=fp16",
                                  "train.warmup_steps=5"))
    assert summary["steps"] == 3 and not summary["preempted"]
    out = capsys.readouterr().out
    assert "STOP is older than this run and is ignored" in out
    assert "note: train.warmup_steps=5 is more than train.max_steps=3: the learning rate rises to 0.6 x" in out
    ckpt = tmp_path / "checkpoints" / "step_000000003"
    assert f"checkpoint written: {ckpt}" in out
    assert "warning: train.mixed_precision=fp16 has no effect on the CPU" in out
    weights = ckpt / "student" / "diffusion_pytorch_model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) & 0o666 == 0o666 & ~process_umask()

    # damage that sizes and headers do not show (zeros over the optimizer file's first bytes) is found by the load
    # itself: one line, not Accelerate's traceback
    from train.checkpoint import CheckpointLoadError
    from train.loop import reset_accelerate

    optimizer = ckpt / "optimizer.bin"
    optimizer.write_bytes(bytes(64) + optimizer.read_bytes()[64:])
    reset_accelerate()
    with pytest.raises(CheckpointLoadError) as info:
        run_cfg(tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, "train.max_steps=4", "train.checkpoint_every=0",
                         "train.ema=false", "train.resume=latest"))
    line = str(info.value)
    assert line.startswith(f"train.resume: the checkpoint {ckpt} is damaged (") and "\n" not in line, line
    assert re.search(r"is damaged \(\w+Error: [^)]{10,120}\); ", line), line  # the error's first sentence
    assert line.endswith("no whole checkpoint precedes it: start a new run in another train.output_dir"), line


def _state(run):
    opt = run.optimizer.state_dict()
    return {
        "student": {k: v.clone() for k, v in run.unwrapped.state_dict().items()},
        "ema": [p.clone() for p in run.ema.model.shadow_params],
        "exp_avg": [s["exp_avg"].clone() for s in opt["state"].values()],
        "lr_step": run.lr_scheduler.last_epoch,
        "step": run.state.step,
        "data": run.loader.state_dict(),
        "counters": (run.state.samples_seen, run.state.nonfinite_total),
        "kd": ([float(x) for x in run.state.kd_first], [float(x) for x in run.state.kd_last]),
    }


class StopAt(Callback):
    """Raise inside the loop at a given step, like a kill after a checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, run, losses):
        if run.state.step == self.step:
            raise KeyboardInterrupt


def test_resume_restores_everything_and_matches_an_uninterrupted_run(tmp_path, demo_shards, tiny_pipeline_dir):
    common = ("train.max_steps=8", "train.checkpoint_every=4", "train.lr_schedule=cosine",
              "train.warmup_steps=2", "train.ema=true")
    full_run, _ = run_cfg(tiny_cfg(tmp_path / "full", demo_shards, tiny_pipeline_dir, *common))
    full = _state(full_run)

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_cfg(tiny_cfg(out, demo_shards, tiny_pipeline_dir, *common), callbacks=[StopAt(6)])
    from train.checkpoint import latest_checkpoint

    assert latest_checkpoint(out).name == "step_000000004"
    # a resume whose student, optimizer or EMA setting differs from the checkpoint's is one line before any model
    for change, needle in [(("train.ema=false",), "train.ema true -> false"),
                           (("train.optimizer=adamw8bit",), 'train.optimizer "adamw" -> "adamw8bit"'),
                           (("student=custom", "student.layers_per_block=[1,1,1]",
                             "student.transformer_layers_per_block=[1,1,2]", "student.mid_block=false"),
                            "student U-Net mid_block_type UNetMidBlock2DCrossAttn -> None")]:
        with pytest.raises(ConfigError) as info:
            tiny_cfg(out, demo_shards, tiny_pipeline_dir, *common, "train.resume=latest", *change)
        assert needle in str(info.value) and "step_000000004" in str(info.value), str(info.value)
    # Timesteps, noise and data order come from generators seeded per step, not from the global RNGs: a resume
    # whose random_states file Accelerate cannot read (it logs that at INFO and goes on) draws the same
    rng_file = latest_checkpoint(out) / "random_states_0.pkl"
    rng_file.write_bytes(bytes(rng_file.stat().st_size))  # same size: the checkpoint check passes it
    torch.manual_seed(987)
    resumed_run, summary = run_cfg(tiny_cfg(out, demo_shards, tiny_pipeline_dir, *common, "train.resume=latest"))
    resumed = _state(resumed_run)
    assert summary["steps"] == 8 and resumed["step"] == full["step"] == 8
    assert resumed["lr_step"] == full["lr_step"]
    assert resumed["data"]["batches"] == full["data"]["batches"]
    assert resumed["counters"] == full["counters"] == (16, 0)  # samples seen, updates skipped
    assert len(resumed["kd"][0]) == 8  # the per-step kd losses the summary averages, steps 1-4 from the checkpoint
    for a, b in zip(resumed["kd"], full["kd"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for k, v in full["student"].items():
        torch.testing.assert_close(resumed["student"][k], v, rtol=0, atol=1e-6)
    for a, b in zip(resumed["ema"], full["ema"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(resumed["exp_avg"], full["exp_avg"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    # A rollback: the full run resumed from its step 4. Its step-8 checkpoint is set aside, not resumed from
    # by `latest` and not pruned in place of the new ones.
    from train.checkpoint import list_checkpoints

    step4 = tmp_path / "full" / "checkpoints" / "step_000000004"
    run_cfg(tiny_cfg(tmp_path / "full", demo_shards, tiny_pipeline_dir, *common, "train.max_steps=6",
                     "train.keep_last=1", f"train.resume={step4}"))
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["step_000000006"]
    aside = tmp_path / "full" / "checkpoints" / "abandoned_after_step_000000004"
    assert (aside / "step_000000008" / "meta.json").is_file()


def test_resume_with_8bit_adam_matches_an_uninterrupted_run(tmp_path, demo_shards, tiny_pipeline_dir):
    """The low-memory profile's optimizer: bitsandbytes' uint8 moments and scales go through the checkpoint."""
    pytest.importorskip("bitsandbytes")
    common = ("train.max_steps=4", "train.checkpoint_every=2", "train.ema=false", "train.optimizer=adamw8bit",
              "train.fused_adam=false", "train.lr=1e-3")
    full_run, _ = run_cfg(tiny_cfg(tmp_path / "full", demo_shards, tiny_pipeline_dir, *common))
    assert type(full_run.optimizer.optimizer).__name__ == "AdamW8bit"
    full = {k: v.clone() for k, v in full_run.unwrapped.state_dict().items()}
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_cfg(tiny_cfg(out, demo_shards, tiny_pipeline_dir, *common), callbacks=[StopAt(3)])
    resumed_run, summary = run_cfg(tiny_cfg(out, demo_shards, tiny_pipeline_dir, *common, "train.resume=latest"))
    assert summary["steps"] == 4
    states = [s for s in resumed_run.optimizer.optimizer.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)  # 8-bit moments (small tensors stay fp32)
    for k, v in full.items():
        torch.testing.assert_close(resumed_run.unwrapped.state_dict()[k], v, rtol=0, atol=1e-6)


def test_ema_checkpoint_saves_the_average_and_leaves_the_live_weights_untouched(tmp_path, demo_shards,
                                                                                  tiny_pipeline_dir):
    """The checkpoint's student_ema/ and the run's export hold EMAModel's average of the live weights; saving swaps
    the live weights back."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from train.loop import save_checkpoint

    class Record(Callback):  # the live weights at the start and after each update
        def __init__(self):
            self.weights = []

        def on_start(self, run):
            self.weights.append([p.detach().clone() for p in run.unwrapped.parameters()])

        on_update = on_start

    cfg = tiny_cfg(tmp_path / "run", demo_shards, tiny_pipeline_dir, "train.max_steps=3", "train.checkpoint_every=0",
                   "train.ema=true", "train.ema_decay=0.5", "train.lr=1e-3", "train.export=true")
    record = Record()
    run, summary = run_cfg(cfg, callbacks=[record])
    assert len(record.weights) == 4
    # the average as EMAModel defines it, from the recorded weights: decay(step) = min(0.5, (1 + s) / (10 + s)),
    # s = step - 1, and 0 at the first update
    schedule = EMAModel([torch.zeros(1)], decay=0.5)
    expected = record.weights[0]
    for step, weights in enumerate(record.weights[1:], start=1):
        d = schedule.get_decay(step)
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights, strict=True)]
    live = {k: v.clone() for k, v in run.unwrapped.state_dict().items()}
    path = save_checkpoint(run)
    for k, v in run.unwrapped.state_dict().items():
        assert torch.equal(v, live[k]), k  # the EMA weights were swapped in for saving and swapped out again
    saved = UNet2DConditionModel.from_pretrained(path / "student_ema")
    shadow = run.ema.model.shadow_params
    for p, s in zip(saved.parameters(), shadow, strict=True):
        torch.testing.assert_close(p, s.to(p.dtype), rtol=0, atol=0)
    assert any(not torch.equal(p, q) for p, q in zip(saved.parameters(), run.unwrapped.parameters(), strict=True))
    for p, e in zip(saved.parameters(), expected, strict=True):
        torch.testing.assert_close(p, e)
    raw = UNet2DConditionModel.from_pretrained(path / "student")  # student/ keeps the live weights
    for k, p in raw.named_parameters():
        assert torch.equal(p, live[k]), k
    assert any(not torch.equal(p, q) for p, q in zip(raw.parameters(), saved.parameters(), strict=True))
    exported = UNet2DConditionModel.from_pretrained(Path(summary["export_dir"]) / "unet")  # the run's own export
    for p, q in zip(exported.parameters(), saved.parameters(), strict=True):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, w) for p, w in zip(saved.parameters(), record.weights[0], strict=True))  # it moved


def test_export_loads_in_diffusers_and_makes_an_image(tmp_path, demo_shards, tiny_pipeline_dir):
    from diffusers import StableDiffusionXLPipeline

    cfg = tiny_cfg(tmp_path / "run", demo_shards, tiny_pipeline_dir, "train.max_steps=2", "train.export=true",
                   "teacher.sampler.timestep_spacing=trailing", "train.ema=false")
    run, summary = run_cfg(cfg)
    pipe = StableDiffusionXLPipeline.from_pretrained(summary["export_dir"])
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    for k, v in run.unwrapped.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[k], v), k
    image = pipe("a cat on a sofa", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert json.loads((tmp_path / "run" / "export" / "koala_sampler.json").read_text())["num_inference_steps"] == 4

    # the final checkpoint exported on its own (scripts/export.py) gives the same folder: weights, and the run's
    # teacher settings (the spacing override) from the checkpoint's config
    from train.checkpoint import latest_checkpoint
    from train.export import export_checkpoint

    again = export_checkpoint(latest_checkpoint(tmp_path / "run"), tmp_path / "again")
    assert again["step"] == 2 and again["weights"] == "student"
    for name in ("koala_sampler.json", "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                 "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "run" / "export" / name).read_bytes(), name


def test_nonfinite_step_is_skipped_and_counted(inject_nan, tmp_path, demo_shards, tiny_pipeline_dir):
    cfg = tiny_cfg(tmp_path / "run", demo_shards, tiny_pipeline_dir, "train.max_steps=4", "train.ema=false")
    seen = {}

    class Snap(StopAt):
        def on_step_end(self, run, losses):
            seen[run.state.step] = {k: v.clone() for k, v in run.unwrapped.state_dict().items()}

    run, summary = run_cfg(cfg, callbacks=[Snap(0)], patch=inject_nan({1}))
    assert run.state.nonfinite_total == 1 and run.state.nonfinite_run == 0
    # the update of the NaN step (step index 1 -> state.step 2) was skipped: weights unchanged
    assert all(torch.equal(seen[2][k], seen[1][k]) for k in seen[1])
    assert not all(torch.equal(seen[3][k], seen[2][k]) for k in seen[2])
    assert all(torch.isfinite(v).all() for v in seen[4].values())
    assert summary["samples"] is None and not (tmp_path / "run" / "samples").exists()  # train.sample_at_end=false


def test_too_many_nonfinite_in_a_row_stop_cleanly(inject_nan, tmp_path, demo_shards, tiny_pipeline_dir):
    from train.checkpoint import latest_checkpoint
    from train.loop import NonFiniteError

    cfg = tiny_cfg(tmp_path / "run", demo_shards, tiny_pipeline_dir, "train.max_steps=10",
                   "train.checkpoint_every=2", "train.max_nonfinite=3", "train.ema=false")
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        run_cfg(cfg, patch=inject_nan({3, 4, 5, 6, 7, 8, 9}))
    ckpt = latest_checkpoint(tmp_path / "run")
    # NaN from step index 3: step 4's checkpoint is put off (its loss was not finite: the weights may be the cause),
    # and the streak reaches 3 at step 6, which stops the run; step 2's, before the streak, is the latest and loads
    assert ckpt.name == "step_000000002"
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(ckpt / "student")
    assert all(torch.isfinite(p).all() for p in unet.parameters())


def test_a_checkpoint_due_in_a_nonfinite_streak_waits_for_a_finite_step(inject_nan, tmp_path, demo_shards,
                                                                          tiny_pipeline_dir, capsys):
    """Weights that make every loss NaN (a diverged update) were checkpointed while the streak lasted, and with
    keep_last they replaced the good checkpoints before max_nonfinite ended the run. A due checkpoint now waits for
    the next finite step."""
    from train.checkpoint import list_checkpoints

    cfg = tiny_cfg(tmp_path / "run", demo_shards, tiny_pipeline_dir, "train.max_steps=7", "train.checkpoint_every=2",
                   "train.ema=false", "train.keep_last=0")
    run_cfg(cfg, patch=inject_nan({3, 4}))  # the losses of the 4th and 5th steps are NaN
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == [
        "step_000000002", "step_000000006", "step_000000007"]  # 4 put off; 5 still in the streak; 6 finite
    out = capsys.readouterr().out
    assert "checkpoint of step 4 put off: its loss was not finite (1 step(s) in a row)" in out
    assert "warning: the last" not in out  # the run ended on finite steps
    # once written, the put-off checkpoint is not written again at each finite step after it
    run_cfg(tiny_cfg(tmp_path / "gap", demo_shards, tiny_pipeline_dir, "train.max_steps=8", "train.checkpoint_every=4",
                     "train.ema=false", "train.keep_last=0"), patch=inject_nan({3}))
    assert [c.name for c in list_checkpoints(tmp_path / "gap")] == ["step_000000005", "step_000000008"]
    # a run that ends inside a streak says so: its final checkpoint holds the weights from before it
    run_cfg(tiny_cfg(tmp_path / "run2", demo_shards, tiny_pipeline_dir, "train.max_steps=4", "train.checkpoint_every=2",
                     "train.ema=false", "train.keep_last=0"), patch=inject_nan({2, 3}))
    assert ("warning: the last 2 step(s) had non-finite losses and skipped their updates: the final checkpoint holds "
            "the weights of the last applied update") in capsys.readouterr().out
    assert [c.name for c in list_checkpoints(tmp_path / "run2")] == ["step_000000002", "step_000000004"]  # the last


def test_nonfinite_weights_are_never_checkpointed(tmp_path, demo_shards, tiny_pipeline_dir):
    """An update that overflows the weights while its loss and gradients were finite (train.lr=inf did: every
    later checkpoint was all NaN, and the error called the last one good): the checkpoint is not written, the run
    ends with NonFiniteError naming the last good one."""
    from train.checkpoint import latest_checkpoint
    from train.loop import NonFiniteError

    class Overflow(Callback):
        def on_step_end(self, run, losses):
            if run.state.step == 2:
                with torch.no_grad():
                    next(run.unwrapped.parameters()).view(-1)[0] = float("inf")

    cfg = tiny_cfg(tmp_path / "run", demo_shards, tiny_pipeline_dir, "train.max_steps=3", "train.checkpoint_every=1",
                   "train.ema=false")
    with pytest.raises(NonFiniteError) as info:
        run_cfg(cfg, callbacks=[Overflow()])
    good = latest_checkpoint(tmp_path / "run")
    assert good.name == "step_000000001"
    assert str(info.value).startswith("the student's weights hold non-finite values at step 2, so no checkpoint was "
                                      f"written; the last good one is {good}")


def test_missing_teacher_path_is_one_line(tiny_pipeline_dir):
    from omegaconf import OmegaConf

    from distill.config import TeacherConfig
    from distill.teachers import TeacherError, load_teacher

    with pytest.raises(TeacherError, match=r"^teacher.path=/nope does not exist") as info:
        load_teacher(OmegaConf.structured(TeacherConfig(name="sdxl_base", path="/nope")))
    assert "\n" not in str(info.value)


def test_stop_file_checkpoints_and_ends_the_run(tmp_path, demo_shards, tiny_pipeline_dir):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, demo_shards, tiny_pipeline_dir, "train.max_steps=50", "train.checkpoint_every=0",
                   "train.ema=false")

    class TouchStop(StopAt):
        def on_step_end(self, run, losses):
            if run.state.step == 3:
                (out / "STOP").touch()

    run, summary = run_cfg(cfg, callbacks=[TouchStop(0)])
    from train.checkpoint import latest_checkpoint

    assert summary["preempted"] and summary["steps"] == 3
    assert latest_checkpoint(out).name == "step_000000003" and not (out / "STOP").exists()


def test_the_hydra_config_overrides_the_launchers_accumulation_and_clipping(monkeypatch, capsys):
    """`accelerate launch` exports its config's accumulation/clipping and Accelerate would prefer them: a DeepSpeed
    `auto` crashed `int()`, and a number would silently change the global batch. The Hydra values win, loudly."""
    import os

    from train.loop import _pin_launcher_env

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "auto")
    _pin_launcher_env(4, 1.0)
    assert os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "4"
    assert os.environ["ACCELERATE_GRADIENT_CLIPPING"] == "1.0"
    assert capsys.readouterr().err == ""  # `auto` defers to us: nothing to warn about

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "8")
    _pin_launcher_env(2, 1.0)
    assert os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "2"
    err = capsys.readouterr().err
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=8" in err and "replaced by 2" in err


def test_resume_with_another_data_layout_is_refused_or_starts_the_next_epoch(tmp_path, demo_shards,
                                                                              tiny_pipeline_dir, capsys):
    """Micro-batch 2 -> 1 after a checkpoint: refused in one line before any model loads (exact resume needs the
    same layout), or with train.resume_data=next_epoch the stream continues with epoch 1, each sample once."""
    from train.config import ConfigError

    out = tmp_path / "run"
    common = ("train.checkpoint_every=3", "train.ema=false", "train.audit=true")
    run_cfg(tiny_cfg(out, demo_shards, tiny_pipeline_dir, "train.max_steps=3", *common))
    later = ("train.max_steps=9", "train.micro_batch_size=1", "train.resume=latest", *common)
    with pytest.raises(ConfigError, match=r"train.micro_batch_size 2 -> 1.*train.resume_data=next_epoch") as info:
        tiny_cfg(out, demo_shards, tiny_pipeline_dir, *later)
    assert "\n" not in str(info.value) and "from data epoch 1" in str(info.value)

    capsys.readouterr()
    _, summary = run_cfg(tiny_cfg(out, demo_shards, tiny_pipeline_dir, *later, "train.resume_data=next_epoch"))
    assert summary["steps"] == 9
    assert "the data stream restarts at epoch 1" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "audit" / "rank0.jsonl").read_text().splitlines()]
    before = [k for line in lines if line["step"] <= 3 for k in line["keys"]]
    after = [k for line in lines if line["step"] > 3 for k in line["keys"]]
    assert len(before) == 6 and len(after) == 12 == len(set(after))  # epoch 1 whole: the 12 demo samples once


def test_a_preview_without_memory_or_disk_is_skipped_and_changes_nothing(tmp_path, tiny_pipeline_dir, monkeypatch,
                                                                        capsys):
    """On the latent path (VAE and text encoders loaded for previews only, kept in host memory between them) the
    grid of step 1 fails with CUDA's out-of-memory error and the one of step 2 meets a full disk: one warning each,
    the run goes on, the live weights come back from the EMA swap, the later grids are drawn, and the student ends
    as in a run without previews. On a CUDA machine the same test checks that the preview-only modules are back in
    host memory."""
    import errno

    import distill.preview
    from train.bench import ensure_shards

    latents = ensure_shards(load_config(["teacher=tiny", "student=tiny"]), str(tmp_path / "latents"), 8)
    real = distill.preview.teacher_student_grid
    calls = []

    class DiskFull:
        def save(self, path):
            Path(path).write_bytes(b"\x89PNG")  # a start, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    def fails_first(*args, **kwargs):
        calls.append(1)
        if len(calls) in (1, 4):  # step 1's grid and the final one
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return DiskFull() if len(calls) == 2 else real(*args, **kwargs)

    monkeypatch.setattr(distill.preview, "teacher_student_grid", fails_first)
    common = ("data.kind=latents", "data.resampled=true", "train.max_steps=4", "train.checkpoint_every=0",
              "train.ema=true")
    out = tmp_path / "previews"
    run, summary = run_cfg(tiny_cfg(out, latents, tiny_pipeline_dir, *common, "train.sample_every=1",
                                    "train.sample_at_end=true"))
    assert summary["steps"] == 4 and len(calls) == 4  # steps 1, 2, 3 and the end
    err = capsys.readouterr().err
    assert err.count("warning: sample grid of step 1 skipped: out of GPU memory (1 skipped); train.sample_every=0 "
                     "train.sample_at_end=false turn the grids off") == 1  # fewer prompts would not: one per call
    assert err.count("warning: sample grid of step 2 not written to ") == 1
    assert "No space left on device (2 skipped); the run goes on" in err
    assert "warning: sample grid of step 4 skipped: out of GPU memory (3 skipped)" in err
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000000003.png"]
    assert summary["samples"] is None  # step 3's grid is not the run's final one
    # the final grid sampled with both hooked U-Nets: their taps hold none of its activations
    assert run.distiller.tap_t.features == {} and run.distiller.tap_s.features == {}
    assert run.distiller.tap_t.active and run.distiller.tap_s.active
    assert len(run._preview_only) == 3  # VAE and both text encoders: not part of latent-path training
    assert all(p.device.type == "cpu" for module in run._preview_only for p in module.parameters())
    with_previews = {k: v.clone() for k, v in run.unwrapped.state_dict().items()}
    run, _ = run_cfg(tiny_cfg(tmp_path / "plain", latents, tiny_pipeline_dir, *common))
    assert all(torch.equal(v, with_previews[k]) for k, v in run.unwrapped.state_dict().items())
    # the preview's sampler reads the teacher's output as the run does: x0 for the 1-step Lightning U-Net, although
    # the pipeline folder's scheduler (SDXL-Base's) says epsilon
    assert run.teacher_components()["scheduler"].config.prediction_type == "epsilon"
    run.cfg.teacher.prediction_type, run._components = "sample", None
    assert run.teacher_components()["scheduler"].config.prediction_type == "sample"


def _main_with_full_disk(out, shards, tiny_dir, monkeypatch, disk, *extra: str) -> int:
    """train/main.py in-process, with `disk` (a tests/disk_full.DiskFills, or None) added to the run's callbacks."""
    from disk_full import with_callback

    from train import loop
    from train import main as entry

    with monkeypatch.context() as patch:
        if disk is not None:
            patch.setattr(loop, "setup", with_callback(disk))
        try:
            return entry.main(["+experiment=demo", f"train.output_dir={out}", f"data.shards={shards}",
                               f"teacher.path={tiny_dir}", "data.num_workers=0", "tracking=none",
                               "train.micro_batch_size=2", "train.global_batch_size=2",
                               "train.sample_at_end=false", "train.ema=false", "train.checkpoint_every=2", *extra])
        finally:
            if disk is not None:
                disk.release()


@pytest.mark.parametrize("max_mb, error", [
    # the first file of the state, the student's weights, fails in safetensors, which names the I/O error
    (1, "SafetensorError: Error while serializing: I/O error: File too large"),
    # the weights (23 MB) fit, the optimizer state (46 MB) fails in torch.save's zip writer, which does not name
    # it: the line's free space is what tells a full disk
    (30, "RuntimeError: "),
])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_last_complete_one(
        tmp_path, demo_shards, tiny_pipeline_dir, monkeypatch, capsys, max_mb, error):
    """The disk fills after step 3, so the step-4 checkpoint meets real write errors (EFBIG, as ENOSPC on a full
    disk): exit code 5, one error line naming the step-2 checkpoint, the partial folder removed (its space freed),
    and step 2 still complete and resumable."""
    from disk_full import DiskFills

    from train import checkpoint

    out = tmp_path / "run"
    code = _main_with_full_disk(out, demo_shards, tiny_pipeline_dir, monkeypatch, DiskFills(3, max_mb * 2**20),
                                "train.export=false", "train.max_steps=6")
    assert code == 5
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln.lower()]
    # the line starts a line: the progress bar was closed before it
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    line = errors[0]
    assert "step 4" in line and error in line and "step_000000002" in line, line
    assert re.search(r"/checkpoints \(\d+\.\d GiB free there\): ", line), line
    assert not checkpoint.temp_dir(out, 4).exists()
    assert checkpoint.latest_checkpoint(out).name == "step_000000002"
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(out))["step"] == 2


def test_only_write_errors_count_as_write_failures(tmp_path):
    """torch.save's zip writer on a full disk raises a bare RuntimeError: a write failure (one line, exit 5, the
    last checkpoint kept). A CUDA or NCCL RuntimeError while the state is gathered is not: it keeps its traceback
    instead of being reported as a full disk."""
    from disk_full import DiskFills

    from train.checkpoint import write_error_reason

    disk = DiskFills(None, 2**16)
    disk.fill()
    try:
        with pytest.raises(RuntimeError) as full:
            torch.save({"w": torch.zeros(2**16)}, tmp_path / "state.pt")
    finally:
        disk.release()
    assert write_error_reason(full.value).startswith("RuntimeError: "), full.value
    assert write_error_reason(OSError(28, "No space left on device")) == "No space left on device"
    for exc in (RuntimeError("CUDA error: an illegal memory access was encountered"),
                torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1"),
                torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), ValueError("bad")):
        assert write_error_reason(exc) is None, exc


def test_an_export_that_cannot_be_written_is_one_line_and_the_resume_exports(
        tmp_path, demo_shards, tiny_pipeline_dir, monkeypatch, capsys):
    """The disk fills after the last step: the final checkpoint is complete, the export fails with exit code 5 and
    one line, leaves no temporary folder, and `train.resume=latest` then writes the export without training."""
    from diffusers import UNet2DConditionModel
    from disk_full import DiskFills

    from train import checkpoint
    from train.loop import reset_accelerate

    out = tmp_path / "run"
    code = _main_with_full_disk(out, demo_shards, tiny_pipeline_dir, monkeypatch, DiskFills(None, 2**20),
                                "train.export=true", "train.max_steps=2")
    assert code == 5
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: the export to "), errors
    line = errors[0]
    assert ": [Errno 27] File too large: " in line and "export.tmp/vae/" in line and "[(" not in line, line
    assert "train.resume=latest" in line and "step_000000002" in line, line
    assert not (out / "export").exists() and not (out / "export.tmp").exists()
    assert checkpoint.latest_checkpoint(out).name == "step_000000002"

    reset_accelerate()
    (out / "wandb").mkdir()  # an earlier run's W&B folder: not this run's (tracking is off)
    code = _main_with_full_disk(out, demo_shards, tiny_pipeline_dir, monkeypatch, None,
                                "train.export=true", "train.max_steps=2", "train.resume=latest")
    assert code == 0
    printed = capsys.readouterr().out
    assert "step 2 is already at train.max_steps=2: nothing to train" in printed
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["export_dir"] == str(out / "export")
    assert summary["wandb_dir"] is None
    saved = UNet2DConditionModel.from_pretrained(out / "export" / "unet").state_dict()
    trained = load_file(out / "checkpoints" / "step_000000002" / "student" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], v) for k, v in trained.items())


def test_fp16_loss_scaling_survives_an_overflowing_step(fresh_accelerate):
    """Under fp16 the GradScaler must see the overflowing step: it skips the update and halves its scale (counted
    as one non-finite step), and the next step updates as usual. Before, the skipped scaler.update() made the
    next step's unscale_ raise. Accelerate builds a GradScaler only on a GPU, so a CPU one stands in."""
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from train.loop import Run, TrainState, train_one_step

    torch.manual_seed(0)  # the model and the inputs
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    # a scale small enough that the steps after the overflow stay finite in fp16 (at 2**16 some inputs overflow
    # again, correctly, which made the test depend on the tests before it)
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**10), True
    model = acc.prepare(torch.nn.Linear(4, 1))
    opt = acc.prepare(torch.optim.AdamW(model.parameters(), lr=1e-2))
    scales = iter([1e36, 1.0, 1.0])  # the first step's gradient overflows, as fp16's first steps often do

    def distiller(batch, gen):
        loss = (model(batch["x"]) * next(scales)).pow(2).mean()
        return {"total": loss, "kd": loss}

    cfg = OmegaConf.create({"train": {"seed": 0, "max_grad_norm": 1.0, "global_batch_size": 2,
                                      "mixed_precision": "fp16", "log_every": 10, "max_steps": 3,
                                      "checkpoint_every": 0}})
    run = Run(cfg=cfg, accelerator=acc, teacher=None, student=model, distiller=distiller, optimizer=opt,
              lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda s: 1.0), loader=None,
              state=TrainState(), output_dir=None, accum=1, callbacks=[Callback()])
    run.loader_iter = iter([{"x": torch.randn(2, 4), "keys": []} for _ in range(3)])
    before = model.weight.detach().clone()
    train_one_step(run)
    assert torch.equal(model.weight, before)  # the update was skipped ...
    assert (run.state.nonfinite_total, run.state.nonfinite_run, acc.scaler.get_scale()) == (1, 1, 2.0**9)
    for _ in range(2):
        train_one_step(run)  # ... and the next steps update
    assert not torch.equal(model.weight, before)
    assert (run.state.step, run.state.nonfinite_total, run.state.nonfinite_run) == (3, 1, 0)


def test_a_restored_ema_lives_on_the_students_device():
    """Accelerate restores registered objects from CPU tensors; the average must go back beside the student (on a
    GPU the next EMA step would mix devices). The meta device stands in for the GPU here."""
    from train.callbacks import EMA

    def linear() -> torch.nn.Module:
        module = torch.nn.Linear(3, 2)
        module.config = {}  # EMAModel keeps the model's config for save_pretrained
        return module

    saved = EMA(linear(), decay=0.5)
    with torch.device("meta"):
        ema = EMA(linear(), decay=0.5)
    ema.load_state_dict(saved.state_dict())  # CPU tensors, as Accelerate's load_state hands them over
    assert {p.device.type for p in ema.model.shadow_params} == {"meta"}
    assert ema.model.decay == 0.5 and len(ema.model.shadow_params) == 2


def test_a_second_run_into_a_live_runs_folder_is_one_line(tmp_path, demo_shards, tiny_pipeline_dir, monkeypatch,
                                                          capsys):
    """Two runs in one folder (a requeued job while its predecessor still ran) replaced each other's checkpoints
    and deleted each other's half-written ones; now the second stops before loading anything. The lock goes with
    the run's process: once the holder is gone, the folder is free."""
    import subprocess
    import sys

    from train.checkpoint import LOCK

    out = tmp_path / "run"
    holder = subprocess.Popen(  # another process holds the lock, as a live run's rank 0 does
        [sys.executable, "-c", "import sys, time; from train.checkpoint import run_lock\n"
         f"with run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parent.parent))
    try:
        assert holder.stdout.readline().strip() == "held"
        who = (out / LOCK).read_text().strip()
        assert who.startswith(f"pid {holder.pid} on ")
        code = _main_with_full_disk(out, demo_shards, tiny_pipeline_dir, monkeypatch, None, "train.max_steps=1")
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"config error: train.output_dir={out} is in use by a live run ({who}): wait for it to end, "
                       f"or stop it (touch {out / 'STOP'}) and then resume")
    finally:
        holder.kill()
        holder.wait()
    assert _main_with_full_disk(out, demo_shards, tiny_pipeline_dir, monkeypatch, None, "train.max_steps=1",
                                "train.export=false") == 0


def _fake_run(logged: list) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(
        state=SimpleNamespace(step=0, samples_seen=0, nonfinite_total=0), paused_s=0.0, stopping=False,
        cfg=SimpleNamespace(train=SimpleNamespace(max_steps=100)), last_lr=1e-3, last_grad_norm=None,
        accelerator=SimpleNamespace(is_main_process=True, reduce=lambda t, reduction: t,
                                    log=lambda logs, step: logged.append((step, logs))),
        skip_counts_all_ranks=lambda: {})


def test_a_rollback_logs_to_a_new_wandb_run(tmp_path, demo_shards, tiny_pipeline_dir, monkeypatch, capsys):
    """W&B ignores steps below a run's last logged one, so a rollback (the documented way out of a loss spike)
    logged its redone steps into the void. Its continuation is now a new W&B run; a plain resume keeps the run."""
    import accelerate

    inits = []
    monkeypatch.setattr(accelerate.Accelerator, "init_trackers",
                        lambda self, project, config=None, init_kwargs=None: inits.append(init_kwargs["wandb"]))
    common = ("tracking.wandb=true", "tracking.mode=offline", "train.checkpoint_every=1", "train.ema=false",
              "train.keep_last=0")
    run_cfg(tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, *common, "train.max_steps=3"))
    run_cfg(tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, *common, "train.max_steps=4", "train.resume=latest"))
    step2 = tmp_path / "checkpoints" / "step_000000002"
    run_cfg(tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, *common, "train.max_steps=4", f"train.resume={step2}"))
    first, resumed, rolled_back = inits
    assert resumed["id"] == first["id"] and resumed["name"] == first["name"] == tmp_path.name
    assert rolled_back["id"] != first["id"] and rolled_back["name"] == f"{tmp_path.name}-from-step2"
    assert f"note: W&B logs this continuation as a new run (it would drop the redone steps of run {first['id']}" in \
        capsys.readouterr().out


def test_logged_img_per_s_leaves_out_checkpoints_and_grids(monkeypatch):
    """The window after a checkpoint write or a preview grid logged a much lower img/s (an SDXL checkpoint takes
    minutes): that time is not training. Steps of 0.5 s, 4 images each, a 10 s checkpoint after step 2."""
    from train import callbacks

    clock, logged = [0.0], []
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    run, logger = _fake_run(logged), ScalarLogger(log_every=2, show_progress=False)
    logger.on_start(run)
    for step in range(1, 5):
        clock[0] += 0.5
        run.state.step, run.state.samples_seen = step, 4 * step
        logger.on_step_end(run, {"total": torch.tensor(1.0), "kd": torch.tensor(0.5)})
        if step == 2:  # as train() times save_checkpoint (and SampleGrid its draw)
            clock[0] += 10.0
            run.paused_s += 10.0
    assert [(step, logs["img_per_s"]) for step, logs in logged] == [(2, 8.0), (4, 8.0)]


def test_a_stop_on_request_logs_the_steps_since_the_last_log_step():
    """A STOP file or SIGTERM between log steps: those steps' losses never reached the tracker."""
    logged = []
    run, logger = _fake_run(logged), ScalarLogger(log_every=10, show_progress=False)
    logger.on_start(run)
    for step in range(1, 18):
        run.state.step, run.state.samples_seen = step, 4 * step
        logger.on_step_end(run, {"total": torch.tensor(float(step)), "kd": torch.tensor(0.5)})
    logger.on_stop(run)  # an error on its way out: the ranks may not meet, nothing is logged
    assert [step for step, _ in logged] == [10]
    run.stopping = True  # the ranks agreed to stop
    logger.on_stop(run)
    assert [step for step, _ in logged] == [10, 17] and logged[-1][1]["loss/total"] == pytest.approx(14.0)


def test_the_logged_and_audited_lr_is_the_one_each_update_used(tmp_path, demo_shards, tiny_pipeline_dir):
    """The scheduler steps at the end of each optimizer step, so its last LR then is the next update's: the logs
    and the audit showed every LR one step early (a cosine run's last step logged 0)."""
    from train.loop import lr_lambda

    cfg = tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, "train.max_steps=4", "train.warmup_steps=2",
                   "train.lr_schedule=cosine", "train.lr=1e-3", "train.log_every=1", "train.audit=true",
                   "train.checkpoint_every=0", "train.ema=false")
    used = []

    class Used(Callback):
        def on_update(self, run):  # after the optimizer step, before the scheduler's
            used.append(run.lr_scheduler.optimizer.param_groups[0]["lr"])

    run, _ = run_cfg(cfg, callbacks=[Used()])
    assert used == pytest.approx([1e-3 * lr_lambda(2, 4, "cosine")(n) for n in range(4)])
    assert used[-1] > 0
    audit = [json.loads(x) for x in (tmp_path / "audit" / "rank0.jsonl").read_text().splitlines()]
    assert [a["step"] for a in audit] == [1, 2, 3, 4] and [a["lr"] for a in audit] == used
    logger = next(cb for cb in run.callbacks if isinstance(cb, ScalarLogger))
    assert logger.last["lr"] == used[-1]


def test_ddp_keeps_no_second_copy_of_the_gradients(tmp_path, demo_shards, tiny_pipeline_dir):
    """Under DDP (several processes) the gradients are views into the all-reduce buckets: DDP's default keeps a
    second copy of every gradient, which the memory planner does not count (2.9 GiB for KOALA-700M)."""
    from train.loop import setup

    run = setup(tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir), show_progress=False)
    assert run.accelerator.ddp_handler.to_kwargs() == {"gradient_as_bucket_view": True}


def test_a_resume_takes_the_configs_ema_decay(tmp_path, demo_shards, tiny_pipeline_dir, capsys):
    """EMAModel.load_state_dict restores the saved decay: a resume with another train.ema_decay averaged on at the
    old one while meta.json recorded the new one. The config's decay now holds, and the run says so."""
    common = ("train.checkpoint_every=1", "train.ema=true", "train.max_steps=3")
    with pytest.raises(KeyboardInterrupt):
        run_cfg(tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, *common, "train.ema_decay=0.99"),
                callbacks=[StopAt(2)])
    capsys.readouterr()
    run, summary = run_cfg(tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, *common, "train.ema_decay=0.5",
                                    "train.resume=latest"))
    assert summary["steps"] == 3 and run.ema.model.decay == 0.5
    assert "note: from step 1 on, train.ema_decay 0.99 -> 0.5" in capsys.readouterr().out


def test_a_resume_takes_the_configs_optimizer_settings(tmp_path, demo_shards, tiny_pipeline_dir, capsys):
    """Loading the optimizer's and the LR scheduler's state brought back the saved LR, weight decay, betas, eps and
    fused flag: a rollback with a lower train.lr trained on at the old one, and train.fused_adam turned on at a
    resume crashed the on-device skip (a non-fused AdamW given found_inf). The config's values now hold from the
    resumed step on, the moments are the saved ones, and the run says what changed."""
    common = ("train.checkpoint_every=1", "train.ema=false", "train.lr_schedule=cosine", "train.warmup_steps=0",
              "train.max_steps=4")
    with pytest.raises(KeyboardInterrupt):
        run_cfg(tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, *common, "train.lr=1e-3", "train.fused_adam=false"),
                callbacks=[StopAt(3)])  # raised before step 3 is checkpointed
    saved = torch.load(tmp_path / "checkpoints" / "step_000000002" / "optimizer.bin", weights_only=False)
    capsys.readouterr()
    seen = {}

    class Look(Callback):
        def on_step_end(self, run, losses):
            if run.state.step == 3:
                inner = run.lr_scheduler.optimizer
                seen["groups"] = [dict(g, params=None) for g in inner.param_groups]
                seen["skip"] = run.device_skip
                seen["last_lr"] = run.lr_scheduler.get_last_lr()

    _, summary = run_cfg(tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, *common, "train.lr=4e-4",
                                  "train.fused_adam=true", "train.weight_decay=0.05", "train.adam_beta2=0.99",
                                  "train.resume=latest"), callbacks=[Look()])
    assert summary["steps"] == 4
    out = capsys.readouterr().out
    assert ("note: from step 2 on, train.lr 0.001 -> 0.0004; train.weight_decay 0.01 -> 0.05; train.adam_beta1/2 "
            "(0.9, 0.999) -> (0.9, 0.99); train.fused_adam False -> True") in out, out
    cosine = 0.5 * (1 + math.cos(math.pi * 3 / 4))  # the LR of step 4 (scheduler step 3 of 4)
    (group,) = seen["groups"]
    assert group["lr"] == pytest.approx(4e-4 * cosine) and seen["last_lr"] == [group["lr"]]
    assert group["initial_lr"] == 4e-4 and group["weight_decay"] == 0.05 and group["betas"] == (0.9, 0.99)
    assert group["fused"] is True and seen["skip"]  # the on-device skip drives the fused kernel
    assert saved["param_groups"][0]["fused"] is False and saved["state"][0]["exp_avg"].abs().sum() > 0


def test_a_run_file_that_cannot_be_written_is_one_line(tmp_path, demo_shards, tiny_pipeline_dir, monkeypatch,
                                                       capsys):
    """config.yaml (written first) and feature_pairs.txt went through a plain write_text: a full disk at the start
    of a run ended it with a traceback."""
    out = tmp_path / "run"
    (out / "config.yaml").mkdir(parents=True)  # cannot be written as a file, as on a full disk
    assert _main_with_full_disk(out, demo_shards, tiny_pipeline_dir, monkeypatch, None, "train.max_steps=1") == 5
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and f"{out / 'config.yaml'} could not be written: Is a directory" in err[0], err


def test_a_checkpoint_reaches_the_disk_before_its_name_does(tmp_path, demo_shards, tiny_pipeline_dir, monkeypatch):
    """A crash or power cut after the rename must not leave a checkpoint of empty files under a complete name (the
    older ones may have been pruned): every file and folder of it is flushed before the rename, and the folder's
    entries after it."""
    cfg = tiny_cfg(tmp_path, demo_shards, tiny_pipeline_dir, "train.max_steps=1", "train.checkpoint_every=0")
    events = record_file_ops(monkeypatch)
    run_cfg(cfg)
    final = tmp_path / "checkpoints" / "step_000000001"
    tmp = str(tmp_path / "checkpoints" / ".tmp-step_000000001")
    (at,) = [i for i, e in enumerate(events) if e == ("rename", tmp, str(final))]
    flushed = {e[1] for e in events[:at] if e[0] == "fsync"}
    files = [p for p in final.rglob("*")]
    assert len(files) > 5 and {str(tmp / p.relative_to(final)) for p in files} | {tmp} <= flushed
    assert ("fsync", str(final.parent)) in events[at:]


def test_a_replaced_folder_is_deleted_only_after_the_new_one_is_on_disk(tmp_path, monkeypatch):
    """swap_into_place (checkpoints of the same step, exports): the new folder's files are flushed before any
    rename, and the renames before the older whole folder is deleted."""
    import shutil

    import distill.files
    from distill.files import swap_into_place

    new, final, aside = tmp_path / "new", tmp_path / "final", tmp_path / "aside"
    for folder, text in ((new, "new"), (final, "old")):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "weights.bin").write_text(text)
    events = record_file_ops(monkeypatch)
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(distill.files.shutil, "rmtree",
                        lambda path, **kw: events.append(("rmtree", str(path))) or real_rmtree(path, **kw))
    swap_into_place(new, final, aside)
    assert (final / "sub" / "weights.bin").read_text() == "new" and not aside.exists() and not new.exists()
    order = [e for e in events if e[0] != "rmtree" or e[1] == str(aside)]
    first_rename = next(i for i, e in enumerate(order) if e[0] == "rename")
    assert {("fsync", str(new / "sub" / "weights.bin")), ("fsync", str(new / "sub")),
            ("fsync", str(new))} <= set(order[:first_rename])
    assert order[first_rename:] == [("rename", str(final), str(aside)), ("rename", str(new), str(final)),
                                    ("fsync", str(tmp_path)), ("rmtree", str(aside))]


def _fake_checkpoint(run: Path, step: int) -> Path:
    """A checkpoint folder as checkpoint_problem reads it: meta.json listing a file and its size."""
    from train.checkpoint import checkpoint_name

    ckpt = run / "checkpoints" / checkpoint_name(step)
    ckpt.mkdir(parents=True)
    (ckpt / "random_states_0.pkl").write_bytes(bytes(16))
    (ckpt / "meta.json").write_text(json.dumps({"step": step, "files": {"random_states_0.pkl": 16}}))
    return ckpt


def test_a_rollback_keeps_its_checkpoint_and_each_rollback_gets_its_own_folder(tmp_path):
    """Resumed at step 4: the later checkpoints go aside, step 4 and earlier stay (a kill before the next checkpoint
    resumes at 4 again); a second rollback to step 4 sets its later checkpoints aside in a folder of their own."""
    from train.checkpoint import list_checkpoints, set_aside_later

    for step in (2, 4, 6, 8):
        _fake_checkpoint(tmp_path, step)
    first = set_aside_later(tmp_path, 4)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000002", "step_000000004"]
    assert first.name == "abandoned_after_step_000000004"
    assert sorted(p.name for p in first.iterdir()) == ["step_000000006", "step_000000008"]
    _fake_checkpoint(tmp_path, 6)
    second = set_aside_later(tmp_path, 4)
    assert second.name == "abandoned_after_step_000000004_2" and [p.name for p in second.iterdir()] == [
        "step_000000006"]
    assert sorted(p.name for p in first.iterdir()) == ["step_000000006", "step_000000008"]  # untouched
    assert set_aside_later(tmp_path, 4) is None


def test_a_grown_file_is_damage_and_the_refusal_names_the_newest_whole_one_before(tmp_path):
    from train.checkpoint import checkpoint_problem, damaged_refusal

    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    damaged = tmp_path / "checkpoints" / "step_000000006"
    assert checkpoint_problem(damaged) is None
    with open(damaged / "random_states_0.pkl", "ab") as f:  # a longer file copied over it
        f.write(bytes(8))
    assert checkpoint_problem(damaged) == "random_states_0.pkl has 24 bytes, 16 were written"
    line = damaged_refusal(damaged, checkpoint_problem(damaged))
    assert f"train.resume={tmp_path / 'checkpoints' / 'step_000000004'} " in line
