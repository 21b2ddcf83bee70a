"""The Zarr latent cache and its reader: round trip, resume after a kill, stats, order, DDP, flips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sfd.data.cache import CacheError, CacheMismatchError, LatentCache, create_cache
from sfd.data.reader import LatentCacheReader

N, ROWS_PER_SHARD, ROWS_PER_CHUNK = 70, 16, 4  # 5 shards, the last one partial (6 rows)
TEX, SEM, DINO = (4, 2, 2), (3, 2, 2), (5, 6)
ATTRS = {"image_size": 256, "texture_encoder": {"name": "f16d32", "sha256": "ab12"}, "class_names": ["a", "b", "c"]}
PATHS = [f"{'abc'[i % 3]}/img_{i:03d}.JPEG" for i in range(N)]
LABELS = np.arange(N) % 3
INVALID = {5, 17, 18, 40}


def encoded(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Values that encode (row, flip) exactly in fp16: 4*row + flip (+0.5 for the flip copy's sign)."""
    v = 4.0 * rows[:, None] + np.arange(2)[None, :]  # [n, 2]
    return np.broadcast_to(v.reshape(*v.shape, *([1] * len(shape))), (len(rows), 2, *shape)).astype(np.float32)


def shard_data(cache: LatentCache, shard: int, kind: str) -> dict:
    start, stop = cache.layout.shard_rows(shard)
    rows = np.arange(start, stop)
    if kind == "encoded":
        tex, sem, dino = encoded(rows, TEX), encoded(rows, SEM), encoded(rows, DINO)
    else:  # random, but a pure function of the shard (a re-run must give the same bytes)
        g = np.random.default_rng(shard)
        tex = g.normal(1.5, 2.0, (len(rows), 2, *TEX)) * np.arange(1, 5)[:, None, None]
        sem = g.normal(-0.5, 0.7, (len(rows), 2, *SEM))
        dino = g.normal(0, 1, (len(rows), 2, *DINO))
    valid = np.array([r not in INVALID for r in rows])
    reasons = [None if v else f"broken file {r}" for r, v in zip(rows, valid)]
    return dict(texture=tex, semantic=sem, dino=dino, valid=valid, reasons=reasons)


def make_cache(path: Path, kind: str = "encoded", attrs: dict = ATTRS, write: bool = True) -> LatentCache:
    cache = create_cache(
        path, paths=PATHS, labels=LABELS, rows_per_shard=ROWS_PER_SHARD, rows_per_chunk=ROWS_PER_CHUNK,
        texture_shape=TEX, semantic_shape=SEM, store_dino=True, dino_shape=DINO, attrs=attrs,
    )
    if write:
        for s in cache.pending_shards():
            cache.write_shard(s, **shard_data(cache, s, kind))
        cache.compute_stats(seed=0)
    return cache


@pytest.fixture(scope="module")
def enc_cache(tmp_path_factory: pytest.TempPathFactory) -> LatentCache:
    return make_cache(tmp_path_factory.mktemp("enc") / "cache.zarr")


def test_round_trip(enc_cache: LatentCache) -> None:
    c = LatentCache.open(enc_cache.path)
    assert c.is_complete() and c.pending_shards() == [] and c.num_shards == 5
    assert c.paths() == PATHS
    np.testing.assert_array_equal(c.labels(), LABELS)
    np.testing.assert_array_equal(c.valid(), [r not in INVALID for r in range(N)])
    assert c.group["texture"].shape == (N, 2, *TEX) and c.group["texture"].dtype == np.float16
    assert c.group["semantic"].shape == (N, 2, *SEM)
    assert c.group["dino"].shape == (N, 2, *DINO)
    rows = np.arange(N)
    tex = np.asarray(c.group["texture"][:], dtype=np.float32)
    expected = encoded(rows, TEX)
    expected[sorted(INVALID)] = 0  # invalid rows are stored as zeros
    np.testing.assert_array_equal(tex, expected)
    np.testing.assert_array_equal(np.asarray(c.group["dino"][9, 1]), 4 * 9 + 1)
    report = c.invalid_report()
    assert [r["row"] for r in report] == sorted(INVALID)
    assert report[0] == {"row": 5, "path": PATHS[5], "label": 2, "reason": "broken file 5"}
    assert c.attrs == ATTRS and c.layout.texture_shape == TEX
    assert "time_utc" in c.created_by


def test_stats_match_numpy(tmp_path: Path) -> None:
    c = make_cache(tmp_path / "rand.zarr", kind="random")
    valid_rows = np.flatnonzero(c.valid())
    # num_samples >= valid rows: every valid row is used, so the result is a plain NumPy reduction.
    stats = c.compute_stats(seed=0, num_samples=10_000)
    for part in ("texture", "semantic"):
        x = np.asarray(c.group[part][:], dtype=np.float64)[valid_rows, 0]  # non-flipped only
        np.testing.assert_allclose(stats[f"{part}_mean"], x.mean(axis=(0, 2, 3)), rtol=1e-6)
        np.testing.assert_allclose(stats[f"{part}_std"], x.std(axis=(0, 2, 3), ddof=1), rtol=1e-6)
        np.testing.assert_array_equal(c.stats()[f"{part}_std"], stats[f"{part}_std"])
    # Subsampling is a fixed-seed draw among valid rows.
    a, b, other = c.compute_stats(seed=1, num_samples=20), c.compute_stats(seed=1, num_samples=20), c.compute_stats(seed=2, num_samples=20)
    np.testing.assert_array_equal(a["texture_mean"], b["texture_mean"])
    assert not np.array_equal(a["texture_mean"], other["texture_mean"])
    assert LatentCache.open(c.path).group["texture_mean"].attrs["seed"] == 2


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_killed_shard_resumes_to_identical_bytes(tmp_path: Path) -> None:
    ref = make_cache(tmp_path / "ref.zarr", kind="random")
    c = make_cache(tmp_path / "killed.zarr", kind="random", write=False)
    c.write_shard(0, **shard_data(c, 0, "random"))
    # A worker killed half-way through shard 2: garbage in part of its rows, flag never set.
    c.group["texture"][32:40] = np.full((8, 2, *TEX), 7.0, np.float16)
    c.group["valid"][32:40] = True
    assert c.pending_shards() == [1, 2, 3, 4]

    resumed = make_cache(tmp_path / "killed.zarr", kind="random", write=False)  # same attrs: reopen
    assert resumed.pending_shards() == [1, 2, 3, 4]
    for s in resumed.pending_shards():
        resumed.write_shard(s, **shard_data(resumed, s, "random"))
    resumed.compute_stats(seed=0)
    # Rewriting a finished shard is idempotent too (a retried Ray task).
    resumed.write_shard(3, **shard_data(resumed, 3, "random"))

    ref_files, got_files = _files(ref.path), _files(resumed.path)
    data_keys = [k for k in ref_files if k != "zarr.json"]  # group attrs hold the creation time
    assert set(ref_files) == set(got_files)
    assert [k for k in data_keys if ref_files[k] != got_files[k]] == []
    for name in ("texture", "semantic", "dino", "valid", "labels", "reason", "shard_done"):
        np.testing.assert_array_equal(ref.group[name][:], resumed.group[name][:])


def test_mismatch_and_compatibility(enc_cache: LatentCache, tmp_path: Path) -> None:
    other = {**ATTRS, "image_size": 512, "dataset": "mine"}
    with pytest.raises(CacheMismatchError, match="image_size") as e:
        make_cache(enc_cache.path, attrs=other, write=False)
    assert set(e.value.diffs) == {"image_size", "dataset"}
    with pytest.raises(CacheMismatchError, match="sfd_latent_cache"):  # different rows_per_shard
        create_cache(enc_cache.path, paths=PATHS, labels=LABELS, rows_per_shard=8, rows_per_chunk=4,
                     texture_shape=TEX, semantic_shape=SEM, store_dino=True, dino_shape=DINO, attrs=ATTRS)
    with pytest.raises(CacheMismatchError, match="sfd_latent_cache"):  # different file index
        create_cache(enc_cache.path, paths=PATHS[::-1], labels=LABELS, rows_per_shard=ROWS_PER_SHARD,
                     rows_per_chunk=ROWS_PER_CHUNK, texture_shape=TEX, semantic_shape=SEM,
                     store_dino=True, dino_shape=DINO, attrs=ATTRS)
    assert enc_cache.is_complete()  # nothing was overwritten

    enc_cache.check_compatible({"image_size": 256, "texture_shape": [4, 2, 2]})
    with pytest.raises(CacheMismatchError, match="texture_encoder") as e:
        enc_cache.check_compatible({"texture_encoder": {"name": "f16d32", "sha256": "ff00"}, "semantic_shape": SEM})
    assert set(e.value.diffs) == {"texture_encoder"}
    with pytest.raises(CacheMismatchError, match="semantic_encoder"):
        LatentCacheReader(enc_cache, expected_attrs={"semantic_encoder": "x"})


def test_write_shard_checks(tmp_path: Path) -> None:
    c = make_cache(tmp_path / "c.zarr", write=False)
    d = shard_data(c, 1, "encoded")
    with pytest.raises(CacheError, match="texture has shape"):
        c.write_shard(1, **{**d, "texture": d["texture"][:, :1]})
    with pytest.raises(CacheError, match="needs dino"):
        c.write_shard(1, **{**d, "dino": None})
    sem = d["semantic"].copy()
    sem[4, 1, 0, 0, 0] = np.nan  # row 20
    tex = torch.from_numpy(d["texture"]).bfloat16()  # torch input, any float dtype
    tex[5] = 1e6  # row 21: overflows fp16
    c.write_shard(1, **{**d, "texture": tex, "semantic": sem})
    reasons = {r["row"]: r["reason"] for r in c.invalid_report()}
    assert "non-finite semantic" in reasons[20] and "non-finite texture" in reasons[21]
    assert reasons[17] == "broken file 17" and c.pending_shards() == [0, 2, 3, 4]
    with pytest.raises(CacheError, match="incomplete"):
        c.compute_stats()
    with pytest.raises(CacheError, match="incomplete"):
        LatentCacheReader(c)


def _check_items(batch, enc_cache: LatentCache) -> None:
    """Denormalised values must equal 4*row + flip in every part (one flip choice per item)."""
    stats = enc_cache.stats()
    tex = batch.x[:, :4] * torch.from_numpy(stats["texture_std"]).view(1, -1, 1, 1) + torch.from_numpy(stats["texture_mean"]).view(1, -1, 1, 1)
    sem = batch.x[:, 4:] * torch.from_numpy(stats["semantic_std"]).view(1, -1, 1, 1) + torch.from_numpy(stats["semantic_mean"]).view(1, -1, 1, 1)
    want = torch.from_numpy(4.0 * batch.rows + batch.flips).float()
    torch.testing.assert_close(tex.mean(dim=(1, 2, 3)), want, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(sem.mean(dim=(1, 2, 3)), want, atol=1e-3, rtol=1e-5)
    assert batch.repa is not None and batch.repa.shape == (len(want), *DINO)
    assert batch.repa.dtype == torch.float16  # as stored; the trainer casts on the device
    torch.testing.assert_close(batch.repa.float().mean(dim=(1, 2)), want)
    np.testing.assert_array_equal(batch.y.numpy(), LABELS[batch.rows])
    assert not set(batch.rows.tolist()) & INVALID


@pytest.mark.parametrize("mode", ["memory", "pagecache"])
def test_reader_flips_consistent_and_valid_only(enc_cache: LatentCache, mode: str) -> None:
    reader = LatentCacheReader(enc_cache, seed=3, load_dino=True, mode=mode, window_chunks=3)
    assert len(reader) == N - len(INVALID)
    it = reader.batches(11)
    seen, flips = [], []
    for _ in range(len(reader) // 11):  # one full epoch
        b = next(it)
        assert b.x.shape == (11, 7, 2, 2) and b.x.dtype == torch.float32 and b.y.dtype == torch.int64
        _check_items(b, enc_cache)
        seen += b.rows.tolist()
        flips += b.flips.tolist()
    assert len(set(seen)) == len(seen)  # no repeats within an epoch
    assert 0.25 < np.mean(flips) < 0.75
    x, y, repa = reader.item(9, 1)
    assert x.shape == (7, 2, 2) and int(y) == LABELS[9] and torch.allclose(repa, torch.full(DINO, 37.0))
    reader.close()


@pytest.mark.parametrize("mode", ["memory", "pagecache"])
def test_reader_order_deterministic_and_resumable(enc_cache: LatentCache, mode: str) -> None:
    def run(reader: LatentCacheReader, n: int) -> list[tuple[list[int], list[int]]]:
        it = reader.batches(8)
        return [(b.rows.tolist(), b.flips.tolist()) for b in (next(it) for _ in range(n))]

    kw = dict(seed=5, mode=mode, window_chunks=2)
    full = run(LatentCacheReader(enc_cache, **kw), 20)  # crosses epoch boundaries (8 batches/epoch)
    assert full == run(LatentCacheReader(enc_cache, **kw), 20)
    assert full[:8] != full[8:16]  # a new epoch reshuffles
    assert full != run(LatentCacheReader(enc_cache, **{**kw, "seed": 6}), 20)

    first = LatentCacheReader(enc_cache, **kw)
    head = run(first, 11)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["index"] == 3 * 8
    resumed = LatentCacheReader(enc_cache, **kw)
    resumed.load_state_dict(state)
    assert head + run(resumed, 9) == full
    with pytest.raises(ValueError, match="world_size"):
        LatentCacheReader(enc_cache, **{**kw, "world_size": 2}).load_state_dict(state)


@pytest.mark.parametrize("mode", ["memory", "pagecache"])
def test_reader_ddp_partition(enc_cache: LatentCache, mode: str) -> None:
    world = 3
    readers = [LatentCacheReader(enc_cache, seed=1, rank=r, world_size=world, mode=mode, window_chunks=2) for r in range(world)]
    sizes = {len(r) for r in readers}
    assert len(sizes) == 1  # equal counts per rank (DDP steps stay in lockstep)
    per_rank = sizes.pop()
    for epoch in range(2):
        rows = []
        for r in readers:
            r.load_state_dict({"epoch": epoch, "index": 0})
            it = r.batches(per_rank)
            rows.append(set(next(it).rows.tolist()))
        assert all(len(s) == per_rank for s in rows)
        assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
        valid = set(np.flatnonzero(enc_cache.valid()).tolist())
        assert set().union(*rows) <= valid
        if mode == "memory":  # only the remainder (< world_size rows) is dropped
            assert len(valid) - len(set().union(*rows)) < world


def _global_batches(cache: LatentCache, world: int, global_batch: int, steps: int, **kw) -> list[list[tuple[int, int]]]:
    """Global batches as the trainer assembles them: rank r's k-th item is global item r + kW."""
    readers = [LatentCacheReader(cache, rank=r, world_size=world, **kw) for r in range(world)]
    its = [r.batches(global_batch // world) for r in readers]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in its]
        items = [None] * global_batch
        for r, b in enumerate(parts):
            for k, (row, flip) in enumerate(zip(b.rows.tolist(), b.flips.tolist())):
                items[r + k * world] = (row, flip)
        out.append(items)
    return out


def test_default_mode_same_global_batches_on_1_and_2_processes(enc_cache: LatentCache) -> None:
    # The default mode (pagecache, windowed order): the global order depends on (seed, epoch, step) only.
    kw = dict(seed=7, window_chunks=3)
    steps = 12  # 66 valid rows / 10 = 6 steps per epoch: crosses an epoch boundary
    one = _global_batches(enc_cache, 1, 10, steps, **kw)
    two = _global_batches(enc_cache, 2, 10, steps, **kw)
    assert one == two
    assert len({row for b in one[:6] for row, _ in b}) == 60  # no repeats within an epoch

    # Resume exact, also onto another world size: 2 ranks stop after 4 steps, 1 rank continues.
    readers = [LatentCacheReader(enc_cache, rank=r, world_size=2, **kw) for r in range(2)]
    its = [r.batches(5) for r in readers]
    for _ in range(4):
        [next(it) for it in its]
    state = readers[0].state_dict()
    assert state["index"] == 20 and readers[1].state_dict()["index"] == 20
    resumed = LatentCacheReader(enc_cache, **kw)
    resumed.load_state_dict({**state, "world_size": 1, "index": state["index"] * 2})
    it = resumed.batches(10)
    for step in range(4, steps):
        b = next(it)
        assert list(zip(b.rows.tolist(), b.flips.tolist())) == one[step]


def test_pread_and_zarr_fallback_read_the_same_bytes(enc_cache: LatentCache) -> None:
    fast = LatentCacheReader(enc_cache, seed=2, load_dino=True)
    assert fast.raw  # uncompressed cache: items are read from the chunk and shard files directly
    slow = LatentCacheReader(enc_cache, seed=2, load_dino=True)
    for src in slow._items.values():
        src.raw = False  # what a compressed cache would get: zarr chunk reads
    a, b = next(fast.batches(16)), next(slow.batches(16))
    assert torch.equal(a.x, b.x) and torch.equal(a.repa, b.repa)
    _check_items(a, enc_cache)


def test_verified_files_are_not_checked_again_when_read(enc_cache: LatentCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a clean ``verify`` (each of 2 ranks checks half the files, the reduce says none is
    damaged) no file's checksum is computed again when batches read it: the first-read check
    would re-read every REPA target shard whole on every rank."""
    import google_crc32c

    reader = LatentCacheReader(enc_cache, seed=2, rank=0, world_size=2, load_dino=True)
    calls = []
    real = google_crc32c.value
    monkeypatch.setattr(google_crc32c, "value", lambda data: calls.append(1) or real(data))
    reader.verify()
    checked = len(calls)
    assert checked > 0  # rank 0 checked its half
    assert all(src._verified == set(range(enc_cache.layout.num_chunks)) for src in reader._items.values())
    it = reader.batches(4)
    for _ in range(len(reader) // 4):
        next(it)
    assert len(calls) == checked, "a verified file was checksummed again when read"


@pytest.mark.parametrize("mode", ["pagecache", "memory"])
def test_reused_buffers_give_the_same_batches(enc_cache: LatentCache, mode: str) -> None:
    """The reader's reused buffers (the gather scratch of the latents always; with reuse_buffers
    the batch's x and REPA targets too, two sets in turn) change no value, and a batch stays
    intact until the batch after the next one is drawn."""
    fresh = LatentCacheReader(enc_cache, seed=3, mode=mode, load_dino=True)
    reused = LatentCacheReader(enc_cache, seed=3, mode=mode, load_dino=True, reuse_buffers=True)
    a_it, b_it = fresh.batches(6), reused.batches(6)
    held = []
    for _ in range(5):
        a, b = next(a_it), next(b_it)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.repa, b.repa)
        held.append((a.x.clone(), a.repa.clone(), b.x, b.repa))
        if len(held) >= 2:  # the previous batch: not yet overwritten
            assert torch.equal(held[-2][0], held[-2][2]) and torch.equal(held[-2][1], held[-2][3])
    for k in (2, 3):  # two buffers each for x and the targets, taken in turn
        assert held[-1][k].data_ptr() == held[-3][k].data_ptr()
        assert held[-1][k].data_ptr() != held[-2][k].data_ptr()
