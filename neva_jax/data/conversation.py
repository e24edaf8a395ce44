"""Conversation templates as data: each renders turns into `(text, trained)` spans.

A template is a handful of format strings (no per-template code path). `render`
turns a list of messages into `Span`s whose concatenated text is exactly the
prompt the template's reference builds (`Template.reference`: LLaVA's
`Conversation.get_prompt` + `preprocess_*` at haotian-liu/LLaVA c121f04, or
NeMo 1.x NeVA's); `trained` marks the assistant answers plus their end-of-turn
token. `neva_jax.data.tokenize.encode_spans` turns the spans into ids and masks.

Rendered forms (S = system prompt, Q/A = question/answer, `<image>` a placeholder
that the tokenizer step expands into the image slots):

    vicuna_v1      S USER: <image>\\nQ1 ASSISTANT:[ A1</s>]USER: Q2 ASSISTANT:[ A2</s>]
                   (empty S: " USER: ...", LLaVA's `system + " "`)
    llava_llama_2  [INST] <<SYS>>\\nS\\n<</SYS>>\\n\\n<image>\\nQ1 [/INST][ A1 </s>]<s>[INST] Q2 [/INST][ A2 </s>]
    plain          <image>[caption\\n]
    mistral        [INST] <image>\\nQ1 [/INST][ A1 </s>][INST] Q2 [/INST][ A2 </s>]
                   (LLaVA's `mistral_instruct`; a non-empty S is wrapped in <<SYS>> like llama_2)
    llama_3        <|start_header_id|>system<|end_header_id|>\\n\\nS<|eot_id|><|start_header_id|>user
                   <|end_header_id|>\\n\\n<image>\\nQ1<|eot_id|><|start_header_id|>assistant
                   <|end_header_id|>\\n\\n[A1<|eot_id|>]...
    nvgpt          <extra_id_0>System\\nS\\n\\n<extra_id_1>User\\n<image>\\nQ1\\n<extra_id_1>Assistant
                   \\n<extra_id_2>LABELS\\n[A1\\n<extra_id_1>]User\\n...

`[...]` is trained. The tokenizer's BOS (if it adds one) precedes all of these.
A conversation that ends with a user turn renders the generation prompt (it ends
with the assistant header, e.g. `" ASSISTANT:"`); generation stops at
`Template.stop`.

Image placement follows the reference. LLaVA's `preprocess_multimodal` (vicuna_v1,
llava_llama_2, mistral): in a turn holding k `<image>` placeholders they are
removed, the rest is stripped, `"<image>\\n" * k` is put in front and the result
stripped again (LLaVA itself supports k = 1); `plain` keeps only the placeholders
of the human turn. NeMo (llama_3, nvgpt) leaves each placeholder where the record
has it (`images_in_place`); the forms above show a turn written `<image>\\nQ1`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

IMAGE_PLACEHOLDER = "<image>"
USER = "user"
ASSISTANT = "assistant"
_ROLE_ALIASES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}

LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the "
    "visual content that the user provides, and assist the user with a variety of tasks "
    "using natural language."
)
NVGPT_LABELS = (
    "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,"
    "complexity:4,verbosity:4"
)


class ConversationError(ValueError):
    """A conversation the template cannot render (roles out of order, ...)."""


@dataclasses.dataclass(frozen=True)
class Message:
    """One turn: `role` is "user" or "assistant"; `label` is NVGPT's attribute line."""

    role: str
    text: str
    label: str | None = None


@dataclasses.dataclass(frozen=True)
class Span:
    """A piece of rendered text; `trained` spans are learnt; `round` = user/answer pair."""

    text: str
    trained: bool
    round: int


@dataclasses.dataclass(frozen=True)
class Template:
    """A chat format as data.

    Attributes:
      name: registry key.
      system: default system prompt.
      system_format: wraps a non-empty system prompt (`{system}`).
      empty_system: text used where the system block goes when the prompt is empty.
      first_user: format of the first user turn: `{system}` (the system block),
        `{content}`, `{label}` (the NVGPT label of the answer that follows).
      user: format of later user turns (`{content}`, `{label}`).
      assistant: format of an answer (`{content}`); rendered as a trained span.
      stop: end-of-turn text; generation stops when it is produced.
      control_tokens: strings that must be single tokens in the tokenizer.
      images_only_user: `plain`: a user turn renders as its image placeholders only.
      images_in_place: NeMo: `<image>` stays where the turn has it (else LLaVA's
        move to the front).
      default_label: NVGPT label line used when an answer carries none.
      reference: the implementation whose prompt this reproduces (docs, `inspect`).
    """

    name: str
    system: str
    system_format: str
    empty_system: str
    first_user: str
    user: str
    assistant: str
    stop: str
    control_tokens: tuple[str, ...] = ()
    images_only_user: bool = False
    images_in_place: bool = False
    default_label: str = ""
    reference: str = ""

    def system_block(self, system: str | None) -> str:
        text = self.system if system is None else system
        return self.system_format.format(system=text) if text else self.empty_system

    def render(self, messages: Sequence[Message], system: str | None = None) -> list[Span]:
        """Renders alternating user/assistant messages into spans.

        `system=None` uses the template's default prompt, `""` none. A trailing
        user message renders as a generation prompt (untrained).
        """
        if not messages:
            raise ConversationError("conversation has no turns")
        spans: list[Span] = []
        for i, msg in enumerate(messages):
            expected = USER if i % 2 == 0 else ASSISTANT
            if msg.role != expected:
                raise ConversationError(
                    f"turn {i} is from {msg.role!r}, expected {expected!r} "
                    "(turns must alternate, starting with the user)"
                )
            rnd = i // 2
            if msg.role == USER:
                label = ""
                if i + 1 < len(messages):
                    label = messages[i + 1].label or self.default_label
                elif self.default_label:
                    label = self.default_label
                content = (
                    msg.text
                    if self.images_in_place
                    else place_images(msg.text, images_only=self.images_only_user)
                )
                fmt = self.first_user if i == 0 else self.user
                text = fmt.format(
                    system=self.system_block(system) if i == 0 else "",
                    content=content,
                    label=label,
                )
                spans.append(Span(text, False, rnd))
            else:
                if IMAGE_PLACEHOLDER in msg.text:
                    raise ConversationError(f"answer in turn {i} contains {IMAGE_PLACEHOLDER}")
                spans.append(Span(self.assistant.format(content=msg.text), True, rnd))
        return spans


def place_images(text: str, *, images_only: bool = False) -> str:
    """LLaVA's `preprocess_multimodal`: k placeholders move to the front as
    `"<image>\\n" * k` before the stripped rest, and the result is stripped."""
    k = text.count(IMAGE_PLACEHOLDER)
    if images_only:
        return IMAGE_PLACEHOLDER * k
    if k == 0:
        return text
    rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return ((IMAGE_PLACEHOLDER + "\n") * k + rest).strip()


def messages_from_llava(turns: Sequence[dict]) -> list[Message]:
    """LLaVA `conversations` (`{"from", "value"[, "label"]}`) -> messages.

    Like LLaVA, a leading assistant turn is dropped. Raises `ConversationError` on
    an unknown role or a non-string value.
    """
    out: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ConversationError(f"conversations[{i}] is not an object")
        role = _ROLE_ALIASES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ConversationError(
                f"conversations[{i}].from={turn.get('from')!r}: expected human/gpt (or user/assistant)"
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise ConversationError(f"conversations[{i}].value is not a string")
        label = turn.get("label")
        out.append(Message(role, value, label if isinstance(label, str) else None))
    if out and out[0].role == ASSISTANT:
        out = out[1:]
    return out


# NeMo's `mm_cfg.llm.model_type` -> the conversation template NeMo selects with it
# (its NeVA configs: `conv_template: ${model.mm_cfg.llm.model_type}`): the
# `data.template` of a run config that leaves it unset, and the model type a NeMo 1
# export of a run names for its template.
MODEL_TYPE_TEMPLATES = {
    "llama_2": "llava_llama_2",
    "v1": "vicuna_v1",
    "nvgpt": "nvgpt",
    "llama_3": "llama_3",
    "mistral": "mistral",
}

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            name="vicuna_v1",
            system=LLAVA_SYSTEM,
            system_format="{system} ",
            empty_system=" ",  # LLaVA: system + sep, so "" gives " USER: ..."
            first_user="{system}USER: {content} ASSISTANT:",
            user="USER: {content} ASSISTANT:",
            assistant=" {content}</s>",
            stop="</s>",
            control_tokens=("</s>",),
            reference="LLaVA conv_vicuna_v1 + preprocess_v1",
        ),
        Template(
            name="llava_llama_2",
            system=LLAVA_LLAMA_2_SYSTEM,
            system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
            empty_system="",
            first_user="[INST] {system}{content} [/INST]",
            user="<s>[INST] {content} [/INST]",
            assistant=" {content} </s>",
            stop="</s>",
            control_tokens=("<s>", "</s>"),
            reference="LLaVA conv_llava_llama_2 + preprocess_llama_2",
        ),
        Template(
            name="plain",
            system="",
            system_format="",
            empty_system="",
            first_user="{content}",
            user="{content}",
            assistant="{content}\n",
            stop="\n",
            images_only_user=True,
            reference="LLaVA conv_llava_plain + preprocess_plain",
        ),
        Template(
            name="mistral",
            system="",
            system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
            empty_system="",
            first_user="[INST] {system}{content} [/INST]",
            user="[INST] {content} [/INST]",
            assistant=" {content} </s>",
            stop="</s>",
            control_tokens=("</s>",),
            reference="LLaVA conv_mistral_instruct + preprocess_llama_2",
        ),
        Template(
            name="llama_3",
            system=LLAVA_LLAMA_2_SYSTEM,
            system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            empty_system="<|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>",
            first_user=(
                "{system}<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            user=(
                "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            assistant="{content}<|eot_id|>",
            stop="<|eot_id|>",
            control_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            images_in_place=True,
            reference="NeMo conv_llava_llama_3 + preprocess_llama_3",
        ),
        Template(
            name="nvgpt",
            system=LLAVA_SYSTEM + "\n\n",  # NeMo: a record's own system text is used as is
            system_format="<extra_id_0>System\n{system}",
            empty_system="<extra_id_0>System\n",
            first_user=(
                "{system}<extra_id_1>User\n{content}\n<extra_id_1>Assistant\n<extra_id_2>{label}\n"
            ),
            user="User\n{content}\n<extra_id_1>Assistant\n<extra_id_2>{label}\n",
            assistant="{content}\n<extra_id_1>",
            stop="<extra_id_1>",
            control_tokens=("<extra_id_0>", "<extra_id_1>", "<extra_id_2>"),
            default_label=NVGPT_LABELS,
            images_in_place=True,
            reference="NeMo conv_nvgpt + preprocess_nvgpt",
        ),
    )
}


def get_template(name: str) -> Template:
    """Looks a template up by name; raises ValueError listing the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"config.data.template={name!r}: unknown template; use one of {', '.join(TEMPLATES)}"
        ) from None
