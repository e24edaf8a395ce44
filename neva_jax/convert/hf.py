"""Import Hugging Face folders (safetensors) into a `Neva` model, born sharded.

Two sources:
- a llava-hf `LlavaForConditionalGeneration` folder, in either key layout
  (`language_model.model.*` / `vision_tower[.vision_model].*` / `multi_modal_projector.*`
  on disk, or `model.language_model.*` / `model.vision_tower.*` /
  `model.multi_modal_projector.*` / `lm_head.*`): `import_llava`;
- a LLaMA folder plus a CLIP folder, with a freshly initialised projector (the
  stage-1 starting point): `import_llm_and_clip`. `<image>` (and `<pad>`) join the
  tokenizer; the embedding and LM head grow, new rows the mean of the old (LLaVA).

Every expected key must be present with the expected shape and every key in the
files must be used or known to be unused; errors are `HFImportError`s whose one-line
message names the key or file. The model is built abstractly and each parameter is
assembled shard by shard from memory-mapped files straight onto its devices
(convert/weights.py), so host memory never holds a second copy of the model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from neva_jax import sharding
from neva_jax.convert import hf_chat, hf_clip, hf_llama, hf_peft
from neva_jax.convert.weights import (
    Entry,
    HFImportError,
    SafetensorsFolder,
    check_keys,
    entries_from,
    grow_vocab,
    load_into,
    read_hf_config,
)
from neva_jax.model import clip, llama, neva
from neva_jax.model.clip import ClipConfig, ClipVisionTower
from neva_jax.model.neva import Neva, NevaConfig
from neva_jax.model.projector import Projector

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
VOCAB_MULTIPLE = 64  # grown vocabularies are padded to this (llava-hf: 32064)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def projector_entries(cfg: NevaConfig, prefix: str) -> list[Entry]:
    """Entries for llava-hf's `multi_modal_projector.linear_{1,2}` (a `linear` projector
    comes from `projector_hidden_act='linear'`: the two maps folded into one)."""
    E, D, bias = cfg.vision.hidden_size, cfg.llm.hidden_size, cfg.projector_bias
    w1, b1, w2, b2 = (f"{prefix}linear_{i}.{n}" for i in (1, 2) for n in ("weight", "bias"))
    kernel_1, bias_1 = ("projector", "linear_1", "kernel"), ("projector", "linear_1", "bias")
    if cfg.projector == "mlp2x_gelu":
        out = [
            Entry(kernel_1, (w1,), ((D, E),), (E, D), combine=lambda t: t[0].T),
            Entry(
                ("projector", "linear_2", "kernel"),
                (w2,),
                ((D, D),),
                (D, D),
                combine=lambda t: t[0].T,
            ),
        ]
        if bias:
            out.append(Entry(bias_1, (b1,), ((D,),), (D,), combine=lambda t: t[0]))
            out.append(
                Entry(
                    ("projector", "linear_2", "bias"), (b2,), ((D,),), (D,), combine=lambda t: t[0]
                )
            )
        return out
    if cfg.projector != "linear":
        raise HFImportError(f"projector {cfg.projector!r} has no llava-hf layout")

    def fold(t: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """y = (x W1^T + b1) W2^T + b2 = x (W2 W1)^T + (W2 b1 + b2), in float64."""
        W1, W2 = np.asarray(t[0], np.float64), np.asarray(t[2 if bias else 1], np.float64)
        if not bias:
            return (W2 @ W1).T, None
        return (W2 @ W1).T, W2 @ np.asarray(t[1], np.float64) + np.asarray(t[3], np.float64)

    keys = (w1, b1, w2, b2) if bias else (w1, w2)
    shapes = ((D, E), (D,), (D, D), (D,)) if bias else ((D, E), (D, D))
    out = [Entry(kernel_1, keys, shapes, (E, D), combine=lambda t: fold(t)[0])]
    if bias:
        out.append(Entry(bias_1, keys, shapes, (D,), combine=lambda t: fold(t)[1]))
    return out


# ---------------------------------------------------------------------------- importers


def abstract_neva(cfg: NevaConfig, mesh: Mesh | None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state with shardings) of `Neva(cfg)`; nothing is allocated."""
    return sharding.abstract_state(lambda: Neva(cfg, rngs=nnx.Rngs(0)), mesh)


@dataclasses.dataclass
class Imported:
    """An imported model with what travels with it into a checkpoint folder."""

    model: Neva
    config: NevaConfig
    tokenizer: Any | None  # a transformers tokenizer, `<image>` included
    preprocessor_config: dict[str, Any] | None
    template: str | None = None  # conversation template the source names, when known
    image_aspect_ratio: str | None = None  # square | pad | keep, when the source names it
    fresh_projector: bool = False  # the projector was drawn here (the source holds none)


# (llm prefix, lm_head key, projector prefix, vision prefixes to try) per llava-hf layout.
_LLAVA_ON_DISK = (
    "language_model.model.",
    "language_model.lm_head.weight",
    "multi_modal_projector.",
    ("vision_tower.vision_model.", "vision_tower."),
)
_LLAVA_NEWER = (
    "model.language_model.",
    "lm_head.weight",
    "model.multi_modal_projector.",
    ("model.vision_tower.vision_model.", "model.vision_tower."),
)


def _llava_layout(keys: set[str]) -> tuple[str, str, str, tuple[str, ...]]:
    """The key layout (see _LLAVA_ON_DISK) of a llava-hf folder holding `keys`."""
    return (
        _LLAVA_NEWER if any(k.startswith("model.language_model.") for k in keys) else _LLAVA_ON_DISK
    )


def load_hf_tokenizer(path: str | Path) -> Any | None:
    """The tokenizer saved in `path`, or None when the folder holds no tokenizer files."""
    import transformers

    if not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        return None
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _preprocessor(path: Path) -> dict[str, Any] | None:
    file = path / "preprocessor_config.json"
    return json.loads(file.read_text()) if file.exists() else None


def add_conversation_arguments(p: Any) -> None:
    """`--template` / `--image-aspect` of the import commands: what the model folder's
    `conversation.json` records, over what the source names."""
    from neva_jax.data.conversation import TEMPLATES
    from neva_jax.data.image import ASPECT_MODES

    p.add_argument(
        "--template",
        choices=tuple(TEMPLATES),
        help="conversation template the weights were trained with (default: the source's, "
        "when it names one); generate and serve use it",
    )
    p.add_argument(
        "--image-aspect",
        choices=ASPECT_MODES,
        help="image aspect mode the weights were trained with (default: the source's, "
        "when it names one)",
    )


def import_llava(
    src: str | Path,
    *,
    adapter: str | Path | None = None,
    mesh: Mesh | None = None,
    **runtime: Any,
) -> Imported:
    """Imports a llava-hf `LlavaForConditionalGeneration` folder; `adapter`, a PEFT LoRA
    folder trained on it, adds its adapters (and projector, if saved) unmerged."""
    src = Path(src)
    hf_cfg = read_hf_config(src, ("llava",))
    try:
        cfg = neva.from_hf_config(hf_cfg, **runtime)
    except ValueError as e:
        raise HFImportError(f"{src / 'config.json'}: {e}") from None
    if adapter is not None:
        cfg = dataclasses.replace(cfg, peft=hf_peft.peft_config_of(adapter, cfg))
    reader = SafetensorsFolder(src)
    keys = reader.keys()
    llm_prefix, head_key, proj_prefix, candidates = _llava_layout(keys)
    vision_prefix = hf_clip.detect_prefix(keys, candidates)
    if vision_prefix is None:
        raise HFImportError(
            f"{src}: missing tensor {candidates[-1] + 'embeddings.patch_embedding.weight'!r}"
        )
    entries = (
        entries_from(
            hf_llama.param_table(cfg.llm, model_prefix=llm_prefix, lm_head_key=head_key), ("llm",)
        )
        + entries_from(hf_clip.param_table(cfg.vision, prefix=vision_prefix), ("vision",))
        + projector_entries(cfg, proj_prefix)
    )
    unused = hf_clip.unused_keys(keys, vision_prefix)
    if cfg.llm.share_embeddings_and_output_weights:
        unused |= {head_key} & keys
    check_keys(entries, reader, unused)
    tokenizer = load_hf_tokenizer(src)
    if tokenizer is not None and tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != cfg.image_token_id:
        raise HFImportError(
            f"{src}: tokenizer maps {IMAGE_TOKEN} to {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, "
            f"config.json image_token_index is {cfg.image_token_id}"
        )
    if tokenizer is not None:  # the rows past it are llava-hf's padding (32002 -> 32064)
        cfg = dataclasses.replace(cfg, tokenizer_vocab_size=min(len(tokenizer), cfg.llm.vocab_size))
    sources = [(entries, reader)]
    if adapter is not None:
        lora_entries, lora_reader, projector = hf_peft.adapter_entries(cfg, adapter)
        if projector is not None:  # the adapter's projector replaces the base's
            lora_entries += projector_entries(cfg, projector)
            replaced = {e.path for e in lora_entries}
            sources = [([e for e in entries if e.path not in replaced], reader)]
        check_keys(lora_entries, lora_reader, set())
        sources.append((lora_entries, lora_reader))
    model = load_into(*abstract_neva(cfg, mesh), sources)
    template = hf_chat.template_of_chat_template(hf_chat.saved_chat_template(src))
    return Imported(model, cfg, tokenizer, _preprocessor(src), template=template)


def _clip_source(
    src: Path, *, vision_select_layer: int, class_token_length: int, **runtime: Any
) -> tuple[ClipConfig, list[Entry], SafetensorsFolder]:
    hf_cfg = read_hf_config(src, ("clip", "clip_vision_model"))
    strategy = "default" if class_token_length else "full"
    try:
        cfg = clip.from_hf_config(
            hf_cfg,
            vision_feature_layer=vision_select_layer,
            vision_feature_select_strategy=strategy,
            **runtime,
        )
    except ValueError as e:
        raise HFImportError(f"{src / 'config.json'}: {e}") from None
    reader = SafetensorsFolder(src)
    keys = reader.keys()
    prefix = hf_clip.detect_prefix(keys, ["vision_model.", ""])
    if prefix is None:
        raise HFImportError(
            f"{src}: missing tensor 'vision_model.embeddings.patch_embedding.weight'"
        )
    entries = entries_from(hf_clip.param_table(cfg, prefix=prefix), ("vision",))
    unused = hf_clip.unused_keys(keys, prefix)
    if prefix:  # a full CLIPModel also holds the text tower and projections
        unused |= {k for k in keys if k.startswith(hf_clip.CLIP_MODEL_UNUSED_PREFIXES)}
    check_keys(entries, reader, unused)
    return cfg, entries, reader


def import_clip(
    src: str | Path,
    *,
    vision_select_layer: int = -2,
    class_token_length: int = 1,
    mesh: Mesh | None = None,
    **runtime: Any,
) -> tuple[ClipVisionTower, ClipConfig]:
    """Imports a CLIP(Vision)Model folder as a vision tower alone."""
    cfg, entries, reader = _clip_source(
        Path(src),
        vision_select_layer=vision_select_layer,
        class_token_length=class_token_length,
        **runtime,
    )
    graphdef, abstract = sharding.abstract_state(
        lambda: ClipVisionTower(cfg, rngs=nnx.Rngs(0)), mesh
    )
    entries = [dataclasses.replace(e, path=e.path[1:]) for e in entries]  # drop 'vision'
    return load_into(graphdef, abstract, [(entries, reader)]), cfg


def import_llm_and_clip(
    llm_dir: str | Path,
    clip_dir: str | Path,
    *,
    projector: str = "mlp2x_gelu",
    vision_select_layer: int = -2,
    class_token_length: int = 1,
    seed: int = 0,
    mesh: Mesh | None = None,
    **runtime: Any,
) -> Imported:
    """Imports a LLaMA folder and a CLIP folder; the projector starts fresh (seed `seed`)."""
    llm_dir, clip_dir = Path(llm_dir), Path(clip_dir)
    vision_cfg, vision_entries, clip_reader = _clip_source(
        clip_dir,
        vision_select_layer=vision_select_layer,
        class_token_length=class_token_length,
        **runtime,
    )
    hf_cfg = read_hf_config(llm_dir, ("llama", "mistral"))
    try:
        hf_llm = llama.from_hf_config(hf_cfg, **runtime)
    except ValueError as e:
        raise HFImportError(f"{llm_dir / 'config.json'}: {e}") from None
    tokenizer = load_hf_tokenizer(llm_dir)
    if tokenizer is None:
        raise HFImportError(f"{llm_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    image_id, vocab = add_image_tokens(tokenizer, hf_llm.vocab_size, where=str(llm_dir))
    cfg = NevaConfig(
        llm=dataclasses.replace(hf_llm, vocab_size=vocab),
        vision=vision_cfg,
        projector=projector,
        image_token_id=image_id,
        tokenizer_vocab_size=len(tokenizer),
    )
    reader = SafetensorsFolder(llm_dir)
    llm_entries = entries_from(hf_llama.param_table(hf_llm), ("llm",))
    unused = (
        {"lm_head.weight"} & reader.keys() if hf_llm.share_embeddings_and_output_weights else set()
    )
    check_keys(llm_entries, reader, unused)
    if vocab != hf_llm.vocab_size:
        grown = {("llm", "embed", "embedding"): 0, ("llm", "lm_head", "kernel"): 1}
        llm_entries = [
            grow_vocab(e, vocab, grown[e.path]) if e.path in grown else e for e in llm_entries
        ]
    fresh = _fresh_projector(cfg, seed, mesh)
    sources = [(llm_entries, reader), (vision_entries, clip_reader)]
    model = load_into(*abstract_neva(cfg, mesh), sources, {"projector": fresh})
    return Imported(model, cfg, tokenizer, _preprocessor(clip_dir), fresh_projector=True)


def add_image_tokens(tokenizer: Any, vocab_size: int, *, where: str) -> tuple[int, int]:
    """Adds `<image>` (and `<pad>` if there is no pad token); returns (image id, new vocab).

    The new vocabulary covers the tokenizer, padded up to a multiple of VOCAB_MULTIPLE
    (as llava-hf's 32064); it never shrinks below the model's `vocab_size`.
    """
    from tokenizers import AddedToken

    if len(tokenizer) > vocab_size:
        raise HFImportError(
            f"{where}: tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}"
        )
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens(
            [AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True
        )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens(
            {"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)}
        )
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if len(tokenizer) <= vocab_size:
        return image_id, vocab_size
    return image_id, -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _fresh_projector(cfg: NevaConfig, seed: int, mesh: Mesh | None) -> Projector:
    def make() -> Projector:
        return Projector(
            cfg.projector,
            cfg.vision.hidden_size,
            cfg.llm.hidden_size,
            use_bias=cfg.projector_bias,
            dtype=cfg.llm.compute_dtype,
            param_dtype=cfg.llm.weight_dtype,
            rngs=nnx.Rngs(seed),
        )

    return sharding.create_sharded(make, mesh) if mesh is not None else sharding.unsharded(make)
