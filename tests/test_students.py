"""KOALA students: exact parameter counts, derivation rules, and initialisation from the teacher."""

from __future__ import annotations

import pytest
import torch

from distill.students import (
    STUDENTS,
    StudentSpec,
    StudentSpecError,
    build_unet,
    count_params,
    derive_student_config,
    init_student_from_teacher,
    resolve_spec,
    sdxl_base_unet_config,
    stage_table,
    summarize_mapping,
)

# KOALA model cards / ../shared/KOALA.md (counted with diffusers).
SDXL_PARAMS = 2_567_463_684
KOALA_1B_PARAMS = 1_161_184_324
KOALA_700M_PARAMS = 782_822_724


@pytest.fixture(scope="module")
def sdxl_meta():
    return build_unet(sdxl_base_unet_config(), "meta")


def test_sdxl_base_parameter_count(sdxl_meta):
    assert count_params(sdxl_meta) == SDXL_PARAMS


@pytest.mark.parametrize("name, expected", [("koala_1b", KOALA_1B_PARAMS), ("koala_700m", KOALA_700M_PARAMS)])
def test_koala_parameter_counts_and_full_shape_map(sdxl_meta, name, expected):
    student = build_unet(derive_student_config(sdxl_base_unet_config(), STUDENTS[name]), "meta")
    assert count_params(student) == expected
    # Every student tensor has a same-shaped teacher source at full SDXL shapes.
    mapping = init_student_from_teacher(student, sdxl_meta, copy_values=False)
    assert set(mapping) == set(student.state_dict())
    t_state, s_state = sdxl_meta.state_dict(), student.state_dict()
    assert all(s_state[k].shape == t_state[v].shape for k, v in mapping.items())


def test_koala_stage_structure(sdxl_meta):
    rows = {r.stage: r for r in stage_table(build_unet(
        derive_student_config(sdxl_base_unet_config(), STUDENTS["koala_1b"]), "meta"))}
    assert [(rows[s].resnets, rows[s].depth) for s in ("DW-1", "DW-2", "DW-3", "Mid", "UP-1", "UP-2", "UP-3")] == [
        (1, 0), (1, 2), (1, 6), (2, 6), (2, 6), (2, 2), (2, 0)]
    rows700 = {r.stage: r for r in stage_table(build_unet(
        derive_student_config(sdxl_base_unet_config(), STUDENTS["koala_700m"]), "meta"))}
    assert rows700["Mid"].params == 0 and rows700["UP-1"].depth == 5


def test_decoder_map_follows_skip_channels(sdxl_meta):
    student = build_unet(derive_student_config(sdxl_base_unet_config(), STUDENTS["koala_1b"]), "meta")
    mapping = init_student_from_teacher(student, sdxl_meta, copy_values=False)
    lines = summarize_mapping(mapping)
    # the student's last resnet of an up stage takes the teacher's last (BK-SDM)
    assert "up_blocks.0.resnets.1 <- up_blocks.0.resnets.2" in lines
    assert "up_blocks.1.attentions.1 <- up_blocks.1.attentions.2" in lines
    # a k-deep stack takes the teacher's first k blocks; encoder block 0 <- teacher block 0
    assert mapping["up_blocks.0.attentions.0.transformer_blocks.5.attn1.to_q.weight"] == \
        "up_blocks.0.attentions.0.transformer_blocks.5.attn1.to_q.weight"
    assert mapping["down_blocks.2.resnets.0.conv1.weight"] == "down_blocks.2.resnets.0.conv1.weight"


def test_every_student_tensor_equals_its_teacher_tensor(tiny_unets):
    teacher, student = tiny_unets
    mapping = init_student_from_teacher(student, teacher)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert set(mapping) == set(s_state)
    for s_key, t_key in mapping.items():
        assert torch.equal(s_state[s_key], t_state[t_key]), s_key
    # the map is not the identity everywhere: decoder tensors come from the teacher's last block
    assert any(s != t for s, t in mapping.items())


def test_custom_spec_and_errors():
    t_cfg = sdxl_base_unet_config()
    spec = resolve_spec("custom", [1, 2, 1], [1, 1, 3], True)
    cfg = derive_student_config(t_cfg, spec)
    assert cfg["layers_per_block"] == [1, 2, 1] and cfg["transformer_layers_per_block"] == [1, 1, 3]
    student = build_unet(cfg, "meta")
    init_student_from_teacher(student, build_unet(t_cfg, "meta"), copy_values=False)
    with pytest.raises(StudentSpecError, match="transformer depth 11"):
        derive_student_config(t_cfg, StudentSpec("x", 1, (1, 2, 11)))
    # SDXL's first stage has no transformers: its entry is ignored, 0 (the README's "-") included
    assert derive_student_config(t_cfg, StudentSpec("x", [1, 2, 1], (0, 1, 3))) == cfg
    with pytest.raises(StudentSpecError, match="3 resnets"):
        derive_student_config(t_cfg, StudentSpec("x", 3, None))
    with pytest.raises(StudentSpecError, match="custom needs"):
        resolve_spec("custom")
    with pytest.raises(StudentSpecError, match="not one of"):
        resolve_spec("koala_2b")


def test_source_missing_is_an_error_not_random_init():
    t_cfg = sdxl_base_unet_config()
    small = dict(t_cfg, block_out_channels=[320, 640, 640], attention_head_dim=[5, 10, 10])
    student = build_unet(derive_student_config(t_cfg, STUDENTS["koala_1b"]), "meta")
    with pytest.raises(StudentSpecError, match="shapes differ"):
        init_student_from_teacher(student, build_unet(small, "meta"), copy_values=False)


@pytest.mark.slow
def test_full_shape_values_copied_koala_1b():
    """At real SDXL shapes (bf16 to fit in memory): every KOALA-1B tensor equals its teacher tensor."""
    torch.manual_seed(0)
    teacher = build_unet(sdxl_base_unet_config(), "meta").to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for i, p in enumerate(teacher.parameters()):
            p.fill_(float(i % 251) / 251)  # cheap, and distinct between neighbouring tensors
    student = build_unet(derive_student_config(sdxl_base_unet_config(), STUDENTS["koala_1b"]), "meta")
    student = student.to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(-1.0)
    mapping = init_student_from_teacher(student, teacher)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert count_params(student) == KOALA_1B_PARAMS
    for s_key, t_key in mapping.items():
        assert torch.equal(s_state[s_key], t_state[t_key]), s_key


def test_diffusers_empty_float32_list_warning_is_dropped_and_a_real_one_kept():
    """diffusers 0.42 warns on every dtype cast that modules "should be kept in float32", listing none: three such
    lines opened every training log. distill/__init__.py drops the empty case only."""
    import logging

    import distill  # noqa: F401  (installs the filter)
    from distill.tiny import tiny_unet_config

    log = logging.getLogger("diffusers.models.modeling_utils")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    try:
        unet = build_unet(tiny_unet_config())
        unet.to(torch.bfloat16)
        unet._keep_in_fp32_modules = ["conv_in"]
        unet.to(torch.float32)
    finally:
        log.removeHandler(handler)
    assert len(seen) == 1 and "should be kept in float32: ['conv_in']" in seen[0], seen
