"""NeMo-layout tensors from neva-jax parameters, and the torch_dist writer.

`llm_tensors` is the inverse of `nemo_keys.llm_entries`: Megatron-core names with the
L layers stacked on a leading axis, qkv interleaved per kv group, fc1 = cat(gate, up),
the vocabulary padded to a multiple of 128. `write_dist` writes a Megatron dist
checkpoint folder as Megatron does: one `torch.save`d chunk per layer (fc1 as its gate
and up halves), `_extra_state` byte entries per layer, `.metadata` (torch's own
`Metadata` class, readable by plain torch.distributed.checkpoint), `metadata.json` and
`common.pt`.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neva_jax.convert import hf_clip
from neva_jax.convert.nemo_io import require_torch, to_torch
from neva_jax.model.llama import LlamaConfig

DIST_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
# How a tensor is cut into stored chunks: per layer, per layer in gate/up halves, whole.
LAYERS, LAYERS_GLU, WHOLE = "layers", "layers_glu", "whole"


def _get(tree: Mapping[str, Any], path: str) -> np.ndarray:
    for p in path.split("/"):
        tree = tree[p]
    return np.asarray(tree)


def llm_tensors(
    params: Mapping[str, Any], cfg: LlamaConfig, *, vocab: int, padded_vocab: int
) -> Iterator[tuple[str, np.ndarray, str]]:
    """(mcore key, array, chunking) of every LLM tensor; the first `vocab` rows of the
    embedding / LM head are kept, then zero rows up to `padded_vocab`."""
    N, K, H, D = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_size, cfg.hidden_size
    L, p = cfg.num_layers, cfg.num_attention_heads // cfg.num_kv_heads

    def qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: bool) -> np.ndarray:
        if not bias:  # kernels [L, D, n, H] -> [L, n, H, D]
            q, k, v = (x.transpose(0, 2, 3, 1) for x in (q, k, v))
        tail = q.shape[3:]
        g = np.concatenate([q.reshape(L, K, p, H, *tail), k[:, :, None], v[:, :, None]], axis=2)
        return g.reshape(L, (N + 2 * K) * H, *tail)

    def rows(w: np.ndarray) -> np.ndarray:
        w = w[:vocab]
        pad = np.zeros((padded_vocab - w.shape[0], w.shape[1]), w.dtype)
        return np.concatenate([w, pad])

    attn, mlp = "decoder.layers.self_attention", "decoder.layers.mlp"
    yield "embedding.word_embeddings.weight", rows(_get(params, "embed/embedding")), WHOLE
    if cfg.position_embedding_type == "learned_absolute":
        yield "embedding.position_embeddings.weight", _get(params, "pos_embed/embedding"), WHOLE
    a = {n: _get(params, f"layers/attn/{n}/kernel") for n in "qkvo"}
    yield f"{attn}.linear_qkv.weight", qkv(a["q"], a["k"], a["v"], False), LAYERS
    o = a["o"].reshape(L, N * H, D).transpose(0, 2, 1)
    yield f"{attn}.linear_proj.weight", o, LAYERS
    gated = cfg.activation == "swiglu"
    up = _get(params, "layers/mlp/up/kernel").transpose(0, 2, 1)
    if gated:
        gate = _get(params, "layers/mlp/gate/kernel").transpose(0, 2, 1)
        yield f"{mlp}.linear_fc1.weight", np.concatenate([gate, up], axis=1), LAYERS_GLU
    else:
        yield f"{mlp}.linear_fc1.weight", up, LAYERS
    yield (
        f"{mlp}.linear_fc2.weight",
        _get(params, "layers/mlp/down/kernel").transpose(0, 2, 1),
        LAYERS,
    )
    if cfg.bias:
        b = {n: _get(params, f"layers/attn/{n}/bias") for n in "qkvo"}
        yield f"{attn}.linear_qkv.bias", qkv(b["q"], b["k"], b["v"], True), LAYERS
        yield f"{attn}.linear_proj.bias", b["o"], LAYERS
        b_up = _get(params, "layers/mlp/up/bias")
        if gated:
            b_gate = _get(params, "layers/mlp/gate/bias")
            yield f"{mlp}.linear_fc1.bias", np.concatenate([b_gate, b_up], axis=1), LAYERS_GLU
        else:
            yield f"{mlp}.linear_fc1.bias", b_up, LAYERS
        yield f"{mlp}.linear_fc2.bias", _get(params, "layers/mlp/down/bias"), LAYERS
    with_bias = cfg.normalization != "rmsnorm"
    for ours, theirs in (("attn_norm", f"{attn}.linear_qkv"), ("mlp_norm", f"{mlp}.linear_fc1")):
        yield f"{theirs}.layer_norm_weight", _get(params, f"layers/{ours}/scale"), LAYERS
        if with_bias:
            yield f"{theirs}.layer_norm_bias", _get(params, f"layers/{ours}/bias"), LAYERS
    yield "decoder.final_layernorm.weight", _get(params, "final_norm/scale"), WHOLE
    if with_bias:
        yield "decoder.final_layernorm.bias", _get(params, "final_norm/bias"), WHOLE
    if not cfg.share_embeddings_and_output_weights:
        yield "output_layer.weight", rows(_get(params, "lm_head/kernel").T), WHOLE


def vision_tensors(
    params: Mapping[str, Any], cfg: Any, prefix: str
) -> Iterator[tuple[str, np.ndarray, str]]:
    """The CLIP tower in Hugging Face names under `prefix` (post-LayerNorm as identity)."""
    for m in hf_clip.param_table(cfg, prefix=prefix):
        for key, value in m.export(_get(params, "/".join(m.path))).items():
            yield key, value, WHOLE
    E = cfg.hidden_size
    yield f"{prefix}post_layernorm.weight", np.ones((E,), np.float32), WHOLE
    yield f"{prefix}post_layernorm.bias", np.zeros((E,), np.float32), WHOLE


def projector_tensors(
    params: Mapping[str, Any], depth: int, bias: bool, prefix: str, *, sequential: bool
) -> Iterator[tuple[str, np.ndarray, str]]:
    """torch Linear weights of the projector: `{prefix}{0,2,..}.*`, or `{prefix}*` for a
    single layer that is not a Sequential (NeMo 1's `linear` adapter)."""
    for j in range(depth):
        layer = params[f"linear_{j + 1}"]
        base = f"{prefix}{2 * j}." if sequential or depth > 1 else prefix
        yield base + "weight", np.ascontiguousarray(np.asarray(layer["kernel"]).T), WHOLE
        if bias:
            yield base + "bias", np.asarray(layer["bias"]), WHOLE


def extra_states(prefix: str, num_layers: int) -> dict[str, bytes]:
    """`_extra_state` entries of the decoder's linear layers (no FP8 state: [None])."""
    torch = require_torch()
    buf = io.BytesIO()
    torch.save([None], buf)
    blob = buf.getvalue()
    return {
        f"{prefix}decoder.layers.{m}._extra_state/shard_{i}_{num_layers}": blob
        for m in EXTRA_STATE_MODULES
        for i in range(num_layers)
    }


def _chunks(shape: tuple[int, ...], how: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    if how == WHOLE:
        return [((0,) * len(shape), shape)]
    out = []
    for layer in range(shape[0]):
        if how == LAYERS:
            out.append(((layer, *(0,) * (len(shape) - 1)), (1, *shape[1:])))
        else:
            half = shape[1] // 2
            for h in (0, half):
                out.append(((layer, h, *(0,) * (len(shape) - 2)), (1, half, *shape[2:])))
    return out


def write_dist(
    folder: Path,
    tensors: Iterator[tuple[str, np.ndarray, str]],
    objects: Mapping[str, bytes],
    common: Any,
    dtype: Any,
) -> None:
    """Writes a Megatron torch_dist checkpoint folder (see the module docstring)."""
    torch = require_torch()
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    name = "__0_0.distcp"
    with open(folder / name, "wb") as f:
        for key, blob in objects.items():
            storage[MetadataIndex(key)] = _StorageInfo(name, f.tell(), len(blob))
            f.write(blob)
            state[key] = BytesStorageMetadata()
        for key, value, how in tensors:
            value = np.asarray(value).astype(dtype)
            chunks = []
            for offsets, sizes in _chunks(value.shape, how):
                part = value[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]
                buf = io.BytesIO()
                torch.save(to_torch(part), buf)
                storage[MetadataIndex(key, torch.Size(offsets))] = _StorageInfo(
                    name, f.tell(), buf.tell()
                )
                f.write(buf.getvalue())
                chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
            props = TensorProperties(dtype=to_torch(value[:0]).dtype)
            state[key] = TensorStorageMetadata(props, torch.Size(value.shape), chunks)
    metadata = Metadata(state_dict_metadata=state, storage_data=storage, storage_meta=StorageMeta())
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    (folder / "metadata.json").write_text(json.dumps(DIST_METADATA))
    torch.save(common, folder / "common.pt")
