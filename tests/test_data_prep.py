"""`make data` (folder, manifest, img2dataset sources) and `make demo-data`."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os

import numpy as np
import pytest
import webdataset as wds
from conftest import record_file_ops
from PIL import Image

from data.config import DataConfig
from data.demo import DEMO_IMAGES
from data.prep import PrepOptions, prep_shards, report_lines
from data.stream import build_loader, expand_shards
from data.synthetic import encode_image, synthetic_image
from scripts import make_demo_data, prep_data

LAION_POP = {
    "url": "https://example.invalid/x.jpg",
    "alt_txt": "alt text",
    "cogvlm_caption": "A long generated caption.",
    "llava_caption": "Another generated caption.",
    "aesthetic_score": 6.1,
}


def _image(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    return synthetic_image(np.random.default_rng(seed), height, width)


def _write(path, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _read_shards(folder: str) -> list[dict]:
    urls = [{"url": os.path.join(folder, f)} for f in sorted(os.listdir(folder)) if f.endswith(".tar")]
    return list(wds.tarfile_samples(urls))


def _last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture()
def image_folder(tmp_path):
    src = tmp_path / "src"
    jpeg = encode_image(_image(1), "jpg")
    _write(src / "a.jpg", jpeg)
    _write(src / "a.txt", "a caption from a txt sidecar")
    _write(src / "sub" / "b.png", encode_image(_image(2), "png"))
    _write(src / "sub" / "b.json", json.dumps(LAION_POP))
    Image.fromarray(_image(3)).save(src / "c.bmp")
    _write(src / "c.txt", "a bitmap")
    _write(src / "d.jpg", jpeg[: len(jpeg) // 2])
    _write(src / "d.txt", "truncated")
    _write(src / "e.png", encode_image(_image(4), "png"))
    _write(src / "e.json", '{"caption": ')
    _write(src / "f.png", encode_image(_image(5), "png"))
    _write(src / "g.txt", "a caption without an image")
    _write(src / "h.png", encode_image(_image(6), "png"))
    _write(src / "h.txt", b"\xff\xfe not utf-8")
    _write(src / "i.jpg", b"")
    _write(src / "i.txt", "zero bytes")
    _write(src / "j.png", encode_image(_image(7, 10, 12), "png"))
    _write(src / "j.txt", "tiny but readable")
    _write(src / "k.png", encode_image(_image(8), "png"))
    _write(src / "k.json", '{"caption": "smile \\ud83d x"}')  # a lone surrogate: valid JSON, no UTF-8 text
    return src


def test_folder_source_keeps_every_readable_image(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    prep_data.main(["--src", str(image_folder), "--out", str(out), "--samples-per-shard", "2"])
    printed = capsys.readouterr().out
    summary = _last_json_line(printed)
    assert summary["written"] == 4 and summary["shards"] == 2 and summary["out"] == str(out)
    assert summary["skipped"] == 6
    assert summary["reasons"] == {"bad_image": 1, "bad_json": 1, "bad_text": 2, "empty_image": 1, "no_caption": 1}
    assert "skipped 1 bad_image: e.g. d.jpg" in printed

    samples = _read_shards(str(out))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(4)]
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    assert sorted(by_source) == ["a.jpg", "c.bmp", "j.png", os.path.join("sub", "b.png")]
    assert "png" in by_source["c.bmp"] and "bmp" not in by_source["c.bmp"]  # re-encoded losslessly
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(by_source["c.bmp"]["png"]))), _image(3))
    assert by_source["a.jpg"]["jpg"] == encode_image(_image(1), "jpg")  # original bytes kept
    meta = json.loads(by_source[os.path.join("sub", "b.png")]["json"])
    assert meta["cogvlm_caption"] == LAION_POP["cogvlm_caption"] and (meta["width"], meta["height"]) == (56, 40)
    assert by_source["a.jpg"]["txt"] == b"a caption from a txt sidecar"

    # the shards train: a loader reads them (b's caption comes from cogvlm_caption)
    cfg = DataConfig(shards=str(out), resolution=16, num_workers=0, shuffle_buffer=1)
    batches = list(itertools.islice(iter(build_loader(cfg, batch_size=4, rank=0, world_size=1, seed=0)), 1))
    assert "A long generated caption." in batches[0]["captions"]

    with pytest.raises(FileExistsError):
        prep_shards(str(image_folder), str(out))
    again = prep_shards(str(image_folder), str(out), opts=PrepOptions(min_side=20, overwrite=True))
    assert again["written"] == 3 and again["reasons"]["too_small"] == 1
    assert sorted(os.listdir(out)) == ["000000.tar", "stats.json"]


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_manifest_source_with_laion_pop_columns(tmp_path, kind):
    images = tmp_path / "images"
    rows = []
    for i in range(5):
        _write(images / f"{i}.jpg", encode_image(_image(10 + i), "jpg"))
        rows.append({**LAION_POP, "key": f"{i:05d}", "image_path": f"images/{i}.jpg"})
    rows.append({**LAION_POP, "key": "gone", "image_path": "images/missing.jpg"})
    manifest = tmp_path / f"manifest.{kind}"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), manifest)
    else:
        lines = [json.dumps(r) for r in rows] + ["{not json"]
        manifest.write_text("\n".join(lines) + "\n")
    summary = prep_shards(str(manifest), str(tmp_path / "out"), opts=PrepOptions(samples_per_shard=2, workers=2))
    expected = {"missing_image": 1} if kind == "parquet" else {"missing_image": 1, "bad_json": 1}
    assert summary["written"] == 5 and summary["shards"] == 3 and summary["reasons"] == expected
    samples = _read_shards(str(tmp_path / "out"))
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["key"] for m in metas] == [f"{i:05d}" for i in range(5)]  # order kept with 2 workers
    assert all(m["alt_txt"] == "alt text" and m["aesthetic_score"] == 6.1 for m in metas)
    assert "image_path" not in metas[0]


def test_a_named_image_column_the_manifest_lacks_and_bad_sizes_are_one_line(tmp_path, capsys):
    """--image-column nosuch used to skip every row as missing_image and exit 0 with nothing written."""
    from scripts import prep_data

    _write(tmp_path / "images" / "0.jpg", encode_image(_image(10), "jpg"))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("{not json\n" + json.dumps({**LAION_POP, "image_path": "images/0.jpg"}) + "\n")
    base = ["--src", str(manifest), "--out", str(tmp_path / "out")]
    for extra, needle in ((["--image-column", "nosuch"], "--image-column nosuch is not a column of its first row"),
                          (["--samples-per-shard", "0"], "--samples-per-shard 0: must be at least 1"),
                          (["--workers", "0"], "--workers 0: must be at least 1"),
                          (["--min-side", "-5"], "--min-side -5: must be 0 or more"),
                          (["--max-aspect", "0"], "--max-aspect 0.0: a width/height ratio must be positive"),
                          (["--min-aspect", "2", "--max-aspect", "0.5"], "--min-aspect 2.0 is above --max-aspect")):
        assert prep_data.entry([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tar"))
    assert prep_data.entry([*base, "--image-column", "image_path"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 1
    # with --overwrite, a wrong column is found before the shards already there are replaced
    assert prep_data.entry([*base, "--overwrite", "--image-column", "nosuch"]) == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["000000.tar"]


def test_manifest_without_local_paths_points_to_img2dataset(tmp_path):
    manifest = tmp_path / "urls.jsonl"
    manifest.write_text(json.dumps(LAION_POP) + "\n")
    with pytest.raises(ValueError, match="img2dataset"):
        prep_shards(str(manifest), str(tmp_path / "out"))


def test_img2dataset_output_is_resharded_and_filtered(tmp_path):
    src = tmp_path / "img2dataset"
    src.mkdir()
    n = 0
    for shard in range(2):
        with wds.TarWriter(str(src / f"{shard:05d}.tar")) as writer:
            for i in range(4):
                key = f"{shard:05d}{i:04d}"
                size = (24, 30) if i == 3 else (40, 56)  # one small image per shard
                data = encode_image(_image(20 + n, *size), "jpg")
                if shard == 1 and i == 0:
                    data = data[:100]  # a broken download
                meta = {"key": key, "status": "success", "caption": "alt", "cogvlm_caption": f"gen {key}"}
                writer.write({"__key__": key, "jpg": data, "txt": b"alt", "json": json.dumps(meta).encode()})
                n += 1
        (src / f"{shard:05d}.parquet").write_bytes(b"stats written by img2dataset, ignored")
    (src / "00002.tar").write_bytes(b"not a tar archive" * 64)  # a shard that cannot be read: counted, not fatal
    summary = prep_shards(str(src), str(tmp_path / "out"), opts=PrepOptions(samples_per_shard=3, min_side=32))
    assert summary["reasons"] == {"bad_image": 1, "too_small": 2, "tar_error": 1} and summary["skipped"] == 4
    assert summary["written"] == 5 and summary["shards"] == 2
    metas = [json.loads(s["json"]) for s in _read_shards(str(tmp_path / "out"))]
    assert [m["cogvlm_caption"] for m in metas] == [
        "gen 000000000",
        "gen 000000001",
        "gen 000000002",
        "gen 000010001",
        "gen 000010002",
    ]
    # into the source folder itself: with --overwrite its shards were deleted before they were read
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(ValueError, match="is the source folder"):
        prep_shards(str(src), str(src), opts=PrepOptions(overwrite=True))
    assert sorted(p.name for p in src.iterdir()) == before
    # into a folder inside it: its new shards would be read back as source shards (and a resume never matched)
    with pytest.raises(ValueError, match="is inside the source folder"):
        prep_shards(str(src), str(src / "out"))
    assert sorted(p.name for p in src.iterdir()) == before


def test_a_prep_that_keeps_nothing_or_ignores_a_flag_fails(image_folder, tmp_path, capsys):
    """Every record skipped (a filter too strict) ended with exit code 0 and a folder holding no shard; the manifest
    flags on a folder source did nothing."""
    out = str(tmp_path / "out")
    assert prep_data.entry(["--src", str(image_folder), "--out", out, "--min-side", "4096"]) == 2
    captured = capsys.readouterr()
    assert _last_json_line(captured.out)["written"] == 0 and "skipped 5 too_small" in captured.out
    assert captured.err.strip().splitlines()[-1] == f"error: none of the 10 source records was kept (reasons above): " \
                                                     f"{out} holds no shard"
    for flag in ("--image-column", "--image-root"):
        with pytest.raises(SystemExit) as info:
            prep_data.main(["--src", str(image_folder), "--out", str(tmp_path / "o2"), flag, "x"])
        assert info.value.code == 2 and "is a folder source" in capsys.readouterr().err


def test_demo_data_is_reproducible_and_loads(tmp_path, capsys):
    out = tmp_path / "demo"
    make_demo_data.main(["--out", str(out)])
    summary = _last_json_line(capsys.readouterr().out)
    assert summary == {"written": 12, "skipped": 0, "shards": 4, "out": str(out), "reasons": {}}
    digest = {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in sorted(os.listdir(out))}
    make_demo_data.main(["--out", str(out)])
    assert digest == {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in sorted(os.listdir(out))}

    for image in DEMO_IMAGES:
        assert 40 <= len(image.caption.split()) <= 80, image.name
    cfg = DataConfig(shards=str(out), resolution=64, num_workers=2, shuffle_buffer=8, buckets=False)
    loader = build_loader(cfg, batch_size=4, rank=0, world_size=1, seed=0)
    batches = list(itertools.islice(iter(loader), 4))  # 2 per worker: each worker's 6 demo images + 2
    keys = [k for b in batches for k, e in zip(b["keys"], b["epoch"].tolist(), strict=True) if e == 0]
    assert sorted(keys) == [f"demo{i:09d}" for i in range(12)] and loader.skip_counts() == {}
    captions = {c for b in batches for c in b["captions"]}
    assert captions == {image.caption for image in DEMO_IMAGES}


@pytest.mark.parametrize("content", ["empty tar", b"not a tar archive" * 64])
def test_demo_data_never_replaces_an_empty_or_unreadable_shard(tmp_path, content):
    import tarfile

    from data.demo import build_demo_shards, foreign_shard

    shard = tmp_path / "000000.tar"
    if content == "empty tar":
        tarfile.open(shard, "w").close()
    else:
        shard.write_bytes(content)
    before = shard.read_bytes()
    assert foreign_shard(str(tmp_path)) == str(shard)
    with pytest.raises(FileExistsError):
        build_demo_shards(str(tmp_path))
    assert shard.read_bytes() == before


def test_demo_data_never_replaces_shards_it_did_not_write(tmp_path, image_folder, capsys):
    """It rebuilt its folder with --overwrite: a user's own shards there were deleted without a word."""
    mine = tmp_path / "mine"
    prep_shards(str(image_folder), str(mine))
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    with pytest.raises(SystemExit) as info:
        make_demo_data.main(["--out", str(mine)])
    assert info.value.code == 2 and "holds shards the demo did not write (e.g. 000000.tar)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before


def test_a_phone_mpo_photo_keeps_its_bytes_and_its_rotation(tmp_path):
    """Many phone JPEGs open as MPO (extra frames). They were re-encoded as PNG without their EXIF, so a photo
    taken upright trained sideways while its json gave the upright size; now their bytes are kept, as a JPEG's."""
    import random

    from data.decode import RawDecoder

    pixels = _image(9, 40, 64)  # stored landscape, shown portrait (EXIF orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="MPO", save_all=True, append_images=[Image.fromarray(pixels)],
                                 exif=exif.tobytes(), quality=95)
    src = tmp_path / "src"
    _write(src / "phone.jpg", buffer.getvalue())
    _write(src / "phone.txt", "a photo taken upright")
    assert Image.open(src / "phone.jpg").format == "MPO"
    summary = prep_shards(str(src), str(tmp_path / "out"))
    assert summary["written"] == 1
    (sample,) = _read_shards(str(tmp_path / "out"))
    assert sample["jpg"] == buffer.getvalue() and "png" not in sample
    meta = json.loads(sample["json"])
    ex = RawDecoder(DataConfig(shards="x", resolution=32, random_crop=False))(sample, random.Random(0))
    assert ex.original_size == (meta["height"], meta["width"]) == (64, 40)  # upright, as the json says


def test_a_rotated_tiff_is_measured_upright_once(tmp_path):
    """Pillow reports a TIFF's size already turned by its EXIF orientation, and prep turned it again: a portrait
    scan was recorded as landscape and dropped by --max-aspect 1."""
    import random

    from data.decode import RawDecoder

    pixels = _image(9, 40, 64)  # stored landscape, shown portrait (EXIF orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(pixels).save(src / "scan.tif", exif=exif.tobytes())
    _write(src / "scan.txt", "a portrait scan")
    summary = prep_shards(str(src), str(tmp_path / "out"), opts=PrepOptions(max_aspect=1.0))
    assert summary["written"] == 1, summary
    (sample,) = _read_shards(str(tmp_path / "out"))
    meta = json.loads(sample["json"])
    ex = RawDecoder(DataConfig(shards="x", resolution=32, random_crop=False))(sample, random.Random(0))
    assert ex.original_size == (meta["height"], meta["width"]) == (64, 40)


def test_a_shard_is_named_for_training_only_once_it_is_whole(tmp_path):
    """Shards were written under their final names, so a killed `make data` left a truncated NNNNNN.tar that
    training read (and skipped from the damage on). The one being written is NNNNNN.tar.partial; the next run
    removes it and the previous stats.json."""
    from data.prep import folder_records, write_shards

    src = tmp_path / "src"
    for i in range(5):
        _write(src / f"{i}.png", encode_image(_image(30 + i), "png"))
        _write(src / f"{i}.txt", f"caption {i}")
    out = tmp_path / "out"
    seen = []

    def records():
        for n, record in enumerate(folder_records(str(src))):
            if n == 3:  # 3 written: shard 0 whole (2 samples), shard 1 half-written
                seen.append(sorted(p.name for p in out.iterdir()))
            yield record

    summary = write_shards(records(), str(out), PrepOptions(samples_per_shard=2))
    assert seen == [["000000.tar", "000001.tar.partial", "prep_progress.json"]]
    assert summary["written"] == 5 and sorted(p.name for p in out.iterdir()) == [
        "000000.tar", "000001.tar", "000002.tar", "stats.json"]
    (out / "000003.tar.partial").write_bytes(b"a killed run's")
    write_shards(iter([]), str(out), PrepOptions(overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["stats.json"]
    assert json.loads((out / "stats.json").read_text())["written"] == 0


def test_a_killed_prep_resumes_into_the_shards_an_uninterrupted_one_writes(tmp_path, monkeypatch, caplog):
    """`make data` over 500K images takes hours. Killed after two whole shards (record 6 of 7 being checked, the
    third shard half written), the same command resumes: it keeps the whole shards, checks only the records after
    them, and ends with byte-identical shards and the same counts as a run that was never stopped. A changed option
    is refused rather than mixed in, and a finished folder is not resumed."""
    import logging

    from data import prep

    src = tmp_path / "src"
    for i in range(7):
        data = encode_image(_image(i), "png")
        _write(src / f"{i}.png", data[: len(data) // 3] if i == 2 else data)  # 2: truncated, skipped
        _write(src / f"{i}.txt", f"caption {i}")
    opts = dict(samples_per_shard=2, min_side=8)
    full = prep_shards(str(src), str(tmp_path / "full"), opts=PrepOptions(**opts))
    assert (full["written"], full["shards"], full["reasons"]) == (6, 3, {"bad_image": 1})

    checked, real_check = [], prep.check_record

    def killed_at_6(record, o):
        if record.name == "6.png":
            raise KeyboardInterrupt  # as Ctrl-C or a kill would stop it mid-shard
        checked.append(record.name)
        return real_check(record, o)

    out = tmp_path / "out"
    monkeypatch.setattr(prep, "check_record", killed_at_6)
    with pytest.raises(KeyboardInterrupt):
        prep_shards(str(src), str(out), opts=PrepOptions(**opts))
    assert sorted(p.name for p in out.iterdir()) == [
        "000000.tar", "000001.tar", "000002.tar.partial", "prep_progress.json"]  # no stats.json: not finished
    with pytest.raises(FileExistsError, match="min_side"):  # other options: not resumed into these shards
        prep_shards(str(src), str(out), opts=PrepOptions(samples_per_shard=2, min_side=9))
    _write(src / "3b.png", encode_image(_image(9), "png"))  # an image added: the records after it shift
    with pytest.raises(FileExistsError, match="source"):
        prep_shards(str(src), str(out), opts=PrepOptions(**opts))
    os.remove(src / "3b.png")
    _write(src / "1.json", '{"caption": "a caption given since"}')  # a sidecar added: record 1 would change
    with pytest.raises(FileExistsError, match="source"):
        prep_shards(str(src), str(out), opts=PrepOptions(**opts))
    os.remove(src / "1.json")

    checked.clear()
    monkeypatch.setattr(prep, "check_record", lambda record, o: checked.append(record.name) or real_check(record, o))
    caplog.set_level(logging.INFO, logger="data.prep")
    resumed = prep_shards(str(src), str(out), opts=PrepOptions(**opts))
    assert checked == ["5.png", "6.png"]  # records 0-4 went into the two whole shards (or were skipped before)
    assert "resuming the unfinished prep" in caplog.text and "2 whole shard(s), 4 samples kept" in caplog.text
    assert {k: v for k, v in resumed.items() if k != "out"} == {k: v for k, v in full.items() if k != "out"}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())
    for name in ("000000.tar", "000001.tar", "000002.tar"):
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    with pytest.raises(FileExistsError, match="already holds 3 shards"):  # finished: a rerun needs --overwrite
        prep_shards(str(src), str(out), opts=PrepOptions(**opts))


def test_a_prep_stopped_as_its_first_shard_is_named_resumes(tmp_path, monkeypatch):
    """The progress file was first written after the first shard's rename: a stop between the two left 000000.tar
    without it, and the same command then refused the folder as another prep's. It is now written before any shard."""
    from data import prep

    src = tmp_path / "src"
    for i in range(5):
        _write(src / f"{i}.png", encode_image(_image(i), "png"))
        _write(src / f"{i}.txt", f"caption {i}")
    full = prep_shards(str(src), str(tmp_path / "full"), opts=PrepOptions(samples_per_shard=2))
    real_write, calls = prep.write_text_atomic, []

    def stopped_at_the_first_shards_progress(path, text):
        calls.append(json.loads(text)["shards"])
        if calls[-1] == 1:
            raise KeyboardInterrupt  # 000000.tar renamed, its progress not yet written
        real_write(path, text)

    out = tmp_path / "out"
    monkeypatch.setattr(prep, "write_text_atomic", stopped_at_the_first_shards_progress)
    with pytest.raises(KeyboardInterrupt):
        prep_shards(str(src), str(out), opts=PrepOptions(samples_per_shard=2))
    assert "000000.tar" in os.listdir(out)
    monkeypatch.setattr(prep, "write_text_atomic", real_write)
    resumed = prep_shards(str(src), str(out), opts=PrepOptions(samples_per_shard=2))
    assert {k: v for k, v in resumed.items() if k != "out"} == {k: v for k, v in full.items() if k != "out"}
    for name in ("000000.tar", "000001.tar", "000002.tar"):
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def test_an_edited_caption_sidecar_is_a_changed_source(tmp_path, monkeypatch):
    """An existing .txt edited since the stop (same size: only its time tells) would reach only the records after
    the stop; a sibling OUT whose name starts like SRC's is not inside it."""
    from data import prep

    src = tmp_path / "src"
    for i in range(5):
        _write(src / f"{i}.png", encode_image(_image(i), "png"))
        _write(src / f"{i}.txt", f"caption {i}")
    real_write, calls = prep.write_text_atomic, []

    def stopped_after_the_first_shard(path, text):
        calls.append(1)
        real_write(path, text)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep, "write_text_atomic", stopped_after_the_first_shard)
    out = tmp_path / "src_shards"  # beside src, named like it
    with pytest.raises(KeyboardInterrupt):
        prep_shards(str(src), str(out), opts=PrepOptions(samples_per_shard=2))
    monkeypatch.setattr(prep, "write_text_atomic", real_write)
    before = os.stat(src / "1.txt").st_mtime_ns
    _write(src / "1.txt", "caption X")  # as long as "caption 1"
    os.utime(src / "1.txt", ns=(before + 10**9, before + 10**9))
    with pytest.raises(FileExistsError, match="source"):
        prep_shards(str(src), str(out), opts=PrepOptions(samples_per_shard=2))


def test_shards_into_a_folder_named_like_a_pattern_are_found(tmp_path):
    """`out[1]` was read as a glob: a second prep without --overwrite found no shards there and replaced some of
    the first one's, leaving the rest to be trained on; the loader found no shard in such a folder."""
    src = tmp_path / "src"
    for i in range(4):
        _write(src / f"{i}.png", encode_image(_image(i), "png"))
        _write(src / f"{i}.txt", f"caption {i}")
    out = tmp_path / "out[1]"
    assert prep_shards(str(src), str(out), opts=PrepOptions(samples_per_shard=1))["shards"] == 4
    with pytest.raises(FileExistsError, match="already holds 4 shards"):
        prep_shards(str(src), str(out), opts=PrepOptions(samples_per_shard=2))
    assert expand_shards(str(out)) == [str(out / f"{i:06d}.tar") for i in range(4)]
    assert expand_shards(str(out / "000002.tar")) == [str(out / "000002.tar")]
    # a folder source's shards inside it (or in it) would make it an img2dataset source: the next run could not resume
    for inside in (src / "shards", src):
        with pytest.raises(ValueError, match="source folder"):
            prep_shards(str(src), str(inside))
    assert not (src / "shards").exists()


def _interrupted_in_worker(record, opts):
    """Ctrl-C at record 5, as a terminal sends it to the whole process group: to the parent and to this worker."""
    import signal

    from data.prep import check_record

    if record.name == "5.png":
        os.kill(os.getppid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # before the fix: KeyboardInterrupt here, and the worker died
    return check_record(record, opts)


def _interrupted_star(args):
    return _interrupted_in_worker(*args)


def test_ctrl_c_with_several_workers_ends_the_prep_and_it_resumes(tmp_path, monkeypatch):
    """Ctrl-C reaches every worker too: a worker died holding its task, and the prep waited for it forever (a second
    Ctrl-C needed). Workers now ignore it and the parent ends them: the prep stops at once, and the same command
    resumes into the uninterrupted run's shards."""
    import signal

    from data import prep

    src = tmp_path / "src"
    for i in range(12):
        _write(src / f"{i}.png", encode_image(_image(i), "png"))
        _write(src / f"{i}.txt", f"caption {i}")
    opts = dict(samples_per_shard=2, workers=2)
    full = prep_shards(str(src), str(tmp_path / "full"), opts=PrepOptions(**opts))

    def hung(signum, frame):
        raise TimeoutError("the interrupted prep is still waiting for its workers")

    monkeypatch.setattr(prep, "_check_star", _interrupted_star)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with pytest.raises(KeyboardInterrupt):
            prep_shards(str(src), str(tmp_path / "out"), opts=PrepOptions(**opts))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not (tmp_path / "out" / "stats.json").exists()
    monkeypatch.undo()
    resumed = prep_shards(str(src), str(tmp_path / "out"), opts=PrepOptions(**opts))
    assert {k: v for k, v in resumed.items() if k != "out"} == {k: v for k, v in full.items() if k != "out"}
    for name in sorted(p.name for p in (tmp_path / "full").glob("*.tar")):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def test_the_report_counts_kept_samples_that_training_finds_no_caption_in(tmp_path, capsys):
    """prep keeps a sample whose only caption is an alt text (any caption field will do); training's default
    data.caption_fields skip it as no_caption. The report says how many there are and what to set."""
    src = tmp_path / "src"
    _write(src / "a.png", encode_image(_image(1), "png"))
    _write(src / "a.json", json.dumps({"alt_txt": "an alt text only"}))
    _write(src / "b.png", encode_image(_image(2), "png"))
    _write(src / "b.json", json.dumps(LAION_POP))
    _write(src / "c.png", encode_image(_image(3), "png"))
    _write(src / "c.txt", "a txt sidecar")
    assert prep_data.entry(["--src", str(src), "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert _last_json_line("\n".join(lines))["written"] == 3
    (note,) = [ln for ln in lines if ln.startswith("note:")]
    assert note.startswith("note: 1 of the 3 kept samples have no caption in training's default data.caption_fields")
    assert "data.syncap=true" in note
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["without_default_caption"] == 1


def test_text_and_shards_are_flushed_before_their_rename(tmp_path, monkeypatch):
    """write_text_atomic (prep's progress file, latents.json) and replace_durably (each finished shard): the data
    reaches the disk before the name, and the name after the rename."""
    from distill.files import replace_durably, write_text_atomic

    events = record_file_ops(monkeypatch)
    target = tmp_path / "progress.json"
    write_text_atomic(target, "{}")
    (tmp_path / "000000.tar.partial").write_bytes(b"x" * 10)
    replace_durably(tmp_path / "000000.tar.partial", tmp_path / "000000.tar")
    partial = f"{target}.partial-{os.getpid()}"
    assert events == [("fsync", partial), ("replace", partial, str(target)), ("fsync", str(tmp_path)),
                      ("fsync", f"{tmp_path}/000000.tar.partial"),
                      ("replace", f"{tmp_path}/000000.tar.partial", f"{tmp_path}/000000.tar"),
                      ("fsync", str(tmp_path))]
    assert target.read_text() == "{}" and (tmp_path / "000000.tar").read_bytes() == b"x" * 10


def test_ending_the_pool_after_an_interrupt_never_waits_forever():
    """CPython's Pool.terminate can hang on its result queue's lock when a worker was killed while sending: the prep
    gives it a few seconds, kills any worker still alive, and goes on (the Ctrl-C test above met it under load)."""
    import multiprocessing
    import threading
    import time

    from data.prep import _end_pool

    class StuckPool:  # terminate() blocks for good, as the real one did
        def __init__(self):
            self._pool = [multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))]
            self._pool[0].start()
            self.joined = False

        def terminate(self):
            threading.Event().wait()

        def join(self):
            self.joined = True

    pool = StuckPool()
    started = time.monotonic()
    _end_pool(pool, finished=False, wait_s=0.5)
    assert time.monotonic() - started < 5
    pool._pool[0].join(5)
    assert pool._pool[0].exitcode is not None and not pool.joined  # killed; the stuck pool is not joined


@pytest.mark.parametrize("opts, kept, reasons", [
    (dict(min_side=40), {"wide", "tall", "square"}, {}),  # at the limit: kept
    (dict(min_side=41), {"square"}, {"too_small": 2}),
    (dict(max_aspect=1.0), {"tall", "square"}, {"bad_aspect": 1}),  # width / height
    (dict(min_aspect=1.0), {"wide", "square"}, {"bad_aspect": 1}),
    (dict(max_pixels=2300), {"wide", "tall"}, {"too_many_pixels": 1}),  # 40 x 56 = 2240, 48 x 48 = 2304
])
def test_each_filter_keeps_and_skips_the_images_it_names(tmp_path, opts, kept, reasons):
    src = tmp_path / "src"
    for name, (h, w) in {"wide": (40, 56), "tall": (56, 40), "square": (48, 48)}.items():
        _write(src / f"{name}.png", encode_image(_image(len(name), h, w), "png"))
        _write(src / f"{name}.txt", f"a {name} image")
    summary = prep_shards(str(src), str(tmp_path / "out"), opts=PrepOptions(**opts))
    captions = {s["txt"].decode().split()[1] for s in _read_shards(str(tmp_path / "out"))}
    assert captions == kept and summary["written"] == len(kept)
    assert summary["reasons"] == reasons and summary["skipped"] == sum(reasons.values())


def test_the_report_names_a_few_examples_of_each_skip_reason(tmp_path):
    src = tmp_path / "src"
    for i in range(7):  # seven images without a caption, one with
        _write(src / f"n{i}.png", encode_image(_image(i), "png"))
    _write(src / "ok.png", encode_image(_image(9), "png"))
    _write(src / "ok.txt", "a caption")
    summary = prep_shards(str(src), str(tmp_path / "out"))
    assert summary["written"] == 1 and summary["reasons"] == {"no_caption": 7}
    assert summary["examples"] == {"no_caption": [f"n{i}.png" for i in range(5)]}  # the first five, not all
    assert report_lines(summary)[0] == "skipped 7 no_caption: e.g. n0.png, n1.png, n2.png, n3.png, n4.png"
