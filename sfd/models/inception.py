"""FID InceptionV3: the TensorFlow 2015-12-05 graph the ADM evaluator reads (docs/method.md §8).

Parameter names are those of the public PyTorch port's weight file
``pt_inception-2015-12-05-6726825d.pth`` (reference/keys/inception-fid-2015-12-05.txt). The
graph differs from torchvision's ImageNet InceptionV3 in ways that change FID:

- 1008 logits; no auxiliary head; BatchNorm eps 1e-3, convolutions without bias;
- the pooling branch of the A, C and first E blocks averages over valid pixels only
  (TF ``SAME`` average pooling = ``count_include_pad=False``);
- the last E block (``Mixed_7c``, TF ``mixed_10``) max-pools in its pooling branch;
- input: ``ResizeBilinear`` to 299×299 with TF1's legacy alignment (source = dest · in/out, no
  half-pixel centres), then (x − 128) / 128.

One forward gives everything the evaluator uses (reference/README.md):

- ``pool``    (N, 2048): TF ``pool_3``, the global average pool;
- ``spatial`` (N, 2023): TF ``mixed_6/conv`` = the output (after BN and ReLU) of
  ``Mixed_6d.branch1x1`` (TF mixed, mixed_1, mixed_2 = Mixed_5b/5c/5d; mixed_3 = Mixed_6a;
  mixed_4…7 = Mixed_6b…6e), first 7 channels of its 17×17 map, flattened in TF's NHWC order
  (H, W, C) as the evaluator reshapes it;
- ``logits``  (N, 1008): TF ``softmax/logits`` = fc(pool) with bias;
- ``probs``   (N, 1008): the evaluator's IS probabilities, softmax(pool @ Wᵀ) *without* the fc
  bias (it rebuilds the softmax from ``softmax/logits/MatMul``'s weight alone).

Detector honesty: every instance carries ``detector_name``. Only :func:`load_inception` on a file
whose SHA-256 starts with the published name's hash (``6726825d``) is called
``inception-2015-12-05``; a randomly initialised or unverified model says so in its name, and
scripts must not report distances from it as FID (see :func:`is_fid_detector`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sfd.checkpoint import (
    file_sha256,
    load_state_dict_strict,
    load_tensors,
    resolve_weights,
    unwrap_state_dict,
)

FID_DETECTOR_NAME = "inception-2015-12-05"
RANDOM_DETECTOR_NAME = "random-inception (not FID)"
# torch.hub convention: the 8 hex digits in the published file name start its SHA-256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"

INPUT_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # the evaluator keeps mixed_6/conv[..., :7]


class InceptionOutputs(NamedTuple):
    pool: torch.Tensor  # (N, 2048)  pool_3
    spatial: torch.Tensor  # (N, 2023)  mixed_6/conv[..., :7], flattened H, W, C
    logits: torch.Tensor  # (N, 1008)  fc with bias
    probs: torch.Tensor  # (N, 1008)  softmax of fc without bias (the evaluator's IS input)


# ---------------------------------------------------------------------------------------------
# Input pipeline
# ---------------------------------------------------------------------------------------------


def _legacy_tf_axis(
    in_size: int, out_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices and weights of TF1 ``resize_bilinear(align_corners=False)`` along one axis.

    TF computes in float32: scale = in/out, src = dst·scale, lower = floor(src),
    upper = min(ceil(src), in−1), lerp = src − floor(src) (no half-pixel offset).
    """
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    src_floor = torch.floor(src)
    lower = src_floor.long().clamp(min=0)
    upper = torch.ceil(src).long().clamp(max=in_size - 1)
    lerp = src - src_floor
    return lower.to(device), upper.to(device), lerp.to(device)


def resize_bilinear_tf(x_NCHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False).

    Not ``F.interpolate(mode="bilinear")``, which samples at half-pixel centres: the 2015 graph
    predates that fix, and FID moves by a visible amount between the two conventions.
    Interpolates along x first, then y, as TF's kernel does: top = tl + (tr − tl)·xl,
    bottom = bl + (br − bl)·xl, out = top + (bottom − top)·yl.
    """
    out_h, out_w = size
    in_h, in_w = x_NCHW.shape[-2:]
    y0, y1, yl = _legacy_tf_axis(in_h, out_h, x_NCHW.device)
    x0, x1, xl = _legacy_tf_axis(in_w, out_w, x_NCHW.device)
    xl = xl.to(x_NCHW.dtype)
    yl = yl.to(x_NCHW.dtype)[:, None]
    rows0 = x_NCHW.index_select(-2, y0)
    rows1 = x_NCHW.index_select(-2, y1)
    top = (
        rows0.index_select(-1, x0) + (rows0.index_select(-1, x1) - rows0.index_select(-1, x0)) * xl
    )
    bottom = (
        rows1.index_select(-1, x0) + (rows1.index_select(-1, x1) - rows1.index_select(-1, x0)) * xl
    )
    return top + (bottom - top) * yl


def to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 255] → float32 (N, 3, 299, 299) in [−1, 1).

    The two accepted forms are the evaluator's sample batches (uint8 NHWC) and decoded model
    output scaled to [0, 255] (float NCHW). Float input is *not* quantised to uint8 here: the
    evaluator reads the saved uint8 images, so callers that want its exact numbers quantise first.
    """
    if images.ndim != 4:
        raise ValueError(f"expected a 4-d image batch, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        if images.shape[-1] != 3:
            raise ValueError(
                f"uint8 images must be NHWC with 3 channels, got shape {tuple(images.shape)}"
            )
        x = images.permute(0, 3, 1, 2).float()
    elif images.is_floating_point():
        if images.shape[1] != 3:
            raise ValueError(
                f"float images must be NCHW in [0, 255] with 3 channels, got shape {tuple(images.shape)}"
            )
        x = images.float()
    else:
        raise ValueError(f"images must be uint8 NHWC or float NCHW, got dtype {images.dtype}")
    if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
        x = resize_bilinear_tf(x, (INPUT_SIZE, INPUT_SIZE))
    # The graph's Sub(128) and Mul(1/128) after ResizeBilinear.
    return (x - 128.0) / 128.0


# ---------------------------------------------------------------------------------------------
# Blocks (names follow the port's state dict)
# ---------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3, TF's) → ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_valid(x: torch.Tensor) -> torch.Tensor:
    # TF SAME average pooling divides by the number of real pixels under the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """TF mixed, mixed_1, mixed_2 (35×35)."""

    def __init__(self, in_ch: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_valid(x)),
            ],
            dim=1,
        )


class InceptionB(nn.Module):
    """TF mixed_3: 35×35 → 17×17 reduction."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class InceptionC(nn.Module):
    """TF mixed_4 … mixed_7 (17×17), factorised 7×7 convolutions."""

    def __init__(self, in_ch: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four branch outputs, branch1x1 first (TF ``<block>/conv``, sFID's source)."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            bd = layer(bd)
        return [self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_valid(x))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), dim=1)


class InceptionD(nn.Module):
    """TF mixed_8: 17×17 → 8×8 reduction."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)],
            dim=1,
        )


class InceptionE(nn.Module):
    """TF mixed_9 (average-pool branch) and mixed_10 (max-pool branch: a quirk of this graph)."""

    def __init__(self, in_ch: int, max_pool_branch: bool) -> None:
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # Max pooling pads with −inf, so it matches TF SAME max pooling without a count fix.
        pooled = (
            F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool_branch else _avg_pool_valid(x)
        )
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(bd),
                self.branch3x3dbl_3b(bd),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


class InceptionV3(nn.Module):
    """The FID InceptionV3. ``forward(images)`` → :class:`InceptionOutputs` (always float32)."""

    def __init__(self, detector_name: str = RANDOM_DETECTOR_NAME) -> None:
        super().__init__()
        self.detector_name = detector_name
        self.weights_sha256: str | None = None  # set by load_inception
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> InceptionOutputs:
        # Features must be float32 whatever autocast policy the caller runs under: FID is a
        # difference of large traces and bf16 features would shift it.
        device = self.fc.weight.device
        with torch.autocast(device_type=device.type, enabled=False):
            x = to_inception_input(images.to(device))
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
            x = self.Mixed_6c(self.Mixed_6b(x))
            parts = self.Mixed_6d.branches(x)
            # mixed_6/conv[..., :7] in TF's NHWC layout, flattened as the evaluator reshapes it.
            spatial = parts[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            x = self.Mixed_6e(torch.cat(parts, dim=1))
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
            pool = x.mean(dim=(2, 3))  # pool_3: 8×8 average pool
            logits = self.fc(pool)
            probs = torch.softmax(F.linear(pool, self.fc.weight), dim=1)
        return InceptionOutputs(pool=pool, spatial=spatial, logits=logits, probs=probs)


# ---------------------------------------------------------------------------------------------
# Construction and loading
# ---------------------------------------------------------------------------------------------


def is_fid_detector(model: nn.Module) -> bool:
    """True only for the verified 2015-12-05 weights; anything else must not be reported as FID."""
    return getattr(model, "detector_name", None) == FID_DETECTOR_NAME


def random_inception(seed: int = 0) -> InceptionV3:
    """Randomly initialised network for tests and smoke runs; its name says it is not FID's.

    PyTorch's default init shrinks the activations at each of the ~95 conv layers, leaving
    pool features near 1e-7 and equal for every image (every distance ~0). He-normal convs keep
    the scale through the ReLUs and a unit-variance fc spreads the class probabilities, so the
    features carry signal.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InceptionV3(detector_name=RANDOM_DETECTOR_NAME)
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.normal_(model.fc.weight, std=1.0)
    return model.eval().requires_grad_(False)


def load_inception(
    path: str | os.PathLike[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    expected_sha256_prefix: str | None = FID_WEIGHTS_SHA256_PREFIX,
) -> InceptionV3:
    """The FID InceptionV3 from ``pt_inception-2015-12-05-6726825d.pth`` (default ``weights/``).

    Loading is strict (every missing, unexpected or mis-shaped key is reported;
    ``num_batches_tracked`` may be absent). The file's SHA-256 is checked against the published
    name's prefix: a match names the model ``inception-2015-12-05``; a mismatch still loads but
    the name records ``unverified`` and the hash, so no script can report it as FID by accident.
    ``expected_sha256_prefix=None`` skips the check (the caller vouches for the file).
    """
    file = resolve_weights("inception", path)
    model = InceptionV3()
    load_state_dict_strict(
        model,
        unwrap_state_dict(load_tensors(file)),
        optional=("num_batches_tracked",),
        source=str(file),
    )
    model.weights_sha256 = file_sha256(file)
    if expected_sha256_prefix is None or model.weights_sha256.startswith(expected_sha256_prefix):
        model.detector_name = FID_DETECTOR_NAME
    else:
        model.detector_name = (
            f"{FID_DETECTOR_NAME}-unverified (sha256 {model.weights_sha256[:12]}, "
            f"expected {expected_sha256_prefix}…; not FID)"
        )
    return model.to(device).eval().requires_grad_(False)
