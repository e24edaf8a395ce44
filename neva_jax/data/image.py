"""Image loading and CLIP preprocessing, numerically the same as `CLIPImageProcessor`.

    load_image(folder, "a/b.jpg")  -> RGB PIL image (EXIF orientation applied)
    preprocess(img, size=336, aspect="pad") -> float32 [size, size, 3], channels-last

`square` is `CLIPImageProcessor`'s recipe: resize the shortest edge to `size` with
PIL bicubic (the long edge becomes `int(size * long / short)`), center-crop
`size` x `size` (top/left offsets rounded down), scale by 1/255, normalize with the
mean and std. `pad` (LLaVA-1.5) first pastes the image centred on a square of side
max(W, H) filled with the mean colour `int(255 * mean)` = (122, 116, 104) for
CLIP. `keep` resizes the whole image to `size` x `size` (no crop, no padding;
NeMo's variable-size `keep` does not fit static batch shapes).

Modes other than RGB are converted like `transformers.image_transforms.convert_to_rgb`:
anything with transparency is composited onto white, the rest uses PIL's
conversion. Truncated files are never loaded (PIL's LOAD_TRUNCATED_IMAGES stays
off); image names stay inside the image folder (no absolute names, no `..` out
of it) or are refused; symbolic links in the folder are followed.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASPECT_MODES = ("square", "pad", "keep")


class ImageError(ValueError):
    """An image that cannot be used; `reason` is the skip-reason key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def resolve_image_path(folder: str, name: str) -> str:
    """Joins `name` under `folder`; refuses absolute names and names that climb out of it.

    The check is on the name (`..` segments), not on where symbolic links lead: an image
    folder whose subfolders link to the datasets (LLaVA's `playground/data/coco -> ...`)
    is the user's own layout and loads. The server, which takes names from clients,
    resolves links before its check (`neva_jax.serve.images`).
    """
    if not isinstance(name, str) or not name:
        raise ImageError("malformed_record", f"image name {name!r} is not a non-empty string")
    root = os.path.abspath(folder or ".")
    if os.path.isabs(name):
        raise ImageError(
            "image_path_outside_folder",
            f"image {name!r} is an absolute path; use one relative to {root}",
        )
    full = os.path.normpath(os.path.join(root, name))
    if os.path.commonpath([root, full]) != root or full == root:
        raise ImageError(
            "image_path_outside_folder", f"image {name!r} leads outside the image folder {root}"
        )
    return full


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB conversion as `transformers` does it (transparency over white).

    One difference: a 16-bit greyscale image (PNG `I;16`) is scaled to 8 bits; PIL's
    conversion, which `transformers` and LLaVA use, clips every value over 255 to white.
    Other wide modes (32-bit integer or float pixels) have no known range and are refused
    (`image_unreadable`).
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img, np.uint16) >> 8).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):
        raise ImageError(
            "image_unreadable", f"{img.mode!r} pixels (32-bit) have no known range; save as 8-bit"
        )
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(source: Any, *, where: str = "image") -> Image.Image:
    """Decodes a path, encoded bytes or a uint8 array [H, W, C] into an RGB PIL image.

    EXIF orientation is applied. Raises `ImageError` with reason `image_missing`,
    `image_file_truncated` or `image_unreadable`.
    """
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        try:
            return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
        except (TypeError, ValueError) as e:
            raise ImageError(
                "image_unreadable", f"{where}: array {arr.shape} {arr.dtype}: {e}"
            ) from e
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
        with Image.open(fp) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except FileNotFoundError as e:
        raise ImageError("image_missing", f"{where}: file not found") from e
    except Image.DecompressionBombError as e:
        raise ImageError("image_unreadable", f"{where}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e) or type(e).__name__
        reason = "image_file_truncated" if "truncat" in msg.lower() else "image_unreadable"
        raise ImageError(reason, f"{where}: {msg}") from e


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `expand2square`: centre on a max(W, H) square filled with `fill`."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess(
    img: Image.Image,
    *,
    size: int,
    aspect: str = "square",
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> np.ndarray:
    """RGB image -> normalized float32 [size, size, 3] (see the module docstring)."""
    if aspect not in ASPECT_MODES:
        raise ValueError(f"image aspect {aspect!r}: expected one of {', '.join(ASPECT_MODES)}")
    img = to_rgb(img)
    if aspect == "pad":
        img = expand_to_square(img, tuple(int(255 * m) for m in mean))
    if aspect == "keep":
        img = img.resize((size, size), Image.BICUBIC)
    else:
        w, h = img.size
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.BICUBIC)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
