"""Latent-cache read throughput: our reader against the authors' loader, side by side.

Builds, in a temporary directory, the same synthetic data twice at the real ImageNet-256 shapes
(texture 32×16×16, semantic 16×16×16, DINOv2 REPA targets 256×768, both flips):

- our Zarr cache (``sfd/data/cache.py``: float16, 64-row chunks, targets in 64-row shards);
- the authors' format (docs/method.md §11): one safetensors file per 1000 images with
  ``latents``/``latents_flip`` (float32), ``latents_sv``/``latents_sv_flip`` (float32),
  ``labels`` and ``feats_dino``/``feats_dino_flip`` (float16, [768, 16, 16]).

The authors' loader is re-implemented from its access pattern (not their code): a global index
is mapped to (file, row), one coin per item picks plain or flipped, the safetensors file is
opened in every ``__getitem__`` and the item's rows are read as slices (the cheapest reading of
their code: a whole-tensor read per item would be far slower), normalised per channel, REPA
features cast to float32 and reshaped to [256, 768]; batches are collated with ``torch.stack``
as a DataLoader with ``num_workers=0`` does. Everything runs in one process with one torch
thread, interleaved: each round times every contender once (the order rotating from round to
round), and the figures are the medians over rounds (spread = min..max), so a busy machine slows
all of them alike.

Our reader is built as the trainer builds it: its checksum pass over every file it will read runs
before the first batch (``verify=full``, a one-time cost the trainer prints; without it each file is
checked when first read) and its batch buffers (latents and REPA targets) are reused (``reuse_buffers``).

Modes measured: ``memory`` and ``pagecache`` (``sfd/data/reader.py``), each with REPA targets
``none`` (texture + semantic only), ``stored`` (the reader gathers the cache's targets) and
``semvae`` (targets decoded on the device inside the training step, so the reader delivers
exactly what ``none`` delivers; the decoder's compute is measured separately with ``--decoder``
as FLOPs relative to the DiT step and CPU time for B/1). Ratios: ours / authors' for the same
payload; ``semvae`` is compared against the authors' loader *without* targets (the strict
choice; against their loader with targets the ratio is larger).

The files were just written, so these are warm-page-cache numbers (the steady state of a cache
that fits in RAM; a cold first epoch reads from disk).

``--ranks 8`` also measures resident memory per rank for 8 processes reading the same cache in
each mode (Rss, Pss and private anonymous memory from ``/proc/self/smaps_rollup``).

Example:
    python bench/cache_reader.py --rows 8192 --dino-rows 1024 --rounds 5 --ranks 8 --decoder
Prints one line per figure, then one JSON line, then one summary line.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfd.data.cache import LatentCache, create_cache
from sfd.data.reader import LatentCacheReader

TEX, SEM, DINO = (32, 16, 16), (16, 16, 16), (256, 768)
AUTHORS_ROWS_PER_FILE = 1000  # docs/method.md §11: 1000 images per rank per shard


# ---- data -----------------------------------------------------------------------------------------


def _rows(rows: int, seed: int, dino: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    g = np.random.default_rng(seed)
    tex = g.standard_normal((rows, 2, *TEX), dtype=np.float32).astype(np.float16)
    sem = g.standard_normal((rows, 2, *SEM), dtype=np.float32).astype(np.float16)
    dn = g.standard_normal((rows, 2, *DINO), dtype=np.float32).astype(np.float16) if dino else None
    return tex, sem, dn


def build(root: Path, rows: int, dino: bool, rows_per_shard: int = 1024) -> tuple[LatentCache, Path, float]:
    """Our cache and the authors' safetensors directory with the same values."""
    from safetensors.numpy import save_file

    t0 = time.perf_counter()
    labels = np.arange(rows) % 1000
    cache = create_cache(
        root / "cache.zarr", paths=[f"c{i % 1000:03d}/{i:07d}.JPEG" for i in range(rows)], labels=labels,
        rows_per_shard=rows_per_shard, texture_shape=TEX, semantic_shape=SEM, store_dino=dino,
        attrs={"image_size": 256, "synthetic": True},
    )
    authors = root / "authors"
    authors.mkdir()
    for s in cache.pending_shards():
        a, b = cache.layout.shard_rows(s)
        tex, sem, dn = _rows(b - a, s, dino)
        cache.write_shard(s, tex, sem, dn)
    cache.compute_stats(seed=0)
    for f, a in enumerate(range(0, rows, AUTHORS_ROWS_PER_FILE)):
        b = min(a + AUTHORS_ROWS_PER_FILE, rows)
        tex = np.asarray(cache.group["texture"][a:b]).astype(np.float32)
        sem = np.asarray(cache.group["semantic"][a:b]).astype(np.float32)
        t = {
            "latents": tex[:, 0].copy(), "latents_flip": tex[:, 1].copy(),
            "latents_sv": sem[:, 0].copy(), "latents_sv_flip": sem[:, 1].copy(),
            "labels": labels[a:b].astype(np.int64),
        }
        if dino:
            d = np.asarray(cache.group["dino"][a:b])  # [n, 2, 256, 768] → theirs [n, 768, 16, 16]
            t["feats_dino"] = np.ascontiguousarray(d[:, 0].transpose(0, 2, 1).reshape(-1, 768, 16, 16))
            t["feats_dino_flip"] = np.ascontiguousarray(d[:, 1].transpose(0, 2, 1).reshape(-1, 768, 16, 16))
        save_file(t, str(authors / f"latents_rank00_shard{f:03d}.safetensors"))
    stats = cache.stats()
    torch.save({"mean": torch.from_numpy(stats["texture_mean"]).view(1, -1, 1, 1), "std": torch.from_numpy(stats["texture_std"]).view(1, -1, 1, 1)}, authors / "latents_stats.pt")
    torch.save({"mean": torch.from_numpy(stats["semantic_mean"]).view(1, -1, 1, 1), "std": torch.from_numpy(stats["semantic_std"]).view(1, -1, 1, 1)}, authors / "latents_sv_stats.pt")
    return cache, authors, time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- the authors' access pattern ----------------------------------------------------------------


class AuthorsDataset:
    """The authors' ``__getitem__`` access pattern over their safetensors shards (docs/method.md §11)."""

    def __init__(self, root: Path, with_feats: bool, seed: int = 0):
        from safetensors import safe_open

        self.safe_open = safe_open
        self.files = sorted(root.glob("*.safetensors"))
        self.counts = []
        for f in self.files:
            with safe_open(str(f), framework="pt") as h:
                self.counts.append(h.get_slice("labels").get_shape()[0])
        self.cum = np.cumsum([0, *self.counts]).tolist()
        s = torch.load(root / "latents_stats.pt", weights_only=True)
        sv = torch.load(root / "latents_sv_stats.pt", weights_only=True)
        self.mean, self.std = s["mean"][0], s["std"][0]
        self.sv_mean, self.sv_std = sv["mean"][0], sv["std"][0]
        self.with_feats = with_feats
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.cum[-1]

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        f = bisect.bisect_right(self.cum, idx) - 1
        row = idx - self.cum[f]
        flip = self.rng.random() < 0.5  # one coin per item, the same choice for every key
        sfx = "_flip" if flip else ""
        with self.safe_open(str(self.files[f]), framework="pt") as h:  # reopened on every item
            lat = h.get_slice("latents" + sfx)[row : row + 1][0]
            sv = h.get_slice("latents_sv" + sfx)[row : row + 1][0]
            y = h.get_slice("labels")[row : row + 1][0]
            feats = h.get_slice("feats_dino" + sfx)[row : row + 1][0] if self.with_feats else None
        lat = (lat - self.mean) / self.std
        sv = (sv - self.sv_mean) / self.sv_std
        x = torch.cat([lat, sv], dim=0)
        if feats is not None:
            feats = feats.float().reshape(768, -1).T  # the loss reshapes to [256, 768]
        return x, y, feats


def authors_batches(ds: AuthorsDataset, batch_size: int, seed: int = 0):
    for epoch in range(1 << 30):  # a shuffled pass per epoch, drop_last, forever
        order = np.random.default_rng([seed, epoch]).permutation(len(ds))
        for k in range(0, len(order) - batch_size + 1, batch_size):
            items = [ds[int(i)] for i in order[k : k + batch_size]]
            x = torch.stack([it[0] for it in items])
            y = torch.stack([it[1] for it in items])
            feats = torch.stack([it[2] for it in items]) if items[0][2] is not None else None
            yield x, y, feats


# ---- timing -------------------------------------------------------------------------------------


WARMUP_BATCHES = 2  # a run's steady state: both of the reader's reused buffer sets faulted in


def time_batches(it, n: int, warmup: int = WARMUP_BATCHES) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for ``n`` batches after ``warmup`` batches.

    The warm-up is what every run pays once: first maps and file opens, and with
    ``reuse_buffers`` the first touch of both sets of batch buffers (the ring has two: after one
    warm-up batch, the first timed batch faulted in the second set's 100 MB of target pages — one
    timed batch in three with 1,024 rows, which is what made single rounds fall to 5×).
    """
    for _ in range(warmup):
        next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        next(it)
    return time.perf_counter() - t0, time.process_time() - c0


def contenders(cache: LatentCache, authors: Path, batch_size: int, dino: bool) -> dict[str, Any]:
    """name → factory of an iterator of batches (built fresh each round)."""
    out: dict[str, Any] = {"authors": lambda: authors_batches(AuthorsDataset(authors, with_feats=dino), batch_size)}

    def ours(mode: str):
        # As train/main.py builds it: checksums verified before the first batch (verify=full, a
        # one-time pass reported by the trainer, not part of the batch rate) and the batch
        # buffers reused (a step is done with its batch before it draws the next).
        reader = LatentCacheReader(cache, seed=0, mode=mode, load_dino=dino, reuse_buffers=True)
        reader.verify()
        return reader.batches(batch_size)

    for mode in ("memory", "pagecache"):
        out[mode] = lambda mode=mode: ours(mode)
    return out


def measure(cache: LatentCache, authors: Path, batch_size: int, num_batches: int, rounds: int, dino: bool) -> dict[str, dict[str, float]]:
    """Items/s per contender (wall clock and per CPU second), and per-round ratios to the authors'.

    On a shared machine a burst of other jobs can land on one contender's few hundred
    milliseconds; the ratio of two contenders timed in the same round, and CPU time (what this
    single-threaded process itself spent, page faults included), are steadier than wall time.
    """
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    makers = contenders(cache, authors, batch_size, dino)
    names = list(makers)
    for r in range(rounds):
        # Interleaved: each round times every contender once, starting one later each round. The
        # contender timed right after the authors' loader pays for its freed memory (measured:
        # ~2x the CPU time of the same reader timed later), so no contender may always sit there.
        for name in names[r % len(names):] + names[: r % len(names)]:
            make = makers[name]
            gc.collect()  # the previous contender's garbage, not inside this one's timing
            it = make()
            w, c = time_batches(it, num_batches)
            wall.setdefault(name, []).append(num_batches * batch_size / w)
            cpu.setdefault(name, []).append(num_batches * batch_size / max(c, 1e-9))
            it.close() if hasattr(it, "close") else None
    out = {}
    for k in wall:
        ratio = [a / b for a, b in zip(wall[k], wall["authors"])]
        cratio = [a / b for a, b in zip(cpu[k], cpu["authors"])]
        out[k] = {"median": statistics.median(wall[k]), "min": min(wall[k]), "max": max(wall[k]),
                  "cpu_median": statistics.median(cpu[k]),
                  "ratio_median": statistics.median(ratio), "ratio_min": min(ratio), "ratio_max": max(ratio),
                  "cpu_ratio_median": statistics.median(cratio)}
    return out


# ---- resident memory of N ranks -------------------------------------------------------------------


def _smaps() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":")
        out[k.strip()] = int(v.split()[0]) * 1024
    return out


def _rank_main(cache_path: str, mode: str, rank: int, world: int, batch_size: int, barrier, queue) -> None:
    torch.set_num_threads(1)
    base = _smaps()
    reader = LatentCacheReader(cache_path, seed=0, rank=rank, world_size=world, mode=mode)
    it = reader.batches(batch_size)
    for _ in range(len(reader) // batch_size):  # one full epoch: every row of this rank touched
        next(it)
    barrier.wait()  # all ranks alive and done: Pss splits the shared pages between them
    m = _smaps()
    queue.put({"rank": rank, "rss": m["Rss"], "pss": m["Pss"], "anon": m["Anonymous"] - base["Anonymous"],
               "shared": m["Shared_Clean"] + m["Shared_Dirty"], "anon_base": base["Anonymous"]})
    barrier.wait()
    reader.close()


def rank_memory(cache: LatentCache, world: int, batch_size: int) -> dict[str, dict[str, float]]:
    ctx = mp.get_context("spawn")
    out = {}
    for mode in ("pagecache", "memory"):
        barrier, queue = ctx.Barrier(world), ctx.Queue()
        procs = [ctx.Process(target=_rank_main, args=(str(cache.path), mode, r, world, batch_size, barrier, queue)) for r in range(world)]
        for p in procs:
            p.start()
        res = [queue.get(timeout=900) for _ in procs]
        for p in procs:
            p.join(timeout=120)
        mib = 1024 * 1024
        out[mode] = {
            "rss_mib_mean": statistics.mean(r["rss"] for r in res) / mib,
            "pss_mib_mean": statistics.mean(r["pss"] for r in res) / mib,
            "anon_added_mib_mean": statistics.mean(r["anon"] for r in res) / mib,
            "anon_added_mib_max": max(r["anon"] for r in res) / mib,
            "shared_mib_mean": statistics.mean(r["shared"] for r in res) / mib,
        }
    return out


# ---- the SemVAE decoder's cost --------------------------------------------------------------------


def decoder_cost(batch: int, repeats: int) -> dict[str, float]:
    """FLOPs of the SemVAE decoder vs a DiT training step (fwd + bwd), and CPU time for B/1."""
    from torch.utils.flop_counter import FlopCounterMode

    from sfd.config import SEMVAE_PRESETS, model_preset
    from sfd.models.lightningdit import LightningDiT
    from sfd.models.semvae import SemVAE

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    out: dict[str, float] = {}
    sem = SemVAE(SEMVAE_PRESETS["transformer_ch16"]).eval()
    z = torch.randn(1, 256, 16)
    with torch.no_grad():
        out["decoder_gflops_per_image"] = flops(lambda: sem.decode(z)) / 1e9
    for name in ("LightningDiT-B/1", "LightningDiT-XL/1"):
        with torch.device("meta"):
            cfg = model_preset(name)
            dit = LightningDiT(cfg)
            x = torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size)
            t = (torch.rand(1), torch.rand(1))
            y = torch.zeros(1, dtype=torch.long)

            def step(dit=dit, x=x, t=t, y=y) -> None:
                pred, proj = dit(x, t, y, return_repa=True)
                (pred.float().square().mean() + proj.float().mean()).backward()

            f = flops(step)
        key = name.split("-")[1].replace("/", "")
        out[f"dit_{key}_train_gflops_per_image"] = f / 1e9
        out[f"decoder_over_dit_{key}_flops"] = out["decoder_gflops_per_image"] / (f / 1e9)

    # CPU time, B/1 step vs decoder at the same batch, interleaved.
    cfg = model_preset("LightningDiT-B/1")
    torch.manual_seed(0)
    dit = LightningDiT(cfg)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    t = (torch.rand(batch), torch.rand(batch))
    y = torch.zeros(batch, dtype=torch.long)
    zb = torch.randn(batch, 256, 16)
    dit_s, dec_s = [], []
    for _ in range(repeats + 1):  # the first round warms up (allocator, first-touch pages)
        t0 = time.perf_counter()
        pred, proj = dit(x, t, y, return_repa=True)
        (pred.square().mean() + proj.mean()).backward()
        dit.zero_grad(set_to_none=True)
        dit_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            sem.decode(zb)
        dec_s.append(time.perf_counter() - t0)
    dit_s, dec_s = dit_s[1:], dec_s[1:]
    out["cpu_batch"] = batch
    out["cpu_dit_B1_step_s"] = statistics.median(dit_s)
    out["cpu_decoder_s"] = statistics.median(dec_s)
    out["cpu_decoder_over_dit_B1"] = out["cpu_decoder_s"] / out["cpu_dit_B1_step_s"]
    return out


# ---- fidelity of decoded targets -------------------------------------------------------------------


def fidelity(path: Path, batch_size: int, max_batches: int) -> dict[str, float]:
    """Per-token cosine similarity of SemVAE-decoded vs stored targets over up to one epoch."""
    from sfd.repa_targets import RepaTargets

    cache = LatentCache.open(path)
    reader = LatentCacheReader(cache, seed=0, load_dino=True)
    decoded, stored = RepaTargets("semvae", cache), RepaTargets("stored", cache)
    bs = min(batch_size, len(reader))
    it = reader.batches(bs)
    cos, other = [], []
    for _ in range(min(max_batches, len(reader) // bs)):
        b = next(it)
        d, s = decoded(b), stored(b)
        cos.append(torch.nn.functional.cosine_similarity(d, s, dim=-1).flatten())
        other.append(torch.nn.functional.cosine_similarity(d, s.roll(1, dims=0), dim=-1).flatten())
    reader.close()
    c, o = torch.cat(cos), torch.cat(other)
    return {"tokens": len(c), "cos_mean": c.mean().item(), "cos_median": c.median().item(),
            "cos_p05": c.quantile(0.05).item(), "cos_other_item_mean": o.mean().item(), "decoder": decoded.how}


# ---- main ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192, help="rows of the texture+semantic caches (0: skip)")
    ap.add_argument("--dino-rows", type=int, default=2048, help="rows of the caches with REPA targets (0: skip)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per contender per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ranks", type=int, default=0, help="also measure resident memory of this many ranks (0: skip)")
    ap.add_argument("--decoder", action="store_true", help="also measure the SemVAE decoder's cost vs the DiT step")
    ap.add_argument("--decoder-batch", type=int, default=1, help="batch of the CPU timing of B/1 vs the decoder")
    ap.add_argument("--fidelity", type=Path, action="append", default=[],
                    help="a cache with stored targets and a SemVAE decoder: cosine of decoded vs stored targets (repeatable)")
    ap.add_argument("--dir", type=Path, default=None, help="where to build the caches (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (torchrun sets OMP_NUM_THREADS=1 per process)")
    args = ap.parse_args()
    # Batch assembly is memory-bound: on a shared or busy CPU torch's intra-op thread pool waits
    # on descheduled threads and runs ~10x slower than one thread, so measure as torchrun runs.
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"batch_size": args.batch_size, "threads": args.threads, "rounds": args.rounds}
    ratios: dict[str, float] = {}

    def report(tag: str, rates: dict[str, dict[str, float]], anchor: dict[str, float], modes_targets: list[tuple[str, str]]) -> None:
        print(f"authors' loader ({tag}): {anchor['median']:,.0f} items/s (spread {anchor['min']:,.0f}..{anchor['max']:,.0f}), "
              f"{anchor['cpu_median']:,.0f} items per CPU second")
        for mode, targets in modes_targets:
            r = rates[mode]
            ratios[f"{mode}/{targets}"] = r["ratio_median"]
            ratios[f"{mode}/{targets}/cpu"] = r["cpu_ratio_median"]
            print(f"reader mode={mode:6s} targets={targets:6s}: {r['median']:,.0f} items/s (spread {r['min']:,.0f}..{r['max']:,.0f}); "
                  f"per-round ratio {r['ratio_median']:.1f}x the authors' (spread {r['ratio_min']:.1f}..{r['ratio_max']:.1f}), "
                  f"per CPU second {r['cpu_ratio_median']:.1f}x")
            result[f"{mode}_{targets}_items_per_s"] = r

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.rows > 0:
            root = Path(tmp) / "plain"
            root.mkdir()
            cache, authors, build_s = build(root, args.rows, dino=False)
            ours, theirs = dir_bytes(cache.path) / args.rows, dir_bytes(authors) / args.rows
            print(f"built {args.rows} rows in {build_s:.0f} s: ours {ours / 1e3:.1f} kB/image, authors' {theirs / 1e3:.1f} kB/image (no targets)")
            result.update(rows=args.rows, bytes_per_image=ours, authors_bytes_per_image=theirs)
            rates = measure(cache, authors, args.batch_size, args.batches, args.rounds, dino=False)
            result["authors_none_items_per_s"] = rates["authors"]
            # semvae: the reader delivers what `none` delivers; decoding happens on the device.
            report("no targets", rates, rates["authors"], [(m, t) for m in ("memory", "pagecache") for t in ("none", "semvae")])
            if args.ranks:
                mem = rank_memory(cache, args.ranks, args.batch_size)
                result["rank_memory"] = mem
                data_mib = dir_bytes(cache.path) / 2**20
                for mode, m in mem.items():
                    print(f"{args.ranks} ranks, mode={mode}: per rank Rss {m['rss_mib_mean']:.0f} MiB, Pss {m['pss_mib_mean']:.0f} MiB, "
                          f"private memory added by the reader {m['anon_added_mib_mean']:.0f} MiB (max {m['anon_added_mib_max']:.0f}); cache {data_mib:.0f} MiB")
                result["rank_memory_cache_mib"] = data_mib
        if args.dino_rows > 0:
            root = Path(tmp) / "dino"
            root.mkdir()
            cache, authors, build_s = build(root, args.dino_rows, dino=True, rows_per_shard=256)
            ours, theirs = dir_bytes(cache.path) / args.dino_rows, dir_bytes(authors) / args.dino_rows
            print(f"built {args.dino_rows} rows with targets in {build_s:.0f} s: ours {ours / 1e3:.0f} kB/image, authors' {theirs / 1e3:.0f} kB/image")
            result.update(dino_rows=args.dino_rows, bytes_per_image_with_targets=ours, authors_bytes_per_image_with_targets=theirs)
            nb = max(2, min(args.batches, args.dino_rows // args.batch_size - WARMUP_BATCHES))  # within one epoch
            rates = measure(cache, authors, args.batch_size, nb, args.rounds, dino=True)
            result["authors_stored_items_per_s"] = rates["authors"]
            report("stored targets", rates, rates["authors"], [(m, "stored") for m in ("memory", "pagecache")])
    if args.decoder:
        cost = decoder_cost(batch=args.decoder_batch, repeats=3)
        result["decoder"] = cost
        print(f"SemVAE decoder: {cost['decoder_gflops_per_image']:.1f} GFLOP/image = {100 * cost['decoder_over_dit_XL1_flops']:.1f} % of an "
              f"XL/1 training step ({cost['dit_XL1_train_gflops_per_image']:.0f} GFLOP/image), {100 * cost['decoder_over_dit_B1_flops']:.1f} % of B/1 "
              f"({cost['dit_B1_train_gflops_per_image']:.0f}); CPU batch {cost['cpu_batch']}: decoder {cost['cpu_decoder_s'] * 1e3:.0f} ms vs "
              f"B/1 step {cost['cpu_dit_B1_step_s'] * 1e3:.0f} ms ({100 * cost['cpu_decoder_over_dit_B1']:.1f} %)")
    for path in args.fidelity:
        f = fidelity(path, args.batch_size, max_batches=20)
        result.setdefault("fidelity", {})[path.name] = f
        print(f"decoded vs stored targets, {path.name} ({f['decoder']}): per-token cosine mean {f['cos_mean']:.3f}, median "
              f"{f['cos_median']:.3f}, 5th percentile {f['cos_p05']:.3f} over {f['tokens']} tokens (another item's targets: {f['cos_other_item_mean']:.3f})")
    result["ratios"] = ratios

    def rnd(v: Any) -> Any:
        return {k: rnd(x) for k, x in v.items()} if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v

    print(json.dumps(rnd(result)))
    goals = {k: (2.0 if "stored" in k else 10.0) for k in ratios}
    met = all(ratios[k] >= goals[k] for k in ratios)
    worst = min(ratios, key=lambda k: ratios[k] / goals[k]) if ratios else "-"
    print("summary: reader vs authors' loader (1 process, 1 thread; median per-round wall ratio, /cpu = per CPU second): " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items())
          + f"; goals (>=10x none/semvae, >=2x stored) {'met' if met else 'NOT met'} (tightest: {worst})")


if __name__ == "__main__":
    main()
