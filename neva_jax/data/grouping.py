"""`data.group_by_modality_length`: LLaVA-1.5 stage 2's sampler for the grain pipeline.

LLaVA (`llava/train/llava_trainer.py`, `get_modality_length_grouped_indices`) splits
the records into image and text-only ones by `modality_lengths` (the word count of
all turns, negative for text-only records), orders each modality by
`get_length_grouped_indices` (a random permutation cut into megabatches of one
optimizer step's samples, each megabatch sorted longest first), then shuffles the
megabatches of both modalities together, so every step is all-image or all-text.

Here each modality is its own random-access stream (`ModalityOrder`, a grain
`MapDataset`: index -> record, a fresh order per epoch), sharded over processes
like the ungrouped stream, and `ModalitySchedule` says which stream step k draws
from; every process computes the same schedule, so the global batch of a step is
single-modality on any number of processes. Differences from LLaVA, all because
our batches have a static shape:

- LLaVA's last, partial megabatch of each modality is merged into one mixed batch
  at the end of the epoch; here a modality's stream runs on into its next epoch, so
  no batch mixes modalities (with `num_epochs` set, the two remainders end the
  stream as two partial batches).
- LLaVA then deals a megabatch out to devices balancing their total length
  (`split_to_even_chunks`); rows are padded to `max_seq_len` here, so only the
  sorted order is kept, dealt round-robin to processes (`[p::N]`).
- A skipped (bad) sample is replaced by the next sample of the same modality.
- With `packing`, a step packs as many samples of its modality as fit, so the
  streams are consumed at different rates; the schedule then gives each modality
  steps in proportion to its tokens (count x mean length of up to 64 records
  probed from each) instead of its sample count, so both run through their epochs
  at about the same pace.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

IMAGE, TEXT = 0, 1
MODALITIES = ("image", "text")


def has_image(record: Any) -> bool:
    """True when the record names an image (`image`/`images` set and not an empty list)."""
    if not isinstance(record, dict):
        return False
    images = record.get("image", record.get("images"))
    return images is not None and not (isinstance(images, list | tuple) and not images)


def word_length(record: Any) -> int:
    """LLaVA's length of a record: whitespace-separated words over all turns."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return 0
    return sum(
        len(t["value"].split())
        for t in turns
        if isinstance(t, dict) and isinstance(t.get("value"), str)
    )


class ModalityOrder(grain.MapDataset):
    """One modality's records (`indices` into `parent`) in LLaVA's length-grouped order.

    Epoch e (index // len) is a permutation of `indices` seeded by (seed, e), cut
    into megabatches of `megabatch` records, each sorted by `lengths` longest first
    (stable). `shuffle=False` keeps the file order (still sorted per megabatch).
    Repeat it (`.repeat(n)`) for several epochs.
    """

    def __init__(
        self,
        parent: grain.MapDataset,
        indices: Sequence[int],
        lengths: Sequence[int],
        *,
        megabatch: int,
        seed: int,
        shuffle: bool = True,
    ):
        super().__init__(parent)
        self._indices = np.asarray(indices, np.int64)
        self._lengths = np.asarray(lengths, np.int64)
        self._megabatch = max(1, int(megabatch))
        self._seed = int(seed)
        self._shuffle = shuffle
        self._orders: dict[int, np.ndarray] = {}  # the last two epochs used

    def __len__(self) -> int:
        return len(self._indices)

    def __str__(self) -> str:
        return f"ModalityOrder(n={len(self._indices)}, megabatch={self._megabatch})"

    def order(self, epoch: int) -> np.ndarray:
        """Parent indices of epoch `epoch`, in the order they are read."""
        got = self._orders.get(epoch)
        if got is None:
            got = self._orders[epoch] = self._compute_order(epoch)
            for old in sorted(self._orders)[:-2]:
                self._orders.pop(old, None)
        return got

    def _compute_order(self, epoch: int) -> np.ndarray:
        n = len(self._indices)
        if self._shuffle:
            perm = np.random.default_rng([self._seed, epoch]).permutation(n)
        else:
            perm = np.arange(n)
        keys = (np.arange(n), -self._lengths[perm], np.arange(n) // self._megabatch)
        return self._indices[perm[np.lexsort(keys)]]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), len(self._indices))
        return self._parent[int(self.order(epoch)[i])]

    def _getitems(self, indices: Sequence[int]) -> list[Any]:
        return [self[i] for i in indices]


class ModalitySchedule:
    """Which modality's stream step k draws from (the same on every process).

    Block r (about one epoch) holds floor((r+1) e_m) - floor(r e_m) steps of
    modality m, e_m = `steps_per_epoch[m]`, in a random order seeded by (seed, r):
    over R blocks modality m gets floor(R e_m) steps, so whole epochs of both
    streams are used up together, as LLaVA's shuffled megabatches are.
    """

    def __init__(self, steps_per_epoch: Sequence[float], seed: int):
        self._e = np.asarray(steps_per_epoch, np.float64)
        if not (self._e >= 0).all() or self._e.sum() <= 0:
            raise ValueError(f"modality schedule: steps per epoch {list(self._e)} must be >= 0")
        self._seed = int(seed)
        self._blocks: dict[int, np.ndarray] = {}

    def _before(self, r: int) -> int:
        """Steps in blocks 0 .. r-1."""
        return int(np.floor(r * self._e + 1e-9).sum())

    def _block(self, r: int) -> np.ndarray:
        if r not in self._blocks:
            counts = np.floor((r + 1) * self._e + 1e-9) - np.floor(r * self._e + 1e-9)
            kinds = np.repeat(np.arange(len(self._e)), counts.astype(np.int64))
            self._blocks = {r: np.random.default_rng([self._seed, r]).permutation(kinds)}
        return self._blocks[r]

    def __call__(self, k: int) -> int:
        lo, hi = 0, 1
        while self._before(hi) <= k:  # the block holding step k: before(r) <= k < before(r+1)
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._before(mid) <= k else (lo, mid)
        return int(self._block(lo)[k - self._before(lo)])


def steps_per_epoch(
    counts: Sequence[int],
    *,
    batch_size: int,
    mean_tokens: Sequence[float] | None = None,
    seq_len: int = 0,
) -> list[float]:
    """Steps one epoch of each modality takes: count / batch rows, or with packing
    (`mean_tokens` given) its tokens / the batch's token capacity."""
    if mean_tokens is None:
        return [c / batch_size for c in counts]
    return [c * t / (batch_size * seq_len) for c, t in zip(counts, mean_tokens, strict=True)]


def split_by_modality(records: Sequence[Any]) -> tuple[list[np.ndarray], np.ndarray]:
    """-> ([image record indices, text record indices], word lengths of all records)."""
    lengths = np.array([word_length(r) for r in records], np.int64)
    image = np.array([has_image(r) for r in records], bool)
    return [np.flatnonzero(image), np.flatnonzero(~image)], lengths
