"""grain pipeline: records -> static-shape batches (docs/CONTRACTS.md), checkpointable.

    cfg = run_cfg.data.with_model(image_size=336, num_image_slots=576, use_im_start_end=False)
    it = make_train_iterator(cfg, process_index=jax.process_index(),
                             process_count=jax.process_count())
    batch = next(it)             # numpy dict: input_ids, targets, loss_mask,
                                 # segment_ids, positions, images
    state = it.get_state()       # JSON-able; it.set_state(state) resumes exactly
    report = it.report()         # samples read/skipped by reason -> data_report.json
    it.close()

`BatchIterator` is a `grain.DatasetIterator`, so `grain.checkpoint.CheckpointSave`
saves it inside an Orbax checkpoint. Each process reads its own shard
(`[process_index::process_count]` of the shuffled stream) and yields
`batch_size // process_count` rows; the trainer assembles the global batch.

Training order: each file is shuffled (seed + file index) and repeated (a fresh
order per epoch), files are blended by `weights` (default: proportional to their
sizes), then sharded; decoding runs in `num_workers` grain processes (0 = threads
in this process). Eval (`make_eval_iterator`) reads every record once, unshuffled,
and yields the same number of batches on every process (padded with empty rows),
so every process runs the same number of steps.

Packing (`packing=True`) places each sample into the first row of the batch with
room for its tokens and images (first-fit); a row holds samples 1..k as segment
ids with positions restarting at 0, so attention and loss stay per sample
(`neva_jax.data.batching`).

`group_by_modality_length=True` (LLaVA-1.5 stage 2) replaces the blended stream by
one stream per modality (image / text-only) in LLaVA's length-grouped order and a
schedule that every process follows, so each global batch is all-image or
all-text (`neva_jax.data.grouping`). Its state holds both stream positions and the
schedule position; it resumes exactly and reshards like the plain stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from neva_jax.data import grouping
from neva_jax.data.batching import BATCH_KEYS, BatchIterator, first_fit, padding_figures
from neva_jax.data.config import TFDS_PREFIX, DataConfig
from neva_jax.data.dataset import DataError, RecordFileSource, SamplePreparer, open_source
from neva_jax.data.tokenize import TextTokenizer

__all__ = [
    "BATCH_KEYS",
    "BatchIterator",
    "first_fit",
    "make_eval_iterator",
    "make_train_iterator",
    "padding_figures",
    "reshard_state",
]


def _per_process_batch(cfg: DataConfig, batch_size: int | None, process_count: int) -> int:
    global_b = batch_size or cfg.batch_size
    if global_b % process_count:
        raise ValueError(
            f"config.data.batch_size={global_b}: must be a multiple of the process count "
            f"{process_count}"
        )
    return global_b // process_count


def _mapped(
    cfg: DataConfig, ds: grain.MapDataset, preparer: SamplePreparer, num_workers: int | None = None
) -> grain.IterDataset:
    it = ds.map(preparer).to_iter_dataset(
        grain.ReadOptions(
            num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer_size
        )
    )
    workers = cfg.num_workers if num_workers is None else num_workers
    if workers > 0:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    return it


def make_train_iterator(
    cfg: DataConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer: TextTokenizer | None = None,
) -> BatchIterator:
    """Shuffled, repeated, blended, sharded training batches (see the module docstring)."""
    cfg.require_model_fields()
    if not cfg.train_files:
        raise ValueError("config.data.train_files is empty; name at least one JSON/JSONL file")
    preparer = SamplePreparer(cfg, tokenizer)
    tok = preparer.tokenizer  # load once here: fail early, before workers start
    if cfg.group_by_modality_length:
        return _grouped_train_iterator(cfg, preparer, process_index, process_count)
    parts = []
    sizes = []
    for i, spec in enumerate(cfg.train_files):
        src = open_source(spec, cfg)
        if len(src) == 0:
            raise DataError(f"{spec}: holds no records")
        sizes.append(len(src))
        ds = grain.MapDataset.source(src)
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed + i)
        parts.append(ds.repeat(cfg.num_epochs or None))
    if len(parts) == 1:
        ds = parts[0]
    else:
        ds = grain.MapDataset.mix(parts, list(cfg.weights) or [float(s) for s in sizes])
    if cfg.num_epochs:  # finite: stop after num_epochs passes over the total
        ds = ds[: cfg.num_epochs * sum(sizes)]
    ds = ds[process_index::process_count]
    parent = _mapped(cfg, ds, preparer)
    return BatchIterator(
        iter(parent),
        cfg=cfg,
        batch_size=_per_process_batch(cfg, None, process_count),
        pad_id=tok.pad_id,
    )


def _grouped_train_iterator(
    cfg: DataConfig, preparer: SamplePreparer, process_index: int, process_count: int
) -> BatchIterator:
    """One stream per modality in LLaVA's length-grouped order + the shared schedule
    (`neva_jax.data.grouping`); the files are concatenated, each record once per epoch."""
    sources = []
    for spec in cfg.train_files:
        if spec.startswith(TFDS_PREFIX):
            raise ValueError(
                f"config.data.group_by_modality_length: {spec} is not a JSON/JSONL file; the "
                "grouping reads every record's length up front, which needs JSON/JSONL "
                "train_files (or set group_by_modality_length=False)"
            )
        src = RecordFileSource(spec)
        if len(src) == 0:
            raise DataError(f"{spec}: holds no records")
        sources.append(src)
    records = [r for src in sources for r in src.records]
    ds = grain.MapDataset.concatenate([grain.MapDataset.source(src) for src in sources])
    by_modality, lengths = grouping.split_by_modality(records)
    mean_tokens = None
    if cfg.packing:  # tokens per record, probed on up to 64 of each modality (same everywhere)
        mean_tokens = []
        for idx in by_modality:
            probe = [preparer.token_length(records[i]) for i in idx[:: max(1, len(idx) // 64)]]
            probe = [n for n in probe if n]
            mean_tokens.append(float(np.mean(probe)) if probe else float(cfg.max_seq_len))
    schedule = grouping.ModalitySchedule(
        grouping.steps_per_epoch(
            [len(idx) for idx in by_modality],
            batch_size=cfg.batch_size,
            mean_tokens=mean_tokens,
            seq_len=cfg.max_seq_len,
        ),
        seed=cfg.seed,
    )
    streams = []
    for m, idx in enumerate(by_modality):
        order = grouping.ModalityOrder(
            ds,
            idx,
            lengths[idx],
            megabatch=cfg.batch_size,
            seed=cfg.seed + m,
            shuffle=cfg.shuffle,
        )
        stream = order.repeat(cfg.num_epochs or None) if len(idx) else order
        workers = -(-cfg.num_workers // len(by_modality)) if len(idx) else 0
        streams.append(iter(_mapped(cfg, stream[process_index::process_count], preparer, workers)))
    return BatchIterator(
        streams,
        cfg=cfg,
        batch_size=_per_process_batch(cfg, None, process_count),
        pad_id=preparer.tokenizer.pad_id,
        schedule=schedule,
        stream_names=grouping.MODALITIES,
    )


def make_eval_iterator(
    cfg: DataConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    files: tuple[str, ...] | None = None,
    batch_size: int | None = None,
    tokenizer: TextTokenizer | None = None,
) -> BatchIterator:
    """One unshuffled pass over `files` (default `cfg.eval_files`).

    `batch_size` is global (default `cfg.batch_size`). Every eval sample is seen
    once; bad samples are counted like in training (strict/skip ratio apply).
    With several processes every one yields ceil(N / processes / rows) batches
    (empty rows at the end) so all run the same number of steps; a single process
    stops after its last sample.
    """
    cfg.require_model_fields()
    files = tuple(files if files is not None else cfg.eval_files)
    if not files:
        raise ValueError("config.data.eval_files is empty; name the evaluation files")
    preparer = SamplePreparer(cfg, tokenizer)
    tok = preparer.tokenizer
    srcs = [grain.MapDataset.source(open_source(f, cfg)) for f in files]
    ds = srcs[0] if len(srcs) == 1 else grain.MapDataset.concatenate(srcs)
    total = len(ds)
    b = _per_process_batch(cfg, batch_size, process_count)
    num_batches = math.ceil(math.ceil(total / process_count) / b)
    ds = ds[process_index::process_count]
    parent = _mapped(cfg, ds, preparer)
    return BatchIterator(
        iter(parent),
        cfg=cfg,
        batch_size=b,
        pad_id=tok.pad_id,
        num_batches=num_batches if process_count > 1 else None,
    )


def reshard_state(
    saved: Sequence[dict[str, Any]], process_index: int, process_count: int
) -> dict[str, Any] | None:
    """A training iterator's state for process `process_index` of `process_count`, from
    the states that another number of processes saved (`saved[i]`: process i's).

    Process i of N reads records i, i+N, ... of the one shuffled stream, so their saved
    positions n_i together cover its first sum(n_i) records: exactly when every process
    read as many (no skipped samples, no packing), else up to N-1 records near that
    boundary are read twice or never. Process j of M starts at its first record past
    them. Process 0 carries the summed counters (data_report.json), the others start at
    zero. None when the states are not plain positions (grain worker processes,
    `data.num_workers > 0`).
    """
    try:
        streams = [[(s["parent"], s.get("exhausted", False)) for s in saved]]
        for j in range(len(saved[0].get("streams", []))):
            streams.append(
                [(s["streams"][j]["parent"], s["streams"][j]["exhausted"]) for s in saved]
            )
        consumed = [sum(int(parent["next_index"]) for parent, _ in st) for st in streams]
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    stats = BatchIterator._new_stats()
    if process_index == 0:
        for s in saved:
            for key, value in s["stats"].items():
                if key == "first_skip":
                    for reason, where in value.items():
                        stats[key].setdefault(reason, where)
                elif isinstance(value, dict):  # counts by reason / by stream
                    for name, n in value.items():
                        stats[key][name] = stats[key].get(name, 0) + n
                else:
                    stats[key] += value
    positions = [
        (
            {"next_index": max(0, -(-(c - process_index) // process_count))},
            all(exhausted for _, exhausted in st),
        )
        for c, st in zip(consumed, streams, strict=True)
    ]
    out = {"parent": positions[0][0], "stats": stats, "exhausted": positions[0][1]}
    if len(positions) > 1:  # group_by_modality_length: every process is at the same step
        out["streams"] = [{"parent": p, "exhausted": e} for p, e in positions[1:]]
        out["schedule_pos"] = int(saved[0]["schedule_pos"])
    return out
