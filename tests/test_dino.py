"""DINOv2-reg through timm: parity with the original implementation, checkpoint conversion, inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from sfd.checkpoint import WeightsError
from sfd.config import DINO_PRESETS, ConfigError
from sfd.models.dino import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoEncoder,
    convert_dinov2_state_dict,
    dino_config_from_original,
    load_dino,
)
from tests.conftest import random_state_dict, read_keys_file

GOLDEN_WEIGHTS = "dinov2-tiny-reg4-original-names.safetensors"


@pytest.fixture(scope="module")
def golden(golden_dir):
    path = golden_dir / GOLDEN_WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        cfg = dino_config_from_original(f.metadata()["config"])
    return load_dino(path, cfg=cfg), load_file(str(golden_dir / "dinov2-tiny-io.safetensors"))


def test_golden_config_maps_to_tiny_preset(golden):
    model, _ = golden
    # Golden: original constructor (img_size 518, interpolate_antialias, offset 0) → our fields.
    assert model.cfg == DINO_PRESETS["tiny"]
    assert model.cfg.pretrained_img_size == 518 and model.cfg.img_size == 224


def test_golden_parity(golden):
    model, io = golden
    with torch.no_grad():
        out = model.forward_features_01(io["image_01"])
    assert out["x_norm_patchtokens"].shape == (2, 256, 64)
    assert out["x_norm_regtokens"].shape == (2, 4, 64)
    assert (out["x_norm_patchtokens"] - io["x_norm_patchtokens"]).abs().max().item() <= 1e-5
    assert (out["x_norm_clstoken"] - io["x_norm_clstoken"]).abs().max().item() <= 1e-5


def test_conversion_folds_cls_position_and_resamples_antialiased(golden_dir):
    sd = load_file(str(golden_dir / GOLDEN_WEIGHTS))
    model = DinoEncoder(DINO_PRESETS["tiny"])
    out = convert_dinov2_state_dict(sd, model)
    assert set(out) == set(model.vit.state_dict())
    assert "mask_token" in sd and "pos_embed" in sd  # the input mapping is left untouched
    assert torch.equal(out["cls_token"], sd["cls_token"] + sd["pos_embed"][:, :1])
    assert torch.equal(out["reg_token"], sd["register_tokens"])
    # DINOv2's interpolate_pos_encoding at 224 with offset 0: bicubic to an explicit size, antialiased.
    grid = sd["pos_embed"][:, 1:].reshape(1, 37, 37, 64).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 256, 64)
    assert torch.allclose(out["pos_embed"], ref, atol=1e-6)


def test_forward_preprocesses_like_the_authors(golden):
    model, _ = golden
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    # extract_features.py@8b17273: Normalize((x + 1) / 2), then bicubic resize of the 256² crop to 224².
    x = F.interpolate(((images + 1) / 2 - mean) / std, size=(224, 224), mode="bicubic")
    with torch.no_grad():
        tokens = model(images)
        expected = model._features(x)["x_norm_patchtokens"]
    assert tokens.shape == (2, 256, 64)
    assert torch.allclose(tokens, expected, atol=1e-6)
    assert torch.allclose(model.preprocess(images), x, atol=1e-6)


def test_loads_real_vitb14_reg4_names(keys_dir, tmp_path):
    keys = read_keys_file(keys_dir / "dinov2-vitb14-reg4.txt")
    sd = random_state_dict(keys, seed=0)
    path = tmp_path / "dinov2_vitb14_reg4_pretrain.pth"
    torch.save(sd, path)
    model = load_dino(path)  # ViT-B/14-reg4 preset
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    state = model.vit.state_dict()
    assert torch.equal(state["blocks.11.ls2.gamma"], sd["blocks.11.ls2.gamma"])
    assert state["pos_embed"].shape == (1, 256, 768)
    with torch.no_grad():
        tokens = model(torch.zeros(1, 3, 256, 256))
    assert tokens.shape == (1, 256, 768)  # (speed is a bench's business, not a test's)


def test_bad_files_and_configs(golden_dir, tmp_path):
    with pytest.raises(WeightsError) as err:
        load_dino(tmp_path / "absent.pth")
    assert "dinov2_vitb14_reg4_pretrain.pth" in str(err.value)

    sd = load_file(str(golden_dir / GOLDEN_WEIGHTS))
    sd["pos_embed"] = sd["pos_embed"][:, :257]  # weights for a 16x16 grid, config says 518²
    path = tmp_path / "short_pos.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="1370"):
        load_dino(path, preset="tiny")

    with safe_open(str(golden_dir / GOLDEN_WEIGHTS), framework="pt") as f:
        base = f.metadata()["config"]
    for change in ('"interpolate_offset": 0.1', '"interpolate_antialias": false'):
        key = change.split(":")[0]
        broken = base.replace(key + ": " + ("0.0" if "offset" in key else "true"), change)
        assert broken != base
        with pytest.raises(ConfigError):  # recorded in the config, refused when the model is built
            DinoEncoder(dino_config_from_original(broken))
