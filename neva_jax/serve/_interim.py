"""TEMPORARY: a runner that replays whole `generate_tokens` answers token by token
(until the slot KV cache API lands; then `runner.KVSlotRunner` replaces it)."""

from __future__ import annotations

import numpy as np

from neva_jax.eval import generate as gen_lib
from neva_jax.eval.sampling import SamplingParams
from neva_jax.serve.runner import StepOutput


class InterimRunner:
    def __init__(self, model, *, slots, max_len, eos_ids, pad_id, max_images=1, buckets=None):
        self.model, self.slots, self.max_len = model, slots, max_len
        self.eos_ids = frozenset(eos_ids)
        self.pad_id = pad_id
        self.answers: list[list[tuple[int, float]]] = [[] for _ in range(slots)]

    def compilations(self) -> int:
        return gen_lib._generate_jit._cache_size()

    def warmup(self) -> None:
        pass

    def prefill(self, slot, ids, pixels, params):
        out = gen_lib.generate_tokens(
            self.model,
            [ids],
            None if pixels is None else pixels[None],
            max_new_tokens=params.max_tokens,
            eos_ids=sorted(self.eos_ids),
            pad_id=self.pad_id,
            sampling=SamplingParams(
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                seed=params.seed or 0,
            ),
        )
        self.answers[slot] = list(zip(out.token_ids[0], out.logprobs[0], strict=True))
        return self._out([slot])

    def decode(self, active):
        return self._out(range(self.slots))

    def free(self, slot):
        self.answers[slot] = []

    def _out(self, rows):
        rows = list(rows)
        toks = np.zeros(len(rows), np.int32)
        lps = np.zeros(len(rows), np.float32)
        for i, s in enumerate(rows):
            if self.answers[s]:
                toks[i], lps[i] = self.answers[s].pop(0)
        z = np.zeros((len(rows), 5))
        return StepOutput(toks, lps, z.astype(np.int32), z.astype(np.float32))
