"""Golden tests: conversation templates -> token ids and trained masks.

Expected ids were derived outside this package, from the tokenizer models
directly (`sentencepiece` with/without its dummy prefix, `tokenizers` with
Metaspace prepend first/never), following LLaVA's `tokenizer_image_token`: the
rendered prompt is cut at `<image>`, each piece is tokenized whole (a piece starts
with the SentencePiece prefix space only at the start of a chunk, not after a
special token, as transformers' non-legacy LLaMA tokenizer does), BOS first.
Trained ('T') = the answer tokens plus the template's end-of-turn token, derived
as the tokens that follow the instruction prefix: what LLaVA's preprocess_v1 /
preprocess_llama_2 / preprocess_plain intend. 3 image slots per image.

Conversation: system "The assistant gives helpful answers.";
human "What colour are the shapes?\\n<image>" (the LLaVA templates move <image>
to the front, NeMo's llama_3 and nvgpt keep it in place), gpt "red"; human
"Where are the shapes?", gpt "top-left" (plain: one caption "red top-left").
NVGPT labels "quality:4"; NeMo's nvgpt uses a record's system text as is (no
blank line added). Control tokens missing from a tokenizer are added after
<image> in template order (LLaMA: <image>=32000). The prompt texts each golden
was tokenized from were written from the reference's `Conversation.get_prompt`
(LLaVA c121f04: conv_vicuna_v1, conv_llava_llama_2, conv_llava_plain,
conv_mistral_instruct; NeMo 1.x: conv_llava_llama_3, conv_nvgpt).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from neva_jax.data import conversation as C
from neva_jax.data.tokenize import TemplateMismatchError, encode_spans, load_tokenizer

SYSTEM = "The assistant gives helpful answers."
TURNS = [
    {"from": "human", "value": "What colour are the shapes?\n<image>"},
    {"from": "gpt", "value": "red", "label": "quality:4"},
    {"from": "human", "value": "Where are the shapes?"},
    {"from": "gpt", "value": "top-left", "label": "quality:4"},
]
PLAIN_TURNS = [TURNS[0], {"from": "gpt", "value": "red top-left"}]

# fmt: off
GOLDEN_LLAMA = {  # template: (ids, trained mask)
    "vicuna_v1": (
        [1, 415, 13892, 5212, 10865, 11194, 28723, 2223, 725, 28747, 28705, 32000, 32000, 32000,
         28705, 13, 3195, 11474, 460, 272, 17187, 28804, 8602, 8048, 12738, 28747, 2760, 2,
         11123, 28747, 6926, 460, 272, 17187, 28804, 8602, 8048, 12738, 28747, 1830, 28733, 1828,
         2],
        "--------------------------TT-----------TTTT",
    ),
    "llava_llama_2": (
        [1, 733, 16289, 28793, 2087, 18741, 4060, 13, 1014, 13892, 5212, 10865, 11194, 28723, 13,
         28789, 700, 18741, 4060, 13, 13, 32000, 32000, 32000, 28705, 13, 3195, 11474, 460, 272,
         17187, 28804, 733, 28748, 16289, 28793, 2760, 28705, 2, 1, 28792, 16289, 28793, 6926,
         460, 272, 17187, 28804, 733, 28748, 16289, 28793, 1830, 28733, 1828, 28705, 2],
        "------------------------------------TTT-------------TTTTT",
    ),
    "plain": (
        [1, 32000, 32000, 32000, 2760, 1830, 28733, 1828, 13],
        "----TTTTT",
    ),
    "mistral": (
        [1, 733, 16289, 28793, 2087, 18741, 4060, 13, 1014, 13892, 5212, 10865, 11194, 28723, 13,
         28789, 700, 18741, 4060, 13, 13, 32000, 32000, 32000, 28705, 13, 3195, 11474, 460, 272,
         17187, 28804, 733, 28748, 16289, 28793, 2760, 28705, 2, 28792, 16289, 28793, 6926, 460,
         272, 17187, 28804, 733, 28748, 16289, 28793, 1830, 28733, 1828, 28705, 2],
        "------------------------------------TTT------------TTTTT",
    ),
    "llama_3": (
        [1, 32001, 6574, 32002, 13, 13, 1014, 13892, 5212, 10865, 11194, 28723, 32003, 32001, 1838,
         32002, 13, 13, 3195, 11474, 460, 272, 17187, 28804, 13, 32000, 32000, 32000, 32003, 32001,
         489, 11143, 32002, 13, 13, 893, 32003, 32001, 1838, 32002, 13, 13, 9607, 460, 272, 17187,
         28804, 32003, 32001, 489, 11143, 32002, 13, 13, 3746, 28733, 1828, 32003],
        "-----------------------------------TT-----------------TTTT",
    ),
    "nvgpt": (
        [1, 32001, 3099, 13, 1014, 13892, 5212, 10865, 11194, 28723, 32002, 730, 13, 3195, 11474,
         460, 272, 17187, 28804, 13, 32000, 32000, 32000, 28705, 13, 32002, 7226, 11143, 13, 32003,
         14817, 28747, 28781, 13, 893, 13, 32002, 730, 13, 9607, 460, 272, 17187, 28804, 13, 32002,
         7226, 11143, 13, 32003, 14817, 28747, 28781, 13, 3746, 28733, 1828, 13, 32002],
        "----------------------------------TTT-----------------TTTTT",
    ),
}
GOLDEN_BPE = {  # template: (ids, trained mask)
    "vicuna_v1": (
        [1, 100, 158, 140, 100, 76, 78, 91, 106, 100, 101, 81, 85, 75, 90, 81, 102, 83, 88, 92,
         111, 88, 19, 136, 156, 31, 100, 4, 4, 4, 100, 5, 144, 147, 115, 118, 122, 135, 154, 153,
         151, 157, 100, 104, 73, 2, 58, 156, 31, 100, 159, 104, 115, 118, 122, 135, 154, 153,
         151, 157, 108, 84, 85, 148, 74, 75, 89, 2],
        "------------------------------------------TTTT--------------TTTTTTTT",
    ),
    "llava_llama_2": (
        [1, 137, 142, 138, 143, 5, 158, 140, 100, 76, 78, 91, 106, 100, 101, 81, 85, 75, 90, 81,
         102, 83, 88, 92, 111, 88, 19, 5, 123, 150, 5, 5, 4, 4, 4, 100, 5, 144, 147, 115, 118,
         122, 137, 149, 100, 104, 73, 100, 2, 1, 64, 142, 100, 159, 104, 115, 118, 122, 137, 149,
         108, 84, 85, 148, 74, 75, 89, 100, 2],
        "--------------------------------------------TTTTT-----------TTTTTTTTT",
    ),
    "plain": (
        [1, 4, 4, 4, 100, 104, 73, 108, 84, 85, 148, 74, 75, 89, 5],
        "----TTTTTTTTTTT",
    ),
    "mistral": (
        [1, 137, 142, 138, 143, 5, 158, 140, 100, 76, 78, 91, 106, 100, 101, 81, 85, 75, 90, 81,
         102, 83, 88, 92, 111, 88, 19, 5, 123, 150, 5, 5, 4, 4, 4, 100, 5, 144, 147, 115, 118, 122,
         137, 149, 100, 104, 73, 100, 2, 64, 142, 100, 159, 104, 115, 118, 122, 137, 149, 108, 84,
         85, 148, 74, 75, 89, 100, 2],
        "--------------------------------------------TTTTT----------TTTTTTTTT",
    ),
    "llama_3": (
        [1, 160, 88, 146, 161, 5, 5, 158, 140, 100, 76, 78, 91, 106, 100, 101, 81, 85, 75, 90, 81,
         102, 83, 88, 92, 111, 88, 19, 162, 160, 90, 132, 161, 5, 5, 144, 147, 115, 118, 122, 5, 4,
         4, 4, 162, 160, 70, 121, 161, 5, 5, 104, 73, 162, 160, 90, 132, 161, 5, 5, 159, 104, 115,
         118, 122, 162, 160, 70, 121, 161, 5, 5, 89, 84, 85, 148, 74, 75, 89, 162],
        "---------------------------------------------------TTT------------------TTTTTTTT",
    ),
    "nvgpt": (
        [1, 160, 155, 5, 158, 140, 100, 76, 78, 91, 106, 100, 101, 81, 85, 75, 90, 81, 102, 83, 88,
         92, 111, 88, 19, 161, 58, 132, 5, 144, 147, 115, 118, 122, 5, 4, 4, 4, 100, 5, 161, 38,
         121, 5, 162, 86, 90, 70, 81, 78, 89, 94, 31, 25, 5, 104, 73, 5, 161, 58, 132, 5, 159, 104,
         115, 118, 122, 5, 161, 38, 121, 5, 162, 86, 90, 70, 81, 78, 89, 94, 31, 25, 5, 89, 84, 85,
         148, 74, 75, 89, 5, 161],
        "-------------------------------------------------------TTTT------------------------TTT"
        "TTTTTT",
    ),
}
# fmt: on


@functools.cache
def _tokenizer(tok_dir: str, control: tuple[str, ...], use_im_start_end: bool = False):
    return load_tokenizer(tok_dir, control_tokens=control, use_im_start_end=use_im_start_end)


def _encode(name: str, tok_dir: str, slots: int = 3, **kw):
    template = C.get_template(name)
    tok = _tokenizer(tok_dir, template.control_tokens, **kw)
    msgs = C.messages_from_llava(PLAIN_TURNS if name == "plain" else TURNS)
    return encode_spans(template.render(msgs, SYSTEM), tok, slots), tok


def _mask(trained: np.ndarray) -> str:
    return "".join("T" if t else "-" for t in trained)


@pytest.mark.parametrize("name", sorted(C.TEMPLATES))
def test_golden_llama_sentencepiece(name: str, llama_tok_dir: str) -> None:
    enc, _ = _encode(name, llama_tok_dir)
    ids, mask = GOLDEN_LLAMA[name]
    assert enc.ids.tolist() == ids
    assert _mask(enc.trained) == mask


@pytest.mark.parametrize("name", sorted(C.TEMPLATES))
def test_golden_tiny_bpe(name: str, bpe_tok_dir: str) -> None:
    enc, _ = _encode(name, bpe_tok_dir)
    ids, mask = GOLDEN_BPE[name]
    assert enc.ids.tolist() == ids
    assert _mask(enc.trained) == mask


@pytest.mark.parametrize("name", sorted(C.TEMPLATES))
def test_ids_equal_llava_whole_prompt_tokenization(
    name: str, llama_tok_dir: str, llava_tokenizer_image_token
) -> None:
    enc, tok = _encode(name, llama_tok_dir, slots=5)
    ids = llava_tokenizer_image_token(enc.text, tok.hf, [tok.image_token_id] * 5)
    assert enc.ids.tolist() == ids
    assert enc.image.sum() == 5 and not (enc.trained & enc.image).any()


def test_tokenizing_span_by_span_would_differ(llama_tok_dir: str) -> None:
    """Why spans are never tokenized one by one: SentencePiece adds a prefix space."""
    template = C.get_template("vicuna_v1")
    spans = template.render(C.messages_from_llava(TURNS), SYSTEM)
    enc, tok = _encode("vicuna_v1", llama_tok_dir)
    naive = [tok.bos_id]
    for s in spans:
        for k, piece in enumerate(s.text.split("<image>")):
            naive += [tok.image_token_id] * 3 if k else []
            naive += tok.hf(piece, add_special_tokens=False).input_ids
    assert naive != enc.ids.tolist()


def test_default_system_prompts_render_as_the_references() -> None:
    turns = [("human", "<image>\nQ1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2")]
    msgs = C.messages_from_llava([{"from": f, "value": v} for f, v in turns])
    text = {n: "".join(s.text for s in t.render(msgs)) for n, t in C.TEMPLATES.items()}
    s = C.LLAVA_SYSTEM
    assert text["vicuna_v1"] == s + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
    sys2 = C.LLAVA_LLAMA_2_SYSTEM
    assert text["llava_llama_2"] == (
        f"[INST] <<SYS>>\n{sys2}\n<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST] A2 </s>"
    )
    assert text["nvgpt"] == (
        f"<extra_id_0>System\n{s}\n\n<extra_id_1>User\n<image>\nQ1\n<extra_id_1>Assistant\n"
        f"<extra_id_2>{C.NVGPT_LABELS}\nA1\n<extra_id_1>User\nQ2\n<extra_id_1>Assistant\n"
        f"<extra_id_2>{C.NVGPT_LABELS}\nA2\n<extra_id_1>"
    )
    plain = C.TEMPLATES["plain"].render(msgs[:2])
    assert [(p.text, p.trained) for p in plain] == [("<image>", False), ("A1\n", True)]
    # no <<SYS>> block without a system prompt
    assert "".join(x.text for x in C.TEMPLATES["llava_llama_2"].render(msgs[:2], "")) == (
        "[INST] <image>\nQ1 [/INST] A1 </s>"
    )


def test_generation_prompt_is_the_untrained_prefix(llama_tok_dir: str) -> None:
    template = C.get_template("vicuna_v1")
    full, tok = _encode("vicuna_v1", llama_tok_dir)
    prompt = encode_spans(template.render(C.messages_from_llava(TURNS[:1]), SYSTEM), tok, 3)
    assert prompt.text.endswith(" ASSISTANT:")
    first_trained = int(np.argmax(full.trained))
    assert full.ids[:first_trained].tolist() == prompt.ids.tolist()


def test_im_start_end_surround_the_slots(llama_tok_dir: str) -> None:
    enc, tok = _encode("vicuna_v1", llama_tok_dir, use_im_start_end=True)
    assert tok.added_tokens == ("<image>", "<im_start>", "<im_end>")
    at = int(np.argmax(enc.image))
    assert enc.ids[at - 1] == tok.im_start_id and enc.ids[at + 3] == tok.im_end_id
    assert enc.image.sum() == 3 and not enc.image[[at - 1, at + 3]].any()


def test_straddling_token_is_a_template_mismatch(llama_tok_dir: str) -> None:
    tok = _tokenizer(llama_tok_dir, ())
    spans = [C.Span("hel", False, 0), C.Span("lo", True, 0)]  # '▁hello' is one token
    with pytest.raises(TemplateMismatchError, match="spans trained and untrained"):
        encode_spans(spans, tok, 3)


def test_roles_must_alternate() -> None:
    msgs = C.messages_from_llava([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])
    with pytest.raises(C.ConversationError, match="expected 'assistant'"):
        C.get_template("vicuna_v1").render(msgs)
    with pytest.raises(ValueError, match="unknown template"):
        C.get_template("vicuna")


def test_every_template_names_the_reference_it_follows() -> None:
    refs = {name: t.reference.split()[0] for name, t in C.TEMPLATES.items()}
    assert refs == {
        "vicuna_v1": "LLaVA",
        "llava_llama_2": "LLaVA",
        "plain": "LLaVA",
        "mistral": "LLaVA",
        "llama_3": "NeMo",
        "nvgpt": "NeMo",
    }


def test_vicuna_empty_system_is_llavas_space_then_user(llama_tok_dir: str) -> None:
    """LLaVA's SeparatorStyle.TWO writes `system + " "`, so an empty system prompt
    starts the prompt with " USER:"; its slow SentencePiece tokenizer then keeps
    the dummy prefix as its own `▁` (28705) after BOS."""
    template = C.get_template("vicuna_v1")
    tok = _tokenizer(llama_tok_dir, template.control_tokens)
    enc = encode_spans(template.render(C.messages_from_llava(TURNS), ""), tok, 3)
    assert enc.text == (
        " USER: <image>\nWhat colour are the shapes? ASSISTANT: red</s>"
        "USER: Where are the shapes? ASSISTANT: top-left</s>"
    )
    # fmt: off
    assert enc.ids.tolist() == [
        1, 28705, 2223, 725, 28747, 28705, 32000, 32000, 32000, 28705, 13, 3195, 11474, 460, 272,
        17187, 28804, 8602, 8048, 12738, 28747, 2760, 2, 11123, 28747, 6926, 460, 272, 17187,
        28804, 8602, 8048, 12738, 28747, 1830, 28733, 1828, 2,
    ]
    # fmt: on
    assert _mask(enc.trained) == "---------------------TT-----------TTTT"


def _text(name: str, turns: list[tuple[str, str]], system: str | None = "") -> str:
    msgs = C.messages_from_llava([{"from": f, "value": v} for f, v in turns])
    return "".join(s.text for s in C.get_template(name).render(msgs, system))


def test_image_placement_follows_the_reference() -> None:
    """LLaVA (preprocess_multimodal): remove, strip, "<image>\\n" in front, strip
    again; NeMo (sep_image_conv_front=False): the placeholder stays where it is."""
    turns = [("human", " Q1 <image> "), ("gpt", "A1")]
    assert _text("vicuna_v1", turns) == " USER: <image>\nQ1 ASSISTANT: A1</s>"
    assert _text("mistral", turns) == "[INST] <image>\nQ1 [/INST] A1 </s>"
    assert _text("llava_llama_2", turns) == "[INST] <image>\nQ1 [/INST] A1 </s>"
    alone = [("human", "<image>"), ("gpt", "A1")]  # stripped: no newline after the image
    assert _text("vicuna_v1", alone) == " USER: <image> ASSISTANT: A1</s>"
    assert _text("llama_3", turns) == (
        "<|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n Q1 <image> <|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
    )
    assert _text("nvgpt", turns).startswith("<extra_id_0>System\n<extra_id_1>User\n Q1 <image> \n")


def test_mistral_and_nvgpt_system_prompts_render_as_the_references() -> None:
    turns = [("human", "Q1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2")]
    # LLaVA conv_mistral_instruct: SeparatorStyle.LLAMA_2 with sep "" (no <s> between rounds)
    assert _text("mistral", turns, None) == "[INST] Q1 [/INST] A1 </s>[INST] Q2 [/INST] A2 </s>"
    assert _text("mistral", turns[:2], "S") == "[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST] A1 </s>"
    # NeMo preprocess_nvgpt: a record's `system` replaces conv.system verbatim
    assert _text("nvgpt", turns[:2], "S") == (
        f"<extra_id_0>System\nS<extra_id_1>User\nQ1\n<extra_id_1>Assistant\n"
        f"<extra_id_2>{C.NVGPT_LABELS}\nA1\n<extra_id_1>"
    )
