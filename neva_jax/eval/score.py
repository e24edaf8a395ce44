"""Log-likelihood of an answer: log P(continuation | prompt, image) and whether greedy
decoding would produce it (lmms-eval's `loglikelihood` requests, multiple-choice scoring).

The prompt is rendered exactly as `Generator.generate` renders it (template, system
prompt, image slots); the continuation is the text that follows the assistant's
opening, tokenized together with the prompt (`encode_spans` over the two pieces, so a
leading space belongs to the continuation's first token as in any other answer). The
sum runs over the continuation's tokens only: no end-of-turn token is added.

    scores = continuation_scores(gen, [("What colour?", " red", image)])
    logprob, is_greedy = scores[0]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neva_jax.data.conversation import Span
from neva_jax.data.tokenize import TemplateMismatchError, encode_spans
from neva_jax.eval.generate import Generator, bucket_prompt_length
from neva_jax.model.neva import mask_padded_vocab


def continuation_ids(
    gen: Generator, question: str, continuation: str, has_image: bool
) -> tuple[np.ndarray, int]:
    """(ids of prompt + continuation, how many of the last ids are the continuation's)."""
    if not continuation:
        raise ValueError("the continuation to score is empty")
    spans = gen.prompt_spans(question, has_image)  # as generate renders it, checks included
    slots = gen.model.config.num_image_tokens
    prompt = encode_spans(spans, gen.tokenizer, slots)
    try:
        enc = encode_spans([*spans, Span(continuation, True, 0)], gen.tokenizer, slots)
        n = int(enc.trained.sum())
        ids = enc.ids
        if n == 0 or not enc.trained[-n:].all() or len(ids) - n != len(prompt.ids):
            raise TemplateMismatchError("the continuation merged into the prompt's last token")
    except TemplateMismatchError:  # tokenized apart: the prompt's ids, then the answer's own
        extra = gen.tokenizer.hf.encode(continuation, add_special_tokens=False)
        ids, n = np.concatenate([prompt.ids, np.asarray(extra, np.int32)]), len(extra)
    return np.asarray(ids, np.int32), n


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_jit(
    state: nnx.State,
    input_ids: jax.Array,
    images: jax.Array | None,
    segment_ids: jax.Array,
    positions: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    graphdef: nnx.GraphDef,
) -> tuple[jax.Array, jax.Array]:
    """Per row: the summed log-probability of the masked targets, and whether each
    masked target is the argmax."""
    model = nnx.merge(graphdef, state)
    logits = model(input_ids, images, positions=positions, segment_ids=segment_ids)
    logits = mask_padded_vocab(logits, getattr(model.config, "tokenizer_vocab_size", 0))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(picked * mask, axis=1), jnp.all(greedy | (mask == 0), axis=1)


def continuation_scores(
    gen: Generator, requests: Sequence[tuple[str, str, Any | None]]
) -> list[tuple[float, bool]]:
    """(log P(continuation), is_greedy) for each (question, continuation, image or None).

    The continuation is the text after the assistant's opening as the model writes it:
    with its leading space (" red"); `Completion.text` has that space stripped, so score
    " " + text to score a generated answer. One request at a time, right-padded to
    `generate`'s prompt buckets (one compiled program per bucket and image/no image).
    """
    graphdef, state = nnx.split(gen.model)
    out = []
    for i, request in enumerate(requests):
        if not isinstance(request, tuple | list) or len(request) != 3:
            raise ValueError(f"request {i}: expected (question, continuation, image or None)")
        question, continuation, image = request
        ids, n = continuation_ids(gen, question, continuation, image is not None)
        limit = gen.model.config.llm.encoder_seq_length
        if len(ids) > limit:
            raise ValueError(f"prompt + continuation is {len(ids)} tokens; the model holds {limit}")
        T = min(bucket_prompt_length(len(ids)), limit)
        input_ids = np.full((1, T), gen.tokenizer.pad_id, np.int32)
        input_ids[0, : len(ids)] = ids
        segment_ids = np.zeros((1, T), np.int32)
        segment_ids[0, : len(ids)] = 1
        positions = np.arange(T, dtype=np.int32)[None]
        targets = np.zeros((1, T), np.int32)
        targets[0, : len(ids) - 1] = ids[1:]
        mask = np.zeros((1, T), np.float32)
        mask[0, len(ids) - 1 - n : len(ids) - 1] = 1.0  # the positions that predict them
        pixels = None
        if image is not None:
            pixels = gen.preprocess(image)[None, None]
        logprob, greedy = _score_jit(
            state, input_ids, pixels, segment_ids, positions, targets, mask, graphdef=graphdef
        )
        out.append((float(logprob[0]), bool(greedy[0])))
    return out
