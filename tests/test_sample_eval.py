"""sample/grid.py and eval/fid.py: the real CLIs on a tiny checkpoint, resume, npz order, honesty."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.fid import balanced_labels, shuffled_order
from sfd.checkpoint import save_safetensors
from sfd.config import TEXTURE_VAE_PRESETS
from sfd.models.autoencoder import AutoencoderKL
from sfd.models.inception import FID_DETECTOR_NAME, random_inception
from sfd.models.lightningdit import save_lightningdit
from tests.test_generate import tiny_model

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """Import a script by path (they are run as files, not packages)."""
    spec = importlib.util.spec_from_file_location(Path(relpath).stem + "_script", REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fid = load_script("eval/fid.py")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny DiT (8 texture + 4 semantic channels on 8×8) + tiny texture VAE (f4, 32×32) + stats."""
    root = tmp_path_factory.mktemp("assets")
    save_lightningdit(tiny_model(0), root / "tiny.safetensors")
    torch.manual_seed(1)
    vae_cfg = TEXTURE_VAE_PRESETS["tiny"]
    assert vae_cfg.embed_dim == 8 and vae_cfg.resolution // vae_cfg.downsample_factor == 8
    save_safetensors(AutoencoderKL(vae_cfg).state_dict(), root / "vae.safetensors")
    g = torch.Generator().manual_seed(2)
    torch.save(
        {"mean": 0.1 * torch.randn(1, 8, 1, 1, generator=g), "std": 0.5 + torch.rand(1, 8, 1, 1, generator=g)},
        root / "latents_stats.pt",
    )
    return {"ckpt": root / "tiny.safetensors", "vae": root / "vae.safetensors", "stats": root / "latents_stats.pt"}


def model_flags(a: dict[str, Path]) -> list[str]:
    return ["--ckpt", str(a["ckpt"]), "--stats", str(a["stats"]), "--vae", str(a["vae"]), "--vae-preset", "tiny"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def gen(a: dict[str, Path], out: Path, *extra: str, n: int = 30, batch: int = 4) -> None:
    fid.main(["gen", *model_flags(a), "--sampler", "euler", "--steps", "6", "--num-samples", str(n),
              "--batch-size", str(batch), "--out", str(out), "--device", "cpu", *extra])


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


# ---- resume and per-index seeds ----------------------------------------------------------------------


def test_gen_resume_matches_uninterrupted_run(assets: dict[str, Path], tmp_path: Path) -> None:
    gen(assets, tmp_path / "stopped", "--max-batches", "3")  # a job that stops after 12 of 30
    assert len(png_bytes(tmp_path / "stopped")) == 12
    # A kill between the temp write and the rename leaves a temp file and a missing PNG.
    (tmp_path / "stopped" / "000005.png").rename(tmp_path / "stopped" / ".000005.png.tmp")
    gen(assets, tmp_path / "stopped")  # the same command again
    gen(assets, tmp_path / "oneshot")
    resumed, oneshot = png_bytes(tmp_path / "stopped"), png_bytes(tmp_path / "oneshot")
    assert sorted(resumed) == [f"{i:06d}.png" for i in range(30)]
    assert resumed == oneshot  # byte for byte
    assert not list((tmp_path / "stopped").glob(".*.tmp"))

    # Another batch size changes nothing but the GEMM rounding: at most 1 grey level, rarely.
    gen(assets, tmp_path / "batch7", batch=7)
    a = np.stack([np.asarray(Image.open(tmp_path / "oneshot" / n)) for n in oneshot]).astype(int)
    b = np.stack([np.asarray(Image.open(tmp_path / "batch7" / n)) for n in oneshot]).astype(int)
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.999

    # Resuming with different settings is refused instead of mixing two runs in one folder.
    with pytest.raises(SystemExit, match="other settings"):
        gen(assets, tmp_path / "stopped", "--seed", "1")
    settings = json.loads((tmp_path / "stopped" / "gen.json").read_text())
    assert settings["num_samples"] == 30 and settings["sampling"]["method"] == "euler"
    assert fid.read_nfe(tmp_path / "stopped") == {"mean": 5.0, "min": 5.0, "max": 5.0, "batches": 8}


def test_npz_is_the_fixed_shuffle_of_the_pngs(assets: dict[str, Path], tmp_path: Path) -> None:
    out, npz = tmp_path / "s", tmp_path / "s.npz"
    gen(assets, out, "--npz", str(npz), n=20, batch=8)
    with np.load(npz) as data:
        arr = data["arr_0"]
        settings = json.loads(str(data[fid.SETTINGS_KEY]))
    assert arr.dtype == np.uint8 and arr.shape == (20, 32, 32, 3)
    order = shuffled_order(20, 42)
    for j, i in enumerate(order):
        np.testing.assert_array_equal(arr[j], np.asarray(Image.open(out / f"{i:06d}.png")))
    assert settings["npz_order"].startswith("shuffled") and settings["checkpoint_sha256"]
    # Labels follow the balanced protocol: 2 per class for N = 20, K = 10.
    np.testing.assert_array_equal(np.bincount(balanced_labels(range(20), 20, 10)), [2] * 10)
    # The streamed reader (used for 50K batches) returns the same array.
    np.testing.assert_array_equal(np.concatenate(list(fid.iter_npz_images(npz, 7))), arr)


# ---- the real CLIs, end to end -----------------------------------------------------------------------


def test_end_to_end_grid_gen_ref_calc(assets: dict[str, Path], tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    proc = run_cli("sample/grid.py", *model_flags(assets), "--classes", "1,2,3", "--per-class", "2",
                   "--sampler", "dopri5", "--atol", "1e-4", "--cfg-scale", "1.5", "--out", str(grid))
    assert "NFE" in proc.stdout and str(grid) in proc.stdout
    # 2 tiles of 32×32 per row, 3 rows, 2-px padding, and a left margin with each row's class.
    width, height = Image.open(grid).size
    assert height == 3 * (32 + 2) + 2 and width > 2 * (32 + 2) + 2
    assert json.loads(grid.with_suffix(".json").read_text())["sampling"]["guidance"] == "cfg"

    samples = tmp_path / "samples"
    run_cli("eval/fid.py", "gen", *model_flags(assets), "--sampler", "heun", "--steps", "4",
            "--cfg-scale", "1.5", "--num-samples", "10", "--batch-size", "5", "--out", str(samples))
    # A reference set: smooth random images (not the samples).
    refdir = tmp_path / "refimgs"
    refdir.mkdir()
    g = np.random.default_rng(0)
    for i in range(8):
        small = g.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((32, 32), Image.BILINEAR).save(refdir / f"{i:03d}.png")
    ref = tmp_path / "ref.npz"
    run_cli("eval/fid.py", "ref", str(refdir), "--out", str(ref), "--detector", "random", "--batch-size", "8")
    with np.load(ref) as r:
        assert r["mu"].shape == (2048,) and r["sigma"].shape == (2048, 2048)
        assert r["mu_s"].shape == (2023,) and r["pool"].shape == (8, 2048)
        assert str(r["detector"]) != FID_DETECTOR_NAME

    results = tmp_path / "metrics.json"
    proc = run_cli("eval/fid.py", "calc", str(samples), "--ref", str(ref), "--detector", "random",
                   "--out", str(results), "--batch-size", "10")
    res = json.loads(results.read_text())
    keys = set(res["metrics"])
    assert keys == {f"{m}_random-inception" for m in ("FD", "sFD", "IS", "Precision", "Recall")}
    assert not any("fid" in k.lower() for k in keys)  # never called FID
    assert all(math.isfinite(v) for v in res["metrics"].values())
    # Different sets are far apart (a detector whose features vanish would give ~1e-15 here).
    assert res["metrics"]["FD_random-inception"] > 1e-3 and 0 <= res["metrics"]["Recall_random-inception"] <= 1
    assert res["detector"]["is_fid_detector"] is False
    gen_settings = res["generation"]
    assert gen_settings["num_samples"] == 10 and gen_settings["sampling"]["guidance"] == "cfg"
    assert gen_settings["nfe_per_batch"]["mean"] == 8  # Heun, 4 steps
    assert len(gen_settings["checkpoint_sha256"]) == 16
    headline = [line for line in proc.stdout.splitlines() if "FD_random-inception" in line]
    assert headline and headline[0].startswith("[NOT FID]") and "random-inception" in headline[0]


def test_adm_reference_batch_stats_used_only_with_the_real_inception(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    adm = tmp_path / "VIRTUAL_fake.npz"  # the ADM layout: images + stored TF statistics
    stored = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}
    np.savez(adm, arr_0=g.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), **stored)
    det = random_inception()
    ref, info = fid.load_reference(adm, det, torch.device("cpu"), batch_size=8)
    # Stored statistics belong to the TF Inception: another detector recomputes them from arr_0.
    assert "recomputed" in info["stats"] and ref["pool"].shape == (8, 2048)
    assert ref["pool"].std(axis=0).mean() > 1e-3  # features differ between images
    assert np.abs(ref["mu"]).max() > 0
    det.detector_name = FID_DETECTOR_NAME  # as load_inception names the verified weights
    ref, info = fid.load_reference(adm, det, torch.device("cpu"), batch_size=8)
    assert info["stats"] == "stored mu/sigma/mu_s/sigma_s" and ref["pool"].shape == (8, 2048)
    np.testing.assert_array_equal(ref["sigma"], stored["sigma"])
    # A `ref` output made with one detector is refused by another.
    own = tmp_path / "own_ref.npz"
    np.savez(own, **stored, pool=np.zeros((8, 2048)), detector=np.array(FID_DETECTOR_NAME))
    with pytest.raises(SystemExit, match="made with detector"):
        fid.load_reference(own, random_inception(), torch.device("cpu"), batch_size=8)


def test_metric_names_only_say_fid_for_the_real_inception() -> None:
    class Det(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.detector_name = name

    assert fid.metric_names(Det(FID_DETECTOR_NAME))["fd"] == "FID"
    unverified = Det(f"{FID_DETECTOR_NAME}-unverified (sha256 abc, expected 6726825d…; not FID)")
    names = fid.metric_names(unverified)
    assert names["fd"] == f"FD_{FID_DETECTOR_NAME}-unverified"
    assert not any(v.lower().startswith(("fid", "sfid")) for v in names.values())


def test_every_subcommand_help_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("gen", "ref", "calc"):
        with pytest.raises(SystemExit):
            fid.main([cmd, "--help"])
        assert "example" in capsys.readouterr().out
    grid = load_script("sample/grid.py")
    sys_argv = sys.argv
    try:
        sys.argv = ["grid.py", "--help"]
        with pytest.raises(SystemExit):
            grid.main()
    finally:
        sys.argv = sys_argv
    assert "python sample/grid.py --ckpt" in capsys.readouterr().out
