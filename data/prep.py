"""Build webdataset shards from (a) a folder of images with sidecar captions, (b) a parquet / jsonl manifest
with local image paths and caption columns, or (c) an img2dataset output folder (re-shard and filter).

Every readable image is kept by default; size filters are options. A shard sample is
{key}.{jpg|png|webp} (the original bytes; other formats are re-encoded as PNG) + {key}.json (the caption
fields and metadata of the source, plus the image's "width"/"height" in px and its "source") + {key}.txt
(the sidecar caption, when there is one). Keys are the running sample number, 9 digits, after `key_prefix`.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import webdataset as wds
from tqdm.auto import tqdm

from data.captions import SkipSample, decode_json, decode_text, first_field
from data.config import DataConfig
from data.images import IMAGE_EXTENSIONS, open_image, oriented_size, to_rgb
from distill.files import replace_durably, write_text_atomic

logger = logging.getLogger(__name__)

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
# Where training looks for a caption by default (data.caption_fields); prep's report counts kept samples without one.
_TRAINING_CAPTION_FIELDS = DataConfig().caption_fields
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
    tars = sorted(glob.glob(os.path.join(glob.escape(root), "**", "*.tar"), recursive=True))

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
    if glob.glob(os.path.join(glob.escape(src), "**", "*.tar"), recursive=True):
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


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _end_pool(pool: Any, finished: bool, wait_s: float = 5.0) -> None:
    """Close the pool after its last result; after an interrupt or an error, drop the queued tasks and end the
    workers. CPython's Pool.terminate kills the workers and then can wait forever for its result queue's lock, when
    a worker was killed while sending a result (seen once in a few Ctrl-Cs on a loaded machine), so the ending runs
    on a helper thread for at most `wait_s` seconds; a worker still alive after that is killed."""
    if finished:
        pool.close()
        pool.join()
        return
    import threading

    ender = threading.Thread(target=pool.terminate, name="prep-pool-terminate", daemon=True)
    ender.start()
    ender.join(wait_s)
    for proc in getattr(pool, "_pool", None) or []:  # the pool's worker processes (a private attribute)
        if proc.is_alive():
            proc.kill()
    if not ender.is_alive():
        pool.join()


def _check_star(args: tuple[SourceRecord, PrepOptions]) -> dict[str, Any] | tuple[str, str]:
    return check_record(*args)


class _ShardWriter:
    """Writes samples into shards of `samples_per_shard`, each as NNNNNN.tar.partial renamed to NNNNNN.tar once
    whole, so that a killed prep leaves no truncated shard under a name that training reads. A shard is opened only
    when its first sample arrives."""

    def __init__(self, out: str, samples_per_shard: int, first_shard: int = 0):
        self.out = out
        self.samples_per_shard = samples_per_shard
        self.next_index = first_shard
        self.stream: wds.TarWriter | None = None
        self.path = ""
        self.count = 0

    def write(self, sample: dict[str, Any]) -> bool:
        """Write one sample; True when it filled its shard (which is then closed and renamed)."""
        if self.stream is None:
            self.path = os.path.join(self.out, f"{self.next_index:06d}.tar")
            self.next_index += 1
            # mtime=0 makes the tar bytes reproducible (same input, same shards).
            self.stream = wds.TarWriter(self.path + _PARTIAL, mtime=0)
            self.count = 0
        self.stream.write(sample)
        self.count += 1
        if self.count < self.samples_per_shard:
            return False
        self.close()
        return True

    def close(self, keep_partial: bool = False) -> None:
        """Close the open shard: renamed to its final name, or left as .partial (an interrupted run's)."""
        if self.stream is None:
            return
        self.stream.close()
        self.stream = None
        if not keep_partial:
            replace_durably(self.path + _PARTIAL, self.path)


_PARTIAL = ".partial"  # suffix of a shard being written
PROGRESS_FILE = "prep_progress.json"  # an unfinished prep's state after its last whole shard (see write_shards)
_PROGRESS_COUNTS = ("consumed", "written", "shards")


def _prepare_out(out: str, overwrite: bool, made_with: dict[str, Any]) -> dict[str, Any] | None:
    """Empty `out` for a new prep, or, when it holds an unfinished prep of the same source and options, keep its
    whole shards and return its progress (to resume). Anything else already there is a FileExistsError unless
    `overwrite`."""
    os.makedirs(out, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(glob.escape(out), "*.tar")))  # a folder named [1] is no pattern
    progress_path = os.path.join(out, PROGRESS_FILE)
    partials = glob.glob(os.path.join(glob.escape(out), "*.tar" + _PARTIAL))
    if not overwrite and os.path.exists(progress_path) and not os.path.exists(os.path.join(out, "stats.json")):
        try:
            with open(progress_path) as f:
                progress = json.load(f)
            if not isinstance(progress, dict) or not all(isinstance(progress.get(k), int) for k in _PROGRESS_COUNTS):
                raise ValueError(f"not an object with the counts {', '.join(_PROGRESS_COUNTS)}")
        except (OSError, ValueError) as exc:
            raise FileExistsError(f"{out} holds an unfinished prep whose {PROGRESS_FILE} is unreadable ({exc}); pass "
                                  "--overwrite to start again") from exc
        if progress.get("made_with") != made_with:
            changed = sorted(k for k in {**made_with, **progress.get("made_with", {})}
                             if made_with.get(k) != progress.get("made_with", {}).get(k))
            raise FileExistsError(f"{out} holds an unfinished prep of another source or options ({', '.join(changed)} "
                                  "differ); run the same command to resume it, or pass --overwrite to start again")
        kept = {os.path.join(out, f"{i:06d}.tar") for i in range(progress["shards"])}
        missing = sorted(kept - set(existing))
        if missing:
            raise FileExistsError(f"{out}: the unfinished prep's shard {os.path.basename(missing[0])} is gone; pass "
                                  "--overwrite to start again")
        for path in [*partials, *sorted(set(existing) - kept)]:  # the shard being written when it stopped
            os.remove(path)
        return progress
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {len(existing)} shards; pass --overwrite to replace them")
    # shards of an earlier run, a killed run's unfinished one, and its summaries, which no longer describe the folder
    for path in [*existing, *partials, os.path.join(out, "stats.json"), progress_path]:
        if os.path.exists(path):
            os.remove(path)
    return None


def write_shards(
    records: Iterable[SourceRecord], out: str, opts: PrepOptions, skips: Counter[str] | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check every record and write the good ones into shards of opts.samples_per_shard samples.

    Returns {"written", "skipped", "shards", "out", "reasons" (reason -> count), "examples" (reason ->
    names)} and writes the same summary to out/stats.json.

    Resumable: after each whole shard, out/prep_progress.json records how many records were read, the samples
    written and the skip counts. A run into a folder holding an unfinished prep of the same `source` (a description
    of the input, e.g. its path and format) and options keeps its whole shards, skips the records they came from
    (without checking them again) and ends with the shards and summary an uninterrupted run would have written.
    `records` must then come in the same order as before. `skips` counts skips found while reading the source (not
    saved: the skipped records are read again on a resume, which counts them again).
    """
    if opts.key_prefix and re.search(r"[./\\]", opts.key_prefix):
        raise ValueError(f"key prefix {opts.key_prefix!r} must not contain '.', '/' or '\\'")
    made_with = {"source": source or {}, **{k: v for k, v in asdict(opts).items() if k not in ("workers", "overwrite")}}
    progress = _prepare_out(out, opts.overwrite, made_with)
    skips = skips if skips is not None else Counter()
    checked: Counter[str] = Counter(progress["reasons"] if progress else {})  # skips found by check_record
    # kept samples that training's default data.caption_fields find no caption in (an alt text alone, say)
    uncaptioned = progress.get("without_default_caption", 0) if progress else 0
    examples: dict[str, list[str]] = progress["examples"] if progress else {}
    consumed = progress["consumed"] if progress else 0  # records read (kept or skipped) up to the last whole shard
    written = progress["written"] if progress else 0
    first_shard = progress["shards"] if progress else 0
    if progress:
        logger.info("resuming the unfinished prep in %s: %d whole shard(s), %d samples kept; %d source records "
                    "already read are skipped", out, first_shard, written, consumed)
    records = iter(records)
    for _ in range(consumed):  # read again, not checked again; skips found while reading are counted
        if next(records, None) is None:
            break

    def save_progress(consumed: int, written: int, shards: int) -> None:
        write_text_atomic(os.path.join(out, PROGRESS_FILE), json.dumps({
            "made_with": made_with, "consumed": consumed, "written": written, "shards": shards,
            "reasons": dict(checked), "examples": examples, "without_default_caption": uncaptioned}, indent=1))

    if not progress:  # before the first shard is named: a stop right after that rename must still resume here
        save_progress(0, 0, 0)
    writer = _ShardWriter(out, opts.samples_per_shard, first_shard)
    jobs = ((record, opts) for record in records)
    # Workers ignore Ctrl-C (it reaches the whole process group): one that died of it could take its task, or the
    # result queue's lock, with it, and the pool would wait for them forever. The parent ends them instead.
    pool = (multiprocessing.get_context("fork").Pool(opts.workers, initializer=_ignore_sigint)
            if opts.workers > 1 else None)
    finished = False
    try:
        results = pool.imap(_check_star, jobs, chunksize=8) if pool else map(_check_star, jobs)
        # on a terminal: records read per second; logs get one line per whole shard instead
        bar = tqdm(results, desc="prep", unit=" records", initial=consumed, disable=None, dynamic_ncols=True)
        started, consumed_at_start = time.monotonic(), consumed
        for result in bar:
            consumed += 1
            if isinstance(result, tuple):
                reason, name = result
                checked[reason] += 1
                names = examples.setdefault(reason, [])
                if len(names) < _EXAMPLES_PER_REASON:
                    names.append(name)
                continue
            uncaptioned += not _has_training_caption(result)
            if writer.write({"__key__": f"{opts.key_prefix}{written:09d}", **result}):
                save_progress(consumed, written + 1, writer.next_index)
                rate = (consumed - consumed_at_start) / max(time.monotonic() - started, 1e-9)
                logger.info("%s whole: %d samples kept, %d skipped, %.1f records/s", os.path.basename(writer.path),
                            written + 1, sum(checked.values()) + sum(skips.values()), rate)
            written += 1
            bar.set_postfix(kept=written, skipped=sum(checked.values()) + sum(skips.values()), refresh=False)
        finished = True
    finally:
        writer.close(keep_partial=not finished)  # an interrupted shard stays .partial: a resume writes it again
        if pool is not None:
            _end_pool(pool, finished)
    reasons = checked + skips
    summary = {
        "written": written,
        "skipped": sum(reasons.values()),
        "shards": writer.next_index,
        "out": os.path.abspath(out),
        "reasons": dict(sorted(reasons.items())),
        "examples": examples,
        "without_default_caption": uncaptioned,
    }
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if os.path.exists(os.path.join(out, PROGRESS_FILE)):
        os.remove(os.path.join(out, PROGRESS_FILE))
    return summary


def prep_shards(src: str, out: str, fmt: str | None = None, opts: PrepOptions | None = None) -> dict[str, Any]:
    """Build shards in `out` from `src` ('folder' | 'manifest' | 'img2dataset', detected when None)."""
    opts = opts or PrepOptions()
    fmt = fmt or detect_format(src)
    if os.path.isdir(src) and os.path.realpath(src) == os.path.realpath(out):
        raise ValueError(f"--out {out} is the source folder: " + (
            "its shards would be replaced (with --overwrite, deleted) before they are read" if fmt == "img2dataset"
            else "the new shards would make it an img2dataset source the next run reads") + "; write to another folder")
    if os.path.isdir(src) and os.path.realpath(out).startswith(os.path.realpath(src) + os.sep):
        # img2dataset: the new shards would be read as source shards; a folder: they would turn the source into an
        # img2dataset one on the next run, so the same command could not resume
        raise ValueError(f"--out {out} is inside the source folder {src}: its new shards would be read back as "
                         "source; write outside it")
    skips: Counter[str] = Counter()
    if fmt == "folder":
        records: Iterable[SourceRecord] = folder_records(src)
    elif fmt == "manifest":
        records = manifest_records(src, opts.image_column, opts.image_root)
    elif fmt == "img2dataset":
        records = img2dataset_records(src, skips)
    else:
        raise ValueError(f"unknown source format {fmt!r}: folder, manifest or img2dataset")
    summary = write_shards(records, out, opts, skips, source=source_identity(src, fmt))
    if summary["written"] == 0 and summary["skipped"] == 0:
        os.remove(os.path.join(out, "stats.json"))  # nothing was read: the folder is left as empty as it was
        raise ValueError(f"--src {src} holds no {'images' if fmt == 'folder' else 'samples'}"
                         + (f" (looked for {', '.join(READABLE_EXTENSIONS)})" if fmt == "folder" else ""))
    return summary


def source_identity(src: str, fmt: str) -> dict[str, Any]:
    """What a resumed prep checks is unchanged in its source: the path and format, plus a manifest's size and
    modification time, or a digest of the sorted file names (and, for img2dataset tars, sizes) in a folder: a file
    added, removed or rewritten would change the order of the records, so the whole shards would no longer match."""
    identity: dict[str, Any] = {"src": os.path.abspath(src), "format": fmt}
    if os.path.isfile(src):
        stat = os.stat(src)
        identity.update(bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
        return identity
    digest, files = hashlib.sha256(), 0
    for d, _, names in sorted(os.walk(src)):
        for name in sorted(names):
            path = os.path.join(d, name)
            if fmt == "img2dataset" and name.endswith(".tar"):
                digest.update(f"{os.path.relpath(path, src)}\0{os.path.getsize(path)}\n".encode())
            elif fmt == "folder" and name.lower().endswith((*READABLE_EXTENSIONS, ".txt", ".json")):
                # caption sidecars too: one added or edited since the stop would reach only the records after it
                stat = os.stat(path)
                digest.update(f"{os.path.relpath(path, src)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            else:
                continue
            files += 1
    identity.update(files=files, names_sha256=digest.hexdigest())
    return identity


def _has_training_caption(sample: dict[str, Any]) -> bool:
    """Whether training's default data.caption_fields find a caption in a kept sample (json fields or txt)."""
    txt = sample["txt"].decode("utf-8") if "txt" in sample else None
    return first_field(json.loads(sample["json"]), txt, _TRAINING_CAPTION_FIELDS) is not None


def report_lines(summary: dict[str, Any]) -> list[str]:
    """Human-readable skip reasons and notes, then the final JSON line {written, skipped, shards, out, reasons}."""
    lines = [
        f"skipped {count} {reason}: e.g. {', '.join(summary['examples'].get(reason, []))}"
        for reason, count in summary["reasons"].items()
    ]
    if uncaptioned := summary.get("without_default_caption", 0):
        lines.append(f"note: {uncaptioned} of the {summary['written']} kept samples have no caption in training's "
                     f"default data.caption_fields ({', '.join(_TRAINING_CAPTION_FIELDS)}), e.g. an alt text "
                     "alone: training skips them as no_caption unless data.syncap=true or data.caption_fields names "
                     "their field (e.g. [cogvlm_caption,alt_txt])")
    final = {k: summary[k] for k in ("written", "skipped", "shards", "out", "reasons")}
    return [*lines, json.dumps(final)]
