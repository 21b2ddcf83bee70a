"""Strict configs: presets by the paper's names, overrides, JSON round trips, unknown keys."""

from __future__ import annotations

import json

import pytest

from sfd.checkpoint import read_safetensors_metadata
from sfd.config import (
    MODEL_PRESETS,
    TRAIN_PRESETS,
    ConfigError,
    ModelConfig,
    SemVAEConfig,
    TextureVAEConfig,
    TrainConfig,
    from_dict,
    model_preset,
    to_dict,
    to_json,
    train_preset,
)


@pytest.mark.parametrize(
    "name, depth, width, heads, ffn",
    [
        ("LightningDiT-S/1", 12, 384, 6, 1024),
        ("LightningDiT-B/1", 12, 768, 12, 2048),
        ("LightningDiT-L/1", 24, 1024, 16, 2730),
        ("LightningDiT-XL/1", 28, 1152, 16, 3072),
        ("LightningDiT-1p0B/1", 24, 1536, 24, 4096),
    ],
)
def test_paper_presets(name, depth, width, heads, ffn):
    # docs/method.md §5.1: depth, width, heads and SwiGLU hidden per size.
    cfg = model_preset(name)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.swiglu_hidden) == (depth, width, heads, ffn)
    assert cfg.patch_size == 1 and cfg.in_channels == 48 and cfg.semantic_chans == 16
    assert cfg.texture_chans == 32 and cfg.repa_depth == 2


def test_aliases_and_unknown_preset():
    assert model_preset("XL/1") == model_preset("LightningDiT-XL/1")
    assert model_preset("XXL/1") == model_preset("1p0B/1")
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_preset("XL/2")


def test_overrides_are_typed_and_strict():
    cfg = model_preset("tiny", "depth=3", "use_repa=false", "mlp_ratio=2")
    assert cfg.depth == 3 and cfg.use_repa is False and cfg.mlp_ratio == 2.0
    with pytest.raises(ConfigError, match="unknown key"):
        model_preset("tiny", "dpeth=3")
    with pytest.raises(ConfigError, match="expected an int"):
        model_preset("tiny", "depth=three")
    with pytest.raises(ConfigError, match="key=value"):
        model_preset("tiny", "depth")
    # Invalid combinations fail at construction, before any work starts.
    with pytest.raises(ConfigError, match="divisible"):
        model_preset("tiny", "num_heads=3")


def test_golden_config_json_parses(golden_dir):
    # The authors' constructor arguments, as stored with the golden weights, are our field names.
    meta = read_safetensors_metadata(golden_dir / "lightningdit-tiny-weights.safetensors")
    cfg = from_dict(ModelConfig, json.loads(meta["config"]))
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.input_size) == (128, 3, 2, 8)
    kl = json.loads(read_safetensors_metadata(golden_dir / "kl-vae-tiny-weights.safetensors")["config"])
    assert from_dict(TextureVAEConfig, kl).ch_mult == (1, 2, 2)
    sv = json.loads(read_safetensors_metadata(golden_dir / "semvae-tiny-weights.safetensors")["config"])
    assert from_dict(SemVAEConfig, sv).bottleneck_dim == 4


def test_unknown_keys_in_json_are_errors(tmp_path):
    d = to_dict(model_preset("tiny"))
    d["typo_field"] = 1
    with pytest.raises(ConfigError, match="typo_field"):
        from_dict(ModelConfig, d)


@pytest.mark.parametrize("name", sorted(TRAIN_PRESETS))
def test_train_presets_round_trip_json(name, tmp_path):
    cfg = train_preset(name)
    (tmp_path / "config.json").write_text(to_json(cfg))
    assert from_dict(TrainConfig, json.loads((tmp_path / "config.json").read_text())) == cfg
    assert json.loads(to_json(cfg))["model"]["hidden_size"] == cfg.model.hidden_size


def test_train_recipes_match_the_authors():
    # docs/method.md §6: released recipe vs the later 80-epoch recipe.
    xl = train_preset("sfd-xl")
    assert (xl.lr, xl.beta1, xl.beta2, xl.weight_decay, xl.global_batch) == (1e-4, 0.9, 0.999, 0.0, 256)
    assert (xl.ema_decay, xl.delta_t, xl.semantic_weight, xl.repa_weight, xl.repa_mode) == (0.9999, 0.3, 2.0, 1.0, "cos")
    later = train_preset("sfd-xl-lr2e-4")
    assert (later.lr, later.beta2, later.repa_weight, later.repa_mode) == (2e-4, 0.95, 0.5, "cos_mse")
    # Nested overrides reach the model config.
    assert train_preset("tiny", "model.depth=5").model.depth == 5
    with pytest.raises(ConfigError):
        train_preset("tiny", "repa_mode=l2")


def test_every_model_preset_is_consistent():
    for name, cfg in MODEL_PRESETS.items():
        assert cfg.hidden_size % cfg.num_heads == 0, name
        assert cfg.hidden_size % 2 == 0, name


def test_overrides_validate_once_after_all_assignments():
    # in_channels and semantic_chans only make sense together: order must not matter.
    a = model_preset("tiny", "in_channels=12", "semantic_chans=4")
    b = model_preset("tiny", "semantic_chans=4", "in_channels=12")
    assert a == b and a.texture_chans == 8
    with pytest.raises(ConfigError, match="semantic_chans"):
        model_preset("tiny", "in_channels=12")  # 16 semantic channels cannot fit in 12


# ---- one front-end: presets, frequent flags, strict -o overrides -----------------------------


def test_every_entry_config_takes_strict_overrides():
    import argparse

    from sfd.cli import add_sampling_args, apply_overrides, sampling_config_from_args
    from sfd.config import EncodeConfig, SamplingConfig, TrainSemVAEConfig

    enc = apply_overrides(EncodeConfig(images="i", out="o"), ["batch_size=8", "semvae=none", "tf32=false"])
    assert (enc.batch_size, enc.semvae, enc.tf32) == (8, None, False)
    sv = apply_overrides(TrainSemVAEConfig(cache="c", run_dir="r"), ["steps=1_000", "stop_after=3"])
    assert (sv.steps, sv.stop_after) == (1000, 3)
    for cfg, bad in ((enc, "batch_sise=8"), (sv, "lr_max=1"), (SamplingConfig(), "solver=heun")):
        with pytest.raises(ConfigError, match="valid keys are"):
            apply_overrides(cfg, [bad])
    with pytest.raises(ConfigError, match="expected an int"):
        apply_overrides(enc, ["batch_size=eight"])

    ap = argparse.ArgumentParser()
    ap.add_argument("--guide", default=None)
    add_sampling_args(ap)
    # The preset, then the flags given, then -o: each later one wins; absent flags keep the preset.
    cfg = sampling_config_from_args(ap.parse_args(["--preset", "heun", "--steps", "10", "-o", "seed=4"]))
    assert (cfg.method, cfg.num_steps, cfg.seed, cfg.cfg_scale) == ("heun", 10, 4, 1.0)
    assert sampling_config_from_args(ap.parse_args([])) == SamplingConfig()  # the authors' dopri5
    with pytest.raises(ConfigError, match="valid keys are"):
        sampling_config_from_args(ap.parse_args(["-o", "step=3"]))


def test_delta_t_is_stored_once_and_reachable_by_its_alias():
    cfg = train_preset("tiny", "delta_t=0.5")
    assert cfg.model.semfirst_delta_t == 0.5 and cfg.delta_t == 0.5
    assert "delta_t" not in json.loads(to_json(cfg))  # one stored value: the model's


def test_lr_decay_is_off_by_default_and_linear_to_zero_when_on():
    from train.main import lr_at

    flat = TrainConfig(lr=1e-3, max_steps=100)
    assert [lr_at(flat, s) for s in (0, 50, 99)] == [1e-3] * 3  # the authors' constant lr
    cfg = TrainConfig(lr=1e-3, max_steps=100, lr_decay_start=0.5)
    assert lr_at(cfg, 0) == lr_at(cfg, 49) == lr_at(cfg, 50) == 1e-3
    assert lr_at(cfg, 75) == pytest.approx(5e-4)
    assert lr_at(cfg, 99) == pytest.approx(2e-5)
    assert lr_at(cfg, 100) == 0.0
    with pytest.raises(ConfigError, match="lr_decay_start"):
        TrainConfig(lr_decay_start=1.5)
