"""Training-time readers of the latent cache: shuffled, resumable, DDP-sharded batches.

One windowed visiting order (:func:`chunk_windows`) serves both trainers: the diffusion
trainer's :class:`LatentCacheReader` (composite latents, below) and the Semantic-VAE trainer's
:class:`DinoTokenReader` (DINO tokens, both flips of every row, whole-chunk reads).

Each item is the composite latent ``[texture | semantic]`` (docs/architecture.md, Conventions: texture channels first),
each part normalised per channel as ``(x - μ_c) / σ_c`` with the statistics stored in the cache
(docs/method.md §2.4), its label, and optionally its stored REPA target (DINOv2 patch tokens).
Every item picks the plain or the flipped copy with probability 1/2, and the same choice for all
parts (docs/method.md §2.5).

Where the bytes come from
    The cache's arrays are stored uncompressed (``sfd/data/cache.py``), so a zarr chunk file *is*
    the raw little-endian array of its rows, and a zarr shard file (the ``dino`` array) is raw
    inner chunks located by the shard index at its end. The reader ``pread``s each item straight
    from those files into the batch buffer: no per-item zarr call (~1-2 ms of Python each), no
    private copy. The bytes come from the kernel's page cache, which every process on the host
    shares, so eight ranks on a node hold **one** copy of the cache, and an item costs one system
    call and one copy. (Memory-mapping the files was the first design; each first touch of a page
    of a fresh map traps, which cost ~4x the CPU time of ``pread`` for the same gather.) A cache
    whose codecs are not plain bytes (compressed, or anything this reader does not recognise) is
    read through zarr chunk by chunk instead (same results, slower); :attr:`LatentCacheReader.raw`
    says which path is in use.

``mode="pagecache"`` (the default)
    Everything is read from the page cache. Private memory per process is a few batches; the
    node's page cache holds what was touched (at most the cache's size: 49 KB per image for
    texture + semantic, 63 GB for ImageNet-1k, plus 786 KB per image if REPA targets are stored).

``mode="memory"``
    Texture and semantic latents are copied into this process's RAM at start (``N × 49 KB`` per
    process), which saves the system call per item; REPA targets are still read from the page
    cache. For small caches and single-process runs.

Order (the same in both modes, and for any number of processes)
    The order of an epoch is a function of ``(seed, epoch)`` only: chunks (``rows_per_chunk``
    contiguous rows) are permuted, grouped into windows of ``window_chunks`` chunks, and the valid
    rows of each window are shuffled together; one flip is drawn per global position. Global
    batch ``k`` is positions ``[k·G, (k+1)·G)`` of that sequence (``G`` = per-rank batch × world
    size), and rank ``r`` takes positions ``r, r+W, r+2W, …`` of it — the trainer's convention
    (``train/main.py``: "rank r's k-th item is global item r + kW"). So 1 and N processes see the
    same global batches, and a checkpoint saved under one world size resumes under another when
    the consumed count divides. Windows keep the pages touched by a stretch of batches local
    (readahead-friendly on a cold disk, few maps open at once, and a batch touches at most
    ``window_chunks`` chunk files, which bounds the gather's per-file work); ``window_chunks=0``
    makes one window, a full permutation. The default, 64 chunks = 4,096 rows, is 16 batches of
    256 drawn from one random 0.3 % of ImageNet (in the encode job's permuted row order). If rows are stored in class order, a batch sees at most
    ``~window_chunks × rows_per_chunk / images_per_class`` classes; the encode job's permuted row
    order (``ImageList.permuted``) removes that correlation.

Batch assembly is memory-bound NumPy/torch work in the calling process; run it with one torch
CPU thread (torchrun's default OMP_NUM_THREADS=1): on a busy CPU the intra-op thread pool made it
~6x slower in ``bench/cache_reader.py``.

Resume: :meth:`LatentCacheReader.state_dict` records ``(epoch, index)``, the number of items of
this epoch already yielded by this rank, so a resumed run continues with exactly the batches it
would have seen. Each rank yields ``n_valid // world_size`` items per epoch (the remainder,
fewer than ``world_size`` rows, differs every epoch), and ranks never share a row within an epoch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from sfd.data.cache import FIX_HINT, NUM_FLIPS, CacheError, LatentCache
from sfd.registry import Registry


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


# ``mode`` (``TrainConfig.data_mode``): the names :class:`LatentCacheReader` dispatches on (module docstring).
MODES: Registry[str] = Registry("reader mode")
MODES.register("memory", "texture and semantic latents copied into RAM at start")
MODES.register("pagecache", "everything read from the page cache, a few batches of private memory")
DEFAULT_WINDOW_CHUNKS = 64  # 4,096 rows of 64 (a random 0.3 % of ImageNet in permuted row order)


class LatentBatch(NamedTuple):
    x: torch.Tensor  # [B, Ct+Cs, h, w] float32, normalised, texture channels first
    y: torch.Tensor  # [B] int64 class labels
    repa: torch.Tensor | None  # [B, tokens, dim] float16 stored REPA targets (cast on the device), or None
    rows: np.ndarray  # [B] cache row of each item (for logging / debugging)
    flips: np.ndarray  # [B] 0 = plain, 1 = horizontally flipped


def epoch_order(
    seed: int, epoch: int, valid: np.ndarray, rows_per_chunk: int, window_chunks: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, flips) of the whole epoch, in global order: a function of its arguments only."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    n = len(valid)
    num_chunks = -(-n // rows_per_chunk)
    chunks = rng.permutation(num_chunks)
    rows = (chunks[:, None] * rows_per_chunk + np.arange(rows_per_chunk)[None, :]).ravel()
    per_window = num_chunks if window_chunks <= 0 else int(window_chunks)
    window = np.repeat(np.arange(num_chunks) // per_window, rows_per_chunk)
    keep = rows < n
    rows, window = rows[keep], window[keep]
    keep = valid[rows]
    rows, window = rows[keep], window[keep]
    # Shuffle within windows: sort by (window, random key). One generator for the epoch.
    keys = rng.random(len(rows))
    order = np.lexsort((keys, window))
    flips = rng.integers(0, NUM_FLIPS, size=len(rows), dtype=np.int64)
    return rows[order], flips


# ---- raw access to the chunk files ---------------------------------------------------------------


# Below glibc's largest dynamic mmap threshold (32 MiB on 64-bit) malloc hands a freed batch's
# memory to the next one, already faulted in; above it every allocation is a fresh map.
_HUGE_MIN_BYTES = 32 << 20


def _empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``np.empty``, for very large buffers backed by transparent huge pages where the kernel offers them.

    A batch of REPA targets (100 MB at batch 256) is fresh memory every time: the kernel traps on
    the first touch of each 4 KiB page while ``pread`` fills it, 25,000 traps that cost ~40 % of
    the gather's CPU time (measured: 41 vs 28 ms per batch). 2 MiB pages take 50. Where huge pages
    are off the advice is ignored and this is a plain anonymous map."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes < _HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):
        buf.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)  # the array keeps the map alive


def _plain_bytes(codecs: list[dict[str, Any]]) -> bool:
    """Codecs that leave the chunk's bytes raw at offset 0: little-endian bytes (+ a trailing crc32c)."""
    if not codecs or codecs[0].get("name") != "bytes":
        return False
    if codecs[0].get("configuration", {}).get("endian", "little") != "little":
        return False
    return all(c.get("name") == "crc32c" for c in codecs[1:])


class _ChunkedItems:
    """Items ``[row, flip]`` of one cache array, read chunk file by chunk file.

    Each chunk file holds ``rows_per_chunk`` rows; :meth:`chunk` returns ``(flat, slots)``: a
    ``[k, item_elems]`` float16 array (a view of a memory map when the layout is raw) and a
    ``[rows_per_chunk, 2]`` table of the slot of each (row in chunk, flip) in it (memory mode's
    start-up copy and the zarr fallback); :meth:`gather` ``pread``s raw items. Open maps and
    files are kept in LRUs of ``max_open`` entries (file descriptors and maps are limited).
    """

    def __init__(self, cache: LatentCache, name: str, max_open: int):
        self.cache, self.name, self.max_open = cache, name, max_open
        self.array = cache.group[name]
        self.rpc = cache.layout.rows_per_chunk
        self.item_shape = tuple(self.array.shape[2:])
        self.item_elems = int(np.prod(self.item_shape))
        self.item_bytes = self.item_elems * 2
        self.stored_bytes = self.item_bytes  # an inner chunk on disk: the item (+ its checksum)
        self.dir = Path(cache.path) / name
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._fds: OrderedDict[int, tuple[int, list[list[int]]]] = OrderedDict()
        meta = json.loads((self.dir / "zarr.json").read_text())
        self.sharded = False
        self.raw = self.array.dtype == np.float16 and meta.get("chunk_key_encoding", {}).get("name") == "default"
        codecs = meta.get("codecs", [])
        chunk_rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        if codecs and codecs[0].get("name") == "sharding_indexed":
            cfg = codecs[0]["configuration"]
            self.sharded = True
            self.inner = list(cfg["chunk_shape"])
            self.index_tail = 4 * sum(c.get("name") == "crc32c" for c in cfg["index_codecs"])
            # Each inner chunk (one item) may end with its own CRC32C (docs/reliability.md): the
            # items then sit every item_bytes + 4 bytes, still raw, and are read without it.
            self.stored_bytes = self.item_bytes + 4 * sum(c.get("name") == "crc32c" for c in cfg["codecs"][1:])
            self.raw &= (
                _plain_bytes(cfg["codecs"]) and cfg.get("index_location", "end") == "end"
                and _plain_bytes(cfg["index_codecs"]) and self.inner == [1, 1, *self.item_shape]
            )
        else:
            self.raw &= _plain_bytes(codecs)
        self.raw &= chunk_rows == self.rpc and list(meta["shape"][1:]) == [NUM_FLIPS, *self.item_shape]
        # CRC32C trailers: whole chunk file (plain arrays) or each inner chunk (the sharded targets).
        self.chunk_crc = not self.sharded and any(c.get("name") == "crc32c" for c in codecs[1:])
        self.inner_crc = self.sharded and self.stored_bytes > self.item_bytes
        self._verified: set[int] = set()
        self._scratch = np.empty(0, dtype=np.uint8)  # _read_whole's buffer, grown on demand
        self._regular = (np.arange(self.rpc)[:, None] * NUM_FLIPS + np.arange(NUM_FLIPS)[None, :]).astype(np.int64)

    def _read_whole(self, fd: int, size: int) -> np.ndarray:
        """The file's bytes, read into a scratch buffer reused for every file (fresh memory per
        file would fault in every page: see :func:`_empty`)."""
        if self._scratch.nbytes < size:
            self._scratch = _empty((size,), np.uint8)
        view = self._scratch[:size]
        if os.preadv(fd, [view], 0) != size:
            raise OSError(f"short read of {size} bytes")
        return view

    def _verify(self, chunk: int, data: bytes | mmap.mmap | np.ndarray, offsets: list[list[int]] | None = None) -> None:
        """Check a chunk file's CRC32C once per process (the raw paths skip zarr's decoding, which
        would check it): the whole file's trailer, or each stored item's. A mismatch is the same
        error a zarr read gives, naming the array, the file and the fix."""
        if chunk in self._verified:
            return
        import google_crc32c

        # A numpy view is checksummed in place; slicing bytes or a map would copy every item.
        view = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        bad = False
        if self.chunk_crc:
            bad = google_crc32c.value(view[:-4]) != int.from_bytes(view[-4:].tobytes(), "little")
        elif self.inner_crc and offsets is not None:
            n = self.item_bytes
            for off in (o for row in offsets for o in row if o >= 0):
                if google_crc32c.value(view[off : off + n]) != int.from_bytes(view[off + n : off + n + 4].tobytes(), "little"):
                    bad = True
                    break
        del view  # a view of a map must not outlive this call (the map may close)
        if bad:
            raise CacheError(
                f"cache {self.cache.path}: array '{self.name}' chunk file {self._file(chunk)} does not decode "
                f"(checksum mismatch). Fix: {FIX_HINT}"
            )
        self._verified.add(chunk)

    def _file(self, chunk: int) -> Path:
        return self.dir / "c" / str(chunk) / "/".join("0" * (self.array.ndim - 1))

    def _load(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.raw:
            r0, r1 = self.cache.layout.chunk_rows(chunk)
            buf = np.zeros((self.rpc * NUM_FLIPS, self.item_elems), dtype=np.float16)
            buf[: (r1 - r0) * NUM_FLIPS] = np.asarray(self.array[r0:r1]).reshape(-1, self.item_elems)
            return buf, self._regular
        path = self._file(chunk)
        try:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (FileNotFoundError, ValueError) as e:  # ValueError: empty file
            raise CacheError(f"cache {self.cache.path}: chunk file {path} is missing or empty ({e}); re-run the encode command") from e
        if not self.sharded:
            # Chunks are written whole (edge chunks padded), so every chunk file has this size.
            need = self.rpc * NUM_FLIPS * self.item_bytes
            if len(mm) < need:
                raise CacheError(f"cache {self.cache.path}: chunk file {path} has {len(mm)} bytes, expected {need}; re-run the encode command")
            self._verify(chunk, mm)
            flat = np.frombuffer(mm, dtype="<f2", count=need // 2).reshape(-1, self.item_elems)
            return flat, self._regular
        # Shard index at the end: (offset, nbytes) uint64 per inner chunk, in C order, + crc32c.
        n_inner = self.rpc * NUM_FLIPS
        index_start = len(mm) - 16 * n_inner - self.index_tail
        if index_start < 0:
            raise CacheError(f"cache {self.cache.path}: shard file {path} is truncated ({len(mm)} bytes); re-run the encode command")
        index = np.frombuffer(mm, dtype="<u8", count=2 * n_inner, offset=index_start).reshape(self.rpc, NUM_FLIPS, 2)
        offsets, nbytes = index[..., 0], index[..., 1]
        present = offsets != np.iinfo(np.uint64).max
        # zarr leaves out inner chunks equal to the fill value (all zeros): slot -1 reads as zeros.
        stride = self.stored_bytes
        if (nbytes[present] != stride).any() or (offsets[present] % stride).any():
            raise CacheError(f"cache {self.cache.path}: shard file {path} has an unexpected index; re-run the encode command for its rows")
        slots = np.where(present, offsets // stride, -1).astype(np.int64)
        if present.any() and int((offsets[present] + nbytes[present]).max()) > index_start:
            raise CacheError(f"cache {self.cache.path}: shard file {path} has an index pointing past its data; re-run the encode command")
        self._verify(chunk, mm, np.where(present, offsets.astype(np.int64), -1).tolist())
        # Item k at byte k·stride (its checksum, if any, in the 4 bytes after it): a strided view.
        flat = np.ndarray((index_start // stride, self.item_elems), dtype="<f2", buffer=mm, strides=(stride, 2))
        return flat, slots

    def _handle(self, c: int) -> tuple[int, list[list[int]]]:
        """(open file descriptor, byte offset of each (row in chunk, flip), -1 = all zeros)."""
        hit = self._fds.get(c)
        if hit is not None:
            self._fds.move_to_end(c)
            return hit
        path = self._file(c)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as e:
            raise CacheError(f"cache {self.cache.path}: chunk file {path} is missing ({e}); re-run the encode command") from e
        size = os.fstat(fd).st_size
        if not self.sharded:
            if size < self.rpc * NUM_FLIPS * self.item_bytes:
                os.close(fd)
                raise CacheError(f"cache {self.cache.path}: chunk file {path} has {size} bytes, expected "
                                 f"{self.rpc * NUM_FLIPS * self.item_bytes}; re-run the encode command")
            offsets = (self._regular * self.item_bytes).tolist()
            if self.chunk_crc and c not in self._verified:
                try:
                    self._verify(c, self._read_whole(fd, size))
                except CacheError:
                    os.close(fd)
                    raise
        else:
            n_inner = self.rpc * NUM_FLIPS
            index_start = size - 16 * n_inner - self.index_tail
            if index_start < 0:
                os.close(fd)
                raise CacheError(f"cache {self.cache.path}: shard file {path} is truncated ({size} bytes); re-run the encode command")
            index = np.frombuffer(os.pread(fd, 16 * n_inner, index_start), dtype="<u8").reshape(self.rpc, NUM_FLIPS, 2)
            present = index[..., 0] != np.iinfo(np.uint64).max
            ends = index[..., 0][present] + index[..., 1][present]
            if (index[..., 1][present] != self.stored_bytes).any() or (present.any() and int(ends.max()) > index_start):
                os.close(fd)
                raise CacheError(f"cache {self.cache.path}: shard file {path} has an unexpected index; re-run the encode command for its rows")
            # zarr leaves out inner chunks equal to the fill value (all zeros): offset -1.
            offsets = np.where(present, index[..., 0].astype(np.int64), -1).tolist()
            if self.inner_crc and c not in self._verified:
                try:
                    self._verify(c, self._read_whole(fd, index_start), offsets)
                except CacheError:
                    os.close(fd)
                    raise
        hit = self._fds[c] = (fd, offsets)
        while len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1][0])
        return hit

    def check(self, c: int) -> None:
        """Read chunk file ``c`` once and check its checksums (the check a first read does):
        raw layouts through :meth:`_verify`, others by decoding through zarr. Raises
        :class:`CacheError` naming the file."""
        if not self.raw:
            self._load(c)
        elif c not in self._verified:
            self._handle(c)
            os.close(self._fds.pop(c)[0])  # checked, not read from: no descriptor kept

    def chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._open.get(c)
        if hit is not None:
            self._open.move_to_end(c)
            return hit
        hit = self._open[c] = self._load(c)
        # Chunks loaded through zarr are private copies (50 MB for 64 rows of REPA targets):
        # bound them by bytes, not only by count.
        keep = self.max_open if self.raw else max(2, min(self.max_open, (1 << 30) // (self.rpc * NUM_FLIPS * self.item_bytes)))
        while len(self._open) > keep:
            self._open.popitem(last=False)  # the map closes when the last view of it is gone
        return hit

    def gather(self, rows: np.ndarray, flips: np.ndarray, out: np.ndarray) -> None:
        """``out[i] = item(rows[i], flips[i])`` (``out`` is ``[B, item_elems]`` float16, C-contiguous)."""
        if self.raw:
            # One pread per item straight into the batch buffer: the kernel copies from the page
            # cache (shared by every process on the host), no map to set up and fault in. On a
            # fresh memory map each first touch of a page traps, which made the same gather ~4x
            # more expensive in CPU time.
            rpc, nbytes = self.rpc, self.item_bytes
            for i, (r, f) in enumerate(zip(rows.tolist(), flips.tolist())):
                c = r // rpc
                fd, offsets = self._handle(c)
                off = offsets[r - c * rpc][f]
                if off < 0:
                    out[i] = 0
                elif os.preadv(fd, [out[i]], off) != nbytes:
                    raise CacheError(f"cache {self.cache.path}: short read of row {r} from {self._file(c)}; re-run the encode command")
            return
        chunk_of = rows // self.rpc
        order = np.argsort(chunk_of, kind="stable")
        sorted_chunks = chunk_of[order]
        starts = np.flatnonzero(np.r_[True, sorted_chunks[1:] != sorted_chunks[:-1]])
        ends = np.r_[starts[1:], len(order)]
        local = rows - chunk_of * self.rpc
        for s, e in zip(starts.tolist(), ends.tolist()):
            flat, slots = self.chunk(int(sorted_chunks[s]))
            sel = order[s:e]
            idx = slots[local[sel], flips[sel]]
            out[sel] = flat[idx]
            if (idx < 0).any():  # inner chunks left out by zarr are all zeros
                out[sel[idx < 0]] = 0

    def close(self) -> None:
        self._open.clear()
        self._scratch = np.empty(0, dtype=np.uint8)
        while self._fds:
            os.close(self._fds.popitem()[1][0])

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


# ---- the reader ------------------------------------------------------------------------------------


class LatentCacheReader:
    """Batches of normalised composite latents from a finished :class:`LatentCache`.

    ``reuse_buffers``: a batch's latents ``x`` (12.6 MB at batch 256) and REPA targets (100 MB)
    are written into one of two sets of buffers kept for the whole run instead of fresh memory,
    so they are overwritten when the batch after the next one is drawn. For a consumer that is
    done with a batch before it draws the one after next, as the trainer is (it copies a batch
    to the device, or on the CPU trains on it, before drawing the next). Fresh memory costs a
    page fault per 4 KiB on first touch whenever the allocator has handed the last batch's
    back to the kernel: measured, one batch in three at 2–3× the time of the others.
    """

    def __init__(
        self,
        cache: LatentCache | str | os.PathLike[str],
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        load_dino: bool = False,
        mode: Literal["memory", "pagecache"] = "pagecache",
        window_chunks: int = DEFAULT_WINDOW_CHUNKS,
        expected_attrs: Mapping[str, Any] | None = None,
        reuse_buffers: bool = False,
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
        if mode not in MODES:
            hint = " (stream mode was replaced by pagecache: bounded memory, and the same order on any world size)" if mode == "stream" else ""
            raise ValueError(f"mode must be one of {' | '.join(MODES)}, got {mode!r}{hint}")
        if load_dino and not self.cache.has_dino:
            raise CacheError(f"cache {self.cache.path} has no DINO targets (created with store_dino=False)")
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.mode, self.window_chunks, self.load_dino = mode, int(window_chunks), load_dino
        self.reuse_buffers = bool(reuse_buffers)
        self._buffers: dict[str, np.ndarray] = {}  # see _buffer
        self._batches_drawn = 0

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
        # (x - μ) / σ as x·(1/σ) + (-μ/σ), the constants rounded to float32 once.
        self._scale = {p: (1.0 / self._std[p].double()).float() for p in self._std}
        self._shift = {p: (-self._mean[p].double() / self._std[p].double()).float() for p in self._std}
        # Enough open files for two windows (a batch may straddle two), never near the kernel's limit.
        max_open = max(64, min(8192, 2 * (self.window_chunks or layout.num_chunks) + 8))
        parts = ("texture", "semantic", "dino") if load_dino else ("texture", "semantic")
        self._items = {p: _ChunkedItems(self.cache, p, max_open) for p in parts}
        self.raw = all(s.raw for s in self._items.values())
        self._ram: dict[str, np.ndarray] = {}
        if mode == "memory":
            for p in ("texture", "semantic"):
                src = self._items[p]
                buf = np.empty((layout.num_chunks * self._rpc * NUM_FLIPS, src.item_elems), dtype=np.float16)
                for c in range(layout.num_chunks):
                    flat, slots = src.chunk(c)
                    buf[c * self._rpc * NUM_FLIPS : (c + 1) * self._rpc * NUM_FLIPS] = flat[slots.ravel()]
                src.close()
                self._ram[p] = buf

        self.epoch, self.index = 0, 0
        self._order_epoch: int | None = None
        self._order: tuple[np.ndarray, np.ndarray] | None = None
        self._items_per_rank = int(self._valid.sum()) // self.world_size
        if self._items_per_rank == 0:
            raise CacheError(
                f"rank {rank} of {world_size} gets no rows from {self.cache.path} "
                f"({int(self._valid.sum())} valid rows)"
            )

    # ---- order ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Items this rank yields per epoch (equal on every rank)."""
        return self._items_per_rank

    def _order_for(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (rows, flips) of ``epoch``: global positions r, r+W, ... of the epoch order."""
        if self._order_epoch != epoch:
            rows, flips = epoch_order(self.seed, epoch, self._valid, self._rpc, self.window_chunks)
            take = slice(self.rank, self._items_per_rank * self.world_size, self.world_size)
            self._order, self._order_epoch = (rows[take], flips[take]), epoch
        assert self._order is not None
        return self._order

    def state_dict(self) -> dict[str, Any]:
        """Position to resume from: the next item is ``index`` of ``epoch`` (per rank)."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "world_size": self.world_size,
            "window_chunks": self.window_chunks,
            "order": "global-v2",  # positions r + kW of a world-size-independent epoch order
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # The order is a function of these settings; resuming under others would replay or skip rows.
        mine = self.state_dict()
        # Old states (no "order", a "mode" key) came from the world-size-dependent reader.
        if state.get("order", None if "mode" in state else mine["order"]) != mine["order"]:
            raise ValueError(
                "reader state was saved by an older reader whose order depended on the mode and world size; "
                "it cannot be resumed exactly (start a new run, or resume with the code that saved it)"
            )
        diffs = [k for k in ("seed", "world_size", "window_chunks") if k in state and state[k] != mine[k]]
        if diffs:
            raise ValueError(
                "reader state was saved with different settings: "
                + ", ".join(f"{k}={state[k]!r} (now {mine[k]!r})" for k in diffs)
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def verify(
        self,
        reduce: Callable[[torch.Tensor], torch.Tensor] = lambda flags: flags,
        progress: bool = False,
    ) -> float:
        """Check the checksums of every chunk file this reader will read, before the first batch.

        Memory mode's parts were checked when they were copied in; the rest (all of pagecache
        mode, the REPA targets) is read here once, each of the ``world_size`` ranks taking every
        W-th file. ``reduce`` sums a flag per file over the ranks (one all-reduce), so every rank
        raises the same :class:`CacheError` naming the first damaged file. Returns the seconds taken.
        """
        t0 = time.perf_counter()
        files = [(p, c) for p, src in self._items.items() if p not in self._ram for c in range(self.cache.layout.num_chunks)]
        mine = list(range(self.rank, len(files), self.world_size))
        # The raw layouts know their file names; asking zarr costs more than the stat itself.
        where = {p: src._file if src.raw else (lambda c, p=p: self.cache.chunk_file(p, c * self._rpc)) for p, src in self._items.items()}
        sizes = [os.stat(where[p](c)).st_size for p, c in files]
        total, own = sum(sizes), sum(sizes[i] for i in mine)
        flags = torch.zeros(len(files))
        bar = tqdm(total=own, unit="B", unit_scale=True, desc="verify cache", disable=not progress, mininterval=1.0)
        done, announced = 0, False
        for i in mine:
            part, c = files[i]
            try:
                self._items[part].check(c)
            except CacheError:
                flags[i] = 1
            done += sizes[i]
            bar.update(sizes[i])
            seconds = time.perf_counter() - t0
            if progress and own and not announced and (done >= 0.05 * own or seconds > 5):
                rate = done / max(seconds, 1e-9)
                size = functools.partial(tqdm.format_sizeof, suffix="B", divisor=1000)
                bar.write(f"verify: {size(total)} in {len(files)} files over {self.world_size} rank(s); "
                          f"{size(rate)}/s measured here: about {own / rate:.0f} s")
                announced = True
        bar.close()
        damaged = np.flatnonzero(reduce(flags).numpy() > 0)
        if len(damaged):
            part, c = files[int(damaged[0])]
            self._items[part]._verified.discard(c)
            try:  # every rank re-reads the first damaged file, so all raise the same error
                self._items[part].check(c)
                why = f"cache {self.cache.path}: array '{part}' chunk file {self._items[part]._file(c)} failed its check on another rank"
            except CacheError as e:
                why = str(e)
            more = f" ({len(damaged)} damaged files in all; `just verify-cache {self.cache.path}` lists them)" if len(damaged) > 1 else ""
            raise CacheError(f"{why}{more}")
        # Every file passed on some rank: none needs its once-per-process check again when first
        # read (that check would re-read each REPA target shard whole, 50 MB, on every rank).
        for part, c in files:
            self._items[part]._verified.add(c)
        return time.perf_counter() - t0

    @staticmethod
    def state_for_world_size(saved: Mapping[str, Any], world_size: int) -> dict[str, Any]:
        """A saved position re-expressed for ``world_size`` ranks: the order is world-size
        independent, so the consumed count carries over when ``world_size`` divides it."""
        if saved["world_size"] == world_size:
            return dict(saved)
        consumed = saved["index"] * saved["world_size"]  # global positions of this epoch already used
        if "order" not in saved or consumed % world_size:
            raise ValueError(
                f"the checkpoint's data position was saved with {saved['world_size']} ranks; resuming on {world_size} "
                f"ranks needs a position divisible by {world_size} (and a checkpoint of the world-size-independent reader)"
            )
        return {**saved, "world_size": world_size, "index": consumed // world_size}

    # ---- data ----------------------------------------------------------------------------------

    def _buffer(self, key: str, n: int, elems: int, dtype: Any = np.float16) -> np.ndarray:
        """A ``[n, elems]`` buffer kept for the next batch: fresh memory for every batch is a page
        fault per 4 KiB on first touch (or a huge-page compaction stall), which cost as much as
        the copy itself (see :func:`_empty`)."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < n or buf.shape[1] != elems or buf.dtype != dtype:
            buf = self._buffers[key] = _empty((n, elems), dtype)
        return buf[:n]

    def _gather_part(self, part: str, rows: np.ndarray, flips: np.ndarray, buffer: str | None = None) -> np.ndarray:
        """Items ``(rows, flips)`` of ``part`` as ``[B, item_elems]`` float16: in the reused
        buffer named ``buffer`` (the caller copies out of it before the next batch), else fresh."""
        ram = self._ram.get(part)
        elems = self._items[part].item_elems
        out = self._buffer(buffer, len(rows), elems) if buffer else _empty((len(rows), elems), np.float16)
        if ram is not None:
            # Chunk c sits at rows [c·rpc, (c+1)·rpc) of the RAM copy, so slot = row·2 + flip.
            return np.take(ram, rows * NUM_FLIPS + flips, axis=0, out=out)
        self._items[part].gather(rows, flips, out)
        return out

    def _gather(self, rows: np.ndarray, flips: np.ndarray) -> LatentBatch:
        layout = self.cache.layout
        ct, cs = layout.texture_shape[0], layout.semantic_shape[0]
        hw = layout.texture_shape[1:]
        # One output allocation, filled and normalised in place: the extra temporaries of cat /
        # out-of-place arithmetic cost more than the gather itself.
        ring = self._batches_drawn % 2
        if self.reuse_buffers:
            x = torch.from_numpy(self._buffer(f"x{ring}", len(rows), (ct + cs) * int(np.prod(hw)), np.float32))
            x = x.view(len(rows), ct + cs, *hw)
        else:
            x = torch.empty((len(rows), ct + cs, *hw), dtype=torch.float32)
        for part, dst in (("texture", x[:, :ct]), ("semantic", x[:, ct:])):
            # Convert with a plain copy (vectorised), then normalise in float32 in place: a
            # mixed-dtype fused op, or numpy's float16 cast, ran ~7x slower on one thread.
            dst.copy_(torch.from_numpy(self._gather_part(part, rows, flips, buffer=part)).view(dst.shape))
            dst.mul_(self._scale[part]).add_(self._shift[part])
        y = self._labels[torch.from_numpy(rows)]
        repa = None
        if self.load_dino:
            tokens = self._items["dino"].item_shape
            # float16 as stored: half the host→device bytes; the trainer casts on the device.
            # reuse_buffers: two buffers taken in turn, so a batch's targets stay valid until the
            # batch after the next one is drawn.
            buffer = f"dino{ring}" if self.reuse_buffers else None
            repa = torch.from_numpy(self._gather_part("dino", rows, flips, buffer=buffer)).view(len(rows), *tokens)
        self._batches_drawn += 1
        return LatentBatch(x, y, repa, rows, flips)

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
                rows, flips = self._order_for(self.epoch)
                if self.index + batch_size > len(rows):
                    self.epoch, self.index = self.epoch + 1, 0
                    continue
                sel = slice(self.index, self.index + batch_size)
                batch = self._gather(rows[sel], flips[sel])
                self.index += batch_size
                yield batch
        finally:
            self.close()

    def item(self, row: int, flip: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One item by cache row and flip, read through zarr (slow; for inspection and tests)."""
        parts = []
        for part in ("texture", "semantic"):
            x = torch.from_numpy(np.asarray(self.cache.group[part][row, flip])).float()[None]
            parts.append((x - self._mean[part]) / self._std[part])
        repa = None
        if self.load_dino:
            repa = torch.from_numpy(np.asarray(self.cache.group["dino"][row, flip])).float()
        return torch.cat(parts, dim=1)[0], self._labels[row], repa

    def close(self) -> None:
        """Close the open files (they reopen on demand); the RAM copy of memory mode is kept."""
        self._buffers.clear()  # arrays already handed out keep their own memory alive
        for src in self._items.values():
            src.close()


class DinoTokenReader:
    """Batches of DINO tokens (B, N, D) float32 for the Semantic-VAE trainer: both flips of every
    valid row, in the windowed order of :func:`chunk_windows`, resumable.

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
