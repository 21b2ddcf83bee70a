"""The encode pipeline end to end on synthetic JPEGs with tiny random-init encoders (Ray local, CPU).

Covers the issue's "must show": the cache round-trips (shapes, labels, flips, stats), a job
killed mid-way and re-run gives the same bytes as an uninterrupted one, broken files are reported
and skipped; plus SemVAE training/resume, the semantic pass, and the clear errors before work.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from sfd.checkpoint import WeightsError, load_tensors, read_safetensors_metadata, save_safetensors
from sfd.config import ConfigError
from sfd.data.cache import CacheMismatchError, LatentCache
from sfd.data.images import discover, hflip, load_image, to_model_input
from sfd.data.synthetic import QUIRKS, write_quirks
from sfd.encoding import (
    build_semvae,
    build_texture_encoder,
    row_generators,
    semvae_sample,
    semvae_spec,
)
from sfd.models.semvae import tokens_to_latent
from sfd.models.standins import PixelUnshuffleAutoencoder, build_texture_decoder
from sfd.runlock import LockError

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 24  # 3 shards of 8 rows
COMMON = ["--image-size", "64", "--random-encoders", "0", "--rows-per-shard", "8", "--rows-per-chunk", "4", "--batch-size", "8"]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", REPO / "pipeline" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


encode_mod = load_script("encode")
train_mod = load_script("train_semvae")


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    import ray

    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def subset(sample_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first NUM_IMAGES classes of the sample (one JPEG each), linked into a fresh folder."""
    root = tmp_path_factory.mktemp("subset")
    for cls in sorted(p for p in sample_images.iterdir() if p.is_dir())[:NUM_IMAGES]:
        (root / cls.name).mkdir()
        for f in cls.iterdir():
            (root / cls.name / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def full_cache(subset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """All four stages: encode (DINO stored) → train SemVAE 6 steps → semantic pass → stats."""
    out = tmp_path_factory.mktemp("full") / "cache"
    results = encode_mod.main([
        "--images", str(subset), "--out", str(out), *COMMON, "--semvae-steps", "6", "--semvae-batch-size", "8",
        "--semvae-args", "--log-every 3 --window-chunks 2",
    ])
    return out, results


def test_round_trip(full_cache: tuple[Path, list], subset: Path) -> None:
    out, results = full_cache
    assert [(r.stage, r.status) for r in results] == [("encode", "done"), ("semvae", "done"), ("semantic", "done"), ("stats", "done")]
    cache = LatentCache.open(out)
    assert cache.is_complete() and cache.num_rows == NUM_IMAGES
    images = discover(subset).permuted(0)  # the default row order: sorted list, fixed permutation
    assert cache.paths() == list(images.paths)
    np.testing.assert_array_equal(cache.labels(), images.labels)
    assert cache.attrs["class_names"] == list(images.class_names)
    assert cache.attrs["texture_encoder"]["name"] == "random-init:tiny:0"
    g = cache.group
    assert g["texture"].shape == (NUM_IMAGES, 2, 8, 16, 16)
    assert g["semantic"].shape == (NUM_IMAGES, 2, 4, 16, 16)
    assert g["dino"].shape == (NUM_IMAGES, 2, 256, 64)
    assert cache.valid().all()
    assert Path(f"{out}.invalid.tsv").read_text().strip() == "row\tlabel\tpath\treason"

    # Flips: the stored flipped latent is the encoding of the flipped image (per-row noise seeds).
    vae = build_texture_encoder(cache.attrs["texture_encoder"])
    for row in (0, 13):
        img, _ = load_image(subset / cache.paths()[row], 64)
        for flip, view in ((0, img), (1, hflip(img))):
            with torch.no_grad():
                z = vae.encode(to_model_input(np.array(view[None])), generator=row_generators(0, "texture", [row], [flip]))
            torch.testing.assert_close(torch.from_numpy(g["texture"][row, flip].astype(np.float32)), z[0], rtol=2e-3, atol=2e-3)
        assert not np.array_equal(g["texture"][row, 0], g["texture"][row, 1])

    # Semantic pass: the trained SemVAE's posterior sample of the stored fp16 DINO tokens.
    sem_spec = semvae_spec(f"{out}.semvae/semvae.safetensors", "tiny", None)
    assert cache.semantic_source()["sha256"] == sem_spec["sha256"]
    semvae = build_semvae(sem_spec)
    row = 5
    tokens = torch.from_numpy(g["dino"][row].astype(np.float32))  # (2, 256, 64)
    with torch.no_grad():
        want = tokens_to_latent(semvae_sample(semvae, tokens, row_generators(0, "semantic", [row, row], [0, 1])))
    torch.testing.assert_close(torch.from_numpy(g["semantic"][row].astype(np.float32)), want, rtol=2e-3, atol=2e-3)
    # Its decoder travels with the cache (repa_targets=semvae in train/main.py).
    from sfd.repa_targets import load_semvae_decoder

    decoder, _, how = load_semvae_decoder(cache)
    assert "semvae_decoder.safetensors" in how
    z = torch.randn(2, 256, 4)
    torch.testing.assert_close(decoder(z), semvae.decode(z))

    stats = cache.stats()
    assert stats["texture_mean"].shape == (8,) and stats["semantic_std"].shape == (4,)
    assert (stats["texture_std"] > 0).all() and (stats["semantic_std"] > 0).all()
    assert g["texture_mean"].attrs["num_samples"] == NUM_IMAGES
    # The random-init texture decoder is rebuilt from the attributes alone.
    dec = build_texture_decoder(cache.attrs)
    assert dec.decode(torch.from_numpy(g["texture"][:2, 0].astype(np.float32))).shape == (2, 3, 64, 64)

    # Re-running the same command skips every stage.
    again = encode_mod.main(["--images", str(subset), "--out", str(out), *COMMON, "--semvae-steps", "6", "--semvae-batch-size", "8"])
    assert [r.status for r in again] == ["skipped"] * 4


def test_semvae_training_resumes_exactly(full_cache: tuple[Path, list], tmp_path: Path) -> None:
    out, _ = full_cache
    common = ["--cache", str(out), "--preset", "tiny", "--steps", "8", "--batch-size", "8", "--window-chunks", "2", "--log-every", "2"]
    straight = train_mod.main([*common, "--run-dir", str(tmp_path / "a")])
    interrupted = tmp_path / "b"
    train_mod.main([*common, "--run-dir", str(interrupted), "--stop-after", "3"])
    assert not (interrupted / "semvae.safetensors").exists()
    assert (interrupted / "checkpoints" / "0000003" / "state.pt").is_file()
    resumed = train_mod.main([*common, "--run-dir", str(interrupted)])
    a, b = load_tensors(straight), load_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    first = load_tensors(interrupted / "checkpoints" / "0000003" / "model.safetensors")
    assert any(not torch.equal(first[k], b[k]) for k in b)  # training moved the weights
    # Both runs log the same records to metrics.jsonl (the resumed one kept its step-2 line).
    logs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (tmp_path / "a", interrupted)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [2, 4, 6, 8]
    for x, y in zip(*logs):
        assert {k: v for k, v in x.items() if k != "samples_per_s"} == {k: v for k, v in y.items() if k != "samples_per_s"}


def test_lr_schedule() -> None:
    cfg = train_mod.TrainSemVAEConfig(cache="", run_dir="", steps=1000)
    f = lambda s: train_mod.lr_factor(s, cfg)
    assert f(0) == pytest.approx(0.01) and f(50) == pytest.approx(0.505)  # warm-up capped at steps // 10
    assert f(100) == 1.0 and f(800) == 1.0
    assert f(999) == pytest.approx(0.1) and 0.1 < f(900) < 1.0
    assert f(900) > f(950)
    cfg_long = train_mod.TrainSemVAEConfig(cache="", run_dir="")  # the authors' 1M steps: 500 warm-up, decay from 800k
    assert train_mod.lr_factor(499, cfg_long) < 1.0 == train_mod.lr_factor(500, cfg_long) == train_mod.lr_factor(799_999, cfg_long)


def _read_lines(stream: io.TextIOBase, sink: list[str]) -> None:
    for line in stream:
        sink.append(line)


def test_killed_job_resumes_to_identical_cache(full_cache: tuple[Path, list], subset: Path, tmp_path: Path) -> None:
    """SIGKILL the driver (and its Ray instance) after its first finished shard, then re-run."""
    out = tmp_path / "cache"
    cmd = [sys.executable, str(REPO / "pipeline" / "encode.py"), "--images", str(subset), "--out", str(out), *COMMON,
           "--stages", "encode", "--num-workers", "1", "--ray-num-cpus", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    deadline = time.time() + 120
    done = np.zeros(3, dtype=bool)
    while time.time() < deadline and proc.poll() is None:
        if (out / "zarr.json").exists():
            done = LatentCache.open(out).shard_done()
            if done.any():
                break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert done.any() and not done.all(), f"kill did not land mid-job (flags {done}):\n{''.join(lines)}"
    # Non-detached actors die with their driver; wait until the writer process is really gone.
    pids = [int(m) for m in re.findall(r"worker \d+: pid (\d+)", "".join(lines))]
    assert pids, "".join(lines)
    for pid in pids:
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    assert Path(f"{out}.lock").exists()  # left behind by the killed driver: taken over below
    assert LatentCache.open(out).pending_shards()

    results = encode_mod.main(["--images", str(subset), "--out", str(out), *COMMON, "--stages", "encode"])
    assert results[0].status == "done"
    killed, reference = LatentCache.open(out), LatentCache.open(full_cache[0])
    assert killed.is_encoded()
    for name in ("texture", "dino", "valid", "labels", "paths", "reason", "shard_done"):
        a, b = np.asarray(killed.group[name][:]), np.asarray(reference.group[name][:])
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name


def _same_files(a: Path, b: Path) -> list[str]:
    """Relative paths whose bytes differ between two folders (or exist in one only)."""
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file()} | {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    return sorted(str(f) for f in files if not ((a / f).is_file() and (b / f).is_file() and (a / f).read_bytes() == (b / f).read_bytes()))


def _damage_and_verify(cache: Path) -> None:
    """One DINO zarr shard (REPA targets of work shard 1) bit-flipped, one semantic chunk of work
    shard 2 deleted; `verify-cache` must name both."""
    dino = cache / "dino/c/3/0/0/0"  # rows 12-15: work shard 1 (8 rows per shard)
    data = bytearray(dino.read_bytes())
    data[len(data) // 3] ^= 0xFF
    dino.write_bytes(bytes(data))
    (cache / "semantic/c/4/0/0/0/0").unlink()  # rows 16-19: work shard 2
    verify_mod = load_script("verify_cache")
    assert verify_mod.main([str(cache)]) == 1


def test_cache_travels_alone_and_repairs_with_its_stored_semvae(full_cache: tuple[Path, list], subset: Path, tmp_path: Path, capsys) -> None:
    """A cache folder copied alone (no sibling `.semvae` run) with stored DINO targets, damaged, is
    repaired by the same encode command into the original bytes, using the SemVAE it stores."""
    out, _ = full_cache
    copy = tmp_path / "elsewhere" / "cache"
    shutil.copytree(out, copy)
    assert (copy / "semvae.safetensors").is_file() and not Path(f"{copy}.semvae").exists()
    _damage_and_verify(copy)
    capsys.readouterr()
    results = encode_mod.main(["--images", str(subset), "--out", str(copy), *COMMON, "--semvae-steps", "6",
                               "--semvae-batch-size", "8", "--verify"])
    log = capsys.readouterr().out
    assert "redoing shards [1, 2]" in log, log
    assert [(r.stage, r.status) for r in results][:3] == [("encode", "done"), ("semvae", "skipped"), ("semantic", "done")], log
    assert results[0].images == 16 and "stored in the cache" in results[1].note
    assert not Path(f"{copy}.semvae").exists()  # nothing was retrained
    assert _same_files(copy, out) == []
    assert load_script("verify_cache").main([str(copy)]) == 0


def test_retrained_semvae_is_the_same_semvae(full_cache: tuple[Path, list], subset: Path, tmp_path: Path) -> None:
    """Without the stored SemVAE (an older cache moved alone), the SemVAE retrained bit-identically
    is accepted: the cache compares the weights' identity, not the file's hash (its metadata holds
    the run's paths); the refusal of a different SemVAE stays."""
    out, _ = full_cache
    copy = tmp_path / "cache"
    shutil.copytree(out, copy)
    (copy / "semvae.safetensors").unlink()
    _damage_and_verify(copy)
    args = ["--images", str(subset), "--out", str(copy), *COMMON, "--semvae-steps", "6", "--semvae-batch-size", "8",
            "--semvae-args", "--log-every 3 --window-chunks 2", "--verify"]
    results = encode_mod.main(args)
    assert [(r.stage, r.status) for r in results][:3] == [("encode", "done"), ("semvae", "done"), ("semantic", "done")]
    retrained, original = Path(f"{copy}.semvae/semvae.safetensors"), Path(f"{out}.semvae/semvae.safetensors")
    assert retrained.read_bytes() != original.read_bytes()  # other metadata (the run's paths) ...
    a, b = load_tensors(retrained), load_tensors(original)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # ... the same weights
    assert _same_files(copy, out) == []  # the stored SemVAE, re-written from the cache's record, too

    # A SemVAE with other weights is still refused for a partly done semantic pass.
    other = build_semvae(semvae_spec(str(retrained), "tiny", None))
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    save_safetensors(other.state_dict(), retrained, metadata=read_safetensors_metadata(retrained))
    (copy / "semvae.safetensors").unlink()
    _damage_and_verify(copy)
    with pytest.raises(SystemExit, match="another SemVAE"):
        encode_mod.main(args)


def _broken_folder(sample_images: Path, root: Path) -> dict[str, str | None]:
    """Two classes of sample JPEGs plus problem files; value = expected reason fragment (None: valid)."""
    classes = sorted(p for p in sample_images.iterdir() if p.is_dir())[:2]
    expected: dict[str, str | None] = {}
    for cls in classes:
        (root / cls.name).mkdir(parents=True)
        for f in cls.iterdir():
            (root / cls.name / f.name).write_bytes(f.read_bytes())
            expected[f"{cls.name}/{f.name}"] = None
    a, b = root / classes[0].name, root / classes[1].name
    # Every format quirk of real collections (sfd.data.synthetic.QUIRKS), plus a 1-pixel image.
    for kind, path in write_quirks(a).items():
        expected[f"{a.name}/{path.name}"] = QUIRKS[kind][1]
    Image.new("RGB", (1, 1), (255, 0, 0)).save(b / "tiny.png")
    expected[f"{b.name}/tiny.png"] = "too small"
    return expected


def test_broken_files_are_reported_and_skipped(sample_images: Path, tmp_path: Path) -> None:
    """Also the given-SemVAE path: semantic latents in the encode pass, no DINO stored."""
    images = tmp_path / "images"
    expected = _broken_folder(sample_images, images)
    out = tmp_path / "cache"
    results = encode_mod.main([
        "--images", str(images), "--out", str(out), *COMMON, "--semvae", "random", "--repa-targets", "none", "--row-order", "sorted",
    ])
    assert [r.status for r in results] == ["done", "not needed", "not needed", "done"]
    cache = LatentCache.open(out)
    assert not cache.has_dino and cache.is_complete()
    report = {r["path"]: r["reason"] for r in cache.invalid_report()}
    assert set(report) == {p for p, why in expected.items() if why is not None}
    for path, why in expected.items():
        if why is not None:
            assert why in report[path], (path, report[path])
    tsv = Path(f"{out}.invalid.tsv").read_text()
    assert all(p in tsv for p in report)
    valid = cache.valid()
    assert valid.sum() == len(expected) - len(report)
    for name in ("texture", "semantic"):
        x = np.asarray(cache.group[name][:])
        assert not x[~valid].any() and all(x[i].any() for i in np.flatnonzero(valid))
    assert (cache.stats()["semantic_std"] > 0).all()


def test_clear_errors_before_any_work(full_cache: tuple[Path, list], subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode_mod, "ensure_ray", lambda cfg: pytest.fail("Ray started before the checks"))
    out = full_cache[0]
    before = LatentCache.open(out).shard_done().copy()
    other = [a if a != "0" else "1" for a in COMMON]  # other random encoders (seed 1)
    with pytest.raises(CacheMismatchError, match="texture_encoder"):
        encode_mod.main(["--images", str(subset), "--out", str(out), *other])
    with pytest.raises(CacheMismatchError, match="image_size"):
        encode_mod.main(["--images", str(subset), "--out", str(out), *COMMON[:1], "128", *COMMON[2:]])
    assert np.array_equal(LatentCache.open(out).shard_done(), before)

    fresh = tmp_path / "new" / "cache"
    with pytest.raises(WeightsError, match="nope-vae.ckpt"):
        encode_mod.main(["--images", str(subset), "--out", str(fresh), "--texture-vae", str(tmp_path / "nope-vae.ckpt")])
    with pytest.raises(WeightsError, match="nope-dino.pth"):
        encode_mod.main(["--images", str(subset), "--out", str(fresh), "--texture", "standin-f4", "--dino", str(tmp_path / "nope-dino.pth")])
    with pytest.raises(ConfigError, match="repa_targets=none needs --semvae"):  # a user error, not a bare exit
        encode_mod.main(["--images", str(subset), "--out", str(fresh), *COMMON, "--repa-targets", "none"])
    assert not fresh.exists()


def test_standin_and_texture_decoder(tmp_path: Path) -> None:
    ae = PixelUnshuffleAutoencoder(4)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 48, 16, 16) and "not a VAE" in ae.name
    torch.testing.assert_close(ae.decode(z), x, rtol=0, atol=1e-6)
    attrs = {"texture_encoder": {"kind": "standin", "name": ae.name, "factor": 4, "scale": ae.scale}}
    torch.testing.assert_close(build_texture_decoder(attrs).decode(z), x, rtol=0, atol=1e-6)
    weights = {"texture_encoder": {"kind": "weights", "name": "f16d32", "file": "x.ckpt", "sha256": "0" * 64,
                                   "config": {"ch": 32, "ch_mult": [1, 2, 2], "z_channels": 8, "embed_dim": 8}}}
    with pytest.raises(WeightsError, match="missing-vae.ckpt"):
        build_texture_decoder(weights, vae_path=tmp_path / "missing-vae.ckpt")


def test_job_lock_keeps_a_second_driver_out(tmp_path: Path) -> None:
    out = str(tmp_path / "cache")
    with encode_mod.job_lock(out):
        with pytest.raises(LockError, match="held by encode job"):
            with encode_mod.job_lock(out):
                pass
    assert not Path(f"{out}.lock").exists()
    Path(f"{out}.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 999_999_999}))  # a dead driver's
    with encode_mod.job_lock(out):
        assert str(os.getpid()) in Path(f"{out}.lock").read_text()
