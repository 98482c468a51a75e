"""The training stream: exact (rank, worker) splitting, resampling without starvation, exact resume."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

from data.config import DataConfig
from data.stream import ReaderPlan, build_loader, expand_shards
from data.synthetic import write_synthetic_shards

RES = 32  # px; small images keep the suite fast


def _cfg(shards: str, **overrides) -> DataConfig:
    base = dict(shards=shards, resolution=RES, num_workers=2, shuffle_buffer=6, shuffle_group_shards=2)
    return DataConfig(**{**base, **overrides})


def _take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> tuple[str, list[str]]:
    """7 shards of 3..9 samples (42 in all): an exact split must not rely on equal shard sizes."""
    out = tmp_path_factory.mktemp("uneven")
    counts = [3, 9, 4, 8, 5, 7, 6]
    write_synthetic_shards(str(out), num_shards=len(counts), samples_per_shard=counts)
    keys = [f"s{shard:04d}x{i:04d}" for shard, count in enumerate(counts) for i in range(count)]
    return str(out), keys


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(uneven_shards):
    folder, all_keys = uneven_shards
    cfg = _cfg(folder, num_workers=2)
    seen: list[str] = []
    for rank in range(2):
        loader = build_loader(cfg, batch_size=3, rank=rank, world_size=2, seed=7)
        # 12 batches = 36 samples per rank; a reader holds at most 9+7=16 samples per epoch, so every reader
        # finishes epoch 0 within its 6 batches.
        batches = _take(loader, 12)
        for batch in batches:
            seen += [k for k, e in zip(batch["keys"], batch["epoch"].tolist(), strict=True) if e == 0]
        assert any(e >= 1 for batch in batches for e in batch["epoch"].tolist())
    assert len(seen) == len(set(seen)), "a sample was read twice in epoch 0"
    assert sorted(seen) == sorted(all_keys)


def test_exact_split_of_each_epoch_covers_all_shards_once(uneven_shards):
    folder, _ = uneven_shards
    shards = tuple(expand_shards(folder))
    for epoch in range(3):
        dealt = [
            s
            for rank, worker in itertools.product(range(2), range(3))
            for s in ReaderPlan(shards, rank, 2, worker, 3, 0, False, 2, 4).epoch_shards(epoch)
        ]
        assert sorted(dealt) == sorted(shards)
    orders = {tuple(ReaderPlan(shards, 0, 1, 0, 1, 0, False, 2, 4).epoch_shards(e)) for e in range(4)}
    assert len(orders) > 1, "the shard order should change between epochs"


def test_too_few_shards_fail_early_with_a_hint(uneven_shards, tmp_path):
    write_synthetic_shards(str(tmp_path), num_shards=3, samples_per_shard=2)
    with pytest.raises(ValueError, match="resampled=true"):
        build_loader(_cfg(str(tmp_path), num_workers=2), batch_size=2, rank=0, world_size=2, seed=0)


def test_resampled_mode_feeds_every_reader_with_fewer_shards_than_readers(tmp_path):
    write_synthetic_shards(str(tmp_path), num_shards=2, samples_per_shard=4)  # 2 shards, 4 readers
    cfg = _cfg(str(tmp_path), num_workers=2, resampled=True)
    for rank in range(2):
        loader = build_loader(cfg, batch_size=2, rank=rank, world_size=2, seed=3)
        batches = _take(loader, 8)
        assert len(batches) == 8 and all(b["pixel_values"].shape == (2, 3, RES, RES) for b in batches)
        assert sorted(loader.state_dict()["readers"]) == ["0", "1"], "a worker produced nothing"
    # Each (rank, worker) draws its own shards.
    shards = tuple(expand_shards(str(tmp_path)))
    draws = {
        (r, w): tuple(tuple(ReaderPlan(shards, r, 2, w, 2, 3, True, 2, 4).epoch_shards(e)) for e in range(6))
        for r in range(2)
        for w in range(2)
    }
    assert len(set(draws.values())) == 4


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["keys"] == y["keys"]
        assert x["captions"] == y["captions"]
        for name in ("pixel_values", "original_size", "crop_top_left", "target_size", "epoch"):
            assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize(
    "workers,buckets,consumed",
    [(2, True, 7), (0, False, 9), (2, False, 13)],
    ids=["2workers-buckets", "0workers", "2workers-next-epoch"],
)
def test_resume_continues_with_exactly_the_next_batches(uneven_shards, workers, buckets, consumed):
    folder, _ = uneven_shards
    # Random crops and flips: the resumed samples must get the same augmentation too.
    cfg = _cfg(folder, num_workers=workers, buckets=buckets, bucket_step=8, random_flip=True)
    following = 6
    reference = _take(build_loader(cfg, batch_size=3, rank=1, world_size=2, seed=5), consumed + following)

    first = build_loader(cfg, batch_size=3, rank=1, world_size=2, seed=5)
    _assert_same_batches(_take(first, consumed), reference[:consumed])
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    if buckets:
        assert any(p["pending"] for p in state["readers"].values()), "test should cover pending buckets"
    resumed = build_loader(cfg, batch_size=3, rank=1, world_size=2, seed=5, state=state)
    _assert_same_batches(_take(resumed, following), reference[consumed:])
    assert resumed.state_dict()["batches"] == consumed + following


def test_buckets_give_one_shape_per_batch(uneven_shards):
    folder, _ = uneven_shards
    loader = build_loader(_cfg(folder, buckets=True, bucket_step=8), batch_size=2, rank=0, world_size=1, seed=0)
    shapes = set()
    for batch in _take(loader, 10):
        h, w = batch["pixel_values"].shape[-2:]
        assert (batch["target_size"] == torch.tensor([h, w])).all()
        shapes.add((h, w))
    assert len(shapes) > 1, "portrait, landscape and square samples should land in different buckets"


def test_state_from_another_setup_is_refused(uneven_shards):
    folder, _ = uneven_shards
    loader = build_loader(_cfg(folder, num_workers=0), batch_size=2, rank=0, world_size=1, seed=0)
    _take(loader, 1)
    with pytest.raises(ValueError, match="does not match"):
        build_loader(_cfg(folder, num_workers=0), batch_size=2, rank=0, world_size=1, seed=1, state=loader.state_dict())


@pytest.mark.parametrize("change", ["shuffle_buffer", "shuffle_group_shards", "renamed_shard"])
def test_a_saved_position_is_refused_by_another_shuffle_or_shard_list(uneven_shards, tmp_path, change):
    """A saved position indexes the shuffled stream: another buffer, group size or shard list would map it onto
    other samples (some dropped, some read twice), so the state is refused, not replayed."""
    folder, _ = uneven_shards
    saved = build_loader(_cfg(folder, num_workers=1), batch_size=3, rank=0, world_size=1, seed=7)
    _take(saved, 2)
    state = json.loads(json.dumps(saved.state_dict()))
    if change == "renamed_shard":  # the same number of shards, one of them another file
        for name in os.listdir(folder):
            os.link(os.path.join(folder, name), tmp_path / name)
        os.rename(tmp_path / "000003.tar", tmp_path / "000099.tar")
        now = _cfg(str(tmp_path), num_workers=1)
    else:
        now = _cfg(folder, num_workers=1, **{change: 3})
    with pytest.raises(ValueError, match="does not match"):
        build_loader(now, batch_size=3, rank=0, world_size=1, seed=7, state=state)
    # a state from before these keys were recorded is matched on the others, and continues
    for key in ("shard_names", "shuffle_buffer", "shuffle_group_shards"):
        del state[key]
    resumed = build_loader(_cfg(folder, num_workers=1), batch_size=3, rank=0, world_size=1, seed=7, state=state)
    _assert_same_batches(_take(resumed, 2), _take(saved, 2))


def test_a_state_resumes_from_the_same_shards_in_another_folder(uneven_shards, tmp_path):
    """The shard list is matched by file names, not paths: a data set moved to another mount resumes exactly."""
    folder, _ = uneven_shards
    saved = build_loader(_cfg(folder, num_workers=1), batch_size=3, rank=0, world_size=1, seed=7)
    _take(saved, 2)
    state = json.loads(json.dumps(saved.state_dict()))
    for name in os.listdir(folder):
        os.link(os.path.join(folder, name), tmp_path / name)
    moved = build_loader(_cfg(str(tmp_path), num_workers=1), batch_size=3, rank=0, world_size=1, seed=7, state=state)
    assert [b["keys"] for b in _take(moved, 2)] == [b["keys"] for b in _take(saved, 2)]


def test_a_new_layout_starts_at_the_next_epoch_and_reads_it_once(uneven_shards):
    """2 ranks x 2 workers stop inside epoch 0; 1 rank x 1 worker at another batch size continues with epoch 1,
    every sample of it exactly once, and carries rank 0's skip counts."""
    from data.stream import expand_shards, last_epoch, next_epoch_state, stream_identity

    folder, all_keys = uneven_shards
    old = _cfg(folder, num_workers=2)
    saved = []
    for rank in range(2):
        loader = build_loader(old, batch_size=3, rank=rank, world_size=2, seed=7)
        _take(loader, 2)
        saved.append(json.loads(json.dumps(loader.state_dict())))
    assert last_epoch(saved) == 0
    saved[0]["readers"]["1"]["skips"] = {"too_small": 3}  # counted by rank 0 before the checkpoint
    saved[1]["readers"]["0"]["skips"] = {"too_small": 5}  # ... and by rank 1, which no longer exists

    new = _cfg(folder, num_workers=1, buckets=False)
    identity = stream_identity(new, shards=expand_shards(folder), batch_size=2, rank=0, world_size=1, seed=7)
    state = next_epoch_state(saved, identity)
    with pytest.raises(ValueError, match="does not match"):  # the old state itself is refused by the new layout
        build_loader(new, batch_size=2, rank=0, world_size=1, seed=7, state=saved[0])
    resumed = build_loader(new, batch_size=2, rank=0, world_size=1, seed=7, state=state)
    keys_by_epoch: dict[int, list[str]] = {}
    for batch in _take(resumed, 40):  # 80 samples: all of epoch 1 (42) and part of epoch 2
        for key, epoch in zip(batch["keys"], batch["epoch"].tolist(), strict=True):
            keys_by_epoch.setdefault(epoch, []).append(key)
    assert min(keys_by_epoch) == 1  # nothing of the interrupted epoch again
    assert sorted(keys_by_epoch[1]) == sorted(all_keys)
    assert resumed.skip_counts() == {"too_small": 3}


def test_shard_specs(tmp_path):
    paths = write_synthetic_shards(str(tmp_path), num_shards=3, samples_per_shard=2)
    folder = str(tmp_path)
    assert expand_shards(os.path.join(folder, "{000000..000002}.tar")) == paths
    assert expand_shards(folder) == paths
    assert expand_shards(os.path.join(folder, "*.tar")) == paths
    assert expand_shards(f"{paths[0]}::{paths[2]}") == [paths[0], paths[2]]
    assert expand_shards([paths[1]]) == [paths[1]]
    assert expand_shards(f"pipe:cat {folder}/{{000000..000001}}.tar") == [
        f"pipe:cat {folder}/000000.tar",
        f"pipe:cat {folder}/000001.tar",
    ]
    with pytest.raises(FileNotFoundError, match="1 of 4"):
        expand_shards(os.path.join(folder, "{000000..000003}.tar"))


def test_pipe_shards_are_read(tmp_path):
    write_synthetic_shards(str(tmp_path), num_shards=2, samples_per_shard=3)
    cfg = _cfg(f"pipe:cat {tmp_path}/{{000000..000001}}.tar", num_workers=0)
    batches = _take(build_loader(cfg, batch_size=3, rank=0, world_size=1, seed=0), 2)
    keys = sorted(k for b in batches for k in b["keys"])
    assert keys == sorted(f"s{s:04d}x{i:04d}" for s in range(2) for i in range(3))


def test_raw_batch_contract(uneven_shards):
    folder, _ = uneven_shards
    batch = _take(build_loader(_cfg(folder, num_workers=0), batch_size=4, rank=0, world_size=1, seed=0), 1)[0]
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (4, 3, RES, RES)
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    assert batch["pixel_values"].min() < -0.5 and batch["pixel_values"].max() > 0.5  # [-1, 1], the VAE's range
    for name in ("original_size", "crop_top_left", "target_size"):
        assert batch[name].dtype == torch.long and batch[name].shape == (4, 2)
    assert len(batch["keys"]) == len(batch["captions"]) == 4
    assert all(c.startswith("A detailed CogVLM-style description") for c in batch["captions"])
    assert "_position" not in batch


def test_each_sample_draws_its_own_crop_and_flip(tmp_path):
    """Same-sized images, random crop and flip: the crops and flips vary within an epoch (each sample has its own
    seeded draw), and the same seed gives the same ones again."""
    write_synthetic_shards(str(tmp_path), num_shards=1, samples_per_shard=16, sizes=((48, 96),))
    cfg = _cfg(str(tmp_path), num_workers=0, shuffle_buffer=1, random_crop=True, random_flip=True)

    def crops() -> list[tuple[str, int, int, bool]]:
        (batch,) = _take(build_loader(cfg, batch_size=16, rank=0, world_size=1, seed=3), 1)
        return sorted(zip(batch["keys"], *[t.tolist() for t in batch["crop_top_left"].T], batch["flipped"].tolist(),
                          strict=True))

    first = crops()
    assert len({left for _, _, left, _ in first}) > 4  # 48 x 96 resized to 32 x 64: 33 possible left offsets
    assert 0 < sum(flipped for *_, flipped in first) < 16
    assert crops() == first
