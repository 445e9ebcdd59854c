"""Chat templates render as transformers' ``apply_chat_template`` renders them, token for token.

The templates below are written in the styles of four families' published templates (Llama 3 headers,
Qwen2.5's ChatML with a default system prompt and tools, Mistral's [INST] with role checks, Gemma's
turns with the assistant renamed ``model``), each saved into a small trained tokenizer the way a
checkpoint ships it, then loaded both by transformers and by pagedserve.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pagedserve.chat_template import ChatTemplate, ChatTemplateError, find_chat_template
from pagedserve.models.tokenizer import Tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

LLAMA3 = (
    "{{- bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN25 = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{{- messages[0]['content'] if messages[0]['role'] == 'system' else 'You are a helpful assistant.' }}
{{- '\\n\\n# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and tools %}{%- continue %}{%- endif %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
STYLES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "qwen25": (QWEN25, None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
    "mistral": (MISTRAL, "<s>", "</s>", ["[INST]", "[/INST]"]),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
}
CORPUS = [
    "You are a helpful assistant. What is the capital of France? Paris is the capital.",
    "user assistant system model tools Tools function get_weather location unit celsius",
    'Hello there! How are you today? I am fine, thank you. 東京 café ½ {"type": "object"}',
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there, who are you?  "},
    {"role": "assistant", "content": "An assistant."},
    {"role": "user", "content": "What is ½ of 東京?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather at a place <b>now</b> & later",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        },
    }
]


def _write_tokenizer(directory: Path, style: str, in_config: bool = True) -> None:
    template, bos, eos, extra = STYLES[style]
    specials = [t for t in (bos, eos) if t] + extra
    tokenizer = HFTokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}
    if bos:
        config["bos_token"] = bos
    if in_config:
        config["chat_template"] = template
    else:
        (directory / "chat_template.jinja").write_text(template)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def transformers_auto():  # noqa: ANN201
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer


def _ours(directory: Path) -> tuple[Tokenizer, ChatTemplate]:
    tokenizer = Tokenizer.from_dir(directory)
    assert tokenizer is not None and tokenizer.chat_template
    return tokenizer, ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens)


@pytest.mark.parametrize("in_config", [True, False], ids=["tokenizer_config", "chat_template.jinja"])
@pytest.mark.parametrize("style", ["llama3", "qwen25", "gemma"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(tmp_path, transformers_auto, style, in_config, add_generation_prompt) -> None:
    _write_tokenizer(tmp_path, style, in_config)
    hf = transformers_auto.from_pretrained(tmp_path)
    tokenizer, template = _ours(tmp_path)
    messages = CONVERSATION if style != "gemma" else CONVERSATION[1:]
    expected_text = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    assert text == expected_text
    expected_ids = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    if isinstance(expected_ids, dict) or hasattr(expected_ids, "input_ids"):
        expected_ids = expected_ids["input_ids"]
    assert tokenizer.encode(text, add_special_tokens=False) == list(expected_ids)


def test_tools_render_as_transformers(tmp_path, transformers_auto) -> None:
    _write_tokenizer(tmp_path, "qwen25")
    hf = transformers_auto.from_pretrained(tmp_path)
    _, template = _ours(tmp_path)
    expected = hf.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    text = template.render(CONVERSATION, tools=TOOLS)
    assert text == expected
    assert "<b>now</b> & later" in text  # tojson does not escape HTML, as transformers'


def test_continue_final_message_as_transformers(tmp_path, transformers_auto) -> None:
    _write_tokenizer(tmp_path, "llama3")
    hf = transformers_auto.from_pretrained(tmp_path)
    _, template = _ours(tmp_path)
    messages = [*CONVERSATION, {"role": "assistant", "content": "Half of it is "}]
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    assert template.render(messages, add_generation_prompt=False, continue_final_message=True) == expected


def test_raise_exception_is_a_clear_error(tmp_path) -> None:
    _write_tokenizer(tmp_path, "mistral")
    _, template = _ours(tmp_path)
    ok = template.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert ok.startswith("<s>[INST] a [/INST]b</s>")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        template.render([{"role": "assistant", "content": "first"}])


def test_sandbox_refuses_python_internals() -> None:
    hostile = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(hostile, {}).render([{"role": "user", "content": "x"}])
    mutating = "{% set _ = messages.append({'role': 'x'}) %}{{ messages | length }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(mutating, {}).render([{"role": "user", "content": "x"}])


def test_bad_templates_fail_cleanly() -> None:
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for m in messages %}", {}).render([])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages[5]['content'] + 1 }}", {}).render([{"role": "user", "content": "x"}])


def test_rendered_prompt_is_bounded(monkeypatch) -> None:
    import pagedserve.chat_template as chat_template

    monkeypatch.setattr(chat_template, "MAX_RENDERED_CHARS", 1000)
    looping = "{% for i in range(100) %}{% for m in messages %}{{ m['content'] }}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="exceeds"):
        ChatTemplate(looping, {}).render([{"role": "user", "content": "x" * 100}])


def test_named_templates_pick_default(tmp_path) -> None:
    settings = {
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    }
    assert find_chat_template(tmp_path, settings) == "D"
    assert find_chat_template(tmp_path, {}) is None
