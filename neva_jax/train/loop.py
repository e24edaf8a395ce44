"""The training loop and `--mode eval`: all I/O lives here, the step is pure.

    train(cfg, workdir, hooks=Hooks())  resume or initialise, train, checkpoint, evaluate
    evaluate(cfg, workdir)              restore the newest checkpoint (or `eval.checkpoint`),
                                        write eval/*

The loop's state is one typed object (`Loop`); a caller can add a batch transform
or an after-step function to every step (`Hooks`), e.g. to inject a fault or send
a signal at a chosen step.

Per step the loop reads a batch, dispatches step t+1 and only then fetches step
t's metrics (so the device never waits for Python), logs, checks the non-finite
streak, and saves on schedule; it evaluates every `eval.every_steps` and at the
end when `data.eval_files` names an evaluation set (without one it only trains).
SIGTERM sets a flag (several processes: JAX's preemption sync point) and the loop
saves the current step, waits for the commit and returns normally (exit 0). After K
consecutive non-finite steps (`train.max_consecutive_nonfinite`) it raises
`NonFiniteError`:

    train: K consecutive non-finite steps (loss=nan) up to step N; the updates were
    skipped and parameters are unchanged since step M. Lower train.lr, check the data
    (python -m neva_jax.data validate), or raise train.max_consecutive_nonfinite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding

from neva_jax import distributed, platform
from neva_jax.convert import checkpoint
from neva_jax.data import pipeline
from neva_jax.data.conversation import get_template
from neva_jax.data.dataset import DataError, open_source
from neva_jax.data.tokenize import TextTokenizer, load_tokenizer
from neva_jax.model import parts as model_parts
from neva_jax.model.neva import NevaConfig, with_runtime
from neva_jax.run_config import (
    ConfigError,
    RunConfig,
    check_architecture,
    model_for_tokenizer,
)
from neva_jax.train import build, checkpointer
from neva_jax.train import metrics as metrics_lib
from neva_jax.train import optimizer as opt_lib
from neva_jax.train import state as state_lib
from neva_jax.train import step as step_lib

DATA_REPORT = "data_report.json"
LocalBatch = dict[str, np.ndarray]  # this process's rows (docs/CONTRACTS.md "The batch")


class NonFiniteError(RuntimeError):
    """K consecutive non-finite steps; main exits with status 3."""


@dataclasses.dataclass(frozen=True)
class Run:
    """What train() and evaluate() share: the config, tokenizer, model config and mesh."""

    cfg: RunConfig
    tokenizer: TextTokenizer
    model_config: NevaConfig  # cfg.model with the tokenizer's <image> id
    mesh: jax.sharding.Mesh


def prepare(cfg: RunConfig) -> Run:
    """Loads the tokenizer and sets its `<image>` id on the model config (no compilation)."""
    template = get_template(cfg.data.template)
    tok = load_tokenizer(
        cfg.data.tokenizer,
        use_im_start_end=cfg.data.use_im_start_end,
        control_tokens=getattr(template, "control_tokens", ()),
    )
    ncfg = model_for_tokenizer(cfg, tok.image_token_id, tok.vocab_size)
    # Backend-dependent run-time choices are made here, once (see neva_jax.platform).
    chosen = {"attention_impl": ncfg.llm.attention_impl, "scan_layers": ncfg.llm.scan_layers}
    ncfg = with_runtime(ncfg, **platform.resolve_runtime(**chosen))
    return Run(cfg, tok, ncfg, build.run_mesh(cfg))


def global_batch(local: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over (data, fsdp)."""
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(local[k]))
        for k in pipeline.BATCH_KEYS
    }


def _batch_stats(local: dict[str, np.ndarray], image_token_id: int, p: int) -> dict[str, int]:
    n = jax.process_count()
    slots = int(np.sum(local["input_ids"] == image_token_id)) * n
    return {
        "tokens": int(np.sum(local["segment_ids"] > 0)) * n,
        "image_tokens": slots,
        "images": slots // max(p, 1),
    }


class StopFlag:
    """Set by SIGTERM (single process) or the preemption sync point: save and stop."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        """The SIGTERM handler (no logging here: it may interrupt a logging call)."""
        del signum, frame
        self.requested = True


@contextlib.contextmanager
def _sigterm_sets(flag: StopFlag) -> Iterator[None]:
    """Lets SIGTERM set `flag` while the block runs (main thread, one process).

    With several processes JAX's preemption sync manager owns SIGTERM and
    `distributed.reached_preemption_sync_point` picks the step all processes save at.
    """
    if jax.process_count() > 1:
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, flag)
    except ValueError:  # not the main thread: no handler
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_data_report(workdir: str, iterator: Any, step: int | None = None) -> None:
    """data_report.json: samples read and skipped by reason (this process's shard)."""
    if jax.process_index() != 0 or not hasattr(iterator, "report"):
        return
    report = iterator.report()
    if step is not None:
        report = {"step": step, **report}
    tmp = os.path.join(workdir, DATA_REPORT + ".tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, os.path.join(workdir, DATA_REPORT))


def _copy_tokenizer(run: Run, workdir: str) -> None:
    """Saves the tokenizer (with `<image>`) to `workdir/tokenizer` once."""
    dst = os.path.join(workdir, "tokenizer")
    if jax.process_index() != 0 or os.path.isdir(dst):
        return
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run.tokenizer.hf.save_pretrained(tmp)
    os.replace(tmp, dst)


def evaluate_state(
    run: Run,
    eval_fn: Any,
    state: state_lib.TrainState,
    shardings: dict[str, Any],
    stop: StopFlag | None = None,
) -> dict[str, float] | None:
    """eval/loss, eval/accuracy, eval/tokens over the eval files (or `eval.steps` batches);
    None when `stop` was requested on the way (SIGTERM, one process).

    An eval set none of whose samples could be used is a `DataError` (its loss would read
    0); skipped samples are logged with their reasons."""
    cfg = run.cfg
    bs = cfg.eval.batch_size or cfg.train.batch_size // cfg.train.grad_accum_steps
    # eval.steps counts train.batch_size samples when the batch is the micro-batch, so
    # the same samples are evaluated whatever train.grad_accum_steps is.
    limit = cfg.eval.steps * (1 if cfg.eval.batch_size else cfg.train.grad_accum_steps)
    it = pipeline.make_eval_iterator(
        run.cfg.data,
        batch_size=bs,
        tokenizer=run.tokenizer,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    sums = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0}
    try:
        for i, local in enumerate(it):
            if limit and i >= limit:
                break
            if stop is not None and stop.requested:
                return None
            batch = global_batch(local, shardings)
            params = model_parts.merge_dicts(state.params, state.frozen)
            out = jax.device_get(eval_fn(params, state.other, batch))
            for k in sums:
                sums[k] += float(out[k])
        report = it.report()
    finally:
        it.close()
    skipped = report["samples_skipped"]
    if skipped:
        reasons = ", ".join(f"{r} {n}" for r, n in report["skipped_by_reason"].items())
        first = next(iter(report["first_skipped_by_reason"].values()))
        counted = (
            f"{skipped} of {report['samples_read']} eval samples skipped ({reasons}; e.g. {first})"
        )
        if not sums["tokens"]:
            raise DataError(f"config.data.eval_files: no sample could be evaluated: {counted}")
        logging.warning("%s; the eval figures cover the rest", counted)
    elif not sums["tokens"]:
        raise DataError("config.data.eval_files: no token to evaluate (every answer is empty)")
    n = sums["tokens"]
    return {
        "eval/loss": sums["loss_sum"] / n,
        "eval/accuracy": sums["correct"] / n,
        "eval/tokens": sums["tokens"],
    }


def _jit_eval(
    graphdef: nnx.GraphDef,
    cfg: RunConfig,
    vocab_in_use: int,
    shards: state_lib.TrainState,
    batch_sh: dict[str, NamedSharding],
    rep: NamedSharding,
) -> Callable[..., dict[str, jax.Array]]:
    return jax.jit(
        step_lib.make_eval_step(
            graphdef, logits_fraction=cfg.train.logits_fraction, vocab_in_use=vocab_in_use
        ),
        in_shardings=(
            model_parts.merge_dicts(shards.params, shards.frozen),
            shards.other,
            batch_sh,
        ),
        out_shardings=rep,
    )


@dataclasses.dataclass(frozen=True)
class Hooks:
    """What a caller of `train` adds to every step (nothing by default).

    `before_step`: functions (step, batch) -> batch that see, and may replace, this
    process's batch of 0-based step `step` before it is dispatched (a data transform).
    `after_step`: functions (loop) -> None called once step `loop.step` has been
    dispatched, reported and, when due, checkpointed and evaluated.
    """

    before_step: tuple[Callable[[int, LocalBatch], LocalBatch], ...] = ()
    after_step: tuple[Callable[[Loop], None], ...] = ()


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose metrics are fetched one step later."""

    step: int
    metrics: dict[str, jax.Array]
    stats: dict[str, int]


@dataclasses.dataclass
class _Timing:
    """Wall time between reported steps: the first (compilation) and the steady rest."""

    last: float = 0.0
    first_step_sec: float | None = None
    steady_sec: float = 0.0
    steady_tokens: int = 0

    def lap(self, tokens: int) -> float:
        """Seconds since the previous lap; counts them (and `tokens`) once past the first."""
        now = time.time()
        dt, self.last = now - self.last, now
        if self.first_step_sec is None:
            self.first_step_sec = dt
        else:
            self.steady_sec += dt
            self.steady_tokens += tokens
        return dt


@dataclasses.dataclass
class Loop:
    """The training loop's state: what it was given, and what changes step by step."""

    run: Run
    workdir: str
    state: state_lib.TrainState
    step_fn: Callable[[state_lib.TrainState, dict[str, jax.Array]], tuple[Any, Any]]
    eval_fn: Callable[..., dict[str, jax.Array]]
    ckpt: checkpointer.Checkpointer
    data: Any  # the train BatchIterator (data.pipeline)
    writer: metrics_lib.MetricsWriter
    batch_shardings: dict[str, NamedSharding]
    meta: dict[str, Any]  # checkpoint metadata (build.run_meta)
    hooks: Hooks
    step: int  # steps taken (the state's step)
    first_step: int  # the step this process started (or resumed) at
    peak_flops: float | None  # per device, for MFU
    progress: metrics_lib.Progress
    stop: StopFlag = dataclasses.field(default_factory=StopFlag)
    timing: _Timing = dataclasses.field(default_factory=_Timing)
    window: list[dict[str, float]] = dataclasses.field(default_factory=list)  # since last line
    pending: _Pending | None = None
    data_ended: bool = False  # a finite data.num_epochs ran out before train.steps

    def run_step(self) -> None:
        """Reads a batch, dispatches the step, reports the previous one, saves/evaluates."""
        cfg = self.run.cfg
        try:
            local = next(self.data)
        except StopIteration:
            self.data_ended = True
            return
        for transform in self.hooks.before_step:
            local = transform(self.step, local)
        p = self.run.model_config.num_image_tokens
        stats = _batch_stats(local, self.run.tokenizer.image_token_id, p)
        self.state, metrics = self.step_fn(self.state, global_batch(local, self.batch_shardings))
        self.step += 1
        self.report()
        self.pending = _Pending(self.step, metrics, stats)
        if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.train.steps:
            self.report()  # a checkpointed step always has its metrics line
            self.save()
        every = cfg.eval.every_steps if cfg.data.eval_files else 0  # no eval set: no eval
        if every and self.step % every == 0 and self.step < cfg.train.steps:
            self.report()
            ev = self.evaluate()
            if ev is not None:  # else SIGTERM: the run saves and stops after this step
                self.writer.write(self.step, ev)
            self.timing.last = time.time()  # evaluation time is not step time
        for hook in self.hooks.after_step:
            hook(self)

    def report(self) -> None:
        """Fetches the pending step's metrics, checks the non-finite streak, logs."""
        done, self.pending = self.pending, None
        if done is None:
            return
        cfg = self.run.cfg
        m = {k: float(v) for k, v in jax.device_get(done.metrics).items()}
        dt = self.timing.lap(done.stats["tokens"])
        row = {**m, **done.stats, "step_time_sec": dt, "tokens_per_sec": done.stats["tokens"] / dt}
        if self.peak_flops:
            flops = metrics_lib.model_flops_per_step(
                model_parts.merge_dicts(self.state.params, self.state.frozen),
                **done.stats,
                trained_parts=cfg.trained_parts,
                seq_len=cfg.data.max_seq_len,
                num_layers=cfg.model.llm.num_layers,
                hidden_size=cfg.model.llm.hidden_size,
            )
            row["mfu"] = flops / dt / (self.peak_flops * jax.device_count())
        self.window.append(row)
        streak = int(m["nonfinite_streak"])
        if streak >= cfg.train.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"train: {streak} consecutive non-finite steps (loss={m['loss']}) up to step "
                f"{done.step}; the updates were skipped and parameters are unchanged since step "
                f"{done.step - streak}. Lower train.lr, check the data (python -m "
                "neva_jax.data validate), or raise train.max_consecutive_nonfinite."
            )
        if not m["finite"]:
            logging.warning("step %d: non-finite loss/gradient, update skipped", done.step)
        if done.step % cfg.train.log_every == 0 or done.step == cfg.train.steps:
            self._write_line(done.step)

    def _write_line(self, step: int) -> None:
        """Writes the window's averages as the metrics line of `step`."""
        w = self.window
        avg = {k: float(np.mean([row[k] for row in w])) for k in w[-1]}
        avg["tokens_per_sec"] = sum(r["tokens"] for r in w) / sum(r["step_time_sec"] for r in w)
        avg["learning_rate"] = w[-1]["learning_rate"]
        avg["nonfinite_count"] = int(w[-1]["nonfinite_count"])
        drop = ("finite", "nonfinite_streak", "images", "image_tokens")
        self.writer.write(step, {k: v for k, v in avg.items() if k not in drop})
        self.progress.update(step, avg, first_step=self.first_step)
        w.clear()

    def save(self) -> None:
        """Starts saving the current step (async) and rewrites data_report.json."""
        meta = {**self.meta, "step": self.step}
        if self.ckpt.save(self.step, self.state.checkpoint_tree(), meta, self.data):
            logging.info("checkpoint %d started", self.step)
        _write_data_report(self.workdir, self.data, self.step)

    def evaluate(self) -> dict[str, float] | None:
        """eval/* of the current state; None when SIGTERM came during it."""
        return evaluate_state(self.run, self.eval_fn, self.state, self.batch_shardings, self.stop)

    def run_all(self) -> dict[str, Any]:
        """Steps until `train.steps` or a stop request; returns the run's summary."""
        cfg = self.run.cfg
        with _sigterm_sets(self.stop):
            self.timing.last = time.time()
            while self.step < cfg.train.steps and not (self.stop.requested or self.data_ended):
                self.run_step()
                if distributed.reached_preemption_sync_point(self.step):
                    self.stop.requested = True
            self.report()
            report = self.data.report() if self.data_ended else {}
            if self.data_ended and not report["samples_yielded"]:
                raise DataError(
                    f"config.data.train_files: no sample could be used: "
                    f"{report['samples_skipped']} of {report['samples_read']} skipped "
                    f"({report['skipped_by_reason']}); see python -m neva_jax.data validate"
                )
            if self.window and (self.data_ended or self.stop.requested):
                self._write_line(self.step)  # the steps since the last line, not lost
            if self.data_ended:
                logging.warning(
                    "data.num_epochs=%d: the data ended after step %d of train.steps=%d; the "
                    "run ends here (raise data.num_epochs, or 0 repeats the data)",
                    cfg.data.num_epochs,
                    self.step,
                    cfg.train.steps,
                )
                self.save()
            self.progress.close()
            if self.stop.requested:
                self.save()
                self.ckpt.wait()
                logging.warning("stopped by SIGTERM at step %d; checkpoint committed", self.step)
                return {"step": self.step, "stopped": "SIGTERM"}
            summary: dict[str, Any] = {"step": self.step}
            if cfg.data.eval_files:
                ev = self.evaluate()
                if ev is None:  # SIGTERM during the final evaluation: the step is saved
                    self.ckpt.wait()
                    logging.warning(
                        "stopped by SIGTERM during the final evaluation of step %d; its "
                        "checkpoint is committed (--mode eval evaluates it)",
                        self.step,
                    )
                    return {"step": self.step, "stopped": "SIGTERM"}
                self.writer.write(self.step, ev)
                summary.update(ev)
        self.ckpt.wait()
        if self.timing.steady_sec > 0:
            summary["tokens_per_sec"] = self.timing.steady_tokens / self.timing.steady_sec
        summary["first_step_sec"] = self.timing.first_step_sec
        logging.info("done: %s", summary)
        return summary


def _require_run_config(cfg: Any) -> None:
    if not isinstance(cfg, RunConfig):
        raise TypeError(
            f"expected a RunConfig, got {type(cfg).__name__}; convert an experiment ConfigDict "
            "with neva_jax.config.from_config_dict(cd)"
        )


def train(cfg: RunConfig, workdir: str, *, hooks: Hooks = Hooks()) -> dict[str, Any]:
    """Trains `cfg` in `workdir` (resuming if it holds a checkpoint); returns a summary."""
    _require_run_config(cfg)
    run = prepare(cfg)
    os.makedirs(workdir, exist_ok=True)
    _copy_tokenizer(run, workdir)
    parts, mesh, ncfg = cfg.trained_parts, run.mesh, run.model_config
    tx = opt_lib.make_optimizer(cfg.train)
    # The logged learning rate: the projector's when it alone trains.
    alone = parts == ("projector",) and cfg.train.projector_lr > 0
    schedule = opt_lib.learning_rate_schedule(cfg.train, cfg.train.projector_lr if alone else None)
    for note in build.config_notes(cfg):
        logging.warning("%s", note)
    graphdef, abstract, shards = build.abstract_train_state(
        ncfg, parts, tx, mesh, cfg.train.frozen_param_dtype
    )
    batch_sh = build.batch_shardings(mesh, pipeline.BATCH_KEYS)
    rep = build.replicated(mesh)
    with contextlib.ExitStack() as stack, jax.set_mesh(mesh):
        ckpt = checkpointer.Checkpointer(
            workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        stack.callback(ckpt.close)
        train_it = pipeline.make_train_iterator(
            cfg.data,
            tokenizer=run.tokenizer,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        stack.callback(train_it.close)
        for f in cfg.data.eval_files:  # a bad eval file fails now, not after training
            open_source(f, cfg.data)
        writer = metrics_lib.MetricsWriter(workdir)
        stack.callback(writer.close)
        latest = ckpt.latest_step()
        if latest is not None:
            saved = checkpoint.read_config(os.path.join(ckpt.directory, str(latest)))
            check_architecture(
                f"the checkpoint to resume ({workdir})", ncfg, saved, unset_takes_it=False
            )
            build.check_adapters(f"the checkpoint to resume ({workdir})", ncfg, saved)
            step_dir = os.path.join(ckpt.directory, str(latest))
            saved_parts = checkpoint.read_meta(step_dir).get("trained_parts")
            if saved_parts is not None and tuple(saved_parts) != tuple(parts):
                raise ConfigError(
                    f"{workdir}: its checkpoint trained {', '.join(saved_parts)}; this config "
                    f"trains {', '.join(parts)} (model.*.freeze or model.peft differ). Resume "
                    "with that run's settings, or start a new --workdir with "
                    f"--config.init_from={workdir} (stage 2 starts from stage 1 so)"
                )
            try:
                tree, _ = ckpt.restore(latest, abstract.checkpoint_tree(), train_it)
            except ValueError as e:
                if "tree structures do not match" not in str(e):
                    raise
                raise ConfigError(
                    f"{workdir}: the optimizer state of its checkpoint does not fit this config "
                    "(train.grad_clip, train.projector_lr or the optimizer differ from the run "
                    "that saved it); resume with that run's settings, or start a new --workdir "
                    f"with --config.init_from={workdir}"
                ) from None
            state = state_lib.TrainState.from_checkpoint_tree(tree, parts, {})
            logging.info("resumed from %s/%d", ckpt.directory, latest)
            if cfg.init_from:
                logging.info("resuming: init_from %s is not read", cfg.init_from)
            if latest >= cfg.train.steps:
                logging.warning(
                    "the checkpoint is at step %d, train.steps=%d: nothing to train; raise "
                    "train.steps to go on",
                    latest,
                    cfg.train.steps,
                )
            writer.drop_after(latest)
        else:
            state = build.initial_state(cfg, ncfg, tx, mesh, abstract, shards)
            writer.drop_after(0)  # lines of an attempt that died before its first checkpoint
        # From here on the iterator holds the run's position: its report is the run's (a
        # run stopped earlier, by a config error, leaves the folder's report as it was).
        stack.callback(_write_data_report, workdir, train_it)
        logging.info("%s", opt_lib.describe_split(state.params, state.frozen))
        if not cfg.data.eval_files:
            logging.info("no data.eval_files: training without evaluation")
        step_fn = step_lib.jit_train_step(
            step_lib.make_train_step(
                graphdef,
                tx,
                schedule,
                trained_parts=parts,
                grad_accum_steps=cfg.train.grad_accum_steps,
                logits_fraction=cfg.train.logits_fraction,
                loss_normalization=cfg.train.loss_normalization,
                batch_shards=mesh.shape["data"] * mesh.shape["fsdp"],
                vocab_in_use=ncfg.tokenizer_vocab_size,
                dropout_seed=cfg.seed,
            ),
            shards,
            batch_sh,
            rep,
        )
        step = int(state.step)
        loop = Loop(
            run=run,
            workdir=workdir,
            state=state,
            step_fn=step_fn,
            eval_fn=_jit_eval(graphdef, cfg, ncfg.tokenizer_vocab_size, shards, batch_sh, rep),
            ckpt=ckpt,
            data=train_it,
            writer=writer,
            batch_shardings=batch_sh,
            meta=build.run_meta(cfg, ncfg, mesh),
            hooks=hooks,
            step=step,
            first_step=step,
            peak_flops=cfg.train.peak_flops_per_device or metrics_lib.measured_peak_flops(),
            progress=metrics_lib.Progress(cfg.train.steps),
        )
        return loop.run_all()


def evaluate(cfg: RunConfig, workdir: str) -> dict[str, float]:
    """Restores the newest checkpoint (or `eval.checkpoint`) onto this mesh and evaluates."""
    _require_run_config(cfg)
    if not cfg.data.eval_files:
        raise ConfigError(
            "config.data.eval_files is empty: --mode eval needs evaluation files; name them"
        )
    source = cfg.eval.checkpoint or workdir
    try:
        saved = checkpoint.read_config(source)
    except (FileNotFoundError, ValueError, KeyError) as e:
        where = (
            f"config.eval.checkpoint={source!r}" if cfg.eval.checkpoint else f"--workdir={source}"
        )
        raise ConfigError(
            f"{where}: nothing to evaluate: {str(e).splitlines()[0]}; train there first, or "
            "set config.eval.checkpoint to a training workdir, step folder or model folder"
        ) from None
    run = prepare(cfg)
    mesh, ncfg = run.mesh, run.model_config
    tx = opt_lib.make_optimizer(cfg.train)
    graphdef, abstract, shards = build.abstract_train_state(ncfg, cfg.trained_parts, tx, mesh)
    batch_sh = build.batch_shardings(mesh, pipeline.BATCH_KEYS)
    check_architecture(f"the checkpoint {source!r}", ncfg, saved, unset_takes_it=False)
    build.check_adapters(f"the checkpoint {source!r}", ncfg, saved)
    with jax.set_mesh(mesh):
        target = model_parts.merge_dicts(abstract.params, abstract.frozen)
        params, meta = checkpoint.restore_params(source, target)
        trained, frozen = model_parts.split_dict(params, cfg.trained_parts)
        state = abstract.replace(params=trained, frozen=frozen, other={}, opt_state=None)
        eval_fn = _jit_eval(
            graphdef, cfg, ncfg.tokenizer_vocab_size, shards, batch_sh, build.replicated(mesh)
        )
        out = evaluate_state(run, eval_fn, state, batch_sh)
    step = int(meta.get("step", 0))  # a model folder (import/export) has no training step
    writer = metrics_lib.MetricsWriter(workdir)
    writer.write(step, out)
    writer.close()
    logging.info("eval of %s step %s: %s", source, step, out)
    return out
