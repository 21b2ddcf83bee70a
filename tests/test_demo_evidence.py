"""The demo's evidence pieces: the shape data and its named splits, the label-free semantic ViT
(through the DINOv2 path) and the judge (≥ 97 % on held-out real images)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sfd.demo.judge import (
    METRIC_ACCURACY,
    METRIC_FD,
    JudgeConfig,
    judge_outputs,
    judge_report,
    load_judge,
    read_sample_folder,
    save_judge,
    train_judge,
)
from sfd.demo.semantic import (
    DEMO_VIT,
    SSLConfig,
    _blur,
    _silhouette,
    _tokens,
    _views,
    build_vit,
    linear_probe,
    mean_patch_features,
    save_semantic_vit,
    train_semantic_vit,
)
from sfd.demo.shapes import (
    CLASSES,
    IMAGE_SIZE,
    SPLITS,
    VIT_PATCH,
    read_split,
    render_arrays,
    split_seed,
    write_split,
)
from sfd.encoding import build_dino, dino_spec


def test_splits_are_seeded_and_png_matches_memory(tmp_path):
    a, ya, ma = render_arrays(3, 24, seed=5)
    b, _, _ = render_arrays(3, 24, seed=5)
    c, _, _ = render_arrays(3, 24, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (3 * len(CLASSES), 24, 24, 3) and ma.shape == (3 * len(CLASSES), 24, 24)
    assert ma.max() == pytest.approx(1.0) and 0.05 < ma.mean() < 0.6  # a shape, not a blank or a full frame
    root = write_split(tmp_path / "s", 3, 24, seed=5)
    x, y = read_split(root)
    assert np.array_equal(x, a) and np.array_equal(y, ya)
    # The encode job numbers class folders in sorted order: it must agree with CLASSES.
    assert sorted(p.name for p in root.iterdir()) == list(CLASSES)


def test_named_splits_and_the_token_grid():
    assert len(set(SPLITS.values())) == len(SPLITS) and {"train", "val", "test", "ceiling"} <= set(SPLITS)
    assert split_seed("val") == SPLITS["val"] and split_seed(7) == 7
    with pytest.raises(ValueError, match="unknown split"):
        split_seed("heldout")
    assert len(CLASSES) >= 10
    # The ViT's token grid is the texture latent's grid: the size is a multiple of the patch.
    assert IMAGE_SIZE % VIT_PATCH == 0 and (DEMO_VIT["img_size"], DEMO_VIT["patch_size"]) == (IMAGE_SIZE, VIT_PATCH)


def test_shapes_are_turned_to_any_angle():
    # A shape's principal axis over many images of one class spreads over all directions.
    _, y, m = render_arrays(40, 48, seed=11)
    yy, xx = np.mgrid[0:48, 0:48]
    angles = []
    for cover in m[y == CLASSES.index("ell")]:
        w = cover / cover.sum()
        cx, cy = (w * xx).sum(), (w * yy).sum()
        cov = np.cov(np.stack([(xx - cx).ravel(), (yy - cy).ravel()]), aweights=w.ravel())
        v = np.linalg.eigh(cov)[1][:, -1]
        angles.append(np.arctan2(v[1], v[0]) % np.pi)
    hist, _ = np.histogram(angles, bins=4, range=(0, np.pi))
    assert hist.min() >= 3, hist


def test_semantic_training_never_sees_labels_or_masks():
    # The objective is self-supervised: the trainer's only data argument is the pixels.
    params = inspect.signature(train_semantic_vit).parameters
    assert list(params)[0] == "images" and params["images"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert not {"labels", "masks", "y", "targets"} & set(params)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(params.values())[1:])


def test_token_path_is_the_models_own_forward_and_views_have_the_crop_sizes():
    vit = build_vit(seed=0).eval()
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        xn = vit.preprocess(x)
        assert torch.equal(_tokens(vit, xn), vit.vit.forward_features(xn))
        cfg = SSLConfig(local_crops=2)  # the default (SimCLR) runs without local crops; DINO uses them
        g = torch.Generator().manual_seed(0)
        local = _views(x, cfg.local_crops, cfg.local_size, cfg.local_scale, g)
        assert local.shape == (cfg.local_crops * 2, 3, cfg.local_size, cfg.local_size) and local.abs().max() <= 1
        n = (cfg.local_size // VIT_PATCH) ** 2
        assert _tokens(vit, local).shape == (len(local), vit.num_prefix_tokens + n, DEMO_VIT["embed_dim"])


def test_trained_semantic_vit_loads_through_the_dinov2_path(tmp_path):
    x, _, _ = render_arrays(6, IMAGE_SIZE, seed=0)
    vit = train_semantic_vit(x, steps=3, batch_size=8, log_every=0)
    again = train_semantic_vit(x, steps=3, batch_size=8, log_every=0)
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), again.state_dict().values()))  # seeded
    path = save_semantic_vit(vit, tmp_path / "vit.safetensors", record={"steps": 3})
    # Meta's original DINOv2 names and layout: CLS slot in pos_embed, register_tokens, mask_token.
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        grid = DEMO_VIT["img_size"] // DEMO_VIT["patch_size"]
        assert f.get_tensor("pos_embed").shape == (1, 1 + grid * grid, DEMO_VIT["embed_dim"])
        assert json.loads(f.metadata()["config"]) == DEMO_VIT
    assert {"cls_token", "register_tokens", "mask_token", "blocks.0.ls1.gamma", "norm.weight"} <= keys
    assert "reg_token" not in keys
    with safe_open(str(path), framework="pt") as f:  # the learned iBOT mask token, as DINOv2 files carry
        assert torch.equal(f.get_tensor("mask_token"), vit.ssl_mask_token)
    # The encode job's resolution (sfd.encoding.dino_spec → build_dino → load_dino + timm conversion).
    spec = dino_spec("dinov2_vitb14_reg", str(path), None)
    assert spec["kind"] == "weights" and spec["config"]["patch_size"] == DEMO_VIT["patch_size"]
    loaded = build_dino(spec)
    images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(images), vit(images), atol=1e-6)


def test_linear_probe_separates_and_chance_does_not():
    g = torch.Generator().manual_seed(0)
    y = np.arange(60) % 3
    sep = torch.randn(60, 8, generator=g) * 0.1 + torch.nn.functional.one_hot(torch.as_tensor(y), 8).float()
    assert linear_probe(sep[:30], y[:30], sep[30:], y[30:]) == 1.0
    noise = torch.randn(60, 8, generator=g)
    assert linear_probe(noise[:30], y[:30], noise[30:], y[30:]) < 0.8
    assert mean_patch_features(build_vit(seed=0), render_arrays(1, IMAGE_SIZE, 0)[0]).shape == (len(CLASSES), DEMO_VIT["embed_dim"])


@pytest.fixture(scope="module")
def judge():
    x, y, _ = render_arrays(200, IMAGE_SIZE, seed=SPLITS["train"])  # the demo's training split
    torch.set_num_threads(2)
    return train_judge(x, y, JudgeConfig(num_classes=len(CLASSES)), steps=400, log_every=0)


def test_judge_is_right_on_held_out_real_images(judge):
    x, y, _ = render_arrays(50, IMAGE_SIZE, seed=SPLITS["val"])
    preds, feats = judge_outputs(judge, x)
    assert (preds == y).mean() >= 0.97
    assert feats.shape == (len(x), JudgeConfig().feature_dim)


def test_judge_report_and_round_trip(judge, tmp_path):
    ref, _, _ = render_arrays(30, IMAGE_SIZE, seed=SPLITS["test"])
    _, ref_feats = judge_outputs(judge, ref)
    real, y, _ = render_arrays(10, IMAGE_SIZE, seed=SPLITS["ceiling"])
    good = judge_report(judge, real, y, ref_feats)
    # Wrong labels and blank images are caught: accuracy and FD_judge move the right way.
    bad = judge_report(judge, real, (y + 1) % len(CLASSES), ref_feats)
    blank = judge_report(judge, np.full_like(real, 128), y, ref_feats)
    assert good[METRIC_ACCURACY] >= 0.95 and bad[METRIC_ACCURACY] <= 0.05
    assert blank[METRIC_FD] > 10 * good[METRIC_FD]
    path = save_judge(judge, tmp_path / "judge.safetensors", {"note": "test"})
    again = load_judge(path)
    assert judge_report(again, real, y, ref_feats)[METRIC_FD] == pytest.approx(good[METRIC_FD], rel=1e-6)


def test_sample_folder_labels_follow_eval_gen(tmp_path):
    imgs, _, _ = render_arrays(2, IMAGE_SIZE, seed=3)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i:06d}.png")
    (tmp_path / "gen.json").write_text(json.dumps({"num_samples": len(imgs), "num_classes": len(CLASSES)}))
    x, y = read_sample_folder(tmp_path)
    assert np.array_equal(x, imgs) and list(y) == [i // 2 for i in range(len(imgs))]
    (tmp_path / f"{len(imgs) - 1:06d}.png").unlink()
    with pytest.raises(ValueError, match="holds"):
        read_sample_folder(tmp_path)


def test_silhouette_view_keeps_the_outline_and_drops_the_fill():
    # A pixel-only view: it must agree with the shape's coverage (read here, never in training)
    # and be one colour inside the shape, whatever the fill.
    x, _, cover = render_arrays(4, IMAGE_SIZE, seed=SPLITS["val"])
    xi = (torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255)
    sil = _silhouette(xi)
    inside = torch.as_tensor(cover) > 0.5
    assert ((sil[:, 0] > 0.5) == inside).float().mean() >= 0.97
    assert torch.equal(sil[:, 0], sil[:, 1]) and set(sil.unique().tolist()) <= {0.0, 1.0}
    # The blur flattens a period-4 stripe pattern about tenfold; sigma 0 is the identity.
    stripes = (torch.arange(IMAGE_SIZE) % 4 < 2).float().expand(1, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous()
    out = _blur(stripes.repeat(2, 1, 1, 1), torch.tensor([0.0, 2.0]))
    assert torch.allclose(out[0], stripes[0], atol=1e-6) and out[1].std() < 0.15 * stripes.std()  # radius-3 kernel: ≈ 0.11


def test_contrastive_variants_run_and_bad_settings_are_refused():
    x, _, _ = render_arrays(2, IMAGE_SIZE, seed=0)
    vit = train_semantic_vit(x, steps=2, batch_size=4, log_every=0, ssl=SSLConfig(objective="contrastive"))
    assert vit.ssl_mask_token.shape == (1, DEMO_VIT["embed_dim"])
    # DINO + iBOT (the DINOv2 recipe, kept for comparison) and SimCLR with local crops.
    for ssl in (SSLConfig(objective="dino"), SSLConfig(objective="simclr", local_crops=2)):
        vit = train_semantic_vit(x, steps=2, batch_size=4, log_every=0, ssl=ssl)
        assert vit.ssl_mask_token.shape == (1, DEMO_VIT["embed_dim"]) and not vit.training
    with pytest.raises(ValueError, match="objective"):
        train_semantic_vit(x, steps=1, ssl=SSLConfig(objective="supervised"))
    with pytest.raises(ValueError, match="centering"):
        train_semantic_vit(x, steps=1, ssl=SSLConfig(centering="none"))
