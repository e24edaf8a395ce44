"""The table between Hugging Face `LlamaForCausalLM` weights and `Llama` parameters.

Axis letters: N query heads, K kv heads, H head dim, D model width, F FFN width,
V vocab, L layers.

One table serves import and export: each `ParamMapping` names our parameter path,
the Hugging Face key(s) (one per layer for stacked parameters) and the two
transforms. torch `nn.Linear` stores [out, in]; our kernels are [in, out] with the
head dims split out, e.g. q_proj.weight [N*H, D] <-> layers/attn/q/kernel[l] [D, N, H].
RoPE uses the same rotate_half convention as `transformers`, so q/k are not permuted.

Prefixes cover the layouts in the wild: a plain LLaMA folder (`model.`, `lm_head.weight`),
llava-hf on disk (`language_model.model.`, `language_model.lm_head.weight`) and
newer in-memory names (`model.language_model.`, `lm_head.weight`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from neva_jax.model.llama import LlamaConfig, from_hf_config

__all__ = [
    "ParamMapping",
    "from_hf_config",
    "hf_to_params",
    "param_table",
    "params_to_hf",
    "to_hf_config",
]

Path = tuple[str, ...]


def to_hf_config(cfg: LlamaConfig) -> dict[str, Any]:
    """The `transformers` LlamaConfig dict for `cfg` (for export); refuses non-LLaMA knobs."""
    if (cfg.normalization, cfg.activation, cfg.position_embedding_type) != (
        "rmsnorm",
        "swiglu",
        "rope",
    ):
        raise ValueError(
            "only rmsnorm + swiglu + rope decoders export to LlamaForCausalLM, got "
            f"{cfg.normalization}, {cfg.activation}, {cfg.position_embedding_type}"
        )
    if cfg.rotary_percentage != 1.0:
        raise ValueError("rotary_percentage != 1 does not export to LlamaForCausalLM")
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_size,
        hidden_act="silu",
        max_position_embeddings=cfg.encoder_seq_length,
        initializer_range=cfg.init_method_std,
        rms_norm_eps=cfg.layernorm_epsilon,
        rope_parameters=_rope_parameters(cfg),
        rope_theta=cfg.rope_theta,
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        tie_word_embeddings=cfg.share_embeddings_and_output_weights,
    )


def _rope_parameters(cfg: LlamaConfig) -> dict[str, Any]:
    """transformers 5 `rope_parameters` (theta, type and Llama 3.1's scaling values)."""
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
    if cfg.rope_type == "llama3":
        out.update(
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
        )
    return out


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """One of our parameters and the Hugging Face tensor(s) it comes from.

    path: our parameter path, e.g. ('layers', 'attn', 'q', 'kernel').
    hf_keys: the HF keys; for a stacked parameter one per layer, in layer order.
    shape: our (stacked) shape.
    to_ours: one HF tensor -> our per-layer (or whole) array.
    to_hf: our per-layer (or whole) array -> one HF tensor.
    """

    path: Path
    hf_keys: tuple[str, ...]
    shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def stacked(self) -> bool:
        """True when the parameter has a leading layers axis (one HF key per layer)."""
        return self.path[0] == "layers"

    def import_(self, get: Callable[[str], np.ndarray]) -> np.ndarray:
        """Our array from the HF tensors fetched with `get(key)`, shape-checked."""
        parts = [self.to_ours(np.asarray(get(k))) for k in self.hf_keys]
        out = np.stack(parts) if self.stacked else parts[0]
        if out.shape != self.shape:
            raise ValueError(
                f"{self.hf_keys[0]}: gives shape {out.shape} for {'/'.join(self.path)}, "
                f"expected {self.shape}; does config.json match the weights?"
            )
        return out

    def export(self, value: np.ndarray) -> dict[str, np.ndarray]:
        """The HF tensors {key: array} of our array `value`."""
        value = np.asarray(value)
        if value.shape != self.shape:
            raise ValueError(
                f"{'/'.join(self.path)} has shape {value.shape}, expected {self.shape}"
            )
        if not self.stacked:
            return {self.hf_keys[0]: self.to_hf(value)}
        return {k: self.to_hf(value[i]) for i, k in enumerate(self.hf_keys)}


def _linear(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    """Transforms for an nn.Linear weight [prod(out), prod(in)] <-> kernel in_shape+out_shape."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))

    def to_ours(w: np.ndarray) -> np.ndarray:
        return w.reshape(n_out, n_in).T.reshape(in_shape + out_shape)

    def to_hf(k: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(k.reshape(n_in, n_out).T)

    return to_ours, to_hf


def _reshape(ours: tuple[int, ...], hf: tuple[int, ...]) -> tuple[Callable, Callable]:
    return (lambda w: w.reshape(ours)), (lambda k: np.ascontiguousarray(k.reshape(hf)))


def param_table(
    cfg: LlamaConfig,
    *,
    model_prefix: str = "model.",
    lm_head_key: str = "lm_head.weight",
) -> list[ParamMapping]:
    """All mappings for a LLaMA decoder `cfg` (rmsnorm, swiglu, rope; bias optional)."""
    to_hf_config(cfg)  # refuses configs LlamaForCausalLM cannot express
    D, F, V, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.num_layers
    N, K, H = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_size
    identity = (lambda w: w), (lambda k: np.ascontiguousarray(k))
    table: list[ParamMapping] = []

    def add(path: str, key: str, shape: tuple[int, ...], fns: tuple[Callable, Callable]) -> None:
        parts = tuple(path.split("/"))
        if parts[0] == "layers":
            keys = tuple(f"{model_prefix}layers.{i}.{key}" for i in range(L))
            shape = (L, *shape)
        else:
            keys = (key,)
        table.append(ParamMapping(parts, keys, shape, *fns))

    add("embed/embedding", f"{model_prefix}embed_tokens.weight", (V, D), identity)
    projections = {
        "q": ("self_attn.q_proj", (D,), (N, H)),
        "k": ("self_attn.k_proj", (D,), (K, H)),
        "v": ("self_attn.v_proj", (D,), (K, H)),
        "o": ("self_attn.o_proj", (N, H), (D,)),
    }
    for name, (key, in_shape, out_shape) in projections.items():
        add(
            f"layers/attn/{name}/kernel",
            f"{key}.weight",
            in_shape + out_shape,
            _linear(in_shape, out_shape),
        )
        if cfg.bias:
            add(
                f"layers/attn/{name}/bias",
                f"{key}.bias",
                out_shape,
                _reshape(out_shape, (int(np.prod(out_shape)),)),
            )
    for name, key, in_dim, out_dim in (
        ("gate", "gate_proj", D, F),
        ("up", "up_proj", D, F),
        ("down", "down_proj", F, D),
    ):
        add(
            f"layers/mlp/{name}/kernel",
            f"mlp.{key}.weight",
            (in_dim, out_dim),
            _linear((in_dim,), (out_dim,)),
        )
        if cfg.bias:
            add(f"layers/mlp/{name}/bias", f"mlp.{key}.bias", (out_dim,), identity)
    add("layers/attn_norm/scale", "input_layernorm.weight", (D,), identity)
    add("layers/mlp_norm/scale", "post_attention_layernorm.weight", (D,), identity)
    add("final_norm/scale", f"{model_prefix}norm.weight", (D,), identity)
    if not cfg.share_embeddings_and_output_weights:
        add("lm_head/kernel", lm_head_key, (D, V), _linear((D,), (V,)))
    return table


def _set(tree: dict[str, Any], path: Path, value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: Path) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def hf_to_params(
    tensors: Mapping[str, Any],
    cfg: LlamaConfig,
    *,
    model_prefix: str = "model.",
    lm_head_key: str = "lm_head.weight",
    strict: bool = True,
    place: Callable[[Path, np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """Our nested parameter dict from HF tensors {key: array-like}.

    `strict`: every key under `model_prefix` (and the LM head key) must be used and
    every expected key present; the error names the key. A tied model may still
    carry an `lm_head.weight` (torch state dicts do); it is ignored. `place(path, x)`,
    when given, puts each converted array where it belongs (e.g. `jax.device_put`
    onto its sharding) as soon as it is converted, so host memory holds one
    parameter at a time beyond the source tensors.
    """
    table = param_table(cfg, model_prefix=model_prefix, lm_head_key=lm_head_key)
    expected = {k for m in table for k in m.hf_keys}
    missing = sorted(k for k in expected if k not in tensors)
    if missing:
        raise KeyError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if strict:
        ignorable = {lm_head_key} if cfg.share_embeddings_and_output_weights else set()
        ours = [k for k in tensors if k.startswith(model_prefix) or k == lm_head_key]
        unexpected = sorted(k for k in ours if k not in expected and k not in ignorable)
        if unexpected:
            raise KeyError(
                f"unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all)"
            )
    params: dict[str, Any] = {}
    for m in table:
        value = m.import_(lambda k: tensors[k])
        _set(params, m.path, place(m.path, value) if place is not None else value)
    return params


def params_to_hf(
    params: Mapping[str, Any],
    cfg: LlamaConfig,
    *,
    model_prefix: str = "model.",
    lm_head_key: str = "lm_head.weight",
) -> dict[str, np.ndarray]:
    """HF tensors {key: numpy array} from our nested parameter dict (the inverse)."""
    out: dict[str, np.ndarray] = {}
    for m in param_table(cfg, model_prefix=model_prefix, lm_head_key=lm_head_key):
        out.update(m.export(np.asarray(_get(params, m.path))))
    return out
