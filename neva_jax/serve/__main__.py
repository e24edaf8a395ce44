"""`python -m neva_jax.serve`: an OpenAI-compatible chat server with continuous batching.

  python -m neva_jax.serve --checkpoint PATH [--host 127.0.0.1] [--port 8000]
      [--slots N] [--max-seq-len L] [--image-root DIR] [--allow-remote-images]
      [--api-key KEY]

PATH is anything `python -m neva_jax.generate` accepts: a training workdir (newest
checkpoint), a step folder, a neva-jax model folder or a llava-hf folder; the chat
template is the one the checkpoint was trained with. The server compiles every
program it will run before it opens the port (warm-up), then answers
`POST /v1/chat/completions` (OpenAI schema, streaming with "stream": true),
`GET /v1/models`, `GET /health`, `GET /metrics` and a chat page at `/`.
SIGTERM (or Ctrl-C) stops accepting requests, finishes the ones in flight and exits 0.
The API key can also come from the environment variable NEVA_API_KEY.
"""

from __future__ import annotations

if __name__ == "__main__":  # a caching allocator, before JAX starts (neva_jax/allocator.py)
    from neva_jax import allocator

    allocator.ensure()

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neva_jax.data.conversation import TEMPLATES
from neva_jax.serve.images import DEFAULT_MAX_PIXELS

_log = logging.getLogger("neva_jax.serve")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and checks the command line (nothing is loaded here)."""
    p = argparse.ArgumentParser(
        prog="python -m neva_jax.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="workdir, step folder, model folder or llava-hf folder",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0: any free port")
    p.add_argument(
        "--slots",
        type=int,
        default=8,
        help="requests decoded together (rows of the KV cache; default 8)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        metavar="L",
        help="context per request, prompt + answer (default: the model's, at most 2048)",
    )
    p.add_argument(
        "--prefill-buckets",
        metavar="N,N,...",
        help="prompt lengths to pad to, one compiled prefill each (default: 16, 24, 32, 48, "
        "... up to --max-seq-len); fewer buckets compile faster and pad more",
    )
    p.add_argument(
        "--decode-buckets",
        metavar="N,N,...",
        help="row counts a decode step runs on, one compiled step each (default: 1 and "
        "--slots); a step computes only the first N slots, the fewest that hold every request",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests that may wait for a slot; more are answered 429 (default 64)",
    )
    p.add_argument(
        "--image-root",
        metavar="DIR",
        help="allow image_url paths (and file:// URLs) inside DIR; none otherwise",
    )
    p.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs (the server then requests any URL a client names)",
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=1,
        help="images per conversation (default 1, as LLaVA-1.5 was trained)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger images, checked before decoding (default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("NEVA_API_KEY"),
        help="require Authorization: Bearer KEY on every route but /health "
        "(default: $NEVA_API_KEY; none: no key)",
    )
    p.add_argument("--served-model-name", help="model id in responses (default: the folder name)")
    p.add_argument(
        "--template",
        choices=tuple(TEMPLATES),
        help="conversation template (default: the checkpoint's)",
    )
    p.add_argument(
        "--image-aspect",
        choices=("square", "pad", "keep"),
        help="image preprocessing (default: the checkpoint's)",
    )
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)"
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = p.parse_args(argv)
    for name in ("slots", "max_queue", "max_image_pixels"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_images < 0:
        p.error(f"--max-images must be >= 0, got {args.max_images}")
    if args.max_seq_len is not None and args.max_seq_len < 16:
        p.error(f"--max-seq-len must be >= 16, got {args.max_seq_len}")
    for name in ("prefill_buckets", "decode_buckets"):
        flag, value = "--" + name.replace("_", "-"), getattr(args, name)
        if value is None:
            continue
        try:
            sizes = [int(b) for b in value.split(",") if b.strip()]
        except ValueError:
            p.error(f"{flag} {value!r}: expected numbers like 16,64,256")
        if not sizes or any(b < 1 for b in sizes):
            p.error(f"{flag} {value!r}: every size must be >= 1")
        setattr(args, name, sizes)
    if not 0 <= args.port < 65536:
        p.error(f"--port must be 0..65535, got {args.port}")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        p.error(f"--image-root {args.image_root}: not a folder")
    if args.api_key is not None and not args.api_key.strip():
        p.error("--api-key (or $NEVA_API_KEY) is empty: give a key, or leave both unset to serve "
                "without one")  # fmt: skip
    return args


def check_port(host: str, port: int) -> None:
    """Fails at once (before minutes of loading and compiling) if host:port cannot listen."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(
                f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                "choose another port"
            ) from None


def build_state(args: argparse.Namespace, gen: Any = None) -> Any:
    """Loads the checkpoint (unless `gen`, a loaded `Generator`, is given), warms the
    engine up, starts it and returns the app's `ServerState`."""
    from neva_jax.eval.generate import Generator
    from neva_jax.serve.app import ServerState
    from neva_jax.serve.chat import ChatFormat
    from neva_jax.serve.engine import Engine
    from neva_jax.serve.images import ImagePolicy
    from neva_jax.serve.metrics import ServerMetrics
    from neva_jax.serve.runner import KVSlotRunner

    runtime = {"dtype": args.dtype} if args.dtype else {}
    if gen is None:
        gen = Generator.load(
            args.checkpoint, template=args.template, image_aspect=args.image_aspect, **runtime
        )
    model_len = gen.model.config.llm.encoder_seq_length
    max_len = args.max_seq_len or min(model_len, 2048)
    if max_len > model_len:
        raise ValueError(f"--max-seq-len {max_len} is over the model's {model_len} positions")
    _log.info(
        "%s: template %s, images %s, %d slots x %d positions",
        args.checkpoint,
        gen.template.name,
        gen.image_aspect,
        args.slots,
        max_len,
    )
    runner = KVSlotRunner(
        gen.model,
        slots=args.slots,
        max_len=max_len,
        eos_ids=gen.eos_ids,
        pad_id=gen.tokenizer.pad_id,
        max_images=args.max_images,
        buckets=args.prefill_buckets,
        decode_buckets=args.decode_buckets,
        decode_layers=gen.decode_layers,
    )
    metrics = ServerMetrics()
    engine = Engine(runner, max_queue=args.max_queue, metrics=metrics)
    metrics.watch_compilations(runner.compilations, engine.compilations_after_warmup)
    engine.start()
    policy = ImagePolicy(
        root=args.image_root,
        allow_remote=args.allow_remote_images,
        max_pixels=args.max_image_pixels,
    )
    return ServerState(
        engine=engine,
        chat=ChatFormat(gen, max_images=args.max_images, policy=policy),
        metrics=metrics,
        model_name=args.served_model_name or Path(args.checkpoint).absolute().name,
        api_key=args.api_key or None,
    )


def serve(args: argparse.Namespace) -> int:
    """Loads, warms up, serves until SIGTERM/SIGINT, drains; returns the exit status."""
    import uvicorn

    from neva_jax.serve.app import create_app

    check_port(args.host, args.port)
    state = build_state(args)
    config = uvicorn.Config(
        create_app(state),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=None,  # in-flight requests finish, however long
    )
    server = uvicorn.Server(config)
    stop_accepting = server.handle_exit

    def on_signal(sig: int, frame: Any) -> None:
        state.engine.drain()  # requests arriving on open connections get 503
        stats = state.engine.stats()
        _log.info(
            "%s: draining (%d in flight, %d queued); no new requests",
            signal.Signals(sig).name,
            stats["active"],
            stats["queued"],
        )
        stop_accepting(sig, frame)

    server.handle_exit = on_signal  # type: ignore[method-assign]
    # uvicorn re-raises the signal once it has shut down; this handler makes that a no-op,
    # so a drained server exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        state.engine.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (1 with one line on a loading error)."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return serve(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
