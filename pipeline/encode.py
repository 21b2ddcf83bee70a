"""Build the SFD latent cache from an image folder: the Ray job behind ``just encode``.

Stages, in order; each is skipped when already done, so re-running the same command resumes:

1. ``encode``   — a Ray job. The driver lists the images (sorted class folders and files, then by
   default a fixed permutation with a recorded seed so streaming readers get mixed batches),
   writes the file index and pre-allocates the Zarr v3 group, and hands out whole shards
   (``rows_per_shard`` rows) as work units to actors: one per GPU, or CPU actors. An actor
   decodes its shard's images (ADM crop + flipped copy), runs the texture VAE encoder (posterior
   sample), DINOv2 (224², final-norm patch tokens) and, when a SemVAE is given, the SemVAE
   encoder (posterior sample), writes the whole shard and sets the shard's flag last. Posterior
   noise is seeded per (row, flip), so a shard redone after a kill writes identical bytes.
   Bad images become invalid rows with a reason (``<out>.invalid.tsv``); the job goes on.
2. ``semvae``   — only without ``--semvae``: trains the Semantic VAE on the cached DINO features
   (``pipeline/train_semvae.py``, a subprocess; ``-o semvae_nproc=N`` runs it under torchrun).
3. ``semantic`` — only without ``--semvae``: a Ray pass turning the stored DINO features into
   semantic latents with the trained SemVAE (per shard, resumable, per-row seeds).
4. ``stats``    — per-channel mean/std of the texture and semantic parts from a fixed-seed sample
   of valid, non-flipped rows (docs/method.md §2.4), stored in the cache.

Safety: missing weight files, an unknown preset, or an existing cache made with other encoders /
images / settings are reported as one clear error before any work starts. A lock file
(``<out>.lock``) keeps two drivers off one cache (a stale lock of a dead process on this host is
taken over), and within a job a shard is only ever given to one actor at a time; a shard of an
actor that died is given out again only after Ray reports that actor dead. Non-detached actors
die with their driver, so killing the job stops all writers; shards not flagged complete are
redone from scratch by the next run. SIGTERM/SIGINT stop the job cleanly (actors killed, lock
released, one line, exit 143/130). Weight files are loaded once by the driver before anything is
created, so a refused file is one ``error:`` line and leaves no folder behind.

Integrity (docs/reliability.md): every run first checks that every file recorded by the finished
shards exists with its size (``--verify``: also decodes every file, i.e. checks the CRC32C
checksums) and redoes exactly the damaged shards, byte-identical; damaged statistics are
recomputed and a damaged file index rewritten. ``just verify-cache CACHE`` only reports.

REPA targets (``-o repa_targets=…``): ``store`` (default, faithful) keeps the DINOv2 patch tokens,
fp16, for both flips: 256×768×2 B×2 ≈ 0.79 MB per image, ≈ 1.0 TB for ImageNet-1k train
(the authors: "larger than 1 TB"). ``none`` stores no DINO features (≈ 49 KB per image with
f16d32 + SemVAE latents), which needs ``--semvae`` (the SemVAE cannot be trained without them);
the trainer then runs with ``repa_weight=0`` (or a later option computes the targets online).

Examples:

  # ImageNet with the released encoders (what `just encode imagenet` runs):
  python pipeline/encode.py --images data/imagenet/train --out data/cache/imagenet256 \\
      --texture-vae weights/ldm-imagenet256-f16d32-50ep.ckpt \\
      --dino weights/dinov2_vitb14_reg4_pretrain.pth
  # (add --semvae PATH to use the released Semantic VAE: `python -m sfd.weights --path semvae`)

  # Any image folder on a laptop: pixel stand-in texture "VAE", random tiny DINO, SemVAE trained
  # here (`just encode data/my-images` runs the real encoders into data/cache/my-images):
  python pipeline/encode.py --images data/my-images --out data/cache/my-images \\
      --image-size 64 --texture standin-f4 --random-encoders 0 --semvae-steps 300

  # On a Ray cluster (README: "Encode ImageNet"): every node has this repository installed
  # (`just setup`) and sees the images, the cache and the weights at the same paths (shared
  # storage). One actor per GPU is started across all nodes; -o num_workers=N overrides.
  ray job submit --address http://HEAD:8265 -- python $PWD/pipeline/encode.py \\
      --images data/imagenet/train --out data/cache/imagenet256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sfd.checkpoint import KNOWN_WEIGHTS, WeightsError, same_weights
from sfd.cli import Arg, check_inputs, cli_status, config_parser, parse_config, print_config
from sfd.config import ENCODE_STAGES, ConfigError, EncodeConfig
from sfd.data.cache import CacheError, LatentCache, create_cache
from sfd.data.images import discover
from sfd.encoding import (
    ShardWorker,
    WorkerSettings,
    build_dino,
    build_semvae,
    build_texture_encoder,
    dino_spec,
    identity,
    semvae_plan_spec,
    semvae_spec,
    spec_latent_shapes,
    texture_spec,
)
from sfd.repa_targets import (
    DECODER_FILE,
    cache_semvae_spec,
    write_cache_semvae,
    write_semvae_decoder,
)
from sfd.repa_targets import SEMVAE_FILE as CACHE_SEMVAE_FILE
from sfd.runlock import run_lock

STAGES = ENCODE_STAGES
SEMVAE_FILE = "semvae.safetensors"


@dataclass
class StageResult:
    stage: str
    status: str  # done | skipped | not needed
    seconds: float = 0.0  # wall time of the stage, start-up included
    images: int = 0
    note: str = ""
    work_seconds: float = 0.0  # Ray stages: from the actors being ready to the last shard
    cpu_seconds: float = 0.0  # Ray stages: CPU time the actors spent on the shards (all threads)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 and self.images else 0.0

    @property
    def work_images_per_s(self) -> float:
        return self.images / self.work_seconds if self.work_seconds > 0 and self.images else 0.0


def log(msg: str) -> None:
    print(f"[encode] {msg}", flush=True)


# ---- preflight: encoders, images, cache --------------------------------------------------------


@dataclass
class Plan:
    cfg: EncodeConfig
    tex: dict[str, Any]
    dino: dict[str, Any]
    sem: dict[str, Any]  # the given SemVAE's spec or the training plan
    semantic_pass: bool
    images_root: Path
    cache: LatentCache
    stages: list[str]

    @property
    def semvae_dir(self) -> Path:
        return Path(self.cfg.semvae_dir) if self.cfg.semvae_dir else Path(f"{self.cfg.out}.semvae")


def preflight(cfg: EncodeConfig) -> Plan:
    """Every check that can fail, before any work: stages, weights (hashed), images, then
    creating the cache or checking that the existing one was made the same way. Call it under
    :func:`job_lock`."""
    stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    if cfg.repa_targets not in ("store", "none"):
        raise ConfigError(f"repa_targets must be 'store' or 'none', got {cfg.repa_targets!r}")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be 'fp32' or 'bf16', got {cfg.precision!r}")
    if cfg.row_order not in ("permuted", "sorted"):
        raise ConfigError(f"row_order must be 'permuted' or 'sorted', got {cfg.row_order!r}")

    rs = cfg.random_encoders
    tex = texture_spec(cfg.texture, cfg.texture_vae, rs, cfg.image_size)
    dino = dino_spec(cfg.dino_preset, cfg.dino, rs)
    semantic_pass = cfg.semvae is None
    if semantic_pass:
        sem = semvae_plan_spec("tiny" if rs is not None else cfg.semvae_preset)
        if cfg.repa_targets == "none":
            raise ConfigError(
                "repa_targets=none needs --semvae PATH: training the Semantic VAE here needs the "
                "stored DINO features (give the released SemVAE, or keep repa_targets=store)"
            )
    else:
        sem = semvae_spec(cfg.semvae, cfg.semvae_preset, rs)
    texture_shape, semantic_shape, dino_shape = spec_latent_shapes(tex, dino, sem, cfg.image_size)
    for name, spec in (("texture", tex), ("DINO", dino), ("SemVAE", sem)):
        if spec["kind"] in ("random-init", "standin"):
            log(f"WARNING: {name} encoder is {spec['name']} ({spec['kind']}): latents are for tests/demos only")
    check_weights_load(tex, dino, None if semantic_pass else sem)

    images = discover(cfg.images)
    if cfg.row_order == "permuted":
        images = images.permuted(cfg.order_seed)
    attrs = {
        "image_size": cfg.image_size,
        "num_classes": len(images.class_names),
        "class_names": list(images.class_names),
        "row_order": {"kind": cfg.row_order, **({"seed": cfg.order_seed} if cfg.row_order == "permuted" else {})},
        "texture_encoder": identity(tex),
        "dino_encoder": identity(dino),
        "semantic_encoder": identity(sem),
        "repa_targets": cfg.repa_targets,
        "posterior_seed": cfg.seed,
        "encode_precision": cfg.precision,
        "preprocessing": (
            f"ADM centre crop {cfg.image_size} + horizontal-flip copy; texture input in [-1,1]; DINO input "
            "ImageNet-normalised then bicubic resize to its img_size (docs/method.md §2.2)"
        ),
    }
    out = Path(cfg.out)
    if out.exists():
        log(f"found an existing cache at {out}: checking it was made with the same encoders and images")
        with contextlib.suppress(CacheError):  # create_cache rewrites a damaged index; say so
            for problem in LatentCache.open(out).index_damage(deep=True):
                log(f"integrity: index: {problem}; rewriting the file index (paths, labels)")
    # Called under the job lock (run()): create the cache, or check the existing one is the same.
    cache = create_cache(
        out,
        paths=images.paths,
        labels=images.labels,
        rows_per_shard=cfg.rows_per_shard,
        rows_per_chunk=cfg.rows_per_chunk,
        texture_shape=texture_shape,
        semantic_shape=semantic_shape,
        store_dino=cfg.repa_targets == "store",
        dino_shape=dino_shape,
        attrs=attrs,
        semantic_pass=semantic_pass,
    )
    return Plan(cfg, tex, dino, sem, semantic_pass, images.root, cache, stages)


def check_weights_load(tex: dict[str, Any], dino: dict[str, Any], sem: dict[str, Any] | None) -> None:
    """Build each encoder from its weight file once, here, before any cache or actor exists: a
    refused or unfitting file is then one clear error (in an actor it is a crash with a traceback)."""
    for what, spec, build in (("texture VAE", tex, build_texture_encoder), ("DINOv2", dino, build_dino),
                              ("SemVAE", sem, build_semvae)):
        if spec is None or spec.get("kind") != "weights":
            continue
        try:
            build(spec)
        except (WeightsError, ConfigError):
            raise
        except Exception as e:  # noqa: BLE001 - any other failure to build from the file
            raise WeightsError(f"cannot build the {what} from '{spec.get('path')}': {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def job_lock(out: str) -> Iterator[None]:
    """``<out>.lock``: one driver per cache (sfd.runlock: a stale lock of a dead process on this
    host is taken over; folders made for the lock are removed again if the run left them empty)."""
    with run_lock(f"{out}.lock", "encode job", log=log):
        yield


class Stopped(BaseException):
    """SIGTERM/SIGINT reached the driver: unwind (actors killed, Ray shut down, lock released)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_stop_signal: int | None = None  # set by the handler
_in_ray = 0  # > 0 inside a Ray call: raising there corrupts Ray's C++ state ("SystemError")


def _raise_stopped(signum: int, frame: Any) -> None:
    global _stop_signal
    # Ignore further signals while unwinding: a second one must not interrupt the clean-up.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    _stop_signal = signum
    if not _in_ray:
        raise Stopped(signum)


@contextlib.contextmanager
def ray_call() -> Iterator[None]:
    """Around blocking Ray calls: a stop signal is only recorded inside, and raised right after."""
    global _in_ray
    _in_ray += 1
    try:
        yield
    finally:
        _in_ray -= 1
    if _stop_signal is not None and not _in_ray:
        raise Stopped(_stop_signal)


_stop_handlers = False  # set by cli(); library callers (tests, bench) keep their own handlers


def install_stop_handlers(first: bool = False) -> None:
    """Turn SIGTERM/SIGINT into :class:`Stopped` in the main thread (command line only). Installed
    again after ``ray.init``, which replaces the driver's SIGTERM handler with its own."""
    global _stop_handlers
    _stop_handlers = _stop_handlers or first
    if _stop_handlers and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _raise_stopped)


# ---- Ray scheduling ----------------------------------------------------------------------------


def ensure_ray(cfg: EncodeConfig) -> bool:
    """Connect to (or start) Ray; True if this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    with ray_call():
        if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=cfg.ray_address)  # a cluster (ray job submit sets RAY_ADDRESS)
        else:
            ray.init(num_cpus=cfg.ray_num_cpus, include_dashboard=False)
    return True


def plan_workers(cfg: EncodeConfig, resources: dict[str, float], num_shards: int) -> tuple[int, dict[str, Any], int, int, str]:
    """(actors, Ray options, torch threads, decode threads, device) for the cluster's resources."""
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if cfg.device == "cuda" and gpus < 1:
        raise ConfigError("device=cuda but the Ray cluster has no GPUs; use -o device=auto (or cpu)")
    if cfg.device != "cpu" and gpus >= 1:
        n = cfg.num_workers or int(gpus)
        cpus_per = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else max(1.0, min(8.0, cpus // max(gpus, 1)))
        threads = cfg.threads_per_worker or 2
        decode = cfg.decode_threads if cfg.decode_threads is not None else max(1, int(cpus_per))
        options: dict[str, Any] = {"num_gpus": 1, "num_cpus": cpus_per}
        device = "cuda"
    else:
        threads = cfg.threads_per_worker or 1
        n = cfg.num_workers or max(1, int(cpus // threads))
        cpus_per = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else min(float(threads), cpus / n)
        decode = cfg.decode_threads if cfg.decode_threads is not None else 0
        options = {"num_cpus": cpus_per}
        device = "cpu"
    return max(1, min(n, num_shards)), options, threads, decode, device


def run_shards(
    cfg: EncodeConfig, settings: WorkerSettings, shards: list[int], rows_of: dict[int, int], method: str, desc: str
) -> tuple[int, float, float]:
    """Give each shard to one actor at a time until all are done.

    Returns (rows processed, seconds from all actors being ready to the last shard done, CPU
    seconds the actors spent on the shards).
    """
    import ray
    from tqdm import tqdm

    n, options, threads, decode, device = plan_workers(cfg, ray.cluster_resources(), len(shards))
    settings = WorkerSettings(**{**asdict(settings), "threads": threads, "decode_threads": decode, "device": device})
    remote_cls = ray.remote(max_restarts=0)(ShardWorker).options(**options)
    log(f"{desc}: {len(shards)} shards on {n} actor(s) {options}, {threads} torch thread(s) and {decode} decode thread(s) each")

    def start_actors(ids: list[int]) -> list[Any]:
        new = [remote_cls.remote(settings) for _ in ids]  # start together, then wait for all
        with ray_call():
            infos = ray.get([a.info.remote() for a in new])
        for i, info in zip(ids, infos):
            log(f"  worker {i}: pid {info['pid']} on {info['host']} ({info['device']}, {info['threads']} threads)")
        return new

    actors = start_actors(list(range(n)))
    t_ready = time.perf_counter()
    queue, inflight, attempts = deque(shards), {}, Counter()
    done_rows, cpu_s = 0, 0.0
    bar = tqdm(total=sum(rows_of[s] for s in shards), unit="img", desc=desc, smoothing=0.05, file=sys.stdout)

    def submit(i: int) -> None:
        shard = queue.popleft()
        inflight[getattr(actors[i], method).remote(shard)] = (i, shard)

    try:
        for i in range(min(n, len(queue))):
            submit(i)
        while inflight:
            with ray_call():  # a short timeout: a stop signal is acted on within a second
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            if not ready:
                continue
            ref = ready[0]
            i, shard = inflight.pop(ref)
            try:
                with ray_call():
                    res = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                attempts[shard] += 1
                if attempts[shard] > cfg.max_retries:
                    raise RuntimeError(f"shard {shard} failed {attempts[shard]} times; last error:\n{e}") from e
                log(f"shard {shard} failed (attempt {attempts[shard]}): {type(e).__name__}; redoing it")
                queue.appendleft(shard)
                if isinstance(e, ray.exceptions.RayActorError):  # Ray reports it dead: no writer left
                    actors[i] = start_actors([i])[0]
            else:
                done_rows += res["rows"]
                cpu_s += res["cpu_s"]
                bar.update(res["rows"])
            if queue:
                submit(i)
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
    return done_rows, time.perf_counter() - t_ready, cpu_s


# ---- stages ------------------------------------------------------------------------------------


def stage_encode(plan: Plan) -> StageResult:
    cache, cfg = plan.cache, plan.cfg
    pending = cache.pending_shards()
    if not pending:
        write_invalid_report(cache, cfg.out, quiet=True)
        return StageResult("encode", "skipped", note=f"{cache.num_shards} shards already encoded")
    t0 = time.perf_counter()
    settings = WorkerSettings(
        task="encode", cache_path=str(cache.path), images_root=str(plan.images_root), image_size=cfg.image_size,
        seed=cfg.seed, texture=plan.tex, dino=plan.dino, semvae=None if plan.semantic_pass else plan.sem,
        batch_size=cfg.batch_size, precision=cfg.precision, tf32=cfg.tf32,
    )
    rows_of = {s: _rows(cache, s) for s in pending}
    rows, work_s, cpu_s = run_shards(cfg, settings, pending, rows_of, "encode_shard", "encode")
    bad = write_invalid_report(cache, cfg.out)
    note = f"{len(pending)} shards, {bad} invalid rows"
    return StageResult("encode", "done", time.perf_counter() - t0, rows, note, work_s, cpu_s)


def _rows(cache: LatentCache, shard: int) -> int:
    a, b = cache.layout.shard_rows(shard)
    return b - a


def write_invalid_report(cache: LatentCache, out: str, quiet: bool = False) -> int:
    """``<out>.invalid.tsv``: row, label, path and reason of every invalid row."""
    report = cache.invalid_report()
    path = Path(f"{out}.invalid.tsv")
    lines = ["row\tlabel\tpath\treason"] + [f"{r['row']}\t{r['label']}\t{r['path']}\t{r['reason']}" for r in report]
    path.write_text("\n".join(lines) + "\n")
    if report and not quiet:
        log(f"{len(report)} invalid image(s) skipped; reasons in {path}:")
        for r in report[:10]:
            log(f"  {r['path']}: {r['reason']}")
    return len(report)


def stage_semvae(plan: Plan) -> StageResult:
    cfg = plan.cfg
    if not plan.semantic_pass:
        return StageResult("semvae", "not needed", note=f"given: {plan.sem['name']}")
    final = plan.semvae_dir / SEMVAE_FILE
    if final.is_file():
        return StageResult("semvae", "skipped", note=f"{final} exists")
    if (plan.cache.path / CACHE_SEMVAE_FILE).is_file():  # a copied cache carries its SemVAE
        return StageResult("semvae", "skipped", note=f"stored in the cache ({CACHE_SEMVAE_FILE})")
    if not plan.cache.is_encoded():
        raise SystemExit("the SemVAE trains on the encoded cache: run the encode stage first")
    script = Path(__file__).with_name("train_semvae.py")
    launcher = [sys.executable]
    if cfg.semvae_nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.semvae_nproc}"]
    cmd = [
        *launcher, str(script), "--cache", cfg.out, "--run-dir", str(plan.semvae_dir),
        "--preset", plan.sem["preset"], "--steps", str(cfg.semvae_steps), "--batch-size", str(cfg.semvae_batch_size),
        "-o", f"seed={cfg.seed}", *cfg.semvae_args.split(),
    ]
    if cfg.device == "cpu":
        cmd += ["-o", "device=cpu"]
    log("training the Semantic VAE: " + " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    if not final.is_file():
        raise RuntimeError(f"SemVAE training finished without writing {final}")
    return StageResult("semvae", "done", time.perf_counter() - t0, note=str(final))


def stage_semantic(plan: Plan) -> StageResult:
    cache, cfg = plan.cache, plan.cfg
    if not plan.semantic_pass:
        return StageResult("semantic", "not needed", note="semantic latents made in the encode pass")
    pending = cache.pending_semantic_shards()
    if not pending:
        return StageResult("semantic", "skipped", note=f"{cache.num_shards} shards have semantic latents")
    if not cache.is_encoded():
        raise SystemExit("the semantic pass needs the encoded cache: run the encode stage first")
    final = plan.semvae_dir / SEMVAE_FILE
    stored = cache_semvae_spec(cache)  # the SemVAE kept in the cache, if any: repair uses it
    if stored is None and not final.is_file():
        raise SystemExit(f"no trained SemVAE at {final}: run the semvae stage first")
    spec = stored or semvae_spec(str(final), plan.sem["preset"], None)
    final = Path(spec["path"])
    if spec["config"] != plan.sem["config"]:
        raise SystemExit(f"{final} has config {spec['config']}, but the cache plans {plan.sem['config']}")
    source = cache.semantic_source()
    done_some = len(pending) < cache.num_shards
    if source and not same_weights(source, identity(spec)) and done_some:
        raise SystemExit(
            f"semantic latents of {cache.path} were partly computed with another SemVAE ({source.get('sha256', '?')[:16]}...) "
            f"than {final} ({spec['sha256'][:16]}...): mixing them would corrupt the cache. Restore that SemVAE, "
            "or re-create the cache."
        )
    if not (source and same_weights(source, identity(spec))):
        cache.set_semantic_source(identity(spec) or {})
    if stored is None:
        write_cache_semvae(cache, spec)
    t0 = time.perf_counter()
    settings = WorkerSettings(
        task="semantic", cache_path=str(cache.path), images_root=str(plan.images_root), image_size=cfg.image_size,
        seed=cfg.seed, semvae=spec, batch_size=max(cfg.batch_size, 64), precision=cfg.precision, tf32=cfg.tf32,
    )
    rows, work_s, cpu_s = run_shards(cfg, settings, pending, {s: _rows(cache, s) for s in pending}, "semantic_shard", "semantic")
    return StageResult("semantic", "done", time.perf_counter() - t0, rows, f"{len(pending)} shards", work_s, cpu_s)


def attach_semvae_decoder(plan: Plan) -> None:
    """[reader #13] The SemVAE travels with the cache: its decoder (train/main.py repa_targets=semvae)
    and, when loaded from a file, the whole SemVAE (a copied cache repairs itself with it)."""
    cache = plan.cache
    stored = cache_semvae_spec(cache)
    need_decoder = not (Path(cache.path) / DECODER_FILE).is_file()
    need_semvae = stored is None and (plan.semantic_pass or plan.sem["kind"] == "weights")
    if not (need_decoder or need_semvae):
        return
    spec = stored or plan.sem
    if plan.semantic_pass and stored is None:
        trained = plan.semvae_dir / SEMVAE_FILE
        if not need_decoder and not trained.is_file():
            return  # an older cache moved without its SemVAE run: nothing to store it from
        spec = semvae_spec(str(trained), plan.sem["preset"], None)
    if need_decoder:
        write_semvae_decoder(cache, build_semvae(spec), identity(spec) or {})
    if need_semvae:
        write_cache_semvae(cache, spec)


def stage_stats(plan: Plan) -> StageResult:
    cache, cfg = plan.cache, plan.cfg
    try:
        cache.stats()
        attach_semvae_decoder(plan)
        return StageResult("stats", "skipped", note="statistics present")
    except CacheError:
        pass
    t0 = time.perf_counter()
    stats = cache.compute_stats(seed=cfg.stats_seed, num_samples=cfg.stats_samples)
    attach_semvae_decoder(plan)
    n = int(cache.group["texture_mean"].attrs["num_samples"])
    note = f"{n} rows; texture std in [{stats['texture_std'].min():.3g}, {stats['texture_std'].max():.3g}]"
    return StageResult("stats", "done", time.perf_counter() - t0, n, note)


STAGE_FUNCS = {"encode": stage_encode, "semvae": stage_semvae, "semantic": stage_semantic, "stats": stage_stats}


def run(cfg: EncodeConfig) -> list[StageResult]:
    """Run the requested stages (preflight first); returns one result per stage."""
    with job_lock(cfg.out):  # before preflight: it may create the cache
        plan = preflight(cfg)
        c = plan.cache
        # The resolved config beside the cache, as the reports and locks (each run rewrites it);
        # written once the checks passed, so a refused run leaves nothing behind.
        Path(f"{cfg.out.rstrip('/')}.encode.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        log(
            f"cache {c.path}: {c.num_rows} images, {c.num_shards} shards of {c.layout.rows_per_shard}; texture "
            f"{c.layout.texture_shape}, semantic {c.layout.semantic_shape}, DINO {c.layout.dino_shape or 'not stored'}"
        )
        repair_damage(c, deep=cfg.verify)
        needs_ray = ("encode" in plan.stages and c.pending_shards()) or (
            "semantic" in plan.stages and plan.semantic_pass and c.pending_semantic_shards()
        )
        owns_ray = ensure_ray(cfg) if needs_ray else False
        install_stop_handlers()  # again: ray.init replaced them
        results: list[StageResult] = []
        try:
            for stage in plan.stages:
                res = STAGE_FUNCS[stage](plan)
                results.append(res)
                log(f"stage {res.stage}: {res.status} ({res.seconds:.1f} s{_rates(res)}) {res.note}")
        finally:
            if owns_ray:
                import ray

                ray.shutdown()
    print_summary(results)
    return results


def repair_damage(cache: LatentCache, deep: bool) -> list[int]:
    """Check every finished shard's files (``deep``: also decode them) and clear the flags of the
    damaged ones, so the stages below redo exactly those. Damaged statistics are dropped (the
    stats stage recomputes them); a damaged index was already rewritten by ``create_cache``."""
    if not cache.shard_done().any():
        return []
    t0 = time.perf_counter()
    damage = cache.find_damage(deep=deep, progress=deep)
    kind = "decoded every file (checksums)" if deep else "checked that every recorded file exists with its size"
    if not damage:
        log(f"integrity: {kind} of {int(cache.shard_done().sum())} finished shards: no damage ({time.perf_counter() - t0:.1f} s)")
        return []
    for part, problems in damage.items():
        for p in problems[:5]:
            log(f"integrity: {part}: {p}")
    shards = cache.mark_for_redo(damage)
    log(f"integrity: {len(damage)} damaged part(s); redoing shards {shards[:20]}{' ...' if len(shards) > 20 else ''}"
        + (" and the statistics" if "stats" in damage else ""))
    return shards


def _rates(r: StageResult) -> str:
    if not r.images_per_s:
        return ""
    steady = f", {r.work_images_per_s:.1f} img/s once workers were up" if r.work_images_per_s else ""
    return f", {r.images_per_s:.1f} img/s overall{steady}"


def print_summary(results: Sequence[StageResult]) -> None:
    log("summary:")
    for r in results:
        log(f"  {r.stage:<9} {r.status:<11} {r.seconds:8.1f} s{_rates(r)}  {r.note}")
    rows = [asdict(r) | {"images_per_s": r.images_per_s, "work_images_per_s": r.work_images_per_s} for r in results]
    print(json.dumps({"encode_summary": rows}), flush=True)


# ---- CLI ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    return config_parser(
        EncodeConfig, prog="pipeline/encode.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Examples:"):], base=EncodeConfig(images="", out=""),
        args=(
            Arg("--images", required=True, help="image folder: <root>/<class>/<image>"),
            Arg("--out", required=True, help="cache directory (Zarr v3 group); reports/locks go beside it"),
            Arg("--texture", metavar="PRESET"), Arg("--texture-vae", metavar="PATH"), Arg("--dino", metavar="PATH"),
            Arg("--semvae", metavar="PATH"), Arg("--image-size", metavar="PX"), Arg("--random-encoders", metavar="SEED"),
            Arg("--stages"),
            Arg("--verify", help="decode every file of the finished shards (checksums) first and redo the damaged "
                "ones; without it only file presence and sizes are checked"),
        ),
        deprecated={
            **{f"--{k.replace('_', '-')}": k for k in (
                "dino_preset", "semvae_preset", "repa_targets", "row_order", "order_seed", "seed", "rows_per_shard",
                "rows_per_chunk", "batch_size", "precision", "device", "num_workers", "threads_per_worker",
                "cpus_per_worker", "decode_threads", "max_retries", "ray_address", "ray_num_cpus", "semvae_dir",
                "semvae_steps", "semvae_batch_size", "semvae_nproc", "semvae_args", "stats_samples", "stats_seed")},
            "--no-tf32": "tf32=false",
        },
    )


def parse_args(argv: Sequence[str] | None = None) -> EncodeConfig:
    return parse_config(build_parser(), argv)[0]


def main(argv: Sequence[str] | None = None) -> list[StageResult] | int:
    cfg, args = parse_config(build_parser(), argv)
    if args.dry_run:
        return print_config(cfg)
    log("config: " + json.dumps(asdict(cfg)))
    check_inputs(input_files(cfg), WeightsError)  # every missing input named at once, before any work
    return run(cfg)


def input_files(cfg: EncodeConfig) -> dict[str, str | None]:
    """The files and folders this run reads ({flag: path}), defaults included."""
    real = cfg.random_encoders is None
    return {
        "--images": cfg.images,
        "--texture-vae": (cfg.texture_vae or f"weights/{KNOWN_WEIGHTS['texture_vae'].filename}")
        if real and not cfg.texture.startswith("standin") else None,
        "--dino": (cfg.dino or f"weights/{KNOWN_WEIGHTS['dinov2'].filename}") if real else None,
        "--semvae": cfg.semvae if cfg.semvae != "random" else None,
    }


def cli(argv: Sequence[str] | None = None) -> int:
    """Run; user errors are one ``error:`` line (exit 2, sfd.cli.cli_status), a stop signal one line (128+sig)."""
    install_stop_handlers(first=True)
    try:
        return cli_status(lambda: main(argv))
    except Stopped as e:
        print(
            f"[encode] stopped by {e}: lock released, finished shards kept; run the same command to resume",
            file=sys.stderr, flush=True,
        )
        return 128 + e.signum


if __name__ == "__main__":
    code = cli()
    sys.stdout.flush()
    sys.stderr.flush()
    # After a stop Ray's native threads may still be winding down; skip interpreter teardown
    # (where they abort) and leave with the status the shell expects (143 SIGTERM, 130 SIGINT).
    os._exit(code)
