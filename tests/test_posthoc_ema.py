"""Post-hoc EMA (EDM2; sfd/posthoc_ema.py, train/main.py, eval/posthoc_ema.py): γ ↔ σ_rel, the
least-squares reconstruction, snapshots that survive kill + resume bit for bit, the rebuilt
checkpoint loading like any other, the error line of a run without snapshots, and a run with the
feature off staying exactly what it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from eval import posthoc_ema as cli
from sfd.checkpoint import list_checkpoints, load_training_state, read_checkpoint
from sfd.cli import cli_status
from sfd.config import SamplingConfig
from sfd.loading import load_model
from sfd.posthoc_ema import (
    STATE_FILE,
    gamma_to_sigma_rel,
    list_snapshots,
    parse_sigma_rels,
    read_snapshot,
    sigma_rel_to_gamma,
    solve_coefficients,
    verify_snapshots,
)
from sfd.samplers import generate_latents
from tests.test_train import final_weights, losses, make_cache
from tests.test_train import run as train
from train.main import TrainError

POSTHOC = ("posthoc_ema_sigma_rel=0.05,0.1", "ema_snapshot_every=3")
STEPS = 12

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache") / "tiny.zarr").path


@pytest.fixture(scope="module")
def ref_run(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 uninterrupted steps with EDM2's two profiles, a snapshot every 3 steps."""
    out = tmp_path_factory.mktemp("ref") / "run"
    torch.set_num_threads(1)
    train(cache_dir, out, f"max_steps={STEPS}", "ckpt_every=4", *POSTHOC)
    return out


def snapshot_tensors(run: Path) -> dict[int, tuple[dict, dict]]:
    out = {}
    for step, path in list_snapshots(run):
        meta, tensors = read_snapshot(path)
        out[step] = ({k: meta[k] for k in ("step", "sigma_rels", "gammas", "model_config")}, tensors)
    return out


# ---------------------------------------------------------------------------------------------
# The maths


def test_gamma_sigma_rel_round_trip() -> None:
    # EDM2's pair: σ_rel 0.05 ↔ γ ≈ 16.97, σ_rel 0.10 ↔ γ ≈ 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.001, 0.01, 0.05, 0.1, 0.2, 0.29):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    for g in (0.0, 1.0, 6.94, 16.97, 100.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-9)
    assert parse_sigma_rels("0.05, 0.1") == (0.05, 0.1) and parse_sigma_rels("") == ()
    for bad in ("0.5", "x", "0.05,0.05", "0"):
        with pytest.raises(ValueError):
            parse_sigma_rels(bad)


def test_discrete_profile_weights_follow_the_power_kernel() -> None:
    # θ_t = t: the profile's value is the kernel-weighted mean step, (γ+1)/(γ+2)·T for τ^γ on [0, T].
    T = 2000
    for s in (0.05, 0.1):
        g = sigma_rel_to_gamma(s)
        ema = 0.0
        for t in range(1, T + 1):
            beta = (1 - 1 / t) ** (g + 1)
            ema = beta * ema + (1 - beta) * t
        assert ema / T == pytest.approx((g + 1) / (g + 2), rel=1e-3)


def test_least_squares_reproduces_a_stored_profile() -> None:
    steps = [100, 200, 300, 400] * 2
    gammas = [sigma_rel_to_gamma(0.05)] * 4 + [sigma_rel_to_gamma(0.1)] * 4
    x, resid = solve_coefficients(steps, gammas, 400, sigma_rel_to_gamma(0.1))
    np.testing.assert_allclose(x, np.eye(8)[7], atol=1e-9)
    assert resid < 1e-6
    # A width between the tracked ones is matched well, not exactly.
    x, resid = solve_coefficients(steps, gammas, 400, sigma_rel_to_gamma(0.07))
    assert 0 < resid < 0.1 and abs(x.sum() - 1) < 0.05


# ---------------------------------------------------------------------------------------------
# The trainer


def test_snapshots_and_checkpoint_state(ref_run: Path) -> None:
    snaps = snapshot_tensors(ref_run)
    assert sorted(snaps) == [3, 6, 9, 12]
    assert verify_snapshots(ref_run) == []
    meta, tensors = snaps[12]
    assert json.loads(meta["sigma_rels"]) == [0.05, 0.1]
    assert json.loads(meta["gammas"]) == pytest.approx([16.97, 6.94], abs=0.01)
    assert any(k.startswith("0/") for k in tensors) and any(k.startswith("fixed/") for k in tensors)
    for _, ckpt in list_checkpoints(ref_run):  # the running profiles travel in the checkpoint
        assert (ckpt / STATE_FILE).is_file()
        assert STATE_FILE in json.loads((ckpt / "manifest.json").read_text())["files"]
    lines = [json.loads(x) for x in (ref_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["event"] == "ema_snapshot"] == [3, 6, 9, 12]


def test_kill_and_resume_gives_identical_snapshots(cache_dir: Path, ref_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    train(cache_dir, out, "max_steps=8", "ckpt_every=4", *POSTHOC)  # snapshots 3, 6, 8 (the end); checkpoints 4, 8
    # A kill after step 8's snapshot and before its checkpoint: the run resumes from step 4, drops
    # the snapshots past it and writes them again from the restored profiles.
    shutil.rmtree(list_checkpoints(out)[-1][1])
    train(cache_dir, out, f"max_steps={STEPS}", "ckpt_every=4", *POSTHOC)
    got, want = snapshot_tensors(out), snapshot_tensors(ref_run)
    assert sorted(got) == sorted(want) == [3, 6, 9, 12]
    for step in want:
        assert got[step][0] == want[step][0]
        assert got[step][1].keys() == want[step][1].keys()
        for k in want[step][1]:
            assert torch.equal(got[step][1][k], want[step][1][k]), f"snapshot {step}: {k} differs"
    assert verify_snapshots(out) == []
    assert losses(out) == losses(ref_run)


def test_posthoc_off_leaves_the_run_unchanged(cache_dir: Path, ref_run: Path, tmp_path: Path) -> None:
    off = tmp_path / "off"
    train(cache_dir, off, f"max_steps={STEPS}", "ckpt_every=4")
    assert losses(off) == losses(ref_run)  # the profiles never touch the trajectory
    a, b = final_weights(off), final_weights(ref_run)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    sa = load_training_state(list_checkpoints(off)[-1][1])
    sb = load_training_state(list_checkpoints(ref_run)[-1][1])
    assert sa["rng"].keys() == sb["rng"].keys() and sa["reader"] == sb["reader"]
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    # Off: no new files and no new log lines, as before the feature existed.
    assert not (off / "ema_snapshots").exists()
    for _, ckpt in list_checkpoints(off):
        assert sorted(p.name for p in ckpt.iterdir()) == ["ema.safetensors", "manifest.json", "model.safetensors", "state.pt"]
    assert {json.loads(x)["event"] for x in (off / "metrics.jsonl").read_text().splitlines()} == {"train"}
    # And switching it on in the middle of a run is refused (a profile needs every step from 1).
    with pytest.raises(TrainError, match="cannot start mid-run"):
        train(cache_dir, off, f"max_steps={STEPS + 4}", "ckpt_every=4", *POSTHOC)


# ---------------------------------------------------------------------------------------------
# The reconstruction command


def test_rebuilt_width_matches_the_tracked_profile_and_loads(ref_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "posthoc"
    assert cli.main([str(ref_run), "--sigma-rel", "0.05,0.1,0.07", "--out", str(out)]) == 0
    _, snap = read_snapshot(list_snapshots(ref_run)[-1][1])
    for k, s in enumerate((0.05, 0.1)):
        d = cli.width_dir(out, s)
        info = json.loads((d / "posthoc_ema.json").read_text())
        assert info["step"] == STEPS and info["residual"] < 1e-6
        rebuilt = load_file(d / "ema.safetensors")
        # Snapshots of that very profile are in the basis: the solution is (nearly) that one
        # snapshot alone, so the weights agree to float32 rounding of the float64 sum.
        worst = max((rebuilt[n] - snap[f"{k}/{n}"]).abs().max().item() for n in rebuilt if f"{k}/{n}" in snap)
        assert worst <= 1e-6, worst
    d = cli.width_dir(out, 0.07)
    ckpt = read_checkpoint(d)  # an ordinary format-2 checkpoint with the run's configs and stats
    assert ckpt.step == STEPS and ckpt.latent_stats is not None and ckpt.run_config["posthoc_ema_sigma_rel"] == "0.05,0.1"
    model, file = load_model(d)
    assert file == d / "ema.safetensors"
    latents, _ = generate_latents(model, [0, 1], [0, 1], SamplingConfig(method="euler", num_steps=4))
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()


def test_errors_name_the_fix(cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plain = tmp_path / "plain"
    train(cache_dir, plain, "max_steps=2")
    capsys.readouterr()  # the trainer's own output
    assert cli_status(lambda: cli.main([str(plain), "--out", str(tmp_path / "o")])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no post-hoc EMA snapshots" in err and "posthoc_ema_sigma_rel" in err
    assert len(err.splitlines()) == 1
    assert cli_status(lambda: cli.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no run directory") and len(err.splitlines()) == 1
    assert cli_status(lambda: cli.main([str(plain), "--sigma-rel", "0.9", "--out", str(tmp_path / "o")])) == 2
    assert "sigma_rel" in capsys.readouterr().err


def test_at_step_past_the_last_snapshot_is_refused(ref_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_status(lambda: cli.main([str(ref_run), "--at-step", "13", "--out", str(tmp_path / "o")])) == 2
    assert "pick --at-step <= 12" in capsys.readouterr().err
    # An earlier step uses only the snapshots up to it.
    assert cli.main([str(ref_run), "--sigma-rel", "0.1", "--at-step", "6", "--out", str(tmp_path / "o")]) == 0
    info = json.loads((cli.width_dir(tmp_path / "o", 0.1) / "posthoc_ema.json").read_text())
    assert info["step"] == 6 and {c["snapshot_step"] for c in info["coefficients"]} == {3, 6}
