"""Reading the files of a NeMo checkpoint without NeMo or Megatron: folders and `.nemo`
tars, and the torch helpers every NeMo module shares.

- `Source`: the files of a checkpoint, either a folder or a `.nemo` tar read in place
  (a gzip-compressed tar, NeMo before 1.7, is first decompressed to a temporary file).
  A truncated tar is detected from its member offsets.
- `NemoError`: every unusable-checkpoint error (one line naming the file, key or knob).

The tensors inside (dist checkpoints, pickled state dicts): convert/nemo_dist.py.
torch is imported lazily and is the `nemo` extra (`require_torch`).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np


class NemoError(ValueError):
    """An unusable NeMo checkpoint; the message is one line naming the file, key or knob."""


def require_torch() -> Any:
    """The torch module, or a one-line error naming the `nemo` extra."""
    try:
        import torch
    except ImportError:
        raise NemoError(
            "reading or writing NeMo checkpoints needs torch (CPU build is enough): "
            "pip install 'neva-jax[nemo]'"
        ) from None
    return torch


def to_numpy(t: Any) -> np.ndarray:
    """A CPU torch tensor as a numpy array (bfloat16 as ml_dtypes.bfloat16)."""
    torch = require_torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a: np.ndarray) -> Any:
    """A numpy array (bfloat16 included) as a contiguous CPU torch tensor."""
    torch = require_torch()
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


# ---------------------------------------------------------------------------- sources


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + size) of an open file."""

    def __init__(self, f: BinaryIO, start: int, size: int):
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


class Source:
    """The files of a checkpoint: a folder, or a `.nemo` tar (plain or gzip) read in place.

    Paths are relative and '/'-separated (`model_weights/.metadata`).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._file: BinaryIO | None = None
        self._members: dict[str, tuple[int, int]] = {}  # name -> (data offset, size)
        self._dirs: set[str] = set()
        if not self.path.exists():
            raise NemoError(f"{self.path}: no such file or folder")
        if self.path.is_dir():
            return
        tar_path = self.path
        with open(self.path, "rb") as f:
            magic = f.read(2)
        if magic == b"\x1f\x8b":  # gzip: NeMo before 1.7 wrote r:gz tars
            self._tmp = tempfile.TemporaryDirectory(prefix="neva_nemo_")
            tar_path = Path(self._tmp.name) / "checkpoint.tar"
            try:
                with gzip.open(self.path, "rb") as src, open(tar_path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
            except (EOFError, OSError, gzip.BadGzipFile) as e:
                self.close()
                raise NemoError(f"{self.path}: gzip data is corrupt or truncated ({e})") from None
        self._index_tar(tar_path)

    def _index_tar(self, tar_path: Path) -> None:
        size = tar_path.stat().st_size
        try:
            with tarfile.open(tar_path, "r:") as tar:
                members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            self.close()
            raise NemoError(
                f"{self.path}: not a readable .nemo tar ({e}); the file may be truncated"
            ) from None
        for m in members:
            name = os.path.normpath(m.name).lstrip("/")
            if name in (".", "") or name.startswith(".."):
                continue
            parts = name.split("/")
            self._dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
            if m.isdir():
                self._dirs.add(name)
            elif m.isfile():
                if m.offset_data + m.size > size:
                    self.close()
                    raise NemoError(
                        f"{self.path}: truncated: member {name} ends at byte "
                        f"{m.offset_data + m.size}, the file has {size} bytes"
                    )
                self._members[name] = (m.offset_data, m.size)
        if not self._members:
            self.close()
            raise NemoError(f"{self.path}: an empty tar; the file may be truncated")
        self._file = open(tar_path, "rb")  # noqa: SIM115 (closed by close())

    @property
    def is_tar(self) -> bool:
        """True for a `.nemo` tar, False for a folder."""
        return self._file is not None

    def close(self) -> None:
        """Releases the open tar and any temporary decompressed copy."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def exists(self, rel: str) -> bool:
        """True when `rel` is a file or folder of the checkpoint."""
        if not self.is_tar:
            return (self.path / rel).exists()
        rel = rel.strip("/")
        return rel in self._members or rel in self._dirs

    def is_dir(self, rel: str) -> bool:
        """True when `rel` is a folder of the checkpoint."""
        if not self.is_tar:
            return (self.path / rel).is_dir()
        return rel.strip("/") in self._dirs

    def list(self, rel: str = "") -> list[str]:
        """Names directly inside folder `rel` ('' = the top)."""
        if not self.is_tar:
            folder = self.path / rel
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        prefix = rel.strip("/") + "/" if rel.strip("/") else ""
        names = {
            n[len(prefix) :].split("/")[0]
            for n in (*self._members, *self._dirs)
            if n.startswith(prefix) and n != prefix.rstrip("/")
        }
        return sorted(names)

    def open(self, rel: str) -> BinaryIO:
        """A seekable binary file object for `rel` (close it when done)."""
        if not self.is_tar:
            return open(self.path / rel, "rb")
        if rel not in self._members:
            raise NemoError(f"{self.path}: no member {rel}")
        start, size = self._members[rel]
        return io.BufferedReader(_Window(self._file, start, size))

    def read_bytes(self, rel: str) -> bytes:
        """The whole content of file `rel`."""
        with self.open(rel) as f:
            return f.read()

    def local_file(self, rel: str) -> Path | None:
        """`rel` as a file on disk (memory-mappable), or None inside a tar."""
        return None if self.is_tar else self.path / rel

    def extract(self, rel: str, dest: Path) -> Path:
        """Copies file `rel` to `dest` and returns it."""
        with self.open(rel) as f, open(dest, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 24)
        return dest


def iter_files(source: Source, folder: str) -> Iterator[str]:
    """Relative paths of every file under `folder` (recursively)."""
    for name in source.list(folder):
        rel = f"{folder}/{name}" if folder else name
        if source.is_dir(rel):
            yield from iter_files(source, rel)
        else:
            yield rel
