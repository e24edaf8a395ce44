"""Hugging Face PEFT LoRA adapters <-> the decoder's LoRA adapters (model/lora.py).

An adapter folder (what `peft.PeftModel.save_pretrained` writes for a
`LlavaForConditionalGeneration`):

    adapter_config.json          LoraConfig: r, lora_alpha, lora_dropout, target_modules, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in]
                                 base_model.model.<module>.lora_B.weight [out, r]
                                 base_model.model.<module path>.<tensor> for modules_to_save

`<module>` is e.g. `model.language_model.layers.3.self_attn.q_proj` (transformers 5;
`language_model.model.layers.3...` in the older layout). Our adapter of a projection
holds lora_a = lora_A.weight^T ([in, r], the input flattened as the kernel's) and
lora_b = lora_B.weight^T ([r, out]); the scale alpha / r is the same (`use_rslora`:
alpha / sqrt(r), read as alpha' = alpha * sqrt(r)). The projector, which trains fully
next to the adapters, travels as `modules_to_save=["multi_modal_projector"]`.

    peft_config_of(folder, cfg)        import: the PeftConfig an adapter folder describes
    adapter_entries(cfg, folder)       import: Entries for `weights.load_into`
    adapter_tensors(params, cfg)       export: PEFT's (key, array) of the adapters
    adapter_config(cfg, base)          export: adapter_config.json
(`convert/hf.py` and `convert/hf_export.py` add the projector with their own tables.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neva_jax.convert.weights import Entry, HFImportError, SafetensorsFolder
from neva_jax.model import lora
from neva_jax.model.neva import NevaConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# llava-hf module paths of the decoder layers and the projector, newest layout first.
LAYOUTS = (
    ("model.language_model.layers.", "model.multi_modal_projector."),
    ("language_model.model.layers.", "multi_modal_projector."),
)
PROJECTOR_MODULE = "multi_modal_projector"
_SUBMODULE = {"attn": "self_attn", "mlp": "mlp"}
# LoraConfig settings that change the adapter's function and that neva-jax does not have.
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    # LoRA variants that change what an adapter computes (PEFT marks them
    # `is_lora_variant`); plain LoRA would import their tensors and compute something else.
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_bdlora": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
}


def _variant_fields() -> dict[str, Any]:
    """PEFT's own list of LoRA variants, where this PEFT is installed (newer ones too)."""
    try:
        import dataclasses

        import peft
    except ImportError:
        return {}
    return {
        f.name: None if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(peft.LoraConfig)
        if f.metadata.get("is_lora_variant")
    }


def _plain(value: Any, plain: Any) -> bool:
    """Whether a config value is the option's no-op (0 is not None, as `0 == False` is)."""
    if value is None or (isinstance(value, dict | list) and not value):
        return True
    if isinstance(plain, bool) or isinstance(value, bool):
        return value is plain or value is False
    return value == plain


def _module_key(layers_prefix: str, layer: int, projection: str) -> str:
    part, _ = lora.PROJECTIONS[projection]
    return f"{PEFT_PREFIX}{layers_prefix}{layer}.{_SUBMODULE[part]}.{lora.HF_NAMES[projection]}"


# ---------------------------------------------------------------------------- import


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT LoRA folder, checked for what neva-jax can express."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise HFImportError(f"{folder}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise HFImportError(f"{path}: peft_type={config.get('peft_type')!r}; only LORA imports")
    for name, plain in {**_variant_fields(), **_UNSUPPORTED}.items():
        if not _plain(config.get(name, plain), plain):
            raise HFImportError(
                f"{path}: {name}={config[name]!r} is not supported; train with {name}={plain!r}"
            )
    extra = [m for m in config.get("modules_to_save") or () if m != PROJECTOR_MODULE]
    if extra:
        raise HFImportError(
            f"{path}: modules_to_save {extra[0]!r}; only {PROJECTOR_MODULE!r} has a place here"
        )
    return config


def _layout(keys: set[str], folder: Path) -> tuple[str, str]:
    for layers, projector in LAYOUTS:
        if any(k.startswith(PEFT_PREFIX + layers) for k in keys):
            return layers, projector
    raise HFImportError(
        f"{folder}: no LoRA tensor under {PEFT_PREFIX}{LAYOUTS[0][0]}; adapters on the language "
        "model's layers are all that imports"
    )


def peft_config_of(folder: str | Path, cfg: NevaConfig) -> lora.PeftConfig:
    """The `PeftConfig` of the adapters in `folder` for the base model `cfg`."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    keys = SafetensorsFolder(folder).keys()
    layers, _ = _layout(keys, folder)
    L = cfg.llm.num_layers
    found = []
    for p in lora.PROJECTIONS:
        have = [i for i in range(L) if _module_key(layers, i, p) + ".lora_A.weight" in keys]
        if have and len(have) < L:
            raise HFImportError(
                f"{folder}: {lora.HF_NAMES[p]} has adapters on {len(have)} of the {L} layers "
                f"(layers {', '.join(map(str, have[:8]))}{', ...' if len(have) > 8 else ''}; "
                f"target_modules={config.get('target_modules')!r}); neva-jax "
                "gives every layer of a targeted projection an adapter: train with a "
                "target_modules that matches all layers"
            )
        if have:
            found.append(p)
    path = folder / ADAPTER_CONFIG
    rank, alpha = config.get("r"), config.get("lora_alpha", 8)  # PEFT's default alpha
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise HFImportError(f"{path}: r={rank!r}; expected the LoRA rank, an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise HFImportError(f"{path}: lora_alpha={alpha!r}; expected a number > 0")
    alpha = float(alpha)
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # scale alpha / sqrt(r) as alpha' / r
    return lora.PeftConfig(
        scheme="lora",
        rank=rank,
        alpha=alpha,
        dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=tuple(lora.HF_NAMES[p] for p in found),
        a_init="kaiming",
    )


def adapter_entries(
    cfg: NevaConfig, folder: str | Path
) -> tuple[list[Entry], SafetensorsFolder, str | None]:
    """Entries of every adapter (stacked over layers), the folder's reader, and the
    projector's key prefix when the folder saved it (modules_to_save), else None.

    A tensor that is neither is an error naming it (e.g. adapters on the vision tower).
    """
    folder = Path(folder)
    reader = SafetensorsFolder(folder)
    keys = reader.keys()
    layers, projector = _layout(keys, folder)
    L, r = cfg.llm.num_layers, cfg.peft.rank
    entries = []
    for name in cfg.peft.projections:
        part, attr = lora.PROJECTIONS[name]
        a_key = _module_key(layers, 0, name) + ".lora_A.weight"
        if a_key not in keys:
            continue  # e.g. no gate in a non-gated MLP
        n_in, n_out = reader.shape(a_key)[1], reader.shape(a_key.replace("lora_A", "lora_B"))[0]
        for ours, theirs, shape in (
            ("lora_a", "lora_A", (n_in, r)),
            ("lora_b", "lora_B", (r, n_out)),
        ):
            entries.append(
                Entry(
                    path=("llm", "layers", part, attr, lora.ADAPTER, ours),
                    keys=tuple(f"{_module_key(layers, i, name)}.{theirs}.weight" for i in range(L)),
                    hf_shapes=(shape[::-1],) * L,
                    shape=(L, *shape),
                    stacked=True,
                    to_ours=lambda w: np.asarray(w).T,
                )
            )
    projector_prefix = PEFT_PREFIX + projector
    used = {k for e in entries for k in e.keys}
    stray = sorted(k for k in keys - used if not k.startswith(projector_prefix))
    if stray:
        hint = ""
        if any(part in k for k in stray for part in ("vision_tower", "multi_modal_projector")):
            hint = (
                "; a plain list of module names in target_modules also matches the vision "
                "tower's (CLIP has q_proj, k_proj, v_proj too): LLaVA trains with a regex "
                r"such as '.*language_model.*\.(q_proj|k_proj|v_proj)'"
            )
        raise HFImportError(
            f"{folder}: tensor {stray[0]!r} has no place in the model ({len(stray)} in all); "
            "adapters go on the language model's q/k/v/o/gate/up/down projections of every "
            f"layer{hint}"
        )
    has_projector = any(k.startswith(projector_prefix) for k in keys)
    return entries, reader, projector_prefix if has_projector else None


# ---------------------------------------------------------------------------- export


def adapter_tensors(params: Mapping[str, Any], cfg: NevaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT key, array) of every adapter, in the newest llava-hf layout."""
    layers_prefix = LAYOUTS[0][0]
    layer_params = params["llm"]["layers"]
    for name in cfg.peft.projections:
        part, attr = lora.PROJECTIONS[name]
        dense = layer_params[part].get(attr)
        if dense is None or lora.ADAPTER not in dense:
            continue
        a = np.asarray(dense[lora.ADAPTER]["lora_a"])  # [L, in, r]
        b = np.asarray(dense[lora.ADAPTER]["lora_b"])  # [L, r, out]
        for i in range(cfg.llm.num_layers):
            key = _module_key(layers_prefix, i, name)
            yield f"{key}.lora_A.weight", np.ascontiguousarray(a[i].T)
            yield f"{key}.lora_B.weight", np.ascontiguousarray(b[i].T)


def projector_key(key: str) -> str:
    """The PEFT key (modules_to_save) of a llava-hf `multi_modal_projector.*` key."""
    return PEFT_PREFIX + LAYOUTS[0][1] + key.split(".", 1)[1]


def adapter_config(cfg: NevaConfig, base: str = "") -> dict[str, Any]:
    """adapter_config.json for `peft.PeftModel.from_pretrained(llava_hf_model, folder)`.

    `target_modules` is a regular expression over the language model's layers only (a
    plain name list would also put adapters on the CLIP tower's q/k/v_proj).
    """
    names = "|".join(lora.HF_NAMES[p] for p in cfg.peft.projections)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base or None,
        "r": cfg.peft.rank,
        "lora_alpha": cfg.peft.scale * cfg.peft.rank,
        "lora_dropout": cfg.peft.dropout,
        "target_modules": rf".*language_model.*\.layers\.\d+\.(self_attn|mlp)\.({names})",
        "modules_to_save": [PROJECTOR_MODULE],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
