"""Quality measured during training (-o eval_every, sfd/evaluators.py): evaluation lines at the
right steps with their cost, never a change to the training trajectory (bitwise), exactly one line
per evaluation step across kill + resume, and a missing input refused before step 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfd.checkpoint import file_sha256, list_checkpoints, load_training_state, save_safetensors
from sfd.config import TEXTURE_VAE_PRESETS, to_dict
from sfd.demo.judge import Judge, JudgeConfig, save_judge
from sfd.models.autoencoder import AutoencoderKL
from tests.test_train import SEM, final_weights, losses, make_cache
from tests.test_train import run as train
from train.main import TrainError

STEPS = 6

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A cache whose latents come from a (random) tiny VAE, so samples decode to 32×32 pixels; a
    random demo judge; a folder of 'real' images."""
    root = tmp_path_factory.mktemp("eval")
    vae_cfg = TEXTURE_VAE_PRESETS["tiny"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_safetensors(AutoencoderKL(vae_cfg).state_dict(), root / "vae.safetensors")
        save_judge(Judge(JudgeConfig(num_classes=10, image_size=32)), root / "judge.safetensors")
    encoder = {"kind": "weights", "name": "tiny-vae", "config": to_dict(vae_cfg), "file": "vae.safetensors",
               "sha256": file_sha256(root / "vae.safetensors")}
    cache = make_cache(root / "c8.zarr", tex=vae_cfg.embed_dim, texture_encoder=encoder).path
    g = np.random.default_rng(0)
    for c in range(3):
        (root / "real" / str(c)).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "real" / str(c) / f"{i}.png")
    common = (f"model.in_channels={vae_cfg.embed_dim + SEM}", f"texture_vae={root / 'vae.safetensors'}", "ckpt_every=2")
    evaluation = ("eval_every=2", "eval_samples=10", "eval_metric=judge", f"eval_judge={root / 'judge.safetensors'}",
                  f"eval_judge_ref={root / 'real'}", "eval_sampling=heun", "eval_num_steps=3")
    return {"root": root, "cache": cache, "common": common, "eval": evaluation}


def evals(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "eval"]


def test_evaluation_never_changes_training(setup: dict, tmp_path: Path) -> None:
    c, common = setup["cache"], setup["common"]
    train(c, tmp_path / "with", f"max_steps={STEPS}", *common, *setup["eval"])
    train(c, tmp_path / "without", f"max_steps={STEPS}", *common)
    lines = evals(tmp_path / "with")
    assert [r["step"] for r in lines] == [2, 4, 6]
    for r in lines:
        assert 0.0 <= r["judge_accuracy"] <= 1.0 and np.isfinite(r["FD_judge"]) and r["seconds"] > 0
        assert r["num_samples"] == 10 and r["metric"] == "judge"
    assert evals(tmp_path / "without") == []
    from eval.plot import plot_metrics  # the curves plot from metrics.jsonl's eval lines

    png = plot_metrics([tmp_path / "with"], ["with"], tmp_path / "metrics.png")
    assert png is not None and Path(png).is_file()
    # The trajectory, bit for bit: losses, weights, EMA, optimizer state, RNG streams, data position.
    assert losses(tmp_path / "with") == losses(tmp_path / "without")
    a, b = final_weights(tmp_path / "with"), final_weights(tmp_path / "without")
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in b[part])
    for (_, ca), (_, cb) in zip(list_checkpoints(tmp_path / "with"), list_checkpoints(tmp_path / "without")):
        sa, sb = load_training_state(ca), load_training_state(cb)
        assert sa["reader"] == sb["reader"]
        assert _same(sa["rng"], sb["rng"])
        for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
            assert all(torch.equal(pa[k], pb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_kill_and_resume_logs_each_evaluation_once(setup: dict, tmp_path: Path) -> None:
    c, common, ev = setup["cache"], setup["common"], setup["eval"]
    train(c, tmp_path / "ref", f"max_steps={STEPS}", *common, *ev)
    out = tmp_path / "split"
    train(c, out, f"max_steps={STEPS}", *common, *ev)
    # A kill after step 6's evaluation and before its checkpoint: resume from step 4 redoes it.
    shutil.rmtree(list_checkpoints(out)[-1][1])
    train(c, out, f"max_steps={STEPS}", *common, *ev)
    got, want = evals(out), evals(tmp_path / "ref")
    assert [r["step"] for r in got] == [2, 4, 6]
    for g, w in zip(got, want):  # fixed seeds: the same numbers (the cost may differ)
        assert {k: v for k, v in g.items() if k != "seconds"} == {k: v for k, v in w.items() if k != "seconds"}


def test_missing_inputs_fail_before_any_step(setup: dict, tmp_path: Path) -> None:
    c, common = setup["cache"], setup["common"]
    with pytest.raises(TrainError, match="eval_ref"):
        train(c, tmp_path / "a", "max_steps=2", *common, "eval_every=1", "eval_samples=10", "eval_metric=fid")
    with pytest.raises(TrainError, match="multiple of the 10 classes"):
        train(c, tmp_path / "b", "max_steps=2", *common, *setup["eval"], "eval_samples=7")
    assert not list_checkpoints(tmp_path / "a") and not list_checkpoints(tmp_path / "b")


def _same(a, b) -> bool:
    """Equal nested RNG states (tensors compared bitwise)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def test_fid_evaluator_logs_a_named_distance(setup: dict, tmp_path: Path) -> None:
    # An untrained Inception (eval_inception=random) names itself in the key: never "fid".
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    train(setup["cache"], tmp_path / "run", "max_steps=2", *setup["common"], "eval_every=2", "eval_samples=10",
          "eval_metric=fid", f"eval_ref={ref}", "eval_inception=random", "eval_num_steps=3")
    (line,) = evals(tmp_path / "run")
    assert line["step"] == 2 and "fid" not in line and np.isfinite(line["FD_random-inception"])


def test_two_ranks_share_the_evaluation_and_rank0_keeps_the_profiles(setup: dict, tmp_path: Path) -> None:
    # torchrun, 2 processes: each samples half the indices; the snapshot and the numbers match
    # one process up to float reduction order (as the weights do, tests/test_train.py).
    import subprocess
    import sys

    from sfd.posthoc_ema import list_snapshots, read_snapshot
    from tests.test_train import REPO, TRAIN, argv, subprocess_env

    extra = (*setup["common"], *setup["eval"], "max_steps=2", "eval_every=2", "posthoc_ema_sigma_rel=0.1",
             "ema_snapshot_every=2")
    train(setup["cache"], tmp_path / "one", *extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN),
           *argv(setup["cache"], tmp_path / "two", *extra)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (one,), (two,) = evals(tmp_path / "one"), evals(tmp_path / "two")
    assert one["judge_accuracy"] == two["judge_accuracy"]
    assert two["FD_judge"] == pytest.approx(one["FD_judge"], rel=1e-4, abs=1e-6)
    (s1, p1), (s2, p2) = list_snapshots(tmp_path / "one")[-1], list_snapshots(tmp_path / "two")[-1]
    a, b = read_snapshot(p1)[1], read_snapshot(p2)[1]
    assert s1 == s2 == 2 and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
