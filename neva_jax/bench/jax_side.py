"""Our side of the benchmarks: the project's importer, train step and generation code.

Nothing here is benchmark-only model code: `OursTrain` drives
`neva_jax.train.step.make_train_step` (the pure step the trainer runs) under
`jax.jit` with the state donated, and `generate` calls
`neva_jax.eval.generate.generate_tokens`. Weights come from a `transformers`
folder through `neva_jax.convert.hf.import_llava`, so both sides hold identical
parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from neva_jax import platform
from neva_jax.bench import timing
from neva_jax.model.neva import Neva, NevaConfig
from neva_jax.run_config import TrainSection
from neva_jax.train import optimizer as opt_lib
from neva_jax.train import state as state_lib
from neva_jax.train import step as step_lib

LR = 2e-5
GRAD_CLIP = 1.0
STAGE_PARTS = {1: ("projector",), 2: ("projector", "llm")}


def import_model(folder: str, adapter: str | None = None, **runtime: Any) -> Neva:
    """A `Neva` with the weights of the `transformers` folder (run-time fields set),
    plus a PEFT LoRA `adapter` folder's adapters when given."""
    from neva_jax.convert import hf

    return hf.import_llava(folder, adapter=adapter, **platform.resolve_runtime(**runtime)).model


def random_model(cfg: NevaConfig, seed: int = 0) -> Neva:
    """A `Neva` with random weights on the default device (the GPU bench)."""
    from flax import nnx

    from neva_jax import sharding

    return sharding.unsharded(lambda: Neva(cfg, rngs=nnx.Rngs(seed)))


def optimizer(steps: int = 1000) -> tuple[Any, Any]:
    """(tx, schedule): the trainer's optimizer (clip 1.0 + AdamW, no weight decay)."""
    train = TrainSection(steps=steps, lr=LR, warmup_steps=0, weight_decay=0.0, grad_clip=GRAD_CLIP)
    return opt_lib.make_optimizer(train), opt_lib.learning_rate_schedule(train)


class OursTrain:
    """The jitted, donated train step of one stage, with its state.

    `compile(batch)` lowers and compiles it (seconds in `lower_s`/`compile_s`);
    `step()` runs one step on the batch given to `compile` and blocks. `parts`
    overrides the stage's trained parts (e.g. projector + LoRA adapters).
    """

    def __init__(
        self,
        model: Neva,
        stage: int,
        *,
        logits_fraction: float = 1.0,
        parts: tuple[str, ...] | None = None,
    ):
        self.stage = stage
        self.parts = parts or STAGE_PARTS[stage]
        tx, schedule = optimizer()
        self.graphdef, state = state_lib.create(model, self.parts, tx)
        # The step donates its state: own copies, so `model` stays usable afterwards.
        self.state = jax.tree.map(lambda x: x.copy(), state)
        fn = step_lib.make_train_step(
            self.graphdef,
            tx,
            schedule,
            trained_parts=self.parts,
            logits_fraction=logits_fraction,
        )
        self.jitted = jax.jit(fn, donate_argnums=(0,))
        self.compiled: Any = None
        self.batch: Any = None
        self.lower_s = self.compile_s = 0.0
        self.last_loss = float("nan")

    def num_params(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        n = opt_lib.count_params(self.state.params)
        return n, n + opt_lib.count_params(self.state.frozen)

    def compile(self, batch: dict[str, np.ndarray]) -> None:
        """Lowers and compiles the step for `batch`'s shapes (timed); keeps the batch."""
        self.batch = {k: jax.device_put(v) for k, v in batch.items()}
        lowered, self.lower_s = timing.timed(lambda: self.jitted.lower(self.state, self.batch))
        self.compiled, self.compile_s = timing.timed(lowered.compile)

    def step(self, batch: dict[str, np.ndarray] | None = None) -> float:
        """One step on `batch` (default: the batch given to `compile`); returns the loss."""
        batch = self.batch if batch is None else {k: jax.device_put(v) for k, v in batch.items()}
        self.state, metrics = self.compiled(self.state, batch)
        self.last_loss = float(metrics["loss"])  # blocks until the step is done
        return self.last_loss


def abstract_compile_seconds(cfg: NevaConfig, batch: dict[str, np.ndarray], stage: int) -> dict:
    """Lower + compile seconds of the stage's train step for `cfg`, nothing allocated."""
    parts = STAGE_PARTS[stage]
    tx, schedule = optimizer()
    graphdef, abstract = state_lib.abstract(lambda: random_model(cfg), parts, tx)
    fn = step_lib.make_train_step(graphdef, tx, schedule, trained_parts=parts)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    lowered, lower_s = timing.timed(lambda: jax.jit(fn, donate_argnums=(0,)).lower(abstract, spec))
    _, compile_s = timing.timed(lowered.compile)
    return {"lower_s": lower_s, "compile_s": compile_s, "total_s": lower_s + compile_s}


def greedy_tokens(
    model: Neva,
    prompts: Sequence[Sequence[int]],
    images: np.ndarray,
    max_new_tokens: int,
    decode_layers: Sequence[Any] | None = None,
) -> np.ndarray:
    """Greedy generation of exactly `max_new_tokens` tokens (no reachable EOS) -> [B, N].

    `decode_layers`: the per-layer decode weights made once (`prepare_decode_layers`),
    as `Generator` and the server hold them."""
    from neva_jax.eval.generate import generate_tokens

    never = model.config.llm.vocab_size  # an id the model cannot produce
    out = generate_tokens(
        model,
        prompts,
        images,
        max_new_tokens=max_new_tokens,
        eos_ids=[never],
        pad_id=0,
        decode_layers=decode_layers,
    )
    return np.asarray(out.token_ids, np.int32)
