"""NeVA / LLaVA: CLIP vision tower -> projector -> image features in a LLaMA decoder.

Axis letters: B batch, T length, M images per row, P image tokens per image,
E vision width, D model width, V vocab, H/W pixels.

Parameter tree: `vision/...` (model/clip.py), `projector/linear_{i}/...`
(model/projector.py), `llm/...` (model/llama.py; with `peft.scheme='lora'` the
targeted projections hold `lora/lora_a`, `lora/lora_b` next to their kernels).

Image scatter rule (docs/CONTRACTS.md): in row b, the j-th token whose id is
`image_token_id` receives row b's projected feature j, the features of the row's M
images flattened in order to [M*P, D]. Shapes stay static: a row without images has
no slot tokens and ignores its (zero) images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from neva_jax.model import clip, llama
from neva_jax.model.attention import KVCache
from neva_jax.model.clip import ClipConfig, ClipVisionTower
from neva_jax.model.llama import DecoderLayer, Llama, LlamaConfig
from neva_jax.model.lora import PeftConfig
from neva_jax.model.projector import Projector, projector_depth
from neva_jax.model.schema import FieldError, key

# Run-time fields shared by the LLM and vision configs (see `with_runtime`).
RUNTIME_FIELDS = (
    "dtype",
    "param_dtype",
    "attention_impl",
    "remat_policy",
    "scan_layers",
    "row_major_weight_grads",
)
# Run-time fields that depend on the backend only: `neva_jax.platform` chooses them
# where a model is built to run; experiment configs do not set them.
PLATFORM_FIELDS = ("row_major_weight_grads",)


@dataclasses.dataclass(frozen=True)
class NevaConfig:
    """The whole model: decoder, vision tower, projector and the image token id.

    Fields made with `key()` are run-config keys `model.<name>` (model/schema.py);
    `peft`'s are `model.peft.<name>` (LoRA adapters on the decoder, model/lora.py).
    """

    llm: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    vision: ClipConfig = dataclasses.field(default_factory=ClipConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    projector: str = key("mlp2x_gelu")  # linear | mlpNx_gelu | identity
    projector_bias: bool = True
    image_token_id: int = 32000
    use_im_start_end: bool = key(False)  # the pipeline adds the start/end tokens; recorded here
    # The tokenizer's size: ids >= it are padding rows of the vocabulary (imports pad
    # 32002 tokens to 32064 rows, as llava-hf); the loss and generation mask their
    # logits (`mask_padded_vocab`). 0 = unknown: every row is a token.
    tokenizer_vocab_size: int = 0

    def __post_init__(self):
        try:
            projector_depth(self.projector)
        except ValueError:
            raise FieldError(
                "model", "projector", self.projector, "use linear, identity or mlpNx_gelu (N >= 2)"
            ) from None
        if not 0 <= self.image_token_id < self.llm.vocab_size:
            raise FieldError(
                "model",
                "image_token_id",
                self.image_token_id,
                f"outside the vocabulary [0, {self.llm.vocab_size}) of model.llm.vocab_size",
            )
        if not 0 <= self.tokenizer_vocab_size <= self.llm.vocab_size:
            raise FieldError(
                "model",
                "tokenizer_vocab_size",
                self.tokenizer_vocab_size,
                f"outside [0, model.llm.vocab_size={self.llm.vocab_size}]",
            )
        if self.projector == "identity" and self.vision.hidden_size != self.llm.hidden_size:
            raise FieldError(
                "model",
                "projector",
                self.projector,
                f"needs model.vision_encoder.hidden_size={self.vision.hidden_size} == "
                f"model.llm.hidden_size={self.llm.hidden_size}",
            )

    @property
    def num_image_tokens(self) -> int:
        """P: image slots per image in the token sequence."""
        return self.vision.num_image_tokens


def with_runtime(cfg: NevaConfig, **runtime: Any) -> NevaConfig:
    """`cfg` with run-time choices (RUNTIME_FIELDS) set on both the LLM and the vision tower."""
    unknown = set(runtime) - set(RUNTIME_FIELDS)
    if unknown:
        raise ValueError(f"unknown run-time field(s) {sorted(unknown)}; expected {RUNTIME_FIELDS}")
    return dataclasses.replace(
        cfg,
        llm=dataclasses.replace(cfg.llm, **runtime),
        vision=dataclasses.replace(cfg.vision, **runtime),
    )


# Config fields that are not architecture: run-time choices, the initialisation of new
# parameters, what the tokenizer in use sets, and the longest sequence a run allows
# (`encoder_seq_length`: with RoPE only a bound; a learned position table's size is
# checked as a parameter shape), and `peft` (the run's adapters: a checkpoint's are
# checked where it is loaded, train/build.py). Every other field of NevaConfig, LlamaConfig and
# ClipConfig is, and a checkpoint's value must match the run's.
NOT_ARCHITECTURE = (
    *RUNTIME_FIELDS,
    "init_method_std",
    "image_token_id",
    "tokenizer_vocab_size",
    "encoder_seq_length",
    "peft",
)
# NevaConfig attribute -> its run-config key prefix ("" = NevaConfig's own fields).
CONFIG_SECTIONS = {"llm": "model.llm.", "vision": "model.vision_encoder.", "": "model."}


def architecture_differences(ours: NevaConfig, theirs: NevaConfig) -> list[tuple[str, Any, Any]]:
    """(run-config key, ours, theirs) of every architecture field that differs, in
    declaration order (decoder, vision tower, then NevaConfig's own)."""
    out = []
    for part, prefix in CONFIG_SECTIONS.items():
        a, b = (getattr(c, part) if part else c for c in (ours, theirs))
        for f in dataclasses.fields(a):
            if f.name in NOT_ARCHITECTURE or f.name in CONFIG_SECTIONS:
                continue
            if getattr(a, f.name) != getattr(b, f.name):
                out.append((prefix + f.name, getattr(a, f.name), getattr(b, f.name)))
    return out


# ---------------------------------------------------------------------------- presets

_LLAVA_VOCAB = 32064  # 32000 + <image> + <pad>, padded to a multiple of 64 (as llava-hf)


def llama2_7b_chat(**overrides: Any) -> NevaConfig:
    """The seed's NeVA: LLaMA-2-7B-Chat + CLIP-L/14 at 224 px + a linear projector, seq 4096."""
    base = dict(
        llm=llama.llama2_7b_chat(vocab_size=_LLAVA_VOCAB, encoder_seq_length=4096),
        vision=clip.clip_l14_224(),
        projector="linear",
    )
    return NevaConfig(**{**base, **overrides})


def llama2_13b_chat(**overrides: Any) -> NevaConfig:
    """The seed's NeVA with LLaMA-2-13B-Chat + CLIP-L/14 at 224 px + linear projector."""
    base = dict(
        llm=llama.llama2_13b_chat(vocab_size=_LLAVA_VOCAB, encoder_seq_length=4096),
        vision=clip.clip_l14_224(),
        projector="linear",
    )
    return NevaConfig(**{**base, **overrides})


def llava_v15_7b(**overrides: Any) -> NevaConfig:
    """LLaVA-1.5-7B: Vicuna-7B v1.5 + CLIP-L/14 at 336 px (576 image tokens) + mlp2x_gelu."""
    base = dict(
        llm=llama.vicuna_7b(vocab_size=_LLAVA_VOCAB, encoder_seq_length=4096),
        vision=clip.clip_l14_336(),
        projector="mlp2x_gelu",
    )
    return NevaConfig(**{**base, **overrides})


def llava_v15_13b(**overrides: Any) -> NevaConfig:
    """LLaVA-1.5-13B: Vicuna-13B v1.5 + CLIP-L/14 at 336 px + mlp2x_gelu."""
    base = dict(
        llm=llama.vicuna_13b(vocab_size=_LLAVA_VOCAB, encoder_seq_length=4096),
        vision=clip.clip_l14_336(),
        projector="mlp2x_gelu",
    )
    return NevaConfig(**{**base, **overrides})


def tiny(**overrides: Any) -> NevaConfig:
    """Tiny decoder + tiny ViT + mlp2x_gelu, for tests; `<image>` is the last vocab id."""
    llm = llama.tiny()
    base = dict(
        llm=llm, vision=clip.tiny(), projector="mlp2x_gelu", image_token_id=llm.vocab_size - 1
    )
    return NevaConfig(**{**base, **overrides})


PRESETS = {
    "llama2_7b_chat": llama2_7b_chat,
    "llama2_13b_chat": llama2_13b_chat,
    "llava_v15_7b": llava_v15_7b,
    "llava_v15_13b": llava_v15_13b,
    "tiny": tiny,
}


# ---------------------------------------------------------------------------- JSON


def config_to_dict(cfg: NevaConfig) -> dict[str, Any]:
    """A JSON-ready dict of `cfg` (nested `llm`, `vision` and `peft` dicts)."""
    return dataclasses.asdict(cfg)


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"model_config.json: unknown key {where}{unknown[0]!r}")
    return cls(**d)


def config_from_dict(d: dict[str, Any]) -> NevaConfig:
    """The inverse of `config_to_dict`; an unknown key is an error naming it. A dict
    without `peft` (written before adapters existed) has none."""
    d = dict(d)
    llm = _build(LlamaConfig, dict(d.pop("llm", {})), "llm.")
    vision = _build(ClipConfig, dict(d.pop("vision", {})), "vision.")
    peft = _build(PeftConfig, dict(d.pop("peft", {})), "peft.")
    return _build(NevaConfig, {**d, "llm": llm, "vision": vision, "peft": peft}, "")


def from_hf_config(hf: dict[str, Any], **runtime: Any) -> NevaConfig:
    """Maps a `transformers` LlavaConfig dict (complete, e.g. `AutoConfig(...).to_dict()`).

    `projector_hidden_act='gelu'` gives `mlp2x_gelu`; `'linear'` (no activation
    between the two layers) gives a `linear` projector, the two layers folded into
    one at import. `runtime` sets RUNTIME_FIELDS on both sub-configs.
    """
    act = hf.get("projector_hidden_act", "gelu")
    projectors = {"gelu": "mlp2x_gelu", "linear": "linear"}
    if act not in projectors:
        raise ValueError(
            f"config.json projector_hidden_act={act!r} is not supported ('gelu' or 'linear')"
        )
    text = dict(hf["text_config"])
    if hf.get("tie_word_embeddings"):
        text["tie_word_embeddings"] = True
    cfg = NevaConfig(
        llm=llama.from_hf_config(text),
        vision=clip.from_hf_config(
            hf["vision_config"],
            vision_feature_layer=hf.get("vision_feature_layer", -2),
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        ),
        projector=projectors[act],
        projector_bias=bool(hf.get("multimodal_projector_bias", True)),
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 32000))),
    )
    return with_runtime(cfg, **runtime) if runtime else cfg


# ---------------------------------------------------------------------------- model

PADDED_LOGIT = -1e30  # finite: a padded id as a (masked-out) target gives CE x 0 = 0, not NaN


def mask_padded_vocab(logits: jax.Array, tokenizer_vocab_size: int) -> jax.Array:
    """logits [..., V] with the ids >= `tokenizer_vocab_size` set to PADDED_LOGIT.

    Softmax, argmax and sampling over the result see exactly the tokenizer's
    vocabulary (the padded rows get probability 0 and no gradient). 0, or V, leaves
    the logits unchanged.
    """
    V = logits.shape[-1]
    if not tokenizer_vocab_size or tokenizer_vocab_size >= V:
        return logits
    real = jnp.arange(V) < tokenizer_vocab_size
    return jnp.where(real, logits, jnp.asarray(PADDED_LOGIT, logits.dtype))


def scatter_image_features(
    embeds: jax.Array, slot_mask: jax.Array, features: jax.Array
) -> jax.Array:
    """Puts features [B, M*P, D] into the slot positions of embeds [B, T, D].

    slot_mask [B, T] bool marks image slots; the j-th slot of a row takes the row's
    feature j (a per-row cumulative count indexes the features; static shapes).
    """
    index = jnp.clip(jnp.cumsum(slot_mask, axis=1) - 1, 0, features.shape[1] - 1)  # [B, T]
    gathered = jnp.take_along_axis(features, index[:, :, None], axis=1)  # [B, T, D]
    return jnp.where(slot_mask[:, :, None], gathered.astype(embeds.dtype), embeds)


class Neva(nnx.Module):
    """The NeVA model; submodules `vision`, `projector`, `llm`."""

    def __init__(self, cfg: NevaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.vision = ClipVisionTower(cfg.vision, rngs=rngs)
        self.projector = Projector(
            cfg.projector,
            cfg.vision.hidden_size,
            cfg.llm.hidden_size,
            use_bias=cfg.projector_bias,
            dtype=cfg.llm.compute_dtype,
            param_dtype=cfg.llm.weight_dtype,
            row_major_weight_grads=cfg.llm.row_major_weight_grads,
            rngs=rngs,
        )
        self.llm = Llama(cfg.llm, rngs=rngs, peft=cfg.peft)

    def encode_images(self, images: jax.Array, *, stop_gradient: bool = False) -> jax.Array:
        """images [B, M, H, W, 3] (channels-last) -> projected features [B, M*P, D].

        `stop_gradient=True` cuts gradients at the vision features (frozen tower), so
        no backward pass runs through the tower.
        """
        B, M = images.shape[:2]
        feats = self.vision(images.reshape(B * M, *images.shape[2:]))  # [B*M, P, E]
        if stop_gradient:
            feats = jax.lax.stop_gradient(feats)
        out = self.projector(feats.astype(self.config.llm.compute_dtype))  # [B*M, P, D]
        return out.reshape(B, M * out.shape[1], out.shape[2])

    def embed(
        self,
        input_ids: jax.Array,
        images: jax.Array | None = None,
        *,
        stop_vision_gradient: bool = False,
    ) -> jax.Array:
        """Token embeddings [B, T, D] with image features in the image slots."""
        x = self.llm.embed(input_ids)
        if images is None or images.shape[1] == 0:
            return x
        feats = self.encode_images(images, stop_gradient=stop_vision_gradient)
        return scatter_image_features(x, input_ids == self.config.image_token_id, feats)

    def hidden_states(
        self,
        input_ids: jax.Array,
        images: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        stop_vision_gradient: bool = False,
        stop_before_last: bool = False,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, D] of whole sequences (see `Llama.hidden_states`;
        `stop_before_last`: the input of the LLM's last layer, for `llm.last_layer`)."""
        x = self.embed(input_ids, images, stop_vision_gradient=stop_vision_gradient)
        return self.llm.hidden_states(
            embeds=x,
            positions=positions,
            segment_ids=segment_ids,
            stop_before_last=stop_before_last,
        )

    def prefill(
        self,
        cache: KVCache,
        input_ids: jax.Array,
        images: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        layers: Sequence[DecoderLayer] | None = None,
    ) -> tuple[KVCache, jax.Array]:
        """Prompts with their images into an empty cache: vision tower, projector, then
        `Llama.prefill`. Returns (cache, final-normed hidden states [B, T, D]); decode
        steps continue with `model.llm.decode`."""
        x = self.embed(input_ids, images)
        return self.llm.prefill(
            cache, embeds=x, positions=positions, segment_ids=segment_ids, layers=layers
        )

    def __call__(
        self,
        input_ids: jax.Array,
        images: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        stop_vision_gradient: bool = False,
    ) -> jax.Array:
        """Logits [B, T, V] float32 of whole sequences."""
        h = self.hidden_states(
            input_ids,
            images,
            positions=positions,
            segment_ids=segment_ids,
            stop_vision_gradient=stop_vision_gradient,
        )
        return self.llm.logits(h)
