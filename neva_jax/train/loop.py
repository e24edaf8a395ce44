"""The training loop and `--mode eval`: all I/O lives here, the step is pure.

    train(cfg, workdir)     resume or initialise, train, checkpoint, evaluate
    evaluate(cfg, workdir)  restore the newest checkpoint (or `eval.checkpoint`), write eval/*

Per step the loop reads a batch, dispatches step t+1 and only then fetches step
t's metrics (so the device never waits for Python), logs, checks the non-finite
streak, and saves on schedule. SIGTERM sets a flag (several processes: JAX's
preemption sync point) and the loop saves the current step, waits for the commit
and returns normally (exit 0). After K consecutive non-finite steps
(`train.max_consecutive_nonfinite`) it raises `NonFiniteError`:

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
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import logging

from neva_jax import distributed
from neva_jax.convert import checkpoint
from neva_jax.data import pipeline
from neva_jax.data.conversation import get_template
from neva_jax.data.tokenize import TextTokenizer, load_tokenizer
from neva_jax.model import parts as model_parts
from neva_jax.model.neva import NevaConfig
from neva_jax.run_config import RunConfig, model_for_tokenizer
from neva_jax.train import build, checkpointer
from neva_jax.train import metrics as metrics_lib
from neva_jax.train import optimizer as opt_lib
from neva_jax.train import state as state_lib
from neva_jax.train import step as step_lib

DATA_REPORT = "data_report.json"


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


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[dict[str, bool]]:
    """Sets flag['term'] on SIGTERM while the block runs (main thread, one process).

    With several processes JAX's preemption sync manager owns SIGTERM and
    `distributed.reached_preemption_sync_point` picks the step all processes save at.
    """
    flag = {"term": False}
    if jax.process_count() > 1:
        yield flag
        return

    def handler(signum, frame):
        del signum, frame
        flag["term"] = True  # (no logging here: a handler may interrupt a logging call)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler
        yield flag
        return
    try:
        yield flag
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


def inject_nan(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` whose first loss weight is NaN, so the step's loss and gradients are NaN."""
    mask = np.array(batch["loss_mask"], copy=True)
    mask.flat[0] = np.nan
    return {**batch, "loss_mask": mask}


class _Pending:
    """Metrics of a dispatched step, fetched one step later."""

    def __init__(self, step: int, metrics: Any, stats: dict[str, int]):
        self.step, self.metrics, self.stats = step, metrics, stats


def evaluate_state(
    run: Run, eval_fn: Any, state: state_lib.TrainState, shardings: dict[str, Any]
) -> dict[str, float]:
    """eval/loss, eval/accuracy, eval/tokens over the eval files (or `eval.steps` batches)."""
    cfg = run.cfg
    bs = cfg.eval.batch_size or cfg.train.batch_size // cfg.train.grad_accum_steps
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
            if cfg.eval.steps and i >= cfg.eval.steps:
                break
            batch = global_batch(local, shardings)
            params = model_parts.merge_dicts(state.params, state.frozen)
            out = jax.device_get(eval_fn(params, state.other, batch))
            for k in sums:
                sums[k] += float(out[k])
    finally:
        it.close()
    n = max(sums["tokens"], 1.0)
    return {
        "eval/loss": sums["loss_sum"] / n,
        "eval/accuracy": sums["correct"] / n,
        "eval/tokens": sums["tokens"],
    }


def _jit_eval(graphdef, cfg: RunConfig, shards, batch_sh, rep):
    return jax.jit(
        step_lib.make_eval_step(graphdef, logits_fraction=cfg.train.logits_fraction),
        in_shardings=(
            model_parts.merge_dicts(shards.params, shards.frozen),
            shards.other,
            batch_sh,
        ),
        out_shardings=rep,
    )


def train(cfg: RunConfig, workdir: str) -> dict[str, Any]:
    """Trains `cfg` in `workdir` (resuming if it holds a checkpoint); returns a summary."""
    run = prepare(cfg)
    os.makedirs(workdir, exist_ok=True)
    _copy_tokenizer(run, workdir)
    parts, mesh, ncfg = cfg.trained_parts, run.mesh, run.model_config
    tx = opt_lib.make_optimizer(cfg.train)
    schedule = opt_lib.learning_rate_schedule(cfg.train)
    graphdef, abstract, shards = build.abstract_train_state(ncfg, parts, tx, mesh)
    batch_sh = build.batch_shardings(mesh, pipeline.BATCH_KEYS)
    rep = build.replicated(mesh)
    with contextlib.ExitStack() as stack, jax.set_mesh(mesh):
        ckpt = checkpointer.Checkpointer(
            workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        stack.callback(ckpt.close)
        train_it = pipeline.make_train_iterator(
            run.cfg.data,
            tokenizer=run.tokenizer,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        stack.callback(train_it.close)
        stack.callback(_write_data_report, workdir, train_it)
        writer = metrics_lib.MetricsWriter(workdir)
        stack.callback(writer.close)
        latest = ckpt.latest_step()
        if latest is not None:
            tree, _ = ckpt.restore(latest, abstract.checkpoint_tree(), train_it)
            state = state_lib.TrainState.from_checkpoint_tree(tree, parts, {})
            logging.info("resumed from %s/%d", ckpt.directory, latest)
            writer.drop_after(latest)
        else:
            state = build.initial_state(cfg, ncfg, tx, mesh, abstract, shards)
        logging.info("%s", opt_lib.describe_split(state.params, state.frozen))
        step_fn = step_lib.jit_train_step(
            step_lib.make_train_step(
                graphdef,
                tx,
                schedule,
                trained_parts=parts,
                grad_accum_steps=cfg.train.grad_accum_steps,
                logits_fraction=cfg.train.logits_fraction,
            ),
            shards,
            batch_sh,
            rep,
        )
        eval_fn = _jit_eval(graphdef, cfg, shards, batch_sh, rep)
        meta = build.run_meta(cfg, ncfg, mesh)
        return _loop(run, workdir, state, step_fn, eval_fn, ckpt, train_it, writer, batch_sh, meta)


def _loop(run, workdir, state, step_fn, eval_fn, ckpt, train_it, writer, batch_sh, meta):
    cfg = run.cfg
    total, every = cfg.train.steps, cfg.checkpoint.every_steps
    peak = cfg.train.peak_flops_per_device or metrics_lib.measured_peak_flops()
    p = run.model_config.num_image_tokens
    flops_args = dict(
        trained_parts=cfg.trained_parts,
        seq_len=run.cfg.data.max_seq_len,
        num_layers=cfg.model.llm.num_layers,
        hidden_size=cfg.model.llm.hidden_size,
    )
    all_params = model_parts.merge_dicts(state.params, state.frozen)
    step = int(state.step)
    first = step
    progress = metrics_lib.Progress(total)
    window: list[dict[str, float]] = []
    timing = {"last": None, "first_step_sec": None, "steady_sec": 0.0, "steady_tokens": 0}
    pending: _Pending | None = None

    def save(at: int) -> None:
        if ckpt.save(at, state.checkpoint_tree(), {**meta, "step": at}, train_it):
            logging.info("checkpoint %d started", at)
        _write_data_report(workdir, train_it, at)

    def report(done: _Pending | None) -> None:
        if done is None:
            return
        m = {k: float(v) for k, v in jax.device_get(done.metrics).items()}
        now = time.time()
        dt = now - timing["last"]
        timing["last"] = now
        if timing["first_step_sec"] is None:
            timing["first_step_sec"] = dt
        else:
            timing["steady_sec"] += dt
            timing["steady_tokens"] += done.stats["tokens"]
        row = {**m, **done.stats, "step_time_sec": dt, "tokens_per_sec": done.stats["tokens"] / dt}
        if peak:
            flops = metrics_lib.model_flops_per_step(all_params, **done.stats, **flops_args)
            row["mfu"] = flops / dt / (peak * jax.device_count())
        window.append(row)
        if m["nonfinite_streak"] >= cfg.train.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"train: {int(m['nonfinite_streak'])} consecutive non-finite steps "
                f"(loss={m['loss']}) up to step {done.step}; the updates were skipped and "
                f"parameters are unchanged since step {done.step - int(m['nonfinite_streak'])}. "
                "Lower train.lr, check the data (python -m neva_jax.data validate), or raise "
                "train.max_consecutive_nonfinite."
            )
        if not m["finite"]:
            logging.warning("step %d: non-finite loss/gradient, update skipped", done.step)
        if done.step % cfg.train.log_every == 0 or done.step == total:
            avg = {k: float(np.mean([w[k] for w in window])) for k in window[-1]}
            secs = sum(w["step_time_sec"] for w in window)
            avg["tokens_per_sec"] = sum(w["tokens"] for w in window) / secs
            avg["learning_rate"] = window[-1]["learning_rate"]
            avg["nonfinite_count"] = int(window[-1]["nonfinite_count"])
            drop = ("finite", "nonfinite_streak", "images", "image_tokens")
            writer.write(done.step, {k: v for k, v in avg.items() if k not in drop})
            progress.update(done.step, avg, first_step=first)
            window.clear()

    with _sigterm_flag() as flag:
        timing["last"] = time.time()
        while step < total and not flag["term"]:
            local = next(train_it)
            if step in cfg.debug.inject_nan_steps:  # test hook: a NaN loss weight -> NaN loss
                local = inject_nan(local)
            stats = _batch_stats(local, run.tokenizer.image_token_id, p)
            state, metrics = step_fn(state, global_batch(local, batch_sh))
            step += 1
            report(pending)
            pending = _Pending(step, metrics, stats)
            if step % every == 0 or step == total:
                report(pending)  # a checkpointed step always has its metrics line
                pending = None
                save(step)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total:
                report(pending)
                pending = None
                writer.write(step, evaluate_state(run, eval_fn, state, batch_sh))
                timing["last"] = time.time()
            if cfg.debug.signal_at_step and step == cfg.debug.signal_at_step:
                ckpt.wait()
                os.kill(os.getpid(), getattr(signal, cfg.debug.signal))
            if distributed.reached_preemption_sync_point(step):
                flag["term"] = True
        report(pending)
        progress.close()
        if flag["term"]:
            save(step)
            ckpt.wait()
            logging.warning("stopped by SIGTERM at step %d; checkpoint committed", step)
            return {"step": step, "stopped": "SIGTERM"}
    summary: dict[str, Any] = {"step": step}
    if run.cfg.data.eval_files:
        ev = evaluate_state(run, eval_fn, state, batch_sh)
        writer.write(step, ev)
        summary.update(ev)
    ckpt.wait()
    if timing["steady_sec"] > 0:
        summary["tokens_per_sec"] = timing["steady_tokens"] / timing["steady_sec"]
    summary["first_step_sec"] = timing["first_step_sec"]
    logging.info("done: %s", summary)
    return summary


def evaluate(cfg: RunConfig, workdir: str) -> dict[str, float]:
    """Restores the newest checkpoint (or `eval.checkpoint`) onto this mesh and evaluates."""
    run = prepare(cfg)
    source = cfg.eval.checkpoint or workdir
    mesh, ncfg = run.mesh, run.model_config
    tx = opt_lib.make_optimizer(cfg.train)
    graphdef, abstract, shards = build.abstract_train_state(ncfg, cfg.trained_parts, tx, mesh)
    batch_sh = build.batch_shardings(mesh, pipeline.BATCH_KEYS)
    with jax.set_mesh(mesh):
        target = model_parts.merge_dicts(abstract.params, abstract.frozen)
        params, meta = checkpoint.restore_params(source, target)
        trained, frozen = model_parts.split_dict(params, cfg.trained_parts)
        state = abstract.replace(params=trained, frozen=frozen, other={}, opt_state=None)
        eval_fn = _jit_eval(graphdef, cfg, shards, batch_sh, build.replicated(mesh))
        out = evaluate_state(run, eval_fn, state, batch_sh)
    writer = metrics_lib.MetricsWriter(workdir)
    writer.write(int(meta["step"]), out)
    writer.close()
    logging.info("eval of %s step %s: %s", source, meta["step"], out)
    return out
