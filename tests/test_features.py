"""Feature taps: the configured modules are hooked, with the expected shapes; hooks are removable and survive
regional compilation; layer maps follow the paper."""

from __future__ import annotations

import copy

import pytest
import torch

from distill.features import FeatureTap, format_pairs, layer_indices, match_features, tap_pair
from distill.students import STUDENTS, build_unet, derive_student_config, init_student_from_teacher
from distill.tiny import tiny_unet_config

# SDXL's structure (depths [1, 2, 10], 3 resnets per decoder stage) at tiny widths: KOALA-1B vs SDXL, runnable.
SDXL_NARROW = dict(tiny_unet_config(), transformer_layers_per_block=[1, 2, 10])


def _inputs(cfg: dict, batch: int = 2, side: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return dict(
        sample=torch.randn(batch, 4, side, side, generator=g),
        timestep=torch.tensor([10, 500][:batch]),
        encoder_hidden_states=torch.randn(batch, 77, cfg["cross_attention_dim"], generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=g),
                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)},
    )


@pytest.fixture(scope="module")
def sdxl_and_koala_1b():
    torch.manual_seed(0)
    teacher = build_unet(SDXL_NARROW).eval()
    student = build_unet(derive_student_config(SDXL_NARROW, STUDENTS["koala_1b"]))
    init_student_from_teacher(student, teacher)
    return teacher, student


def test_layer_maps():
    assert layer_indices(10, 6, "bottom") == [0, 1, 2, 3, 4, 5]
    assert layer_indices(10, 6, "interleave") == [0, 2, 4, 6, 8, 9]  # the paper's 1,3,5,7,9,10
    assert layer_indices(10, 6, "up") == [4, 5, 6, 7, 8, 9]
    assert layer_indices(7, 5, "interleave") == [0, 2, 3, 4, 6]  # stride would repeat: evenly spaced
    assert layer_indices(2, 2, "interleave") == [0, 1]
    with pytest.raises(ValueError):
        layer_indices(2, 3, "bottom")


def test_koala_recipe_pairs_koala_1b_vs_sdxl(sdxl_and_koala_1b):
    teacher, student = sdxl_and_koala_1b
    pairs = match_features(teacher, student)
    sa = [p for p in pairs if p.kind == "sa"]
    # DW-2: 1 stack x 2, DW-3: 1 x 6, Mid: 6, UP-1: 2 stacks x 6, UP-2: 2 x 2 -> 30 self-attention features
    assert len(sa) == 2 + 6 + 6 + 12 + 4
    assert all(p.student.endswith("attn1") and p.teacher.endswith("attn1") for p in sa)
    assert [p.label for p in pairs if p.kind == "lf"] == ["lf/DW-1", "lf/UP-3"]
    by_label = {p.label: p for p in pairs}
    # the decoder's last stack is matched with the teacher's last stack; depth map is bottom
    assert by_label["sa/UP-1.1.5"].teacher == "up_blocks.0.attentions.2.transformer_blocks.5.attn1"
    assert by_label["sa/Mid.0.3"].teacher == "mid_block.attentions.0.transformer_blocks.3.attn1"
    assert "sa/UP-1.1.5" in format_pairs(pairs)


def test_each_default_pair_taps_the_teacher_module_its_student_module_was_copied_from(sdxl_and_koala_1b):
    """layer_map=bottom (the paper's): every self-attention pair is a student module and the teacher module it was
    initialised from (encoder: the same index; decoder: last <- last; stacks: the bottom blocks), so the pairs hold
    the same weights at the start; DW-2 matches the teacher's first stack, not its last."""
    teacher, student = sdxl_and_koala_1b
    t_mod, s_mod = dict(teacher.named_modules()), dict(student.named_modules())
    sa = [p for p in match_features(teacher, student) if p.kind == "sa"]
    for p in sa:
        t_params = dict(t_mod[p.teacher].named_parameters())
        for name, w in s_mod[p.student].named_parameters():
            assert torch.equal(w, t_params[name]), (p.label, name)
    by_label = {p.label: p.teacher for p in sa}
    assert by_label["sa/DW-2.0.1"] == "down_blocks.1.attentions.0.transformer_blocks.1.attn1"
    assert by_label["sa/UP-1.0.5"] == "up_blocks.0.attentions.0.transformer_blocks.5.attn1"


@pytest.mark.parametrize("layer_map, blocks", [("interleave", [0, 2, 4, 6, 8, 9]), ("up", [4, 5, 6, 7, 8, 9])])
def test_the_layer_map_chooses_the_teacher_blocks_of_a_shorter_stack(sdxl_and_koala_1b, layer_map, blocks):
    teacher, student = sdxl_and_koala_1b
    by_label = {p.label: p.teacher for p in match_features(teacher, student, layer_map=layer_map)}
    assert [by_label[f"sa/DW-3.0.{k}"] for k in range(6)] == [
        f"down_blocks.2.attentions.0.transformer_blocks.{i}.attn1" for i in blocks]
    assert [by_label[f"sa/UP-2.1.{k}"] for k in range(2)] == [  # 2 of 2: every map takes both
        f"up_blocks.1.attentions.2.transformer_blocks.{i}.attn1" for i in range(2)]


def test_hooks_capture_exactly_the_configured_modules(sdxl_and_koala_1b):
    teacher, student = sdxl_and_koala_1b
    pairs = match_features(teacher, student, feature_types=("sa", "ca", "ffn", "res"))
    tap_t, tap_s = tap_pair(teacher, student, pairs)
    x = _inputs(SDXL_NARROW)
    with torch.no_grad():
        teacher(**x)
        student(**x)
    assert set(tap_t.features) == set(tap_s.features) == {p.label for p in pairs}
    for p in pairs:
        f_t, f_s = tap_t.features[p.label], tap_s.features[p.label]
        assert f_t.shape == f_s.shape, p.label
        if p.kind in ("sa", "ca", "ffn"):  # tokens: [B, h*w, C]
            assert f_s.dim() == 3 and f_s.shape[0] == 2
        else:  # resnet / stage outputs: [B, C, h, w]
            assert f_s.dim() == 4
    # the stage resolutions: DW-2 at 1/2, DW-3 at 1/4 of the 16x16 latent
    assert tap_s.features["sa/DW-2.0.0"].shape[1] == 8 * 8
    assert tap_s.features["sa/DW-3.0.0"].shape[1] == 4 * 4
    assert tap_s.features["lf/UP-3"].shape == (2, 32, 16, 16)
    tap_t.remove()
    tap_s.remove()
    tap_s.clear()
    with torch.no_grad():
        student(**x)
    assert tap_s.features == {}  # removed hooks no longer fire


def test_unknown_module_is_an_error(sdxl_and_koala_1b):
    _, student = sdxl_and_koala_1b
    with pytest.raises(KeyError, match="no module"):
        FeatureTap(student, {"x": "down_blocks.7.attentions.0"})


def test_tiny_vs_tiny_pairs(tiny_unets):
    teacher, student = tiny_unets
    pairs = match_features(teacher, student)
    # tiny teacher depths [1, 2, 4] -> student (1, 2, 2): DW-2 2, DW-3 2, Mid 2, UP-1 2x2, UP-2 2x2
    assert len([p for p in pairs if p.kind == "sa"]) == 2 + 2 + 2 + 4 + 4
    with pytest.raises(ValueError, match="lacks"):
        match_features(teacher, build_unet(derive_student_config(dict(teacher.config),
                                                                 STUDENTS["koala_700m"].__class__(
                                                                     "x", 1, (1, 2, 2), mid_block=False))),
                       lf_stages=("Mid",))


@pytest.mark.slow
def test_hooks_fire_under_regional_compile(tiny_unets):
    from distill.perf import compile_blocks

    teacher, _ = tiny_unets
    eager = copy.deepcopy(teacher)
    compiled = copy.deepcopy(teacher)
    assert compile_blocks(compiled) > 0
    pairs = match_features(eager, copy.deepcopy(eager))
    tap_e = FeatureTap(eager, {p.label: p.teacher for p in pairs})
    tap_c = FeatureTap(compiled, {p.label: p.teacher for p in pairs})
    x = _inputs(dict(teacher.config), side=32)
    with torch.no_grad():
        out_e = eager(**x).sample
        out_c = compiled(**x).sample
    assert set(tap_c.features) == {p.label for p in pairs}
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
    for label in tap_e.features:
        torch.testing.assert_close(tap_c.features[label], tap_e.features[label], rtol=1e-4, atol=1e-4)
