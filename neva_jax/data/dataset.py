"""Records -> prepared samples, with every bad sample turned into a counted reason.

Sources are random-access (grain's protocol: `len`, `__getitem__`) and return
`(raw record, origin)` where origin names the file and record for messages:

    RecordFileSource("train.json")        LLaVA JSON list or JSONL
    TfdsSource("tfds:name:train", ...)    tfds.data_source over array_record

`SamplePreparer(cfg)(item)` validates one record and returns either a good
sample `{"ids", "trained", "images", "where"}` (int32 [L], bool [L],
float32 [k, S, S, 3]) or a bad marker `{"bad": REASON, "where", "detail"}`; it
never raises for a data problem, so worker processes keep going and the batcher
(in the main process) counts, enforces `strict` and the skip ratio.

Over-long samples (`data.truncation`): `tokens` (LLaVA and NeMo) keeps the first
`max_seq_len` tokens, so a partly cut answer is still trained; `drop_rounds` drops
whole user/answer pairs from the end first and cuts tokens only when a single
round is still too long. Either way a sample whose image slots would be cut, or
that keeps no trained token, is skipped (`image_slots_cut`, `no_trained_token`);
a truncated sample is counted in data_report.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import Any

import numpy as np

from neva_jax.data import conversation, image
from neva_jax.data.config import TFDS_PREFIX, DataConfig
from neva_jax.data.tokenize import Encoded, TemplateMismatchError, TextTokenizer, encode_spans

REASONS = (
    "malformed_record",
    "image_count_mismatch",
    "too_many_images",
    "image_missing",
    "image_unreadable",
    "image_file_truncated",
    "image_path_outside_folder",
    "image_slots_cut",
    "no_trained_token",
    "template_mismatch",
    "control_token_in_text",
    "empty_answer",
    "plain_not_one_caption",
)


_TOKENIZER_LOCK = threading.Lock()  # grain reader threads may ask for it at once


class DataError(ValueError):
    """An unusable dataset or a stop condition (strict mode, skip ratio); one line."""


# ------------------------------------------------------------------------------ sources


def load_records(path: str) -> list[Any]:
    """Reads a LLaVA JSON list or a JSONL file; raises DataError naming the file/line."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is fine
            text = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check config.data paths") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); LLaVA data is JSON") from None
    stripped = text.lstrip()
    if stripped.startswith("{") and "\n" in stripped.rstrip():  # one object over many lines?
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines
        if isinstance(whole, dict):
            raise DataError(
                f"{path}: one JSON object (keys {', '.join(list(whole)[:4])}), not a list of "
                "records; LLaVA data is a JSON list or JSON lines"
            )
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        return records
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append(_Unparsable(f"line {lineno} is not valid JSON"))
    if not records and stripped:
        raise DataError(f"{path}: neither a JSON list nor JSONL records")
    return records


@dataclasses.dataclass(frozen=True)
class _Unparsable:
    detail: str


class RecordFileSource:
    """Random-access records of one JSON/JSONL file: item i -> (record, origin)."""

    def __init__(self, path: str):
        self.path = path
        self._records = load_records(path)
        self._name = os.path.basename(path)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def records(self) -> list[Any]:
        """The raw records (JSON values; an unparsable JSONL line is a marker object)."""
        return self._records

    def __getitem__(self, i: int) -> tuple[Any, str]:
        rec = self._records[i]
        where = f"{self._name} record {i}"
        if isinstance(rec, dict) and isinstance(rec.get("id"), str | int):
            where += f" (id {rec['id']!r})"
        return rec, where


class TfdsSource:
    """`tfds:NAME:SPLIT` through `tfds.data_source` (array_record, no TensorFlow).

    Features: `conversations` (JSON text, or a sequence of {from, value}), `image`
    (decoded uint8 array, encoded bytes, or a path under the image folder) or
    `images` (a sequence of those), optional `id` and `system`.
    """

    def __init__(self, spec: str, data_dir: str = ""):
        import tensorflow_datasets as tfds  # heavy; only for TFDS sources

        body = spec[len(TFDS_PREFIX) :]
        name, sep, split = body.rpartition(":")
        if not sep or not name or not split:
            raise DataError(f"{spec!r}: expected tfds:NAME:SPLIT (e.g. tfds:my_llava:train)")
        try:
            self._src = tfds.data_source(name, split=split, data_dir=data_dir or None)
        except Exception as e:  # tfds raises many kinds
            raise DataError(f"{spec}: cannot open TFDS dataset: {str(e).splitlines()[0]}") from e
        self.path = spec
        self._name = f"{name}[{split}]"

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> tuple[Any, str]:
        return record_from_example(self._src[i]), f"{self._name} record {i}"


def _text(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray) and v.dtype == object and v.ndim == 0:
        return _text(v.item())
    return v


def record_from_example(ex: dict) -> dict:
    """A decoded TFDS example -> a LLaVA-style record (images may be inline)."""
    rec: dict[str, Any] = {}
    if "id" in ex:
        rec["id"] = _text(ex["id"])
    if "system" in ex:
        rec["system"] = _text(ex["system"])
    conv = ex.get("conversations")
    if isinstance(conv, dict):
        conv = [
            {"from": _text(f), "value": _text(v)}
            for f, v in zip(conv.get("from", []), conv.get("value", []), strict=False)
        ]
    else:
        conv = _text(conv)
        if isinstance(conv, str):
            try:
                conv = json.loads(conv)
            except json.JSONDecodeError:
                conv = None
    rec["conversations"] = conv
    imgs = ex.get("images", ex.get("image"))
    if imgs is not None:
        if isinstance(imgs, np.ndarray) and imgs.dtype == np.uint8 and imgs.ndim == 3:
            rec["image"] = imgs
        elif isinstance(imgs, list | tuple) or (isinstance(imgs, np.ndarray) and imgs.ndim == 4):
            rec["image"] = [_text(x) for x in imgs]
        else:
            rec["image"] = _text(imgs)
    return rec


def open_source(spec: str, cfg: DataConfig) -> RecordFileSource | TfdsSource:
    """A source for one entry of `train_files`/`eval_files`."""
    if spec.startswith(TFDS_PREFIX):
        return TfdsSource(spec, cfg.tfds_data_dir)
    return RecordFileSource(spec)


# ------------------------------------------------------------------------- preparation


class BadSampleError(Exception):
    """One unusable sample; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class Prepared:
    """A good sample, with what `inspect` shows."""

    encoded: Encoded
    images: np.ndarray  # float32 [k, S, S, 3]
    image_names: list[str]
    where: str
    dropped_rounds: int
    cut_tokens: int
    full_length: int  # tokens before truncation


class SamplePreparer:
    """Picklable record -> sample transform (the tokenizer loads lazily per process)."""

    def __init__(self, cfg: DataConfig, tokenizer: TextTokenizer | None = None):
        cfg.require_model_fields()
        self.cfg = cfg
        self.template = conversation.get_template(cfg.template)
        self._tok = tokenizer
        self._controls: tuple[str, ...] | None = None

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg, "template": self.template, "_tok": None, "_controls": None}

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer (loaded on first use in each process, once)."""
        with _TOKENIZER_LOCK:
            if self._tok is None:
                from neva_jax.data.tokenize import load_tokenizer

                self._tok = load_tokenizer(
                    self.cfg.tokenizer,
                    use_im_start_end=self.cfg.use_im_start_end,
                    control_tokens=self.template.control_tokens,
                )
        return self._tok

    def __call__(self, item: tuple[Any, str]) -> dict:
        """(record, origin) -> good sample dict or bad marker dict (never raises)."""
        raw, where = item
        try:
            p = self.prepare(raw, where)
        except BadSampleError as e:
            return {"bad": e.reason, "where": where, "detail": e.detail}
        return {
            "ids": p.encoded.ids,
            "trained": p.encoded.trained,
            "images": p.images,
            "where": where,
            "truncated_tokens": p.full_length - len(p.encoded),
        }

    def token_length(self, raw: Any) -> int | None:
        """Tokens the record takes in a row (after truncation), images not read; None if bad."""
        try:
            return len(self.prepare(raw, "", load_images=False).encoded)
        except BadSampleError:
            return None

    def prepare(self, raw: Any, where: str, *, load_images: bool = True) -> Prepared:
        """Validates and prepares one record; raises `BadSampleError(reason, detail)`.

        `load_images=False` checks the text only and leaves the pixels zero.
        """
        cfg = self.cfg
        if isinstance(raw, _Unparsable):
            raise BadSampleError("malformed_record", raw.detail)
        if not isinstance(raw, dict):
            raise BadSampleError(
                "malformed_record", f"record is a {type(raw).__name__}, not an object"
            )
        turns = raw.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise BadSampleError("malformed_record", "missing or empty 'conversations' list")
        images = raw.get("image", raw.get("images"))
        if images is None:
            images = []
        elif isinstance(images, str | bytes | np.ndarray):
            images = [images]
        elif not isinstance(images, list):
            raise BadSampleError("malformed_record", f"'image' is a {type(images).__name__}")
        system = raw.get("system", cfg.system_prompt)
        try:
            messages = conversation.messages_from_llava(turns)
        except conversation.ConversationError as e:
            raise BadSampleError("malformed_record", str(e)) from e
        self._check_messages(messages)
        try:
            spans = self.template.render(messages, system if isinstance(system, str) else None)
        except conversation.ConversationError as e:
            raise BadSampleError("malformed_record", str(e)) from e
        n_placeholders = sum(s.text.count(conversation.IMAGE_PLACEHOLDER) for s in spans)
        n_in_turns = sum(m.text.count(conversation.IMAGE_PLACEHOLDER) for m in messages)
        if n_in_turns != len(images) or n_placeholders != n_in_turns:
            raise BadSampleError(
                "image_count_mismatch",
                f"{n_in_turns} <image> placeholder(s) for {len(images)} image(s)",
            )
        if len(images) > cfg.max_images_per_row:
            raise BadSampleError(
                "too_many_images",
                f"{len(images)} images > config.data.max_images_per_row={cfg.max_images_per_row}",
            )
        enc, dropped, cut, full_length = self._encode_fitting(spans)
        pixels = np.zeros((len(images), cfg.image_size, cfg.image_size, 3), np.float32)
        names = []
        for j, ref in enumerate(images if load_images else ()):
            pixels[j], name = self._load_image(ref, where)
            names.append(name)
        return Prepared(enc, pixels, names, where, dropped, cut, full_length)

    def _check_messages(self, messages: list[conversation.Message]) -> None:
        """What the templates would render but train wrongly, as counted skips.

        - A control token written in the text (`</s>`, `<|eot_id|>`, ...) would be encoded
          as that token: an answer that ends mid-way, or a forged turn. (LLaVA encodes it
          too, then its round split fails and it masks the whole sample.)
        - An empty answer would train only an end of turn (LLaVA masks the sample).
        - `plain` is one image and its caption: LLaVA's preprocess_plain asserts two turns
          with `<image>` in the first.
        """
        controls = self._control_strings()
        for i, m in enumerate(messages):
            found = next((c for c in controls if c in m.text), None)
            if found is not None:
                raise BadSampleError(
                    "control_token_in_text",
                    f"turn {i} contains {found!r}, which the tokenizer encodes as a control token",
                )
            if m.role == "assistant" and not m.text.strip():
                raise BadSampleError("empty_answer", f"turn {i} is an empty answer")
        if self.template.name == "plain" and (
            len(messages) != 2 or conversation.IMAGE_PLACEHOLDER not in messages[0].text
        ):
            raise BadSampleError(
                "plain_not_one_caption",
                f"{len(messages)} turns; the plain template takes one image and its caption "
                "(two turns, <image> in the first)",
            )

    def _control_strings(self) -> tuple[str, ...]:
        """Special tokens of the tokenizer and the template's control tokens, but the
        image placeholder and its start/end tokens (which records may carry)."""
        if self._controls is None:
            hf = self.tokenizer.hf
            allowed = {conversation.IMAGE_PLACEHOLDER, *self._image_markers()}
            found = {*getattr(hf, "all_special_tokens", ()), *self.template.control_tokens}
            self._controls = tuple(sorted(t for t in found if t and t not in allowed))
        return self._controls

    def _image_markers(self) -> tuple[str, ...]:
        tok = self.tokenizer
        ids = [i for i in (tok.im_start_id, tok.im_end_id) if i is not None]
        return tuple(tok.hf.convert_ids_to_tokens(ids)) if ids else ()

    def _encode(self, spans: list[conversation.Span]) -> Encoded:
        try:
            return encode_spans(spans, self.tokenizer, self.cfg.num_image_slots)
        except TemplateMismatchError as e:
            raise BadSampleError("template_mismatch", str(e)) from e

    def _encode_fitting(self, spans: list[conversation.Span]) -> tuple[Encoded, int, int, int]:
        """-> (encoded, rounds dropped, tokens cut, length before truncation)."""
        cfg, tok = self.cfg, self.tokenizer
        rounds = max(s.round for s in spans) + 1
        total_images = sum(s.text.count(conversation.IMAGE_PLACEHOLDER) for s in spans)
        full = enc = self._encode(spans)
        keep = rounds
        while cfg.truncation == "drop_rounds" and len(enc) > cfg.max_seq_len and keep > 1:
            keep -= 1
            enc = self._encode([s for s in spans if s.round < keep])
        if enc.num_images != total_images:
            raise BadSampleError(
                "image_slots_cut",
                f"an image in round {keep + 1} would be cut by config.data.max_seq_len="
                f"{cfg.max_seq_len}",
            )
        cut = max(0, len(enc) - cfg.max_seq_len)
        if cut:
            if enc.image[cfg.max_seq_len :].any() or (
                cfg.use_im_start_end and enc.ids[cfg.max_seq_len - 1] == tok.image_token_id
            ):
                raise BadSampleError(
                    "image_slots_cut",
                    f"{len(enc)} tokens; image slots end past config.data.max_seq_len="
                    f"{cfg.max_seq_len}",
                )
            enc = _truncate(enc, cfg.max_seq_len)
        if not enc.trained[1:].any():
            raise BadSampleError(
                "no_trained_token",
                "no answer token within config.data.max_seq_len"
                if cut
                else "no answer to train on",
            )
        return enc, rounds - keep, cut, len(full)

    def _load_image(self, ref: Any, where: str) -> tuple[np.ndarray, str]:
        cfg = self.cfg
        try:
            if isinstance(ref, str):
                path = image.resolve_image_path(cfg.image_folder, ref)
                label = f"image {ref!r}"
                if not os.path.exists(path):
                    raise image.ImageError(
                        "image_missing",
                        f"{label} not found under config.data.image_folder={cfg.image_folder!r}",
                    )
                img = image.open_image(path, where=label)
                name = ref
            elif isinstance(ref, bytes | np.ndarray):
                img = image.open_image(ref, where="inline image")
                name = "<inline>"
            else:
                raise image.ImageError("malformed_record", f"image entry is a {type(ref).__name__}")
            px = image.preprocess(
                img,
                size=cfg.image_size,
                aspect=cfg.image_aspect_ratio,
                mean=cfg.image_mean,  # type: ignore[arg-type]
                std=cfg.image_std,  # type: ignore[arg-type]
            )
        except image.ImageError as e:
            raise BadSampleError(e.reason, str(e)) from e
        return px, name


def _truncate(enc: Encoded, n: int) -> Encoded:
    return dataclasses.replace(
        enc,
        ids=enc.ids[:n],
        trained=enc.trained[:n],
        image=enc.image[:n],
        round=enc.round[:n],
        char_span=enc.char_span[:n],
    )
