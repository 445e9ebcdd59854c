"""A model's chat template, rendered as Hugging Face ``apply_chat_template`` renders it.

Templates are Jinja programs shipped with the model (``chat_template.jinja``, or ``chat_template`` in
``tokenizer_config.json``, a string or a list of named templates) or given in the model's YAML. They
run in jinja2's immutable sandbox with the same settings, filters and globals as transformers
(``trim_blocks``, ``lstrip_blocks``, loop controls, a ``tojson`` that does not escape HTML,
``raise_exception``, ``strftime_now``), so a rendered prompt is the text transformers would produce.

A template comes from the operator, never from a request; still, the rendered text is bounded so a
template that loops over a client's messages cannot build an unbounded prompt.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

MAX_RENDERED_CHARS = 16 * 2**20


class ChatTemplateError(ValueError):
    """The template could not render these messages (its ``raise_exception``, or a template bug)."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    special_tokens: Mapping[str, str]
    """``bos_token``, ``eos_token``, ... as the template sees them (tokenizer_config.json's strings)."""

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        variables: dict[str, Any] = dict(extra or {})
        variables.update(self.special_tokens)
        variables.update(
            messages=list(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
        )
        try:
            text = _compile(self.source).render(**variables)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat template: {error}") from error
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
            raise ChatTemplateError(f"chat template failed on these messages: {error}") from error
        if len(text) > MAX_RENDERED_CHARS:
            raise ChatTemplateError(f"the rendered chat prompt exceeds {MAX_RENDERED_CHARS} characters")
        if continue_final_message:
            text = _cut_after_final_message(text, messages)
        return text


def _cut_after_final_message(text: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """As transformers: keep the text up to the end of the last message's content, so the model
    continues that message instead of starting a new turn."""
    if not messages or not isinstance(messages[-1].get("content"), str):
        raise ChatTemplateError("continue_final_message needs a final message with text content")
    content = messages[-1]["content"]
    start = text.rfind(content.strip())
    if start < 0:
        raise ChatTemplateError(
            "continue_final_message: the final message does not appear in the rendered text"
        )
    if text[start : start + len(content.lstrip())] == content:
        return text[: start + len(content.lstrip())]
    return text[: start + len(content.strip())]  # the template trimmed the message's trailing space


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"chat template does not parse: {error}") from error


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def find_chat_template(model_dir: Path, settings: Mapping[str, Any]) -> str | None:
    """The model's own template: ``chat_template.jinja`` first (transformers 5 writes it there), then
    ``tokenizer_config.json``'s ``chat_template`` (a string, or named templates: ``default`` wins)."""
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    value = settings.get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


def special_tokens(settings: Mapping[str, Any]) -> dict[str, str]:
    """The special-token strings a template may use, from tokenizer_config.json (a token there is a
    string or an ``AddedToken`` dict with ``content``)."""
    tokens: dict[str, str] = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        value = settings.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens
