"""NeMo 2 `context/io.json`: the fiddle graph NeMo rebuilds its model from.

NeMo 2 saves its TrainerContext (model, trainer, extra) with fiddle's JSON
serialization; `Call` describes one fiddle Config (a class or function and its
arguments) and `to_fiddle_json` writes the same object layout NeMo writes: `objects`
holding each Config with its BuildableTraverserMetadata, argument-name tuples and
dicts, leaves carrying their `<root>...` paths, and `refcounts`. `to_yaml_dict` gives
the human-readable `model.yaml` twin (`_target_` per Config).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class Call:
    """A fiddle Config of `target` ('module.name') with keyword arguments."""

    target: str
    kwargs: dict[str, Any]


@dataclasses.dataclass
class PyRef:
    """A reference to a Python object by name (a dtype, a function), not called."""

    target: str


def _pyref(target: str) -> dict[str, Any]:
    module, _, name = target.rpartition(".")
    return {"type": "pyref", "module": module, "name": name}


class _Writer:
    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def _name(self, base: str) -> str:
        self.counts[base] = self.counts.get(base, 0) + 1
        return f"{base}_{self.counts[base]}"

    def _tuple(self, names: list[str], tag: str) -> str:
        key = self._name("tuple")
        self.objects[key] = {
            "type": _pyref("builtins.tuple"),
            "items": [[f"Index(index={i})", n] for i, n in enumerate(names)],
            "metadata": None,
        }
        del tag
        return key

    def _empty_dict(self) -> str:
        key = self._name("dict")
        self.objects[key] = {
            "type": _pyref("builtins.dict"),
            "items": [],
            "metadata": {"type": _pyref("builtins.tuple"), "items": [], "metadata": None},
        }
        return key

    def value(self, v: Any, path: str) -> Any:
        if isinstance(v, Call):
            return {"type": "ref", "key": self.call(v, path)}
        if isinstance(v, PyRef):
            return {**_pyref(v.target), "paths": [path]}
        if isinstance(v, dict):
            key = self._name("dict")
            keys_tuple = self._tuple(list(v), "dict")
            self.objects[key] = {
                "type": _pyref("builtins.dict"),
                "items": [
                    [f"Key(key={k!r})", self.value(x, f"{path}[{k!r}]")] for k, x in v.items()
                ],
                "metadata": {"type": "ref", "key": keys_tuple},
                "paths": [path],
            }
            return {"type": "ref", "key": key}
        return {"type": "leaf", "value": v, "paths": [path]}

    def call(self, c: Call, path: str) -> str:
        names = list(c.kwargs)
        tuple_key = self._tuple(names, "args")
        tags, history = self._empty_dict(), self._empty_dict()
        meta_key = self._name("buildable_traverser_metadata")
        self.objects[meta_key] = {
            "type": _pyref("fiddle._src.config.BuildableTraverserMetadata"),
            "items": [
                ["Attr(name='fn_or_cls')", _pyref(c.target)],
                ["Attr(name='argument_names')", {"type": "ref", "key": tuple_key}],
                ["Attr(name='argument_tags')", {"type": "ref", "key": tags}],
                ["Attr(name='argument_history')", {"type": "ref", "key": history}],
            ],
            "metadata": _pyref("fiddle._src.config.BuildableTraverserMetadata"),
        }
        base = "".join(
            "_" + ch.lower() if ch.isupper() else ch for ch in c.target.rpartition(".")[2]
        )
        key = self._name(base.lstrip("_"))
        items = [[f"Attr(name={n!r})", self.value(v, f"{path}.{n}")] for n, v in c.kwargs.items()]
        self.objects[key] = {
            "type": _pyref("fiddle._src.config.Config"),
            "items": items,
            "metadata": {"type": "ref", "key": meta_key},
            "paths": [path],
        }
        return key


def to_fiddle_json(root: Call) -> str:
    """fiddle's JSON serialization of the Config tree `root` (NeMo's io.json)."""
    w = _Writer()
    key = w.call(root, "<root>")
    doc = {
        "root": {"type": "ref", "key": key},
        "objects": w.objects,
        "refcounts": dict.fromkeys(w.objects, 1),
        "version": "0.0.1",
    }
    return json.dumps(doc)


def to_yaml_dict(v: Any) -> Any:
    """`model.yaml` form of a Config tree: `_target_` plus arguments."""
    if isinstance(v, Call):
        return {"_target_": v.target, **{k: to_yaml_dict(x) for k, x in v.kwargs.items()}}
    if isinstance(v, PyRef):
        return {"_target_": v.target, "_call_": False}
    if isinstance(v, dict):
        return {k: to_yaml_dict(x) for k, x in v.items()}
    return v
