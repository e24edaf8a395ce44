"""NeMo tensor names and the table from them to neva-jax parameters.

Every stored key is first given a canonical name (`canonical`): the checkpoint prefix
(`module.` NeMo 2, `model.` NeMo 1, `model.module.` O2) is dropped, NeVA's
`language_model.` is dropped, legacy (non-mcore) and local-spec names become the
mcore Transformer-Engine names, and layers are numbered:

  embedding.word_embeddings.weight               [Vp, D]  (vocab padded, trimmed at import)
  embedding.position_embeddings.weight           [S, D]   learned_absolute only
  decoder.layers.{i}.self_attention.linear_qkv.weight       [(N+2K)H, D]
      per kv group g: its N/K query heads, then k_g, then v_g (no RoPE permutation)
  decoder.layers.{i}.self_attention.linear_qkv.layer_norm_{weight,bias}
  decoder.layers.{i}.self_attention.linear_proj.weight      [D, N*H]
  decoder.layers.{i}.mlp.linear_fc1.weight       [2F, D] = cat(gate, up) (gated) or [F, D]
  decoder.layers.{i}.mlp.linear_fc1_up.weight    [F, D]   legacy non-fused `swiglu` (dense_h_to_4h_2)
  decoder.layers.{i}.mlp.linear_fc1.layer_norm_{weight,bias}
  decoder.layers.{i}.mlp.linear_fc2.weight       [D, F]
  decoder.final_layernorm.{weight,bias}, output_layer.weight [Vp, D]
  vision_tower.<CLIP key>                         HF CLIPVisionModel names without `vision_model.`
  projector.{0,2,..}.{weight,bias} | projector.{weight,bias}   torch Linear layers

(`.bias` next to each linear weight when `bias: true`.) The readers that serve these
names, tensor-parallel shards merged: convert/nemo_merge.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np

from neva_jax.convert.weights import Entry
from neva_jax.model.llama import LlamaConfig

PREFIXES = ("model.module.", "module.", "model.")
_LEGACY = (
    ("encoder.layers.", "decoder.layers."),
    ("encoder.final_layernorm.", "decoder.final_layernorm."),
    ("embedding.word_embeddings.vision_encoder.vision_model.", "vision_tower."),
    ("embedding.word_embeddings.adapter_layer.mm_projector_adapter.mm_projector.", "projector."),
    ("embedding.word_embeddings.adapter_layer.mm_linear_adapter.linear.", "projector."),
    ("vision_model.vision_model.", "vision_tower."),
    ("vision_projection.encoder.linear_fc1.", "projector.0."),
    ("vision_projection.encoder.linear_fc2.", "projector.2."),
    ("vision_projection.", "projector."),
)
_LAYER_RENAMES = (
    ("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
    ("post_attention_layernorm.", "mlp.linear_fc1.layer_norm_"),
    ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),
    ("self_attention.query_key_value.", "self_attention.linear_qkv."),
    ("self_attention.dense.", "self_attention.linear_proj."),
    ("mlp.dense_h_to_4h_2.", "mlp.linear_fc1_up."),
    ("mlp.dense_h_to_4h.", "mlp.linear_fc1."),
    ("mlp.dense_4h_to_h.", "mlp.linear_fc2."),
)
LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def strip_prefix(keys: Iterable[str]) -> str:
    """The checkpoint-wide key prefix (`model.module.`, `module.`, `model.` or '')."""
    keys = list(keys)
    for p in PREFIXES:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


def canonical(key: str) -> str:
    """The canonical name of a stored key whose checkpoint prefix is already removed."""
    key = key.removeprefix("language_model.")
    for old, new in _LEGACY:
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    m = LAYER_KEY.match(key) or re.match(r"^decoder\.layers\.()(.*)$", key)
    if m:
        rest = m.group(2)
        for old, new in _LAYER_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        key = f"decoder.layers.{m.group(1)}.{rest}" if m.group(1) else f"decoder.layers.{rest}"
    return key


def is_extra_state(key: str) -> bool:
    """Transformer Engine's `_extra_state` entries (FP8 metadata; never weights)."""
    return "._extra_state" in key or key.endswith("_extra_state")


# ---------------------------------------------------------------------------- LLM table


def _layer_keys(name: str, n: int) -> tuple[str, ...]:
    return tuple(f"decoder.layers.{i}.{name}" for i in range(n))


def vocab_rows(source_rows: list[int | None]) -> Callable[[np.ndarray], np.ndarray]:
    """Rows of a new [V, D] table from a stored [Vp, D] one: row i copies stored row
    `source_rows[i]`, or (None, a token NeMo's tokenizer did not have) is the mean of the
    copied rows, so NeMo's vocabulary padding never leaks in."""
    real = sorted({r for r in source_rows if r is not None})

    def build(w: np.ndarray) -> np.ndarray:
        w = np.asarray(w)
        out = np.empty((len(source_rows), w.shape[1]), w.dtype)
        mean = w[real].astype(np.float64).mean(axis=0).astype(w.dtype)
        for i, r in enumerate(source_rows):
            out[i] = mean if r is None else w[r]
        return out

    return build


def llm_entries(
    cfg: LlamaConfig,
    keys: set[str],
    *,
    padded_vocab: int,
    rows: list[int | None],
    prefix: tuple[str, ...] = ("llm",),
) -> list[Entry]:
    """Entries building every `Llama` parameter from canonical NeMo tensors.

    `rows` (length cfg.vocab_size) says where each embedding / LM-head row comes from
    (see `vocab_rows`); `keys` tells which optional tensors the checkpoint has.
    """
    D, F, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    N, K, H = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_size
    p = N // K
    gated = cfg.activation == "swiglu"
    out: list[Entry] = []

    def add(
        path: str,
        name: str,
        stored: tuple[int, ...],
        shape: tuple[int, ...],
        fn: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        parts = prefix + tuple(path.split("/"))
        if path.startswith("layers/"):
            ks = _layer_keys(name, L)
            out.append(
                Entry(
                    parts,
                    ks,
                    (stored,) * L,
                    (L, *shape),
                    stacked=True,
                    to_ours=fn,
                    combine=lambda ts, f=fn: f(ts[0]),
                )
            )
        else:
            out.append(Entry(parts, (name,), (stored,), shape, combine=lambda ts, f=fn: f(ts[0])))

    qkv = (N + 2 * K) * H

    def split_qkv(part: str, bias: bool) -> Callable[[np.ndarray], np.ndarray]:
        def fn(w: np.ndarray) -> np.ndarray:
            g = w.reshape(K, p + 2, H, -1) if not bias else w.reshape(K, p + 2, H, 1)
            x = {"q": g[:, :p].reshape(N, H, -1), "k": g[:, p], "v": g[:, p + 1]}[part]
            return x[..., 0] if bias else x.transpose(2, 0, 1)

        return fn

    for part, heads in (("q", N), ("k", K), ("v", K)):
        add(
            f"layers/attn/{part}/kernel",
            "self_attention.linear_qkv.weight",
            (qkv, D),
            (D, heads, H),
            split_qkv(part, False),
        )
        if cfg.bias:
            add(
                f"layers/attn/{part}/bias",
                "self_attention.linear_qkv.bias",
                (qkv,),
                (heads, H),
                split_qkv(part, True),
            )
    add(
        "layers/attn/o/kernel",
        "self_attention.linear_proj.weight",
        (D, N * H),
        (N, H, D),
        lambda w: w.T.reshape(N, H, D),
    )
    legacy_up = "decoder.layers.0.mlp.linear_fc1_up.weight" in keys
    fc1 = (2 * F if gated and not legacy_up else F, D)
    if gated and legacy_up:
        add("layers/mlp/gate/kernel", "mlp.linear_fc1.weight", fc1, (D, F), lambda w: w.T)
        add("layers/mlp/up/kernel", "mlp.linear_fc1_up.weight", fc1, (D, F), lambda w: w.T)
    elif gated:
        add("layers/mlp/gate/kernel", "mlp.linear_fc1.weight", fc1, (D, F), lambda w: w[:F].T)
        add("layers/mlp/up/kernel", "mlp.linear_fc1.weight", fc1, (D, F), lambda w: w[F:].T)
    else:
        add("layers/mlp/up/kernel", "mlp.linear_fc1.weight", fc1, (D, F), lambda w: w.T)
    add("layers/mlp/down/kernel", "mlp.linear_fc2.weight", (D, F), (F, D), lambda w: w.T)
    if cfg.bias:
        add("layers/attn/o/bias", "self_attention.linear_proj.bias", (D,), (D,), lambda w: w)
        b1 = (fc1[0],)
        if gated and legacy_up:
            add("layers/mlp/gate/bias", "mlp.linear_fc1.bias", b1, (F,), lambda w: w)
            add("layers/mlp/up/bias", "mlp.linear_fc1_up.bias", b1, (F,), lambda w: w)
        elif gated:
            add("layers/mlp/gate/bias", "mlp.linear_fc1.bias", b1, (F,), lambda w: w[:F])
            add("layers/mlp/up/bias", "mlp.linear_fc1.bias", b1, (F,), lambda w: w[F:])
        else:
            add("layers/mlp/up/bias", "mlp.linear_fc1.bias", b1, (F,), lambda w: w)
        add("layers/mlp/down/bias", "mlp.linear_fc2.bias", (D,), (D,), lambda w: w)
    norm_bias = cfg.normalization != "rmsnorm"
    for ours, theirs in (
        ("attn_norm", "self_attention.linear_qkv"),
        ("mlp_norm", "mlp.linear_fc1"),
    ):
        add(f"layers/{ours}/scale", f"{theirs}.layer_norm_weight", (D,), (D,), lambda w: w)
        if norm_bias:
            add(f"layers/{ours}/bias", f"{theirs}.layer_norm_bias", (D,), (D,), lambda w: w)
    add("final_norm/scale", "decoder.final_layernorm.weight", (D,), (D,), lambda w: w)
    if norm_bias:
        add("final_norm/bias", "decoder.final_layernorm.bias", (D,), (D,), lambda w: w)
    table = vocab_rows(rows)
    V = cfg.vocab_size
    add("embed/embedding", "embedding.word_embeddings.weight", (padded_vocab, D), (V, D), table)
    if cfg.position_embedding_type == "learned_absolute":
        S = cfg.encoder_seq_length
        add(
            "pos_embed/embedding",
            "embedding.position_embeddings.weight",
            (S, D),
            (S, D),
            lambda w: w,
        )
    if not cfg.share_embeddings_and_output_weights:
        add(
            "lm_head/kernel", "output_layer.weight", (padded_vocab, D), (D, V), lambda w: table(w).T
        )
    return out


def nemo_projector_entries(
    depth: int, in_dim: int, out_dim: int, bias: bool, keys: set[str]
) -> list[Entry]:
    """Entries for the projector from `projector.{0,2,...}.*` (or `projector.*` for a
    single torch Linear)."""
    out = []
    for j in range(depth):
        base = "projector." if depth == 1 and "projector.weight" in keys else f"projector.{2 * j}."
        fan_in = in_dim if j == 0 else out_dim
        path = ("projector", f"linear_{j + 1}")
        out.append(
            Entry(
                (*path, "kernel"),
                (base + "weight",),
                ((out_dim, fan_in),),
                (fan_in, out_dim),
                combine=lambda ts: np.asarray(ts[0]).T,
            )
        )
        if bias:
            out.append(
                Entry(
                    (*path, "bias"),
                    (base + "bias",),
                    ((out_dim,),),
                    (out_dim,),
                    combine=lambda ts: ts[0],
                )
            )
    return out
