"""`make bench-train`: the tiny benchmark runs the trainer's own set-up and step end to end and prints one JSON line
with the documented keys; synthetic latent shards are read by the real loader; the real-shape run on a GPU."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from scripts import bench_train

RECORD_KEYS = {"profile", "teacher", "student", "batch", "micro_batch", "accum", "options", "first_step_s", "step_s",
               "img_per_s", "teacher_fwd_tflop", "student_fwd_tflop", "tflop_per_img", "peak_tflops", "mfu",
               "peak_gib", "peak_gib_warmup", "reserved_gib", "loss_total", "nonfinite_skipped", "phases_s",
               "phase_tflops"}
ENV_KEYS = {"bench", "device", "torch", "cuda", "diffusers", "accelerate", "date"}
FINITE = ("step_s", "img_per_s", "mfu", "tflop_per_img", "loss_total")


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _run(argv: list[str]) -> dict:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        bench_train.main(argv)
    lines = buffer.getvalue().strip().splitlines()
    assert len(lines) == 1, "stdout carries exactly one JSON line"
    return json.loads(lines[0])


def test_tiny_bench_compares_plain_and_fast_through_the_trainer(tmp_path, monkeypatch):
    out = tmp_path / "out"
    written_early = []  # the result file as it stood once the plain measurement was done: kept if time runs out
    real_run_bench = bench_train.run_bench

    def spy(bc, on_result=None):
        def hook(partial):
            on_result(partial)
            written_early.append(json.loads((out / "bench_train_t.partial.json").read_text()))
        return real_run_bench(bc, on_result=hook)

    monkeypatch.setattr(bench_train, "run_bench", spy)
    result = _run(["--tiny", "--compare-plain", "--steps", "2", "--warmup", "1", "--data", str(tmp_path / "lat"),
                   "--set", "train.compile_backend=eager",  # dynamo only: the aot_eager run is in test_fast_step
                   "--out", str(out), "--name", "t"])
    assert ENV_KEYS | RECORD_KEYS <= set(result)
    assert result["profile"] == "fast" and result["plain"]["profile"] == "plain"
    for rec in (result, result["plain"]):
        assert RECORD_KEYS <= set(rec)
        assert all(math.isfinite(rec[k]) and rec[k] > 0 for k in FINITE), rec
        assert rec["batch"] == 4 and rec["micro_batch"] == 2 and rec["accum"] == 2 and rec["nonfinite_skipped"] == 0
    assert result["options"]["compile"] and result["options"]["fused_adam"] and result["options"]["channels_last"]
    assert not result["plain"]["options"]["compile"] and not result["plain"]["options"]["fused_adam"]
    assert result["speedup_vs_plain"] > 0
    # FLOPs of the tiny teacher/student at batch 1 (same counter as the anchor), MFU from them
    assert result["tflop_per_img"] == pytest.approx(result["teacher_fwd_tflop"] + 3 * result["student_fwd_tflop"],
                                                    abs=1e-3)
    for rec in (result, result["plain"]):  # MFU: the FLOPs of the images per second, over the stated peak
        assert rec["mfu"] == pytest.approx(rec["tflop_per_img"] * rec["img_per_s"] / rec["peak_tflops"], rel=0.01)
        assert rec["img_per_s"] == pytest.approx(rec["batch"] / rec["step_s"], rel=1e-3)
    # the same batch and generator through both configurations: the same losses
    assert result["loss_total"] == pytest.approx(result["plain"]["loss_total"], rel=1e-5)
    assert sorted(p.name for p in out.iterdir()) == ["bench_train_t.json", "bench_train_t.md"]  # partials gone
    final = json.loads((out / "bench_train_t.json").read_text())
    assert final["img_per_s"] == result["img_per_s"] and "partial" not in final
    assert len(written_early) == 1 and written_early[0]["partial"] and written_early[0]["profile"] == "plain"
    assert written_early[0]["img_per_s"] == result["plain"]["img_per_s"]
    table = (out / "bench_train_t.md").read_text()
    assert "Partial" not in table
    assert "| fast | tiny | 4 (2 x 2) |" in table
    # the breakdown: every phase of the step, from marks in the timed steps themselves, adding up to the step
    for rec in (result, result["plain"]):
        phases = rec["phases_s"]
        assert set(phases) == {"data", "inputs", "noise", "teacher_fwd", "student_fwd", "loss", "backward",
                               "optimizer"}, phases
        assert all(v >= 0 for v in phases.values()) and phases["teacher_fwd"] > 0 and phases["backward"] > 0
        assert sum(phases.values()) == pytest.approx(rec["step_s"], rel=0.3)  # median vs mean of 2 steps
        assert set(rec["phase_tflops"]) == {"teacher_fwd", "student_fwd", "backward"}
        expected = rec["teacher_fwd_tflop"] * rec["batch"] / phases["teacher_fwd"]
        assert rec["phase_tflops"]["teacher_fwd"] == pytest.approx(expected, rel=0.01)
        assert f"{rec['profile']}, seconds per step: data " in table


def test_synthetic_latent_shards_are_read_by_the_real_loader(tmp_path):
    from data.config import DataConfig
    from data.latents import EMPTY_PROMPT_FILE
    from data.stream import build_loader
    from data.synthetic import write_synthetic_latent_shards

    paths = write_synthetic_latent_shards(str(tmp_path), num_shards=2, samples_per_shard=3, latent_shape=(4, 16, 8),
                                          text_dim=24, pooled_dim=12, image_size=(128, 64))
    assert len(paths) == 2 and (tmp_path / EMPTY_PROMPT_FILE).is_file()
    cfg = DataConfig(shards=str(tmp_path), kind="latents", num_workers=0, shuffle_buffer=2)
    batch = next(iter(build_loader(cfg, batch_size=3, rank=0, world_size=1, seed=0)))
    assert batch["latents"].shape == (3, 4, 16, 8) and batch["latents"].dtype == torch.float32
    assert batch["prompt_embeds"].shape == (3, 77, 24) and batch["pooled_prompt_embeds"].shape == (3, 12)
    assert batch["target_size"].tolist() == [[128, 64]] * 3 and batch["original_size"].tolist() == [[128, 64]] * 3
    assert torch.isfinite(batch["latents"]).all() and batch["latents"].std() > 0.5


def test_the_bench_never_overwrites_shards_it_did_not_write(tmp_path):
    """`--data DIR` pointed at real `make latents` output used to overwrite its first shards with random ones."""
    from train.bench import ensure_shards
    from train.config import ConfigError, load_config

    real = tmp_path / "latents"
    real.mkdir()
    (real / "000000.tar").write_bytes(b"real latents")
    with pytest.raises(ConfigError, match="holds shards that the benchmark did not write"):
        ensure_shards(load_config([]), str(real), 8)
    assert (real / "000000.tar").read_bytes() == b"real latents" and sorted(p.name for p in real.iterdir()) == [
        "000000.tar"]
    made = ensure_shards(load_config([]), str(tmp_path / "bench"), 8)  # its own folder: written, then reused
    stamp = {p.name: p.stat().st_mtime_ns for p in Path(made).iterdir()}
    assert ensure_shards(load_config([]), made, 8) == made
    assert {p.name: p.stat().st_mtime_ns for p in Path(made).iterdir()} == stamp


def test_a_bench_stopped_while_writing_its_shards_rewrites_them_next_time(tmp_path, monkeypatch):
    """Its marker came last: a Ctrl-C (or a device time limit) while the shards were written left tars without it,
    and every later run refused the benchmark's own folder as someone else's."""
    import data.synthetic
    from train.bench import ensure_shards
    from train.config import load_config

    real_write = data.synthetic.write_synthetic_latent_shards

    def stopped(folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "000000.tar").write_bytes(b"half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(data.synthetic, "write_synthetic_latent_shards", stopped)
    with pytest.raises(KeyboardInterrupt):
        ensure_shards(load_config([]), str(tmp_path / "bench"), 8)
    monkeypatch.setattr(data.synthetic, "write_synthetic_latent_shards", real_write)
    made = Path(ensure_shards(load_config([]), str(tmp_path / "bench"), 8))
    assert json.loads((made / "bench_shape.json").read_text())["num_shards"] == 4
    assert (made / "000000.tar").read_bytes() != b"half a shard"


def test_lowmem_experiment_is_the_24gb_profile():
    from train.bench import BenchConfig, experiment
    from train.config import load_config

    cfg = load_config(["+experiment=koala_700m_lowmem"])
    assert cfg.student.name == "koala_700m" and cfg.teacher.dtype == "bf16"
    assert cfg.train.optimizer == "adamw8bit" and list(cfg.train.checkpointing_blocks) == ["UP-1", "UP-2"]
    assert cfg.train.global_batch_size == 128 and cfg.train.lr == 1e-5
    assert experiment(BenchConfig(student="koala_700m", profile="lowmem")) == "koala_700m_lowmem"
    with pytest.raises(ValueError, match="lowmem"):
        experiment(BenchConfig(student="koala_1b", profile="lowmem"))


@pytest.mark.slow
def test_tiny_lowmem_profile_runs_with_8bit_adamw(tmp_path):
    pytest.importorskip("bitsandbytes")
    result = _run(["--tiny", "--profile", "lowmem", "--steps", "1", "--warmup", "1", "--data",
                   str(tmp_path / "lat"), "--out", str(tmp_path / "out")])
    assert result["options"]["optimizer"] == "adamw8bit" and math.isfinite(result["loss_total"])


@pytest.mark.gpu
def test_real_shape_bench_on_the_gpu(tmp_path):
    """KOALA-700M from the SDXL-shaped teacher at 1024 px, plain profile, batch 4: the real shapes run briefly."""
    result = _run(["--student", "koala_700m", "--profile", "plain", "--batch", "4", "--steps", "2", "--warmup", "1",
                   "--data", str(tmp_path / "lat"), "--out", str(tmp_path / "out")])
    assert result["latent"] == [4, 128, 128] and result["resolution"] == 1024
    assert result["teacher_fwd_tflop"] == pytest.approx(6.76, abs=0.01)
    assert result["student_fwd_tflop"] == pytest.approx(2.70, abs=0.01)
    assert result["peak_gib"] > 5 and 0 < result["mfu"] < 1 and math.isfinite(result["loss_total"])


def test_out_of_memory_halves_the_micro_batch_and_says_so(monkeypatch, tmp_path):
    """A configuration that does not fit is measured again at half the micro-batch (same optimizer batch);
    one that never fits is reported, not raised."""
    import weakref

    from train import bench

    tried: list[int] = []
    fits = 1  # the largest micro-batch that "fits"
    models: list[weakref.ref] = []

    def fake_measure(cfg, bc, profile, flops, log):
        # the models of the attempt that ran out of memory are gone before the next attempt sets up its own
        assert all(ref() is None for ref in models)
        tried.append(cfg.train.micro_batch_size)
        model = torch.nn.Linear(4, 4)  # held by this frame, as the real set-up's models are
        model.self_ref = model  # a reference cycle: only the collector frees it
        models.append(weakref.ref(model))
        if cfg.train.micro_batch_size > fits:
            raise torch.OutOfMemoryError("simulated")
        return {"profile": profile, "micro_batch": cfg.train.micro_batch_size, "img_per_s": 1.0}

    monkeypatch.setattr(bench, "measure", fake_measure)
    bc = bench.BenchConfig(tiny=True, batch=4, micro_batch=4, min_micro_batch=1)
    shards = bench.ensure_shards(_shape_cfg(bc), str(tmp_path), 8)
    rec, cfg = bench.measure_or_shrink(bc, "fast", shards, str(tmp_path / "run"), 0, (1, 1), lambda _: None)
    assert tried == [4, 2, 1] and rec["oom_micro_batches"] == [4, 2] and cfg.train.micro_batch_size == 1
    assert cfg.train.global_batch_size == 4  # accumulation keeps the optimizer batch

    tried.clear()
    models.clear()
    rec, _ = bench.measure_or_shrink(bench.BenchConfig(tiny=True, batch=4, micro_batch=4, min_micro_batch=2),
                                     "fast", shards, str(tmp_path / "run2"), 0, (1, 1), lambda _: None)
    assert tried == [4, 2] and rec["img_per_s"] is None and rec["oom_micro_batches"] == [4, 2]
    assert "out of memory at micro-batch [4, 2]" in bench.markdown({**rec, "device": "cpu", "torch": "t",
                                                                     "cuda": None, "diffusers": "d",
                                                                     "accelerate": "a", "date": "today"})


def _shape_cfg(bc):
    from train.bench import _base
    from train.config import load_config

    return load_config(_base(bc))


@pytest.mark.parametrize("args", [["--steps", "-1"], ["--steps", "0"], ["--batch", "0"], ["--micro-batch", "-2"],
                                  ["--warmup", "-1"], ["--peak-tflops", "0"]])
def test_bad_counts_are_one_usage_line(args, capsys):
    """0 fell back to the default silently, and --steps -1 failed after the models had loaded."""
    from scripts.bench_train import parse

    with pytest.raises(SystemExit) as info:
        parse(args)
    assert info.value.code == 2 and f"error: {args[0]} must be" in capsys.readouterr().err


def test_step_time_is_the_median_step_and_img_per_s_follows_it():
    from train.bench import step_stats

    stats = step_stats([2.0, 0.5, 9.0, 1.0, 1.5], batch=32)  # one slow step (a recompile) must not move it
    assert stats == {"step_s": 1.5, "step_s_min": 0.5, "step_s_max": 9.0, "img_per_s": pytest.approx(32 / 1.5)}


def test_phase_rates_count_the_backward_as_twice_the_student_forward():
    from train.bench import phase_tflops

    rates = phase_tflops({"teacher_fwd": 0.5, "student_fwd": 0.25, "backward": 1.0, "data": 0.1}, 2 * 10**12,
                         10**12, batch=4)
    assert rates == {"teacher_fwd": pytest.approx(16.0), "student_fwd": pytest.approx(16.0),
                     "backward": pytest.approx(8.0)}
