"""Canonical tensor readers of a NeMo checkpoint's weights, with tensor- and
pipeline-parallel shards merged.

- `DistTensors`: a dist checkpoint (tensor-parallel independent: every tensor global),
  its stacked `decoder.layers.X` tensors seen one layer at a time.
- `RankTensors`: pickled state dicts, one per (tp, pp) rank (`mp_rank_XX/`,
  `tp_rank_XX_pp_rank_YYY/`), merged by each name's split rule (`merge_rule`, from
  NeMo's megatron_change_num_partitions): column-parallel (qkv, fc1, the vocabulary)
  on dim 0, each rank's gated fc1 being its own cat(gate_r, up_r); row-parallel
  (linear_proj, fc2) on dim 1; everything else replicated. Pipeline stages number
  their layers from 0 and hold equal shares.

Both speak canonical names (convert/nemo_keys.py): `keys()`, `shape(key)`, `get(key)`,
`stored(key)` (the stored name, for messages). `Subset` restricts a reader to some
prefixes; `check_entries` is the strict check of a reader against a key table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neva_jax.convert.nemo_dist import DistCheckpoint
from neva_jax.convert.nemo_io import NemoError, to_numpy
from neva_jax.convert.nemo_keys import LAYER_KEY, canonical, is_extra_state, strip_prefix
from neva_jax.convert.weights import Entry


def merge_rule(name: str, gated: bool) -> str:
    """How tensor-parallel ranks of canonical `name` combine: cat0 | cat1 | glu | rep."""
    if name.startswith(("vision_tower.", "projector.")):
        return "rep"
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return "cat0"
    if (".linear_qkv." in name and "layer_norm" not in name) or ".linear_fc1_up." in name:
        return "cat0"
    if ".linear_fc1." in name and "layer_norm" not in name:
        return "glu" if gated else "cat0"
    if name.endswith((".linear_proj.weight", ".linear_fc2.weight")):
        return "cat1"
    return "rep"


def merge_ranks(parts: list[np.ndarray], rule: str) -> np.ndarray:
    """One tensor from its tensor-parallel `parts` (rank order) under `rule`."""
    if rule == "rep" or len(parts) == 1:
        return parts[0]
    if rule == "cat1":
        return np.concatenate(parts, axis=1)
    if rule == "glu":  # each rank holds cat(gate_r, up_r)
        halves = [np.split(p, 2, axis=0) for p in parts]
        return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
    return np.concatenate(parts, axis=0)


class DistTensors:
    """Canonical, per-layer view of a dist checkpoint (layers stacked on a leading axis)."""

    def __init__(self, dist: DistCheckpoint):
        self.dist, self.path = dist, Path(dist.where)
        self.prefix = strip_prefix(set(dist.tensors) | dist.objects)
        self._where: dict[str, tuple[str, int | None]] = {}
        for stored in dist.tensors:
            if is_extra_state(stored):
                continue
            name = canonical(stored[len(self.prefix) :])
            if name.startswith("decoder.layers.") and not LAYER_KEY.match(name):
                rest = name[len("decoder.layers.") :]
                for i in range(dist.shape(stored)[0]):
                    self._where[f"decoder.layers.{i}.{rest}"] = (stored, i)
            else:
                self._where[name] = (stored, None)

    def keys(self) -> set[str]:
        """Canonical per-layer names."""
        return set(self._where)

    def stored(self, key: str) -> str:
        """The stored key behind canonical `key` (for messages)."""
        return self._where[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of canonical `key` (one layer's for stacked tensors)."""
        stored, layer = self._where[key]
        shape = self.dist.shape(stored)
        return shape if layer is None else shape[1:]

    def get(self, key: str) -> np.ndarray:
        """Tensor of canonical `key` (one layer's for stacked tensors)."""
        stored, layer = self._where[key]
        return self.dist.read(stored, layer)


class RankTensors:
    """Canonical view of pickled state dicts, one per (tp, pp) rank, merged by rule.

    Pipeline stages number their layers from 0; stage p's layer j is layer
    p * (num_layers / pp) + j.
    """

    def __init__(
        self,
        ranks: Mapping[tuple[int, int], Mapping[str, Any]],
        where: Path,
        *,
        num_layers: int,
        gated: bool,
    ):
        self.path = where
        self.gated = gated
        tps = sorted({t for t, _ in ranks})
        pps = sorted({p for _, p in ranks})
        if len(ranks) != len(tps) * len(pps):
            raise NemoError(f"{where}: tensor/pipeline rank folders do not form a full grid")
        if num_layers % len(pps):
            raise NemoError(
                f"{where}: num_layers={num_layers} is not divisible by {len(pps)} stages"
            )
        per_stage = num_layers // len(pps)
        self.tp = len(tps)
        self._ranks = ranks
        self._where: dict[str, tuple[int, str]] = {}  # canonical -> (pp, stored key)
        all_keys = [k for sd in ranks.values() for k in sd]
        self.prefix = strip_prefix(all_keys)
        for (tp, pp), sd in ranks.items():
            if tp != tps[0]:
                continue
            for stored in sd:
                if is_extra_state(stored):
                    continue
                name = canonical(stored[len(self.prefix) :])
                m = LAYER_KEY.match(name)
                if m:
                    name = f"decoder.layers.{pp * per_stage + int(m.group(1))}.{m.group(2)}"
                self._where.setdefault(name, (pp, stored))

    def keys(self) -> set[str]:
        """Canonical per-layer names."""
        return set(self._where)

    def stored(self, key: str) -> str:
        """The stored key behind canonical `key` (for messages)."""
        return self._where[key][1]

    def _parts(self, key: str) -> list[Any]:
        pp, stored = self._where[key]
        parts = []
        for tp in range(self.tp):
            sd = self._ranks[(tp, pp)]
            if stored not in sd:
                raise NemoError(f"{self.path}: tensor {stored!r} missing from tp rank {tp}")
            parts.append(sd[stored])
        return parts

    def shape(self, key: str) -> tuple[int, ...]:
        """Merged shape of canonical `key`."""
        parts = self._parts(key)
        shape = list(parts[0].shape)
        rule = merge_rule(key, self.gated)
        if rule in ("cat0", "glu") and len(parts) > 1:
            shape[0] = sum(p.shape[0] for p in parts)
        elif rule == "cat1" and len(parts) > 1:
            shape[1] = sum(p.shape[1] for p in parts)
        return tuple(shape)

    def get(self, key: str) -> np.ndarray:
        """The merged tensor of canonical `key`."""
        parts = [to_numpy(p) for p in self._parts(key)]
        return merge_ranks(parts, merge_rule(key, self.gated))


# ---------------------------------------------------------------------------- checks


class Subset:
    """A reader's view restricted to keys with (`include`) or without (`exclude`) prefixes."""

    def __init__(
        self, reader: Any, *, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
    ):
        self._r, self._in, self._out, self.path = reader, include, exclude, reader.path

    def keys(self) -> set[str]:
        """The kept canonical names."""
        return {
            k
            for k in self._r.keys()  # noqa: SIM118 (a reader, not a dict)
            if (not self._in or k.startswith(self._in)) and not k.startswith(self._out or ("\0",))
        }

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of canonical `key`."""
        return self._r.shape(key)

    def stored(self, key: str) -> str:
        """The stored key behind canonical `key` (for messages)."""
        return getattr(self._r, "stored", lambda k: k)(key)


def check_entries(entries: list[Entry], reader: Any, unused: set[str], config_file: str) -> None:
    """Every key present with the shape the config implies; every stored tensor used."""
    have = reader.keys()
    stored = getattr(reader, "stored", lambda k: k)
    for e in entries:
        for key, shape in zip(e.keys, e.hf_shapes, strict=True):
            if key not in have:
                raise NemoError(f"{reader.path}: missing tensor {key!r}")
            if tuple(reader.shape(key)) != tuple(shape):
                raise NemoError(
                    f"{reader.path}: tensor {stored(key)!r} has shape {tuple(reader.shape(key))}, "
                    f"{config_file} implies {tuple(shape)}"
                )
    expected = {k for e in entries for k in e.keys}
    extra = sorted(have - expected - unused)
    if extra:
        raise NemoError(
            f"{reader.path}: unexpected tensor {stored(extra[0])!r} ({len(extra)} in all)"
        )
