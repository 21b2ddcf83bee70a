"""Encode throughput: the Ray job against a plain sequential loop, with the same tiny models.

Both paths run the very same per-shard code (``sfd.encoding.ShardWorker.encode_shard``: decode
the JPEG, ADM crop, flip, tiny texture VAE, tiny DINOv2 at 224², write the shard) on
``--images N`` photo-like JPEGs at ImageNet sizes (the first N of ``--folder`` if given, topped
up with synthetic ones from ``sfd.data.synthetic`` when the folder holds fewer), into fresh
caches. Thread settings are stated in the output:

- ``sequential``: one process, one loop over the shards, ``torch.set_num_threads(T)`` for T in
  ``--seq-threads`` (1 = the same setting as each Ray actor; 2 = one process using both cores);
- ``ray``: the encode stage of ``pipeline/encode.py`` with ``--workers`` CPU actors of one torch
  thread each. Reported twice: wall time of the whole stage (Ray start-up and actor start-up
  included) and steady-state throughput from all actors being ready to the last shard.

The machine may be shared: the load average before and after, and the CPU seconds per image
of each path (process CPU time, all threads), are printed too. Equal CPU s/image means Ray adds
no per-image work; the wall-clock speed-up then depends only on how many cores are really free.

Also measures the CPU cost of decoding one JPEG into its 256² ADM crop (one thread, what a GPU
node's decode threads do per image: docs/performance.md sizes them from it), and prints the cache's bytes per image (on disk, both flips) and the analytic size per image
of the real ImageNet-256 layout. Last line: one JSON object with every figure.

Example:
    python bench/encode.py --images 1000 --image-size 64 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the entry folders are packages of the repository root

from pipeline import encode  # noqa: E402
from sfd.data.cache import LatentCache  # noqa: E402
from sfd.encoding import ShardWorker, WorkerSettings  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def image_folder(root: Path, n: int, folder: str | None) -> Path:
    """``root/<class>/<image>`` with exactly ``n`` images: the first ones of ``folder`` (sorted, linked),
    then synthetic photos at ImageNet sizes (100 classes) for the rest."""
    from sfd.data.images import discover
    from sfd.data.synthetic import write_image_folder

    taken = 0
    if folder is not None:
        found = discover(folder)
        for rel in found.paths[:n]:
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(Path(found.root, rel).resolve())
        taken = min(n, len(found.paths))
    if taken < n:
        num_classes = min(100, n - taken)
        per_class = -(-(n - taken) // num_classes)
        files = write_image_folder(root.parent / "synthetic", num_classes=num_classes, per_class=per_class)
        for f in sorted(files)[: n - taken]:
            dst = root / f"synthetic-{f.parent.name}" / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(f)
    return root


def decode_cost(images: Path, n: int) -> float:
    """CPU ms per image of the encode job's decode (sfd.data.images.load_image at 256², plus the flip)."""
    from sfd.data.images import discover, hflip, load_image

    found = discover(images)
    paths = [Path(found.root, p) for p in found.paths[:n]]
    c0 = time.process_time()
    for path in paths:
        img, _ = load_image(path, 256)
        if img is not None:
            hflip(img)
    return 1e3 * (time.process_time() - c0) / max(1, len(paths))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("Example:"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100, help="number of images to encode (any size: synthetic ones fill up)")
    p.add_argument("--folder", default=None, help="image folder <class>/<image> to take the images from (default: synthetic only)")
    p.add_argument("--decode-sample", type=int, default=100, help="images timed for the 256² decode cost (0: skip)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--rows-per-shard", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq-threads", default="1,2", help="torch threads of the sequential loop (comma list)")
    p.add_argument("--repa-targets", choices=("store", "none"), default="store")
    p.add_argument("--keep", action="store_true", help="keep the temporary caches")
    args = p.parse_args()
    if args.images < 1:
        p.error("--images must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    images = image_folder(tmp / "images", args.images, args.folder)
    common = [
        "--images", str(images), "--image-size", str(args.image_size), "--random-encoders", "0",
        "-o", f"rows_per_shard={args.rows_per_shard}", "-o", f"rows_per_chunk={args.rows_per_shard}",
        "-o", f"batch_size={args.batch_size}", "-o", f"repa_targets={args.repa_targets}", "--stages", "encode",
    ]
    result: dict[str, object] = {
        "cpus": os.cpu_count(), "image_size": args.image_size, "workers": args.workers, "images": args.images,
        "loadavg_1min_before": os.getloadavg()[0],
    }
    try:
        if args.decode_sample:
            ms = decode_cost(images, args.decode_sample)
            result["decode_256_cpu_ms_per_img"] = ms
            print(f"JPEG decode + 256² ADM crop + flip: {ms:.1f} CPU ms per image (one thread, {args.decode_sample} images)", flush=True)
        # ---- sequential loop (create the cache with the driver's preflight, then encode in-process)
        for threads in [int(t) for t in args.seq_threads.split(",")]:
            out = tmp / f"seq{threads}"
            cfg = encode.parse_args([*common, "--out", str(out)])
            with encode.job_lock(str(out)):
                plan = encode.preflight(cfg)
            torch.set_num_threads(threads)
            worker = ShardWorker(WorkerSettings(
                task="encode", cache_path=str(out), images_root=str(plan.images_root), image_size=cfg.image_size,
                seed=cfg.seed, texture=plan.tex, dino=plan.dino, batch_size=cfg.batch_size, threads=threads, device="cpu",
            ))
            t0, c0 = time.perf_counter(), time.process_time()
            rows = sum(worker.encode_shard(s)["rows"] for s in plan.cache.pending_shards())
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            result[f"sequential_{threads}thread_img_s"] = rows / dt
            result[f"sequential_{threads}thread_cpu_ms_per_img"] = 1e3 * cpu / rows
            print(f"sequential loop, {threads} torch thread(s): {rows} images in {dt:.1f} s = {rows / dt:.1f} img/s "
                  f"({1e3 * cpu / rows:.0f} CPU ms/image)", flush=True)
        num_rows = rows

        # ---- Ray job (its own local Ray instance, like a user's run)
        out = tmp / "ray"
        res = encode.main([*common, "--out", str(out), "-o", f"num_workers={args.workers}", "-o", "threads_per_worker=1",
                           "-o", f"ray_num_cpus={args.workers}"])[0]
        result["ray_overall_img_s"] = res.images_per_s
        result["ray_steady_img_s"] = res.work_images_per_s
        result["ray_startup_s"] = res.seconds - res.work_seconds
        result["ray_cpu_ms_per_img"] = 1e3 * res.cpu_seconds / res.images
        print(f"ray job, {args.workers} actors × 1 thread: {res.images} images, stage {res.seconds:.1f} s "
              f"({res.images_per_s:.1f} img/s overall), {res.work_seconds:.1f} s after the actors were up "
              f"({res.work_images_per_s:.1f} img/s; {1e3 * res.cpu_seconds / res.images:.0f} CPU ms/image in the actors)", flush=True)
        for threads in [int(t) for t in args.seq_threads.split(",")]:
            base = float(result[f"sequential_{threads}thread_img_s"])  # type: ignore[arg-type]
            result[f"speedup_steady_vs_seq{threads}"] = res.work_images_per_s / base
            result[f"speedup_overall_vs_seq{threads}"] = res.images_per_s / base
            print(f"  speed-up vs sequential {threads}-thread loop: {res.work_images_per_s / base:.2f}× steady, "
                  f"{res.images_per_s / base:.2f}× overall", flush=True)

        # ---- sizes
        cache = LatentCache.open(out)
        per_image = dir_bytes(out) / num_rows
        result["cache_bytes_per_image"] = per_image
        # The real layout: fp16, both flips: texture 32×16×16, semantic 16×16×16, DINO 256×768.
        real = {"texture": 2 * 32 * 16 * 16 * 2, "semantic": 2 * 16 * 16 * 16 * 2, "dino": 2 * 256 * 768 * 2}
        result["imagenet256_bytes_per_image"] = {"without_dino": real["texture"] + real["semantic"], "with_dino": sum(real.values())}
        result["imagenet_train_TB_with_dino"] = sum(real.values()) * 1_281_167 / 1e12
        print(f"cache on disk: {per_image / 1e3:.1f} KB per image here (texture {cache.layout.texture_shape}, "
              f"semantic {cache.layout.semantic_shape}, DINO {cache.layout.dino_shape}); ImageNet-256 layout: "
              f"{(real['texture'] + real['semantic']) / 1e3:.0f} KB/image without DINO, {sum(real.values()) / 1e6:.2f} MB with "
              f"(≈ {result['imagenet_train_TB_with_dino']:.2f} TB for ImageNet-1k train)", flush=True)
        result["loadavg_1min_after"] = os.getloadavg()[0]
        # The goal: the whole stage (Ray start-up included) at >= 90 % of two cores' worth of the 1-thread loop.
        result["stage_vs_seq1_goal"] = 1.8
        result["stage_vs_seq1_met"] = bool(result.get("speedup_overall_vs_seq1", 0) >= 1.8)  # type: ignore[operator]
        print(f"load average (1 min) before/after: {result['loadavg_1min_before']:.2f} / {result['loadavg_1min_after']:.2f} "
              f"on {os.cpu_count()} CPUs", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
