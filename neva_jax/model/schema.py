"""What the model config dataclasses share: run-config keys, run-time rules, field errors.

`LlamaConfig`, `ClipConfig` and `NevaConfig` are the one schema of the architecture.
A field made with `key(default)` is also an experiment-config key, under NeMo's name
(the field's name): `model.llm.<name>` (LlamaConfig), `model.vision_encoder.<name>`
(ClipConfig) or `model.<name>` (NevaConfig). `neva_jax.config` reads these marks, so
adding a knob to the run config is adding (or marking) one field here in the model.

A bad value raises `FieldError`, which carries the section and field; the run config
turns it into a message that names its own key (e.g. `remat.policy` for the decoder's
`remat_policy`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from neva_jax.model.attention import ATTENTION_IMPLS

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "selective")
_KEY = "run_config_key"


class FieldError(ValueError):
    """A bad model config value: `section.field=value: problem` (one line)."""

    def __init__(self, section: str, field: str, value: Any, problem: str):
        self.section, self.field, self.value, self.problem = section, field, value, problem
        super().__init__(f"{section}.{field}={value!r}: {problem}")


def key(default: Any) -> Any:
    """A dataclass field with `default` that experiment configs set (see the module doc)."""
    return dataclasses.field(default=default, metadata={_KEY: True})


def keys(cls: type) -> tuple[str, ...]:
    """The fields of dataclass `cls` made with `key()`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(_KEY))


def check_choice(section: str, cfg: Any, field: str, allowed: tuple[str, ...]) -> None:
    """Raises FieldError unless `cfg.<field>` is one of `allowed`."""
    value = getattr(cfg, field)
    if value not in allowed:
        raise FieldError(section, field, value, f"expected one of {', '.join(allowed)}")


def check_runtime(section: str, cfg: Any) -> None:
    """The rules of the run-time fields that LlamaConfig and ClipConfig both carry."""
    for name in ("dtype", "param_dtype"):
        check_choice(section, cfg, name, DTYPES)
    check_choice(section, cfg, "attention_impl", ATTENTION_IMPLS)
    check_choice(section, cfg, "remat_policy", REMAT_POLICIES)
