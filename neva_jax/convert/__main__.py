"""`python -m neva_jax.convert`: Hugging Face and NeMo checkpoints <-> neva-jax model folders.

Subcommands register themselves in `SUBCOMMANDS` (name -> (add_arguments, run));
errors print one line `error: ...` naming the key or file and exit with status 1 (a
command line argparse cannot parse: its usage and status 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from neva_jax.convert import hf, hf_export, nemo_export, nemo_import

IMPORT_HELP = """\
Import Hugging Face weights (safetensors only) into a neva-jax model folder.

Two forms:
  import-hf SRC OUT [--adapter PEFT_DIR]
      SRC is a llava-hf LlavaForConditionalGeneration folder (e.g. llava-1.5-7b-hf):
      config.json, *.safetensors (sharded with model.safetensors.index.json too),
      tokenizer and preprocessor files. --adapter adds a PEFT LoRA adapter folder
      trained on SRC (adapter_config.json + adapter_model.safetensors; its
      multi_modal_projector too when saved): the model keeps the adapters unmerged
      (model.peft.scheme=lora) and trains or generates with them.
  import-hf --llm LLAMA_DIR --vision CLIP_DIR [--projector linear|mlp2x_gelu] OUT
      A LLaMA/Vicuna folder plus a CLIP folder (e.g. clip-vit-large-patch14-336);
      the projector starts freshly initialised (the stage-1 starting point) and
      <image> (and <pad>) are added to the tokenizer, growing the embeddings.

OUT receives model_config.json, params/ (Orbax), tokenizer/,
preprocessor_config.json and, when a template is known (--template, or a chat template
that an export-hf wrote), conversation.json. Folders with only pickled *.bin weights are refused:
convert them once with transformers (from_pretrained, then
save_pretrained(..., safe_serialization=True)).
"""


def _add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="SRC OUT, or OUT alone with --llm and --vision"
    )
    p.add_argument("--llm", metavar="LLAMA_DIR", help="Hugging Face LLaMA/Vicuna folder")
    p.add_argument("--vision", metavar="CLIP_DIR", help="Hugging Face CLIP(Vision)Model folder")
    p.add_argument(
        "--projector",
        help="fresh projector for --llm/--vision: linear or mlpNx_gelu (default mlp2x_gelu)",
    )
    p.add_argument(
        "--vision-select-layer",
        type=int,
        help="--llm/--vision: CLIP hidden state used as image features (default -2)",
    )
    p.add_argument(
        "--class-token-length",
        type=int,
        choices=(0, 1),
        help="--llm/--vision: 1 drops the CLIP class token (default), 0 keeps it",
    )
    p.add_argument(
        "--adapter",
        metavar="PEFT_DIR",
        help="a Hugging Face PEFT LoRA folder trained on SRC (llava-hf form only)",
    )
    p.add_argument("--seed", type=int, help="seed of the fresh projector (default 0)")
    p.add_argument(
        "--param-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="stored parameter dtype",
    )
    hf.add_conversation_arguments(p)


def _run_import(args: argparse.Namespace) -> None:
    from neva_jax.convert import checkpoint

    two_folders = args.llm is not None or args.vision is not None
    if two_folders:
        if args.llm is None or args.vision is None or len(args.paths) != 1:
            raise ValueError("import-hf with --llm needs --vision too and exactly one OUT folder")
        if args.adapter is not None:
            raise ValueError(
                "import-hf --adapter needs a llava-hf SRC (import-hf SRC OUT --adapter DIR)"
            )
    elif len(args.paths) != 2:
        raise ValueError("import-hf needs SRC OUT (or --llm LLAMA_DIR --vision CLIP_DIR OUT)")
    else:
        fresh = {
            "--projector": args.projector,
            "--vision-select-layer": args.vision_select_layer,
            "--class-token-length": args.class_token_length,
            "--seed": args.seed,
        }
        given = [flag for flag, value in fresh.items() if value is not None]
        if given:
            raise ValueError(
                f"import-hf {', '.join(given)}: only with --llm/--vision (a llava-hf folder "
                "brings its own projector and vision settings)"
            )
    out = Path(args.paths[-1])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not empty; choose a new output folder")
    start = time.time()
    if two_folders:
        imported = hf.import_llm_and_clip(
            args.llm,
            args.vision,
            projector=args.projector or "mlp2x_gelu",
            vision_select_layer=-2
            if args.vision_select_layer is None
            else args.vision_select_layer,
            class_token_length=1 if args.class_token_length is None else args.class_token_length,
            seed=args.seed or 0,
            param_dtype=args.param_dtype,
        )
    else:
        imported = hf.import_llava(
            args.paths[0], adapter=args.adapter, param_dtype=args.param_dtype
        )
    conversation = checkpoint.save_imported(out, imported, args.template, args.image_aspect)
    cfg = imported.config
    print(
        f"wrote {out}: LLM {cfg.llm.num_layers} layers x {cfg.llm.hidden_size}, vocab "
        f"{cfg.llm.vocab_size}, <image> = {cfg.image_token_id}; vision {cfg.vision.image_size}px "
        f"({cfg.num_image_tokens} image tokens); projector {cfg.projector}"
        + (
            f"; LoRA r={cfg.peft.rank} on {', '.join(cfg.peft.target_modules)}"
            if cfg.peft.enabled
            else ""
        )
        + f"; {conversation} ({time.time() - start:.1f}s)"
    )


# name -> (help, description, add_arguments, run).
SUBCOMMANDS: dict[str, tuple[str, str, Callable, Callable]] = {
    "import-hf": (
        "Hugging Face folders -> neva-jax model folder",
        IMPORT_HELP,
        _add_import_arguments,
        _run_import,
    ),
    "export-hf": hf_export.SUBCOMMAND,
    "import-nemo": nemo_import.SUBCOMMAND,
    "export-nemo": nemo_export.SUBCOMMAND,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m neva_jax.convert", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (short, description, add_arguments, _) in SUBCOMMANDS.items():
        p = sub.add_parser(
            name,
            help=short,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(p)
    args = parser.parse_args(argv)
    try:
        SUBCOMMANDS[args.command][3](args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
