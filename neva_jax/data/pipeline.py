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
ids with positions restarting at 0, so attention and loss stay per sample.
"""

from __future__ import annotations

import collections
import copy
import json
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from neva_jax.data.config import DataConfig
from neva_jax.data.dataset import DataError, SamplePreparer, open_source
from neva_jax.data.tokenize import TextTokenizer

_READ_KEYS = ("samples_read", "skipped", "first_skip")
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "images")


def _per_process_batch(cfg: DataConfig, batch_size: int | None, process_count: int) -> int:
    global_b = batch_size or cfg.batch_size
    if global_b % process_count:
        raise ValueError(
            f"config.data.batch_size={global_b}: must be a multiple of the process count "
            f"{process_count}"
        )
    return global_b // process_count


def _mapped(cfg: DataConfig, ds: grain.MapDataset, preparer: SamplePreparer) -> grain.IterDataset:
    it = ds.map(preparer).to_iter_dataset(
        grain.ReadOptions(
            num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer_size
        )
    )
    if cfg.num_workers > 0:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size
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
        consumed = sum(int(s["parent"]["next_index"]) for s in saved)
    except (KeyError, TypeError, ValueError):
        return None
    stats = BatchIterator._new_stats()
    if process_index == 0:
        for s in saved:
            for key, value in s["stats"].items():
                if key == "skipped":
                    for reason, n in value.items():
                        stats[key][reason] = stats[key].get(reason, 0) + n
                elif key == "first_skip":
                    for reason, where in value.items():
                        stats[key].setdefault(reason, where)
                else:
                    stats[key] += value
    return {
        "parent": {"next_index": max(0, -(-(consumed - process_index) // process_count))},
        "stats": stats,
        "exhausted": all(s.get("exhausted", False) for s in saved),
    }


def first_fit(used: list[int], imgs: list[int], n: int, k: int, t: int, m: int) -> int | None:
    """First row with room for n tokens and k images (rows hold t tokens, m images)."""
    for r in range(len(used)):
        if used[r] + n <= t and imgs[r] + k <= m:
            return r
    return None


def padding_figures(
    samples: list[tuple[int, int]], *, batch_size: int, seq_len: int, max_images: int
) -> dict[str, float]:
    """Non-padding token fraction of (length, images) samples, unpacked vs packed."""
    real = sum(n for n, _ in samples)
    unpacked_rows = math.ceil(len(samples) / batch_size) * batch_size
    batches = 0
    used, imgs = [0] * batch_size, [0] * batch_size
    for n, k in samples:  # the same first-fit as BatchIterator
        r = first_fit(used, imgs, n, k, seq_len, max_images)
        if r is None:
            batches += 1
            used, imgs = [0] * batch_size, [0] * batch_size
            r = 0
        used[r] += n
        imgs[r] += k
    batches += any(used)
    return {
        "unpacked": real / (unpacked_rows * seq_len) if unpacked_rows else 0.0,
        "packed": real / (batches * batch_size * seq_len) if batches else 0.0,
    }


class BatchIterator(grain.DatasetIterator):
    """Filters bad samples (counting them), packs or pads into static batches.

    State = the parent's state (before a sample held over for the next batch),
    the counters and the batch count; restoring it replays exactly.
    """

    def __init__(
        self,
        parent: grain.DatasetIterator,
        *,
        cfg: DataConfig,
        batch_size: int,
        pad_id: int,
        num_batches: int | None = None,
    ):
        super().__init__(parent)
        self._cfg = cfg
        self._b = batch_size
        self._t = cfg.max_seq_len
        self._m = cfg.max_images_per_row
        self._s = cfg.image_size
        self._pad_id = pad_id
        self._num_batches = num_batches
        self._pending: dict | None = None
        self._pending_state: dict | None = None
        self._exhausted = False
        self._stats = self._new_stats()

    @staticmethod
    def _new_stats() -> dict[str, Any]:
        return {
            "samples_read": 0,
            "samples_yielded": 0,
            "skipped": {},
            "first_skip": {},
            "batches": 0,
            "data_batches": 0,
            "real_tokens": 0,
            "trained_tokens": 0,
            "rows": 0,
            "samples_truncated": 0,
            "truncated_tokens": 0,
        }

    # -------------------------------------------------------------- checkpointing

    def get_state(self) -> dict[str, Any]:
        if self._pending is not None:  # rewind to just before the held-over sample was read
            before = self._pending_state or {}
            stats = copy.deepcopy(self._stats)
            stats.update(copy.deepcopy(before["read_stats"]))
            return {"parent": copy.deepcopy(before["parent"]), "stats": stats, "exhausted": False}
        return {
            "parent": self._parent.get_state(),
            "stats": copy.deepcopy(self._stats),
            "exhausted": self._exhausted,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._stats = {**self._new_stats(), **copy.deepcopy(state["stats"])}
        self._exhausted = bool(state.get("exhausted", False))
        self._pending = None
        self._pending_state = None

    def close(self) -> None:
        """Stops worker processes; drops the held-over sample (it may live in shared memory)."""
        self._pending = None
        self._pending_state = None
        super().close()

    # ---------------------------------------------------------------------- report

    def report(self) -> dict[str, Any]:
        """Counters for data_report.json (this process's shard)."""
        st = self._stats
        read = st["samples_read"]
        skipped = sum(st["skipped"].values())
        capacity = st["data_batches"] * self._b * self._t  # eval's empty tail excluded
        unpacked_rows = math.ceil(st["samples_yielded"] / self._b) * self._b
        return {
            "samples_read": read,
            "samples_yielded": st["samples_yielded"],
            "samples_skipped": skipped,
            "skip_ratio": skipped / read if read else 0.0,
            "skipped_by_reason": dict(sorted(st["skipped"].items())),
            "first_skipped_by_reason": dict(sorted(st["first_skip"].items())),
            "batches": st["batches"],
            "rows_used": st["rows"],
            "real_tokens": st["real_tokens"],
            "trained_tokens": st["trained_tokens"],
            "truncation": self._cfg.truncation,
            "samples_truncated": st["samples_truncated"],
            "truncated_tokens": st["truncated_tokens"],
            "packing": self._cfg.packing,
            "non_padding_fraction": st["real_tokens"] / capacity if capacity else 0.0,
            "non_padding_fraction_unpacked": (
                st["real_tokens"] / (unpacked_rows * self._t) if unpacked_rows else 0.0
            ),
        }

    # ------------------------------------------------------------------- iteration

    def _pull(self) -> dict | None:
        """Next good sample from the parent (counting bad ones); None at the end."""
        while True:
            if self._exhausted:
                return None
            try:
                item = next(self._parent)
            except StopIteration:
                self._exhausted = True
                return None
            st = self._stats
            st["samples_read"] += 1
            if "bad" not in item:
                return item
            reason = item["bad"]
            st["skipped"][reason] = st["skipped"].get(reason, 0) + 1
            message = f"{item['where']}: {item['detail']}"
            st["first_skip"].setdefault(reason, message)
            if self._cfg.strict:
                raise DataError(
                    f"bad sample ({reason}) in {message}; fix it or set config.data.strict=False "
                    "to skip and count bad samples"
                )
            self._check_ratio()

    def _check_ratio(self) -> None:
        st = self._stats
        read, skipped = st["samples_read"], sum(st["skipped"].values())
        if read < self._cfg.skip_ratio_min_samples or skipped <= self._cfg.max_skip_ratio * read:
            return
        reason, n = collections.Counter(st["skipped"]).most_common(1)[0]
        raise DataError(
            f"{skipped} of {read} samples skipped ({skipped / read:.1%}) > "
            f"config.data.max_skip_ratio={self._cfg.max_skip_ratio}; most are {reason} ({n}), "
            f"e.g. {st['first_skip'][reason]}; fix the data or raise the ratio"
        )

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        st = self._stats
        if self._num_batches is not None and st["batches"] >= self._num_batches:
            raise StopIteration
        rows: list[list[dict]] = [[] for _ in range(self._b)]
        used = [0] * self._b
        imgs = [0] * self._b
        n_placed = 0
        while True:
            before = None
            if self._pending is not None:
                sample, self._pending = self._pending, None
                self._pending_state = None
            else:
                if self._cfg.packing:
                    before = {
                        "parent": self._parent.get_state(),
                        "read_stats": {k: copy.deepcopy(st[k]) for k in _READ_KEYS},
                    }
                sample = self._pull()
                if sample is None:
                    break
            n, k = len(sample["ids"]), len(sample["images"])
            row = self._place(used, imgs, n, k, n_placed)
            if row is None:  # full: hold the sample for the next batch
                self._pending = sample
                self._pending_state = before
                break
            rows[row].append(sample)
            used[row] += n
            imgs[row] += k
            n_placed += 1
            if not self._cfg.packing and n_placed == self._b:
                break
        if n_placed == 0 and self._num_batches is None:
            raise StopIteration
        st["batches"] += 1
        st["data_batches"] += n_placed > 0
        st["samples_yielded"] += n_placed
        st["rows"] += sum(1 for r in rows if r)
        if logging.vlog_is_on(1):  # `--v=1`: the records of each batch (this process's)
            where = [smp["where"] for row in rows for smp in row]
            logging.vlog(1, "data batch %d records %s", st["batches"], json.dumps(where))
        return self._assemble(rows)

    def _place(self, used: list[int], imgs: list[int], n: int, k: int, n_placed: int) -> int | None:
        if not self._cfg.packing:
            return n_placed if n_placed < self._b else None
        return first_fit(used, imgs, n, k, self._t, self._m)

    def _assemble(self, rows: list[list[dict]]) -> dict[str, np.ndarray]:
        b, t, m, s = self._b, self._t, self._m, self._s
        out = {
            "input_ids": np.full((b, t), self._pad_id, np.int32),
            "targets": np.zeros((b, t), np.int32),
            "loss_mask": np.zeros((b, t), np.float32),
            "segment_ids": np.zeros((b, t), np.int32),
            "positions": np.zeros((b, t), np.int32),
            "images": np.zeros((b, m, s, s, 3), np.float32),
        }
        st = self._stats
        for r, samples in enumerate(rows):
            off = img_off = 0
            for seg, smp in enumerate(samples, 1):
                ids, trained = smp["ids"], smp["trained"]
                n = len(ids)
                out["input_ids"][r, off : off + n] = ids
                out["targets"][r, off : off + n - 1] = ids[1:]
                out["loss_mask"][r, off : off + n - 1] = trained[1:]
                out["segment_ids"][r, off : off + n] = seg
                out["positions"][r, off : off + n] = np.arange(n)
                k = len(smp["images"])
                out["images"][r, img_off : img_off + k] = smp["images"]
                off += n
                img_off += k
                st["real_tokens"] += n
                st["trained_tokens"] += int(trained[1:].sum())
                cut = int(smp.get("truncated_tokens", 0))
                st["samples_truncated"] += cut > 0
                st["truncated_tokens"] += cut
        return out
