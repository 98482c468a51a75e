"""Bad input is skipped and counted, never fatal; convertible modes become RGB."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data.config import DataConfig
from data.images import to_rgb
from data.stream import MAX_EMPTY_EPOCHS, NoUsableSamples, build_loader, one_line
from data.synthetic import encode_image, synthetic_image

SIZE = 32  # px: the images are exactly the crop size, so converted pixels can be compared exactly
CAPTION = json.dumps({"caption": "a caption"}).encode()


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _rgb(seed: int) -> np.ndarray:
    return synthetic_image(np.random.default_rng(seed), SIZE, SIZE)


def _converted_images() -> dict[str, tuple[str, bytes]]:
    """key -> (extension, bytes) of images in modes that must be converted to RGB."""
    rgb = Image.fromarray(_rgb(1))
    rgba = rgb.convert("RGBA")
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[:, : SIZE // 2] = 0  # left half fully transparent -> white
    rgba.putalpha(Image.fromarray(alpha))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    sixteen = Image.fromarray(np.tile(np.linspace(0, 65535, SIZE).astype(np.uint16), (SIZE, 1)))
    return {
        "conv_L": ("png", _encode(rgb.convert("L"), "PNG")),
        "conv_LA": ("png", _encode(rgb.convert("LA"), "PNG")),
        "conv_P": ("png", _encode(palette, "PNG")),
        "conv_RGBA": ("png", _encode(rgba, "PNG")),
        "conv_CMYK": ("jpg", _encode(rgb.convert("CMYK"), "JPEG", quality=95)),
        "conv_I16": ("png", _encode(sixteen, "PNG")),
        "conv_1": ("png", _encode(rgb.convert("1"), "PNG")),
    }


def _bad_samples() -> list[tuple[str, dict, str]]:
    """(key, sample fields, expected skip reason)."""
    jpeg = encode_image(_rgb(2), "jpg")
    png = encode_image(_rgb(3), "png")
    big = encode_image(synthetic_image(np.random.default_rng(4), SIZE * 2, SIZE * 2), "png")
    return [
        ("bad_truncated_jpg", {"jpg": jpeg[: len(jpeg) // 2], "json": CAPTION}, "bad_image"),
        ("bad_truncated_png", {"png": png[: len(png) // 2], "json": CAPTION}, "bad_image"),
        ("bad_not_an_image", {"jpg": b"<html>404 not found</html>", "json": CAPTION}, "bad_image"),
        ("bad_zero_bytes", {"png": b"", "json": CAPTION}, "empty_image"),
        ("bad_no_json_no_txt", {"png": png}, "missing_json"),
        ("bad_malformed_json", {"png": png, "json": b'{"caption": "unterminated'}, "bad_json"),
        ("bad_json_list", {"png": png, "json": b'["a", "b"]'}, "bad_json"),
        ("bad_non_utf8_txt", {"png": png, "txt": b"caf\xe9 \xff\xfe"}, "bad_text"),
        # JSON admits a lone surrogate escape, which CLIP's tokenizer rejects with a TypeError
        ("bad_lone_surrogate", {"png": png, "json": b'{"caption": "smile \\ud83d x"}'}, "bad_text"),
        ("bad_too_many_pixels", {"png": big, "json": CAPTION}, "too_many_pixels"),
        ("bad_no_image", {"json": CAPTION}, "no_image"),
        ("bad_empty_caption", {"png": png, "json": b'{"caption": "  ", "llava_caption": ""}'}, "no_caption"),
    ]


@pytest.fixture(scope="module")
def corrupt_shard(tmp_path_factory) -> tuple[str, list[str], dict[str, int]]:
    path = str(tmp_path_factory.mktemp("corrupt") / "000000.tar")
    good = {
        "good_png": {"png": encode_image(_rgb(5), "png"), "json": CAPTION},
        "good_jpg": {"jpg": encode_image(_rgb(6), "jpg"), "json": CAPTION},
        "good_webp": {"webp": encode_image(_rgb(7), "webp"), "txt": b"caption from the txt file"},
    }
    good.update({k: {ext: data, "json": CAPTION} for k, (ext, data) in _converted_images().items()})
    bad = _bad_samples()
    expected_skips: dict[str, int] = {}
    for _, _, reason in bad:
        expected_skips[reason] = expected_skips.get(reason, 0) + 1
    # Bad samples between good ones; a good one last, so consuming every good sample has seen every bad one.
    with wds.TarWriter(path) as writer:
        good_items = list(good.items())
        for i, (key, fields) in enumerate(good_items[:-1]):
            writer.write({"__key__": key, **fields})
            if i < len(bad):
                writer.write({"__key__": bad[i][0], **bad[i][1]})
        for key, fields, _ in bad[len(good_items) - 1 :]:
            writer.write({"__key__": key, **fields})
        writer.write({"__key__": good_items[-1][0], **good_items[-1][1]})
    return path, list(good), expected_skips


def _cfg(shards: str, **overrides) -> DataConfig:
    base = dict(shards=shards, resolution=SIZE, num_workers=0, shuffle_buffer=1, random_crop=False)
    base["max_pixels"] = SIZE * SIZE  # the 64x64 image is over the limit
    return DataConfig(**{**base, **overrides})


def test_corrupt_samples_are_skipped_and_counted(corrupt_shard):
    path, good_keys, expected_skips = corrupt_shard
    loader = build_loader(_cfg(path), batch_size=1, rank=0, world_size=1, seed=0)
    batches = list(itertools.islice(iter(loader), len(good_keys)))
    assert [b["keys"][0] for b in batches] == good_keys  # shuffle_buffer=1 keeps the tar order
    assert all(b["epoch"].item() == 0 for b in batches)
    assert loader.skip_counts() == expected_skips
    by_key = {b["keys"][0]: b for b in batches}
    assert by_key["good_webp"]["captions"] == ["caption from the txt file"]
    for batch in batches:
        assert batch["pixel_values"].shape == (1, 3, SIZE, SIZE)
        assert batch["original_size"].tolist() == [[SIZE, SIZE]]

    def pixels(key: str) -> np.ndarray:  # back to uint8 HWC
        x = by_key[key]["pixel_values"][0].permute(1, 2, 0)
        return torch.round((x + 1) * 127.5).to(torch.uint8).numpy()

    gray = pixels("conv_L")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    rgba = pixels("conv_RGBA")
    assert (rgba[:, : SIZE // 2] == 255).all(), "transparent pixels composite on white"
    assert (rgba[:, SIZE // 2 :] == _rgb(1)[:, SIZE // 2 :]).all(), "opaque pixels keep their colour"
    sixteen = pixels("conv_I16")
    assert sixteen[0, 0, 0] == 0 and sixteen[0, -1, 0] == 255, "16-bit 0..65535 maps to 0..255"
    assert np.abs(pixels("conv_CMYK").astype(int) - _rgb(1).astype(int)).mean() < 12


def test_truncated_tar_is_counted_and_the_stream_goes_on(tmp_path):
    good = {f"k{i}": {"png": encode_image(_rgb(10 + i), "png"), "json": CAPTION} for i in range(4)}
    broken, intact = str(tmp_path / "000000.tar"), str(tmp_path / "000001.tar")
    with wds.TarWriter(broken) as writer:
        for key, fields in good.items():
            writer.write({"__key__": key, **fields})
    data = open(broken, "rb").read()
    cut = data.index(b"k2.png") + 700  # inside the third sample's image data
    open(broken, "wb").write(data[:cut])
    with wds.TarWriter(intact) as writer:
        writer.write({"__key__": "other", "png": encode_image(_rgb(20), "png"), "json": CAPTION})
    cfg = _cfg(f"{broken}::{intact}", shuffle_group_shards=1)
    loader = build_loader(cfg, batch_size=1, rank=0, world_size=1, seed=0)
    keys = []
    for batch in loader:
        if batch["epoch"].item() > 0:
            break
        keys += batch["keys"]
    assert sorted(keys) == ["k0", "k1", "other"]
    # One damaged read; the third sample lost its image to the cut. (The first epoch-1 batch comes before the
    # broken shard's cut, whatever the shard order.)
    assert loader.skip_counts() == {"tar_error": 1, "no_image": 1}


def test_to_rgb_modes():
    gray16 = Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(gray16))[0, :, 0].tolist() == [0, 128, 255]
    # a 16-bit PNG with a transparent gray value: scaled like the others (it was clipped at 255, nearly all
    # white), the see-through value white
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 257 * 128, 257 * 200, 65535]], dtype=np.uint16)).save(buffer, "PNG",
                                                                                         transparency=257 * 200)
    keyed = Image.open(io.BytesIO(buffer.getvalue()))
    assert keyed.mode.startswith("I") and keyed.info["transparency"] == 257 * 200
    assert np.asarray(to_rgb(keyed))[0, :, 0].tolist() == [0, 128, 255, 255]
    assert np.asarray(to_rgb(keyed))[0, 1].tolist() == [128, 128, 128]
    assert to_rgb(Image.new("F", (2, 2), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("LA", (2, 2), (10, 0))).getpixel((0, 0)) == (255, 255, 255)
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(rgb) is rgb


def test_resume_counts_every_skip_exactly_once(tmp_path, corrupt_shard):
    corrupt, _, _ = corrupt_shard
    broken = str(tmp_path / "broken.tar")
    with wds.TarWriter(broken) as writer:
        for i in range(5):
            writer.write({"__key__": f"b{i}", "png": encode_image(_rgb(30 + i), "png"), "json": CAPTION})
    data = open(broken, "rb").read()
    open(broken, "wb").write(data[: data.index(b"b3.png") + 700])
    cfg = _cfg(f"{corrupt}::{broken}", shuffle_buffer=4, shuffle_group_shards=2, random_crop=True)
    n = 16
    reference = build_loader(cfg, batch_size=2, rank=0, world_size=1, seed=0)
    counts = []
    for _ in itertools.islice(iter(reference), n):
        counts.append(reference.skip_counts())
    assert counts[-1]["tar_error"] >= 2  # the broken shard was read in more than one epoch
    for k in (1, 5, 8):
        first = build_loader(cfg, batch_size=2, rank=0, world_size=1, seed=0)
        list(itertools.islice(iter(first), k))
        resumed = build_loader(cfg, batch_size=2, rank=0, world_size=1, seed=0, state=first.state_dict())
        for i, _ in enumerate(itertools.islice(iter(resumed), n - k)):
            assert resumed.skip_counts() == counts[k + i], (k, i)


def test_a_stream_without_usable_samples_fails_instead_of_hanging(tmp_path):
    path = str(tmp_path / "000000.tar")
    with wds.TarWriter(path) as writer:
        for key, fields, _ in _bad_samples():
            writer.write({"__key__": key, **fields})
    loader = build_loader(_cfg(path), batch_size=1, rank=0, world_size=1, seed=0)
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(loader))


def _garbage_shard(folder) -> str:
    """One shard whose 8 .png files are not images."""
    path = str(folder / "000000.tar")
    with wds.TarWriter(path) as writer:
        for i in range(8):
            writer.write({"__key__": f"garbage{i}", "png": b"\x89PNG not really" * (i + 1), "json": CAPTION})
    return path


@pytest.mark.parametrize("num_workers", [0, 1])
def test_no_usable_sample_is_one_line_of_its_own_type(tmp_path, num_workers):
    """The trainer catches NoUsableSamples by name and prints its line; with a worker process torch re-raised it
    with the worker's traceback in its text, which the Loader strips."""
    loader = build_loader(_cfg(_garbage_shard(tmp_path), num_workers=num_workers), batch_size=1, rank=0,
                          world_size=1, seed=0)
    with pytest.raises(NoUsableSamples) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert message == (f"reader rank 0 worker 0 found no usable sample in {MAX_EMPTY_EPOCHS} epochs in a row (skips "
                       f"so far: {{'bad_image': {8 * MAX_EMPTY_EPOCHS}}}); check the shards and the filters")
    assert isinstance(caught.value, RuntimeError) and one_line(caught.value) == message


def test_one_line_recovers_the_message_from_a_workers_traceback(tmp_path):
    """A bare DataLoader with a worker re-raises NoUsableSamples (its class, one string argument) with torch's
    "Caught ... in DataLoader worker process 0" and the traceback as its text; one_line gives the line back, the
    same as without workers."""
    messages = []
    for num_workers in (0, 1):
        loader = build_loader(_cfg(_garbage_shard(tmp_path), num_workers=num_workers), batch_size=1, rank=0,
                              world_size=1, seed=0)
        with pytest.raises(NoUsableSamples) as caught:
            next(iter(loader._dataloader()))  # the torch DataLoader itself, without Loader's re-raise
        if num_workers:
            assert "Caught NoUsableSamples in DataLoader worker process 0" in str(caught.value)
            assert "Traceback" in str(caught.value)
        messages.append(one_line(caught.value))
    assert messages[0] == messages[1] and messages[0].startswith("reader rank 0 worker 0 found no usable sample")
    assert "\n" not in messages[0]
    assert one_line(ValueError("plain")) == "plain"
