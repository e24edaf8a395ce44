"""The tokenizer artifact of a NeMo checkpoint as a `transformers` fast tokenizer, and
the vocabulary of an import (trimmed table, `<image>` and NeMo's media-token rows).

NeMo 2 stores a Hugging Face tokenizer folder (`context/nemo_tokenizer/`). NeMo 1
stores a sentencepiece model (`tokenizer.model: nemo:<hash>_name.model`) or names a
Hugging Face tokenizer. A sentencepiece model is converted by transformers' generic
sentencepiece conversion (`tokenizer_class: PreTrainedTokenizerFast`), which builds
the tokenizer from the model's own spec (normalization charsmap, whitespace folding,
dummy prefix, unknown piece, byte fallback) and encodes exactly as the `sentencepiece`
library does; `LlamaTokenizer(Fast)` does not (it drops the normalizer spec and maps
characters outside the vocabulary to nothing instead of `<unk>`). NeMo's
`additional_special_tokens` are appended in order, as NeMo's SentencePieceTokenizer
appends them, and match whole in the text (each piece of text between them gets its
own dummy prefix, as NeMo encodes it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from neva_jax.convert.hf import VOCAB_MULTIPLE
from neva_jax.convert.nemo_io import NemoError
from neva_jax.data.conversation import IMAGE_PLACEHOLDER

# NeMo 1 NeVA media tokens (patch, start, end) per mm_cfg.llm.model_type.
MEDIA_TOKENS = {"llama_3": tuple(f"<|reserved_special_token_{i}|>" for i in (3, 4, 5))}
DEFAULT_MEDIA = ("<extra_id_3>", "<extra_id_4>", "<extra_id_5>")


def sentencepiece_tokenizer(model_file: str | Path, special_tokens: list[str] = ()) -> Any:
    """A fast tokenizer that encodes as sentencepiece model `model_file` does, with
    `special_tokens` appended after its pieces.

    BOS is added at the start of each encoded text when the model defines one (as
    LLaMA's tokenizer does); NeMo itself adds BOS in its data pipeline. The model file
    is kept as `nemo_sentencepiece_model` (bytes) for a NeMo 1 export.
    """
    import sentencepiece
    import transformers

    data = Path(model_file).read_bytes()
    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError) as e:
        raise NemoError(f"{model_file}: not a sentencepiece model ({e})") from None
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": sp.bos_id() >= 0,
        "add_eos_token": False,
    }
    for name, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())):
        if i >= 0:
            config[f"{name}_token"] = sp.id_to_piece(i)
    if sp.pad_id() >= 0:
        config["pad_token"] = sp.id_to_piece(sp.pad_id())
    with tempfile.TemporaryDirectory(prefix="neva_sp_") as tmp:
        shutil.copy(model_file, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
        try:
            tok = transformers.AutoTokenizer.from_pretrained(tmp)
        except (ImportError, TypeError, ValueError) as e:  # e.g. protobuf older than needed
            raise NemoError(
                f"{model_file}: transformers cannot convert this sentencepiece model "
                f"({str(e).splitlines()[0]}); pip install 'neva-jax[nemo]' for protobuf"
            ) from None
    if len(tok) != sp.get_piece_size():
        raise NemoError(
            f"{model_file}: converted to {len(tok)} tokens, the model has {sp.get_piece_size()}"
        )
    extra = [t for t in special_tokens if t not in tok.get_vocab()]
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    tok.nemo_sentencepiece_model = data  # the original file, kept for a NeMo 1 export
    return tok


def nemo1_tokenizer(tok_cfg: dict[str, Any], find_member: Any, workdir: Path, where: str) -> Any:
    """The tokenizer of a NeMo 1 `tokenizer:` section; `find_member(name)` extracts a
    `nemo:`-referenced artifact of the checkpoint to a local file (or None)."""
    import transformers

    library = tok_cfg.get("library", "sentencepiece")
    extra = list(tok_cfg.get("additional_special_tokens") or [])
    if library == "sentencepiece":
        ref = tok_cfg.get("model") or tok_cfg.get("tokenizer_model")
        if not ref:
            raise NemoError(f"{where}: tokenizer.model is not set (sentencepiece)")
        file = find_member(str(ref), workdir)
        if file is None:
            raise NemoError(
                f"{where}: tokenizer.model={ref!r} is neither in the checkpoint nor a file"
            )
        return sentencepiece_tokenizer(file, extra)
    if library == "huggingface":
        name = tok_cfg.get("type") or tok_cfg.get("model")
        local = find_member(str(name), workdir) if name else None
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(local or name))
        except (OSError, ValueError) as e:
            raise NemoError(
                f"{where}: tokenizer.type={name!r} cannot be loaded offline ({str(e).splitlines()[0]}); "
                "pass --tokenizer DIR"
            ) from None
        if extra:
            tok.add_special_tokens({"additional_special_tokens": extra})
        return tok
    raise NemoError(
        f"{where}: tokenizer.library={library!r} is not supported; pass --tokenizer DIR"
    )


# ---------------------------------------------------------------------------- vocabulary


def vocabulary(
    tokenizer: Any, padded: int, neva: dict[str, Any] | None, where: str, grow: bool = False
) -> tuple[int, list[int | None], int | None]:
    """(model vocab size, row sources, image token id): the padded table is trimmed to the
    tokenizer (rounded up to 64); NeVA adds `<image>` (and `<im_start>`/`<im_end>`),
    copying the rows of NeMo's media tokens. `grow`: the LLM came separately (--llm), so
    tokens past its table get new (mean) rows instead of being an error."""
    from neva_jax.data.tokenize import IM_END, IM_START

    base = len(tokenizer)
    copies: dict[int, int] = {}
    image_id = None
    if neva is not None:
        media = neva["media"]
        wanted = [(IMAGE_PLACEHOLDER, media[0])]
        if neva["use_im_start_end"]:
            wanted += [(IM_START, media[1]), (IM_END, media[2])]
        vocab = tokenizer.get_vocab()
        new = [t for t, _ in wanted if t not in vocab]
        if new:
            tokenizer.add_special_tokens({"additional_special_tokens": new})
        vocab = tokenizer.get_vocab()
        for ours, theirs in wanted:
            if theirs in vocab and theirs != ours and vocab[theirs] < padded:
                copies[vocab[ours]] = vocab[theirs]
        image_id = vocab[IMAGE_PLACEHOLDER]
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    n = len(tokenizer)
    if base > padded and not grow:
        raise NemoError(f"{where}: tokenizer has {base} tokens, the embedding only {padded} rows")
    size = -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    size = min(size, padded) if n <= padded else size
    rows: list[int | None] = [i if i < min(base, padded) else None for i in range(size)]
    for new_id, src in copies.items():
        rows[new_id] = src
    return size, rows, image_id
