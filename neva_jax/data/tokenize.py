"""Tokenizer loading and the one generic spans -> (ids, trained mask, image slots) step.

Token ids are exactly what LLaVA's `tokenizer_image_token` gives for the whole
rendered prompt: the text is cut at each `<image>` placeholder, every piece is
tokenized as one string (the first with the tokenizer's BOS, the others without),
and each placeholder becomes `num_image_slots` copies of the `<image>` id
(surrounded by `<im_start>`/`<im_end>` with `use_im_start_end`). Spans are never
tokenized one by one, so SentencePiece's leading-space handling at span
boundaries cannot change the ids.

SentencePiece (LLaVA's slow LLaMA tokenizer) puts its dummy prefix `▁` in front of
every text, also one that starts with a space (" USER:" -> `▁`, `▁US`, ...); a
`tokenizers` Metaspace pre-tokenizer drops it there. For such tokenizers
(`dummy_prefix_id`) a piece that starts with a space gets the `▁` token back, so
the ids are SentencePiece's. (Runs of two or more spaces still tokenize
differently: the converted BPE merges `▁▁` before SentencePiece would.)

Which tokens are trained is read from the tokenizer's character offsets, not from
token-count arithmetic: a token is trained when its non-space characters lie in a
trained span. A token whose non-space characters straddle a trained and an
untrained span means the template and tokenizer disagree; that raises
`TemplateMismatchError` (the pipeline skips and counts the sample).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from neva_jax.data.conversation import IMAGE_PLACEHOLDER, Span

IM_START = "<im_start>"
IM_END = "<im_end>"


class TemplateMismatchError(ValueError):
    """The tokenization does not respect the template's trained/untrained boundaries."""


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """A Hugging Face tokenizer plus the ids the pipeline needs."""

    hf: Any  # transformers.PreTrainedTokenizerBase (fast: offsets are required)
    path: str
    image_token_id: int
    pad_id: int
    bos_id: int | None  # prepended to every sample (None: the tokenizer adds no BOS)
    eos_id: int | None
    im_start_id: int | None = None
    im_end_id: int | None = None
    dummy_prefix_id: int | None = None  # `▁` when a leading space swallows the dummy prefix
    added_tokens: tuple[str, ...] = ()  # tokens this loader added to the vocabulary
    # transformers' wrapper may reconfigure the Rust tokenizer on a call; grain's
    # reader threads share one tokenizer, so calls are serialised.
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, repr=False, compare=False
    )

    @property
    def vocab_size(self) -> int:
        """Number of ids in use (base vocabulary + added tokens)."""
        return len(self.hf)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids (no special tokens added) and character offsets of `text`."""
        with self._lock:
            enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def token_id(self, text: str) -> int:
        """Id of a string that is a single (control) token; ValueError otherwise."""
        ids = self.hf.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"tokenizer {self.path}: {text!r} is not a single token ({ids})")
        return int(ids[0])


def load_tokenizer(
    path: str,
    *,
    use_im_start_end: bool = False,
    control_tokens: Sequence[str] = (),
) -> TextTokenizer:
    """Loads `AutoTokenizer` from a folder and adds `<image>` (and friends) when absent.

    `control_tokens` (a template's `control_tokens`) that are not single tokens yet
    are added as special tokens, like `<image>`; `added_tokens` lists what grew the
    vocabulary, so the model's embedding table must cover `vocab_size`.
    """
    import transformers  # heavy; only needed here

    if not path:
        raise ValueError("config.data.tokenizer is empty; set it to a tokenizer folder")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"config.data.tokenizer={path!r}: no such folder (expected tokenizer.json or "
            "tokenizer.model with tokenizer_config.json)"
        )
    try:
        hf = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"config.data.tokenizer={path!r}: cannot load tokenizer: {first}") from e
    if not getattr(hf, "is_fast", False):
        raise ValueError(
            f"config.data.tokenizer={path!r}: a fast (tokenizers-backed) tokenizer is needed "
            "for character offsets; add tokenizer.json or tokenizer.model"
        )
    if not hf.encode("a b", add_special_tokens=False):
        raise ValueError(
            f"config.data.tokenizer={path!r}: the tokenizer returns no ids for text; its "
            "files are incomplete (save it with save_pretrained)"
        )
    wanted = [IMAGE_PLACEHOLDER, *control_tokens]
    if use_im_start_end:
        wanted += [IM_START, IM_END]
    added = tuple(t for t in dict.fromkeys(wanted) if not _is_single_token(hf, t))
    if added:
        hf.add_special_tokens({"additional_special_tokens": list(added)})
    plain_a = hf.encode("a", add_special_tokens=False)
    swallows = plain_a == hf.encode(" a", add_special_tokens=False) and str(
        hf.convert_ids_to_tokens(plain_a[0])
    ).startswith("\u2581")
    probe = hf.encode("a", add_special_tokens=True)
    bos = (
        hf.bos_token_id if hf.bos_token_id is not None and probe[:1] == [hf.bos_token_id] else None
    )
    pad = next((i for i in (hf.pad_token_id, hf.unk_token_id, hf.eos_token_id) if i is not None), 0)
    tok = TextTokenizer(
        hf=hf,
        path=path,
        image_token_id=0,
        pad_id=int(pad),
        bos_id=bos,
        eos_id=hf.eos_token_id,
        added_tokens=added,
    )
    return dataclasses.replace(
        tok,
        image_token_id=tok.token_id(IMAGE_PLACEHOLDER),
        im_start_id=tok.token_id(IM_START) if use_im_start_end else None,
        im_end_id=tok.token_id(IM_END) if use_im_start_end else None,
        dummy_prefix_id=tok.token_id("\u2581") if swallows else None,
    )


def _is_single_token(hf: Any, text: str) -> bool:
    ids = hf.encode(text, add_special_tokens=False)
    return len(ids) == 1 and hf.convert_ids_to_tokens(ids[0]) == text


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenized sample.

    ids: int32 [L]; trained: bool [L] (token is an answer token or end-of-turn);
    image: bool [L] (image slot); round: int32 [L] (conversation round, -1 for BOS);
    char_span: int32 [L, 2] character range of each token in the rendered text (the
    `<image>` placeholder for image tokens); text: the rendered text.
    """

    ids: np.ndarray
    trained: np.ndarray
    image: np.ndarray
    round: np.ndarray
    char_span: np.ndarray
    text: str

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_images(self) -> int:
        return self.text.count(IMAGE_PLACEHOLDER)


def encode_spans(spans: Sequence[Span], tok: TextTokenizer, num_image_slots: int) -> Encoded:
    """Spans -> ids, trained mask and image-slot mask (see the module docstring).

    Raises `TemplateMismatchError` when a token straddles a trained/untrained boundary.
    """
    text = "".join(s.text for s in spans)
    n = len(text)
    char_trained = np.zeros(n, bool)
    char_round = np.zeros(n, np.int32)
    pos = 0
    for s in spans:
        char_trained[pos : pos + len(s.text)] = s.trained
        char_round[pos : pos + len(s.text)] = s.round
        pos += len(s.text)
    is_space = np.array([c.isspace() for c in text], bool)

    ids: list[int] = []
    trained: list[bool] = []
    image: list[bool] = []
    rounds: list[int] = []
    spans_out: list[tuple[int, int]] = []
    if tok.bos_id is not None:
        ids.append(tok.bos_id)
        trained.append(False)
        image.append(False)
        rounds.append(-1)
        spans_out.append((0, 0))
    start = 0
    pieces = text.split(IMAGE_PLACEHOLDER)
    for k, piece in enumerate(pieces):
        if k > 0:  # the placeholder before this piece
            at = start - len(IMAGE_PLACEHOLDER)
            slot_ids = [tok.image_token_id] * num_image_slots
            if tok.im_start_id is not None:
                slot_ids = [tok.im_start_id, *slot_ids, tok.im_end_id]
            r = int(char_round[at])
            for sid in slot_ids:
                ids.append(int(sid))
                trained.append(False)
                image.append(sid == tok.image_token_id)
                rounds.append(r)
                spans_out.append((at, start))
        if piece and piece[0] == " " and tok.dummy_prefix_id is not None:
            ids.append(tok.dummy_prefix_id)  # SentencePiece's dummy prefix (module docstring)
            trained.append(bool(char_trained[start]))
            image.append(False)
            rounds.append(int(char_round[start]))
            spans_out.append((start, start))
        if piece:
            piece_ids, offsets = tok.encode_with_offsets(piece)
            for tid, (a, b) in zip(piece_ids, offsets, strict=True):
                a, b = a + start, b + start
                ids.append(int(tid))
                trained.append(_token_trained(text, a, b, char_trained, is_space))
                image.append(False)
                rounds.append(int(char_round[min(a, n - 1)]))
                spans_out.append((a, b))
        start += len(piece) + len(IMAGE_PLACEHOLDER)
    return Encoded(
        ids=np.asarray(ids, np.int32),
        trained=np.asarray(trained, bool),
        image=np.asarray(image, bool),
        round=np.asarray(rounds, np.int32),
        char_span=np.asarray(spans_out, np.int32).reshape(-1, 2),
        text=text,
    )


def _token_trained(
    text: str, a: int, b: int, char_trained: np.ndarray, is_space: np.ndarray
) -> bool:
    if b <= a:  # zero-width (an inserted prefix space): belongs where it stands
        return bool(char_trained[min(a, len(text) - 1)])
    solid = ~is_space[a:b]
    flags = char_trained[a:b][solid] if solid.any() else char_trained[a:b]
    if flags.all():
        return True
    if not flags.any():
        return False
    if not solid.any():  # whitespace across a boundary: never trained
        return False
    raise TemplateMismatchError(
        f"token {text[a:b]!r} at characters {a}-{b} spans trained and untrained text"
    )
