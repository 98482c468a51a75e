"""Build webdataset shards from (a) a folder of images with sidecar captions, (b) a parquet / jsonl manifest
with local image paths and caption columns, or (c) an img2dataset output folder (re-shard and filter).

Every readable image is kept by default; size filters are options. A shard sample is
{key}.{jpg|png|webp} (the original bytes; other formats are re-encoded as PNG) + {key}.json (the caption
fields and metadata of the source, plus the image's "width"/"height" in px and its "source") + {key}.txt
(the sidecar caption, when there is one). Keys are the running sample number, 9 digits, after `key_prefix`.
"""

from __future__ import annotations

import glob
import io
import json
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import webdataset as wds

from data.captions import SkipSample, decode_json, decode_text, first_field
from data.images import IMAGE_EXTENSIONS, open_image, oriented_size, to_rgb

# Image files a folder source may hold; all but jpg/png/webp are re-encoded as PNG.
READABLE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# PIL format -> shard extension for bytes that are kept as they are.
# MPO: the JPEG with extra frames that many phone cameras write; its first frame and EXIF read as a JPEG's.
_KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
# PNG stores these modes losslessly; others are converted to RGB before re-encoding.
_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")
# Manifest columns tried, in order, when no image column is given.
IMAGE_COLUMNS = ("image_path", "path", "filepath", "file_path", "local_path", "file", "filename", "image")
# Fields that count as a caption when checking that a sample has one (any of them, or the txt sidecar).
CAPTION_FIELDS = ["cogvlm_caption", "llava_caption", "caption", "alt_txt", "alt_text", "text", "txt"]
# Reasons listed with up to this many example names in the report.
_EXAMPLES_PER_REASON = 5
# No pixel limit: PIL's decompression-bomb guard (about 179 MP) still applies and counts as too_many_pixels.
_NO_PIXEL_LIMIT = 1 << 62
# A JPEG is checked for truncation at 1/8 scale: every entropy-coded block is still read.
_CHECK_DRAFT_SCALE = 8


@dataclass
class PrepOptions:
    """Filters and layout for `prep_shards`. Sizes in px; 0 / None switch a filter off."""

    samples_per_shard: int = 1000
    min_side: int = 0  # shorter side of the (EXIF-oriented) image
    min_aspect: float | None = None  # width / height
    max_aspect: float | None = None
    max_pixels: int | None = None  # width x height
    # A sample needs one non-empty field among these (json keys, or "txt" for the sidecar).
    caption_fields: list[str] = field(default_factory=lambda: list(CAPTION_FIELDS))
    image_column: str | None = None  # manifest column with the image path (auto-detected when None)
    image_root: str | None = None  # base folder of relative manifest paths (default: the manifest's folder)
    key_prefix: str = ""  # prepended to the sample keys, e.g. to merge several outputs; no dots or slashes
    workers: int = 1  # processes that read and check images
    overwrite: bool = False  # replace existing *.tar in the output folder

    def __post_init__(self) -> None:
        for name in ("samples_per_shard", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        for name in ("min_side", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be 0 or more")
        for name in ("min_aspect", "max_aspect"):  # width / height: 0 would keep no image (max) or mean nothing
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} {value}: a width/height ratio must be positive")
        if self.min_aspect and self.max_aspect and self.min_aspect > self.max_aspect:
            raise ValueError(f"--min-aspect {self.min_aspect} is above --max-aspect {self.max_aspect}: no image "
                             "could pass")


@dataclass
class SourceRecord:
    """One candidate sample: an image (a path or bytes), its json metadata and its txt caption."""

    name: str  # shown in the skip report
    image_path: str | None = None
    image_bytes: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    txt: str | None = None
    skip: str | None = None  # a reason already known while reading the source (bad sidecar json, ...)


def _read_sidecars(stem: str) -> tuple[dict[str, Any], str | None]:
    meta: dict[str, Any] = {}
    txt = None
    if os.path.exists(stem + ".json"):
        with open(stem + ".json", "rb") as f:
            meta = decode_json(f.read()) or {}
    if os.path.exists(stem + ".txt"):
        with open(stem + ".txt", "rb") as f:
            txt = decode_text(f.read())
    return meta, txt


def folder_records(root: str) -> Iterator[SourceRecord]:
    """Images under `root` (recursive, sorted) with their `<stem>.txt` / `<stem>.json` sidecars."""
    paths = sorted(
        os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.lower().endswith(READABLE_EXTENSIONS)
    )
    for path in paths:
        name = os.path.relpath(path, root)
        try:
            meta, txt = _read_sidecars(os.path.splitext(path)[0])
        except SkipSample as skip:
            yield SourceRecord(name, skip=skip.reason)
            continue
        yield SourceRecord(name, image_path=path, meta=meta, txt=txt)


def _manifest_rows(path: str) -> Iterator[dict[str, Any] | str]:
    """Rows of a parquet or jsonl manifest; a malformed jsonl line yields the skip reason instead."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # optional dependency (pip install .[data])

        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
        return
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield decode_json(line) or {}
            except SkipSample as skip:
                yield skip.reason


def manifest_image_column(path: str, image_column: str | None = None) -> str:
    """The manifest's image-path column: `image_column` when its first row has it, else the first of IMAGE_COLUMNS
    there. Raises ValueError (one line) otherwise; read before any shard is written or replaced."""
    row = next((r for r in _manifest_rows(path) if isinstance(r, dict)), None)
    if row is None:
        raise ValueError(f"{path}: no readable row")
    if image_column is not None:
        if image_column not in row:
            raise ValueError(f"{path}: --image-column {image_column} is not a column of its first row "
                             f"(columns: {', '.join(row)})")
        return image_column
    column = next((c for c in IMAGE_COLUMNS if c in row), None)
    if column is None:
        raise ValueError(
            f"{path}: no image path column (tried {', '.join(IMAGE_COLUMNS)}; columns: {', '.join(row)}); pass "
            "--image-column, or download URLs with img2dataset first and use --format img2dataset"
        )
    return column


def manifest_records(
    path: str, image_column: str | None = None, image_root: str | None = None
) -> Iterator[SourceRecord]:
    """Rows of a parquet / jsonl manifest as records; every column but the image path goes to the json. The image
    column is found (or checked) when this is called, not when the first record is read."""
    column = manifest_image_column(path, image_column)
    root = image_root or os.path.dirname(os.path.abspath(path))

    def records() -> Iterator[SourceRecord]:
        for number, row in enumerate(_manifest_rows(path)):
            name = f"{os.path.basename(path)}:{number}"
            if isinstance(row, str):
                yield SourceRecord(name, skip=row)
                continue
            image = row.get(column)
            meta = {k: v for k, v in row.items() if k != column}
            if not isinstance(image, str) or not image:
                yield SourceRecord(name, skip="missing_image")
                continue
            yield SourceRecord(image, image_path=os.path.join(root, image), meta=meta)

    return records()


def img2dataset_records(root: str, skips: Counter[str]) -> Iterator[SourceRecord]:
    """Samples of the *.tar shards of an img2dataset output folder (its "files" layout is a plain folder)."""
    tars = sorted(glob.glob(os.path.join(root, "**", "*.tar"), recursive=True))

    def on_error(exc: Exception) -> bool:
        skips["tar_error"] += 1
        return True

    for sample in wds.tarfile_samples([{"url": t} for t in tars], handler=on_error):
        name = f"{os.path.basename(sample.get('__url__', ''))}:{sample['__key__']}"
        try:
            meta = decode_json(sample.get("json")) or {}
            txt = decode_text(sample.get("txt"))
        except SkipSample as skip:
            yield SourceRecord(name, skip=skip.reason)
            continue
        data = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        if data is None:
            yield SourceRecord(name, skip="no_image")
            continue
        yield SourceRecord(name, image_bytes=data, meta=meta, txt=txt)


def detect_format(src: str) -> str:
    """'manifest' for a .parquet/.jsonl file, 'img2dataset' for a folder holding *.tar, else 'folder'."""
    if os.path.isfile(src):
        if src.endswith((".parquet", ".jsonl", ".json")):
            return "manifest"
        raise ValueError(f"{src}: a source file must be a .parquet or .jsonl manifest")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source {src} does not exist")
    if glob.glob(os.path.join(src, "**", "*.tar"), recursive=True):
        return "img2dataset"
    return "folder"


def check_record(record: SourceRecord, opts: PrepOptions) -> dict[str, Any] | tuple[str, str]:
    """The shard sample for a record (without its key), or (reason, name) when it is skipped."""
    try:
        if record.skip:
            raise SkipSample(record.skip)
        if first_field(record.meta, record.txt, opts.caption_fields) is None:
            raise SkipSample("no_caption")
        data = record.image_bytes
        if data is None:
            try:
                with open(record.image_path, "rb") as f:
                    data = f.read()
            except FileNotFoundError as exc:
                raise SkipSample("missing_image") from exc
            except OSError as exc:
                raise SkipSample("unreadable_file", str(exc)) from exc
        img = open_image(data, opts.max_pixels or _NO_PIXEL_LIMIT)
        height, width = oriented_size(img)
        if min(height, width) < opts.min_side:
            raise SkipSample("too_small")
        aspect = width / height
        if (opts.min_aspect is not None and aspect < opts.min_aspect) or (
            opts.max_aspect is not None and aspect > opts.max_aspect
        ):
            raise SkipSample("bad_aspect")
        ext = _KEPT_FORMATS.get(img.format or "")
        try:
            if ext == "jpg":
                width_px, height_px = img.size
                img.draft(None, (max(1, width_px // _CHECK_DRAFT_SCALE), max(1, height_px // _CHECK_DRAFT_SCALE)))
            img.load()
        except Exception as exc:
            raise SkipSample("bad_image", f"{type(exc).__name__}: {exc}") from exc
        if ext is None:  # a readable BMP/GIF/TIFF/...: store it as PNG
            if img.mode not in _PNG_MODES:
                img = to_rgb(img)
            buffer = io.BytesIO()
            img.save(buffer, format="PNG")
            data, ext = buffer.getvalue(), "png"
    except SkipSample as skip:
        return skip.reason, record.name
    meta = {**record.meta, "width": width, "height": height, "source": record.name}
    try:
        sample = {ext: data, "json": json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8")}
    except UnicodeEncodeError:  # a lone surrogate ("\ud83d" in a json source), which no UTF-8 file can hold
        return "bad_text", record.name
    if record.txt is not None:
        sample["txt"] = record.txt.encode("utf-8")
    return sample


def _check_star(args: tuple[SourceRecord, PrepOptions]) -> dict[str, Any] | tuple[str, str]:
    return check_record(*args)


class _LazyShardWriter:
    """wds.ShardWriter that opens its first shard only when the first sample arrives. Each shard is written as
    NNNNNN.tar.partial and renamed to NNNNNN.tar once closed: a killed prep leaves no truncated shard under a name
    that training reads."""

    def __init__(self, out: str, samples_per_shard: int):
        self.pattern = os.path.join(out, "%06d.tar" + _PARTIAL)
        self.samples_per_shard = samples_per_shard
        self.writer: wds.ShardWriter | None = None
        self.shards: list[str] = []

    def write(self, sample: dict[str, Any]) -> None:
        if self.writer is None:
            # mtime=0 makes the tar bytes reproducible (same input, same shards).
            self.writer = wds.ShardWriter(
                self.pattern, maxcount=self.samples_per_shard, maxsize=float("inf"), verbose=0, mtime=0,
                post=lambda fname: os.replace(fname, fname.removesuffix(_PARTIAL)),
            )
        self.writer.write(sample)
        final = self.writer.fname.removesuffix(_PARTIAL)
        if not self.shards or self.shards[-1] != final:
            self.shards.append(final)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


_PARTIAL = ".partial"  # suffix of a shard being written


def _prepare_out(out: str, overwrite: bool) -> None:
    os.makedirs(out, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(out, "*.tar")))
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {len(existing)} shards; pass --overwrite to replace them")
    # shards of an earlier run, a killed run's unfinished one, and its summary, which no longer describes the folder
    for path in [*existing, *glob.glob(os.path.join(out, "*.tar" + _PARTIAL)), os.path.join(out, "stats.json")]:
        if os.path.exists(path):
            os.remove(path)


def write_shards(
    records: Iterable[SourceRecord], out: str, opts: PrepOptions, skips: Counter[str] | None = None
) -> dict[str, Any]:
    """Check every record and write the good ones into shards of opts.samples_per_shard samples.

    Returns {"written", "skipped", "shards", "out", "reasons" (reason -> count), "examples" (reason ->
    names)} and writes the same summary to out/stats.json.
    """
    if opts.key_prefix and re.search(r"[./\\]", opts.key_prefix):
        raise ValueError(f"key prefix {opts.key_prefix!r} must not contain '.', '/' or '\\'")
    _prepare_out(out, opts.overwrite)
    skips = skips if skips is not None else Counter()
    examples: dict[str, list[str]] = {}
    writer = _LazyShardWriter(out, opts.samples_per_shard)
    written = 0
    jobs = ((record, opts) for record in records)
    pool = multiprocessing.get_context("fork").Pool(opts.workers) if opts.workers > 1 else None
    try:
        results = pool.imap(_check_star, jobs, chunksize=8) if pool else map(_check_star, jobs)
        for result in results:
            if isinstance(result, tuple):
                reason, name = result
                skips[reason] += 1
                names = examples.setdefault(reason, [])
                if len(names) < _EXAMPLES_PER_REASON:
                    names.append(name)
                continue
            writer.write({"__key__": f"{opts.key_prefix}{written:09d}", **result})
            written += 1
    finally:
        writer.close()
        if pool is not None:
            pool.close()
            pool.join()
    summary = {
        "written": written,
        "skipped": sum(skips.values()),
        "shards": len(writer.shards),
        "out": os.path.abspath(out),
        "reasons": dict(sorted(skips.items())),
        "examples": examples,
    }
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def prep_shards(src: str, out: str, fmt: str | None = None, opts: PrepOptions | None = None) -> dict[str, Any]:
    """Build shards in `out` from `src` ('folder' | 'manifest' | 'img2dataset', detected when None)."""
    opts = opts or PrepOptions()
    fmt = fmt or detect_format(src)
    if fmt == "img2dataset" and os.path.realpath(src) == os.path.realpath(out):
        raise ValueError(f"--out {out} is the source folder: its shards would be replaced (with --overwrite, deleted) "
                         "before they are read; write to another folder")
    skips: Counter[str] = Counter()
    if fmt == "folder":
        records: Iterable[SourceRecord] = folder_records(src)
    elif fmt == "manifest":
        records = manifest_records(src, opts.image_column, opts.image_root)
    elif fmt == "img2dataset":
        records = img2dataset_records(src, skips)
    else:
        raise ValueError(f"unknown source format {fmt!r}: folder, manifest or img2dataset")
    return write_shards(records, out, opts, skips)


def report_lines(summary: dict[str, Any]) -> list[str]:
    """Human-readable skip reasons, then the final JSON line {written, skipped, shards, out, reasons}."""
    lines = [
        f"skipped {count} {reason}: e.g. {', '.join(summary['examples'].get(reason, []))}"
        for reason, count in summary["reasons"].items()
    ]
    final = {k: summary[k] for k in ("written", "skipped", "shards", "out", "reasons")}
    return [*lines, json.dumps(final)]
