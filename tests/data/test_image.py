"""Image preprocessing vs `transformers.CLIPImageProcessor` (explicit settings, no download)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers import CLIPImageProcessor
from transformers.image_transforms import convert_to_rgb

from neva_jax.data import image as I

TOL = 1e-5


def _processor(size: int, **kw) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(I.CLIP_MEAN),
        image_std=list(I.CLIP_STD),
        resample=3,  # PIL bicubic
        do_convert_rgb=True,
        **kw,
    )


def _ref(proc: CLIPImageProcessor, img: Image.Image) -> np.ndarray:
    return proc(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _rng_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth-ish content so resampling is exercised, plus noise
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    arr = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        img = img.copy()
        img.putalpha(alpha)
    elif mode != "RGB":
        img = img.convert(mode)
    return img


def _exif_rotated_jpeg(tmp_path) -> tuple[str, Image.Image]:
    img = _rng_image(48, 30, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = os.path.join(tmp_path, "rot.jpg")
    img.save(path, exif=exif, quality=95)
    with Image.open(path) as f:
        f.load()
        upright = ImageOps.exif_transpose(f)
    return path, upright


CASES = [
    ("rgb_wide", lambda: _rng_image(90, 50)),
    ("rgb_tall", lambda: _rng_image(37, 81, seed=1)),
    ("gray", lambda: _rng_image(70, 40, "L", seed=2)),
    ("rgba", lambda: _rng_image(60, 45, "RGBA", seed=4)),
    ("palette", lambda: _rng_image(52, 66, "P", seed=5)),
    ("cmyk", lambda: _rng_image(40, 64, "CMYK", seed=6)),
]


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize(("name", "make"), CASES)
def test_square_matches_clip_processor(name: str, make, size: int) -> None:
    img = make()
    got = I.preprocess(I.to_rgb(img), size=size, aspect="square")
    ref = _ref(_processor(size), img)
    assert got.shape == (size, size, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize(("name", "make"), CASES)
def test_pad_matches_llava_recipe(name: str, make) -> None:
    img = make()
    # LLaVA-1.5: expand2square with the mean colour, then the processor.
    fill = tuple(int(x * 255) for x in I.CLIP_MEAN)
    assert fill == (122, 116, 104)
    rgb = convert_to_rgb(img)
    w, h = rgb.size
    side = max(w, h)
    square = Image.new(rgb.mode, (side, side), fill)
    square.paste(rgb, ((side - w) // 2, (side - h) // 2))
    ref = _ref(_processor(32), square)
    got = I.preprocess(I.to_rgb(img), size=32, aspect="pad")
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_keep_is_a_plain_resize() -> None:
    img = _rng_image(90, 50)
    proc = _processor(32, do_center_crop=False)
    proc.size = {"height": 32, "width": 32}
    np.testing.assert_allclose(I.preprocess(img, size=32, aspect="keep"), _ref(proc, img), atol=TOL)


def test_clip_l_336_defaults() -> None:
    img = _rng_image(500, 375, seed=7)
    np.testing.assert_allclose(
        I.preprocess(img, size=336), _ref(_processor(336), img), atol=TOL, rtol=0
    )


def test_exif_orientation_is_applied(tmp_path) -> None:
    path, upright = _exif_rotated_jpeg(tmp_path)
    loaded = I.open_image(path)
    assert loaded.size == upright.size == (30, 48)
    got = I.preprocess(loaded, size=32, aspect="pad")
    fill = (122, 116, 104)
    square = Image.new("RGB", (48, 48), fill)
    square.paste(upright, (9, 0))
    np.testing.assert_allclose(got, _ref(_processor(32), square), atol=TOL, rtol=0)


def test_open_image_from_bytes_and_arrays() -> None:
    img = _rng_image(20, 10)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    np.testing.assert_array_equal(np.asarray(I.open_image(buf.getvalue())), np.asarray(img))
    np.testing.assert_array_equal(np.asarray(I.open_image(np.asarray(img))), np.asarray(img))
    gray = np.zeros((4, 5, 1), np.uint8)
    assert I.open_image(gray).mode == "RGB"


def test_bad_images_raise_with_reasons(tmp_path) -> None:
    with pytest.raises(I.ImageError) as e:
        I.open_image(os.path.join(tmp_path, "nope.png"))
    assert e.value.reason == "image_missing"
    junk = os.path.join(tmp_path, "junk.png")
    with open(junk, "wb") as f:
        f.write(b"this is not an image")
    with pytest.raises(I.ImageError) as e:
        I.open_image(junk)
    assert e.value.reason == "image_unreadable"
    buf = io.BytesIO()
    _rng_image(64, 64).save(buf, format="JPEG", quality=95)
    with pytest.raises(I.ImageError) as e:
        I.open_image(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert e.value.reason == "image_file_truncated"


def test_paths_stay_inside_the_image_folder(tmp_path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    _rng_image(8, 8).save(tmp_path / "secret.png")
    assert I.resolve_image_path(str(root), "a/b.png") == os.path.join(root, "a", "b.png")
    for bad in ("../secret.png", "/etc/passwd", "a/../../secret.png", ".", "a/.."):
        with pytest.raises(I.ImageError) as e:
            I.resolve_image_path(str(root), bad)
        assert e.value.reason == "image_path_outside_folder", bad


def test_symbolic_links_in_the_image_folder_are_followed(tmp_path) -> None:
    """LLaVA's layout links dataset folders into the image folder (`coco -> /data/coco`)."""
    data = tmp_path / "datasets" / "coco"
    data.mkdir(parents=True)
    _rng_image(8, 8).save(data / "1.png")
    root = tmp_path / "playground"
    root.mkdir()
    os.symlink(data, root / "coco")
    os.symlink(data / "1.png", root / "one.png")
    for name in ("coco/1.png", "one.png", "coco/./1.png"):
        path = I.resolve_image_path(str(root), name)
        assert os.path.dirname(os.path.relpath(path, root)) in ("coco", ""), path
        np.testing.assert_array_equal(
            np.asarray(I.open_image(path)), np.asarray(I.open_image(str(data / "1.png")))
        )
    with pytest.raises(I.ImageError) as e:  # `..` after a link is judged by the name too
        I.resolve_image_path(str(root), "coco/../../datasets/coco/1.png")
    assert e.value.reason == "image_path_outside_folder"


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path) -> None:
    """PIL's convert("RGB") clips 16-bit values over 255 to white; they are scaled."""
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)  # uint16 -> mode I;16
    img = I.open_image(str(path))
    assert Image.open(path).mode.startswith("I;16") and img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img)[..., 0], (ramp >> 8).astype(np.uint8))
