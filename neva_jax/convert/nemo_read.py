"""Reading a NeMo checkpoint: its config, a canonical reader of its weights, its
tokenizer and (NeVA) what the multimodal parts need: `read_checkpoint(source) -> NemoParts`.

- NeMo 1 (`model_config.yaml`): weights from `model_weights/` (dist checkpoint),
  `model_weights.ckpt`, `mp_rank_XX/` or `tp_rank_XX_pp_rank_YYY/` state dicts; the
  tokenizer from its `nemo:` artifact; `mm_cfg` for NeVA.
- NeMo 2 (`context/` + `weights/`): `context/model.yaml`, `context/nemo_tokenizer/`;
  LLaVA's `language_transformer_config` / `vision_transformer_config` /
  `vision_projection_config`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from neva_jax.convert import nemo_config
from neva_jax.convert.nemo_dist import DistCheckpoint, load_state_dict
from neva_jax.convert.nemo_io import NemoError, Source, iter_files
from neva_jax.convert.nemo_merge import DistTensors, RankTensors
from neva_jax.convert.nemo_tokenizer import DEFAULT_MEDIA, MEDIA_TOKENS, nemo1_tokenizer
from neva_jax.data.conversation import IMAGE_PLACEHOLDER

_GELU = "torch.nn.functional.gelu"
_RANK_DIR = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))$")


@dataclasses.dataclass
class NemoParts:
    """What one checkpoint contributes."""

    where: str
    llm: nemo_config.LlmSpec | None
    reader: Any  # DistTensors | RankTensors
    tokenizer: Any | None
    neva: dict[str, Any] | None  # projector, vision fields, media tokens


def _yaml(source: Source, rel: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(source.read_bytes(rel))
    except yaml.YAMLError as e:
        raise NemoError(f"{source.path}/{rel}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise NemoError(f"{source.path}/{rel}: not a mapping")
    return data


def _weights(source: Source, cfg_llm: nemo_config.LlmSpec | None, *, allow_pickle: bool) -> Any:
    """The canonical tensor reader of a NeMo 1 checkpoint's weights."""
    if source.is_dir("model_weights"):
        return DistTensors(DistCheckpoint(source, "model_weights"))
    ranks: dict[tuple[int, int], Any] = {}
    if source.exists("model_weights.ckpt"):
        ranks[(0, 0)] = load_state_dict(source, "model_weights.ckpt", allow_pickle=allow_pickle)
    for name in source.list(""):
        m = _RANK_DIR.match(name)
        if m and source.exists(f"{name}/model_weights.ckpt"):
            tp, pp = (int(m.group(1)), 0) if m.group(1) else (int(m.group(2)), int(m.group(3)))
            ranks[(tp, pp)] = load_state_dict(
                source, f"{name}/model_weights.ckpt", allow_pickle=allow_pickle
            )
    if not ranks:
        raise NemoError(
            f"{source.path}: no weights (model_weights/, model_weights.ckpt, mp_rank_XX/ or "
            "tp_rank_XX_pp_rank_YYY/)"
        )
    layers = cfg_llm.config.num_layers if cfg_llm else 1
    gated = bool(cfg_llm and cfg_llm.config.activation == "swiglu")
    return RankTensors(ranks, source.path, num_layers=layers, gated=gated)


def _member_finder(source: Source):
    def find(ref: str, workdir: Path) -> Path | None:
        name = ref.removeprefix("nemo:")
        hits = [
            n
            for n in _all_files(source)
            if n == name or n.endswith("/" + name) or n.endswith("_" + name)
        ]
        if not hits and ref.startswith("nemo:"):
            hits = [n for n in _all_files(source) if n.endswith(name)]
        if hits:
            return source.extract(hits[0], workdir / Path(hits[0]).name)
        return Path(ref) if Path(ref).exists() else None

    return find


def _all_files(source: Source) -> list[str]:
    return list(iter_files(source, ""))


def _read_nemo1(source: Source, workdir: Path, *, allow_pickle: bool) -> NemoParts:
    where = f"{source.path}:model_config.yaml"
    cfg = _yaml(source, "model_config.yaml")
    llm = nemo_config.llm_from_nemo1(cfg, where)
    reader = _weights(source, llm, allow_pickle=allow_pickle)
    tokenizer = nemo1_tokenizer(cfg.get("tokenizer") or {}, _member_finder(source), workdir, where)
    neva = None
    mm = cfg.get("mm_cfg")
    if mm:
        venc = mm.get("vision_encoder") or {}
        if venc.get("from_hf") is False:
            raise NemoError(
                f"{where}: mm_cfg.vision_encoder.from_hf=False (a NeMo CLIP) is not supported"
            )
        feature = venc.get("vision_select_feature", "patch")
        if feature not in ("patch", "cls_patch"):
            raise NemoError(
                f"{where}: mm_cfg.vision_encoder.vision_select_feature={feature!r} is not supported"
            )
        kind = mm.get("mm_mlp_adapter_type", "linear")
        neva = dict(
            projector=kind,
            projector_bias=True,
            projector_ffn=None,
            vision_name=venc.get("from_pretrained"),
            vision_hidden=venc.get("hidden_size"),
            select_layer=int(venc.get("vision_select_layer", -2)),
            class_token_length=0
            if feature == "cls_patch"
            else int(venc.get("class_token_length", 1)),
            use_im_start_end=bool(mm.get("use_im_start_end", False)),
            media=MEDIA_TOKENS.get((mm.get("llm") or {}).get("model_type"), DEFAULT_MEDIA),
            llm_name=(mm.get("llm") or {}).get("from_pretrained"),
            **nemo_config.conversation_from_nemo1(
                cfg.get("data") or {}, (mm.get("llm") or {}).get("model_type")
            ),
        )
    return NemoParts(str(source.path), llm, reader, tokenizer, neva)


def _read_nemo2(source: Source, *, allow_pickle: bool) -> NemoParts:
    del allow_pickle  # NeMo 2 weights are never pickled
    import transformers

    where = f"{source.path}/context/model.yaml"
    if not source.exists("context/model.yaml"):
        raise NemoError(f"{source.path}: no context/model.yaml")
    top = _yaml(source, "context/model.yaml")
    cfg = top.get("config") or {}
    neva = None
    if "language_transformer_config" in cfg:
        llm_cfg = cfg["language_transformer_config"]
        vis = cfg.get("vision_transformer_config") or {}
        proj = cfg.get("vision_projection_config") or {}
        kind = proj.get("projector_type", "mlp2x_gelu")
        if kind == "mcore_mlp":  # Megatron's MLP: fc1, activation_func, fc2
            func = (proj.get("activation_func") or {}).get("_target_", _GELU)
            if func != _GELU or proj.get("gated_linear_unit", False):
                raise NemoError(
                    f"{where}: vision_projection_config: an mcore_mlp projector with "
                    f"activation_func={func!r}, gated_linear_unit="
                    f"{proj.get('gated_linear_unit', False)} is not supported (GELU, not gated)"
                )
            kind = "mlp2x_gelu"
        elif kind == "mlp1x_gelu":
            kind = "linear"
        neva = dict(
            projector=kind,
            projector_bias=bool(proj.get("bias", True)),
            projector_ffn=proj.get("ffn_hidden_size"),
            vision_name=vis.get("pretrained_model_name_or_path"),
            vision_hidden=vis.get("hidden_size"),
            select_layer=int(cfg.get("vision_feature_layer", -2)),
            class_token_length=1 if cfg.get("drop_vision_class_token", True) else 0,
            use_im_start_end=False,
            media=(IMAGE_PLACEHOLDER, None, None),
            llm_name=cfg.get("language_model_from_pretrained"),
            context=source.path / "context",
        )
    else:
        llm_cfg = cfg
    llm = nemo_config.llm_from_nemo2(llm_cfg, where)
    reader = DistTensors(DistCheckpoint(source, "weights"))
    tokenizer = None
    if source.is_dir("context/nemo_tokenizer"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(source.path / "context/nemo_tokenizer")
        )
    return NemoParts(str(source.path), llm, reader, tokenizer, neva)


def read_checkpoint(source: Source, workdir: Path, *, allow_pickle: bool = False) -> NemoParts:
    """Config, weights reader and tokenizer of a NeMo checkpoint."""
    if source.exists("model_config.yaml"):
        return _read_nemo1(source, workdir, allow_pickle=allow_pickle)
    if source.is_dir("context") and source.is_dir("weights"):
        return _read_nemo2(source, allow_pickle=allow_pickle)
    raise NemoError(
        f"{source.path}: not a NeMo checkpoint (no model_config.yaml, nor context/ + weights/)"
    )
