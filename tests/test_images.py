"""Image discovery, the ADM crop and robust decoding (every bad-input kind must yield a reason)."""

from __future__ import annotations

import builtins
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from sfd.data.images import (
    DatasetError,
    adm_center_crop,
    discover,
    hflip,
    load_image,
    to_model_input,
)
from sfd.data.synthetic import PHOTO_SIZES, QUIRKS, write_quirks


def _reference_crop(img: Image.Image, size: int) -> np.ndarray:
    """Independent restatement of ADM's center_crop_arr: count the halvings first, crop with PIL."""
    w, h = img.size
    halvings = 0
    while min(w >> halvings, h >> halvings) >= 2 * size:
        halvings += 1
    for _ in range(halvings):
        img = img.resize((img.width // 2, img.height // 2), Image.BOX)
    short = min(img.size)
    new_w, new_h = round(img.width * size / short), round(img.height * size / short)
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def test_discover_sample_folder(sample_images: Path) -> None:
    images = discover(sample_images)
    assert len(images) == 30 and len(images.class_names) == 30
    assert list(images.class_names) == sorted(images.class_names)
    assert images.class_names[0] == "n00000000"
    # One image per class here, so labels follow the sorted class order exactly.
    np.testing.assert_array_equal(images.labels, np.arange(30))
    assert all(p.split("/")[0] == images.class_names[k] for p, k in zip(images.paths, images.labels))
    assert images.abspath(0).is_file()
    perm = images.permuted(seed=3)
    assert sorted(perm.paths) == sorted(images.paths)
    assert all(p.split("/")[0] == perm.class_names[k] for p, k in zip(perm.paths, perm.labels))


def test_discover_custom_dataset(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for rel in ["b/x2.PNG", "b/x1.jpg", "b/sub/a.JpEg", "a/z.webp", "a/y.BMP", "c/only.tiff"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not decoded by discover")
    (root / "b" / "notes.txt").write_text("ignored")
    (root / "b" / "._x1.jpg").write_bytes(b"macOS resource fork")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "README.md").write_text("files at the top level are not classes")
    images = discover(root)
    assert images.class_names == ("a", "b", "c")
    assert images.paths == ("a/y.BMP", "a/z.webp", "b/sub/a.JpEg", "b/x1.jpg", "b/x2.PNG", "c/only.tiff")
    np.testing.assert_array_equal(images.labels, [0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(images.class_counts(), [2, 3, 1])

    (root / "d_empty").mkdir()
    with pytest.raises(DatasetError, match="d_empty"):
        discover(root)
    with pytest.raises(DatasetError, match="no class folders"):
        discover(root / "c")
    with pytest.raises(DatasetError, match="not a directory"):
        discover(root / "missing")


def test_adm_crop_matches_reference(sample_images: Path) -> None:
    images = discover(sample_images)
    for i in (0, 1, 3, 4, 9):  # 500x375, 909x768 (one halving round), 1152x864, 106x150 upscale, 2100x1400
        assert Image.open(images.abspath(i)).size == PHOTO_SIZES[i]
        with Image.open(images.abspath(i)) as im:
            im = im.convert("RGB")
            ours = adm_center_crop(im, 256)
            assert ours.shape == (256, 256, 3) and ours.dtype == np.uint8
            np.testing.assert_array_equal(ours, _reference_crop(im, 256))
    # Large synthetic image: three BOX halvings (short side 2100 -> 1050 -> 525 -> 262 < 512).
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (2100, 2900, 3), dtype=np.uint8))
    np.testing.assert_array_equal(adm_center_crop(big, 256), _reference_crop(big, 256))


def test_adm_crop_offsets_and_resize_facts() -> None:
    # Short side already 256: the bicubic resize is the identity, so only the crop offsets act.
    # ADM takes floor((W - 256) / 2) = (341 - 256) // 2 = 42 columns off the left.
    arr = np.random.default_rng(1).integers(0, 255, (256, 341, 3), dtype=np.uint8)
    np.testing.assert_array_equal(adm_center_crop(Image.fromarray(arr), 256), arr[:, 42:298])
    # A 1024-px short side is halved twice by BOX (1024 >= 512 -> 512 >= 512 -> 256): a BOX halving
    # of a 2x2-constant image is exact, so the result equals the 4x-subsampled input.
    block = np.random.default_rng(2).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    up = np.repeat(np.repeat(block, 4, axis=0), 4, axis=1)  # 1024x1024
    np.testing.assert_array_equal(adm_center_crop(Image.fromarray(up), 256), block)


def test_hflip_and_model_input(sample_images: Path) -> None:
    images = discover(sample_images)
    crops = np.stack([load_image(images.abspath(i), 64)[0] for i in range(3)])  # NHWC
    flipped = hflip(crops)
    np.testing.assert_array_equal(flipped[:, :, 0], crops[:, :, -1])
    np.testing.assert_array_equal(hflip(flipped), crops)
    np.testing.assert_array_equal(hflip(crops[1]), flipped[1])  # HWC == per-item NHWC
    with pytest.raises(ValueError):
        hflip(crops[0, 0])

    x = to_model_input(crops)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # Same arithmetic as torchvision ToTensor() + Normalize(0.5, 0.5).
    expected = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    edge = to_model_input(np.array([0, 255, 128], dtype=np.uint8).reshape(1, 1, 1, 3).repeat(3, axis=-1)[..., :3])
    assert edge.flatten()[0] == -1
    with pytest.raises(ValueError):
        to_model_input(crops.astype(np.float32))


@pytest.fixture()
def bad_dir(tmp_path: Path, sample_images: Path) -> dict[str, Path]:
    """A copy of sample JPEGs plus one file of every bad kind (the sample folder is shared)."""
    src = sorted(sample_images.glob("*/*.JPEG"))
    d = tmp_path / "imgs"
    d.mkdir()
    files: dict[str, Path] = {}
    for i in range(2):
        files[f"good{i}"] = Path(shutil.copy(src[i], d / f"good{i}.JPEG"))
    data = src[0].read_bytes()
    files["truncated"] = d / "truncated.jpg"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["corrupt_header"] = d / "corrupt.jpg"
    files["corrupt_header"].write_bytes(data[:2] + bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    files["zero_bytes"] = d / "empty.jpg"
    files["zero_bytes"].write_bytes(b"")
    files["not_an_image"] = d / "notes.png"
    files["not_an_image"].write_text("this is a text file with an image extension\n" * 10)
    files["directory"] = d / "dir.jpg"
    files["directory"].mkdir()
    files["missing"] = d / "gone.jpg"
    Image.new("RGB", (1, 1), (9, 9, 9)).save(files.setdefault("one_pixel", d / "1x1.png"))
    Image.new("RGB", (100, 4), (9, 9, 9)).save(files.setdefault("strip", d / "strip.png"))
    Image.new("RGB", (1000, 10), (9, 9, 9)).save(files.setdefault("aspect", d / "aspect.png"))
    Image.fromarray(np.ones((20, 20), np.float32), mode="F").save(files.setdefault("float", d / "f.tiff"))
    Image.new("L", (300, 200), 7).save(files.setdefault("bomb", d / "bomb.png"))
    files["unreadable"] = Path(shutil.copy(src[2], d / "unreadable.JPEG"))
    return files


BAD_KINDS = {
    "truncated": "truncated",
    "corrupt_header": "not a recognised image",
    "zero_bytes": "empty",
    "not_an_image": "not a recognised image",
    "directory": "directory",
    "missing": "not found",
    "one_pixel": "too small",
    "strip": "too small",
    "aspect": "aspect ratio",
    "float": "mode F",
    "bomb": "decompression bomb",
    "unreadable": "unreadable",
}


def test_bad_inputs_give_reasons(bad_dir: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    unreadable = bad_dir["unreadable"]
    if os.geteuid() != 0:
        unreadable.chmod(0)
    else:  # root reads anything: make open() fail the way a 000-mode file does for users
        real_open = builtins.open

        def deny(file, *args, **kwargs):  # type: ignore[no-untyped-def]
            if Path(str(file)) == unreadable:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", deny)

    for kind, needle in BAD_KINDS.items():
        # bomb.png has 60,000 pixels: over a lowered limit (a real bomb needs > 89M pixels).
        limit = 50_000 if kind == "bomb" else Image.MAX_IMAGE_PIXELS
        with monkeypatch.context() as m:
            m.setattr(Image, "MAX_IMAGE_PIXELS", limit)
            arr, reason = load_image(bad_dir[kind], 256)
        assert arr is None, kind
        assert isinstance(reason, str) and reason and needle in reason, (kind, reason)
    for kind in ("good0", "good1"):
        arr, reason = load_image(bad_dir[kind], 256)
        assert reason is None and arr.shape == (256, 256, 3) and arr.dtype == np.uint8


def test_pil_warning_bomb_and_truncation_flag(bad_dir: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # Between MAX_IMAGE_PIXELS and 2x it PIL only warns; that warning must still reject the file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)
    arr, reason = load_image(bad_dir["bomb"], 64)
    assert arr is None and "decompression bomb" in reason
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # > 2x: PIL raises DecompressionBombError
    arr, reason = load_image(bad_dir["bomb"], 64)
    assert arr is None and "decompression bomb" in reason
    # Someone else's global LOAD_TRUNCATED_IMAGES=True must not make truncated files "decode".
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    arr, reason = load_image(bad_dir["truncated"], 64)
    assert arr is None and "LOAD_TRUNCATED_IMAGES" in reason


def test_mode_conversions(tmp_path: Path, sample_images: Path) -> None:
    rgb = Image.open(sorted(sample_images.glob("*/*.JPEG"))[0]).convert("RGB")

    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    arr, reason = load_image(tmp_path / "cmyk.jpg", 64)
    assert reason is None and arr.shape == (64, 64, 3)
    # CMYK JPEG round trip stays close to the RGB crop (lossy, hence the loose bound).
    assert np.abs(arr.astype(int) - adm_center_crop(rgb, 64).astype(int)).mean() < 12

    rgb.convert("L").save(tmp_path / "gray.png")
    arr, reason = load_image(tmp_path / "gray.png", 64)
    assert reason is None and arr.shape == (64, 64, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()

    # 16-bit grayscale: scaled by 1/257, not clipped at 255.
    levels = np.array([[0, 257 * 128, 65535, 257 * 40]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(np.kron(levels, np.ones((64, 16), np.uint16))).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    arr, reason = load_image(tmp_path / "g16.png", 256)
    assert reason is None
    assert arr.max() == 255 and arr.min() == 0 and (np.abs(arr.astype(int) - 128) <= 1).any()
    assert arr.mean() < 200  # clipping would make 3 of 4 bands white

    # Transparent pixels composite on white; opaque pixels keep their colour.
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 32:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    arr, reason = load_image(tmp_path / "rgba.png", 64)
    assert reason is None
    np.testing.assert_array_equal(arr[:, :28], 255)
    np.testing.assert_array_equal(arr[:, 36:], np.broadcast_to([200, 0, 0], (64, 28, 3)))

    la = Image.fromarray(np.stack([np.full((64, 64), 50, np.uint8), np.zeros((64, 64), np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    arr, reason = load_image(tmp_path / "la.png", 64)
    assert reason is None and (arr == 255).all()

    pal = Image.new("P", (64, 64), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pal.png", transparency=1)
    arr, reason = load_image(tmp_path / "pal.png", 64)
    assert reason is None and (arr == 255).all()

    # Smaller than the crop: upscaled like ADM (ImageNet has many such images).
    rgb.resize((60, 40)).save(tmp_path / "small.webp")
    rgb.save(tmp_path / "upper.BMP")
    for name in ("small.webp", "upper.BMP"):
        arr, reason = load_image(tmp_path / name, 64)
        assert reason is None and arr.shape == (64, 64, 3), name


def test_generated_quirks_decode_or_give_reasons(tmp_path: Path) -> None:
    """Every format quirk of real collections: the convertible ones decode to the ADM crop, the
    broken ones are refused with a reason (the same kinds a real ImageNet copy contains)."""
    files = write_quirks(tmp_path)
    assert set(files) == set(QUIRKS)
    for kind, path in files.items():
        arr, reason = load_image(path, 64)
        needle = QUIRKS[kind][1]
        if needle is None:
            assert reason is None and arr.shape == (64, 64, 3) and arr.dtype == np.uint8, (kind, reason)
        else:
            assert arr is None and needle in reason, (kind, reason)
    # EXIF orientation is ignored, as in the authors' ImageFolder loading: the stored pixels count.
    with Image.open(files["exif_rotated"]) as im:
        assert im.getexif()[0x0112] == 6
        np.testing.assert_array_equal(load_image(files["exif_rotated"], 64)[0], adm_center_crop(im.convert("RGB"), 64))
    # Progressive JPEGs decode to the same pixels a baseline decoder gives for them.
    with Image.open(files["progressive"]) as im:
        assert im.info.get("progressive") or im.info.get("progression")
        np.testing.assert_array_equal(load_image(files["progressive"], 64)[0], adm_center_crop(im.convert("RGB"), 64))
    # The 17×11 image is upscaled, the 4000×90 strip (44:1, under the 50:1 limit) cropped.
    assert Image.open(files["tiny_17x11"]).size == (17, 11)
    assert Image.open(files["strip_4000x90"]).size == (4000, 90)
