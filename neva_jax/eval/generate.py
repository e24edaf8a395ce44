"""Batched generation with a preallocated KV cache.

Axis letters: B batch, T prompt length (bucketed), N new tokens (bucketed),
S = T + N cache slots, V vocab, M images per row.

One jitted function does the whole request: the prompt (with its image slots)
is prefilled in one call, which runs the vision tower once per image, then a
`jax.lax.while_loop` decodes one token per step into the static-shape cache
until every row has produced an end-of-sequence token or `max_new_tokens` is
reached. Rows have different prompt lengths: prompts are left padded (segment
id 0) with per-row positions, so every row's next token sits in the same slot.

Shapes are bucketed so that nearby requests share a compiled program: the
prompt length to the next {2^k, 1.5 * 2^k} (above 256, the next multiple of a
quarter power of two: 320, 384, 448, 512, 640, ...), the new-token budget to the next
power of two (`max_new_tokens` itself, and every sampling knob, is a traced
value), and the batch to a multiple of the mesh's batch shards.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neva_jax import platform
from neva_jax.convert.checkpoint import load_model
from neva_jax.data import image as image_lib
from neva_jax.data.conversation import IMAGE_PLACEHOLDER, Message, Span, Template, get_template
from neva_jax.data.tokenize import TextTokenizer, encode_spans, load_tokenizer
from neva_jax.eval.sampling import SamplingParams, select_next
from neva_jax.model.neva import mask_padded_vocab

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 8
FINE_PROMPT_BUCKETS_FROM = 256


def bucket_prompt_length(length: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """The smallest bucket (at least `minimum`) that holds `length`.

    Up to FINE_PROMPT_BUCKETS_FROM the buckets are 2^k and 1.5 * 2^k; above it, every
    quarter of a power of two (256, 320, 384, 448, 512, 640, 768, ...), so that a
    long prompt (one image is 256 or 576 slots) is padded by at most 25% of its
    length rather than 50%: prefill is most of the time to first token.
    """
    size = minimum
    while size < length:
        if size >= FINE_PROMPT_BUCKETS_FROM:
            size += (1 << (size.bit_length() - 1)) // 4
        else:
            size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
    return size


def bucket_new_tokens(n: int, minimum: int = MIN_NEW_TOKENS_BUCKET) -> int:
    """The smallest power of two (at least `minimum`) that holds `n`."""
    size = minimum
    while size < n:
        size *= 2
    return size


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """What `generate_tokens` returns, one entry per prompt.

    Attributes:
      token_ids: the generated ids, ending with the end-of-sequence id when one
        was produced (the prompt is not included).
      logprobs: the model's log-probability of each generated token (from the
        raw logits, before repetition penalty, temperature or filtering).
      finished: True where generation stopped at an end-of-sequence id.
      logits: [B, N, V] float32 raw next-token logits of every step (padded
        vocabulary rows masked), only with `return_logits=True` (rows past their end
        hold the logits of padding).
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]
    logits: np.ndarray | None = None


def _batch_shards(state: nnx.State) -> tuple[jax.sharding.Mesh | None, int]:
    """The mesh the model lives on (if any) and how many ways it splits the batch."""
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            mesh = sharding.mesh
            shards = 1
            for axis in ("data", "fsdp"):
                shards *= dict(mesh.shape).get(axis, 1)
            return mesh, shards
    return None, 1


def generate_tokens(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    images: np.ndarray | None = None,
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int = 0,
    sampling: SamplingParams | None = None,
    return_logits: bool = False,
    per_layer_weights: bool | None = None,
    decode_layers: Sequence[nnx.Module] | None = None,
) -> GenerationOutput:
    """Generates continuations of token-id prompts.

    Args:
      model: a `Neva` (or anything with its `hidden_states(..., cache=)` and
        `llm` API), on one device or sharded on a mesh.
      prompts: B token-id lists, image slots already expanded to the model's
        `image_token_id` (the vision tower fills them).
      images: [B, M, H, W, 3] CLIP-normalised pixels, or None for text only.
      max_new_tokens: how many tokens to generate at most.
      eos_ids: ids that end a row (e.g. the tokenizer's `</s>`).
      pad_id: id written after a row has ended (and used for prompt padding).
      sampling: how to pick tokens (default greedy); see `SamplingParams`.
      return_logits: also return the raw logits of every step (tests, scoring).
      per_layer_weights: the decode form. True: the LLM's per-layer weights are sliced
        out of the stacked arrays once per call and every decode step reads them in
        place (fastest on CPU; holds the LLM's weights twice during the call). False:
        each step slices them from the stack. None: this backend's choice
        (`platform.per_layer_decode`). Both forms compute the same values.
      decode_layers: the per-layer weights already made by `prepare_decode_layers`
        (held by the caller across calls, as `Generator` does on CPU): the per-layer
        form without slicing them again in this call.

    Returns:
      A `GenerationOutput`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_tokens needs at least one prompt and no empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not eos_ids:
        raise ValueError("eos_ids is empty: give at least one end-of-sequence id")
    sampling = sampling or SamplingParams()
    graphdef, state = nnx.split(model)
    mesh, shards = _batch_shards(state)
    rows = len(prompts)
    B = -(-rows // shards) * shards
    T = bucket_prompt_length(max(len(p) for p in prompts))
    N = bucket_new_tokens(max_new_tokens)
    # Rows that pad the batch to the mesh repeat the last prompt (and start done).
    padded = list(prompts) + [prompts[-1]] * (B - rows)
    input_ids = np.full((B, T), pad_id, np.int32)
    segment_ids = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for b, p in enumerate(padded):
        input_ids[b, T - len(p) :] = p
        segment_ids[b, T - len(p) :] = 1
        positions[b, T - len(p) :] = np.arange(len(p))
    if images is not None:
        images = np.asarray(images, np.float32)
        if images.shape[0] != rows:
            raise ValueError(f"got {images.shape[0]} image rows for {rows} prompts")
        images = np.concatenate([images, np.repeat(images[-1:], B - rows, axis=0)])
    knobs = {
        "temperature": np.float32(sampling.temperature),
        "top_k": np.int32(sampling.top_k),
        "top_p": np.float32(sampling.top_p),
        "repetition_penalty": np.float32(sampling.repetition_penalty),
    }
    layers_graphdef, layers_state = None, None
    if decode_layers is not None:
        layers_graphdef, layers_state = nnx.split(tuple(decode_layers))
        per_layer_weights = True
    args = (
        state,
        layers_state,
        input_ids,
        segment_ids,
        positions,
        images,
        np.int32(max_new_tokens),
        knobs,
        jax.random.key(sampling.seed % 2**32),  # any integer, as the server takes
        np.asarray(eos_ids, np.int32),
        np.int32(pad_id),
        np.int32(rows),
    )
    if per_layer_weights is None:
        per_layer_weights = platform.per_layer_decode()
    static = dict(
        graphdef=graphdef,
        new_tokens_bucket=N,
        return_logits=return_logits,
        per_layer_weights=per_layer_weights,
        layers_graphdef=layers_graphdef,
    )
    if mesh is not None:
        with jax.set_mesh(mesh):
            tokens, logprobs, done, logits = _generate_jit(*args, **static)
    else:
        tokens, logprobs, done, logits = _generate_jit(*args, **static)
    tokens, logprobs, done = np.asarray(tokens), np.asarray(logprobs), np.asarray(done)
    out_ids, out_lps = [], []
    for b in range(rows):
        n = max_new_tokens
        ends = np.flatnonzero(np.isin(tokens[b, :n], eos_ids))
        if ends.size:
            n = int(ends[0]) + 1
        out_ids.append(tokens[b, :n].tolist())
        out_lps.append(logprobs[b, :n].tolist())
    return GenerationOutput(
        token_ids=out_ids,
        logprobs=out_lps,
        finished=[bool(d) for d in done[:rows]],
        logits=np.asarray(logits[:rows, :max_new_tokens]) if return_logits else None,
    )


def next_token_logits(model: nnx.Module, h: jax.Array) -> jax.Array:
    """h [B, 1, D] -> logits [B, V] over the tokenizer's vocabulary: the padded rows
    (ids >= `config.tokenizer_vocab_size`) masked, so they are never picked (every
    decode loop, `generate_tokens` and the server's, picks from these)."""
    vocab_in_use = getattr(model.config, "tokenizer_vocab_size", 0)
    return mask_padded_vocab(model.llm.logits(h)[:, 0], vocab_in_use)


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "new_tokens_bucket",
        "return_logits",
        "per_layer_weights",
        "layers_graphdef",
    ),
)
def _generate_jit(
    state: nnx.State,
    layers_state: nnx.State | None,
    input_ids: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    images: jax.Array | None,
    max_new_tokens: jax.Array,
    knobs: dict[str, jax.Array],
    rng: jax.Array,
    eos_ids: jax.Array,
    pad_id: jax.Array,
    num_rows: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    new_tokens_bucket: int,
    return_logits: bool,
    per_layer_weights: bool,
    layers_graphdef: nnx.GraphDef | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Prefill + while-loop decode; returns tokens, logprobs [B, N], done [B], logits."""
    model = nnx.merge(graphdef, state)
    B, T = input_ids.shape
    N = new_tokens_bucket
    max_new_tokens = jnp.minimum(max_new_tokens, N)
    # Per-layer weights: sliced out of the stack once, here, so that every step reads
    # them in place (see `generate_tokens`); else each step slices them itself.
    if layers_graphdef is not None:  # made once by the caller
        layers = nnx.merge(layers_graphdef, layers_state)
    else:
        layers = model.llm.unstack_layers() if per_layer_weights else None
    cache, h = model.prefill(
        model.llm.init_cache(B, T + N),
        input_ids,
        images,
        positions=positions,
        segment_ids=segment_ids,
        layers=layers,
    )
    logits = next_token_logits(model, h[:, -1:])  # left padding: the last slot is real
    V = logits.shape[-1]
    row = jnp.arange(B)
    prompt_counts = jnp.zeros((B, V), jnp.int32).at[row[:, None], input_ids].add(segment_ids != 0)
    seen = prompt_counts > 0  # for the repetition penalty

    def pick(step: jax.Array, carry: dict[str, Any]) -> dict[str, Any]:
        """Chooses token `step` from carry['logits'] and records it."""
        rng, key = jax.random.split(carry["rng"])
        tok = select_next(carry["logits"], carry["seen"], key, **knobs)
        lp = jnp.take_along_axis(jax.nn.log_softmax(carry["logits"]), tok[:, None], axis=-1)[:, 0]
        done = carry["done"]
        tok = jnp.where(done, pad_id, tok)
        lp = jnp.where(done, 0.0, lp)
        out = dict(carry, rng=rng)
        out["tokens"] = carry["tokens"].at[:, step].set(tok)
        out["logprobs"] = carry["logprobs"].at[:, step].set(lp)
        if return_logits:
            out["all_logits"] = carry["all_logits"].at[:, step].set(carry["logits"])
        out["done"] = done | jnp.isin(tok, eos_ids)
        out["seen"] = carry["seen"].at[row, tok].set(True)
        out["last"] = tok
        return out

    carry = {
        "rng": rng,
        "logits": logits,
        "seen": seen,
        "done": jnp.arange(B) >= num_rows,  # rows that only pad the batch are done
        "tokens": jnp.full((B, N), pad_id, jnp.int32),
        "logprobs": jnp.zeros((B, N), jnp.float32),
        "last": jnp.zeros((B,), jnp.int32),
        "cache": cache,
    }
    if return_logits:
        carry["all_logits"] = jnp.zeros((B, N, V), jnp.float32)
    carry = pick(jnp.int32(0), carry)

    def cond(state: tuple[jax.Array, dict[str, Any]]) -> jax.Array:
        step, carry = state
        return (step < max_new_tokens) & ~jnp.all(carry["done"])

    def body(state: tuple[jax.Array, dict[str, Any]]) -> tuple[jax.Array, dict[str, Any]]:
        step, carry = state
        # Feed the previous token; positions continue each row's own sequence.
        cache, h = model.llm.decode(carry["cache"], carry["last"][:, None], layers=layers)
        carry = dict(carry, cache=cache, logits=next_token_logits(model, h))
        return step + 1, pick(step, carry)

    _, carry = jax.lax.while_loop(cond, body, (jnp.int32(1), carry))
    return carry["tokens"], carry["logprobs"], carry["done"], carry.get("all_logits")


@nnx.jit
def _unstack(model: nnx.Module) -> tuple[nnx.Module, ...]:
    return model.llm.unstack_layers()


def prepare_decode_layers(model: nnx.Module) -> tuple[nnx.Module, ...]:
    """The LLM's per-layer decode weights (q/k/v and gate/up fused), made once.

    Pass them to `generate_tokens(decode_layers=)` on every call: each call then skips
    slicing the stacked weights (tens of ms for a small model). They are a second copy
    of the LLM's weights, held as long as the caller keeps them.
    """
    mesh, _ = _batch_shards(nnx.state(model))
    if mesh is None:
        return _unstack(model)
    with jax.set_mesh(mesh):
        return _unstack(model)


# ---------------------------------------------------------------------------- text in, text out


@dataclasses.dataclass(frozen=True)
class Completion:
    """One answer: the rendered prompt, the answer text, its tokens and log-probs."""

    prompt: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finished: bool  # stopped at an end-of-sequence id or a stop string


class Generator:
    """A loaded model with its tokenizer, conversation template and image preprocessing.

    Example:
      gen = Generator.load("workdir/")
      [c] = gen.generate(["What colour are the shapes?"], [PIL.Image.open("x.png")])
      print(c.text)
    """

    def __init__(
        self,
        model: nnx.Module,
        tokenizer: TextTokenizer,
        template: Template,
        *,
        image_aspect: str = "square",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        system: str | None = None,
    ):
        """Wraps a `Neva` model.

        Args:
          model: the model (its `config` is a NevaConfig).
          tokenizer: the tokenizer, `<image>` included (`data.tokenize.load_tokenizer`).
          template: the conversation template.
          image_aspect: "square" (center crop), "pad" (LLaVA-1.5) or "keep".
          image_mean, image_std: normalisation (default CLIP's).
          system: system prompt (None: the template's default).
        """
        cfg = model.config
        if tokenizer.image_token_id != cfg.image_token_id:
            raise ValueError(
                f"tokenizer {tokenizer.path}: <image> is id {tokenizer.image_token_id}, the model "
                f"expects {cfg.image_token_id}; use the tokenizer the model was trained with"
            )
        self.model, self.tokenizer, self.template, self.system = model, tokenizer, template, system
        self.image_aspect = image_aspect
        self.image_mean = tuple(image_mean or image_lib.CLIP_MEAN)
        self.image_std = tuple(image_std or image_lib.CLIP_STD)
        stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        if template.stop:
            ids = tokenizer.hf.encode(template.stop, add_special_tokens=False)
            if len(ids) == 1 and tokenizer.hf.convert_ids_to_tokens(ids[0]) == template.stop:
                stop_ids.append(int(ids[0]))
        if not stop_ids:
            raise ValueError(
                f"tokenizer {tokenizer.path} has no EOS token and {template.name!r} no stop token"
            )
        self.eos_ids = tuple(dict.fromkeys(stop_ids))
        # The per-layer decode form holds its weights across calls (see generate_tokens).
        self.decode_layers = prepare_decode_layers(model) if platform.per_layer_decode() else None

    @classmethod
    def load(
        cls,
        path: str,
        *,
        mesh: jax.sharding.Mesh | None = None,
        template: str | None = None,
        image_aspect: str | None = None,
        **runtime: Any,
    ) -> Generator:
        """Loads a model folder, training workdir/step folder or llava-hf folder.

        The template and image aspect mode default to what the checkpoint
        records (else `vicuna_v1` and `square`); `runtime` sets run-time model
        fields such as `dtype`.
        """
        model, info = load_model(path, mesh, **runtime)
        if info.tokenizer_path is None:
            raise ValueError(
                f"{path}: the checkpoint has no tokenizer folder; generation needs one"
            )
        chat = get_template(template or getattr(info, "template", None) or "vicuna_v1")
        tok = load_tokenizer(
            str(info.tokenizer_path),
            use_im_start_end=model.config.use_im_start_end,
            control_tokens=chat.control_tokens,
        )
        pre = info.preprocessor_config or {}
        return cls(
            model,
            tok,
            chat,
            image_aspect=image_aspect or getattr(info, "image_aspect_ratio", None) or "square",
            image_mean=pre.get("image_mean"),
            image_std=pre.get("image_std"),
        )

    def prompt_ids(self, question: str, has_image: bool) -> tuple[str, list[int]]:
        """The rendered prompt for one question and its ids (image slots expanded)."""
        spans = self.prompt_spans(question, has_image)
        enc = encode_spans(spans, self.tokenizer, self.model.config.num_image_tokens)
        return enc.text, enc.ids.tolist()

    def prompt_spans(self, question: str, has_image: bool) -> list[Span]:
        """The rendered prompt for one question, as the template's (untrained) spans.

        With an image and no `<image>` in the question, the placeholder goes first
        (LLaVA's evaluation scripts do the same); a placeholder without an image, or two,
        is a ValueError.
        """
        if has_image and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        if not has_image and IMAGE_PLACEHOLDER in question:
            raise ValueError(
                f"question {question[:40]!r} has {IMAGE_PLACEHOLDER} but no image was given"
            )
        if question.count(IMAGE_PLACEHOLDER) > 1:
            raise ValueError(
                f"question {question[:40]!r} has {question.count(IMAGE_PLACEHOLDER)} "
                f"{IMAGE_PLACEHOLDER} placeholders; a question takes one image"
            )
        return self.template.render([Message("user", question)], system=self.system)

    def preprocess(self, image: Any) -> np.ndarray:
        """A PIL image, a path or an array -> CLIP-normalised [H, W, 3] float32.

        A float array of the model's [size, size, 3] is taken as already preprocessed (what
        this method returns); a uint8 array is an image's raw pixels ([H, W], [H, W, 3] or
        [H, W, 4]) and is preprocessed like a PIL image; anything else is refused.
        """
        size = self.model.config.vision.image_size
        if isinstance(image, np.ndarray):
            if image.dtype == np.uint8 and image.ndim in (2, 3):
                from PIL import Image

                image = Image.fromarray(image)
            elif np.issubdtype(image.dtype, np.floating) and image.shape == (size, size, 3):
                return image.astype(np.float32)
            else:
                raise ValueError(
                    f"an image array of {image.dtype} {image.shape}: give raw uint8 pixels "
                    f"([H, W, 3]) or preprocessed float pixels ([{size}, {size}, 3])"
                )
        img = (
            image
            if hasattr(image, "convert")
            else image_lib.open_image(str(image), where=str(image))
        )
        return image_lib.preprocess(
            img, size=size, aspect=self.image_aspect, mean=self.image_mean, std=self.image_std
        )

    def generate(
        self,
        questions: Sequence[str],
        images: Sequence[Any | None],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
    ) -> list[Completion]:
        """Answers a batch of questions, each about one image (or None).

        Images are PIL images, paths, or arrays already made by `preprocess`.

        Generation ends at the tokenizer's EOS or the template's stop token; the
        text is also cut at the first of `stop` (and the template's stop string).
        """
        if isinstance(questions, str):
            raise TypeError("questions: a list of strings, got one str; pass [question]")
        if not isinstance(images, Sequence) or isinstance(images, str | np.ndarray):
            raise TypeError("images: a list (an image or None per question); pass [image]")
        if not questions:
            raise ValueError("no questions to answer")
        if isinstance(stop, str):
            stop = (stop,)  # one stop string, not its characters
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
            raise TypeError(f"max_new_tokens: an integer, got {max_new_tokens!r}")
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions but {len(images)} images")
        rendered = [
            self.prompt_ids(q, im is not None) for q, im in zip(questions, images, strict=True)
        ]
        longest = max(len(ids) for _, ids in rendered)
        limit = self.model.config.llm.encoder_seq_length
        if longest + max_new_tokens > limit:
            raise ValueError(
                f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
                f"the model's {limit} positions; ask for at most {limit - longest} new tokens"
                if longest < limit
                else f"a prompt of {longest} tokens does not fit the model's {limit} positions"
            )
        pixels = None
        if any(im is not None for im in images):
            size = self.model.config.vision.image_size
            pixels = np.zeros((len(images), 1, size, size, 3), np.float32)
            for i, im in enumerate(images):
                if im is not None:
                    pixels[i, 0] = self.preprocess(im)
        out = generate_tokens(
            self.model,
            [ids for _, ids in rendered],
            pixels,
            max_new_tokens=max_new_tokens,
            eos_ids=self.eos_ids,
            pad_id=self.tokenizer.pad_id,
            sampling=sampling,
            decode_layers=self.decode_layers,
        )
        stops = [s for s in (*stop, self.template.stop) if s]
        results = []
        for (prompt, _), ids, lps, done in zip(
            rendered, out.token_ids, out.logprobs, out.finished, strict=True
        ):
            ids, lps, text, stopped = self._cut(ids, lps, stops)
            results.append(Completion(prompt, text, ids, lps, done or stopped))
        return results

    def answer_questions(
        self,
        questions: Sequence[dict[str, Any]],
        image_folder: str | None = None,
        *,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> list[Completion]:
        """Answers LLaVA eval records (`{"question_id", "image", "text"}`) in batches.

        Image paths resolve inside `image_folder` (paths that leave it are refused);
        `kwargs` go to `generate` (max_new_tokens, sampling, stop).
        """
        if any(q.get("image") for q in questions) and not image_folder:
            raise ValueError("questions name images; give the image folder")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for i, q in enumerate(questions):
            if not isinstance(q.get("text"), str) or not q["text"].strip():
                raise ValueError(f"question {i} ({q.get('question_id')!r}) has no 'text'")
        out: list[Completion] = []
        for i in range(0, len(questions), batch_size):
            chunk = questions[i : i + batch_size]
            images = [
                image_lib.resolve_image_path(image_folder, q["image"]) if q.get("image") else None
                for q in chunk
            ]
            out += self.generate([q["text"] for q in chunk], images, **kwargs)
        return out

    def _cut(
        self, ids: list[int], lps: list[float], stops: Sequence[str]
    ) -> tuple[list[int], list[float], str, bool]:
        """Decodes ids (EOS dropped); cuts text and tokens at the first stop string."""
        hf = self.tokenizer.hf
        body = ids[:-1] if ids and ids[-1] in self.eos_ids else ids
        text = hf.decode(body, skip_special_tokens=True)
        hits = [text.find(s) for s in stops if s in text]
        if not hits:
            return ids, lps, text.strip(), False
        text = text[: min(hits)]
        # Keep the tokens up to the one that completes the first stop string.
        n = next(
            k
            for k in range(1, len(body) + 1)
            if any(s in hf.decode(body[:k], skip_special_tokens=True) for s in stops)
        )
        return ids[:n], lps[:n], text.strip(), True
