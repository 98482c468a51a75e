"""The training stream: shards -> (rank, worker) readers -> shuffle -> decode -> batches, with exact resume.

Design (one process = one rank):
- Every reader (rank, worker) owns an infinite, deterministic stream of raw samples. Epoch e of a reader is a
  list of shards: in exact mode the global shard list shuffled with seed (seed, e), identical on all ranks,
  then dealt round-robin to the world_size x num_workers readers (every shard read once per epoch); in
  resampled mode shards drawn with replacement by the reader's own RNG (seed, rank, worker, e).
- An epoch is cut into groups of `shuffle_group_shards` shards. A group's shards are read interleaved at
  random and mixed through a shuffle buffer that is flushed at the group's end. A raw sample's position is
  (epoch, group, index in the shuffled group), a pure function of the seed and the data.
- Batches are made inside the DataLoader workers (one DataLoader item = one batch); each batch carries its
  reader's position: the position after its last raw sample, the samples still waiting in partly filled
  aspect buckets, and the reader's skip counters. The DataLoader asks workers round-robin, so batch i comes
  from worker i % num_workers.
- `Loader.state_dict()` keeps the last position of every reader and the batch count. On resume each reader
  regenerates its stream, skips to its position without decoding (re-reading at most one group) and refills
  its pending buckets; worker ids are rotated so the round-robin continues with the right reader. The batches
  that follow are exactly those an uninterrupted run would have produced.
"""

from __future__ import annotations

import copy
import functools
import glob
import hashlib
import itertools
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.captions import SkipSample
from data.config import DataConfig, to_data_config, validate_config
from data.decode import Decoder, Example, LatentShapes, latent_shapes, make_decoder

log = logging.getLogger(__name__)

STATE_VERSION = 1
# A reader that decodes nothing usable for this many epochs in a row raises instead of spinning forever.
MAX_EMPTY_EPOCHS = 10
# Unexpected decoder errors (bugs, not bad data) are logged with a traceback this many times per reader.
_MAX_LOGGED_ERRORS = 3
_GLOB_CHARS = "*?["

Position = tuple[int, int, int]  # (epoch, group, index of the raw sample in the shuffled group)


class NoUsableSamples(RuntimeError):
    """A reader decoded no usable sample in MAX_EMPTY_EPOCHS epochs in a row: every sample of its shards is
    skipped (corrupt, filtered out, misshapen). The message is one line naming the reader and its skip counts.

    Loader re-raises it with that line alone. Raised through a bare DataLoader with workers, torch re-raises it
    by calling the class with one string, its own "Caught ... in DataLoader worker process N" text with the
    worker's traceback (the reason the constructor takes a single message); one_line() recovers the line.
    """

    def __init__(self, message: str):
        super().__init__(message)


def one_line(exc: BaseException) -> str:
    """The one-line message of `exc`, also when torch re-raised it from a DataLoader worker with the worker's
    traceback folded into its text: there the line is the traceback's last "<module>.<Class>: <message>"."""
    text = str(exc).strip()
    if "\n" not in text:
        return text
    name = type(exc).__name__
    for line in reversed(text.splitlines()):
        head, sep, rest = line.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == name:
            return rest.strip()
    return text.splitlines()[-1].strip()


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into a list of URLs.

    `shards` is a string with sources joined by "::", or a list of sources. A source is a brace pattern, a
    local file, a directory (all its *.tar, sorted), a glob, or a `pipe:` / URL spec (brace-expanded only).
    Missing local files raise FileNotFoundError; an empty result raises ValueError.
    """
    sources = shards.split("::") if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for source in (s.strip() for s in sources):
        if not source:
            continue
        if source.startswith("pipe:") and not source.removeprefix("pipe:").strip():
            raise ValueError(f"{source!r} is a pipe: source without a command; give one that writes a shard to "
                             "stdout, e.g. 'pipe:curl -s https://host/{000..099}.tar'")
        if source.startswith("pipe:") or "://" in source:
            urls.extend(braceexpand.braceexpand(source))
        elif os.path.isdir(source):
            urls.extend(sorted(glob.glob(os.path.join(glob.escape(source), "*.tar"))))  # a folder named [1]: no pattern
        else:
            for path in braceexpand.braceexpand(source):
                # a file that exists is itself, even when its name holds a pattern character (shards[1]/000000.tar)
                pattern = any(c in path for c in _GLOB_CHARS) and not os.path.exists(path)
                urls.extend(sorted(glob.glob(path)) if pattern else [path])
    local = [u for u in urls if not (u.startswith("pipe:") or "://" in u)]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
    if not urls:
        raise ValueError(f"data.shards {shards!r} matches no shard")
    return urls


@dataclass(frozen=True)
class ReaderPlan:
    """The deterministic raw-sample stream of one reader, i.e. one (rank, worker) pair."""

    shards: tuple[str, ...]
    rank: int
    world_size: int
    worker: int  # logical worker id, 0..num_workers-1
    num_workers: int  # readers per rank (1 when the DataLoader has no worker processes)
    seed: int
    resampled: bool
    group_shards: int  # shards per shuffle group
    shuffle_buffer: int  # samples

    @property
    def num_readers(self) -> int:
        return self.world_size * self.num_workers

    @property
    def reader_index(self) -> int:
        return self.rank * self.num_workers + self.worker

    def rng(self, *parts: object) -> random.Random:
        """An RNG seeded by the run seed, this reader and `parts` (string seeds are hashed with SHA-512)."""
        return random.Random(":".join(str(p) for p in (self.seed, self.rank, self.worker, *parts)))

    def epoch_shards(self, epoch: int) -> list[str]:
        """The shards this reader reads in `epoch`, in order."""
        if self.resampled:
            rng = self.rng("resample", epoch)
            per_reader = max(1, math.ceil(len(self.shards) / self.num_readers))
            return [rng.choice(self.shards) for _ in range(per_reader)]
        order = list(self.shards)
        random.Random(f"{self.seed}:order:{epoch}").shuffle(order)  # same on every rank and worker
        return order[self.reader_index :: self.num_readers]

    def groups(self, epoch: int) -> list[list[str]]:
        """The epoch's shards cut into shuffle groups."""
        shards = self.epoch_shards(epoch)
        return [shards[i : i + self.group_shards] for i in range(0, len(shards), self.group_shards)]

    def raw_samples(
        self, epoch: int, group: int, on_error: Callable[[int, Exception], bool]
    ) -> Iterator[dict[str, Any]]:
        """The group's raw (undecoded) samples: its shards interleaved at random, through the shuffle buffer.

        `on_error(slot, exception) -> bool` handles tar-level errors in the group's shard number `slot`
        (unreadable shard, truncated tar, duplicate file names); True skips the bad part and goes on.
        """
        urls = self.groups(epoch)[group]
        streams = [
            iter(wds.tarfile_samples([{"url": url}], handler=functools.partial(on_error, slot)))
            for slot, url in enumerate(urls)
        ]
        mix = self.rng("mix", epoch, group)

        def interleaved() -> Iterator[dict[str, Any]]:
            live = list(streams)
            while live:
                i = mix.randrange(len(live))
                try:
                    yield next(live[i])
                except StopIteration:
                    live.pop(i)

        shuffle = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=self.rng("shuffle", epoch, group))
        return shuffle(interleaved())


class Batcher:
    """Fills one list per shape (aspect bucket) and returns a list when it reaches batch_size."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.buckets: dict[tuple[int, ...], list[tuple[Position, Example]]] = {}

    def add(self, position: Position, example: Example) -> list[tuple[Position, Example]] | None:
        """Add one example; return the full batch it completes, if any."""
        bucket = self.buckets.setdefault(example.shape_key, [])
        bucket.append((position, example))
        if len(bucket) < self.batch_size:
            return None
        del self.buckets[example.shape_key]
        return bucket

    def pending(self) -> list[list[int]]:
        """Positions of the examples waiting in partly filled buckets, in stream order."""
        return sorted(list(pos) for bucket in self.buckets.values() for pos, _ in bucket)


def collate(items: list[tuple[Position, Example]]) -> dict[str, Any]:
    """Stack examples into the batch dict the trainer reads (see build_loader)."""
    examples = [ex for _, ex in items]

    def pairs(name: str) -> torch.Tensor:
        return torch.tensor([getattr(ex, name) for ex in examples], dtype=torch.long)

    batch: dict[str, Any] = {
        "keys": [ex.key for ex in examples],
        "captions": [ex.caption for ex in examples],
        "original_size": pairs("original_size"),
        "crop_top_left": pairs("crop_top_left"),
        "target_size": pairs("target_size"),
        "flipped": torch.tensor([ex.flipped for ex in examples], dtype=torch.bool),
        "epoch": torch.tensor([pos[0] for pos, _ in items], dtype=torch.long),
    }
    if examples[0].pixels is not None:
        # HWC -> CHW in numpy while still uint8: twice as fast as permuting in torch before the float cast.
        height, width, channels = examples[0].pixels.shape
        chw = np.empty((len(examples), channels, height, width), dtype=np.uint8)
        for i, ex in enumerate(examples):
            chw[i] = ex.pixels.transpose(2, 0, 1)
        batch["pixel_values"] = torch.from_numpy(chw).float().div_(127.5).sub_(1.0)
    else:
        for name in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
            batch[name] = torch.from_numpy(np.stack([getattr(ex, name) for ex in examples]))
    return batch


def reader_batches(
    plan: ReaderPlan, decoder: Decoder, batch_size: int, start: dict[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """The infinite batch stream of one reader, starting after `start` (a position from a previous batch).

    Each batch has a "_position" entry: {"worker", "epoch", "group", "next" (raw samples of the group already
    used), "pending" (positions waiting in buckets), "skips" (this reader's cumulative skip counts),
    "tar_errors" (tar errors met so far in the group, per shard slot)}.
    """
    skips: Counter[str] = Counter((start or {}).get("skips", {}))
    logged_errors = 0
    # Tar errors per shard slot of the current group. A resumed group is read again from its start: a slot in
    # `seen_errors` was counted before the checkpoint and is not counted twice.
    group_errors: Counter[int] = Counter()
    seen_errors: Counter[int] = Counter({int(k): v for k, v in (start or {}).get("tar_errors", {}).items()})

    def on_tar_error(slot: int, exc: Exception) -> bool:
        # One count per damaged shard read (a truncated tar raises twice: in the member and in the header).
        group_errors[slot] += 1
        if group_errors[slot] == 1 and not seen_errors[slot]:
            skips["tar_error"] += 1
            log.warning("reader %d/%d: skipping a bad part of a shard: %s", plan.rank, plan.worker, exc)
        return True

    def decode(raw: dict[str, Any], pos: Position) -> Example | None:
        nonlocal logged_errors
        try:
            return decoder(raw, plan.rng("sample", *pos))
        except SkipSample as skip:
            skips[skip.reason] += 1
        except Exception:  # a bad sample must never kill the run; a decoder bug shows up in the log
            skips["decode_error"] += 1
            if logged_errors < _MAX_LOGGED_ERRORS:
                logged_errors += 1
                log.exception("reader %d/%d: unexpected error decoding %s", plan.rank, plan.worker, raw.get("__key__"))
        return None

    batcher = Batcher(batch_size)
    epoch, group, next_index = 0, 0, 0
    if start is not None:
        epoch, group, next_index = start["epoch"], start["group"], start["next"]
        _refill(plan, batcher, [tuple(p) for p in start.get("pending", [])], decode)

    empty_epochs = 0
    while True:
        used = next_index > 0 or group > 0  # a resumed epoch already produced something
        groups = plan.groups(epoch)
        for g in range(group, len(groups)):
            group_errors.clear()
            raw_stream = enumerate(plan.raw_samples(epoch, g, on_tar_error))
            for index, raw in itertools.islice(raw_stream, next_index, None):  # skipped ones are not decoded
                pos = (epoch, g, index)
                example = decode(raw, pos)
                if example is None:
                    continue
                used = True
                full = batcher.add(pos, example)
                if full is not None:
                    batch = collate(full)
                    batch["_position"] = {
                        "worker": plan.worker,
                        "epoch": epoch,
                        "group": g,
                        "next": index + 1,
                        "pending": batcher.pending(),
                        "skips": dict(skips),
                        "tar_errors": {str(k): v for k, v in group_errors.items()},
                    }
                    yield batch
            next_index = 0
            seen_errors.clear()
        group = 0
        epoch += 1
        empty_epochs = 0 if used else empty_epochs + 1
        if empty_epochs >= MAX_EMPTY_EPOCHS:
            raise NoUsableSamples(
                f"reader rank {plan.rank} worker {plan.worker} found no usable sample in {empty_epochs} "
                f"epochs in a row (skips so far: {dict(skips)}); check the shards and the filters"
            )


def _ignore_error(slot: int, exc: Exception) -> bool:
    return True


def _refill(plan: ReaderPlan, batcher: Batcher, pending: list[Position], decode: Any) -> None:
    """Decode the examples that were waiting in buckets at the checkpoint and put them back, in order.

    Their groups' tar errors were counted when the groups were first read, so they are ignored here.
    """
    by_group: dict[tuple[int, int], set[int]] = {}
    for epoch, group, index in pending:
        by_group.setdefault((epoch, group), set()).add(index)
    for (epoch, group), wanted in sorted(by_group.items()):
        last = max(wanted)
        for index, raw in enumerate(plan.raw_samples(epoch, group, _ignore_error)):
            if index in wanted:
                pos = (epoch, group, index)
                example = decode(raw, pos)
                if example is not None and batcher.add(pos, example) is not None:
                    raise ValueError("loader state does not fit this batch size: resume with the same one")
            if index >= last:
                break


class _ReaderDataset(IterableDataset):
    """One DataLoader item = one batch; worker w runs logical reader (w + offset) % num_readers."""

    def __init__(
        self,
        cfg: DataConfig,
        shards: list[str],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        offset: int,
        starts: dict[int, dict[str, Any]],
        shapes: LatentShapes | None = None,
    ):
        super().__init__()
        self.cfg, self.shards, self.batch_size = cfg, shards, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.offset, self.starts, self.shapes = offset, starts, shapes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        readers = max(1, self.cfg.num_workers)
        if info is not None:
            torch.set_num_threads(1)  # decoding is PIL work; torch threads would only compete for cores
        worker = ((info.id if info is not None else 0) + self.offset) % readers
        plan = ReaderPlan(
            shards=tuple(self.shards),
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=readers,
            seed=self.seed,
            resampled=self.cfg.resampled,
            group_shards=self.cfg.shuffle_group_shards,
            shuffle_buffer=self.cfg.shuffle_buffer,
        )
        decoder = make_decoder(self.cfg, self.shapes)
        yield from reader_batches(plan, decoder, self.batch_size, self.starts.get(worker))


class Loader:
    """Infinite batch iterator for one rank, with `state_dict()` for exact resume and `skip_counts()`.

    Iterating yields batches forever (epochs roll over). Iterating again after a break continues where the
    last consumed batch left off (workers are restarted).
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        state: dict[str, Any] | None = None,
    ):
        validate_config(cfg)
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size {batch_size} or rank {rank} of world_size {world_size}")
        self.cfg, self.batch_size, self.rank, self.world_size, self.seed = (
            cfg,
            batch_size,
            rank,
            world_size,
            seed,
        )
        self.shards = expand_shards(cfg.shards)
        self.num_readers = max(1, cfg.num_workers)
        readers = world_size * self.num_readers
        if not cfg.resampled and len(self.shards) < readers:
            raise ValueError(
                f"data.shards has {len(self.shards)} shards but {world_size} ranks x {self.num_readers} "
                f"workers = {readers} readers each need at least one: set data.resampled=true, use fewer "
                f"workers, or re-shard into >= {readers} shards (make data ... --samples-per-shard smaller)"
            )
        self._identity = stream_identity(cfg, shards=self.shards, batch_size=batch_size, rank=rank,
                                         world_size=world_size, seed=seed)
        # Read once here, so every reader (and a resumed one) skips the same misshapen latent samples.
        self.latent_shapes = latent_shapes(self.shards) if cfg.kind == "latents" else None
        self._batches = 0
        self._positions: dict[int, dict[str, Any]] = {}
        if state is not None:
            self._load_state(state)

    def _load_state(self, state: dict[str, Any]) -> None:
        mismatched = state_mismatch(state, self._identity)
        if mismatched:
            raise ValueError(f"loader state does not match this loader (saved, now): {mismatched}")
        self._batches = int(state["batches"])
        self._positions = {int(w): copy.deepcopy(p) for w, p in state["readers"].items()}

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able dict; build_loader(..., state=it) continues with the next batch."""
        return {
            **self._identity,
            "batches": self._batches,
            "readers": {str(w): copy.deepcopy(p) for w, p in sorted(self._positions.items())},
        }

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far (reason -> count), summed over this rank's readers, resumed runs included.

        Counts are as of each reader's last consumed batch.
        """
        total: Counter[str] = Counter()
        for position in self._positions.values():
            total.update(position.get("skips", {}))
        return dict(sorted(total.items()))

    @property
    def batches_consumed(self) -> int:
        """Batches this loader (and the runs it resumed) has yielded."""
        return self._batches

    def _dataloader(self) -> DataLoader:
        dataset = _ReaderDataset(
            self.cfg,
            self.shards,
            self.batch_size,
            self.rank,
            self.world_size,
            self.seed,
            offset=self._batches % self.num_readers,
            starts=copy.deepcopy(self._positions),
            shapes=self.latent_shapes,
        )
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=None,  # the workers batch
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches forever; NoUsableSamples (its one line, without a worker's traceback) when a reader has none."""
        try:
            for batch in self._dataloader():
                position = batch.pop("_position")
                self._positions[int(position["worker"])] = position
                self._batches += 1
                yield batch
        except NoUsableSamples as exc:
            raise NoUsableSamples(one_line(exc)) from None


def stream_identity(cfg: Any, *, shards: Sequence[str], batch_size: int, rank: int, world_size: int, seed: int
                    ) -> dict[str, Any]:
    """What a saved loader state must match for an exact resume: the layout (rank, processes, workers per rank,
    batch size) and the stream (seed, the shards' number and names in order, shuffle buffer and group, resampling,
    kind). A saved position is an index into the stream these fix: with any of them changed it would name other
    samples, dropping some and repeating others."""
    return {
        "version": STATE_VERSION,
        "rank": rank,
        "world_size": world_size,
        "num_workers": max(1, cfg.num_workers),
        "seed": seed,
        "batch_size": batch_size,
        "num_shards": len(shards),
        # names, not paths: a data set moved to another mount resumes exactly
        "shard_names": hashlib.sha256("\n".join(os.path.basename(u) for u in shards).encode()).hexdigest()[:16],
        "shuffle_buffer": cfg.shuffle_buffer,
        "shuffle_group_shards": cfg.shuffle_group_shards,
        "resampled": cfg.resampled,
        "kind": cfg.kind,
    }


# Identity keys added after STATE_VERSION 1 was first written: a state saved without them is matched on the rest.
_LATER_KEYS = frozenset({"shard_names", "shuffle_buffer", "shuffle_group_shards"})


def state_mismatch(state: dict[str, Any], identity: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key -> (saved, now) for every identity key on which a saved state differs; empty when it fits."""
    return {k: (state.get(k), v) for k, v in identity.items()
            if state.get(k) != v and not (k in _LATER_KEYS and k not in state)}


def last_epoch(saved: Sequence[dict[str, Any]]) -> int:
    """The furthest data epoch any reader of the saved states (one per rank) had reached; -1 if none read."""
    return max((int(p["epoch"]) for state in saved for p in state.get("readers", {}).values()), default=-1)


def next_epoch_state(saved: Sequence[dict[str, Any]], identity: dict[str, Any]) -> dict[str, Any]:
    """A loader state for a new layout (`identity`) that starts all its readers at the data epoch after the
    furthest one the saved readers had reached.

    Exact resume needs the layout that wrote the checkpoint: positions are per (rank, worker) reader and batches
    are cut per reader. With another layout no sample is seen twice, but the rest of the interrupted epoch
    (including samples waiting in aspect buckets) is not seen. Skip counts of the same rank carry over.
    """
    epoch = last_epoch(saved) + 1
    skips: Counter[str] = Counter()
    for state in saved:
        if state.get("rank") == identity["rank"]:
            for position in state.get("readers", {}).values():
                skips.update(position.get("skips", {}))
    readers = {
        str(w): {"worker": w, "epoch": epoch, "group": 0, "next": 0, "pending": [],
                 "skips": dict(skips) if w == 0 else {}, "tar_errors": {}}
        for w in range(identity["num_workers"])
    }
    return {**identity, "batches": 0, "readers": readers}


def build_loader(
    cfg: Any, *, batch_size: int, rank: int, world_size: int, seed: int, state: dict[str, Any] | None = None
) -> Loader:
    """The training stream of one rank.

    cfg: a DataConfig (or an OmegaConf config with its keys). batch_size: samples per batch on this rank.
    rank / world_size: this process and the number of processes. seed: run seed (same on every rank).
    state: a previous `loader.state_dict()` from the same rank, world size, worker count and seed.

    Raw batches: pixel_values float32 [B,3,H,W] in [-1, 1]; captions list[str]; original_size, crop_top_left,
    target_size long [B,2] as (height, width) / (top, left) in px; keys list[str]; flipped bool [B]; epoch
    long [B] (the reader's data epoch of each sample). Latent batches have latents float32 [B,4,h,w] (scaled
    by the VAE's scaling_factor), prompt_embeds [B,77,D] and pooled_prompt_embeds [B,P] instead of pixels.
    """
    return Loader(to_data_config(cfg), batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, state=state)
