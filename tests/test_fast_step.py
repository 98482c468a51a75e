"""The fast training step computes what the plain one computes: same losses and gradients on the tiny models (fp32,
CPU) with regional compilation, channels_last, a forced SDPA backend and selective gradient checkpointing; fused
AdamW skips non-finite updates on the device and counts them like the host check; FP8 teacher arithmetic."""

from __future__ import annotations

import copy

import pytest
import torch

from train.bench import BenchConfig, compose, ensure_shards

FAST_SWITCHES = ["train.compile=true", "train.compile_backend=aot_eager", "train.channels_last=true",
                 "train.sdpa_backend=flash", "train.checkpointing_blocks=[DW-2,Mid,UP-1]", "train.fused_adam=true"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from train.config import load_config

    return ensure_shards(load_config(["teacher=tiny", "student=tiny"]), str(tmp_path_factory.mktemp("lat")), 8)


def _cfg(tmp_path, shards, name, *switches):
    bc = BenchConfig(tiny=True, batch=2, micro_batch=2, profile="plain")
    return compose(bc, "plain", shards, str(tmp_path / name), workers=0, extra=list(switches))


def _loss_and_grads(cfg, batch):
    """Losses and student gradients of one forward/backward of the trainer's distiller on `batch`."""
    from train.loop import setup, step_generator

    run = setup(cfg, show_progress=False)
    gen = step_generator(cfg.train.seed, 0, 0, 0, run.accelerator.device)
    with run.accelerator.autocast():
        losses = run.distiller(batch, gen)
    losses["total"].backward()
    grads = {n: p.grad.detach().clone() for n, p in run.unwrapped.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, p in run.unwrapped.named_parameters() if p.requires_grad}  # every one
    features_after_backward = dict(run.distiller.tap_s.features)
    switched = {"compiled": sum(getattr(m, "_koala_compiled", False) for m in run.unwrapped.modules()),
                "teacher_compiled": sum(getattr(m, "_koala_compiled", False) for m in run.teacher.unet.modules()),
                "checkpointed": sum(getattr(m, "gradient_checkpointing", False) for m in run.unwrapped.modules()),
                "channels_last": run.unwrapped.conv_in.weight.is_contiguous(memory_format=torch.channels_last)}
    run.distiller.close()
    return {k: v.detach() for k, v in losses.items()}, grads, features_after_backward, switched


def _first_batch(cfg):
    from data.stream import build_loader

    return next(iter(build_loader(cfg.data, batch_size=cfg.train.micro_batch_size, rank=0, world_size=1, seed=0)))


def _assert_same_step(plain, fast, rtol, atol):
    (l_p, g_p, _, _), (l_f, g_f, _, _) = plain, fast
    assert set(l_f) == set(l_p) and any(k.startswith("feat/") for k in l_p)
    for k in l_p:
        torch.testing.assert_close(l_f[k], l_p[k], rtol=rtol, atol=atol, msg=f"loss {k}")
    assert set(g_f) == set(g_p)
    scale = max(float(g.abs().max()) for g in g_p.values())
    for name, g in g_p.items():
        torch.testing.assert_close(g_f[name], g, rtol=rtol, atol=atol * scale, msg=f"grad {name}")


def test_fast_switches_give_the_same_losses_and_gradients(tmp_path, tiny_shards):
    plain_cfg = _cfg(tmp_path, tiny_shards, "plain")
    batch = _first_batch(plain_cfg)
    plain = _loss_and_grads(plain_cfg, copy.deepcopy(batch))
    fast = _loss_and_grads(_cfg(tmp_path, tiny_shards, "fast", *FAST_SWITCHES), copy.deepcopy(batch))
    _assert_same_step(plain, fast, rtol=1e-5, atol=1e-6)
    assert plain[3] == {"compiled": 0, "teacher_compiled": 0, "checkpointed": 0, "channels_last": False}
    assert fast[3]["compiled"] > 0 and fast[3]["teacher_compiled"] > 0  # student and teacher, each
    assert fast[3]["checkpointed"] > 0 and fast[3]["channels_last"]
    # recomputation under checkpointing did not fire the taps again (nothing kept alive after the step;
    # diffusers' own checkpointing function refills them during the backward pass)
    assert fast[2] == {}


@pytest.mark.slow
def test_inductor_compiled_step_gives_the_same_losses_and_gradients(tmp_path, tiny_shards):
    plain_cfg = _cfg(tmp_path, tiny_shards, "plain")
    batch = _first_batch(plain_cfg)
    plain = _loss_and_grads(plain_cfg, copy.deepcopy(batch))
    switches = [s for s in FAST_SWITCHES if "compile_backend" not in s]
    fast = _loss_and_grads(_cfg(tmp_path, tiny_shards, "inductor", *switches), copy.deepcopy(batch))
    _assert_same_step(plain, fast, rtol=1e-4, atol=1e-5)  # inductor reorders float sums


def test_one_optimizer_step_matches(tmp_path, tiny_shards):
    """train_one_step with accumulation (2 x 1): fused AdamW + on-device skip vs foreach AdamW + host check.

    With lr=1, eps=1 and no weight decay Adam's first update is -g / (|g| + 1) of the clipped, accumulated
    gradient g: nearly linear in g, so comparing updates compares gradients (a tiny eps would turn them into
    signs, which flip for gradients at rounding level)."""
    from train.loop import setup, train_one_step

    updates, sums = [], []
    for name, switches in (("plain", ()), ("fast", FAST_SWITCHES)):
        cfg = _cfg(tmp_path, tiny_shards, name, "train.micro_batch_size=1", "train.lr=1.0", "train.adam_eps=1.0",
                   "train.weight_decay=0.0", *switches)
        run = setup(cfg, show_progress=False)
        before = {n: p.detach().clone() for n, p in run.unwrapped.named_parameters()}
        run.loader_iter = iter(run.loader)
        sums.append(train_one_step(run))
        updates.append({n: p.detach() - before[n] for n, p in run.unwrapped.named_parameters()})
        assert (run.device_skip is not False) == (name == "fast")
        run.distiller.close()
    for k in sums[0]:
        torch.testing.assert_close(sums[1][k], sums[0][k], rtol=1e-5, atol=1e-6, msg=k)
    scale = max(float(u.abs().max()) for u in updates[0].values())
    assert scale > 0
    for n, u in updates[0].items():
        torch.testing.assert_close(updates[1][n], u, rtol=1e-4, atol=1e-6 * scale, msg=n)


# ------------------------------------------------------------------- non-finite updates skipped on the device


def _demo_cfg(out, shards, tiny_dir, *extra):
    from train.config import load_config, validate

    cfg = load_config([
        "+experiment=demo", f"train.output_dir={out}", f"data.shards={shards}", f"teacher.path={tiny_dir}",
        "data.num_workers=0", "tracking=none", "train.micro_batch_size=2", "train.global_batch_size=2",
        "train.export=false", "train.log_every=5", "train.ema=false", "train.fused_adam=true", *extra,
    ])
    validate(cfg)
    return cfg


def test_nonfinite_update_is_skipped_on_the_device(inject_nan, tmp_path, demo_shards, tiny_pipeline_dir):
    from distill.perf import DeviceSkip
    from train.callbacks import Callback
    from train.loop import _device_skip, setup, train

    seen = {}

    class Snap(Callback):
        def on_step_end(self, run, losses):
            seen[run.state.step] = {k: v.clone() for k, v in run.unwrapped.state_dict().items()}

    cfg = _demo_cfg(tmp_path / "run", demo_shards, tiny_pipeline_dir, "train.max_steps=4")
    run = setup(cfg, callbacks=[Snap()], show_progress=False)
    inject_nan({1})(run)
    skip = _device_skip(run)
    assert isinstance(skip, DeviceSkip)
    reads, read = [], skip.read
    skip.read = lambda: (reads.append(run.state.step), read())[1]
    train(run)
    assert run.state.nonfinite_total == 1 and run.state.nonfinite_run == 0
    assert reads == [4]  # the host reads the counters only at the last step (log_every=5, no checkpoints)
    assert all(torch.equal(seen[2][k], seen[1][k]) for k in seen[1])  # the NaN step's update was skipped
    assert not all(torch.equal(seen[3][k], seen[2][k]) for k in seen[2])
    assert all(torch.isfinite(v).all() for v in seen[4].values())
    opt = run.optimizer.optimizer
    assert all(float(s["step"]) == 3.0 for s in opt.state.values())  # 4 updates tried, the NaN one undone


def test_too_many_nonfinite_in_a_row_stop_with_the_device_skip(inject_nan, tmp_path, demo_shards, tiny_pipeline_dir):
    from train.checkpoint import latest_checkpoint
    from train.loop import NonFiniteError, setup, train

    cfg = _demo_cfg(tmp_path / "run", demo_shards, tiny_pipeline_dir, "train.max_steps=10",
                    "train.checkpoint_every=2", "train.max_nonfinite=3")
    run = setup(cfg, show_progress=False)
    inject_nan({3, 4, 5, 6, 7, 8, 9})(run)
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        train(run)
    assert run.device_skip  # the on-device path was the one tested
    # counters are read at the checkpoint steps, and at each step while step 4's (in the streak) is put off: the
    # streak reaches 3 at step 6, which stops the run
    assert latest_checkpoint(tmp_path / "run").name == "step_000000002"


def test_a_put_off_checkpoint_is_written_at_the_next_finite_step_with_the_device_skip(inject_nan, tmp_path,
                                                                                    demo_shards, tiny_pipeline_dir):
    """The skip counters live on the device and are read only when due: a put-off checkpoint makes them due at every
    step, so it is written at the first finite one (step 5), not at the next multiple of checkpoint_every."""
    from train.checkpoint import list_checkpoints
    from train.loop import setup, train

    cfg = _demo_cfg(tmp_path / "run", demo_shards, tiny_pipeline_dir, "train.max_steps=6",
                    "train.checkpoint_every=2", "train.keep_last=0", "train.log_every=50")  # no log step reads them
    run = setup(cfg, show_progress=False)
    inject_nan({3})(run)  # the 4th step's loss
    train(run)
    assert run.device_skip
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step_000000002", "step_000000005",
                                                                     "step_000000006"]


def test_host_check_stays_with_ema(tmp_path, demo_shards, tiny_pipeline_dir):
    """EMA needs to know whether each update was applied: the host check is kept."""
    from train.loop import setup, train_one_step

    cfg = _demo_cfg(tmp_path / "run", demo_shards, tiny_pipeline_dir, "train.max_steps=1", "train.ema=true")
    run = setup(cfg, show_progress=False)
    run.loader_iter = iter(run.loader)
    train_one_step(run)
    assert run.device_skip is False


# -------------------------------------------------------------------------------------------- the switches


def test_selective_checkpointing_switches_only_the_named_stages(tiny_unets):
    from distill.perf import checkpoint_without_hooks, enable_checkpointing

    _, student = tiny_unets
    student = copy.deepcopy(student)
    assert enable_checkpointing(student, ["UP-1"]) > 0
    on = {n for n, m in student.named_modules() if getattr(m, "gradient_checkpointing", False)}
    assert on and all(n.startswith("up_blocks.0") for n in on)
    assert all(m._gradient_checkpointing_func is checkpoint_without_hooks
               for n, m in student.named_modules() if n in on)
    with pytest.raises(ValueError, match="no stage 'UP-9'"):
        enable_checkpointing(student, ["UP-9"])
    two = copy.deepcopy(tiny_unets[1])
    enable_checkpointing(two, ["DW-1", "UP-1"])  # every named stage, and only those
    on = {n.split(".")[0] + "." + n.split(".")[1] for n, m in two.named_modules()
          if getattr(m, "gradient_checkpointing", False)}
    assert on == {"down_blocks.0", "up_blocks.0"}
    no_mid = copy.deepcopy(student)
    no_mid.mid_block = None
    with pytest.raises(ValueError, match="no mid block"):
        enable_checkpointing(no_mid, ["Mid"])


def test_bad_switch_values_are_one_line_config_errors(tmp_path, tiny_shards):
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="train.sdpa_backend='fast' is not one of"):
        _cfg(tmp_path, tiny_shards, "x", "train.sdpa_backend=fast")
    with pytest.raises(ConfigError, match="train.checkpointing_blocks: 'UP1'"):
        _cfg(tmp_path, tiny_shards, "x", "train.checkpointing_blocks=[UP1]")


def test_sdpa_backend_is_forced_around_every_attention(tiny_unets, monkeypatch):
    from diffusers.models.attention_processor import Attention

    from distill import perf

    teacher, _ = tiny_unets
    model = copy.deepcopy(teacher)
    entered = []
    real = perf.sdpa_context

    def spy(name):
        entered.append(name)
        return real(name)

    monkeypatch.setattr(perf, "sdpa_context", spy)
    n = perf.force_sdpa_backend(model, "math")
    assert n == sum(isinstance(m, Attention) for m in model.modules()) > 0
    entered.clear()
    cfg = dict(model.config)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    with torch.no_grad():
        model(torch.randn(1, 4, 32, 32), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, 64),
              added_cond_kwargs={"text_embeds": torch.randn(1, pooled), "time_ids": torch.zeros(1, 6)})
    assert entered == ["math"] * n
    assert perf.force_sdpa_backend(model, "auto") == 0
    with pytest.raises(ValueError, match="not one of"):
        perf.force_sdpa_backend(model, "fastest")


def test_fp8_teacher_is_refused_without_a_capable_gpu_and_close_on_the_cpu_arithmetic(tiny_unets):
    from distill.perf import FP8Linear, fp8_refusal, quantize_teacher_fp8

    teacher, _ = tiny_unets
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in fp8_refusal("cpu")
        with pytest.raises(ValueError, match="teacher_fp8"):
            quantize_teacher_fp8(copy.deepcopy(teacher))
    ref_model = copy.deepcopy(teacher).to(torch.bfloat16)
    q_model = copy.deepcopy(ref_model)
    n = quantize_teacher_fp8(q_model, check_device=False)  # the arithmetic, on the CPU's _scaled_mm
    assert n > 0 and sum(isinstance(m, FP8Linear) for m in q_model.modules()) == n
    cfg = dict(teacher.config)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    g = torch.Generator().manual_seed(0)
    kwargs = dict(encoder_hidden_states=torch.randn(2, 77, 64, generator=g).bfloat16(),
                  added_cond_kwargs={"text_embeds": torch.randn(2, pooled, generator=g).bfloat16(),
                                     "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2).bfloat16()})
    x, t = torch.randn(2, 4, 32, 32, generator=g).bfloat16(), torch.tensor([10, 700])
    with torch.no_grad():
        ref = ref_model(x, t, **kwargs).sample.float()
        out = q_model(x, t, **kwargs).sample.float()
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel
    # an fp16 teacher keeps fp16 through its FP8 layers (bf16 outputs promoted its residual stream to fp32, and its
    # next fp16 layer refused that)
    half = copy.deepcopy(teacher).to(torch.float16)
    quantize_teacher_fp8(half, check_device=False)
    layer = next(m for m in half.modules() if isinstance(m, FP8Linear))
    with torch.no_grad():
        assert layer(torch.randn(3, layer.weight_fp8.shape[1], generator=g).half()).dtype == torch.float16


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make the host wait for the device (.item(), bool(tensor), torch.equal)."""

    OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
           torch.ops.aten.equal.default)

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [True, False])
def test_fused_step_never_waits_for_the_device_between_log_steps(tmp_path, tiny_shards, fused):
    """With fused AdamW (non-finite skip on the device) a step that neither logs nor checkpoints reads no tensor
    value on the host. The plain step does (its finiteness check of the gradient norm; on the CPU also AdamW's step
    counters, which live on the host on a GPU), which shows that the counter sees them."""
    from train.loop import setup, train_one_step

    cfg = _cfg(tmp_path, tiny_shards, "sync", "train.global_batch_size=4", f"train.fused_adam={str(fused).lower()}")
    run = setup(cfg, show_progress=False)
    run.loader_iter = iter(run.loader)
    train_one_step(run)  # the first step creates the optimizer state
    syncs = _HostSyncs()
    with syncs:
        train_one_step(run)
    assert run.accum == 2
    assert (syncs.count == 0) if fused else (syncs.count > 0)
    run.distiller.close()
