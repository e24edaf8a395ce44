"""lmms-eval's in-process model class for neva-jax checkpoints (`--model neva_jax`).

    python -m lmms_eval --model neva_jax --model_args checkpoint=runs/stage2 \
        --tasks gqa,pope --batch_size 8 --output_path results/

`checkpoint` is anything `generate` takes (training workdir, step folder, model folder,
llava-hf folder); `template=` and `image_aspect=` override what it records;
`batch_size` (lmms-eval's flag, or `batch_size=` in the model args) answers that many
questions per `generate` call. Registered through the `lmms_eval.models` entry-point
group (pyproject.toml), so an installed neva-jax is found by name.

`generate_until` answers with `Generator.generate` (greedy at temperature 0,
`until` strings as stop strings, `max_new_tokens`); `loglikelihood` returns the
summed log-probability of the continuation after the assistant's opening and whether
greedy decoding gives it (`neva_jax.eval.score`). One image per question, as the
model was trained; a document with several visuals is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from neva_jax.eval.generate import Generator
from neva_jax.eval.sampling import SamplingParams
from neva_jax.eval.score import continuation_scores

DEFAULT_MAX_NEW_TOKENS = 128


class NevaJax(lmms):
    """A neva-jax checkpoint as an lmms-eval model (`is_simple`: plain-text contexts)."""

    is_simple = True

    def __init__(
        self,
        checkpoint: str,
        template: str | None = None,
        image_aspect: str | None = None,
        batch_size: int | str = 1,
        **unused: Any,
    ) -> None:
        super().__init__()
        self.generator = Generator.load(checkpoint, template=template, image_aspect=image_aspect)
        self.batch_size_per_gpu = max(1, int(batch_size))

    def _image(self, request: Any) -> Any | None:
        """The request's one visual (a PIL image), or None for a text-only document."""
        doc_to_visual, doc_id, task, split = request.args[2:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise ValueError(
                f"{task} document {doc_id}: {len(visuals)} images; a neva-jax model takes one "
                "per question"
            )
        return visuals[0] if visuals else None

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Answers each (context, gen_kwargs, doc_to_visual, doc_id, task, split) request."""
        answers: list[str] = [""] * len(requests)
        i = 0
        while i < len(requests):
            kwargs = dict(requests[i].args[1] or {})
            batch = [i]  # consecutive requests with the same settings share a call
            while (
                len(batch) < self.batch_size_per_gpu
                and i + len(batch) < len(requests)
                and requests[i + len(batch)].args[1] == requests[i].args[1]
            ):
                batch.append(i + len(batch))
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature") or 0.0)
            sampling = SamplingParams(
                temperature=temperature,
                top_p=float(kwargs.get("top_p") or 1.0) if temperature > 0 else 1.0,
                seed=int(kwargs.get("seed") or 0),
            )
            out = self.generator.generate(
                [requests[j].args[0] for j in batch],
                [self._image(requests[j]) for j in batch],
                max_new_tokens=int(kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                sampling=sampling,
                stop=until,
            )
            for j, completion in zip(batch, out, strict=True):
                answers[j] = completion.text
            i += len(batch)
        return answers

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log P(continuation), is_greedy) for each (context, doc_to_target, doc_to_visual,
        doc_id, task, split) request."""
        items = []
        for request in requests:
            context, target, _, doc_id, task, split = request.args[:6]
            if not isinstance(target, str):
                target = target(self.task_dict[task][split][doc_id])
            items.append((context, target, self._image(request)))
        return [_as_response(score) for score in continuation_scores(self.generator, items)]

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("neva_jax answers single-round requests (generate_until)")


def _as_response(score: tuple[float, bool]) -> Any:
    """A (logprob, is_greedy) pair as this lmms-eval's evaluator keeps it intact.

    lmms-eval 0.7.3 passes every response through `unwrap_generation_output`, which turns
    anything but a string, a (string, dict) pair or a `GenerationResult` into its str():
    a plain pair would reach the multiple-choice scorer as the text "(-8.6, False)". A
    `GenerationResult` holding the pair comes out as the pair. Versions that keep pairs
    as they are get the pair itself.
    """
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:
        return score
    if unwrap_generation_output(score)[0] == score:
        return score
    return GenerationResult(text=score)  # type: ignore[arg-type]


# What the `lmms_eval.models` entry point names (pyproject.toml).
MANIFEST = ModelManifest(model_id="neva_jax", simple_class_path="neva_jax.eval.lmms.NevaJax")
