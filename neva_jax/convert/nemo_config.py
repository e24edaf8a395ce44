"""NeMo model configs <-> neva-jax configs.

NeMo 1 (`model_config.yaml`) uses NeMo's flat knob names (`activation: fast-swiglu`,
`normalization: rmsnorm`, `bias`, `rotary_base`, `mm_cfg`, ...); NeMo 2
(`context/model.yaml`) uses Megatron-core TransformerConfig fields (`activation_func`,
`gated_linear_unit`, `add_bias_linear`, `rotary_percent`, ...) under `config:`, and for
LLaVA `language_transformer_config`, `vision_transformer_config`,
`vision_projection_config`. A knob neva-jax cannot represent is a one-line error
naming it; NeMo's defaults fill what a file leaves out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from neva_jax.convert.nemo_io import NemoError
from neva_jax.data.conversation import MODEL_TYPE_TEMPLATES, TEMPLATES
from neva_jax.model.llama import LlamaConfig

# NeMo 1 flat knobs -> neva-jax activation names.
NEMO1_ACTIVATIONS = {
    "swiglu": "swiglu",
    "fast-swiglu": "swiglu",
    "gelu": "gelu",
    "squared-relu": "squared-relu",
}
NEMO_NORMALIZATIONS = {"rmsnorm": "rmsnorm", "layernorm": "layernorm", "layernorm1p": "layernorm1p"}
# NeMo 2 activation_func targets -> neva-jax activation (non-gated form).
NEMO2_ACTIVATIONS = {
    "torch.nn.functional.silu": "silu",
    "torch.nn.functional.gelu": "gelu",
    "megatron.core.fusions.fused_bias_gelu.bias_gelu_impl": "gelu",
    "megatron.core.transformer.utils.openai_gelu": "gelu_tanh",
    "megatron.core.activations.squared_relu": "squared-relu",
    "torch.nn.functional.relu": "relu",
}


@dataclasses.dataclass(frozen=True)
class LlmSpec:
    """An LLM config plus what the weights layout depends on."""

    config: LlamaConfig  # vocab_size is the tokenizer's, set by the importer
    tensor_parallel: int = 1
    pipeline_parallel: int = 1


def _fail(where: str, key: str, value: Any, why: str) -> None:
    raise NemoError(f"{where}: {key}={value!r} {why}")


def _require(where: str, cfg: dict[str, Any], key: str, allowed: tuple, default: Any) -> None:
    value = cfg.get(key, default)
    if value not in allowed:
        _fail(where, key, value, f"is not supported by neva-jax (supported: {allowed})")


def _shape(cfg: dict[str, Any], **fields: Any) -> LlamaConfig:
    """A LlamaConfig from the knobs NeMo 1 and NeMo 2 name alike, plus `fields`."""
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    kv = cfg.get("kv_channels")
    return LlamaConfig(
        hidden_size=hidden,
        ffn_hidden_size=int(cfg.get("ffn_hidden_size") or 4 * hidden),
        num_layers=int(cfg["num_layers"]),
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_query_groups") or None,
        head_dim=None if kv in (None, hidden // heads) else int(kv),
        rope_theta=float(cfg.get("rotary_base", 10000.0)),
        layernorm_epsilon=float(cfg.get("layernorm_epsilon", 1e-5)),
        share_embeddings_and_output_weights=bool(
            cfg.get("share_embeddings_and_output_weights", True)
        ),
        init_method_std=float(cfg.get("init_method_std", 0.02)),
        **fields,
    )


# ---------------------------------------------------------------------------- NeMo 1


def llm_from_nemo1(cfg: dict[str, Any], where: str) -> LlmSpec:
    """The LLM of a NeMo 1 `model_config.yaml` (MegatronGPTModel / MegatronNevaModel)."""
    act = str(cfg.get("activation", "gelu")).lower()
    if act not in NEMO1_ACTIVATIONS:
        _fail(
            where, "activation", act, f"is not supported (supported: {sorted(NEMO1_ACTIVATIONS)})"
        )
    activation = NEMO1_ACTIVATIONS[act]
    if activation == "gelu" and cfg.get("openai_gelu", False):
        activation = "gelu_tanh"
    norm = str(cfg.get("normalization", "layernorm")).lower()
    if norm not in NEMO_NORMALIZATIONS:
        _fail(
            where,
            "normalization",
            norm,
            f"is not supported (supported: {sorted(NEMO_NORMALIZATIONS)})",
        )
    position = cfg.get("position_embedding_type", "learned_absolute")
    if position not in ("rope", "learned_absolute"):
        _fail(
            where, "position_embedding_type", position, "is not supported (rope, learned_absolute)"
        )
    for key, allowed, default in (
        ("headscale", (False, None), False),
        ("transformer_block_type", ("pre_ln",), "pre_ln"),
        ("normalize_attention_scores", (True, None), True),
        ("megatron_legacy", (False, None), False),
        ("seq_len_interpolation_factor", (None, 1, 1.0), None),
        ("apply_residual_connection_post_layernorm", (False, None), False),
        ("num_moe_experts", (None, 0, 1), None),
        ("rotary_interleaved", (False, None), False),
        ("qk_layernorm", (False, None), False),
        ("window_size", (None,), None),
        ("virtual_pipeline_model_parallel_size", (None, 1), None),
    ):
        _require(where, cfg, key, allowed, default)
    bias = bool(cfg.get("bias", True))
    if cfg.get("qkv_bias", bias) != bias:
        _fail(
            where,
            "qkv_bias",
            cfg.get("qkv_bias"),
            f"differs from bias={bias}; neva-jax has one bias switch",
        )
    llm = _shape(
        cfg,
        encoder_seq_length=int(
            cfg.get("max_position_embeddings") or cfg.get("encoder_seq_length", 2048)
        ),
        position_embedding_type=position,
        rotary_percentage=float(cfg.get("rotary_percentage", 1.0)),
        normalization=NEMO_NORMALIZATIONS[norm],
        activation=activation,
        bias=bias,
    )
    return LlmSpec(
        llm,
        tensor_parallel=int(cfg.get("tensor_model_parallel_size", 1)),
        pipeline_parallel=int(cfg.get("pipeline_model_parallel_size", 1)),
    )


def _refuse_rope_scaling(cfg: LlamaConfig) -> None:
    if cfg.rope_type != "default":
        raise NemoError(
            f"model.llm.rope_type={cfg.rope_type!r}: RoPE scaling does not export to NeMo"
        )


def llm_to_nemo1(cfg: LlamaConfig) -> dict[str, Any]:
    """NeMo 1 `model_config.yaml` knobs for an LLM (MegatronGPTModel, mcore_gpt)."""
    _refuse_rope_scaling(cfg)
    activation = {"swiglu": "fast-swiglu", "gelu_tanh": "gelu"}.get(cfg.activation, cfg.activation)
    if activation not in NEMO1_ACTIVATIONS:
        raise NemoError(f"model.llm.activation={cfg.activation!r} has no NeMo 1 equivalent")
    return dict(
        mcore_gpt=True,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        encoder_seq_length=cfg.encoder_seq_length,
        max_position_embeddings=cfg.encoder_seq_length,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_kv_heads,
        kv_channels=cfg.head_size,
        init_method_std=cfg.init_method_std,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.layernorm_epsilon,
        bias=cfg.bias,
        activation=activation,
        openai_gelu=cfg.activation == "gelu_tanh",
        headscale=False,
        transformer_block_type="pre_ln",
        normalize_attention_scores=True,
        position_embedding_type=cfg.position_embedding_type,
        rotary_percentage=cfg.rotary_percentage,
        rotary_base=cfg.rope_theta,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        make_vocab_size_divisible_by=128,
        megatron_amp_O2=False,
        transformer_engine=False,
    )


# ---------------------------------------------------------------------------- NeMo 2


def _target(d: Any) -> str:
    return d.get("_target_", "") if isinstance(d, dict) else ""


def llm_from_nemo2(cfg: dict[str, Any], where: str) -> LlmSpec:
    """The LLM of a NeMo 2 GPT/LLaMA config dict (`model.yaml` `config:`)."""
    target = _target(cfg)
    for key in ("scale_factor", "low_freq_factor", "high_freq_factor"):
        if key in cfg:
            _fail(where, key, cfg[key], f"({target}): RoPE scaling is not supported")
    for key, allowed, default in (
        ("position_embedding_type", ("rope", "learned_absolute"), "learned_absolute"),
        ("rotary_interleaved", (False,), False),
        ("qk_layernorm", (False,), False),
        ("num_moe_experts", (None, 0, 1), None),
        ("multi_latent_attention", (False,), False),
        ("window_size", (None,), None),
        ("seq_len_interpolation_factor", (None, 1, 1.0), None),
        ("apply_residual_connection_post_layernorm", (False,), False),
        ("softmax_scale", (None,), None),
        ("virtual_pipeline_model_parallel_size", (None, 1), None),
    ):
        _require(where, cfg, key, allowed, default)
    func = _target(cfg.get("activation_func")) or "torch.nn.functional.gelu"
    if func not in NEMO2_ACTIVATIONS:
        _fail(where, "activation_func", func, "is not supported")
    activation = NEMO2_ACTIVATIONS[func]
    if cfg.get("gated_linear_unit", False):
        if activation != "silu":
            _fail(
                where,
                "activation_func",
                func,
                "with gated_linear_unit is only supported for silu (SwiGLU)",
            )
        activation = "swiglu"
    elif activation == "silu":
        _fail(where, "gated_linear_unit", False, "with silu is not supported (only SwiGLU)")
    norm = str(cfg.get("normalization", "LayerNorm"))
    if norm not in ("RMSNorm", "LayerNorm"):
        _fail(where, "normalization", norm, "is not supported (RMSNorm, LayerNorm)")
    zero_centered = bool(cfg.get("layernorm_zero_centered_gamma", False))
    if zero_centered and norm != "LayerNorm":
        _fail(where, "layernorm_zero_centered_gamma", True, "needs normalization=LayerNorm")
    normalization = (
        "rmsnorm" if norm == "RMSNorm" else "layernorm1p" if zero_centered else "layernorm"
    )
    bias = bool(cfg.get("add_bias_linear", True))
    if bool(cfg.get("add_qkv_bias", False)) and not bias:
        _fail(
            where,
            "add_qkv_bias",
            True,
            "without add_bias_linear is not supported (one bias switch)",
        )
    llm = _shape(
        cfg,
        encoder_seq_length=int(cfg.get("seq_length", 2048)),
        position_embedding_type=cfg.get("position_embedding_type", "learned_absolute"),
        rotary_percentage=float(cfg.get("rotary_percent", 1.0)),
        normalization=normalization,
        activation=activation,
        bias=bias,
    )
    return LlmSpec(
        llm,
        tensor_parallel=int(cfg.get("tensor_model_parallel_size", 1)),
        pipeline_parallel=int(cfg.get("pipeline_model_parallel_size", 1)),
    )


def llm_to_nemo2(cfg: LlamaConfig, *, vocab_size: int, dtype: str) -> dict[str, Any]:
    """NeMo 2 `LlamaConfig` fields for an LLM (the arguments NeMo's importer sets)."""
    _refuse_rope_scaling(cfg)
    func = {
        "swiglu": "silu",
        "gelu": "gelu",
        "gelu_tanh": "openai_gelu",
        "squared-relu": "squared_relu",
        "relu": "relu",
        "silu": "silu",
    }.get(cfg.activation)
    targets = {v: k for k, v in NEMO2_ACTIVATIONS.items() if "fused_bias" not in k}
    name = {
        "silu": "silu",
        "gelu": "gelu",
        "openai_gelu": "gelu_tanh",
        "squared_relu": "squared-relu",
        "relu": "relu",
    }[func]
    if cfg.activation == "silu":
        raise NemoError("model.llm.activation='silu' without gating has no NeMo 2 equivalent")
    return dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_kv_heads,
        kv_channels=cfg.head_size,
        init_method_std=cfg.init_method_std,
        layernorm_epsilon=cfg.layernorm_epsilon,
        normalization="RMSNorm" if cfg.normalization == "rmsnorm" else "LayerNorm",
        layernorm_zero_centered_gamma=cfg.normalization == "layernorm1p",
        activation_func={"_target_": targets[name], "_call_": False},
        gated_linear_unit=cfg.activation == "swiglu",
        add_bias_linear=cfg.bias,
        add_qkv_bias=cfg.bias,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=cfg.rope_theta,
        rotary_percent=cfg.rotary_percentage,
        seq_length=cfg.encoder_seq_length,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        make_vocab_size_divisible_by=128,
        vocab_size=vocab_size,
        params_dtype={"_target_": f"torch.{dtype}", "_call_": False},
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )


# ---------------------------------------------------------------------------- conversation

# Our conversation template -> NeMo's model type (also its `data.conv_template` name).
_MODEL_TYPE_OF_TEMPLATE = {t: m for m, t in MODEL_TYPE_TEMPLATES.items()}
DEFAULT_MODEL_TYPE = "llama_2"
# NeMo NeVA's `data.image_aspect_ratio` values (our "keep" has no NeMo form).
NEMO_IMAGE_ASPECTS = ("square", "pad")


def conversation_to_nemo1(
    template: str | None, image_aspect_ratio: str | None
) -> tuple[str, dict[str, str]]:
    """(`mm_cfg.llm.model_type`, the `data` entries) NeMo 1 selects the prompt format and
    image mode with: `data.conv_template` names the template (`plain`, stage 1's, is a
    conv_template but no model type); unknown: model_type llama_2 and no conv_template;
    `data.image_aspect_ratio` when NeMo has the mode (square, pad)."""
    model_type = _MODEL_TYPE_OF_TEMPLATE.get(template, DEFAULT_MODEL_TYPE)
    conv = "plain" if template == "plain" else _MODEL_TYPE_OF_TEMPLATE.get(template)
    data = {"conv_template": conv} if conv is not None else {}
    if image_aspect_ratio in NEMO_IMAGE_ASPECTS:
        data["image_aspect_ratio"] = image_aspect_ratio
    return model_type, data


def conversation_from_nemo1(data: dict[str, Any], model_type: str | None) -> dict[str, str | None]:
    """The conversation template and image aspect mode a NeMo 1 NeVA config names:
    `data.conv_template` (NeMo's configs default it to `${model.mm_cfg.llm.model_type}`,
    which a saved config may keep unresolved: then the model type names it) and
    `data.image_aspect_ratio` (square or pad). Names we have no template for give None."""
    conv = data.get("conv_template")
    if not isinstance(conv, str) or conv.startswith("${"):
        conv = model_type
    if conv in MODEL_TYPE_TEMPLATES:
        template = MODEL_TYPE_TEMPLATES[conv]
    else:
        template = conv if conv in TEMPLATES else None
    aspect = data.get("image_aspect_ratio")
    return dict(
        template=template, image_aspect_ratio=aspect if aspect in NEMO_IMAGE_ASPECTS else None
    )
