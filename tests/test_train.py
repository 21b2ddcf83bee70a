"""train/main.py: the tiny preset learns, runs are bitwise reproducible, a killed run resumes
exactly, 2-process DDP equals one process, and bad configs fail before any step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sfd.checkpoint import list_checkpoints, load_training_state
from sfd.config import TrainConfig, from_dict
from sfd.data.cache import LatentCache, create_cache
from train import main as trainer  # the entry folders import from the repository root

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train" / "main.py"

TEX, SEM, HW, CLASSES, DINO = 12, 4, 8, 10, (64, 32)  # the tiny model with 16 input channels
TINY = [
    "--preset", "tiny", "-o", f"model.in_channels={TEX + SEM}", "-o", f"model.semantic_chans={SEM}",
    "-o", f"model.repa_target_dim={DINO[1]}", "-o", "lr=1e-3", "-o", "log_every=1",
]


def make_cache(
    path: Path, rows: int = 64, store_dino: bool = True, seed: int = 0, tex: int = TEX, texture_encoder: dict | None = None
) -> LatentCache:
    """Learnable latents: a fixed random pattern per class plus a little noise; the flip copy is
    the mirrored pattern; REPA targets are a fixed linear map of each token's latent."""
    g = np.random.default_rng(seed)
    labels = np.arange(rows) % CLASSES
    cache = create_cache(
        path, paths=[f"c{lab}/{i}.png" for i, lab in enumerate(labels)], labels=labels,
        rows_per_shard=32, rows_per_chunk=16, texture_shape=(tex, HW, HW), semantic_shape=(SEM, HW, HW),
        store_dino=store_dino, dino_shape=DINO,
        attrs={"num_classes": CLASSES, **({"texture_encoder": texture_encoder} if texture_encoder else {})},
    )
    patterns = g.standard_normal((CLASSES, tex + SEM, HW, HW)).astype(np.float32)
    proj = g.standard_normal((tex + SEM, DINO[1])).astype(np.float32)
    for s in cache.pending_shards():
        a, b = cache.layout.shard_rows(s)
        x = patterns[labels[a:b]] + 0.1 * g.standard_normal((b - a, tex + SEM, HW, HW)).astype(np.float32)
        both = np.stack([x, x[..., ::-1]], axis=1)  # [n, 2, C, h, w]
        dino = None
        if store_dino:
            dino = np.einsum("nfchw,cd->nfhwd", both, proj).reshape(b - a, 2, HW * HW, DINO[1])
        cache.write_shard(s, both[:, :, :tex], both[:, :, tex:], dino)
    cache.compute_stats()
    return cache


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache") / "tiny.zarr").path


def argv(cache: Path, out: Path, *overrides: str) -> list[str]:
    return [*TINY, "--cache", str(cache), "--out-dir", str(out), *[a for o in overrides for a in ("-o", o)]]


def run(cache: Path, out: Path, *overrides: str) -> None:
    trainer.main(argv(cache, out, *overrides))


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def losses(out: Path) -> dict[int, dict[str, float]]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in trainer.LOSS_KEYS} for r in lines if r["event"] == "train"}


def final_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    step, ckpt = list_checkpoints(out)[-1]
    return {"step": step, "model": load_file(ckpt / "model.safetensors"), "ema": load_file(ckpt / "ema.safetensors")}


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            if atol == 0.0:
                assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
            else:
                torch.testing.assert_close(a[part][k], b[part][k], atol=atol, rtol=0, msg=f"{part}.{k}")


# ---------------------------------------------------------------------------------------------


def test_tiny_learns_and_is_bitwise_reproducible(cache_dir: Path, tmp_path: Path) -> None:
    run(cache_dir, tmp_path / "a", "max_steps=40")
    run(cache_dir, tmp_path / "b", "max_steps=40")
    curve_a, curve_b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert list(curve_a) == list(range(1, 41))
    assert curve_a == curve_b  # same seed: bitwise-equal losses
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    total = [curve_a[s]["total"] for s in range(1, 41)]
    first, last = np.mean(total[:5]), np.mean(total[-5:])
    assert last < 0.9 * first, (first, last)
    assert all(curve_a[s]["repa"] > 0 for s in curve_a)  # REPA is trained (targets from the cache)
    saved = from_dict(TrainConfig, json.loads((tmp_path / "a" / "config.json").read_text()))
    assert saved.max_steps == 40 and saved.model.in_channels == TEX + SEM
    run(cache_dir, tmp_path / "c", "max_steps=3", "seed=1")
    assert losses(tmp_path / "c")[1] != curve_a[1]  # and the seed matters


def test_resume_after_max_steps_equals_uninterrupted(cache_dir: Path, tmp_path: Path) -> None:
    run(cache_dir, tmp_path / "ref", "max_steps=12", "ckpt_every=4", "keep_last=2")
    assert [s for s, _ in list_checkpoints(tmp_path / "ref")] == [8, 12]  # keep_last prunes by step
    run(cache_dir, tmp_path / "split", "max_steps=6", "ckpt_every=4", "keep_last=2")
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [4, 6]
    run(cache_dir, tmp_path / "split", "max_steps=12", "ckpt_every=4", "keep_last=2")
    assert losses(tmp_path / "split") == losses(tmp_path / "ref")
    assert_same_weights(final_weights(tmp_path / "split"), final_weights(tmp_path / "ref"))
    a = load_training_state(list_checkpoints(tmp_path / "split")[-1][1])
    b = load_training_state(list_checkpoints(tmp_path / "ref")[-1][1])
    assert a["reader"] == b["reader"] and a["images_seen"] == b["images_seen"] == 12 * 8
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_sigterm_mid_run_then_resume(cache_dir: Path, tmp_path: Path) -> None:
    steps = 60
    run(cache_dir, tmp_path / "ref", f"max_steps={steps}", "ckpt_every=0")
    out = tmp_path / "killed"
    cmd = [sys.executable, str(TRAIN), *argv(cache_dir, out, f"max_steps={steps}", "ckpt_every=0")]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    stopped = list_checkpoints(out)[-1][0]
    assert 0 < stopped < steps, output
    assert "SIGTERM" in output and f"stopped at step {stopped}" in output
    # Resume = the same command again (here in-process).
    run(cache_dir, out, f"max_steps={steps}", "ckpt_every=0")
    assert losses(out) == losses(tmp_path / "ref")
    assert_same_weights(final_weights(out), final_weights(tmp_path / "ref"))


def test_torchrun_two_processes_match_one(cache_dir: Path, tmp_path: Path) -> None:
    common = ("max_steps=4", "global_batch=8")
    run(cache_dir, tmp_path / "one", *common)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN),
        *argv(cache_dir, tmp_path / "two", *common, "micro_batch=2"),  # 2 ranks x 2 micro-batches of 2
    ]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "world_size=2" in done.stdout and "grad_accumulation=2" in done.stdout
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(one) == list(two) == [1, 2, 3, 4]
    for s in one:
        np.testing.assert_allclose([two[s][k] for k in one[s]], [one[s][k] for k in one[s]], rtol=0, atol=1e-5)
    assert_same_weights(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"), atol=1e-5)


def test_fused_optimizer_equals_torch_adamw_and_ema(cache_dir: Path, tmp_path: Path) -> None:
    # optimizer=fused under kernels=eager runs torch's foreach sequence as one block: bitwise equal
    # to torch.optim.AdamW + clip_grad_norm_ + the EMA lerp, clipping and weight decay included.
    common = ("max_steps=6", "grad_clip=0.5", "weight_decay=0.01", "ema_decay=0.9")
    run(cache_dir, tmp_path / "torch", *common, "optimizer=torch")
    run(cache_dir, tmp_path / "fused", *common, "optimizer=fused")
    assert losses(tmp_path / "fused") == losses(tmp_path / "torch")
    assert_same_weights(final_weights(tmp_path / "fused"), final_weights(tmp_path / "torch"))
    a = load_training_state(list_checkpoints(tmp_path / "fused")[-1][1])["optimizer"]
    b = load_training_state(list_checkpoints(tmp_path / "torch")[-1][1])["optimizer"]
    assert a["state"].keys() == b["state"].keys()
    for pa, pb in zip(a["state"].values(), b["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) and pa[k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "step"))


@pytest.mark.slow
def test_compiled_step_matches_eager(cache_dir: Path, tmp_path: Path) -> None:
    # ~60 s on 2 CPU cores with a cold inductor cache (~10 s warm): the compile of fwd + bwd.
    run(cache_dir, tmp_path / "eager", "max_steps=3")
    try:
        run(cache_dir, tmp_path / "compiled", "max_steps=3", "kernels=compile")
    finally:
        torch._dynamo.reset()
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    for s in eager:
        np.testing.assert_allclose(list(compiled[s].values()), list(eager[s].values()), rtol=0, atol=1e-5)
    weights = final_weights(tmp_path / "compiled")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in weights["model"])  # unwrapped handle
    assert_same_weights(weights, final_weights(tmp_path / "eager"), atol=1e-5)


def test_sample_grid_png_with_a_texture_vae(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sfd.checkpoint import save_safetensors
    from sfd.config import TEXTURE_VAE_PRESETS
    from sfd.models.autoencoder import AutoencoderKL

    vae_cfg = TEXTURE_VAE_PRESETS["tiny"]  # 8 latent channels at 8x8 for 32x32 images
    torch.manual_seed(0)
    from sfd.checkpoint import file_sha256
    from sfd.config import to_dict

    save_safetensors(AutoencoderKL(vae_cfg).state_dict(), tmp_path / "vae.safetensors")
    # The cache records which VAE made its latents (name, config, file hash), as encode.py does.
    encoder = {
        "kind": "weights", "name": "tiny-vae", "config": to_dict(vae_cfg), "file": "vae.safetensors",
        "sha256": file_sha256(tmp_path / "vae.safetensors"),
    }
    cache = make_cache(tmp_path / "c8.zarr", tex=vae_cfg.embed_dim, texture_encoder=encoder).path
    out = tmp_path / "run"
    trainer.main([
        *argv(cache, out, "max_steps=2", "sample_every=2", f"texture_vae={tmp_path / 'vae.safetensors'}"),
        "-o", f"model.in_channels={vae_cfg.embed_dim + SEM}",
    ])
    assert "sample grids every 2 steps: decoder tiny-vae" in capsys.readouterr().out
    record = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["event"] == "sample" and record["step"] == 2 and record["nfe"] == 50
    from PIL import Image

    assert Image.open(record["png"]).size == (8 * 34 + 2, 2 * (32 + 12 + 2) + 2)  # 16 tiles, 8 per row

    # The checkpoint carries what sampling needs from the cache: no --stats, same pixels' inputs.
    from sfd.loading import load_pipeline

    vae = tmp_path / "vae.safetensors"
    _, _, _, stored, decoder = load_pipeline(out, vae=vae, vae_preset="tiny")
    _, _, _, from_cache, _ = load_pipeline(out, stats=cache, vae=vae, vae_preset="tiny")
    assert torch.equal(stored.mean, from_cache.mean) and torch.equal(stored.std, from_cache.std)
    assert decoder.decoder_identity["name"] == "tiny-vae" and decoder.decoder_identity["sha256"] == encoder["sha256"]


def test_sample_grid_without_decoder_logs_statistics(cache_dir: Path, tmp_path: Path, capsys) -> None:
    run(cache_dir, tmp_path / "run", "max_steps=2", "sample_every=2")
    assert "the cache records no texture encoder" in capsys.readouterr().out
    record = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["event"] == "sample" and "png" not in record and 0.5 < record["texture_std"] < 2


def test_init_from_authors_checkpoint(cache_dir: Path, tmp_path: Path) -> None:
    from sfd.config import train_preset
    from sfd.models.lightningdit import LightningDiT

    cfg = train_preset("tiny", *[o for o in TINY[2:] if o != "-o"])
    torch.manual_seed(5)
    raw, ema = LightningDiT(cfg.model).state_dict(), LightningDiT(cfg.model).state_dict()
    torch.save({"model": raw, "ema": ema, "opt": {}, "config": {}}, tmp_path / "authors.pt")
    # lr 0 and EMA decay 1 keep both exactly as loaded through one step.
    run(cache_dir, tmp_path / "run", "max_steps=1", "lr=0", "ema_decay=1", f"init_from={tmp_path / 'authors.pt'}")
    w = final_weights(tmp_path / "run")
    assert all(torch.equal(w["model"][k], raw[k]) for k in raw)
    assert all(torch.equal(w["ema"][k], ema[k]) for k in ema)
    assert not torch.equal(raw["x_embedder.proj.weight"], ema["x_embedder.proj.weight"])


# ---------------------------------------------------------------------------------------------
# Failing early and loudly


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("model.in_channels=20",), r"12 texture \+ 4 semantic = 16 channels, model.in_channels=20"),
        (("model.in_channels=16", "model.semantic_chans=6"), "model.semantic_chans=6"),
        (("model.input_size=16",), "model.input_size=16"),
        (("model.num_classes=5",), "model.num_classes=5"),
        (("model.repa_target_dim=48",), r"needs \(64, 48\)"),
        (("micro_batch=3",), "not divisible by micro_batch=3"),
        (("global_batch=128",), "exceeds the 64 valid rows"),
        (("delta_t=1.5",), r"delta_t must lie in \[0, 1\]"),  # the alias reaches model.semfirst_delta_t
    ],
)
def test_mismatch_fails_before_any_step(cache_dir: Path, tmp_path: Path, overrides, message) -> None:
    with pytest.raises(trainer.TrainError, match=message):
        run(cache_dir, tmp_path / "run", *overrides)
    assert not (tmp_path / "run").exists()


NO_SEMANTIC = ("use_semantic=false", f"model.in_channels={TEX}", "model.semantic_chans=0", "delta_t=0", "model.semfirst_delta_t=0")


def test_without_semantic_channels_trains_on_texture_only(cache_dir: Path, tmp_path: Path) -> None:
    run(cache_dir, tmp_path / "plain", *NO_SEMANTIC, "max_steps=30")
    curve = losses(tmp_path / "plain")
    total = [curve[s]["total"] for s in range(1, 31)]
    assert np.mean(total[-5:]) < 0.9 * np.mean(total[:5])  # it learns
    assert all(curve[s]["repa"] > 0 for s in curve)  # REPA targets still come from the cache
    weights = final_weights(tmp_path / "plain")["model"]
    assert weights["x_embedder.proj.weight"].shape[1] == TEX  # the model never saw the semantic channels
    saved = from_dict(TrainConfig, json.loads((tmp_path / "plain" / "config.json").read_text()))
    assert not saved.use_semantic and saved.model.semantic_chans == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("use_semantic=false",), r"set model.semantic_chans=0 \(now 4\)"),  # and delta_t 0.3
        (("use_semantic=false", "model.semantic_chans=0", "delta_t=0", "model.semfirst_delta_t=0"),
         f"use_semantic=false: cache latents have {TEX} texture channels, model.in_channels={TEX + SEM}"),
        (("use_semantic=false", f"model.in_channels={TEX}", "model.semantic_chans=0"), r"delta_t=0 .*now 0.3"),
        # The composite run needs the semantic channels in the model.
        ((f"model.in_channels={TEX}", "model.semantic_chans=0", "delta_t=0", "model.semfirst_delta_t=0"),
         r"12 texture \+ 4 semantic = 16 channels, model.in_channels=12"),
    ],
)
def test_without_semantic_mismatch_fails_before_any_step(cache_dir: Path, tmp_path: Path, overrides, message) -> None:
    with pytest.raises(trainer.TrainError, match=message):
        run(cache_dir, tmp_path / "run", *overrides)
    assert not (tmp_path / "run").exists()


def test_repa_without_targets_and_missing_cache(tmp_path: Path) -> None:
    plain = make_cache(tmp_path / "no-dino.zarr", store_dino=False).path
    with pytest.raises(trainer.TrainError, match="has none .* set repa_weight=0"):
        run(plain, tmp_path / "run")
    run(plain, tmp_path / "run", "repa_weight=0", "max_steps=2")  # and it trains without REPA
    assert all(v["repa"] == 0 for v in losses(tmp_path / "run").values())
    with pytest.raises(trainer.TrainError, match="no latent cache"):
        run(tmp_path / "nowhere", tmp_path / "run2")


def test_resume_with_another_model_fails(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(cache_dir, out, "max_steps=2")
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(trainer.TrainError, match=r"another model config:\n  model.depth: checkpoint 2, now 3"):
        run(cache_dir, out, "max_steps=4", "model.depth=3")
    assert (out / "metrics.jsonl").read_text() == before
    assert [s for s, _ in list_checkpoints(out)] == [2]


def test_non_finite_steps_are_skipped_then_stop(cache_dir: Path, tmp_path: Path) -> None:
    # lr 1e30 makes every weight ~1e30 after one step: the next forward overflows to NaN.
    with pytest.raises(trainer.TrainError, match="3 consecutive steps had a non-finite"):
        run(cache_dir, tmp_path / "run", "lr=1e30", "max_nan_skips=3", "max_steps=10")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and records[0]["skipped"] == 0 and np.isfinite(records[0]["total"])
    assert [r["skipped_total"] for r in records[1:]] == [1, 2]  # steps 2 and 3 logged as skipped
    assert all(r["total"] is None for r in records[1:])  # no NaN reaches the log
    assert list_checkpoints(tmp_path / "run") == []


def test_dry_run_help_and_cli_errors(cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trainer.main([*argv(cache_dir, tmp_path / "run", "global_batch=16", "micro_batch=4", "max_steps=80"), "--dry-run"])
    out = capsys.readouterr().out
    assert '"global_batch": 16' in out  # the resolved config
    for line in ("world_size: 1", "per_rank_batch: 16", "grad_accumulation: 4", "steps_per_epoch: 4",
                 "epochs: 20.0", "params: "):
        assert line in out, line
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        trainer.main(["--help"])
    assert "torchrun --standalone --nproc_per_node=8 train/main.py" in capsys.readouterr().out
    done = subprocess.run(
        [sys.executable, str(TRAIN), *argv(cache_dir, tmp_path / "run", "micro_batch=3")],
        env=subprocess_env(), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "not divisible by micro_batch=3" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_tensorboard_and_default_texture_vae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """-o tensorboard=true logs the same scalars as metrics.jsonl (and the EMA grid as an image);
    grids use the texture VAE at its README path (weights/…) when none is given."""
    import sfd.loading
    from sfd.checkpoint import KNOWN_WEIGHTS, file_sha256
    from sfd.config import TEXTURE_VAE_PRESETS, to_dict
    from sfd.models.autoencoder import AutoencoderKL

    vae_cfg = TEXTURE_VAE_PRESETS["tiny"]
    weights = tmp_path / "weights"
    weights.mkdir()
    default = weights / KNOWN_WEIGHTS["texture_vae"].filename
    torch.manual_seed(0)
    torch.save(AutoencoderKL(vae_cfg).state_dict(), default)  # the released .ckpt is a pickled state dict too
    monkeypatch.setattr(sfd.loading, "WEIGHTS_DIR", weights)
    encoder = {"kind": "weights", "name": "tiny-vae", "config": to_dict(vae_cfg), "file": default.name,
               "sha256": file_sha256(default)}
    cache = make_cache(tmp_path / "c.zarr", tex=vae_cfg.embed_dim, texture_encoder=encoder).path
    out = tmp_path / "run"
    trainer.main([*argv(cache, out, "max_steps=2", "sample_every=2", "tensorboard=true"),
                  "-o", f"model.in_channels={vae_cfg.embed_dim + SEM}"])
    assert "sample grids every 2 steps: decoder tiny-vae" in capsys.readouterr().out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["event"] == "train"]
    logged = {e.step: e.value for e in events.Scalars("train/total")}
    assert logged == pytest.approx({r["step"]: r["total"] for r in train_rows})
    assert {"train/lr", "train/grad_norm", "sample/texture_std"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["samples/ema_grid"]
