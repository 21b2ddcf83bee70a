"""Nothing read silently wrong: the damage cases of a latent cache and of checkpoints, run locks,
clean stops and refusals, and soak runs with random kills (docs/reliability.md lists each case).

Synthetic data only: tiny random PNGs for the encode job, generated here.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfd.checkpoint import WeightsError, list_checkpoints, load_tensors
from sfd.data.cache import LAYOUT_KEY, CacheError, LatentCache, create_cache
from sfd.data.reader import LatentCacheReader
from sfd.manifest import CheckpointError, usable_checkpoints, verify_checkpoint
from sfd.runlock import LockError, RunLock, pid_start_ticks
from tests.test_train import TINY, losses, trainer
from tests.test_train import make_cache as make_train_cache

REPO = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "OMP_NUM_THREADS": "1",
       "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", REPO / "pipeline" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


encode_mod = sys.modules.get("pipeline_encode") or load_script("encode")
verify_mod = load_script("verify_cache")


# ---------------------------------------------------------------------------------------------
# The latent cache: every damage case is found before the first batch, naming the file


def small_cache(path: Path) -> LatentCache:
    """40 rows, 3 shards of 16 (the last partial), chunks of 8 rows, DINO stored (zarr shards)."""
    n = 40
    cache = create_cache(
        path, paths=[f"c{i % 2}/{i}.png" for i in range(n)], labels=np.arange(n) % 2, rows_per_shard=16,
        rows_per_chunk=8, texture_shape=(3, 2, 2), semantic_shape=(2, 2, 2), store_dino=True, dino_shape=(4, 5),
    )
    for s in cache.pending_shards():
        a, b = cache.layout.shard_rows(s)
        g = np.random.default_rng(s)
        cache.write_shard(
            s, g.normal(size=(b - a, 2, 3, 2, 2)), g.normal(size=(b - a, 2, 2, 2, 2)), g.normal(size=(b - a, 2, 4, 5)),
            valid=np.arange(a, b) != 5, reasons=["broken" if r == 5 else None for r in range(a, b)],
        )
    cache.compute_stats()
    return cache


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_cache(tmp_path_factory.mktemp("pristine") / "c.zarr").path


def _flip_byte(f: Path, at: int = 40) -> None:
    b = bytearray(f.read_bytes())
    b[at] ^= 0x01
    f.write_bytes(bytes(b))


# (damage, file relative to the cache, what the error must say). Chunk 1 of texture = rows 8-15.
DAMAGE = [
    ("delete", "texture/c/1/0/0/0/0", "texture/c/1/0/0/0/0 is missing"),
    ("delete", "dino/c/2/0/0/0", "dino/c/2/0/0/0 is missing"),
    ("truncate", "semantic/c/3/0/0/0/0", "semantic/c/3/0/0/0/0 has 10 bytes"),
    ("flip", "texture/c/4/0/0/0/0", "texture/c/4/0/0/0/0 does not decode"),  # same size: checksum
    ("delete", "valid/c/1", "valid/c/1 is missing"),
    ("delete", "labels/c/0", "labels/c/0 is missing"),
    ("delete", "shard_files/c/2", "shard 2 has no file record"),
    ("delete", "texture_std/c/0", "texture_std: chunk file"),
    ("flip", "semantic_mean/c/0", "semantic_mean: chunk file"),
]


@pytest.mark.parametrize("how,rel,message", DAMAGE, ids=[f"{h}-{r.split('/')[0]}" for h, r, _ in DAMAGE])
def test_cache_damage_is_an_error_naming_the_file(pristine: Path, tmp_path: Path, how: str, rel: str, message: str) -> None:
    path = tmp_path / "c.zarr"
    shutil.copytree(pristine, path)
    f = path / rel
    if how == "delete":
        f.unlink()
    elif how == "truncate":
        with open(f, "r+b") as fh:
            fh.truncate(10)
    else:
        _flip_byte(f, at=min(40, f.stat().st_size - 6))
    with pytest.raises(CacheError, match=message.replace("/", ".")) as e:
        LatentCacheReader(path, load_dino=True, mode="memory")  # every chunk read (and checked) up front
    assert "re-run the same encode command" in str(e.value)
    # verify-cache lists it too (exit 1), and a deep check is what the encode job's --verify does.
    cache = LatentCache.open(path)
    problems = [p for ps in cache.find_damage(deep=True).values() for p in ps]
    assert any(message.split(" ")[0].split(":")[0] in p for p in problems), problems
    assert verify_mod.main([str(path)]) == 1


def test_pagecache_mode_dino_reads_name_the_file(pristine: Path, tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    shutil.copytree(pristine, path)
    _flip_byte(path / "dino/c/1/0/0/0", at=100)  # an inner chunk of rows 8-15: only a read finds it
    reader = LatentCacheReader(path, load_dino=True, mode="pagecache", window_chunks=1)
    with pytest.raises(CacheError, match=r"array 'dino' chunk file .*dino/c/1/0/0/0 does not decode"):
        for _ in range(100):
            next(reader.batches(4))
    reader.close()


def test_pagecache_mode_checks_each_chunk_file_once(pristine: Path, tmp_path: Path) -> None:
    """The page-cache reader reads raw bytes (no zarr decode), so it checks each chunk file's
    CRC32C the first time it opens it: a flipped byte is an error naming the file, not data."""
    path = tmp_path / "c.zarr"
    shutil.copytree(pristine, path)
    _flip_byte(path / "texture/c/1/0/0/0/0", at=100)  # rows 8-15, same size
    reader = LatentCacheReader(path, mode="pagecache", window_chunks=1)
    with pytest.raises(CacheError, match=r"array 'texture' chunk file .*texture/c/1/0/0/0/0 does not decode"):
        for _ in range(100):
            next(reader.batches(4))
    reader.close()


def test_statistics_must_be_finite_and_positive(pristine: Path, tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    shutil.copytree(pristine, path)
    cache = LatentCache.open(path, mode="r+")
    cache.group["texture_std"][1] = 0.0
    with pytest.raises(CacheError, match=r"texture_std: std <= 0 for channels \[1\]"):
        cache.stats()
    cache.group["texture_std"][1] = np.nan
    with pytest.raises(CacheError, match="texture_std: non-finite"):
        LatentCacheReader(path)


def test_redo_marks_exactly_the_damaged_shards_and_rewrites_the_same_bytes(pristine: Path, tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    shutil.copytree(pristine, path)
    (path / "texture/c/1/0/0/0/0").unlink()  # shard 0
    cache = LatentCache.open(path, mode="r+")
    damage = cache.find_damage(deep=True)
    assert set(damage) == {"shard 0"}, damage
    assert cache.mark_for_redo(damage) == [0] and cache.pending_shards() == [0]
    a, b = cache.layout.shard_rows(0)
    g = np.random.default_rng(0)
    cache.write_shard(0, g.normal(size=(b - a, 2, 3, 2, 2)), g.normal(size=(b - a, 2, 2, 2, 2)),
                      g.normal(size=(b - a, 2, 4, 5)), valid=np.arange(a, b) != 5,
                      reasons=["broken" if r == 5 else None for r in range(a, b)])
    assert not cache.find_damage(deep=True)
    cmp = filecmp.dircmp(path, pristine)
    assert _all_same(cmp), "repaired cache differs from the original"


def _attrs_without_creator(path: Path) -> dict:
    meta = json.loads(path.read_text())
    meta.get("attributes", {}).pop("created_by", None)  # who/when/where: differs between runs
    return meta


def _all_same(cmp: filecmp.dircmp) -> bool:
    """Every file byte-identical (the root zarr.json up to its informational created_by)."""
    _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
    if "zarr.json" in mismatch and "created_by" in (Path(cmp.left) / "zarr.json").read_text():
        if _attrs_without_creator(Path(cmp.left) / "zarr.json") == _attrs_without_creator(Path(cmp.right) / "zarr.json"):
            mismatch.remove("zarr.json")
    if mismatch or errors or cmp.left_only or cmp.right_only:
        print("differ:", cmp.left, mismatch, errors, cmp.left_only, cmp.right_only)
        return False
    return all(_all_same(sub) for sub in cmp.subdirs.values())


def test_damaged_flag_reads_as_not_done(pristine: Path, tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    shutil.copytree(pristine, path)
    with open(path / "shard_done/c/1", "r+b") as fh:
        fh.truncate(2)
    assert LatentCache.open(path).pending_shards() == [1]  # redone by the encode job, never trusted


def test_old_format_cache_is_refused_with_the_fix(pristine: Path, tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    shutil.copytree(pristine, path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][LAYOUT_KEY]["format_version"] = 1
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"format version 1 \(no per-chunk checksums.*Re-encode it"):
        LatentCache.open(path)
    assert verify_mod.main([str(path)]) == 2


# ---------------------------------------------------------------------------------------------
# The encode job on synthetic images: repair, soak with kills, clean stops and refusals

ENC_IMAGES = 384  # 16 px random PNGs (+1 broken file): 13 shards of 30 rows
ENC_ARGS = ["--image-size", "16", "--texture", "standin-f4", "--random-encoders", "0", "--semvae", "random",
            "--repa-targets", "none", "--rows-per-shard", "30", "--rows-per-chunk", "15", "--batch-size", "30",
            "--stats-samples", "256"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    g = np.random.default_rng(0)
    for i in range(ENC_IMAGES):
        d = root / f"class{i % 8}"
        d.mkdir(exist_ok=True)
        Image.fromarray(g.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
    (root / "class0" / "broken.png").write_bytes(b"not a png")  # one invalid row, with its reason
    return root


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(images: Path, tmp_path_factory: pytest.TempPathFactory, ray_local) -> Path:
    """An uninterrupted run: the bytes every repaired or resumed cache must equal."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    encode_mod.main(["--images", str(images), "--out", str(out), *ENC_ARGS])
    return out


def test_encode_rerun_repairs_exactly_the_damaged_shards(reference: Path, images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    (out / "texture/c/3/0/0/0/0").unlink()  # shard 1
    with open(out / "semantic/c/9/0/0/0/0", "r+b") as fh:  # shard 4
        fh.truncate(1000)
    _flip_byte(out / "texture/c/14/0/0/0/0", at=500)  # shard 7: only --verify (decoding) finds it
    (out / "texture_std/c/0").unlink()
    (out / "labels/c/0").unlink()
    assert verify_mod.main([str(out)]) == 1
    printed = capsys.readouterr().out
    assert "texture/c/14/0/0/0/0 does not decode" in printed and "labels/c/0 is missing" in printed

    capsys.readouterr()
    results = encode_mod.main(["--images", str(images), "--out", str(out), *ENC_ARGS, "--verify"])
    log = capsys.readouterr().out
    assert "redoing shards [1, 4, 7] and the statistics" in log, log
    assert "rewriting the file index" in log
    assert results[0].status == "done" and results[0].images == 3 * 30
    assert _all_same(filecmp.dircmp(out, reference)), "the repaired cache is not byte-identical"
    assert verify_mod.main([str(out)]) == 0


def _encode_proc(images: Path, out: Path) -> subprocess.Popen:
    """The encode job as its own process, attached to this test's Ray instance (as under
    `ray job submit`): a fresh local Ray per run would cost more than the work."""
    import ray

    cmd = [sys.executable, str(REPO / "pipeline" / "encode.py"), "--images", str(images), "--out", str(out), *ENC_ARGS]
    env = {**ENV, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _wait_for_progress(out: Path, proc: subprocess.Popen, min_done: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            done = int(LatentCache.open(out).shard_done().sum()) if (out / "zarr.json").exists() else 0
        except CacheError:
            done = 0
        if done >= min_done:
            return done
        time.sleep(0.1)
    raise AssertionError(f"no progress (exit {proc.poll()}): {proc.stderr.read() if proc.poll() is not None else ''}")


def test_encode_soak_random_kills_then_identical(reference: Path, images: Path, tmp_path: Path) -> None:
    """SIGTERM (clean stop: 143, one line, lock released), then SIGKILL of the whole job (lock left,
    taken over), then a run to the end: the cache equals the uninterrupted one byte for byte."""
    rng = random.Random(int(os.environ.get("SFD_SOAK_SEED", "12")))
    out = tmp_path / "cache"
    lock = Path(f"{out}.lock")

    proc = _encode_proc(images, out)
    _wait_for_progress(out, proc, 1)
    time.sleep(rng.uniform(0.0, 1.0))
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM: lock released" in stderr
    assert "Traceback" not in stderr + stdout and "SIGABRT" not in stderr + stdout, stderr[-3000:]
    assert not lock.exists()
    first = int(LatentCache.open(out).shard_done().sum())
    assert 0 < first < 13

    proc = _encode_proc(images, out)
    _wait_for_progress(out, proc, first + 1)
    time.sleep(rng.uniform(0.0, 1.0))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert lock.exists()  # a dead driver's lock: the next run takes it over

    time.sleep(2)  # let the killed actors go (non-detached actors die with their driver)
    encode_mod.main(["--images", str(images), "--out", str(out), *ENC_ARGS])
    assert verify_mod.main([str(out)]) == 0
    assert _all_same(filecmp.dircmp(out, reference))
    assert Path(f"{out}.invalid.tsv").read_text() == Path(f"{reference}.invalid.tsv").read_text()


def _evil_pickle(path: Path) -> Path:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/sfd-evil-was-run",))

    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    return path


def test_refused_weights_one_error_line_and_no_new_directory(images: Path, tmp_path: Path) -> None:
    evil = _evil_pickle(tmp_path / "evil.ckpt")
    out = tmp_path / "new" / "deeper" / "cache"
    cmd = [sys.executable, str(REPO / "pipeline" / "encode.py"), "--images", str(images), "--out", str(out),
           "--image-size", "16", "--texture-vae", str(evil), "--dino", str(evil), "--semvae", str(evil)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "evil.ckpt" in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()

    cmd = [sys.executable, str(REPO / "sample" / "grid.py"), "--ckpt", str(evil), "--model", "tiny",
           "--stats", "identity", "--out", str(tmp_path / "g.png")]  # the weights are what is refused
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "evil.ckpt" in errors[0] and "Traceback" not in r.stderr, r.stderr


def test_trainer_refused_weights_leave_no_run_directory(train_cache: Path, tmp_path: Path) -> None:
    evil = _evil_pickle(tmp_path / "evil.pt")
    out = tmp_path / "runs" / "new"
    cmd = [sys.executable, str(REPO / "train" / "main.py"), *TINY, "--cache", str(train_cache), "--out-dir", str(out),
           "--init-from", str(evil)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")][0].count("evil.pt") >= 1
    assert not (tmp_path / "runs").exists()  # the lock's folders are removed again


# ---------------------------------------------------------------------------------------------
# Locks


def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "run.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        owner = {"what": "trainer", "host": os.uname().nodename, "pid": sleeper.pid,
                 "pid_start": pid_start_ticks(sleeper.pid), "started_utc": "x"}
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(owner))
        with pytest.raises(LockError, match=f"held by trainer pid {sleeper.pid}"):
            RunLock(path, "trainer").acquire()
        assert path.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock(path, "trainer").acquire()  # the owner is dead: stale, taken over
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()
    # A refused lock in a fresh folder leaves no folder behind.
    other = tmp_path / "fresh" / "x.lock"
    RunLock(other, "t").acquire().release()
    assert not (tmp_path / "fresh").exists()


# ---------------------------------------------------------------------------------------------
# Checkpoints: manifest, fallback, no tracebacks


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_train_cache(tmp_path_factory.mktemp("tcache") / "tiny.zarr").path


@pytest.fixture(scope="module")
def uninterrupted(train_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    torch.set_num_threads(1)
    trainer.main([*TINY, "--cache", str(train_cache), "--out-dir", str(out), "-o", "max_steps=40"])
    return losses(out)


def _train(cache: Path, out: Path, *overrides: str) -> None:
    torch.set_num_threads(1)
    trainer.main([*TINY, "--cache", str(cache), "--out-dir", str(out), *[a for o in overrides for a in ("-o", o)]])


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


@pytest.mark.parametrize("victim,damage", [
    ("model.safetensors", "truncate"), ("ema.safetensors", "flip"), ("state.pt", "truncate"),
    ("state.pt", "delete"), ("manifest.json", "garble"),
])
def test_checkpoint_damage_is_detected(train_cache: Path, tmp_path: Path, victim: str, damage: str) -> None:
    out = tmp_path / "run"
    _train(train_cache, out, "max_steps=2", "ckpt_every=1")
    d = out / "checkpoints" / "0000002"
    assert (d / "manifest.json").is_file() and not verify_checkpoint(d)
    f = d / victim
    if damage == "truncate":
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    elif damage == "flip":
        _flip_byte(f, at=f.stat().st_size - 10)
    elif damage == "delete":
        f.unlink()
    else:
        f.write_text("{not json")
    problems = verify_checkpoint(d)
    assert problems and victim in " ".join(problems), problems
    from sfd.checkpoint import list_checkpoints

    warnings: list[str] = []
    usable = usable_checkpoints(out, list_checkpoints, warnings.append)
    if victim == "state.pt" and damage == "delete":
        assert [s for s, _ in usable] == [1] and not warnings  # never counted (state.pt marks completion)
    else:
        assert [s for s, _ in usable] == [1] and len(warnings) == 1 and victim in warnings[0]
        assert (out / "checkpoints" / "0000002.damaged").is_dir()


def test_truncated_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    f = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1000)}, str(f))
    with open(f, "r+b") as fh:
        fh.truncate(500)
    with pytest.raises(WeightsError, match="w.safetensors"):
        load_tensors(f)


def test_corrupt_newest_checkpoint_falls_back_and_resumes_bitwise(
    train_cache: Path, uninterrupted: dict, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    _train(train_cache, out, "max_steps=6", "ckpt_every=2")
    with open(out / "checkpoints/0000006/model.safetensors", "r+b") as fh:
        fh.truncate(100)
    capsys.readouterr()
    _train(train_cache, out, "max_steps=10", "ckpt_every=2")
    log = capsys.readouterr().out
    assert "warning: damaged checkpoint(s) skipped" in log and "model.safetensors" in log
    assert "resuming from step 4" in log
    assert _steps(out) == list(range(1, 11))  # steps 5, 6 were re-run: logged once
    got = losses(out)
    assert all(got[s] == uninterrupted[s] for s in range(1, 11)), "resumed loss log differs"
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        for d in (out / "checkpoints").iterdir():
            if d.name.isdigit():
                (d / "state.pt").write_bytes(b"garbage")
        from sfd.checkpoint import list_checkpoints

        usable_checkpoints(out, list_checkpoints, print, move_aside=False)


# ---------------------------------------------------------------------------------------------
# Trainer: one writer per run directory, launcher death, soak with kills


def _torchrun(cache: Path, out: Path, max_steps: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(REPO / "train" / "main.py"),
           *TINY, "--cache", str(cache), "--out-dir", str(out), "-o", f"max_steps={max_steps}", "-o", "ckpt_every=3"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)


def _wait_steps(out: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(_steps(out)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        time.sleep(0.05)
    raise AssertionError("the trainer made no progress")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError):  # a zombie (not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    return False


def _worker_pid(out: Path) -> int:
    return int(json.loads((out / "run.lock").read_text())["pid"])


def test_trainer_soak_kills_lock_and_launcher_death(train_cache: Path, uninterrupted: dict, tmp_path: Path, capsys) -> None:
    rng = random.Random(int(os.environ.get("SFD_SOAK_SEED", "12")))
    out = tmp_path / "run"
    # 1. SIGKILL of the whole job at a random step (after a checkpoint): steps past it are logged
    #    but not saved; the resume must drop them from metrics.jsonl.
    proc = _torchrun(train_cache, out, 40)
    _wait_steps(out, proc, 4 + rng.randrange(4))
    first_worker = _worker_pid(out)
    os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):  # torchrun's worker runs in a session of its own
        os.kill(first_worker, signal.SIGKILL)
    proc.wait()
    while _alive(first_worker):
        time.sleep(0.05)
    assert (out / "run.lock").exists()  # a dead trainer's lock: the restart takes it over

    # 2. Restart; once it trains (a new checkpoint), a second trainer on the directory is refused.
    from sfd.checkpoint import list_checkpoints

    resumed = max([s for s, _ in list_checkpoints(out)], default=0)
    # Far more steps than the comparison needs, so the run is still going (holding the lock) when
    # the second trainer and the launcher kill come, however fast the machine is.
    proc = _torchrun(train_cache, out, 5000)
    deadline = time.time() + 120
    while max([s for s, _ in list_checkpoints(out)], default=0) <= resumed:
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else "slow"
        time.sleep(0.05)
    worker = _worker_pid(out)
    with pytest.raises(LockError, match=f"held by trainer pid {worker}"):
        _train(train_cache, out, "max_steps=40")
    # 3. Kill only the launcher (SIGKILL): its worker, in its own session, stops by itself.
    time.sleep(rng.uniform(0, 0.5))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the worker outlived its launcher")
    assert not (out / "run.lock").exists()  # released by the worker's clean stop

    # 4. Finish in this process: the loss log equals the uninterrupted run's, each step once (the
    #    worker may have saved past step 40 when it stopped; the lr is constant, so max_steps does
    #    not change the first 40 steps).
    capsys.readouterr()
    last = max(40, max(s for s, _ in list_checkpoints(out)))
    _train(train_cache, out, f"max_steps={last}", "ckpt_every=3")
    assert _steps(out) == list(range(1, last + 1))
    got = losses(out)
    assert all(got[s] == uninterrupted[s] for s in range(1, 41)), "loss log differs from the uninterrupted run"


def test_step_one_grad_norm_is_large_but_trips_nothing(train_cache: Path, tmp_path: Path) -> None:
    """Cosine loss on the zero-initialised output: |grad| ~ 1/eps at step 1 (docs/decisions.md).
    Finite, so the NaN guard does not skip the step; with grad_clip the step is clipped, not skipped."""
    for extra in ((), ("grad_clip=1.0",)):
        out = tmp_path / f"run{len(extra)}"
        _train(train_cache, out, "max_steps=2", *extra)
        first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert first["step"] == 1 and first["skipped"] == 0
        assert 1e6 < first["grad_norm"] < 1e12, first


# ---------------------------------------------------------------------------------------------
# The trainer checks the cache's checksums before step 1 (verify=full, the default)


def _trainer_cli(cache: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train" / "main.py"), *TINY, "--cache", str(cache), "--out-dir", str(out),
           *[a for o in overrides for a in ("-o", o)]]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def _one_error_naming(r: subprocess.CompletedProcess, rel: str) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and rel in errors[0] and "does not decode (checksum mismatch)" in errors[0], r.stderr
    assert "re-run the same encode command" in errors[0] and "just verify-cache" in errors[0], errors[0]
    return errors[0]


def test_flipped_byte_stops_the_trainer_before_step_one(tmp_path: Path) -> None:
    """Default reader mode (pagecache): a bit flip in a texture chunk is found before step 1 —
    on a fresh run and on a resume (bit rot happens between runs) — with nothing written; with
    verify=lazy (the old behaviour) it is found only when the reader first reads that chunk."""
    from sfd.data.reader import DEFAULT_WINDOW_CHUNKS, epoch_order

    c = make_train_cache(tmp_path / "c.zarr", rows=256)  # 16 chunks: a batch of 8 touches at most 8
    cache = c.path
    # The chunk the run reads last for the first time: lazy mode trains some steps before it.
    rpc, batch = c.layout.rows_per_chunk, 8  # the tiny preset's global batch
    rows, _ = epoch_order(0, 0, c.valid(), rpc, DEFAULT_WINDOW_CHUNKS)
    first_step = {}
    for i, r in enumerate(rows.tolist()):
        first_step.setdefault(r // rpc, i // batch)
    victim = max(first_step, key=first_step.get)
    assert first_step[victim] >= 1  # the precondition of the lazy half below
    rel = f"texture/c/{victim}/0/0/0/0"

    resumed = tmp_path / "resumed"
    assert _trainer_cli(cache, resumed, "max_steps=2").returncode == 0
    before = (resumed / "metrics.jsonl").read_text()
    _flip_byte(cache / rel, at=100)

    fresh = tmp_path / "fresh"
    _one_error_naming(_trainer_cli(cache, fresh, "max_steps=4"), rel)
    assert not fresh.exists()  # no config, no metrics, no checkpoint
    _one_error_naming(_trainer_cli(cache, resumed, "max_steps=4"), rel)
    assert [s for s, _ in list_checkpoints(resumed)] == [2]
    assert (resumed / "metrics.jsonl").read_text() == before

    lazy = tmp_path / "lazy"
    _one_error_naming(_trainer_cli(cache, lazy, "max_steps=8", "ckpt_every=1", "verify=lazy"), rel)
    assert _steps(lazy) == list(range(1, first_step[victim] + 1))  # trained until the chunk was read


def test_two_ranks_share_the_check_and_stop_together(train_cache: Path, tmp_path: Path) -> None:
    """torchrun, 2 ranks: rank 1 checks texture chunk 1 (files are dealt round-robin), the
    all-reduce tells rank 0, and both stop before step 1; rank 0 prints the one error line."""
    cache = tmp_path / "c.zarr"
    shutil.copytree(train_cache, cache)
    _flip_byte(cache / "texture/c/1/0/0/0/0", at=100)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train" / "main.py"), *TINY, "--cache", str(cache), "--out-dir", str(out), "-o", "max_steps=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    # torchrun reports each worker's exit status (and prints its own traceback for the failure).
    assert r.returncode != 0 and r.stderr.count("exitcode  : 2") == 2, r.stderr
    assert 'main.py", line' not in r.stderr, r.stderr  # no worker traceback
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "texture/c/1/0/0/0/0 does not decode" in errors[0], r.stderr
    assert not out.exists()
