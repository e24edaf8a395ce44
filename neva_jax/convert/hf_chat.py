"""Hugging Face chat templates (Jinja) of our conversation templates, and back.

`chat_template(template)` is what `export-hf` writes (`chat_template.jinja`): it renders
a `transformers` message list exactly as `Template.render` does.
`template_of_chat_template(text)` names the template whose chat template is exactly
`text` (what `import-hf` records of an `export-hf` folder); `saved_chat_template(path)`
reads a folder's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from neva_jax.data.conversation import IMAGE_PLACEHOLDER, TEMPLATES, Template


def _jinja_expr(fmt: str, fields: Mapping[str, str]) -> str:
    """A Template format string (`{system}`, `{content}`, ...) as a Jinja string expression."""
    parts, rest = [], fmt
    while rest:
        starts = [
            (rest.find("{" + name + "}"), name) for name in fields if "{" + name + "}" in rest
        ]
        if not starts:
            parts.append(json.dumps(rest))
            break
        at, name = min(starts)
        if at:
            parts.append(json.dumps(rest[:at]))
        parts.append(fields[name])
        rest = rest[at + len(name) + 2 :]
    return "(" + " ~ ".join(parts or ['""']) + ")"


def chat_template(template: Template) -> str:
    """A Hugging Face chat template (Jinja) that renders like `template.render`.

    Messages use the `transformers` form: `content` is a string or a list of
    `{"type": "image"}` / `{"type": "text", "text": ...}` items; a `system`
    message replaces the default system prompt. As in LLaVA, a user turn's images
    go first, one `<image>\\n` each (`<image>` alone for `plain`).
    """
    image = IMAGE_PLACEHOLDER if template.images_only_user else IMAGE_PLACEHOLDER + "\n"
    fields = {
        "system": "ns.block",
        "content": "ns.content",
        "label": json.dumps(template.default_label),
    }
    user_content = (
        f"{json.dumps(image)} * images"
        if template.images_only_user
        else f"({json.dumps(image)} * images ~ (text | trim)) if images else text"
    )
    return "".join(
        [
            "{%- set ns = namespace(system="
            + json.dumps(template.system)
            + ", content='', block='', first=true) -%}",
            "{%- for m in messages if m.role == 'system' -%}",
            "{%- set ns.system = m.content if m.content is string else "
            "(m.content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}",
            "{%- endfor -%}",
            "{%- for m in messages if m.role != 'system' -%}",
            "{%- if m.content is string -%}",
            "{%- set images = m.content.count('<image>') -%}{%- set text = m.content.replace('<image>', '') -%}",
            "{%- else -%}",
            "{%- set images = m.content | selectattr('type', 'equalto', 'image') | list | length -%}",
            "{%- set text = m.content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}",
            "{%- endif -%}",
            "{%- if m.role == 'user' -%}",
            "{%- set ns.content = " + user_content + " -%}",
            "{%- if ns.first -%}",
            "{%- set ns.block = "
            + _jinja_expr(template.system_format, {"system": "ns.system"})
            + " if ns.system else "
            + json.dumps(template.empty_system)
            + " -%}",
            "{{ " + _jinja_expr(template.first_user, fields) + " }}",
            "{%- else -%}",
            "{{ " + _jinja_expr(template.user, fields) + " }}",
            "{%- endif -%}",
            "{%- set ns.first = false -%}",
            "{%- else -%}",
            "{%- set ns.content = text -%}",
            "{{ " + _jinja_expr(template.assistant, fields) + " }}",
            "{%- endif -%}",
            "{%- endfor -%}",
        ]
    )


def saved_chat_template(path: Path) -> str | None:
    """The Jinja chat template a Hugging Face folder holds (`chat_template.jinja`, the
    processor's `chat_template.json`, or `tokenizer_config.json`), or None."""
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.exists():
            found = json.loads(file.read_text()).get("chat_template")
            if isinstance(found, str):
                return found
    return None


def template_of_chat_template(text: str | None) -> str | None:
    """Our conversation template whose generated Hugging Face chat template
    (`chat_template`) is exactly `text`: what `export-hf` wrote. Any other
    chat template (llava-hf's own, say) names none: it is not ours to interpret."""
    if text is None:
        return None
    return next((n for n, t in TEMPLATES.items() if chat_template(t) == text), None)
