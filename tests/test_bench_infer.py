"""The inference benchmark's code path on tiny shapes (CPU), its real model shapes, and a GPU smoke run."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from distill.inference_bench import (
    SDXL_SCHEDULER,
    BenchConfig,
    SpeedOptions,
    conditioning,
    denoise,
    load_unet,
    run_bench,
    sdpa_backend,
    speed_up_unet,
    time_it,
    unet_configs,
)
from distill.students import build_unet, count_params

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_real_shapes_match_the_model_card():
    """The benchmark builds SDXL, KOALA-1B and KOALA-700M with the model card's parameter counts (meta device)."""
    counts = {name: count_params(build_unet(cfg, "meta")) for name, cfg in unet_configs().items()}
    assert counts == {"sdxl": 2_567_463_684, "koala_1b": 1_161_184_324, "koala_700m": 782_822_724}


def test_script_runs_every_row_on_tiny_shapes(tmp_path, monkeypatch):
    from scripts import bench_infer
    from scripts.bench_infer import main

    saved = []  # (rows, partial) at each write: the files hold every row measured so far, in case of a time limit

    def save(result, out):
        real_save(result, out)
        partial = result.get("partial", False)
        written = json.loads((out / ("bench_infer.partial.json" if partial else "bench_infer.json")).read_text())
        saved.append((len(written["rows"]), partial))

    real_save = bench_infer.save
    monkeypatch.setattr(bench_infer, "save", save)
    out = tmp_path / "bench"
    result = main(["--tiny", "--device", "cpu", "--resolution", "32", "--steps", "1", "--warmup", "0",
                   "--repeats", "1", "--image-steps", "1", "--out", str(out)])
    rows = {(r["model"], r["part"]) for r in result["rows"]}
    assert rows == {("vae", "vae_decode"), ("sdxl", "unet_cfg"), ("koala_1b", "unet_cfg"),
                    ("koala_700m", "unet_cfg"), ("koala_700m", "image")}
    assert all(math.isfinite(r["latency_s"]) and r["latency_s"] > 0 for r in result["rows"])
    params = {r["model"]: r["params"] for r in result["rows"]}
    assert params["sdxl"] > params["koala_1b"] > params["koala_700m"]
    assert json.loads((out / "bench_infer.json").read_text())["rows"] == result["rows"]
    md = (out / "bench_infer.md").read_text()
    assert "| koala_700m |" in md and "image" in md and result["config"]["speed"]["dtype"] == "fp32"
    assert saved == [(1, True), (2, True), (3, True), (4, True), (5, True), (5, False)]
    assert "Partial" not in md and sorted(p.name for p in out.iterdir()) == ["bench_infer.json", "bench_infer.md"]


@pytest.mark.parametrize("args, needle", [(["--steps", "0"], "--steps must be at least 1"),
                                          (["--repeats", "0"], "--repeats must be at least 1"),
                                          (["--resolution", "100"], "--resolution 100: a multiple of 32 px")])
def test_script_refuses_settings_it_cannot_measure(args, needle, capsys):
    """--steps 0 used to end in a ZeroDivisionError after the models had loaded."""
    from scripts.bench_infer import parse

    with pytest.raises(SystemExit) as info:
        parse(args)
    assert info.value.code == 2 and needle in capsys.readouterr().err


def test_speed_switches_keep_the_result():
    """Fused QKV, channels_last, regional compile (eager backend: tracing only) and a fixed SDPA backend."""
    config = unet_configs(tiny=True)["koala_700m"]
    cond = conditioning(config, 32, torch.device("cpu"), torch.float32)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    fast = SpeedOptions(dtype="fp32", fuse_qkv=True, channels_last=True, compile="regional",
                        compile_backend="eager", sdpa="math")
    results = []
    for opts in (SpeedOptions(dtype="fp32"), fast):
        unet = speed_up_unet(load_unet(config, None, torch.device("cpu"), torch.float32, seed=0), opts)
        scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
        x = latents.to(memory_format=torch.channels_last) if opts.channels_last else latents
        with sdpa_backend(opts.sdpa):
            results.append(denoise(unet, scheduler, x, cond, steps=1, guidance_scale=5.0))
    assert torch.allclose(results[0], results[1], atol=1e-3)
    assert any(type(m.processor).__name__.startswith("Fused") for m in unet.modules() if hasattr(m, "processor"))


def test_latency_is_the_median_of_the_timed_runs_after_warm_up(monkeypatch):
    from distill import inference_bench

    clock = [0.0]
    durations = iter([50.0, 1.0, 7.0, 2.0])  # one warm-up run, then three timed ones (s)
    monkeypatch.setattr(inference_bench.time, "perf_counter", lambda: clock[0])

    def run() -> None:
        clock[0] += next(durations)

    t = time_it(run, torch.device("cpu"), warmup=1, repeats=3)
    assert (t.median_s, t.min_s, t.max_s, t.runs, t.peak_gib) == (2.0, 1.0, 7.0, 3, None)


def test_cuda_graphs_need_compile():
    with pytest.raises(ValueError, match="cuda_graphs"):
        speed_up_unet(torch.nn.Linear(1, 1), SpeedOptions(cuda_graphs=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_koala_700m_image_smoke():
    """One real-shape KOALA-700M row and the 1024 px image row in fp16 (eager), with CUDA events and memory."""
    cfg = BenchConfig(models=["koala_700m"], steps=[2], warmup=1, repeats=2, image_steps=2,
                      speed=SpeedOptions(dtype="fp16"))
    rows = run_bench(cfg, log=lambda _: None)["rows"]
    assert {r["part"] for r in rows} == {"vae_decode", "unet_cfg", "image"}
    assert all(r["peak_gib"] and r["peak_gib"] > 0 for r in rows)
