"""Packed and unpacked batches of the same samples give the same per-sample loss.

Uses the foundation model (`neva_jax.model.neva.Neva`, tiny, random weights) on
the synthetic stage-2 data: segment ids and per-sample positions must keep
attention, RoPE and the loss inside each sample.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neva_jax.data import pipeline
from neva_jax.data.config import DataConfig
from neva_jax.model import clip, llama, neva


def _random_model(cfg: neva.NevaConfig) -> neva.Neva:
    """Neva(cfg) with numpy-random weights (faster on CPU than compiling the initialisers)."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: neva.Neva(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        noise = rng.normal(size=leaf.shape)
        name = jax.tree_util.keystr(path)
        value = 1 + 0.1 * noise if "norm" in name and "scale" in name else 0.1 * noise
        return jnp.asarray(value, leaf.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def _per_sample_losses(model: neva.Neva, batches: list[dict]) -> dict[tuple, float]:
    """{sample's input ids: mean CE over its trained targets}."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits_fn(state, b):
        m = nnx.merge(graphdef, state)
        return m(
            b["input_ids"], b["images"], positions=b["positions"], segment_ids=b["segment_ids"]
        )

    out = {}
    for b in batches:
        logits = logits_fn(state, {k: jnp.asarray(v) for k, v in b.items()})
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -np.asarray(jnp.take_along_axis(logp, jnp.asarray(b["targets"])[..., None], -1))[
            ..., 0
        ]
        for r in range(b["input_ids"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                sel = seg == s
                mask = b["loss_mask"][r][sel]
                key = tuple(b["input_ids"][r][sel])
                out[key] = float((ce[r][sel] * mask).sum() / mask.sum())
    return out


def test_packed_and_unpacked_losses_match(synth_cfg: DataConfig) -> None:
    vision = clip.tiny()  # 32 px, patch 8: 16 image tokens
    cfg = neva.NevaConfig(llm=llama.tiny(), vision=vision, projector="mlp2x_gelu", image_token_id=4)
    model = _random_model(cfg)
    data = dataclasses.replace(
        synth_cfg,
        image_size=vision.image_size,
        num_image_slots=cfg.num_image_tokens,
        max_seq_len=192,
        max_images_per_row=3,
    )
    unpacked_it = pipeline.make_eval_iterator(data)
    packed_it = pipeline.make_eval_iterator(dataclasses.replace(data, packing=True))
    unpacked, packed = list(unpacked_it), list(packed_it)
    unpacked_it.close()
    packed_it.close()
    assert max(int(b["segment_ids"].max()) for b in packed) >= 2  # really packed
    a = _per_sample_losses(model, unpacked)
    b = _per_sample_losses(model, packed)
    assert a.keys() == b.keys() and len(a) == 16
    worst = max(abs(a[k] - b[k]) for k in a)
    print(f"max per-sample loss difference packed vs unpacked: {worst:.2e}")
    assert worst < 1e-5
    print(
        "non-padding fraction: unpacked "
        f"{unpacked_it.report()['non_padding_fraction']:.3f}, packed "
        f"{packed_it.report()['non_padding_fraction']:.3f}"
    )
    assert packed_it.report()["non_padding_fraction"] > unpacked_it.report()["non_padding_fraction"]
