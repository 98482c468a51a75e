"""Caption choice and synCap on LAION-POP-shaped json, score filters, and the config contract."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from omegaconf import OmegaConf

from data.captions import SkipSample, check_scores, choose_caption, decode_json, decode_text
from data.config import DataConfig, parse_score_filters, to_data_config, validate_config
from data.decode import RawDecoder
from data.synthetic import encode_image, synthetic_image

FIELDS = DataConfig().caption_fields
ALT = DataConfig().alt_text_fields

LAION_POP = {
    "url": "https://example.invalid/1.jpg",
    "alt_txt": "Red bike by the canal",
    "cogvlm_caption": "A red city bicycle with a wicker basket leans against an iron railing by a canal.",
    "llava_caption": "The image shows a red bicycle parked next to a canal.",
    "width": 1365,
    "height": 2048,
    "aesthetic_score": 6.2,
    "pwatermark": 0.08,
}


def test_preference_order_of_caption_fields():
    assert choose_caption(LAION_POP, None, FIELDS) == LAION_POP["cogvlm_caption"]
    no_cogvlm = {**LAION_POP, "cogvlm_caption": "   "}
    assert choose_caption(no_cogvlm, None, FIELDS) == LAION_POP["llava_caption"]
    assert choose_caption(LAION_POP, None, ["llava_caption", "cogvlm_caption"]) == LAION_POP["llava_caption"]
    assert choose_caption({"caption": " short "}, None, FIELDS) == "short"
    assert choose_caption({"caption": 3}, "from txt", FIELDS) == "from txt"  # non-strings are ignored
    assert choose_caption(None, "only txt", FIELDS) == "only txt"
    with pytest.raises(SkipSample) as info:
        choose_caption({"cogvlm_caption": ""}, "  ", FIELDS)
    assert info.value.reason == "no_caption"


def test_a_byte_order_mark_is_not_part_of_a_caption():
    """Windows editors start UTF-8 files with U+FEFF: it reached the tokenizer with the caption, defeated synCap's
    same-text check, and made json.loads refuse a sidecar."""
    bom = "\ufeff".encode()
    assert decode_text(bom + b"a photo of a cat") == "a photo of a cat"
    assert decode_json(bom + json.dumps({"caption": "a cat"}).encode()) == {"caption": "a cat"}
    with pytest.raises(SkipSample) as info:
        decode_text(b"\xff\xfe not utf-8")
    assert info.value.reason == "bad_text"


def test_syncap_appends_the_generated_caption_to_the_alt_text():
    caption = choose_caption(LAION_POP, None, FIELDS, syncap=True, alt_text_fields=ALT)
    assert caption == f"{LAION_POP['alt_txt']} {LAION_POP['cogvlm_caption']}"
    # img2dataset keeps the alt text as "caption" (its --caption_col)
    img2dataset = {"caption": "alt words", "llava_caption": "generated words"}
    assert choose_caption(img2dataset, None, FIELDS, syncap=True, alt_text_fields=ALT) == "alt words generated words"
    assert choose_caption({"llava_caption": "gen"}, None, FIELDS, syncap=True, alt_text_fields=ALT) == "gen"
    assert choose_caption({"alt_txt": "alt"}, None, FIELDS, syncap=True, alt_text_fields=ALT) == "alt"
    # "caption" is an alt-text field here: not appended as if it were a generated one
    assert choose_caption({"alt_txt": "a", "caption": "b"}, None, FIELDS, syncap=True, alt_text_fields=ALT) == "a"
    # img2dataset output: the same caption in the json and the .txt file is not said twice
    assert choose_caption({"caption": "a red car"}, "a red car\n", FIELDS, syncap=True,
                          alt_text_fields=ALT) == "a red car"
    # the demo layout: rich caption in "caption" and the txt file, short alt text in "alt_txt"
    demo = {"caption": "rich", "alt_txt": "short"}
    assert choose_caption(demo, "rich", FIELDS) == "rich"
    assert choose_caption(demo, "rich", FIELDS, syncap=True, alt_text_fields=ALT) == "short rich"
    with pytest.raises(SkipSample):
        choose_caption({"url": "x"}, None, FIELDS, syncap=True, alt_text_fields=ALT)


def test_score_filters():
    filters = parse_score_filters(["aesthetic_score>=6", "pwatermark <= 0.5", "width>1000"])
    assert filters == [("aesthetic_score", ">=", 6.0), ("pwatermark", "<=", 0.5), ("width", ">", 1000.0)]
    check_scores(LAION_POP, filters)
    check_scores({**LAION_POP, "aesthetic_score": "6.5"}, filters)  # numbers stored as strings
    for meta, reason in [
        ({**LAION_POP, "aesthetic_score": 5.9}, "low_score"),
        ({**LAION_POP, "pwatermark": 0.9}, "low_score"),
        ({k: v for k, v in LAION_POP.items() if k != "pwatermark"}, "missing_score"),
        ({**LAION_POP, "aesthetic_score": None}, "missing_score"),
        ({**LAION_POP, "aesthetic_score": float("nan")}, "missing_score"),
    ]:
        with pytest.raises(SkipSample) as info:
            check_scores(meta, filters)
        assert info.value.reason == reason
    with pytest.raises(ValueError, match="score_filters"):
        parse_score_filters(["aesthetic_score => 6"])


def test_decoder_applies_caption_config_and_filters():
    image = encode_image(synthetic_image(np.random.default_rng(0), 40, 60), "png")
    sample = {"__key__": "k", "png": image, "json": json.dumps(LAION_POP).encode()}
    rng = random.Random(0)
    syncap = RawDecoder(DataConfig(shards="x", resolution=32, syncap=True))
    assert syncap(sample, rng).caption.startswith("Red bike by the canal A red city bicycle")
    strict = RawDecoder(DataConfig(shards="x", resolution=32, score_filters=["aesthetic_score>=6.5"]))
    with pytest.raises(SkipSample, match="low_score"):
        strict(sample, rng)
    for cfg, reason in [
        (DataConfig(shards="x", resolution=32, min_side=41), "too_small"),
        (DataConfig(shards="x", resolution=32, max_aspect=1.4), "bad_aspect"),
        (DataConfig(shards="x", resolution=32, min_aspect=1.6), "bad_aspect"),
    ]:
        with pytest.raises(SkipSample, match=reason):
            RawDecoder(cfg)(sample, rng)
    RawDecoder(DataConfig(shards="x", resolution=32, min_side=40, min_aspect=1.5, max_aspect=1.5))(sample, rng)


def test_data_config_is_an_omegaconf_structured_config():
    schema = OmegaConf.structured(DataConfig)
    cfg = OmegaConf.merge(schema, {"shards": "a.tar", "min_aspect": 0.5, "score_filters": ["pwatermark<=0.5"]})
    plain = to_data_config(cfg)
    assert isinstance(plain, DataConfig) and plain.score_filters == ["pwatermark<=0.5"]
    assert isinstance(plain.caption_fields, list) and plain.min_aspect == 0.5
    validate_config(plain)
    for bad in [{"kind": "pixels"}, {"shards": ""}, {"score_filters": ["x~1"]}, {"num_workers": -1}]:
        with pytest.raises(ValueError):
            validate_config(DataConfig(**{"shards": "a.tar", **bad}))
