"""`image_url` parts -> RGB images, refusing anything unsafe with a 400 that says why.

Three sources, each switched on by the operator:
  - `data:image/...;base64,...` URIs: always accepted.
  - local paths (`file:///abs/path`, `/abs/path` or `relative/path`): only under
    `--image-root`; symbolic links are resolved first, so none can lead outside it.
  - `http(s)://` URLs: only with `--allow-remote-images` (the server then fetches any
    URL a client names, including ones on its own network: trusted clients only).

Every image is checked before it is decoded: at most `max_bytes` encoded bytes and
`max_pixels` pixels (the header is read first, so a decompression bomb is refused
before a pixel is allocated); truncated files are refused, never half-loaded.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import urllib.parse

import httpx
from PIL import Image

from neva_jax.data import image as image_lib
from neva_jax.serve.protocol import ApiError

DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
REMOTE_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how large they may be."""

    root: str | None = None  # --image-root
    allow_remote: bool = False  # --allow-remote-images
    max_pixels: int = DEFAULT_MAX_PIXELS  # --max-image-pixels
    max_bytes: int = DEFAULT_MAX_BYTES


async def load_image(url: str, policy: ImagePolicy, where: str) -> Image.Image:
    """Fetches and decodes one `image_url.url`; `where` names the part in errors."""
    data = await read_bytes(url, policy, where)
    return decode(data, policy, where)


async def read_bytes(url: str, policy: ImagePolicy, where: str) -> bytes:
    """The encoded bytes behind `url`, after the policy checks."""
    scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url[:12] else ""
    if url.startswith("data:"):
        return _data_uri(url, policy, where)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ApiError(
                400,
                f"{where}: remote image URLs are disabled on this server; send the image as a "
                "data: URI, or start the server with --allow-remote-images",
                param="messages",
            )
        return await _fetch(url, policy, where)
    if scheme not in ("", "file"):
        raise ApiError(
            400,
            f"{where}: unsupported URL scheme {scheme!r}; use a data: URI, a path under "
            "--image-root, or http(s) with --allow-remote-images",
            param="messages",
        )
    return _local(url, policy, where)


def _data_uri(url: str, policy: ImagePolicy, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(
            400, f"{where}: a data: URI must be data:image/...;base64,<data>", param="messages"
        )
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise ApiError(
            400,
            f"{where}: the image is over {policy.max_bytes} bytes (the server's limit)",
            param="messages",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, f"{where}: the data: URI is not valid base64", param="messages"
        ) from None


def _local(url: str, policy: ImagePolicy, where: str) -> bytes:
    if policy.root is None:
        raise ApiError(
            400,
            f"{where}: local image paths are disabled on this server; send the image as a "
            "data: URI, or start the server with --image-root DIR",
            param="messages",
        )
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file:") else url
    root = os.path.realpath(policy.root)
    full = os.path.realpath(os.path.join(root, path))  # an absolute path replaces root
    if os.path.commonpath([root, full]) != root:
        raise ApiError(
            400, f"{where}: path {path!r} is outside the image root {root}", param="messages"
        )
    try:
        size = os.path.getsize(full)
        if size > policy.max_bytes:
            raise ApiError(
                400,
                f"{where}: {path!r} is {size} bytes, over the server's limit of {policy.max_bytes}",
                param="messages",
            )
        with open(full, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ApiError(
            400, f"{where}: no image file {path!r} under the image root", param="messages"
        ) from None


async def _fetch(url: str, policy: ImagePolicy, where: str) -> bytes:
    try:
        async with (
            httpx.AsyncClient(timeout=REMOTE_TIMEOUT_S, follow_redirects=True) as client,
            client.stream("GET", url) as resp,
        ):
            if resp.status_code != 200:
                raise ApiError(
                    400,
                    f"{where}: fetching {url} answered HTTP {resp.status_code}",
                    param="messages",
                )
            chunks, total = [], 0
            async for chunk in resp.aiter_bytes():
                total += len(chunk)
                if total > policy.max_bytes:
                    raise ApiError(
                        400,
                        f"{where}: {url} is over the server's limit of {policy.max_bytes} bytes",
                        param="messages",
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as e:
        raise ApiError(400, f"{where}: could not fetch {url}: {e}", param="messages") from None


def decode(data: bytes, policy: ImagePolicy, where: str) -> Image.Image:
    """Encoded bytes -> RGB PIL image; the pixel cap is checked on the header first."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
    except Image.DecompressionBombError:
        w = h = None  # PIL's own cap (far above ours) tripped: refuse below
    except (OSError, SyntaxError, ValueError) as e:
        raise ApiError(
            400, f"{where}: the data is not an image PIL can read ({e})", param="messages"
        ) from None
    if w is None or w * h > policy.max_pixels:
        size = "" if w is None else f"{w}x{h} = {w * h} pixels, "
        raise ApiError(
            400,
            f"{where}: the image is {size}over the server's limit of {policy.max_pixels} pixels "
            "(--max-image-pixels)",
            param="messages",
        )
    try:
        return image_lib.open_image(data, where=where)
    except image_lib.ImageError as e:
        what = "truncated" if e.reason == "image_file_truncated" else "unreadable"
        detail = str(e).removeprefix(f"{where}: ")
        raise ApiError(400, f"{where}: the image is {what} ({detail})", param="messages") from None
