"""Packing: real-token throughput of the stage-2 step on the synthetic data, packed vs padded.

The bundled synthetic stage-2 conversations (`neva_jax.data.synth`, vicuna_v1,
one image of P slots each) go through the real data pipeline at one static shape
for both variants: `max_seq_len` with room for two samples. Padded rows hold one
sample each; packed rows hold as many as fit (first-fit, up to
`max_images_per_row` images). Batches are read before timing, so the figure is
the step's: real (non-padding) tokens per second, median over `repeats` steps (each
on its own batch; min, max and spread printed too).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

from neva_jax.bench import jax_side, timing
from neva_jax.bench.report import Report
from neva_jax.bench.shapes import BenchShape

PACKED_IMAGES_PER_ROW = 2


def read_batches(
    folder: str, shape: BenchShape, *, packing: bool, seq_len: int, batch: int, n: int
) -> list[dict[str, np.ndarray]]:
    """n batches of the synthetic stage-2 set through the real pipeline."""
    from neva_jax.data.config import DataConfig
    from neva_jax.data.pipeline import make_train_iterator

    v = shape.model.vision
    cfg = DataConfig(
        train_files=os.path.join(folder, "stage2.json"),
        image_folder=os.path.join(folder, "images"),
        tokenizer=os.path.join(folder, "tokenizer"),
        template="vicuna_v1",
        image_size=v.image_size,
        num_image_slots=shape.model.num_image_tokens,
        max_seq_len=seq_len,
        batch_size=batch,
        packing=packing,
        max_images_per_row=PACKED_IMAGES_PER_ROW if packing else 1,
        read_threads=1,
        prefetch_buffer_size=2,
    )
    it = make_train_iterator(cfg)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def run_packing(
    report: Report,
    shape: BenchShape,
    *,
    repeats: int = 3,
    logits_fraction: float = 1.0,
    seq_len: int | None = None,
) -> dict[str, float]:
    """Real tokens/s of padded and packed batches; prints both and their ratio.

    `seq_len` defaults to twice the shape's T with half its rows (the train bench's
    B * T).
    """
    from neva_jax.data import synth

    seq_len = seq_len or 2 * shape.seq_len
    rows = max(shape.batch_size * shape.seq_len // seq_len, 1)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="neva_bench_synth_") as folder:
        synth.generate(folder, seed=0, n_train=8 * rows * (repeats + 1), n_eval=1)
        from neva_jax.data.tokenize import load_tokenizer

        image_id = load_tokenizer(os.path.join(folder, "tokenizer")).image_token_id
        cfg = dataclasses.replace(shape.model, image_token_id=image_id)
        model = jax_side.random_model(cfg)
        for name, packing in (("padded", False), ("packed", True)):
            batches = read_batches(
                folder, shape, packing=packing, seq_len=seq_len, batch=rows, n=repeats + 1
            )
            ours = jax_side.OursTrain(model, 2, logits_fraction=logits_fraction)
            ours.compile(batches[0])
            ours.step()  # warm-up
            times = [timing.timed(lambda b=b, o=ours: o.step(b))[1] for b in batches[1:]]
            real = float(np.mean([np.sum(b["segment_ids"] > 0) for b in batches[1:]]))
            samples = float(np.mean([_samples(b) for b in batches[1:]]))
            wall = timing.summary("step_s", times)
            step_s = wall["step_s"]
            out[name] = real / step_s
            report.emit(
                "packing",
                name,
                seq_len=seq_len,
                batch=rows,
                **wall,
                real_tokens_per_step=real,
                samples_per_step=samples,
                non_padding_fraction=real / (rows * seq_len),
                real_tokens_per_s=real / step_s,
            )
    ratio = out["packed"] / out["padded"]
    report.emit("packing", "ratio", real_tokens_per_s_ratio=ratio)
    report.target("packing real tokens/s packed vs padded", ratio, "reported (> 1)", ratio > 1)
    return out


def _samples(batch: dict[str, np.ndarray]) -> int:
    """Samples in a batch: the distinct non-zero segment ids of each row."""
    return int(sum(len(set(row[row > 0].tolist())) for row in batch["segment_ids"]))
