"""Training-time readers of the latent cache: shuffled, resumable, DDP-sharded batches.

One windowed visiting order (:func:`chunk_windows`) serves both trainers: the diffusion
trainer's :class:`LatentCacheReader` (composite latents, below) and the Semantic-VAE trainer's
:class:`DinoTokenReader` (DINO tokens, both flips of every row, whole-chunk reads).

Each item is the composite latent ``[texture | semantic]`` (DESIGN.md §3: texture channels first),
each part normalised per channel as ``(x - μ_c) / σ_c`` with the statistics stored in the cache
(method.md §2.4), its label, and optionally its REPA target (DINOv2 patch tokens). Every item
picks the plain or the flipped copy with probability 1/2, and the same choice for all three
(method.md §2.5).

Plain zarr item reads cost ~1-2 ms of Python overhead each (~400-1000 items/s), far below what a
GPU consumes, so the reader never reads single texture/semantic rows. It gathers batches from
whole chunks held in memory, in one of two modes:

``mode="memory"``
    Read the texture and semantic arrays once, chunk by chunk, and keep them in RAM; every epoch
    is a full random permutation of the valid rows. Costs ``N × 2 × (Ct+Cs)·h·w × 2 B`` per
    process (49 KB per image at 256²: 63 GB for ImageNet-1k), so it suits small datasets or
    hosts with the RAM for it.

``mode="stream"``
    Each epoch visits the zarr chunks (``rows_per_chunk`` contiguous rows) in a random order,
    split between DDP ranks chunk by chunk, and loads ``window_chunks`` of them at a time
    (prefetching the next window in a thread); the rows of a window are shuffled together. Memory
    is bounded by two windows, and reads are large sequential chunk reads. The trade-off: items
    of one batch come from at most ``window_chunks`` chunks, so if rows are stored in class order
    (the sorted file list) a batch sees ~``window_chunks × rows_per_chunk / images_per_class``
    classes at most. Encoding in a fixed permuted row order (``ImageList.permuted``) removes that
    correlation; otherwise use a large window.

Batch assembly is memory-bound NumPy/torch work in the calling process; run it with one torch
CPU thread (torchrun's default OMP_NUM_THREADS=1): on a busy CPU the intra-op thread pool made it
~6x slower in ``bench/cache_reader.py``.

REPA targets (786 KB per image) are read per item from zarr in both modes (one (row, flip)
inner chunk each), which bounds throughput to roughly a thousand items per second per process.

Order and resume: the order depends only on ``(seed, epoch)`` (and rank/world size), the flip of
each item is drawn with it, and :meth:`LatentCacheReader.state_dict` records ``(epoch, index)``,
the number of items of this epoch already yielded by this rank, so a resumed run continues with
exactly the batches it would have seen. Each rank yields the same number of items per epoch
(a few rows are dropped per epoch to make the counts equal), and ranks never share a row within
an epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from sfd.data.cache import FIX_HINT, CacheError, LatentCache


def valid_rows_per_chunk(valid: np.ndarray, rows_per_chunk: int) -> np.ndarray:
    """Number of valid rows in each zarr chunk of ``rows_per_chunk`` contiguous rows."""
    return np.add.reduceat(valid.astype(np.int64), np.arange(0, len(valid), rows_per_chunk))


def chunk_windows(
    valid_per_chunk: np.ndarray, seed: int, epoch: int, world_size: int, window_chunks: int
) -> list[list[np.ndarray]]:
    """The windowed visiting order of an epoch, shared by both trainers' stream readers.

    Chunks holding valid rows, permuted by ``(seed, epoch)``, dealt to ranks round-robin, then
    grouped ``window_chunks`` at a time: ``result[rank][w]`` are the chunk ids of rank's window w.
    """
    chunks = np.random.default_rng([seed, epoch]).permutation(np.flatnonzero(valid_per_chunk > 0))
    per_rank = [chunks[r::world_size] for r in range(world_size)]
    return [[mine[i : i + window_chunks] for i in range(0, len(mine), window_chunks)] for mine in per_rank]


class LatentBatch(NamedTuple):
    x: torch.Tensor  # [B, Ct+Cs, h, w] float32, normalised, texture channels first
    y: torch.Tensor  # [B] int64 class labels
    repa: torch.Tensor | None  # [B, tokens, dim] float32 REPA targets, or None
    rows: np.ndarray  # [B] cache row of each item (for logging / debugging)
    flips: np.ndarray  # [B] 0 = plain, 1 = horizontally flipped


@dataclass
class _EpochPlan:
    rows: np.ndarray  # [n] cache rows this rank yields this epoch, in order
    flips: np.ndarray  # [n] flip choice per position
    window: np.ndarray  # [n] window id per position (0 everywhere in memory mode)
    slot: np.ndarray  # [n] row slot inside that window's buffer
    window_chunks: list[np.ndarray]  # chunk ids making up each window (stream mode)


class LatentCacheReader:
    """Batches of normalised composite latents from a finished :class:`LatentCache`."""

    def __init__(
        self,
        cache: LatentCache | str | os.PathLike[str],
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        load_dino: bool = False,
        mode: Literal["memory", "stream"] = "memory",
        window_chunks: int = 64,
        expected_attrs: Mapping[str, Any] | None = None,
    ):
        self.cache = cache if isinstance(cache, LatentCache) else LatentCache.open(cache)
        if expected_attrs is not None:
            self.cache.check_compatible(expected_attrs)
        if not self.cache.is_complete():
            pending = self.cache.pending_shards()
            waiting = pending if pending else self.cache.pending_semantic_shards()
            stage = "encoded" if pending else "given semantic latents (SemVAE pass)"
            raise CacheError(
                f"cache {self.cache.path} is incomplete: shards {waiting[:10]} are not {stage} yet; "
                "re-run the same encode command to finish it"
            )
        # zarr reads a missing chunk file as zeros: every recorded file must exist with its size
        # before the first batch (deep checksum checks happen as chunks are decoded).
        damage = self.cache.find_damage(deep=False)
        damage.pop("stats", None)  # reported by stats() below, with its own fix
        if damage:
            lines = [f"  {part}: {p}" for part, probs in list(damage.items())[:10] for p in probs[:3]]
            raise CacheError(
                f"cache {self.cache.path} is damaged ({len(damage)} part(s)):\n" + "\n".join(lines)
                + f"\nFix: {FIX_HINT}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if mode not in ("memory", "stream"):
            raise ValueError(f"mode must be 'memory' or 'stream', got {mode!r}")
        if load_dino and not self.cache.has_dino:
            raise CacheError(f"cache {self.cache.path} has no DINO targets (created with store_dino=False)")
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.mode, self.window_chunks, self.load_dino = mode, int(window_chunks), load_dino

        layout = self.cache.layout
        self._rpc = layout.rows_per_chunk
        self._labels = torch.from_numpy(self.cache.labels())
        self._valid = self.cache.valid()
        if not self._valid.any():
            raise CacheError(f"cache {self.cache.path} has no valid rows")
        stats = self.cache.stats()
        # [1, C, 1, 1] so they broadcast over a [B, C, h, w] batch.
        self._mean = {p: torch.from_numpy(stats[f"{p}_mean"]).view(1, -1, 1, 1) for p in ("texture", "semantic")}
        self._std = {p: torch.from_numpy(stats[f"{p}_std"]).view(1, -1, 1, 1) for p in ("texture", "semantic")}
        self._arrays = {p: self.cache.group[p] for p in ("texture", "semantic")}
        self._dino = self.cache.group["dino"] if load_dino else None

        self.epoch, self.index = 0, 0
        self._plan_epoch: int | None = None
        self._plan: _EpochPlan | None = None
        self._windows: dict[int, dict[str, np.ndarray]] = {}
        self._pending: dict[int, Future[dict[str, np.ndarray]]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._dino_pool: ThreadPoolExecutor | None = None
        self._dino_ahead: dict[tuple[int | None, int], Future[np.ndarray]] = {}  # (epoch, start)
        if mode == "memory":
            self._windows[0] = self._load_chunks(np.arange(layout.num_chunks))
        self._items_per_rank = len(self._make_plan(0).rows)
        if self._items_per_rank == 0:
            raise CacheError(
                f"rank {rank} of {world_size} gets no rows from {self.cache.path} "
                f"({int(self._valid.sum())} valid rows in {layout.num_chunks} chunks)"
            )

    # ---- order ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Items this rank yields per epoch (equal on every rank)."""
        return self._items_per_rank

    def _make_plan(self, epoch: int) -> _EpochPlan:
        rng = np.random.default_rng([self.seed, epoch])
        if self.mode == "memory":
            perm = rng.permutation(np.flatnonzero(self._valid))
            flips = rng.integers(0, 2, size=len(perm), dtype=np.int64)  # drawn per global position
            per_rank = len(perm) // self.world_size
            take = slice(self.rank, per_rank * self.world_size, self.world_size)
            rows = perm[take]
            zeros = np.zeros(len(rows), dtype=np.int64)
            return _EpochPlan(rows, flips[take], zeros, rows.copy(), [])

        # Stream mode: chunks dealt to ranks in a per-epoch random order, read a window at a time.
        layout = self.cache.layout
        valid_per_chunk = valid_rows_per_chunk(self._valid, self._rpc)
        all_windows = chunk_windows(valid_per_chunk, self.seed, epoch, self.world_size, self.window_chunks)
        per_rank = min(int(sum(valid_per_chunk[w].sum() for w in ws)) for ws in all_windows)
        rows_l, flips_l, win_l, slot_l, windows = [], [], [], [], []
        for w, wchunks in enumerate(all_windows[self.rank]):
            windows.append(wchunks)
            rows = np.concatenate([np.arange(*layout.chunk_rows(int(c))) for c in wchunks])
            slots = np.concatenate(
                [j * self._rpc + np.arange(np.diff(layout.chunk_rows(int(c)))[0]) for j, c in enumerate(wchunks)]
            )
            keep = self._valid[rows]
            rows, slots = rows[keep], slots[keep]
            wrng = np.random.default_rng([self.seed, epoch, self.rank, w])
            order = wrng.permutation(len(rows))
            rows_l.append(rows[order])
            slot_l.append(slots[order])
            flips_l.append(wrng.integers(0, 2, size=len(rows), dtype=np.int64))
            win_l.append(np.full(len(rows), w, dtype=np.int64))
        cat = lambda parts: np.concatenate(parts)[:per_rank] if parts else np.zeros(0, np.int64)
        return _EpochPlan(cat(rows_l), cat(flips_l), cat(win_l), cat(slot_l), windows)

    def _plan_for(self, epoch: int) -> _EpochPlan:
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self._make_plan(epoch), epoch
            if self.mode == "stream":
                self._drop_windows(keep=set())
        assert self._plan is not None
        return self._plan

    def state_dict(self) -> dict[str, Any]:
        """Position to resume from: the next item is ``index`` of ``epoch`` (per rank)."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "world_size": self.world_size,
            "mode": self.mode,
            "window_chunks": self.window_chunks if self.mode == "stream" else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # The order is a function of these settings; resuming under others would replay or skip rows.
        mine = self.state_dict()
        diffs = [k for k in ("seed", "world_size", "mode", "window_chunks") if k in state and state[k] != mine[k]]
        if diffs:
            raise ValueError(
                "reader state was saved with different settings: "
                + ", ".join(f"{k}={state[k]!r} (now {mine[k]!r})" for k in diffs)
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    # ---- data ----------------------------------------------------------------------------------

    def _load_chunks(self, chunk_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Texture and semantic of whole chunks, laid out chunk j at rows [j*rpc, (j+1)*rpc)."""
        layout = self.cache.layout
        out = {}
        for part, arr in self._arrays.items():
            buf = np.zeros((len(chunk_ids) * self._rpc, *arr.shape[1:]), dtype=np.float16)
            for j, c in enumerate(chunk_ids):
                r0, r1 = layout.chunk_rows(int(c))
                buf[j * self._rpc : j * self._rpc + (r1 - r0)] = self.cache.checked_read(part, slice(r0, r1), (r0, r1))
            out[part] = buf
        return out

    def _window(self, plan: _EpochPlan, w: int) -> dict[str, np.ndarray]:
        if self.mode == "memory":
            return self._windows[0]
        if w not in self._windows:
            fut = self._pending.pop(w, None)
            self._windows[w] = fut.result() if fut is not None else self._load_chunks(plan.window_chunks[w])
            # Keep the previous window (a batch may straddle two) and start reading the next one.
            self._drop_windows(keep={w - 1, w})
            if w + 1 < len(plan.window_chunks) and w + 1 not in self._pending:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sfd-cache-prefetch")
                self._pending[w + 1] = self._pool.submit(self._load_chunks, plan.window_chunks[w + 1])
        return self._windows[w]

    def _drop_windows(self, keep: set[int]) -> None:
        for w in [w for w in self._windows if w not in keep]:
            del self._windows[w]
        for w in [w for w in self._pending if w not in keep and w != max(keep, default=-2) + 1]:
            self._pending.pop(w).cancel()

    def _gather(self, plan: _EpochPlan, sel: slice) -> LatentBatch:
        rows, flips, wins, slots = plan.rows[sel], plan.flips[sel], plan.window[sel], plan.slot[sel]
        win_ids = [int(w) for w in np.unique(wins)]
        windows = {w: self._window(plan, w) for w in win_ids}
        ct, cs = self.cache.layout.texture_shape[0], self.cache.layout.semantic_shape[0]
        hw = self.cache.layout.texture_shape[1:]
        # One output allocation, filled and normalised in place: at ~50 MB/s-per-batch rates the
        # extra temporaries of cat / out-of-place arithmetic cost more than the gather itself.
        x = torch.empty((len(rows), ct + cs, *hw), dtype=torch.float32)
        for part, dst in (("texture", x[:, :ct]), ("semantic", x[:, ct:])):
            # Row-major [slot, flip] → flat index slot*2 + flip: a single np.take gather.
            flat_idx = slots * 2 + flips
            for w in win_ids:
                buf = windows[w][part]
                flat = buf.reshape(buf.shape[0] * buf.shape[1], -1)
                if len(win_ids) == 1:
                    dst.copy_(torch.from_numpy(np.take(flat, flat_idx, axis=0)).view(dst.shape))
                else:
                    m = wins == w
                    dst[torch.from_numpy(m)] = torch.from_numpy(np.take(flat, flat_idx[m], axis=0)).view(-1, *dst.shape[1:]).float()
            dst.sub_(self._mean[part]).div_(self._std[part])
        y = self._labels[torch.from_numpy(rows)]
        repa = None
        if self._dino is not None:
            # Read ahead by batches(); read here when no read-ahead exists (first batch, resume).
            fut = self._dino_ahead.pop((self._plan_epoch, sel.start), None)
            dino = fut.result() if fut is not None else self._read_dino(rows, flips)
            repa = torch.from_numpy(dino).float()
        return LatentBatch(x, y, repa, rows, flips)

    def _read_dino(self, rows: np.ndarray, flips: np.ndarray) -> np.ndarray:
        # One (row, flip) inner chunk per item; zarr gives no faster random access to them.
        assert self._dino is not None
        out = []
        for r, f in zip(rows, flips):
            try:
                out.append(np.asarray(self._dino[int(r), int(f)]))
            except Exception:  # noqa: BLE001 - re-read through the checked path for a clear error
                out.append(self.cache.checked_read("dino", (int(r), int(f)), (int(r), int(r) + 1)))
        return np.stack(out)

    def _read_dino_ahead(self, plan: _EpochPlan, start: int, batch_size: int) -> None:
        # The REPA targets of the next batch are read in a thread (zarr waits release the GIL)
        # while the caller trains on the current one; only within the epoch, to stay simple.
        if start + batch_size > len(plan.rows):
            return
        if self._dino_pool is None:
            self._dino_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sfd-dino-prefetch")
        sel = slice(start, start + batch_size)
        self._dino_ahead[(self._plan_epoch, start)] = self._dino_pool.submit(self._read_dino, plan.rows[sel], plan.flips[sel])

    def batches(self, batch_size: int) -> Iterator[LatentBatch]:
        """Yield batches forever, epoch after epoch, starting from the current position.

        Batches never straddle epochs; the last ``len(self) % batch_size`` items of an epoch are
        skipped (they are different rows each epoch). :meth:`state_dict` taken after a batch was
        yielded resumes right after it.
        """
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if batch_size > len(self):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(self)} items per rank per epoch")
        try:
            while True:
                plan = self._plan_for(self.epoch)
                if self.index + batch_size > len(plan.rows):
                    self.epoch, self.index = self.epoch + 1, 0
                    continue
                batch = self._gather(plan, slice(self.index, self.index + batch_size))
                self.index += batch_size
                if self._dino is not None:
                    self._read_dino_ahead(plan, self.index, batch_size)
                yield batch
        finally:
            self.close()

    def item(self, row: int, flip: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One item by cache row and flip, read directly (slow; for inspection and tests)."""
        parts = []
        for part in ("texture", "semantic"):
            x = torch.from_numpy(np.asarray(self._arrays[part][row, flip])).float()[None]
            parts.append((x - self._mean[part]) / self._std[part])
        repa = None
        if self._dino is not None:
            repa = torch.from_numpy(np.asarray(self._dino[row, flip])).float()
        return torch.cat(parts, dim=1)[0], self._labels[row], repa

    def close(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        for fut in self._dino_ahead.values():
            fut.cancel()
        self._dino_ahead.clear()
        for pool in (self._pool, self._dino_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._dino_pool = None
        if self.mode == "stream":
            self._windows.clear()


class DinoTokenReader:
    """Batches of DINO tokens (B, N, D) float32 for the Semantic-VAE trainer: both flips of every
    valid row, in the windowed order of :func:`chunk_windows` (the stream mode's), resumable.

    The order depends only on (seed, epoch, rank, world size); ``batches(epoch, start)`` skips the
    first ``start`` batches of the epoch without reading them. Every rank yields the same number
    of batches per epoch (the smallest rank's count).
    """

    def __init__(self, cache: LatentCache, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, window_chunks: int = 16):
        if not cache.has_dino:
            raise CacheError(f"cache {cache.path} stores no DINO features (encoded with --repa-targets none)")
        if not cache.is_encoded():
            raise CacheError(f"cache {cache.path} is not fully encoded ({len(cache.pending_shards())} shards pending)")
        damage = {k: v for k, v in cache.find_damage(deep=False).items() if k != "stats"}
        if damage:  # a missing DINO file would read as zeros (zarr's fill value)
            part, problems = next(iter(damage.items()))
            raise CacheError(f"cache {cache.path} is damaged ({len(damage)} part(s); {part}: {problems[0]}). Fix: {FIX_HINT}")
        self.cache, self.batch_size, self.seed = cache, batch_size, seed
        self.rank, self.world_size, self.window_chunks = rank, world_size, max(1, window_chunks)
        layout = cache.layout
        valid = cache.valid()
        self.chunk_rows = [np.flatnonzero(valid[a:b]) + a for a, b in map(layout.chunk_rows, range(layout.num_chunks))]
        self.valid_per_chunk = valid_rows_per_chunk(valid, layout.rows_per_chunk)
        self.arr = cache.group["dino"]
        if sum(len(r) for r in self.chunk_rows) == 0:
            raise CacheError(f"cache {cache.path} has no valid rows")
        self.pool = ThreadPoolExecutor(1)

    def _windows(self, epoch: int, rank: int) -> list[np.ndarray]:
        return chunk_windows(self.valid_per_chunk, self.seed, epoch, self.world_size, self.window_chunks)[rank]

    def _size(self, chunks: np.ndarray) -> int:
        return 2 * sum(len(self.chunk_rows[c]) for c in chunks)  # both flips

    def batches_per_epoch(self, epoch: int) -> int:
        counts = [sum(map(self._size, self._windows(epoch, r))) for r in range(self.world_size)]
        n = min(counts) // self.batch_size
        if n == 0:
            raise CacheError(f"a rank has {min(counts)} samples per epoch, fewer than one batch of {self.batch_size}")
        return n

    def _load(self, epoch: int, w: int, chunks: np.ndarray) -> np.ndarray:
        """The window's (row, flip) samples in their shuffled order, fp16 (n, N, D)."""
        parts = []
        for c in chunks:
            a, b = self.cache.layout.chunk_rows(int(c))
            block = self.cache.checked_read("dino", slice(a, b), (a, b))  # one zarr shard: (rows, 2, N, D)
            parts.append(block[self.chunk_rows[c] - a].reshape(-1, *block.shape[2:]))
        samples = np.concatenate(parts)
        perm = np.random.default_rng([self.seed, epoch, self.rank, w]).permutation(len(samples))
        return samples[perm]

    def batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        num, B = self.batches_per_epoch(epoch), self.batch_size
        windows = self._windows(epoch, self.rank)
        first_sample, pos, emitted = start * B, 0, start
        carry: np.ndarray | None = None
        pending: Future[np.ndarray] | None = None
        for w, chunks in enumerate(windows):
            size = self._size(chunks)
            if pos + size <= first_sample:  # wholly before the resume point: never read
                pos += size
                continue
            data = pending.result() if pending is not None else self._load(epoch, w, chunks)
            pending = self.pool.submit(self._load, epoch, w + 1, windows[w + 1]) if w + 1 < len(windows) else None
            data = data[max(0, first_sample - pos) :]
            pos += size
            if carry is not None and len(carry):
                data = np.concatenate([carry, data])
            i = 0
            while len(data) - i >= B and emitted < num:
                yield torch.from_numpy(data[i : i + B].astype(np.float32))
                i, emitted = i + B, emitted + 1
            carry = data[i:]
            if emitted >= num:
                break
        if pending is not None:
            pending.cancel()
