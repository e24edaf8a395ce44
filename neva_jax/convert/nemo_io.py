"""Reading NeMo checkpoint files without NeMo or Megatron: folders, `.nemo` tars, torch_dist,
zarr and pickled `model_weights.ckpt` state dicts.

- `Source`: the files of a checkpoint, either a folder or a `.nemo` tar read in place
  (a gzip-compressed tar, NeMo before 1.7, is first decompressed to a temporary file).
  A truncated tar is detected from its member offsets.
- `DistCheckpoint`: a Megatron dist checkpoint folder (`metadata.json`, `common.pt`,
  `.metadata` + `__R_S.distcp` for torch_dist, or one `.zarray` folder per tensor for
  zarr). `.metadata` is unpickled by `MetadataUnpickler`, which allows only
  torch.distributed.checkpoint's metadata classes (Megatron's `MCoreMetadata` /
  `MCoreSavePlan` are read as torch's `Metadata` / `SavePlan`), so no foreign code runs.
  Each stored chunk is a `torch.save`d tensor read with `torch.load(weights_only=True)`.
- `load_state_dict`: a pickled state dict (`model_weights.ckpt`), read with
  `weights_only=True` (TE's `io.BytesIO` extra state allowed) unless the caller
  explicitly allows full unpickling.

torch is imported lazily and is the `nemo` extra (`require_torch`).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

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


# ---------------------------------------------------------------------------- pickles


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles dist-checkpoint `.metadata` allowing only torch's checkpoint metadata
    classes; Megatron's MCoreMetadata/MCoreSavePlan subclasses map to torch's bases."""

    _MODULES: ClassVar[dict[str, tuple[str, ...]]] = {
        "torch.distributed.checkpoint.metadata": (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        ),
        "torch.distributed.checkpoint.planner": (
            "WriteItem",
            "WriteItemType",
            "TensorWriteData",
            "SavePlan",
            "ReadItem",
            "LoadItemType",
        ),
        "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
        "torch.serialization": ("_get_layout",),
        "collections": ("OrderedDict",),
    }
    _MEGATRON: ClassVar[dict[tuple[str, str], tuple[str, str]]] = {
        ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"): (
            "torch.distributed.checkpoint.metadata",
            "Metadata",
        ),
        ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"): (
            "torch.distributed.checkpoint.planner",
            "SavePlan",
        ),
    }

    def find_class(self, module: str, name: str) -> Any:
        torch = require_torch()
        module, name = self._MEGATRON.get((module, name), (module, name))
        if name in self._MODULES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_state_dict(source: Source, rel: str, *, allow_pickle: bool = False) -> dict[str, Any]:
    """The flat {key: tensor} state dict of pickled file `rel` (`model_weights.ckpt`)."""
    torch = require_torch()
    where = f"{source.path}:{rel}" if source.is_tar else str(source.path / rel)
    local = source.local_file(rel)
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            if local is not None:
                sd = torch.load(local, map_location="cpu", weights_only=not allow_pickle, mmap=True)
            else:
                with source.open(rel) as f:
                    sd = torch.load(f, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
        raise NemoError(
            f"{where}: holds pickled objects other than tensors ({detail or 'not weights-only'}); "
            "if you trust its source, rerun with --allow-pickle (unpickling can run code)"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise NemoError(f"{where}: cannot read ({str(e).splitlines()[0]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # a Lightning checkpoint
    if not isinstance(sd, dict):
        raise NemoError(f"{where}: not a state dict (a {type(sd).__name__})")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------- dist checkpoints


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: its place in the global tensor and its bytes."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # relative to the checkpoint folder
    start: int
    length: int


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A stored tensor: global shape, dtype name and chunks."""

    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[Chunk, ...]


_ZARR_DTYPES = {
    "<f4": np.float32,
    "<f2": np.float16,
    "<f8": np.float64,
    "bfloat16": ml_dtypes.bfloat16,
    "<i8": np.int64,
    "<i4": np.int32,
    "|u1": np.uint8,
    "|b1": np.bool_,
}


class DistCheckpoint:
    """A Megatron dist checkpoint folder inside `source` (torch_dist or zarr backend)."""

    def __init__(self, source: Source, folder: str):
        self.source, self.folder = source, folder.strip("/")
        self.where = f"{source.path}:{self.folder}" if source.is_tar else str(source.path / folder)
        meta_rel = f"{self.folder}/metadata.json"
        if not source.exists(meta_rel):
            raise NemoError(f"{self.where}: no metadata.json; not a dist checkpoint folder")
        try:
            self.metadata = json.loads(source.read_bytes(meta_rel))
        except json.JSONDecodeError as e:
            raise NemoError(f"{self.where}/metadata.json: not JSON ({e})") from None
        self.backend = self.metadata.get("sharded_backend")
        self.tensors: dict[str, TensorInfo] = {}
        self.objects: set[str] = set()  # bytes entries (e.g. `_extra_state/shard_0_2`)
        if self.backend == "torch_dist":
            self._read_torch_dist()
        elif self.backend == "zarr":
            self._read_zarr()
        else:
            raise NemoError(
                f"{self.where}/metadata.json: sharded_backend={self.backend!r} is not supported "
                "(torch_dist or zarr)"
            )

    def _rel(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder else name

    def _read_torch_dist(self) -> None:
        require_torch()
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        rel = self._rel(".metadata")
        if not self.source.exists(rel):
            raise NemoError(f"{self.where}: no .metadata file")
        try:
            with self.source.open(rel) as f:
                md = MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise NemoError(f"{self.where}/.metadata: cannot read ({e})") from None
        storage = {
            (idx.fqn, tuple(idx.offset) if idx.offset is not None else None): info
            for idx, info in md.storage_data.items()
        }
        for key, entry in md.state_dict_metadata.items():
            if isinstance(entry, BytesStorageMetadata):
                self.objects.add(key)
                continue
            chunks = []
            for c in entry.chunks:
                info = storage.get((key, tuple(c.offsets)))
                if info is None:
                    raise NemoError(f"{self.where}/.metadata: no storage entry for {key!r} chunk")
                if getattr(info, "transform_descriptors", None):
                    raise NemoError(
                        f"{self.where}: tensor {key!r} is stored with transforms "
                        f"{info.transform_descriptors} (not supported)"
                    )
                chunks.append(
                    Chunk(
                        tuple(c.offsets),
                        tuple(c.sizes),
                        info.relative_path,
                        info.offset,
                        info.length,
                    )
                )
            dtype = str(entry.properties.dtype).removeprefix("torch.")
            self.tensors[key] = TensorInfo(tuple(entry.size), dtype, tuple(chunks))
        self._storage = storage

    def _read_zarr(self) -> None:
        for name in self.source.list(self.folder):
            zarray = self._rel(f"{name}/.zarray")
            if not self.source.exists(zarray):
                if self.source.is_dir(self._rel(name)):
                    self.objects.add(name)  # sharded objects (extra state)
                continue
            meta = json.loads(self.source.read_bytes(zarray))
            if meta.get("compressor") is not None or meta.get("filters"):
                raise NemoError(
                    f"{self.where}/{name}: zarr compressor/filters {meta.get('compressor')} "
                    "are not supported (Megatron writes uncompressed arrays)"
                )
            if meta.get("order", "C") != "C" or meta.get("dtype") not in _ZARR_DTYPES:
                raise NemoError(
                    f"{self.where}/{name}/.zarray: dtype {meta.get('dtype')!r} / order "
                    f"{meta.get('order')!r} is not supported"
                )
            shape, chunk = tuple(meta["shape"]), tuple(meta["chunks"])
            sep = meta.get("dimension_separator", ".")
            dtype = np.dtype(_ZARR_DTYPES[meta["dtype"]])
            chunks = []
            for grid in np.ndindex(*[-(-s // c) for s, c in zip(shape, chunk, strict=True)]):
                offsets = tuple(g * c for g, c in zip(grid, chunk, strict=True))
                file = f"{name}/{sep.join(map(str, grid))}" if grid else f"{name}/0"
                nbytes = int(np.prod(chunk)) * dtype.itemsize
                chunks.append(Chunk(offsets, chunk, file, 0, nbytes))
            self.tensors[name] = TensorInfo(shape, dtype.name, tuple(chunks))

    def keys(self) -> set[str]:
        """Tensor keys (bytes entries excluded, see `objects`)."""
        return set(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        """Global shape of `key`."""
        return self.tensors[key].shape

    def read_common(self) -> Any:
        """`common.pt` (plain data, read weights-only), or None when absent."""
        rel = self._rel("common.pt")
        if not self.source.exists(rel):
            return None
        torch = require_torch()
        with self.source.open(rel) as f:
            return torch.load(f, map_location="cpu", weights_only=True)

    def _load_chunk(self, key: str, chunk: Chunk) -> np.ndarray:
        rel = self._rel(chunk.file)
        if self.backend == "zarr":
            info = self.tensors[key]
            if not self.source.exists(rel):
                raise NemoError(f"{self.where}: missing zarr chunk {chunk.file}")
            data = self.source.read_bytes(rel)
            dtype = np.dtype(_ZARR_DTYPES_BY_NAME[info.dtype])
            if len(data) != chunk.length:
                raise NemoError(
                    f"{self.where}/{chunk.file}: {len(data)} bytes, expected {chunk.length}"
                )
            return np.frombuffer(data, dtype).reshape(chunk.sizes)
        torch = require_torch()
        if not self.source.exists(rel):
            raise NemoError(f"{self.where}: missing file {chunk.file} (holds {key!r})")
        with self.source.open(rel) as f:
            f.seek(chunk.start)
            blob = f.read(chunk.length)
        if len(blob) != chunk.length:
            raise NemoError(f"{self.where}/{chunk.file}: truncated (tensor {key!r})")
        try:
            t = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
            raise NemoError(f"{self.where}/{chunk.file}: tensor {key!r} unreadable ({e})") from None
        return to_numpy(t)

    def read(self, key: str, layer: int | None = None) -> np.ndarray:
        """Tensor `key`, whole or (`layer`) its slice `[layer]` along the leading axis,
        assembled from the chunks that cover it."""
        info = self.tensors[key]
        shape = info.shape if layer is None else info.shape[1:]
        out = None
        covered = 0
        for c in info.chunks:
            if layer is not None and not c.offsets[0] <= layer < c.offsets[0] + c.sizes[0]:
                continue
            data = self._load_chunk(key, c)
            # Zarr edge chunks are stored whole; cut them to the tensor.
            limits = tuple(
                min(s, n - o) for s, n, o in zip(c.sizes, info.shape, c.offsets, strict=True)
            )
            data = data[tuple(slice(0, n) for n in limits)]
            if layer is not None:
                data = data[layer - c.offsets[0]]
                offsets, limits = c.offsets[1:], limits[1:]
            else:
                offsets = c.offsets
            if out is None:
                out = np.empty(shape, data.dtype)
            out[tuple(slice(o, o + n) for o, n in zip(offsets, limits, strict=True))] = data
            covered += data.size
        if out is None or covered != int(np.prod(shape)):
            raise NemoError(f"{self.where}: tensor {key!r} is not fully covered by its chunks")
        return out


_ZARR_DTYPES_BY_NAME = {np.dtype(v).name: v for v in _ZARR_DTYPES.values()}


def iter_files(source: Source, folder: str) -> Iterator[str]:
    """Relative paths of every file under `folder` (recursively)."""
    for name in source.list(folder):
        rel = f"{folder}/{name}" if folder else name
        if source.is_dir(rel):
            yield from iter_files(source, rel)
        else:
            yield rel
