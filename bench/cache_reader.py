"""Latent-cache read throughput: the reader's batch modes against plain per-item zarr reads.

Builds a synthetic cache with the real ImageNet-256 latent shapes (texture 32×16×16, semantic
16×16×16, fp16, both flips) in a temporary directory, plus a smaller one that also stores DINO
REPA targets (256×768), and prints items/s for random-order batches. The files were just written,
so the numbers are warm-page-cache numbers (the best case for a local disk).

Example:
    python bench/cache_reader.py --rows 20000 --dino-rows 2000 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sfd.data.cache import LatentCache, create_cache
from sfd.data.reader import LatentCacheReader

TEX, SEM, DINO = (32, 16, 16), (16, 16, 16), (256, 768)


def build(path: Path, rows: int, rows_per_shard: int, store_dino: bool) -> tuple[LatentCache, float]:
    t0 = time.perf_counter()
    cache = create_cache(
        path, paths=[f"c{i % 1000:03d}/{i:07d}.JPEG" for i in range(rows)], labels=np.arange(rows) % 1000,
        rows_per_shard=rows_per_shard, texture_shape=TEX, semantic_shape=SEM, store_dino=store_dino,
        attrs={"image_size": 256, "synthetic": True},
    )
    for s in cache.pending_shards():
        start, stop = cache.layout.shard_rows(s)
        g = np.random.default_rng(s)
        n = stop - start
        tex = g.standard_normal((n, 2, *TEX), dtype=np.float32)
        sem = g.standard_normal((n, 2, *SEM), dtype=np.float32)
        dino = g.standard_normal((n, 2, *DINO), dtype=np.float32) if store_dino else None
        cache.write_shard(s, tex, sem, dino)
    cache.compute_stats(seed=0)
    return cache, time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def plain_zarr_items_per_s(cache: LatentCache, num_items: int, dino: bool) -> float:
    """One zarr call per array per item: the naive Dataset.__getitem__ pattern."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, cache.num_rows, num_items)
    flips = rng.integers(0, 2, num_items)
    tex, sem = cache.group["texture"], cache.group["semantic"]
    d = cache.group["dino"] if dino else None
    t0 = time.perf_counter()
    for r, f in zip(rows, flips):
        tex[r, f], sem[r, f]
        if d is not None:
            d[r, f]
    return num_items / (time.perf_counter() - t0)


def reader_items_per_s(cache: LatentCache, batch_size: int, num_batches: int, **kw) -> tuple[float, float]:
    t0 = time.perf_counter()
    reader = LatentCacheReader(cache, seed=0, **kw)
    init_s = time.perf_counter() - t0
    it = reader.batches(batch_size)
    next(it)  # warm-up: first window / thread start
    t0 = time.perf_counter()
    for _ in range(num_batches):
        b = next(it)
        assert b.x.shape == (batch_size, TEX[0] + SEM[0], 16, 16)
    rate = num_batches * batch_size / (time.perf_counter() - t0)
    reader.close()
    return rate, init_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000, help="rows of the texture+semantic cache")
    ap.add_argument("--dino-rows", type=int, default=2_000, help="rows of the cache with DINO targets (0: skip)")
    ap.add_argument("--rows-per-shard", type=int, default=1024, help="encode work-unit size")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--window-chunks", type=int, default=64, help="stream mode window, in 64-row chunks")
    ap.add_argument("--dir", type=Path, default=None, help="where to build the caches (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (torchrun sets OMP_NUM_THREADS=1 per process by default)")
    args = ap.parse_args()
    # Batch assembly is memory-bound: on a shared or busy CPU torch's intra-op thread pool waits
    # on descheduled threads and runs ~10x slower than one thread, so measure as torchrun runs.
    torch.set_num_threads(args.threads)

    result: dict[str, float] = {"rows": args.rows, "batch_size": args.batch_size, "threads": args.threads}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cache, build_s = build(Path(tmp) / "tex_sem.zarr", args.rows, args.rows_per_shard, store_dino=False)
        per_image = dir_bytes(cache.path) / args.rows
        print(f"built {args.rows} rows in {build_s:.1f} s; {per_image / 1e3:.1f} kB per image (texture+semantic, both flips)")
        result.update(build_s=build_s, bytes_per_image=per_image)

        rate = plain_zarr_items_per_s(cache, 500, dino=False)
        print(f"plain zarr per-item reads (texture+semantic): {rate:,.0f} items/s")
        result["plain_zarr_items_per_s"] = rate
        num_batches = max(8, min(100, args.rows // args.batch_size - 2))
        for mode in ("memory", "stream"):
            rate, init_s = reader_items_per_s(cache, args.batch_size, num_batches, mode=mode, window_chunks=args.window_chunks)
            print(f"reader mode={mode:6s} batch {args.batch_size}: {rate:,.0f} items/s (init {init_s:.1f} s)")
            result[f"reader_{mode}_items_per_s"] = rate
            result[f"reader_{mode}_init_s"] = init_s

        if args.dino_rows > 0:
            dcache, build_s = build(Path(tmp) / "with_dino.zarr", args.dino_rows, min(args.rows_per_shard, 256), store_dino=True)
            per_image = dir_bytes(dcache.path) / args.dino_rows
            print(f"built {args.dino_rows} rows with DINO in {build_s:.1f} s; {per_image / 1e3:.1f} kB per image")
            result["bytes_per_image_with_dino"] = per_image
            rate = plain_zarr_items_per_s(dcache, 200, dino=True)
            print(f"plain zarr per-item reads (texture+semantic+dino): {rate:,.0f} items/s")
            result["plain_zarr_dino_items_per_s"] = rate
            for mode in ("memory", "stream"):
                rate, _ = reader_items_per_s(dcache, args.batch_size, 4, mode=mode, load_dino=True, window_chunks=args.window_chunks)
                print(f"reader mode={mode:6s} with DINO targets: {rate:,.0f} items/s")
                result[f"reader_{mode}_dino_items_per_s"] = rate
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
