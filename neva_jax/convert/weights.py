"""Reading Hugging Face safetensors folders and placing their tensors onto device shards.

Key tables (convert/hf_llama.py, convert/hf_clip.py) become `Entry`s: one parameter
of our tree and the HF tensor(s) it is built from. `check_keys` is the strict check
(every expected key present with its shape, every stored key used or known unused);
`load_into` builds a module from an abstract state (`sharding.abstract_state`), assembling
every parameter shard by shard from memory-mapped files straight onto its devices,
so host memory never holds a second copy of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util

from neva_jax.convert import hf_llama


class HFImportError(ValueError):
    """An unusable Hugging Face folder; the message is one line naming the key or file."""


# ---------------------------------------------------------------------------- reading

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def pickled_hint(folder: Path, name: str) -> str:
    """The error for a folder with only pickled weights, with the one-time conversion:
    for a PEFT adapter (`adapter_model.bin`) its tensors re-saved, else the model's."""
    head = f"{folder}: only pickled weights ({name}); neva-jax reads safetensors only. "
    if name.startswith("adapter_model"):
        return head + (
            "Convert once in Python (PEFT reads either file): import torch; "
            "from safetensors.torch import save_file; "
            f"save_file(torch.load('{folder / name}'), '{folder / 'adapter_model.safetensors'}')"
        )
    return head + (
        "Convert once in Python: model = <its transformers class>.from_pretrained(SRC); "
        "model.save_pretrained(DST, safe_serialization=True)"
    )


class SafetensorsFolder:
    """The safetensors tensors of a folder (single file or sharded with an index).

    Tensors are memory-mapped: `get(key)` returns a read-only view that reads from
    disk only what is used. Read directly from the documented file format (8-byte
    header length, JSON header, data) because safetensors' numpy backend has no
    bfloat16.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise HFImportError(f"{self.path}: not a folder")
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            pickled = sorted(
                p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")
            )
            if pickled:
                raise HFImportError(pickled_hint(self.path, pickled[0]))
            raise HFImportError(f"{self.path}: no *.safetensors weights found")
        self._where: dict[str, tuple[np.memmap, int, int, np.dtype, tuple[int, ...], str]] = {}
        for name in files:
            self._read_header(name)

    def _read_header(self, name: str) -> None:
        file = self.path / name
        if not file.exists():
            raise HFImportError(f"{file}: listed in model.safetensors.index.json but missing")
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + n > size:
                raise HFImportError(f"{file}: truncated or not a safetensors file ({size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise HFImportError(f"{file}: not a safetensors file (header: {e})") from None
        data = np.memmap(file, dtype=np.uint8, mode="r")
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            if key in self._where:
                raise HFImportError(f"{file}: tensor {key!r} also appears in {self._where[key][5]}")
            if meta["dtype"] not in _DTYPES:
                raise HFImportError(f"{file}: tensor {key!r} has unsupported dtype {meta['dtype']}")
            start, end = meta["data_offsets"]
            dtype = np.dtype(_DTYPES[meta["dtype"]])
            if 8 + n + end > size or end - start != math.prod(meta["shape"]) * dtype.itemsize:
                raise HFImportError(
                    f"{file}: truncated or damaged (tensor {key!r} is bytes {8 + n + start}.."
                    f"{8 + n + end} of a {size}-byte file); download or save it again"
                )
            self._where[key] = (data, 8 + n + start, 8 + n + end, dtype, tuple(meta["shape"]), name)

    def keys(self) -> set[str]:
        """All tensor names."""
        return set(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of `key`."""
        return self._where[key][4]

    def get(self, key: str) -> np.ndarray:
        """A read-only memory-mapped view of tensor `key`."""
        data, start, end, dtype, shape, _ = self._where[key]
        return data[start:end].view(dtype).reshape(shape)


@contextlib.contextmanager
def written_folder(out: Path) -> Iterator[Path]:
    """A fresh `.OUT.partial` folder next to `out` to write into: renamed to `out` (absent
    or empty) when the block completes, removed when it fails or refuses, so `out` is
    never half-written and nothing is left behind."""
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def check_tokenizer_folder(tokenizer: str | Path | None) -> None:
    """A `--tokenizer` given to a converter names a Hugging Face tokenizer folder; anything
    else is a ValueError naming it, before any weights are read (None: not given)."""
    if tokenizer is None:
        return
    if not Path(tokenizer).is_dir():
        raise ValueError(f"--tokenizer {tokenizer}: not a folder (a Hugging Face tokenizer)")
    files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((Path(tokenizer) / f).is_file() for f in files):
        raise ValueError(
            f"--tokenizer {tokenizer}: no tokenizer files in it ({', '.join(files)}); "
            "name the folder a tokenizer's save_pretrained wrote"
        )


def read_hf_config(path: str | Path, model_types: Iterable[str]) -> dict[str, Any]:
    """config.json of `path`, completed with `transformers`' defaults, as a dict."""
    import transformers

    path = Path(path)
    if not path.is_dir():
        raise HFImportError(f"{path}: not a folder")
    if not (path / "config.json").exists():
        raise HFImportError(f"{path}: no config.json")
    try:
        d = transformers.AutoConfig.from_pretrained(str(path)).to_dict()
    except (ValueError, KeyError, OSError) as e:
        raise HFImportError(f"{path / 'config.json'}: {str(e).splitlines()[0]}") from None
    if d.get("model_type") not in model_types:
        raise HFImportError(
            f"{path / 'config.json'}: model_type={d.get('model_type')!r}, expected one of {sorted(model_types)}"
        )
    return d


# ---------------------------------------------------------------------------- key tables


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter of the Neva tree and how to build it from HF tensors.

    Stacked entries (a leading layers axis) take one key per layer through
    `to_ours`; the others pass all their keys' tensors to `combine`.
    """

    path: tuple[str, ...]
    keys: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    shape: tuple[int, ...]
    stacked: bool = False
    to_ours: Callable[[np.ndarray], np.ndarray] | None = None
    combine: Callable[[list[np.ndarray]], np.ndarray] | None = None


def entries_from(table: list[hf_llama.ParamMapping], prefix: tuple[str, ...]) -> list[Entry]:
    """Entries for a `ParamMapping` table whose paths live under `prefix`."""
    out = []
    for m in table:
        layer_shape = m.shape[1:] if m.stacked else m.shape
        hf_shape = m.to_hf(np.zeros(layer_shape, np.int8)).shape
        out.append(
            Entry(
                path=prefix + m.path,
                keys=m.hf_keys,
                hf_shapes=(hf_shape,) * len(m.hf_keys),
                shape=m.shape,
                stacked=m.stacked,
                to_ours=m.to_ours,
                combine=(lambda ts, f=m.to_ours: f(ts[0])),
            )
        )
    return out


def grow_vocab(entry: Entry, vocab: int, axis: int) -> Entry:
    """`entry` (an embedding or LM head) with `vocab` rows along `axis`; new rows = mean."""
    base = entry.combine

    def combine(ts: list[np.ndarray]) -> np.ndarray:
        w = np.asarray(base(ts), np.float32)
        mean = w.astype(np.float64).mean(axis=axis, keepdims=True).astype(np.float32)
        extra = np.repeat(mean, vocab - w.shape[axis], axis=axis)
        return np.concatenate([w, extra], axis=axis)

    shape = list(entry.shape)
    shape[axis] = vocab
    return dataclasses.replace(entry, shape=tuple(shape), combine=combine)


def check_keys(entries: list[Entry], reader: SafetensorsFolder, unused: set[str]) -> None:
    """Strict check: every key present with its shape; every stored key used or known unused."""
    expected: set[str] = set()
    for e in entries:
        for key, shape in zip(e.keys, e.hf_shapes, strict=True):
            if key not in reader.keys():  # noqa: SIM118
                missing = sorted({k for e2 in entries for k in e2.keys} - reader.keys())
                raise HFImportError(
                    f"{reader.path}: missing tensor {key!r} ({len(missing)} missing in all)"
                )
            if reader.shape(key) != tuple(shape):
                raise HFImportError(
                    f"{reader.path}: tensor {key!r} has shape {reader.shape(key)}, "
                    f"config.json implies {tuple(shape)}"
                )
            expected.add(key)
    unexpected = sorted(reader.keys() - expected - unused)
    if unexpected:
        raise HFImportError(
            f"{reader.path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all)"
        )


# ---------------------------------------------------------------------------- placement


def place(entry: Entry, reader: SafetensorsFolder, target: jax.ShapeDtypeStruct) -> jax.Array:
    """Builds one parameter on its devices, reading per shard what that shard needs."""
    if tuple(target.shape) != entry.shape:
        raise HFImportError(
            f"{'/'.join(entry.path)}: table shape {entry.shape} != model {target.shape}"
        )
    dtype = target.dtype
    if entry.stacked:

        def shard(index: tuple[slice, ...]) -> np.ndarray:
            layers = range(entry.shape[0])[index[0]]
            parts = [
                np.asarray(entry.to_ours(reader.get(entry.keys[i]))[index[1:]], dtype)
                for i in layers
            ]
            return np.stack(parts)

    else:
        full = entry.combine([reader.get(k) for k in entry.keys])

        def shard(index: tuple[slice, ...]) -> np.ndarray:
            return np.array(full[index], dtype=dtype, copy=True)

    return jax.make_array_from_callback(entry.shape, target.sharding, shard)


def load_into(
    graphdef: nnx.GraphDef,
    abstract: nnx.State,
    sources: list[tuple[list[Entry], SafetensorsFolder]],
    fresh: dict[str, nnx.Module] | None = None,
) -> Any:
    """The module of (graphdef, abstract) with every parameter built from `sources`, or
    taken from the `fresh` submodules (e.g. a new projector); a parameter that nothing
    covers is an internal error."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(abstract))
    for name, module in (fresh or {}).items():
        for path, value in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(module))).items():
            flat[(name, *path)] = value
    for entries, reader in sources:
        for e in entries:
            if e.path not in flat:
                raise HFImportError(
                    f"internal: the key table names {'/'.join(e.path)}, not in the model"
                )
            flat[e.path] = place(e, reader, flat[e.path])
    left = sorted(
        "/".join(map(str, p)) for p, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)
    )
    if left:
        raise HFImportError(f"internal: no source for parameter {left[0]} ({len(left)} in all)")
    nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict(flat))
    return nnx.merge(graphdef, abstract)
