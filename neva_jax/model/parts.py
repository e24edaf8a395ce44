"""A model's top-level parts (`vision`, `projector`, `llm`) as pure nested dicts.

Training freezes by part: `split_model` splits a model once into the parameters that
train and those that stay frozen (plus any other variables), as nested dicts of
arrays, the form that `jax.jit`, optax and Orbax all take; `merge_model` rebuilds the
module inside a jitted function. `merge_dicts`/`split_dict` do the same to plain
parameter dicts (a checkpoint holds all parameters in one tree).

A part is a top-level submodule, or `ADAPTERS` (`lora`): the LoRA adapters wherever
they are (model/lora.py), whose base weights stay frozen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx

ADAPTERS = "lora"  # the part made of every LoRA adapter (the path element `lora`)


def is_trained(path: Sequence[Any], parts: Sequence[str]) -> bool:
    """Whether the parameter at `path` belongs to one of `parts` (see the module doc)."""
    names = [str(p) for p in path]
    return bool(names) and (names[0] in parts or (ADAPTERS in parts and ADAPTERS in names))


def trainable_filter(parts: Sequence[str]) -> nnx.filterlib.Filter:
    """An NNX filter selecting the `nnx.Param`s of `parts`."""
    parts = tuple(parts)

    def in_parts(path: tuple[Any, ...], _value: Any) -> bool:
        return is_trained(path, parts)

    return nnx.All(nnx.Param, in_parts)


def split_model(model: nnx.Module, parts: Sequence[str]) -> tuple[nnx.GraphDef, dict, dict, dict]:
    """Splits a model into (graphdef, trained params, frozen params, other variables).

    The three states come back as pure nested dicts (arrays at the leaves), the form
    that the jitted step, optax and Orbax all take; `merge_model` rebuilds the model.
    """
    graphdef, trained, frozen, other = nnx.split(model, trainable_filter(parts), nnx.Param, ...)
    return graphdef, *(nnx.to_pure_dict(s) for s in (trained, frozen, other))


def merge_model(graphdef: nnx.GraphDef, *states: Mapping[str, Any]) -> nnx.Module:
    """Rebuilds a model from its graphdef and pure-dict states (inverse of `split_model`)."""
    return nnx.merge(graphdef, *(dict(s) for s in states))


def merge_dicts(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merges two nested dicts with disjoint leaves (trained + frozen = all params)."""
    out = dict(a)
    for k, v in b.items():
        if k in out and isinstance(out[k], Mapping) and isinstance(v, Mapping):
            out[k] = merge_dicts(out[k], v)
        elif k in out:
            raise ValueError(f"parameter {k!r} is both trained and frozen")
        else:
            out[k] = v
    return out


def split_dict(
    tree: Mapping[str, Any], parts: Sequence[str], _path: tuple[str, ...] = ()
) -> tuple[dict, dict]:
    """Splits a full nested parameter dict into (trained, frozen) by `parts`."""
    trained, frozen = {}, {}
    for k, v in tree.items():
        path = (*_path, k)
        if is_trained(path, parts):
            trained[k] = v
        elif isinstance(v, Mapping) and ADAPTERS in parts:
            t, f = split_dict(v, parts, path)
            if t:
                trained[k] = t
            if f:
                frozen[k] = f
        else:
            frozen[k] = v
    return trained, frozen
