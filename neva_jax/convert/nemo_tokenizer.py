"""The tokenizer artifact of a NeMo checkpoint as a `transformers` fast tokenizer.

NeMo 2 stores a Hugging Face tokenizer folder (`context/nemo_tokenizer/`). NeMo 1
stores a sentencepiece model (`tokenizer.model: nemo:<hash>_name.model`) or names a
Hugging Face tokenizer. A sentencepiece model is converted here with the
`sentencepiece` library and `tokenizers` directly (BPE models as LLaMA's converter
does, unigram models as `Unigram`), reading the two fields the library does not expose
(model type, dummy-prefix flag) from the model's protobuf by hand, so no protobuf
code generation is involved. NeMo's `additional_special_tokens` are appended, as
NeMo's SentencePieceTokenizer appends them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neva_jax.convert.nemo_io import NemoError


def _varint(b: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = b[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(b: bytes) -> dict[int, Any]:
    """Top-level fields of a protobuf message (last value wins; nested as bytes)."""
    out: dict[int, Any] = {}
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(b, i)
        elif wire == 2:
            n, i = _varint(b, i)
            value, i = b[i : i + n], i + n
        elif wire == 5:
            value, i = b[i : i + 4], i + 4
        elif wire == 1:
            value, i = b[i : i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out[field] = value
    return out


def sentencepiece_tokenizer(model_file: str | Path, special_tokens: list[str] = ()) -> Any:
    """A `PreTrainedTokenizerFast` equivalent to sentencepiece model `model_file`.

    BOS is added at the start of each encoded text when the model defines one (as
    LLaMA's tokenizer does); NeMo itself adds BOS in its data pipeline.
    """
    import sentencepiece
    import transformers
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
    )

    data = Path(model_file).read_bytes()
    try:
        proto = _fields(data)
        trainer = _fields(proto.get(2, b""))
        normalizer = _fields(proto.get(3, b""))
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except (ValueError, IndexError, RuntimeError, OSError) as e:
        raise NemoError(f"{model_file}: not a sentencepiece model ({e})") from None
    model_type = trainer.get(3, 1)  # 1 unigram, 2 BPE
    byte_fallback = bool(trainer.get(35, 0))
    dummy_prefix = bool(normalizer.get(3, 1))
    squeeze = bool(normalizer.get(4, 1))  # remove_extra_whitespaces
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    unk = sp.unk_id()
    if model_type == 2:
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        merges = []
        for piece, _ in pieces:  # ids follow merge priority in sentencepiece BPE
            local = [
                (piece[:k], piece[k:])
                for k in range(1, len(piece))
                if piece[:k] in vocab and piece[k:] in vocab
            ]
            merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
        model = models.BPE(
            vocab,
            merges,
            unk_token=pieces[unk][0] if unk >= 0 else None,
            fuse_unk=True,
            byte_fallback=byte_fallback,
        )
    elif model_type == 1:
        model = models.Unigram(
            pieces, unk_id=unk if unk >= 0 else None, byte_fallback=byte_fallback
        )
    else:
        raise NemoError(f"{model_file}: sentencepiece model type {model_type} is not supported")
    tok = Tokenizer(model)
    steps = [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")] if squeeze else []
    steps += [normalizers.Prepend("▁")] if dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else [])
    )
    names = {
        "bos_token": sp.bos_id(),
        "eos_token": sp.eos_id(),
        "unk_token": unk,
        "pad_token": sp.pad_id(),
    }
    special = {k: pieces[i][0] for k, i in names.items() if i >= 0}
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special.values()]
    )
    if "bos_token" in special:
        bos = special["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())]
        )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    extra = [t for t in special_tokens if t not in fast.get_vocab()]
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    fast.nemo_sentencepiece_model = data  # the original file, kept for a NeMo 1 export
    return fast


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
