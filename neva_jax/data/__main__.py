"""Data CLIs.

    python -m neva_jax.data synth --out DIR [--seed S] [--n-train N] [--n-eval M] [--image-size PX]
    python -m neva_jax.data inspect --config F.py[:ARG] [--index I] [--split train|eval] [--tokens]
    python -m neva_jax.data validate --config F.py[:ARG] [--split train|eval|all]

`inspect`/`validate` read the experiment file as its training run does
(`neva_jax.config.data_config`: unset keys such as `data.template` resolved from
`init_from` or `model.llm.model_type`, the image size, slot count and
`use_im_start_end` from `model`); `--config.KEY=VALUE` overrides work as in
training. Only the data section is validated, so they run on a host without the
training devices. `validate` exits 1 when the share of
bad samples exceeds `data.max_skip_ratio`; a bad config exits 2.
"""

from __future__ import annotations

import argparse
import collections
import sys
from typing import Any

import numpy as np

from neva_jax.data.config import DataConfig


def load_data_config(argv: list[str]) -> DataConfig:
    """Reads `--config F.py[:ARG]` (+ `--config.KEY=V` overrides) -> the DataConfig its
    training run would read (`neva_jax.config.data_config`)."""
    from absl import flags
    from ml_collections import config_flags

    # The CLI reads experiment files as main does (the data library does not).
    from neva_jax.config import data_config, error_line, load_error_line, unknown_key_line

    fv = flags.FlagValues()
    argv = ["neva_jax.data", *argv]
    config_flags.DEFINE_config_file(
        "config", None, "experiment config", flag_values=fv, lock_config=True, sys_argv=argv
    )
    try:
        fv(argv)
    except (AttributeError, KeyError) as e:  # --config.KEY that does not exist (or the file's)
        raise ValueError(unknown_key_line(e, argv) or error_line(e)) from e
    except (flags.Error, TypeError) as e:
        raise ValueError(error_line(e)) from e
    cd = fv.config
    problem = load_error_line(cd, fv["config"].config_filename)
    if problem:
        raise ValueError(problem)
    if cd is None:
        raise ValueError("--config is required: --config configs/F.py[:ARG]")
    return data_config(cd)


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates --config / --config.KEY=V (absl) from the subcommand's own options."""
    mine, config = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            config += [f"--config={argv[i + 1]}"]
            i += 2
            continue
        (config if a.startswith("--config") else mine).append(a)
        i += 1
    return mine, config


def _files(cfg: DataConfig, split: str) -> tuple[str, ...]:
    files = {"train": cfg.train_files, "eval": cfg.eval_files}.get(split)
    if files is None:
        files = cfg.train_files + cfg.eval_files
    if not files:
        raise ValueError(f"config.data.{split}_files is empty")
    return files


def _marked_text(enc: Any, tok: Any) -> str:
    """Rendered text with trained characters in ⟦ ⟧ and each image as <image xN>."""
    text = enc.text
    trained_char = np.zeros(len(text), bool)
    for (a, b), tr in zip(enc.char_span, enc.trained, strict=True):
        if tr:
            trained_char[a:b] = True
    out, inside, i = [], False, 0
    n_img = int(enc.image.sum() // max(1, enc.num_images)) if enc.num_images else 0
    while i < len(text):
        if text.startswith("<image>", i):
            out.append(f"<image x{n_img}>")
            i += len("<image>")
            continue
        if trained_char[i] != inside:
            out.append("⟦" if trained_char[i] else "⟧")
            inside = bool(trained_char[i])
        out.append(text[i])
        i += 1
    if inside:
        out.append("⟧")
    return "".join(out)


def cmd_inspect(args: argparse.Namespace, cfg: DataConfig) -> int:
    from neva_jax.data.dataset import BadSampleError, SamplePreparer, open_source

    files = _files(cfg, args.split)
    preparer = SamplePreparer(cfg)
    tok = preparer.tokenizer
    index = args.index
    for f in files:
        src = open_source(f, cfg)
        if index >= len(src):
            index -= len(src)
            continue
        raw, where = src[index]
        print(f"sample {args.index} = {where} (file {f})")
        print(
            f"template {cfg.template} ({preparer.template.reference}); "
            f"tokenizer {cfg.tokenizer} (vocab {tok.vocab_size}, "
            f"<image> = {tok.image_token_id}, added {list(tok.added_tokens) or 'none'})"
        )
        try:
            p = preparer.prepare(raw, where)
        except BadSampleError as e:
            print(f"SKIPPED: {e.reason}: {e.detail}")
            return 1
        enc = p.encoded
        print("rendered prompt (trained text in ⟦ ⟧):")
        print(_marked_text(enc, tok))
        slots = np.flatnonzero(enc.image)
        n, trained = len(enc), int(enc.trained.sum())
        print(
            f"tokens: {n} of max_seq_len {cfg.max_seq_len}; trained {trained}; "
            f"image slots {len(slots)}"
            + (f" at [{slots[0]}, {slots[-1] + 1})" if len(slots) else "")
        )
        if p.dropped_rounds or p.cut_tokens:
            print(
                f"truncated (data.truncation={cfg.truncation}): {p.full_length} -> {n} tokens, "
                f"dropped {p.dropped_rounds} round(s), cut {p.cut_tokens} token(s)"
            )
        for name, px in zip(p.image_names, p.images, strict=True):
            print(
                f"image {name}: {cfg.image_aspect_ratio} -> {px.shape} float32, "
                f"mean {px.mean():+.3f} std {px.std():.3f}"
            )
        pieces = tok.hf.convert_ids_to_tokens(enc.ids[~enc.image].tolist())
        flags = enc.trained[~enc.image]
        print(
            "trained tokens: " + " ".join(repr(t) for t, f in zip(pieces, flags, strict=True) if f)
        )
        if args.tokens:
            for i, (tid, tr, im) in enumerate(zip(enc.ids, enc.trained, enc.image, strict=True)):
                if im and i > 0 and enc.image[i - 1]:
                    continue
                piece = "<image slots>" if im else tok.hf.convert_ids_to_tokens(int(tid))
                print(f"  {i:5d} {tid:7d} {'T' if tr else '-'} {piece!r}")
        return 0
    raise ValueError(f"--index {args.index}: past the end of {', '.join(files)}")


def cmd_validate(args: argparse.Namespace, cfg: DataConfig) -> int:
    import grain

    from neva_jax.data.dataset import SamplePreparer, open_source
    from neva_jax.data.pipeline import padding_figures

    files = _files(cfg, args.split)
    preparer = SamplePreparer(cfg)
    preparer.tokenizer  # noqa: B018 - load once (fails early on a bad folder)
    reasons: collections.Counter[str] = collections.Counter()
    first: dict[str, str] = {}
    samples: list[tuple[int, int]] = []
    read = truncated = truncated_tokens = 0
    for f in files:
        source = open_source(f, cfg)
        if len(source) == 0:  # as training refuses it
            raise ValueError(f"{f}: holds no records")
        ds = grain.MapDataset.source(source).map(preparer)
        it = ds.to_iter_dataset(
            grain.ReadOptions(
                num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer_size
            )
        )
        if cfg.num_workers > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
        iterator = iter(it)
        try:
            for item in iterator:
                read += 1
                if "bad" in item:
                    reasons[item["bad"]] += 1
                    first.setdefault(item["bad"], f"{item['where']}: {item['detail']}")
                else:
                    samples.append((len(item["ids"]), len(item["images"])))
                    truncated += item["truncated_tokens"] > 0
                    truncated_tokens += item["truncated_tokens"]
        finally:
            iterator.close()
    skipped = sum(reasons.values())
    ratio = skipped / read if read else 0.0
    print(f"dataset: {', '.join(files)}")
    print(
        f"records {read}: good {len(samples)}, skipped {skipped} ({ratio:.2%}); "
        f"limit data.max_skip_ratio={cfg.max_skip_ratio}"
    )
    for reason, n in reasons.most_common():
        print(f"  {reason:<26} {n:6d}  first: {first[reason]}")
    print(
        f"truncated to max_seq_len {cfg.max_seq_len} (data.truncation={cfg.truncation}): "
        f"{truncated} samples, {truncated_tokens} tokens removed"
    )
    if samples:
        lengths = np.array([n for n, _ in samples])
        q = np.percentile(lengths, [50, 95])
        print(
            f"length (tokens): min {lengths.min()} median {q[0]:.0f} p95 {q[1]:.0f} "
            f"max {lengths.max()} (max_seq_len {cfg.max_seq_len})"
        )
        edges = np.unique(np.linspace(0, cfg.max_seq_len, 9).astype(int))
        hist, _ = np.histogram(lengths, bins=edges)
        width = max(hist.max(), 1)
        for lo, hi, h in zip(edges[:-1], edges[1:], hist, strict=True):
            print(f"  {lo:6d}-{hi:<6d} {'#' * round(40 * h / width):<40} {h}")
        fig = padding_figures(
            samples,
            batch_size=cfg.batch_size,
            seq_len=cfg.max_seq_len,
            max_images=cfg.max_images_per_row,
        )
        print(
            f"non-padding fraction (batch {cfg.batch_size} x {cfg.max_seq_len}): unpacked "
            f"{fig['unpacked']:.3f}, packed {fig['packed']:.3f} "
            f"(max_images_per_row {cfg.max_images_per_row})"
        )
    if ratio > cfg.max_skip_ratio:
        print(
            f"FAILED: {skipped} of {read} samples would be skipped ({ratio:.2%}) > "
            f"config.data.max_skip_ratio={cfg.max_skip_ratio}",
            file=sys.stderr,
        )
        return 1
    print("OK")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from neva_jax.data import synth

    meta = synth.generate(
        args.out,
        seed=args.seed,
        n_train=args.n_train,
        n_eval=args.n_eval,
        image_size=args.image_size,
    )
    print(
        f"wrote {args.n_train} train + {args.n_eval} eval images ({args.image_size} px) and "
        f"files under {args.out} in {meta['seconds']:.1f} s; tokenizer: {args.out}/tokenizer; "
        f"chance {meta['chance']['mean']:.3f}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m neva_jax.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("synth", help="write the synthetic dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--image-size", type=int, default=64)
    p = sub.add_parser("inspect", help="show one sample as the model sees it")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--split", choices=("train", "eval"), default="train")
    p.add_argument("--tokens", action="store_true", help="list every token")
    p = sub.add_parser("validate", help="pre-flight pass over a whole dataset")
    p.add_argument("--split", choices=("train", "eval", "all"), default="all")
    mine, config_args = _split_argv(argv)
    args = parser.parse_args(mine)
    try:
        if args.cmd == "synth":
            return cmd_synth(args)
        cfg = load_data_config(config_args)
        return cmd_inspect(args, cfg) if args.cmd == "inspect" else cmd_validate(args, cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
