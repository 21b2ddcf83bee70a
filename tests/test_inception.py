"""FID InceptionV3: names of the public weight file, outputs the ADM evaluator reads, TF resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sfd.checkpoint import WeightsError
from sfd.models.inception import (
    FID_DETECTOR_NAME,
    InceptionV3,
    is_fid_detector,
    load_inception,
    random_inception,
    resize_bilinear_tf,
    to_inception_input,
)
from tests.conftest import random_state_dict, read_keys_file

KEYS_FILE = "inception-fid-2015-12-05.txt"


def _real_image(folder: Path, index: int = 0) -> np.ndarray:
    """A photo-like JPEG as uint8 HWC (not square, at ImageNet sizes such as 500×375)."""
    files = sorted(folder.glob("*/*.JPEG"))
    return np.asarray(Image.open(files[index]).convert("RGB"))


def _center_crop_256(img: np.ndarray) -> np.ndarray:
    # ADM-style: shrink the short side to 256 (PIL bicubic), then centre crop.
    h, w = img.shape[:2]
    s = 256 / min(h, w)
    pil = Image.fromarray(img).resize(
        (max(256, round(w * s)), max(256, round(h * s))), Image.BICUBIC
    )
    a = np.asarray(pil)
    top, left = (a.shape[0] - 256) // 2, (a.shape[1] - 256) // 2
    return a[top : top + 256, left : left + 256]


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory, keys_dir: Path) -> tuple[Path, dict]:
    """The public file's names and shapes with random values, saved as the port saves it (.pth)."""
    keys = read_keys_file(keys_dir / KEYS_FILE)
    sd = random_state_dict(keys, seed=1)
    g = torch.Generator().manual_seed(2)
    for name in sd:
        if name.endswith("running_var"):  # a variance must be positive
            sd[name] = 1.0 + torch.rand(sd[name].shape, generator=g)
        elif name.endswith("bn.weight"):  # BN gains near 1 keep activations O(1) to the end
            sd[name] = 1.0 + 0.1 * torch.randn(sd[name].shape, generator=g)
        elif name.endswith(".conv.weight"):  # He scale, for the same reason
            fan_in = sd[name][0].numel()
            sd[name] = torch.randn(sd[name].shape, generator=g) * (2.0 / fan_in) ** 0.5
    # The released file may lack num_batches_tracked: save it without them.
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def loaded(inception_file: tuple[Path, dict]) -> InceptionV3:
    return load_inception(inception_file[0])


@pytest.fixture(scope="module")
def two_images(sample_images: Path) -> torch.Tensor:
    return torch.from_numpy(
        np.stack([_center_crop_256(_real_image(sample_images, i)) for i in (0, 1)])
    )


@pytest.fixture(scope="module")
def traced(loaded: InceptionV3, two_images: torch.Tensor) -> dict:
    """One forward, with hooks recording the intermediate tensors the checks below need."""
    seen: dict[str, torch.Tensor] = {}

    def keep_output(name):
        return lambda module, args, out: seen.__setitem__(name, out)

    def keep_input(name):
        return lambda module, args: seen.__setitem__(name, args[0])

    hooks = [
        loaded.Mixed_6d.branch1x1.register_forward_hook(keep_output("mixed_6_conv")),
        loaded.Mixed_7c.register_forward_hook(keep_output("mixed_10")),
        loaded.Mixed_7b.register_forward_pre_hook(keep_input("mixed_9_in")),
        loaded.Mixed_7b.branch_pool.register_forward_pre_hook(keep_input("mixed_9_pool")),
        loaded.Mixed_7c.register_forward_pre_hook(keep_input("mixed_10_in")),
        loaded.Mixed_7c.branch_pool.register_forward_pre_hook(keep_input("mixed_10_pool")),
        loaded.Conv2d_1a_3x3.register_forward_pre_hook(keep_input("input")),
    ]
    with torch.no_grad():
        out = loaded(two_images)
    for h in hooks:
        h.remove()
    return {"out": out, **seen}


# ---------------------------------------------------------------------------------------------
# Names, loading, honesty
# ---------------------------------------------------------------------------------------------


def test_state_dict_names_and_shapes_match_public_file(keys_dir: Path) -> None:
    keys = read_keys_file(keys_dir / KEYS_FILE)
    own = InceptionV3().state_dict()
    assert set(own) == set(keys)
    for name, (shape, dtype) in keys.items():
        assert tuple(own[name].shape) == shape, name
        assert str(own[name].dtype) == f"torch.{dtype}", name


def test_load_is_strict_and_honest(inception_file: tuple[Path, dict], loaded: InceptionV3) -> None:
    _, sd = inception_file
    own = loaded.state_dict()
    for name, value in sd.items():
        assert torch.equal(own[name], value), name
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # Random values under the right names are not the FID network, whatever the file is called.
    assert not is_fid_detector(loaded)
    assert "unverified" in loaded.detector_name and "not FID" in loaded.detector_name
    assert not is_fid_detector(random_inception())
    assert "not FID" in random_inception().detector_name


def test_hash_check_names_verified_weights(
    inception_file: tuple[Path, dict], loaded: InceptionV3
) -> None:
    path, _ = inception_file
    verified = load_inception(path, expected_sha256_prefix=loaded.weights_sha256[:8])
    assert is_fid_detector(verified) and verified.detector_name == FID_DETECTOR_NAME


def test_load_reports_missing_file_and_bad_keys(
    tmp_path: Path, inception_file: tuple[Path, dict]
) -> None:
    with pytest.raises(WeightsError, match="mseitzer/pytorch-fid"):
        load_inception(tmp_path / "absent.pth")
    _, sd = inception_file
    bad = dict(sd)
    bad["fc.weight"] = bad["fc.weight"][:1000]  # torchvision's 1000-class head, not the FID graph
    del bad["Mixed_7c.branch_pool.conv.weight"]
    bad["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as err:
        load_inception(tmp_path / "bad.pth")
    msg = str(err.value)
    assert (
        "fc.weight" in msg
        and "Mixed_7c.branch_pool.conv.weight" in msg
        and "AuxLogits.fc.weight" in msg
    )


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def test_output_shapes_and_dtypes(traced: dict) -> None:
    out = traced["out"]
    assert out.pool.shape == (2, 2048) and out.spatial.shape == (2, 2023)
    assert out.logits.shape == (2, 1008) and out.probs.shape == (2, 1008)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out)
    assert out.pool.std() > 0 and out.spatial.std() > 0  # real signal, not a dead network
    assert not torch.allclose(out.pool[0], out.pool[1])


def test_input_is_tf_resized_and_scaled(traced: dict, two_images: torch.Tensor) -> None:
    x = traced["input"]
    assert x.shape == (2, 3, 299, 299)
    expected = resize_bilinear_tf(two_images.permute(0, 3, 1, 2).float(), (299, 299)) / 128.0 - 1.0
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    assert x.min() >= -1.0 and x.max() < 1.0  # the graph's (x − 128) / 128


def test_spatial_is_mixed_6_conv_first_7_channels_in_nhwc_order(traced: dict) -> None:
    act = traced["mixed_6_conv"]  # Mixed_6d.branch1x1 output after BN+ReLU, (2, 192, 17, 17)
    assert act.shape == (2, 192, 17, 17) and (act >= 0).all()
    spatial = traced["out"].spatial
    for n, h, w, c in [
        (0, 0, 0, 0),
        (0, 0, 0, 6),
        (0, 0, 1, 0),
        (1, 3, 11, 4),
        (1, 16, 16, 6),
        (0, 1, 0, 2),
    ]:
        assert spatial[n, (h * 17 + w) * 7 + c] == act[n, c, h, w], (n, h, w, c)


def test_pool_logits_and_is_probabilities(traced: dict, loaded: InceptionV3) -> None:
    out = traced["out"]
    torch.testing.assert_close(out.pool, traced["mixed_10"].mean(dim=(2, 3)))
    w, b = loaded.fc.weight, loaded.fc.bias
    torch.testing.assert_close(out.logits, out.pool @ w.T + b)
    # The evaluator's IS softmax uses softmax/logits/MatMul's weight only: no bias.
    torch.testing.assert_close(out.probs, torch.softmax(out.pool @ w.T, dim=1))
    assert not torch.allclose(out.probs, torch.softmax(out.logits, dim=1))
    torch.testing.assert_close(out.probs.sum(1), torch.ones(2))


def test_pool_branches_follow_the_tf_graph(traced: dict) -> None:
    # mixed_9 (Mixed_7b): average over real pixels only (TF SAME, count_include_pad=False).
    x = traced["mixed_9_in"]
    ones = torch.ones_like(x[:, :1])
    valid_mean = F.avg_pool2d(x, 3, 1, 1) * 9 / (F.avg_pool2d(ones, 3, 1, 1) * 9)
    torch.testing.assert_close(traced["mixed_9_pool"], valid_mean)
    # mixed_10 (Mixed_7c): max pooling in this graph.
    torch.testing.assert_close(
        traced["mixed_10_pool"], F.max_pool2d(traced["mixed_10_in"], 3, 1, 1)
    )


def test_uint8_nhwc_float_nchw_and_autocast_agree(
    loaded: InceptionV3, traced: dict, two_images: torch.Tensor
) -> None:
    float_nchw = two_images[:1].permute(0, 3, 1, 2).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = loaded(float_nchw)
    assert out.pool.dtype == torch.float32
    torch.testing.assert_close(out.pool, traced["out"].pool[:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.spatial, traced["out"].spatial[:1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="NHWC"):
        to_inception_input(two_images.permute(0, 3, 1, 2).contiguous())  # uint8 NCHW is ambiguous


# ---------------------------------------------------------------------------------------------
# TF1 resize_bilinear
# ---------------------------------------------------------------------------------------------


def _tf1_resize_bilinear_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False), written from its
    kernel: float32 scale = in/out, src = dst·scale, neighbours floor(src) and
    min(ceil(src), in−1), x interpolated first. img: HWC float32."""
    in_h, in_w = img.shape[:2]
    out = np.zeros((out_h, out_w, img.shape[2]), dtype=np.float32)
    sy, sx = np.float32(in_h / out_h), np.float32(in_w / out_w)
    for y in range(out_h):
        fy = np.float32(y) * sy
        y0, y1 = int(np.floor(fy)), min(int(np.ceil(fy)), in_h - 1)
        ly = fy - np.float32(np.floor(fy))
        for x in range(out_w):
            fx = np.float32(x) * sx
            x0, x1 = int(np.floor(fx)), min(int(np.ceil(fx)), in_w - 1)
            lx = fx - np.float32(np.floor(fx))
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * lx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * lx
            out[y, x] = top + (bottom - top) * ly
    return out


@pytest.mark.parametrize(
    "case, out_hw",
    [("square_256", (299, 299)), ("raw_nonsquare", (299, 299)), ("raw_nonsquare", (160, 411))],
)
def test_tf_resize_matches_reference_on_a_real_image(
    sample_images: Path, case: str, out_hw: tuple[int, int]
) -> None:
    img = _real_image(sample_images, 3)
    if case == "square_256":
        img = _center_crop_256(img)
    else:
        assert img.shape[0] != img.shape[1]
    img = img.astype(np.float32)
    expected = _tf1_resize_bilinear_reference(img, *out_hw)
    got = (
        resize_bilinear_tf(torch.from_numpy(img).permute(2, 0, 1)[None], out_hw)[0]
        .permute(1, 2, 0)
        .numpy()
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    # PyTorch's bilinear samples at half-pixel centres: a different image, not rounding noise.
    pt = F.interpolate(
        torch.from_numpy(img).permute(2, 0, 1)[None],
        size=out_hw,
        mode="bilinear",
        align_corners=False,
    )
    assert np.abs(pt[0].permute(1, 2, 0).numpy() - expected).max() > 10.0


def test_tf_resize_identity_at_same_size() -> None:
    x = torch.rand(1, 3, 299, 299) * 255
    torch.testing.assert_close(resize_bilinear_tf(x, (299, 299)), x, rtol=0, atol=0)


def test_random_detector_features_carry_signal():
    # Default init collapses the features to ~1e-7 for every image; ours must separate images.
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8, generator=g)
    out = random_inception()(images)
    assert out.pool.std(dim=0).mean() > 1e-3
    assert out.probs.max(dim=1).values.mean() > 2.0 / 1008  # not uniform
