"""The distillation step and the KOALA loss on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from distill.config import DistillConfig, TeacherConfig
from distill.features import match_features
from distill.losses import koala_loss
from distill.step import Distiller, UNetInputs
from distill.teachers import load_teacher, trailing_timesteps


@pytest.fixture(scope="module")
def teacher(tiny_pipeline_dir):
    tcfg = OmegaConf.structured(TeacherConfig(path=str(tiny_pipeline_dir), dtype="fp32"))
    return tcfg, load_teacher(tcfg)


def _inputs(bundle, batch=2, seed=0) -> UNetInputs:
    g = torch.Generator().manual_seed(seed)
    cfg = bundle.unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return UNetInputs(latents=torch.randn(batch, 4, 32, 32, generator=g),
                      prompt_embeds=torch.randn(batch, 77, cfg.cross_attention_dim, generator=g),
                      pooled=torch.randn(batch, pooled, generator=g),
                      time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch))


def test_kd_loss_exactly_zero_for_a_same_architecture_copy(teacher):
    tcfg, bundle = teacher
    student = copy.deepcopy(bundle.unet).requires_grad_(True)
    pairs = match_features(bundle.unet, student)
    step = Distiller(bundle, student, pairs, tcfg, OmegaConf.structured(DistillConfig()))
    losses = step.forward(_inputs(bundle), torch.Generator().manual_seed(1))
    step.close()
    assert losses["out_kd"].item() == 0.0 and losses["feat_kd"].item() == 0.0 and losses["kd"].item() == 0.0
    assert len([k for k in losses if k.startswith("feat/")]) == len(pairs) > 0
    assert losses["task"].item() > 0  # the denoising loss against the true noise is not zero
    assert losses["total"].item() == pytest.approx(losses["task"].item())


def test_kd_loss_positive_for_the_koala_student_and_terms_add_up(teacher, tiny_unets):
    tcfg, bundle = teacher
    _, student = tiny_unets
    student = copy.deepcopy(student)
    dcfg = OmegaConf.structured(DistillConfig(w_task=0.5, w_out=2.0, w_feat=3.0))
    step = Distiller(bundle, student, match_features(bundle.unet, student), tcfg, dcfg)
    losses = step.forward(_inputs(bundle), torch.Generator().manual_seed(1))
    step.close()
    feats = sum(v for k, v in losses.items() if k.startswith("feat/"))
    assert losses["out_kd"] > 0 and losses["feat_kd"] > 0
    torch.testing.assert_close(losses["feat_kd"], feats)
    torch.testing.assert_close(losses["total"], 0.5 * losses["task"] + 2 * losses["out_kd"] + 3 * feats)
    losses["total"].backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


@pytest.mark.parametrize("timesteps, prediction", [("uniform", "epsilon"), ("trailing", "v_prediction"),
                                                    ("trailing", "sample")])
def test_every_loss_term_is_recomputed_from_the_models_own_outputs(teacher, tiny_unets, timesteps, prediction):
    """Each term again from hooks of the test's own on the same modules, against a replay of the step's generator
    (timesteps first, then the noise): the task target of the prediction type, out_kd = MSE(student, teacher),
    feat/<label> = MSE of the paired modules' outputs, kd = out_kd + feat_kd; the timesteps come from the
    configured grid. The feature term alone sends gradients into every hooked student module."""
    import dataclasses

    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    tcfg, bundle = teacher
    tcfg = OmegaConf.merge(tcfg, {"timesteps": timesteps, "trailing_steps": 4, "prediction_type": prediction})
    bundle = dataclasses.replace(bundle, noise_scheduler=DDPMScheduler.from_config(
        bundle.noise_scheduler.config, prediction_type=prediction))
    student = copy.deepcopy(tiny_unets[1])
    pairs = match_features(bundle.unet, student)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for tag, model in (("t", bundle.unet), ("s", student)):
        handles.append(model.register_forward_hook(
            lambda m, a, kw, out, tag=tag: seen.update({tag: out.sample, f"{tag}_t": a[1], f"{tag}_x": a[0]}),
            with_kwargs=True))
        modules = dict(model.named_modules())
        for pair in pairs:
            path = pair.teacher if tag == "t" else pair.student
            handles.append(modules[path].register_forward_hook(
                lambda m, a, out, key=f"{tag}/{pair.label}": seen.update(  # a down block's (hidden, skips)
                    {key: out if isinstance(out, torch.Tensor) else out[0]})))
    step = Distiller(bundle, student, pairs, tcfg, OmegaConf.structured(DistillConfig()))
    x = _inputs(bundle, batch=4)
    losses = step.forward(x, torch.Generator().manual_seed(3))
    step.close()
    for h in handles:
        h.remove()

    g = torch.Generator().manual_seed(3)
    if timesteps == "uniform":
        t = torch.randint(0, 1000, (4,), generator=g)
    else:
        grid = torch.tensor(trailing_timesteps(1000, 4))
        t = grid[torch.randint(0, 4, (4,), generator=g)]
        assert set(seen["s_t"].tolist()) <= set(grid.tolist())
    torch.testing.assert_close(seen["s_t"], t, rtol=0, atol=0)
    torch.testing.assert_close(seen["t_t"], t, rtol=0, atol=0)
    noise = torch.randn(x.latents.shape, generator=g)
    alpha = bundle.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * x.latents + (1 - alpha).sqrt() * noise  # both models' input
    torch.testing.assert_close(seen["s_x"], noisy)
    torch.testing.assert_close(seen["t_x"], noisy)
    target = {"epsilon": noise, "sample": x.latents,
              "v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * x.latents}[prediction]
    torch.testing.assert_close(losses["task"], F.mse_loss(seen["s"], target))
    torch.testing.assert_close(losses["out_kd"], F.mse_loss(seen["s"], seen["t"]))
    for pair in pairs:
        want = F.mse_loss(seen[f"s/{pair.label}"], seen[f"t/{pair.label}"])
        assert want > 0
        torch.testing.assert_close(losses[f"feat/{pair.label}"], want)
    torch.testing.assert_close(losses["kd"], losses["out_kd"] + losses["feat_kd"])
    losses["feat_kd"].backward()
    modules = dict(student.named_modules())
    for pair in pairs:  # each hooked module's own weights get a gradient from the feature term alone
        grads = [p.grad for p in modules[pair.student].parameters()]
        assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads), pair.label


def test_conditioning_matches_sdxls_own(teacher):
    """The step's conditioning is what StableDiffusionXLPipeline computes: encode_prompts gives its prompt embeddings
    (both encoders' penultimate layers) and pooled embedding, and the size conditioning is (original h, w, crop top,
    left, target h, w) in that order; a teacher loaded for x0 or v targets says so in its noise scheduler."""
    from diffusers import StableDiffusionXLPipeline

    from distill.conditioning import encode_prompts
    from distill.step import prepare_inputs

    tcfg, bundle = teacher
    pipe = StableDiffusionXLPipeline.from_pretrained(tcfg.path)
    prompts = ["a red car on a bridge", "a cat"]
    want, _, want_pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False)
    got, got_pooled = encode_prompts(bundle.tokenizers, bundle.text_encoders, prompts)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_pooled, want_pooled)

    batch = {"latents": torch.zeros(1, 4, 8, 8), "prompt_embeds": got[:1], "pooled_prompt_embeds": got_pooled[:1],
             "captions": prompts[:1], "original_size": torch.tensor([[1457, 1274]]),
             "crop_top_left": torch.tensor([[37, 213]]), "target_size": torch.tensor([[1024, 960]])}
    x = prepare_inputs(batch, bundle, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert x.time_ids.tolist() == [[1457, 1274, 37, 213, 1024, 960]]

    for kind in ("sample", "v_prediction"):
        other = load_teacher(OmegaConf.merge(tcfg, {"prediction_type": kind}))
        assert other.noise_scheduler.config.prediction_type == kind


def test_same_generator_same_losses(teacher, tiny_unets):
    tcfg, bundle = teacher
    student = copy.deepcopy(tiny_unets[1])
    step = Distiller(bundle, student, match_features(bundle.unet, student), tcfg,
                     OmegaConf.structured(DistillConfig()))
    a = step.forward(_inputs(bundle), torch.Generator().manual_seed(7))
    b = step.forward(_inputs(bundle), torch.Generator().manual_seed(7))
    c = step.forward(_inputs(bundle), torch.Generator().manual_seed(8))
    step.close()
    assert a["total"].item() == b["total"].item() != c["total"].item()


def test_loss_shape_mismatch_is_an_error():
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="feature a"):
        koala_loss(x, x, x, {"a": torch.zeros(1, 3)}, {"a": torch.zeros(1, 4)})


def test_raw_batches_train_on_a_seeded_posterior_sample(teacher):
    """The pixel path draws z = mean + std x eps from the VAE posterior with the step's generator (as SDXL
    training does), so a step is reproducible from its generator and no two steps see the same latents."""
    from distill.conditioning import encode_images
    from distill.step import prepare_inputs

    _, bundle = teacher
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"pixel_values": pixels, "captions": ["a red car", "a cat"], "original_size": torch.tensor([[64, 64]] * 2),
             "crop_top_left": torch.zeros(2, 2, dtype=torch.long), "target_size": torch.tensor([[64, 64]] * 2)}

    def latents(seed: int) -> torch.Tensor:
        return prepare_inputs(batch, bundle, device=torch.device("cpu"),
                              generator=torch.Generator().manual_seed(seed)).latents

    a, b = latents(1), latents(2)
    torch.testing.assert_close(latents(1), a)
    assert not torch.allclose(a, b)
    posterior = bundle.vae.encode(pixels).latent_dist
    g = torch.Generator().manual_seed(1)
    torch.rand(2, generator=g)  # the caption-dropout draw comes first
    expected = (posterior.mean + posterior.std * torch.randn(a.shape, generator=g)) * bundle.vae.config.scaling_factor
    torch.testing.assert_close(a, expected)
    assert not torch.allclose(a, encode_images(bundle.vae, pixels))  # not the posterior mean


def test_vae_text_encoders_and_teacher_ignore_the_students_autocast(teacher):
    """The trainer runs the step inside the student's autocast (bf16 here). The fp32 VAE, text encoders and teacher
    must still run in fp32: before, the VAE encoded in the autocast dtype (fp16: SDXL's VAE gives NaN) and an fp32
    teacher computed in bf16. The teacher's output equals that of a step without autocast, bit for bit."""
    tcfg, bundle = teacher
    student = copy.deepcopy(bundle.unet).requires_grad_(True)
    step = Distiller(bundle, student, match_features(bundle.unet, student), tcfg,
                     OmegaConf.structured(DistillConfig()))
    seen = []
    hook = bundle.unet.register_forward_hook(lambda m, a, out: seen.append(out.sample))
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"pixel_values": pixels, "captions": ["a red car", "a cat"], "original_size": torch.tensor([[64, 64]] * 2),
             "crop_top_left": torch.zeros(2, 2, dtype=torch.long), "target_size": torch.tensor([[64, 64]] * 2)}
    try:
        step(batch, torch.Generator().manual_seed(3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = step(batch, torch.Generator().manual_seed(3))
    finally:
        hook.remove()
        step.close()
    plain, autocast = seen
    assert autocast.dtype == torch.float32
    assert torch.equal(autocast, plain)
    assert losses["out_kd"] > 0  # the student (same weights) did run in bf16


def test_trailing_grid_is_the_samplers():
    """The training grid of a few-step teacher is the grid its Euler sampler visits, for any step count."""
    from diffusers import EulerDiscreteScheduler

    assert trailing_timesteps(1000, 4) == [999, 749, 499, 249]
    euler = EulerDiscreteScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    for steps in range(1, 13):
        euler.set_timesteps(steps)
        assert trailing_timesteps(1000, steps) == [int(t) for t in euler.timesteps], steps


def test_hooks_that_do_not_fire_are_an_error(teacher, tiny_unets):
    tcfg, bundle = teacher
    student = copy.deepcopy(tiny_unets[1])
    step = Distiller(bundle, student, match_features(bundle.unet, student), tcfg,
                     OmegaConf.structured(DistillConfig()))
    step.tap_s.remove()  # as if a wrapper bypassed the student's hooked modules
    with pytest.raises(RuntimeError, match="hooks did not fire"):
        step.forward(_inputs(bundle), torch.Generator().manual_seed(1))
    step.close()


def test_half_precision_models_get_exact_size_and_crop_conditioning(teacher, tiny_unets):
    """SDXL's time ids are pixel sizes and crop offsets. A bf16 teacher (the default) and a bf16 student (DeepSpeed's
    bf16 mode) must both embed the exact values: before, they were cast to bf16 on the way in, and 1457 px reached
    the U-Net as 1456 (bf16 holds whole numbers exactly only up to 256)."""
    tcfg, bundle = teacher
    half = copy.copy(bundle)
    half.unet = copy.deepcopy(bundle.unet).to(torch.bfloat16)
    student = copy.deepcopy(tiny_unets[1]).to(torch.bfloat16)
    step = Distiller(half, student, match_features(half.unet, student), tcfg, OmegaConf.structured(DistillConfig()))
    ids = torch.tensor([[1457.0, 1274, 37, 213, 1024, 1024], [777.0, 1025, 0, 0, 1024, 1024]])
    assert not torch.equal(ids.bfloat16().float(), ids)  # the values bf16 would round
    seen = {}
    hooks = [m.add_time_proj.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0]))
             for name, m in (("teacher", half.unet), ("student", student))]
    x = _inputs(bundle)
    try:
        losses = step.forward(UNetInputs(x.latents, x.prompt_embeds, x.pooled, ids), torch.Generator().manual_seed(1))
    finally:
        for h in hooks:
            h.remove()
        step.close()
    for name in ("teacher", "student"):
        assert seen[name].dtype == torch.float32, name
        torch.testing.assert_close(seen[name], ids.flatten(), rtol=0, atol=0)
    assert torch.isfinite(losses["total"]) and losses["out_kd"] > 0


def test_dropped_captions_get_the_unconditional_input_guidance_will_use(teacher, tiny_unets):
    """SDXL's pipelines (force_zeros_for_empty_prompt, copied into the export) guide with all-zero prompt and pooled
    embeddings when no negative prompt is given: dropped captions train on those. A teacher that guides with the
    encoding of "" gets that instead (raw batches encode it; latent batches take make latents' empty_prompt)."""
    from distill.conditioning import encode_prompts
    from distill.step import prepare_inputs

    _, bundle = teacher
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sizes = {"original_size": torch.tensor([[64, 64]] * 2), "crop_top_left": torch.zeros(2, 2, dtype=torch.long),
             "target_size": torch.tensor([[64, 64]] * 2)}
    raw = {"pixel_values": pixels, "captions": ["a red car", "a cat"], **sizes}
    empty, empty_pooled = encode_prompts(bundle.tokenizers, bundle.text_encoders, ["", ""])
    kept, kept_pooled = encode_prompts(bundle.tokenizers, bundle.text_encoders, raw["captions"])
    latents = {"latents": torch.randn(2, 4, 32, 32), "prompt_embeds": kept.float(),
               "pooled_prompt_embeds": kept_pooled.float(), "captions": raw["captions"], **sizes}

    def inputs(batch, dropout, zero_uncond, empty_prompt=None):
        return prepare_inputs(batch, bundle, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                              caption_dropout=dropout, empty_prompt=empty_prompt, zero_uncond=zero_uncond)

    for batch in (raw, latents):
        zeroed = inputs(batch, 1.0, True)
        assert not zeroed.prompt_embeds.any() and not zeroed.pooled.any()
        kept_in = inputs(batch, 0.0, True)
        torch.testing.assert_close(kept_in.prompt_embeds, kept.float())
        torch.testing.assert_close(kept_in.pooled, kept_pooled.float())
    encoded = inputs(raw, 1.0, False)
    torch.testing.assert_close(encoded.prompt_embeds, empty.float())
    torch.testing.assert_close(encoded.pooled, empty_pooled.float())
    saved = inputs(latents, 1.0, False, empty_prompt=(empty[0].float(), empty_pooled[0].float()))
    torch.testing.assert_close(saved.prompt_embeds, empty.float())
    torch.testing.assert_close(saved.pooled, empty_pooled.float())
    # each caption is dropped on its own draw: at p = 0.5 over 16 latent samples, exactly the rows the step's
    # generator picks (its first draw) get the unconditional input, the others keep theirs
    many = {**{k: v.repeat(8, *[1] * (v.dim() - 1)) for k, v in latents.items() if k != "captions"},
            "captions": raw["captions"] * 8}
    rows = torch.rand(16, generator=torch.Generator().manual_seed(0)) < 0.5
    assert 0 < rows.sum() < 16
    for zero_uncond, empty_prompt, want, want_pooled in [
            (True, None, torch.zeros_like(kept[0]), torch.zeros_like(kept_pooled[0])),
            (False, (empty[0].float(), empty_pooled[0].float()), empty[0].float(), empty_pooled[0].float())]:
        half = inputs(many, 0.5, zero_uncond, empty_prompt)
        for i in range(16):
            prompt, pooled = (want, want_pooled) if rows[i] else (kept[i % 2].float(), kept_pooled[i % 2].float())
            torch.testing.assert_close(half.prompt_embeds[i], prompt.float())
            torch.testing.assert_close(half.pooled[i], pooled.float())
    step = Distiller(bundle, copy.deepcopy(tiny_unets[1]), [], teacher[0], OmegaConf.structured(DistillConfig()))
    assert step.zero_uncond  # the tiny pipeline, like SDXL's, has force_zeros_for_empty_prompt true
