"""Sampling settings, per-index seeds, denormalisation, grids, checkpoints → models, the 50K protocol
(sfd.config.SamplingConfig, sfd.guidance, sfd.samplers, sfd.pixels, sfd.loading, eval/fid.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.fid import balanced_labels, rank_indices, shuffled_order
from sfd.checkpoint import (
    WeightsError,
    latent_stats_metadata,
    resolve_checkpoint,
    save_training_checkpoint,
)
from sfd.config import ConfigError, SamplingConfig, model_preset, train_preset
from sfd.guidance import build_velocity_fn
from sfd.loading import load_model
from sfd.models.autoencoder import to_uint8
from sfd.models.lightningdit import LightningDiT, save_lightningdit
from sfd.pixels import TextureStats, latents_to_images, load_texture_stats, make_grid
from sfd.samplers import clock_for, generate_latents
from train.main import run_config_dict

SEM = 4


def tiny_model(seed: int = 0) -> LightningDiT:
    """Tiny SFD DiT on a 12-channel (8 texture + 4 semantic) 8×8 latent, perturbed off adaLN-Zero."""
    torch.manual_seed(seed)
    cfg = model_preset("tiny", "in_channels=12", f"semantic_chans={SEM}", "input_size=8")
    model = LightningDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> LightningDiT:
    return tiny_model(0)


# ---- settings and guidance ----------------------------------------------------------------------


def test_sampling_config_guidance_modes_and_checks() -> None:
    assert SamplingConfig().guidance == "none"
    assert SamplingConfig(cfg_scale=1.5).guidance == "cfg"
    assert SamplingConfig(cfg_scale=1.0, cfg_scale_sem=2.0).scales == (1.0, 2.0)
    ag = SamplingConfig(guide_ckpt="g.pt", ag_scale=1.5, cfg_scale_tex=1.2)
    assert ag.guidance == "autoguidance" and ag.scales == (1.2, 1.5)
    assert SamplingConfig(guide_ckpt="g.pt").guidance == "none"  # w = 1 everywhere: the main model
    assert SamplingConfig().solver_options() == {"atol": 1e-6, "rtol": 1e-3}  # the authors' dopri5
    assert SamplingConfig(method="euler", num_steps=10, shift=2.0).solver_options() == {"num_steps": 10, "shift": 2.0}
    for bad in (
        dict(method="rk4"), dict(num_steps=10), dict(guide_ckpt="g.pt", cfg_scale=1.5),
        dict(ag_scale=1.5), dict(interval_mode="texture"), dict(grid="fine"),
    ):
        with pytest.raises(ConfigError):
            SamplingConfig(**bad)


def test_clock_uses_model_delta_t(model: LightningDiT) -> None:
    assert clock_for(model.cfg, SamplingConfig()).delta_t == pytest.approx(0.3)
    assert clock_for(model.cfg, SamplingConfig(delta_t=0.5)).delta_t == 0.5
    plain = model_preset("tiny", "semantic_chans=0")
    assert clock_for(plain, SamplingConfig()).delta_t == 0.0  # plain LightningDiT: synchronous


def test_autoguidance_velocity_is_guide_plus_w_times_difference(model: LightningDiT) -> None:
    guide = tiny_model(1)
    x = torch.randn(3, 12, 8, 8)
    t_tex, t_sem, y = torch.full((3,), 0.2), torch.full((3,), 0.5), torch.tensor([0, 4, 9])
    with torch.no_grad():
        v_main, v_guide = model(x, (t_tex, t_sem), y), guide(x, (t_tex, t_sem), y)
        fn = build_velocity_fn(model, SamplingConfig(guide_ckpt="g", ag_scale=1.5, cfg_scale_sem=3.0), guide)
        v = fn(x, t_tex, t_sem, y)
    torch.testing.assert_close(v[:, :8], v_guide[:, :8] + 1.5 * (v_main[:, :8] - v_guide[:, :8]))
    torch.testing.assert_close(v[:, 8:], v_guide[:, 8:] + 3.0 * (v_main[:, 8:] - v_guide[:, 8:]))
    with pytest.raises(ValueError, match="guide model"):
        build_velocity_fn(model, SamplingConfig(guide_ckpt="g", ag_scale=1.5))


# ---- per-index seeds ----------------------------------------------------------------------------


def test_latents_depend_on_index_not_batch(model: LightningDiT) -> None:
    s = SamplingConfig(method="heun", num_steps=4, seed=3)
    labels = [0, 1, 2, 3, 4, 5]
    full, nfe = generate_latents(model, labels, range(6), s)
    part, _ = generate_latents(model, labels[3:], [3, 4, 5], s)
    assert full.shape == (6, 12, 8, 8) and nfe == 8  # Heun: 2 evaluations per step
    # Same rows up to the float rounding of a differently sized GEMM.
    torch.testing.assert_close(part, full[3:], atol=1e-5, rtol=1e-5)
    other_seed, _ = generate_latents(model, labels[3:], [3, 4, 5], SamplingConfig(method="heun", num_steps=4, seed=4))
    assert not torch.allclose(other_seed, full[3:], atol=1e-2)
    with pytest.raises(ValueError, match="labels must lie"):
        generate_latents(model, [10], [0], s)
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            generate_latents(model, [0], [0], s)
    finally:
        model.eval()


# ---- latents to pixels ----------------------------------------------------------------------------


class FirstThreeChannels:
    """Stand-in decoder: image = the first 3 latent channels / 4 (any object with .decode works)."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, :3] / 4


def test_latents_to_images_denormalises_texture_only() -> None:
    latents = torch.randn(2, 12, 5, 5)
    mean, std = torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8)
    images = latents_to_images(latents, TextureStats(mean, std, "test"), FirstThreeChannels(), texture_chans=8)
    z = latents[:, :8] * std[None, :, None, None] + mean[None, :, None, None]
    assert images.dtype == torch.uint8 and images.shape == (2, 5, 5, 3)
    torch.testing.assert_close(images, to_uint8(z[:, :3] / 4))
    with pytest.raises(ValueError, match="channels"):
        latents_to_images(latents, TextureStats.identity(4), FirstThreeChannels(), texture_chans=8)


def test_texture_stats_from_authors_file_and_cache(tmp_path: Path) -> None:
    mean, std = torch.randn(1, 8, 1, 1), torch.rand(1, 8, 1, 1) + 0.5
    torch.save({"mean": mean, "std": std}, tmp_path / "latents_stats.pt")  # the authors' layout
    stats = load_texture_stats(tmp_path / "latents_stats.pt")
    torch.testing.assert_close(stats.mean, mean.reshape(-1))
    torch.testing.assert_close(stats.std, std.reshape(-1))
    torch.save({"avg": mean}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="mean"):
        load_texture_stats(tmp_path / "bad.pt")

    from sfd.data.cache import create_cache

    cache = create_cache(
        tmp_path / "cache.zarr", paths=[f"a/{i}.png" for i in range(6)], labels=[0] * 6,
        rows_per_shard=6, texture_shape=(8, 2, 2), semantic_shape=(4, 2, 2),
    )
    g = np.random.default_rng(0)
    tex = g.normal(2.0, 3.0, (6, 2, 8, 2, 2))
    cache.write_shard(0, texture=tex, semantic=g.normal(size=(6, 2, 4, 2, 2)))
    cache.compute_stats(seed=0)
    from_cache = load_texture_stats(tmp_path / "cache.zarr")
    plain = tex[:, 0].astype(np.float16).astype(np.float64)  # stored fp16, non-flipped copy
    np.testing.assert_allclose(from_cache.mean.numpy(), plain.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(from_cache.std.numpy(), plain.std(axis=(0, 2, 3), ddof=1), rtol=1e-5)


def test_make_grid_size_and_captions() -> None:
    images = np.zeros((7, 10, 12, 3), dtype=np.uint8)
    grid = make_grid(images, nrow=3, captions=[f"c{i}" for i in range(7)], pad=2, caption_height=12)
    assert grid.size == (3 * (12 + 2) + 2, 3 * (10 + 12 + 2) + 2)
    pixels = np.asarray(grid)
    assert (pixels[2 + 10 : 2 + 22, 2 : 2 + 12] < 128).any()  # caption text drawn under tile 0
    assert make_grid(images, nrow=7).size == (7 * 14 + 2, 12 + 2)
    with pytest.raises(ValueError):
        make_grid(images.astype(np.float32), nrow=3)


# ---- checkpoints -------------------------------------------------------------------------------------


def test_resolve_checkpoint_picks_latest_step_by_number(tmp_path: Path, model: LightningDiT) -> None:
    run = tmp_path / "run"
    for step in (900, 1000, 10_000_000):  # 10M has 8 digits: order by number, not by name
        d = run / "checkpoints" / f"{step:07d}"
        d.mkdir(parents=True)
        (d / "ema.safetensors").write_bytes(b"x")
        (d / "model.safetensors").write_bytes(b"x")
        (d / "state.pt").write_bytes(b"x")
    unfinished = run / "checkpoints" / "20000000"  # no state.pt: a save killed half-way
    unfinished.mkdir()
    (unfinished / "ema.safetensors").write_bytes(b"x")
    assert resolve_checkpoint(run) == run / "checkpoints" / "10000000" / "ema.safetensors"
    assert resolve_checkpoint(run, prefer_ema=False) == run / "checkpoints" / "10000000" / "model.safetensors"
    assert resolve_checkpoint(run / "checkpoints" / "0000900") == run / "checkpoints" / "0000900" / "ema.safetensors"
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    assert resolve_checkpoint(f) == f
    (run / "checkpoints" / "0001000" / "ema.safetensors").unlink()
    with pytest.raises(WeightsError, match="model.safetensors"):
        resolve_checkpoint(run / "checkpoints" / "0001000")
    with pytest.raises(WeightsError):
        resolve_checkpoint(tmp_path / "nowhere")


def test_load_model_from_run_with_trainer_config(tmp_path: Path, model: LightningDiT) -> None:
    run_cfg = dataclasses.replace(train_preset("tiny"), model=model.cfg)  # the trainer's whole config
    stats = {"texture_mean": np.linspace(-1, 1, 8, dtype=np.float32), "texture_std": np.full(8, 0.5, np.float32)}
    save_training_checkpoint(
        tmp_path / "run", 100, model=tiny_model(5), ema=model, state={"step": 100}, kind="lightningdit",
        model_config=model.cfg, run_config=run_config_dict(run_cfg), latent_stats=latent_stats_metadata(stats, "test"),
    )
    loaded, file = load_model(tmp_path / "run")
    assert file.name == "ema.safetensors" and loaded.cfg == model.cfg and not loaded.training
    torch.testing.assert_close(loaded.state_dict()["final_layer.linear.weight"], model.state_dict()["final_layer.linear.weight"])
    # The statistics travel with the checkpoint: a sampler needs no cache (bit-exact float32).
    from_run = load_texture_stats(tmp_path / "run")
    assert torch.equal(from_run.mean, torch.from_numpy(stats["texture_mean"])) and torch.equal(from_run.std, torch.full((8,), 0.5))
    save_lightningdit(model, tmp_path / "plain.safetensors")  # our export: a ModelConfig in metadata
    assert load_model(tmp_path / "plain.safetensors")[0].cfg == model.cfg
    with pytest.raises(WeightsError, match="stores no latent statistics"):
        load_texture_stats(tmp_path / "plain.safetensors")


# ---- the evaluation protocol -------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_indices_partition(world: int) -> None:
    parts = [list(rank_indices(50, r, world)) for r in range(world)]
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(50)) and len(flat) == len(set(flat))
    with pytest.raises(ValueError):
        rank_indices(50, world, world)


def test_balanced_labels_exact() -> None:
    labels = balanced_labels(range(50_000), 50_000, 1000)
    assert (np.bincount(labels, minlength=1000) == 50).all()
    assert labels[0] == 0 and labels[49] == 0 and labels[50] == 1 and labels[-1] == 999  # ⌊i/50⌋
    np.testing.assert_array_equal(balanced_labels([5, 120], 200, 10), [0, 6])
    with pytest.raises(ValueError, match="evenly"):
        balanced_labels(range(10), 10, 3)


def test_shuffled_order_is_a_fixed_permutation() -> None:
    a, b = shuffled_order(1000), shuffled_order(1000, 42)
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(1000)) and not (a == np.arange(1000)).all()
    assert not (shuffled_order(1000, 0) == a).all()
    # Any 5,000-split of a shuffled balanced 50K set holds most classes (IS must not see one class).
    labels = balanced_labels(shuffled_order(50_000)[:5000], 50_000, 1000)
    assert len(np.unique(labels)) > 990


def test_grid_rows_carry_whole_class_names_and_a_real_image(tmp_path) -> None:
    """Row labels are drawn whole in a left margin (never cut like tile captions), and
    ``sample/grid.py --real-images`` leads each row with a real image of that class."""
    from sample.grid import real_row_images
    from sfd.data.synthetic import write_image_folder

    images = np.zeros((6, 16, 16, 3), np.uint8)
    long = ["0 a very long class name that no tile could hold", "1 short"]
    plain = make_grid(images, nrow=3)
    labelled = make_grid(images, nrow=3, row_labels=long)
    assert labelled.height == plain.height and labelled.width > plain.width + 100
    with pytest.raises(ValueError):
        make_grid(images, nrow=3, row_labels=long[:1])

    root = tmp_path / "imgs"
    write_image_folder(root, num_classes=3)
    names = sorted(p.name for p in root.iterdir())
    real = real_row_images(root, [2, 0], names, 16)
    assert real.shape == (2, 16, 16, 3) and real.dtype == np.uint8
    from sfd.config import ConfigError
    with pytest.raises(ConfigError, match="no class folder"):
        real_row_images(root, [0], ["elsewhere"], 16)
