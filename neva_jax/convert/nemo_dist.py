"""Tensor storage inside a NeMo checkpoint, read without NeMo or Megatron: Megatron dist
checkpoints (torch_dist or zarr) and pickled `model_weights.ckpt` state dicts.

- `DistCheckpoint`: a dist checkpoint folder (`metadata.json`, `common.pt`, `.metadata` +
  `__R_S.distcp` for torch_dist, or one `.zarray` folder per tensor for zarr).
  `.metadata` is unpickled by `MetadataUnpickler`, which allows only
  torch.distributed.checkpoint's metadata classes (Megatron's `MCoreMetadata` /
  `MCoreSavePlan` are read as torch's `Metadata` / `SavePlan`), so no foreign code runs.
  Each stored chunk is a `torch.save`d tensor read with `torch.load(weights_only=True)`.
- `load_state_dict`: a pickled state dict (`model_weights.ckpt`), read with
  `weights_only=True` (TE's `io.BytesIO` extra state allowed) unless the caller
  explicitly allows full unpickling.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from neva_jax.convert.nemo_io import NemoError, Source, require_torch, to_numpy

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
