"""OpenAI messages -> the checkpoint's chat template -> prompt ids; ids -> streamed text.

`ChatFormat.prepare` renders a whole conversation (system prompt, alternating
user/assistant turns, `image_url` parts as `<image>` placeholders) with the
template the checkpoint was trained with, exactly as `neva_jax.generate` renders a
single question, and loads the images. `TextStream` turns generated ids into text
deltas the way `Generator` turns a finished answer into text: special tokens
skipped, cut at the first stop string, surrounding whitespace stripped; so the
streamed pieces add up to the non-streamed answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import numpy as np

from neva_jax.data.conversation import IMAGE_PLACEHOLDER, ConversationError, Message
from neva_jax.data.tokenize import encode_spans
from neva_jax.eval.generate import Generator
from neva_jax.serve import images as images_lib
from neva_jax.serve.protocol import ApiError, ChatMessage, ImagePart, TextPart


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A rendered conversation ready for the engine."""

    text: str  # the rendered prompt (image slots as one `<image>` each)
    ids: list[int]  # token ids, image slots expanded
    pixels: np.ndarray | None  # [M, H, W, 3] CLIP-normalised, or None (text only)


class ChatFormat:
    """Renders requests with a `Generator`'s template, tokenizer and image preprocessing."""

    def __init__(self, gen: Generator, *, max_images: int, policy: images_lib.ImagePolicy):
        self.gen, self.max_images, self.policy = gen, max_images, policy

    def turns(self, messages: Sequence[ChatMessage]) -> tuple[str | None, list[Message], list]:
        """System prompt (None: the template's), merged turns, and the image parts in order.

        Consecutive messages of one role are joined with a newline; system (or
        developer) messages must come first; the last turn must be the user's.
        """
        system: list[str] = []
        turns: list[Message] = []
        parts: list[tuple[str, str]] = []  # (url, where)
        for i, msg in enumerate(messages):
            where = f"messages[{i}]"
            if msg.role in ("system", "developer"):
                if turns:
                    raise ApiError(
                        400,
                        f"{where}: a {msg.role} message must come before the user and assistant "
                        "turns",
                        param="messages",
                    )
                system.append(self._text_only(msg, where))
                continue
            if msg.role == "assistant":
                text = self._text_only(msg, where)
            else:
                text = self._user_text(msg, where, parts)
            if turns and turns[-1].role == msg.role:
                turns[-1] = Message(msg.role, turns[-1].text + "\n" + text)
            else:
                turns.append(Message(msg.role, text))
        if not turns or turns[-1].role != "user":
            raise ApiError(
                400,
                "the last message must be from the user (the model answers it)",
                param="messages",
            )
        if len(parts) > self.max_images:
            raise ApiError(
                400,
                f"the conversation has {len(parts)} images; this server takes at most "
                f"{self.max_images} per conversation (--max-images)",
                param="messages",
            )
        return ("\n".join(system) if system else None), turns, parts

    async def prepare(self, messages: Sequence[ChatMessage]) -> Prompt:
        """Renders, tokenizes and loads the images of one request (errors: `ApiError` 400)."""
        system, turns, parts = self.turns(messages)
        if turns[0].role != "user":
            raise ApiError(
                400, "the first turn after the system prompt must be the user's", param="messages"
            )
        try:
            spans = self.gen.template.render(turns, system=system)
        except ConversationError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        enc = encode_spans(spans, self.gen.tokenizer, self.gen.model.config.num_image_tokens)
        pixels = None
        if parts:
            arrays = []
            for url, where in parts:
                img = await images_lib.load_image(url, self.policy, where)
                arrays.append(await asyncio.to_thread(self.gen.preprocess, img))
            pixels = np.stack(arrays)
        return Prompt(enc.text, enc.ids.tolist(), pixels)

    @staticmethod
    def _text_only(msg: ChatMessage, where: str) -> str:
        if isinstance(msg.content, str) or msg.content is None:
            text = msg.content or ""
        else:
            if any(isinstance(p, ImagePart) for p in msg.content):
                raise ApiError(
                    400, f"{where}: only user messages may carry images", param="messages"
                )
            text = "\n".join(p.text for p in msg.content if isinstance(p, TextPart))
        _no_placeholder(text, where)
        return text

    @staticmethod
    def _user_text(msg: ChatMessage, where: str, parts: list[tuple[str, str]]) -> str:
        if msg.content is None:
            raise ApiError(400, f"{where}.content: field required", param="messages")
        if isinstance(msg.content, str):
            _no_placeholder(msg.content, where)
            return msg.content
        pieces = []
        for j, part in enumerate(msg.content):
            if isinstance(part, ImagePart):
                parts.append((part.image_url.url, f"{where}.content[{j}].image_url"))
                pieces.append(IMAGE_PLACEHOLDER)
            else:
                _no_placeholder(part.text, f"{where}.content[{j}]")
                pieces.append(part.text)
        return "\n".join(pieces)


def _no_placeholder(text: str, where: str) -> None:
    if IMAGE_PLACEHOLDER in text:
        raise ApiError(
            400,
            f"{where}: the text contains {IMAGE_PLACEHOLDER!r}; send images as image_url parts",
            param="messages",
        )


class TextStream:
    """Generated ids -> text deltas, with `Generator`'s decoding, stop strings and stripping.

    `add(id)` returns the text that is safe to send now; text that could still
    change is held back: an incomplete UTF-8 character, trailing whitespace (the
    final answer is stripped) and a tail that may begin a stop string. `finish()`
    returns the rest. After a stop string `stopped` is True and more ids are ignored.
    """

    def __init__(self, gen: Generator, stops: Sequence[str]):
        self.hf = gen.tokenizer.hf
        self.eos_ids = set(gen.eos_ids)
        self.stops = [s for s in (*stops, gen.template.stop) if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Records one generated id; returns the new text to send (maybe "")."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        full = self._decoded()
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full[:cut].strip())
        visible = full.lstrip()
        if visible.endswith("\ufffd"):
            return ""
        for s in self.stops:  # hold back a tail that may begin a stop string
            for k in range(min(len(s) - 1, len(visible)), 0, -1):
                if visible.endswith(s[:k]):
                    visible = visible[:-k]
                    break
        return self._emit(visible.rstrip())

    def finish(self) -> str:
        """The rest of the answer once generation ended (stripped, cut at a stop)."""
        if self.stopped:
            return ""
        full = self._decoded()
        cut = self._first_stop(full)
        return self._emit((full if cut is None else full[:cut]).strip())

    @property
    def text(self) -> str:
        """Everything sent so far (after `finish`: the whole answer)."""
        return self.sent

    def _decoded(self) -> str:
        body = self.ids[:-1] if self.ids and self.ids[-1] in self.eos_ids else self.ids
        return self.hf.decode(body, skip_special_tokens=True)

    def _first_stop(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stops if s in text]
        return min(hits) if hits else None

    def _emit(self, visible: str) -> str:
        if not visible.startswith(self.sent) or len(visible) <= len(self.sent):
            return ""
        delta = visible[len(self.sent) :]
        self.sent = visible
        return delta
