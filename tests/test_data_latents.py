"""`make latents` on the tiny pipeline: latents equal the VAE encoding of the same crop; resumable; loadable."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data.config import DataConfig
from data.decode import RawDecoder
from data.latents import latent_generator, load_encoders, make_latents, native_resolution, sample_rng
from data.stream import build_loader, collate
from data.synthetic import write_synthetic_shards
from distill.conditioning import encode_images, encode_prompts
from scripts import make_latents as make_latents_script

RES = 32  # px crops; the tiny VAE makes 16x16 latents of them
SEED = 3


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("raw")
    write_synthetic_shards(str(out), num_shards=3, samples_per_shard=3, sizes=((40, 56), (56, 40), (36, 36)))
    return str(out)


def _latent_samples(folder: str) -> dict[str, dict]:
    urls = [{"url": f"{folder}/{i:06d}.tar"} for i in range(3)]
    return {s["__key__"]: s for s in wds.tarfile_samples(urls)}


def test_latents_equal_the_vae_encoding_of_the_same_crop(tiny_pipeline_dir, raw_shards, tmp_path):
    cfg = DataConfig(shards=raw_shards, resolution=RES, random_crop=True, random_flip=True)
    out = str(tmp_path / "latents")
    summary = make_latents(
        str(tiny_pipeline_dir), raw_shards, out, cfg, batch_size=2, device="cpu", storage="float32", seed=SEED
    )
    assert summary["made"] == 3 and summary["written"] == 9 and summary["skipped"] == 0

    vae, tokenizers, encoders = load_encoders(str(tiny_pipeline_dir), "cpu")
    decoder = RawDecoder(cfg)
    raws = {s["__key__"]: s for s in wds.tarfile_samples([{"url": f"{raw_shards}/{i:06d}.tar"} for i in range(3)])}
    latent_samples = _latent_samples(out)
    assert sorted(latent_samples) == sorted(raws)
    corners, flips = set(), set()
    for key, sample in latent_samples.items():
        meta = json.loads(sample["json"])
        example = decoder(raws[key], sample_rng(SEED, key))  # the same seeded crop
        assert meta["crop_top_left"] == list(example.crop_top_left)
        assert meta["original_size"] == list(example.original_size)
        assert meta["target_size"] == [RES, RES]
        assert meta["flipped"] == example.flipped
        flips.add(example.flipped)
        corners.add(tuple(meta["crop_top_left"]))
        pixels = collate([((0, 0, 0), example)])["pixel_values"]
        expected = encode_images(vae, pixels, sample=True, generator=[latent_generator(SEED, key)])[0]
        assert not torch.allclose(expected, encode_images(vae, pixels)[0])  # a posterior draw, not the mean
        stored = torch.from_numpy(_npy(sample["latents.npy"]))
        assert stored.shape == expected.shape == (4, RES // 2, RES // 2)
        torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)
        prompt_embeds, pooled = encode_prompts(tokenizers, encoders, [meta["caption"]])
        torch.testing.assert_close(torch.from_numpy(_npy(sample["prompt_embeds.npy"])), prompt_embeds[0])
        torch.testing.assert_close(torch.from_numpy(_npy(sample["pooled_prompt_embeds.npy"])), pooled[0])
    assert len(corners) > 1, "seeded random crops should differ between samples"
    assert flips == {True, False}
    empty = np.load(f"{out}/empty_prompt.npz")
    prompt_embeds, pooled = encode_prompts(tokenizers, encoders, [""])
    torch.testing.assert_close(torch.from_numpy(empty["prompt_embeds"]), prompt_embeds[0])
    torch.testing.assert_close(torch.from_numpy(empty["pooled_prompt_embeds"]), pooled[0])

    # Training reads the latent shards without the VAE or the text encoders.
    lat_cfg = DataConfig(shards=out, kind="latents", num_workers=0, shuffle_buffer=2)
    batch = next(iter(build_loader(lat_cfg, batch_size=3, rank=0, world_size=1, seed=0)))
    assert batch["latents"].shape == (3, 4, RES // 2, RES // 2) and batch["latents"].dtype == torch.float32
    assert batch["prompt_embeds"].shape[:2] == (3, 77) and batch["pooled_prompt_embeds"].shape[0] == 3
    assert batch["target_size"].tolist() == [[RES, RES]] * 3 and "pixel_values" not in batch


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


def test_make_latents_resumes_shard_by_shard(tiny_pipeline_dir, raw_shards, tmp_path, capsys):
    out = tmp_path / "latents"
    args = [
        "--pipeline",
        str(tiny_pipeline_dir),
        "--shards",
        raw_shards,
        "--out",
        str(out),
        "--resolution",
        str(RES),
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    make_latents_script.main(args)
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["made"] == 3 and first["written"] == 9 and first["resolution"] == RES
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}

    (out / "000001.tar").unlink()  # as if the run had been killed while writing it
    (out / "000001.tar.partial-123").write_bytes(b"half a shard")
    make_latents_script.main(args)
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["made"] == 1 and again["skipped_existing"] == 2 and again["written"] == 3
    assert digests == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}

    # float16 storage (the default) still loads as float32 close to the full-precision values
    lat_cfg = DataConfig(shards=str(out), kind="latents", num_workers=0, shuffle_buffer=1)
    batches = list(itertools.islice(iter(build_loader(lat_cfg, batch_size=1, rank=0, world_size=1, seed=0)), 9))
    assert sorted(k for b in batches for k in b["keys"]) == sorted(_latent_samples(str(out)))
    assert all(b["latents"].dtype == torch.float32 and torch.isfinite(b["latents"]).all() for b in batches)
    full = tmp_path / "latents_fp32"
    make_latents_script.main([*args[:args.index("--out") + 1], str(full), *args[args.index("--out") + 2:],
                              "--storage", "float32"])
    capsys.readouterr()
    full_cfg = DataConfig(shards=str(full), kind="latents", num_workers=0, shuffle_buffer=1)
    exact = {k: b for b in itertools.islice(iter(build_loader(full_cfg, batch_size=1, rank=0, world_size=1, seed=0)),
                                            9) for k in b["keys"]}
    for b in batches:
        for name in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
            want = exact[b["keys"][0]][name]
            torch.testing.assert_close(b[name], want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))

    # the folder's manifest refuses a rerun that would mix other latents in, before any encoder loads
    manifest = json.loads((out / "latents.json").read_text())
    assert manifest["resolution"] == RES and manifest["raw_shards"] == ["000000.tar", "000001.tar", "000002.tar"]
    for change, needle in ((["--resolution", "48"], "resolution 32 -> 48"), (["--seed", "1"], "seed 0 -> 1"),
                           (["--shards", f"{raw_shards}/0000{{01..02}}.tar"], "raw shard 0 '000000.tar' -> "
                                                                              "'000001.tar'")):
        assert make_latents_script.entry([*args, *change]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --out") and needle in err and "\n" not in err
    assert make_latents_script.entry([*args, "--shards", f"{raw_shards}/0000{{00..01}}.tar"]) == 0  # a prefix
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped_existing"] == 2
    assert digests == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


@pytest.mark.parametrize("change, needle", [
    (["--out", "RAW"], "holds the raw shards being read"),
    (["--part", "2", "--num-parts", "2"], "part in 0..num_parts-1"),
    (["--batch-size", "0"], "at least 1 image"),
    # the tiny VAE, like SDXL's original one, says force_upcast: every latent would have been NaN, found only when
    # training skipped them all as bad_latents
    (["--vae-dtype", "float16"], "--vae-dtype float16: the VAE in"),
])
def test_make_latents_refuses_arguments_that_would_do_nothing_or_harm(change, needle, tiny_pipeline_dir,
                                                                      raw_shards, tmp_path, capsys):
    """--out equal to the raw folder would count every raw shard as made; a part outside the range would make
    none; both are one line, and the raw shards are untouched."""
    before = {p.name: p.stat().st_mtime_ns for p in Path(raw_shards).iterdir()}
    change = [raw_shards if c == "RAW" else c for c in change]
    args = ["--pipeline", str(tiny_pipeline_dir), "--shards", raw_shards, "--out", str(tmp_path / "lat"), *change]
    assert make_latents_script.entry(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err
    assert before == {p.name: p.stat().st_mtime_ns for p in Path(raw_shards).iterdir()}


def test_the_default_resolution_is_the_pipelines_own(tiny_pipeline_dir, tmp_path):
    """U-Net sample_size x VAE factor: the tiny pipeline 32 x 2; SDXL-Turbo's configs 64 x 8; SDXL's 128 x 8."""
    assert native_resolution(str(tiny_pipeline_dir)) == 64
    for sample_size, side in ((64, 512), (128, 1024)):
        folder = tmp_path / str(side)
        (folder / "unet").mkdir(parents=True)
        (folder / "vae").mkdir()
        (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": sample_size}))
        (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
        assert native_resolution(str(folder)) == side
    assert native_resolution(str(tmp_path / "nothing")) is None
    with pytest.raises(SystemExit):  # no configs and no --resolution: argparse's one-line error
        make_latents_script.main(["--pipeline", str(tmp_path / "nothing"), "--shards", "x", "--out", "y"])


def test_the_manifest_guards_finished_shards_only(tmp_path, caplog):
    """A manifest beside no finished shard (a run stopped before its first) is replaced; keys a manifest does not
    know are not held against it; shards made before manifests existed are left unchecked, with a warning."""
    from data.latents import MANIFEST_FILE, check_manifest

    base = {"manifest_version": 1, "resolution": 32, "seed": 0, "raw_shards": ["a.tar", "b.tar"]}
    out = tmp_path / "lat"
    out.mkdir()
    check_manifest(str(out), base)
    check_manifest(str(out), {**base, "resolution": 64})  # nothing finished yet: the new settings are recorded
    assert json.loads((out / MANIFEST_FILE).read_text())["resolution"] == 64
    (out / "000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="resolution 64 -> 32"):
        check_manifest(str(out), base)
    check_manifest(str(out), {**base, "resolution": 64, "text_dtype": "float16"})  # a key it never recorded
    check_manifest(str(out), {**base, "resolution": 64, "raw_shards": ["a.tar", "b.tar", "c.tar"]})
    assert json.loads((out / MANIFEST_FILE).read_text())["raw_shards"] == ["a.tar", "b.tar", "c.tar"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "000000.tar").write_bytes(b"")
    with caplog.at_level("WARNING"):
        check_manifest(str(old), base)
    assert "not checked" in caplog.text and not (old / MANIFEST_FILE).exists()


@pytest.mark.parametrize("damage", [b"{\"resolution\": 6", b"[64]", b"\xff\xfe"])
def test_a_damaged_manifest_guards_its_shards_and_tells_no_shapes(tmp_path, damage):
    """latents.json cut short, not an object, or not UTF-8: make latents will not add shards beside it, and the
    trainer's shape reference does not take crop sizes from it (it reads the samples' own)."""
    from data.decode import MANIFEST_FILE, LatentShapes, _manifest_shapes, read_manifest
    from data.latents import check_manifest

    out = tmp_path / "lat"
    out.mkdir()
    assert read_manifest(out) is None and _manifest_shapes(str(out)) == LatentShapes()
    (out / MANIFEST_FILE).write_text(json.dumps({"resolution": 64, "buckets": False}))
    assert read_manifest(out) == {"resolution": 64, "buckets": False}
    assert _manifest_shapes(str(out)).target_sizes == {(64, 64)}
    (out / MANIFEST_FILE).write_bytes(damage)
    with pytest.raises(ValueError, match=MANIFEST_FILE):
        read_manifest(out)
    assert _manifest_shapes(str(out)) == LatentShapes()
    (out / "000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a latents manifest: remove it, or give another --out"):
        check_manifest(str(out), {"resolution": 64, "raw_shards": ["a.tar"]})


def test_latent_shards_are_refused_as_input(tiny_pipeline_dir, tmp_path, capsys):
    """make latents on its own output skipped every sample and wrote empty shards with exit code 0."""
    from data.synthetic import write_synthetic_latent_shards

    write_synthetic_latent_shards(str(tmp_path / "lat"), num_shards=1, samples_per_shard=2,
                                  latent_shape=(4, 32, 32), text_dim=64, pooled_dim=32, image_size=(64, 64))
    with pytest.raises(SystemExit) as exc:
        make_latents_script.main(["--pipeline", str(tiny_pipeline_dir), "--shards", str(tmp_path / "lat"),
                                  "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "holds latents already (make latents' output); give the raw image shards" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shards_whose_every_sample_is_skipped_end_with_an_error(tiny_pipeline_dir, tmp_path, capsys):
    """Images without captions: nothing can be encoded, so the run says so and exits 2 instead of 0."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="JPEG")
    (tmp_path / "raw").mkdir()
    with wds.TarWriter(str(tmp_path / "raw" / "000000.tar")) as sink:
        for i in range(2):
            sink.write({"__key__": f"s{i}", "jpg": buf.getvalue()})
    code = make_latents_script.entry(["--pipeline", str(tiny_pipeline_dir), "--shards", str(tmp_path / "raw"),
                                      "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "error: no sample could be encoded" in err, err


LATENT, TOKENS, WIDTH, POOLED = (4, 32, 32), 77, 64, 32  # the good samples' shapes (the tiny teacher's, at 64 px)
# key -> (latents, prompt_embeds, pooled_prompt_embeds shapes, json target_size): right dimensions, wrong shape.
MISSHAPEN = {
    "small_latents": ((4, 16, 16), (TOKENS, WIDTH), (POOLED,), [64, 64]),  # 16x16 cells of a 64 px crop: factor 4
    "three_channels": ((3, 32, 32), (TOKENS, WIDTH), (POOLED,), [64, 64]),
    "untiled": ((4, 32, 24), (TOKENS, WIDTH), (POOLED,), [64, 64]),  # no one VAE factor for both sides
    "narrow_text": (LATENT, (TOKENS, 5), (POOLED,), [64, 64]),
    "short_text": (LATENT, (40, WIDTH), (POOLED,), [64, 64]),
    "narrow_pooled": (LATENT, (TOKENS, WIDTH), (7,), [64, 64]),
}


def _latent_sample(key: str, latents: tuple, prompt: tuple, pooled: tuple, target: list[int]) -> dict:
    rng = np.random.default_rng(len(key))
    meta = {"caption": f"caption of {key}", "original_size": target, "crop_top_left": [0, 0], "target_size": target}
    arrays = {"latents.npy": latents, "prompt_embeds.npy": prompt, "pooled_prompt_embeds.npy": pooled}
    return {"__key__": key, "json": json.dumps(meta).encode(),
            **{name: rng.standard_normal(shape).astype(np.float16) for name, shape in arrays.items()}}


def _misshapen_shard(folder: Path, extra: dict | None = None) -> tuple[str, list[str]]:
    """A latent shard of 6 good samples with MISSHAPEN (and `extra`) between them, a misshapen one first (it must
    not set the shapes) and a good one last; returns (path, good keys in tar order)."""
    folder.mkdir()
    bad = {**MISSHAPEN, **(extra or {})}
    good = [f"good{i}" for i in range(6)]
    order = [*bad][:1] + [k for pair in itertools.zip_longest(good[:-1], [*bad][1:]) for k in pair if k] + good[-1:]
    with wds.TarWriter(str(folder / "000000.tar")) as writer:
        for key in order:
            writer.write(_latent_sample(key, *bad.get(key, (LATENT, (TOKENS, WIDTH), (POOLED,), [64, 64]))))
    return str(folder / "000000.tar"), good


@pytest.mark.parametrize("num_workers", [0, 1])
def test_misshapen_latent_samples_are_skipped_and_counted(tmp_path, num_workers):
    """Arrays with the right dimensions but another shape (latent channels or grid, text tokens or widths, pooled
    width) used to reach np.stack in collate and end the run; now each is skipped as bad_latent_shape."""
    from data.decode import first_latent_example, latent_shapes

    path, good = _misshapen_shard(tmp_path / "lat")
    shapes = latent_shapes([path])  # most of the first samples, not the misshapen first one
    assert (shapes.channels, shapes.factor, shapes.prompt_embeds, shapes.pooled) == (4, 2, (TOKENS, WIDTH), POOLED)
    assert first_latent_example([path]).key == "good0"
    cfg = DataConfig(shards=path, kind="latents", num_workers=num_workers, shuffle_buffer=1)
    loader = build_loader(cfg, batch_size=2, rank=0, world_size=1, seed=0)
    batches = list(itertools.islice(iter(loader), len(good) // 2))
    assert [k for b in batches for k in b["keys"]] == good  # shuffle_buffer=1 keeps the tar order
    assert loader.skip_counts() == {"bad_latent_shape": len(MISSHAPEN)}
    for batch in batches:
        assert batch["latents"].shape == (2, *LATENT) and batch["prompt_embeds"].shape == (2, TOKENS, WIDTH)
        assert batch["pooled_prompt_embeds"].shape == (2, POOLED)


def test_latents_json_decides_the_crop_sizes(tmp_path):
    """A sample whose latent grid fits its own crop but not the resolution latents.json records is skipped; without
    a manifest (nothing says which crops the set holds, e.g. buckets) it is kept, in a batch of its own shape."""
    from data.decode import MANIFEST_FILE

    half = {"half_size": ((4, 16, 16), (TOKENS, WIDTH), (POOLED,), [32, 32])}
    for manifest in (True, False):
        path, good = _misshapen_shard(tmp_path / f"lat{manifest}", half)
        if manifest:
            (tmp_path / f"lat{manifest}" / MANIFEST_FILE).write_text(json.dumps({"resolution": 64, "buckets": False}))
        cfg = DataConfig(shards=path, kind="latents", num_workers=0, shuffle_buffer=1)
        loader = build_loader(cfg, batch_size=1, rank=0, world_size=1, seed=0)
        keys = [b["keys"][0] for b in itertools.islice(iter(loader), len(good) + (not manifest))]
        assert keys == (good if manifest else [*good[:-1], "half_size", good[-1]])  # the tar's order
        assert loader.skip_counts() == {"bad_latent_shape": len(MISSHAPEN) + manifest}


def test_latent_samples_with_impossible_sizes_are_skipped_and_counted(tmp_path):
    """A latent sample's json sizes and crop offsets are pixel counts. A number no int64 holds used to end the run
    in collate (torch.tensor overflow, outside the per-sample skip); negative ones and booleans went into SDXL's
    time ids. Each is now skipped as bad_latents."""
    bad = {"huge": {"original_size": [10**20, 64]}, "negative": {"crop_top_left": [-8, 0]},
           "boolean": {"target_size": [True, 64]}, "float": {"original_size": [64.5, 64]}}
    folder = tmp_path / "lat"
    folder.mkdir()
    order = ["good0", "huge", "good1", "negative", "boolean", "good2", "float", "good3"]
    with wds.TarWriter(str(folder / "000000.tar")) as writer:
        for key in order:
            sample = _latent_sample(key, LATENT, (TOKENS, WIDTH), (POOLED,), [64, 64])
            sample["json"] = json.dumps({**json.loads(sample["json"]), **bad.get(key, {})}).encode()
            writer.write(sample)
    cfg = DataConfig(shards=str(folder / "000000.tar"), kind="latents", num_workers=0, shuffle_buffer=1)
    loader = build_loader(cfg, batch_size=2, rank=0, world_size=1, seed=0)
    batches = list(itertools.islice(iter(loader), 2))
    assert [k for b in batches for k in b["keys"]] == ["good0", "good1", "good2", "good3"]
    assert loader.skip_counts() == {"bad_latents": len(bad)}
    assert batches[0]["original_size"].tolist() == [[64, 64], [64, 64]]
