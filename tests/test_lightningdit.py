"""LightningDiT: parity with the authors' code, their checkpoint layout, sizes, and behaviour."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from sfd.checkpoint import WeightsError, load_state_dict_strict, load_tensors
from sfd.config import model_config_from_authors, model_preset
from sfd.loading import load_model
from sfd.models.lightningdit import (
    ROPE_BUFFERS,
    LightningDiT,
    count_params,
    rope_tables_2d,
    save_lightningdit,
    sincos_pos_embed_2d,
)
from tests.conftest import random_state_dict, read_keys_file


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its init (adaLN-Zero would hide most paths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _tiny(**overrides) -> LightningDiT:
    return _randomise(LightningDiT(dataclasses.replace(model_preset("tiny"), **overrides)))


def _inputs(model: LightningDiT, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t_sem = torch.rand(batch, generator=g)
    t_tex = (t_sem - 0.3).clamp_min(0)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    return x, (t_tex, t_sem), y


# ---------------------------------------------------------------------------------------------
# 1. Parity with the authors' implementation


@pytest.fixture(scope="module")
def golden(golden_dir):
    model = load_model(golden_dir / "lightningdit-tiny-weights.safetensors")[0]
    return model, load_tensors(golden_dir / "lightningdit-tiny-io.safetensors")


def test_golden_velocity(golden):
    model, io = golden
    assert not model.training  # the loader hands back an eval-mode model
    with torch.no_grad():
        v = model(io["x"], (io["t_tex"], io["t_sem"]), io["y"])
    torch.testing.assert_close(v, io["velocity"], rtol=0, atol=1e-5)


def test_golden_repa_projection(golden):
    model, io = golden
    # The stored projection was produced from the CFG batch (cfg_x, cfg_t_*, cfg_y), not from
    # x/t/y as reference/README.md says; the two batches share their first two samples.
    with torch.no_grad():
        _, repa = model(
            io["cfg_x"], (io["cfg_t_tex"], io["cfg_t_sem"]), io["cfg_y"], return_repa=True
        )
        v, repa_plain = model(io["x"], (io["t_tex"], io["t_sem"]), io["y"], return_repa=True)
    assert repa.shape == (4, 64, 768)
    torch.testing.assert_close(repa, io["repa_projection"], rtol=0, atol=1e-5)
    torch.testing.assert_close(repa_plain[:2], io["repa_projection"][:2], rtol=0, atol=1e-5)
    torch.testing.assert_close(v, io["velocity"], rtol=0, atol=1e-5)  # the tap changes nothing


def test_golden_cfg_by_hand(golden):
    model, io = golden
    with torch.no_grad():
        v = model(io["cfg_x"], (io["cfg_t_tex"], io["cfg_t_sem"]), io["cfg_y"])
    cond, uncond = v.chunk(2)
    guided = uncond + 1.5 * (cond - uncond)  # all 48 channels
    torch.testing.assert_close(
        torch.cat([guided, guided]), io["cfg_velocity_1p5"], rtol=0, atol=1e-5
    )


def test_constant_tables_match_authors(golden_dir):
    w = load_tensors(golden_dir / "lightningdit-tiny-weights.safetensors")
    cos, sin = rope_tables_2d(head_dim=64, grid_size=8)
    assert torch.equal(cos, w["feat_rope.freqs_cos"]) and torch.equal(sin, w["feat_rope.freqs_sin"])
    torch.testing.assert_close(sincos_pos_embed_2d(128, 8), w["pos_embed"][0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2-4. The authors' checkpoint layout, sizes, loading


def test_authors_b1_layout_loads_strict(keys_dir):
    keys = read_keys_file(keys_dir / "lightningdit-B1-sfd.txt")
    with torch.device("meta"):  # no random init for 130M parameters
        model = LightningDiT(model_preset("B/1"))
    own = {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    }
    assert own == keys  # names, shapes and dtypes, exactly
    model = model.to_empty(device="cpu")
    model.reset_constant_buffers()
    sd = random_state_dict(keys)
    load_state_dict_strict(model, sd, source="B/1 keys file")
    assert torch.equal(model.blocks[11].mlp.w3.weight, sd["blocks.11.mlp.w3.weight"])
    # The RoPE tables may be missing from a file; they are recomputed.
    for k in ROPE_BUFFERS:
        del sd[k]
    load_state_dict_strict(model, sd, optional=ROPE_BUFFERS)


# docs/method.md §5.1 (excluding the REPA projector); 1p0B is printed to whole millions there.
@pytest.mark.parametrize(
    "name,millions,tol", [("B/1", 130.3, 0.05), ("XL/1", 674.6, 0.05), ("1p0B/1", 1028, 0.5)]
)
def test_param_counts_match_paper(name, millions, tol):
    assert abs(count_params(model_preset(name)) / 1e6 - millions) < tol


def test_param_counts_repa_projector():
    # docs/method.md §5.1: the XL projector has about 8.1M parameters.
    cfg = model_preset("XL/1")
    assert abs((count_params(cfg, include_repa=True) - count_params(cfg)) / 1e6 - 8.1) < 0.05


def test_single_timestep_layout_round_trip(tmp_path):
    model = _tiny(timestep_embedding="single")
    sd = model.state_dict()
    assert sd["t_embedder.mlp.0.weight"].shape == (64, 256)
    assert not any(k.startswith("t_embedder_") for k in sd)
    path = tmp_path / "single.safetensors"
    save_lightningdit(model, path)
    loaded = load_model(path)[0]
    assert loaded.cfg == model.cfg
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in sd.items())
    # One clock: a tuple uses t_tex, and a shared tensor is the same thing.
    x, (t_tex, _), y = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, (t_tex, t_tex + 0.3), y), model.eval()(x, t_tex, y))
    # The layout conflicts with a dual config: refused with a message naming the layout.
    with pytest.raises(WeightsError, match=r"t_embedder\.\*.*timestep_embedding='single'"):
        load_model(path, model_preset("tiny"))[0]


def test_bad_files_name_the_keys(tmp_path):
    model = _tiny()
    sd = model.state_dict()
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(5, 64)
    del sd["final_layer.linear.bias"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(WeightsError) as err:
        load_model(tmp_path / "broken.pt", model.cfg)[0]
    msg = str(err.value)
    assert (
        "blocks.1.attn.qkv.weight" in msg
        and "final_layer.linear.bias" in msg
        and "extra.weight" in msg
    )
    # A bare state dict has no config: the error asks for a preset.
    with pytest.raises(WeightsError, match="model_preset"):
        load_model(tmp_path / "broken.pt")[0]


def test_authors_container_prefers_ema(tmp_path):
    model, ema = _tiny(), _tiny()
    _randomise(ema, seed=5)
    blob = {
        "model": {"module." + k: v for k, v in model.state_dict().items()},
        "ema": ema.state_dict(),
        "opt": {},
    }
    torch.save(blob, tmp_path / "0000100.pt")
    loaded = load_model(tmp_path / "0000100.pt", model.cfg)[0]
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, ema.blocks[0].attn.qkv.weight)
    loaded = load_model(tmp_path / "0000100.pt", model.cfg, prefer_ema=False)[0]
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_authors_training_yaml_maps_to_presets():
    yaml = {
        "data": {"image_size": 256, "num_classes": 1000},
        "vae": {"model_name": "sdvae_f16d32", "downsample_ratio": 16},
        "model": {
            "model_type": "LightningDiT-XL/1",
            "use_qknorm": True,
            "use_swiglu": True,
            "use_rope": True,
            "use_rmsnorm": True,
            "wo_shift": False,
            "in_chans": 48,
            "semantic_chans": 16,
            "semfirst_delta_t": 0.3,
            "semantic_weight": 2.0,
            "use_repa": True,
            "repa_dino_version": "dinov2_vitb14_reg",
            "repa_feat_depth": 2,
        },
    }
    assert model_config_from_authors(yaml) == model_preset("XL/1")
    yaml["model"]["semfirst_delta_t"] = 0.0  # their Δt = 0 run silently uses one embedder
    assert model_config_from_authors(yaml).timestep_embedding == "single"


def test_golden_config_json_parses_as_constructor_args(golden_dir):
    from sfd.checkpoint import read_safetensors_metadata
    from sfd.config import model_config_from_json

    raw = json.loads(
        read_safetensors_metadata(golden_dir / "lightningdit-tiny-weights.safetensors")["config"]
    )
    cfg = model_config_from_json(raw)
    assert cfg.timestep_embedding == "dual" and cfg.repa_target_dim == 768
    assert model_config_from_json({**raw, "semfirst_delta_t": 0.0}).timestep_embedding == "single"


# ---------------------------------------------------------------------------------------------
# 5. Class dropout


def test_force_drop_ids_uses_null_label_in_any_mode():
    model = _tiny()
    x, t, y = _inputs(model)
    null = torch.full_like(y, model.cfg.num_classes)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            forced = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
            model.eval()
            ref_null, ref_cond = model(x, t, null), model(x, t, y)
        torch.testing.assert_close(forced[0], ref_null[0])
        torch.testing.assert_close(forced[1], ref_cond[1])
        assert not torch.allclose(ref_null[0], ref_cond[0])  # the label matters here


def test_training_dropout_follows_global_rng():
    model = _tiny(class_dropout_prob=0.5)
    labels = torch.arange(8) % model.cfg.num_classes
    table = model.y_embedder.embedding_table.weight
    torch.manual_seed(123)
    expected_drop = torch.rand(8) < 0.5
    assert 0 < expected_drop.sum() < 8
    torch.manual_seed(123)
    emb = model.y_embedder(labels, train=True)
    expected = table[torch.where(expected_drop, model.cfg.num_classes, labels)]
    assert torch.equal(emb, expected)
    # Eval mode never drops, whatever the RNG does.
    model.eval()
    x = torch.randn(8, 48, 8, 8)
    t = torch.rand(8)
    with torch.no_grad():
        a = model(x, t, labels)
        b = model(x, t, labels)
    assert torch.equal(a, b)
    assert torch.equal(model.y_embedder(labels, train=False), table[labels])


# ---------------------------------------------------------------------------------------------
# 6. Pure import


def test_import_is_pure():
    state = (
        "(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,"
        " torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),"
        " torch.get_num_threads(), torch.random.initial_seed(), torch.get_rng_state().sum().item())"
    )
    code = (
        f"import torch\nbefore = {state}\n"
        f"import sfd.models.lightningdit\nafter = {state}\n"
        "assert before == after, (before, after)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""


# ---------------------------------------------------------------------------------------------
# 7. Training paths: gradients, checkpointing, variants


def _loss(model: LightningDiT, x, t, y) -> torch.Tensor:
    v, repa = model(x, t, y, return_repa=True, force_drop_ids=torch.tensor([0, 1]))
    return v.square().mean() + repa.square().mean()


def test_gradients_reach_every_parameter_and_checkpointing_is_exact():
    model = _tiny().train()
    x, t, y = _inputs(model)
    _loss(model, x, t, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    ckpt = copy.deepcopy(model)
    ckpt.zero_grad()
    ckpt.grad_checkpointing = True
    calls = []
    ckpt.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    _loss(ckpt, x, t, y).backward()
    assert len(calls) == 2  # forward + recomputation: checkpointing really ran
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_fresh_init_is_adaln_zero():
    model = LightningDiT(model_preset("tiny"))
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), torch.zeros_like(x))  # adaLN-Zero: output starts at 0
    assert torch.equal(model.blocks[0].norm1.weight, torch.ones(64))
    assert model.y_embedder.embedding_table.weight.shape == (11, 64)
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.005
    assert torch.equal(model.blocks[1].mlp.w12.bias, torch.zeros_like(model.blocks[1].mlp.w12.bias))
    assert model.blocks[1].mlp.w12.weight.abs().max() > 0


def test_eval_forward_skips_projector_and_shared_t():
    model = _tiny().eval()
    calls = []
    model.repa_projector.register_forward_hook(lambda *_: calls.append(1))
    x, (t_tex, t_sem), y = _inputs(model)
    with torch.no_grad():
        shared = model(x, t_sem, y)
        assert calls == []
        torch.testing.assert_close(shared, model(x, (t_sem, t_sem), y))
        assert not torch.allclose(shared, model(x, (t_tex, t_sem), y))  # both clocks matter
        torch.testing.assert_close(
            model(x, torch.tensor(0.4), y), model(x, torch.full((2,), 0.4), y)
        )


def test_variants_plain_lightningdit_and_wo_shift():
    plain = _tiny(semantic_chans=0, use_repa=False, timestep_embedding="single", wo_shift=True)
    keys = plain.state_dict().keys()
    assert not any(k.startswith("repa_projector") for k in keys)
    assert plain.blocks[0].adaLN_modulation[1].weight.shape == (4 * 64, 64)
    x, t, y = _inputs(plain)
    assert plain(x, t, y).shape == x.shape
    with pytest.raises(ValueError, match="REPA"):
        plain(x, t, y, return_repa=True)
    # LightningDiT's own defaults: LayerNorm, GELU MLP, no RoPE (timm names fc1/fc2).
    dit = _tiny(use_rmsnorm=False, use_swiglu=False, use_rope=False)
    keys = dit.state_dict().keys()
    assert "blocks.0.mlp.fc1.weight" in keys and "blocks.0.attn.q_norm.bias" in keys
    assert "blocks.0.norm1.weight" not in keys and not any(k.startswith("feat_rope") for k in keys)
    assert dit(x, t, y).shape == x.shape


def test_bf16_autocast_runs_close_to_fp32():
    model = _tiny().eval()
    x, t, y = _inputs(model)
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, repa = model(x, t, y, return_repa=True)
    assert out.dtype in (torch.float32, torch.bfloat16) and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
