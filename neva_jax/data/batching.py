"""Prepared samples -> static-shape batches (docs/CONTRACTS.md), checkpointable.

`BatchIterator` reads prepared samples from one grain iterator, or with
`data.group_by_modality_length` from one per modality while a schedule names the
stream each batch is filled from (`neva_jax.data.grouping`). It counts and
skips bad samples, and pads (one sample per row) or packs (first-fit: a row
holds samples 1..k as segment ids, positions restarting at 0) into a batch.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from neva_jax.data.config import DataConfig
from neva_jax.data.dataset import DataError

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "images")


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


@dataclasses.dataclass
class _Stream:
    """One parent iterator and the sample held over from it (packing: did not fit)."""

    it: grain.DatasetIterator
    exhausted: bool = False
    pending: dict | None = None
    # How to undo reading `pending`: the parent's state before, the read counters it added.
    rewind: dict | None = None

    def has_data(self) -> bool:
        return self.pending is not None or not self.exhausted

    def state(self) -> dict[str, Any]:
        """{"parent", "exhausted"} as if the held-over sample had not been read."""
        if self.rewind is not None:
            return {"parent": copy.deepcopy(self.rewind["parent"]), "exhausted": False}
        return {"parent": self.it.get_state(), "exhausted": self.exhausted}


class BatchIterator(grain.DatasetIterator):
    """Filters bad samples (counting them), packs or pads into static batches.

    `parents`: one grain iterator, or one per stream with `schedule(k)` naming the
    stream batch k is filled from (streams that run out are passed over). State:
    each parent's position before any held-over sample, the counters, the schedule
    position; restoring it replays exactly.
    """

    def __init__(
        self,
        parents: grain.DatasetIterator | Sequence[grain.DatasetIterator],
        *,
        cfg: DataConfig,
        batch_size: int,
        pad_id: int,
        num_batches: int | None = None,
        schedule: Callable[[int], int] | None = None,
        stream_names: Sequence[str] = (),
    ):
        parents = [parents] if isinstance(parents, grain.DatasetIterator) else list(parents)
        super().__init__(parents)
        if schedule is None and len(parents) != 1:
            raise ValueError("BatchIterator: several parents need a schedule")
        self._streams = [_Stream(p) for p in parents]
        self._schedule = schedule
        self._names = tuple(stream_names) or tuple(str(i) for i in range(len(parents)))
        self._position = 0  # schedule position: batches drawn so far
        self._cfg = cfg
        self._b = batch_size
        self._t = cfg.max_seq_len
        self._m = cfg.max_images_per_row
        self._s = cfg.image_size
        self._pad_id = pad_id
        self._num_batches = num_batches
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
            "batches_by_stream": {},
        }

    # -------------------------------------------------------------- checkpointing

    def get_state(self) -> dict[str, Any]:
        stats = copy.deepcopy(self._stats)
        for s in self._streams:
            if s.rewind is not None:  # un-count the reads of the held-over sample
                read = s.rewind["read"]
                stats["samples_read"] -= read["samples_read"]
                for reason, n in read["skipped"].items():
                    stats["skipped"][reason] -= n
                    if not stats["skipped"][reason]:
                        del stats["skipped"][reason]
                for reason in read["first_skip"]:
                    stats["first_skip"].pop(reason, None)
        state = {**self._streams[0].state(), "stats": stats}
        if self._schedule is not None:
            state["streams"] = [s.state() for s in self._streams[1:]]
            state["schedule_pos"] = self._position
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        saved = [(state["parent"], state.get("exhausted", False))]
        saved += [(s["parent"], s.get("exhausted", False)) for s in state.get("streams", [])]
        if len(saved) != len(self._streams):
            raise ValueError(
                "config.data.group_by_modality_length differs from the run that saved the "
                f"checkpoint (its data position has {len(saved)} stream(s), this pipeline "
                f"{len(self._streams)}); set it as that run did"
            )
        for s, (parent, exhausted) in zip(self._streams, saved, strict=True):
            try:
                s.it.set_state(parent)
            except (KeyError, TypeError, ValueError) as e:  # grain's own state layout
                raise ValueError(
                    "config.data.num_workers differs from the run that saved the checkpoint "
                    f"(its data position does not fit this pipeline: {type(e).__name__} {e}); "
                    "set it as that run did"
                ) from e
            s.exhausted, s.pending, s.rewind = bool(exhausted), None, None
        self._stats = {**self._new_stats(), **copy.deepcopy(state["stats"])}
        self._position = int(state.get("schedule_pos", 0))

    def close(self) -> None:
        """Stops worker processes; drops held-over samples (they may live in shared memory)."""
        for s in self._streams:
            s.pending = s.rewind = None
        super().close()

    # ---------------------------------------------------------------------- report

    def report(self) -> dict[str, Any]:
        """Counters for data_report.json (this process's shard)."""
        st = self._stats
        read = st["samples_read"]
        skipped = sum(st["skipped"].values())
        capacity = st["data_batches"] * self._b * self._t  # eval's empty tail excluded
        unpacked_rows = math.ceil(st["samples_yielded"] / self._b) * self._b
        out = {
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
        if self._schedule is not None:
            out["batches_by_stream"] = dict(sorted(st["batches_by_stream"].items()))
        return out

    # ------------------------------------------------------------------- iteration

    def _pull(self, stream: _Stream) -> dict | None:
        """Next good sample from `stream` (counting bad ones); None at its end."""
        while True:
            if stream.exhausted:
                return None
            try:
                item = next(stream.it)
            except StopIteration:
                stream.exhausted = True
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

    def _next_stream(self) -> int | None:
        """Index of the stream the next batch is filled from; None when all ran out."""
        if self._schedule is None:
            return 0
        while any(s.has_data() for s in self._streams):
            j = self._schedule(self._position)
            self._position += 1
            if self._streams[j].has_data():
                return j
        return None

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        st = self._stats
        if self._num_batches is not None and st["batches"] >= self._num_batches:
            raise StopIteration
        while True:
            j = self._next_stream()
            rows, n_placed = self._fill(self._streams[j]) if j is not None else ([], 0)
            if n_placed or j is None or self._schedule is None:
                break
        if n_placed == 0 and self._num_batches is None:
            raise StopIteration
        st["batches"] += 1
        st["data_batches"] += n_placed > 0
        st["samples_yielded"] += n_placed
        st["rows"] += sum(1 for r in rows if r)
        if self._schedule is not None:
            name = self._names[j]
            st["batches_by_stream"][name] = st["batches_by_stream"].get(name, 0) + 1
        if logging.vlog_is_on(1):  # `--v=1`: the records of each batch (this process's)
            where = [smp["where"] for row in rows for smp in row]
            logging.vlog(1, "data batch %d records %s", st["batches"], json.dumps(where))
        return self._assemble(rows or [[] for _ in range(self._b)])

    def _fill(self, stream: _Stream) -> tuple[list[list[dict]], int]:
        """Rows of one batch from `stream` -> (rows, samples placed)."""
        rows: list[list[dict]] = [[] for _ in range(self._b)]
        used = [0] * self._b
        imgs = [0] * self._b
        n_placed = 0
        st = self._stats
        while True:
            before = None
            if stream.pending is not None:
                sample, stream.pending, stream.rewind = stream.pending, None, None
            else:
                if self._cfg.packing:
                    before = {
                        "parent": stream.it.get_state(),
                        "samples_read": st["samples_read"],
                        "skipped": dict(st["skipped"]),
                        "first_skip": set(st["first_skip"]),
                    }
                sample = self._pull(stream)
                if sample is None:
                    break
            n, k = len(sample["ids"]), len(sample["images"])
            row = self._place(used, imgs, n, k, n_placed)
            if row is None:  # full: hold the sample for this stream's next batch
                stream.pending = sample
                stream.rewind = before and {
                    "parent": before["parent"],
                    "read": self._read_since(before),
                }
                break
            rows[row].append(sample)
            used[row] += n
            imgs[row] += k
            n_placed += 1
            if not self._cfg.packing and n_placed == self._b:
                break
        return rows, n_placed

    def _read_since(self, before: dict) -> dict[str, Any]:
        """The read counters added since `before` (what holding a sample over must undo)."""
        st = self._stats
        return {
            "samples_read": st["samples_read"] - before["samples_read"],
            "skipped": {
                r: n - before["skipped"].get(r, 0)
                for r, n in st["skipped"].items()
                if n != before["skipped"].get(r, 0)
            },
            "first_skip": sorted(set(st["first_skip"]) - before["first_skip"]),
        }

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
