"""The embedded default model ``tiny-llama``: a two-layer Llama small enough for two CPU cores.

It is built on first use from fixed seeds (random weights and a byte-level BPE tokenizer trained on
the short corpus below) into a cache directory, as an ordinary Hugging Face directory that the real
loader reads. Its text is gibberish; it exists so the server starts anywhere without a download.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TINY_LLAMA_NAME = "tiny-llama"
_VERSION = 3
_MARKER = "pagedserve-tiny.json"
_BOS, _EOS = "<|begin_of_text|>", "<|end_of_text|>"
_SEED = 1234

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "dtype": "float32",
}

CORPUS = """\
A paged key-value cache splits the memory of every sequence into blocks of equal size.
The scheduler hands out tokens each step, and the model runner turns block tables into slots.
When memory runs out, the newest request is preempted and later computed again from its tokens.
Prefix caching lets many requests that share a system prompt reuse the same blocks.
The quick brown fox jumps over the lazy dog while the server streams tokens to its clients.
Numbers such as 0 1 2 3 4 5 6 7 8 9 10 100 1000 and symbols like ( ) [ ] { } < > = + - * / % appear.
Questions? Answers! Lists: one, two, three; pairs: "left" and 'right'; paths/like/this.txt
Unicode works too: café, naïve, über, 東京, 👋, ½ — every byte has a token.
def step(self): return self.scheduler.schedule()  # code is text as well
"""


# A ChatML-style template in plain text (the tiny vocabulary has no <|im_start|> tokens): the embedded
# default answers /v1/chat/completions out of the box.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def default_path() -> Path:
    return Path.home() / ".cache" / "pagedserve" / TINY_LLAMA_NAME


def ensure_tiny_llama(path: Path | str | None = None) -> Path:
    """The tiny-llama directory at ``path`` (default ``~/.cache/pagedserve/tiny-llama``), built if
    missing. Building takes about a second and always produces the same files."""
    target = Path(path) if path is not None else default_path()
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=target.parent))
    try:
        _write_model(staging)
        if target.exists():  # an old version, or a half-written directory from a crash
            shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except OSError:
        if not _is_complete(target):  # unless a concurrent builder won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_complete(path: Path) -> bool:
    marker = path / _MARKER
    return marker.exists() and json.loads(marker.read_text()).get("version") == _VERSION


def _write_model(directory: Path) -> None:
    _train_tokenizer().save(str(directory / "tokenizer.json"))
    _write_json(directory / "config.json", CONFIG)
    _write_json(directory / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 1})
    _write_json(
        directory / "tokenizer_config.json",
        {
            "bos_token": _BOS,
            "eos_token": _EOS,
            "add_bos_token": True,
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": CONFIG["max_position_embeddings"],
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    save_file(_random_weights(), str(directory / "model.safetensors"), metadata={"format": "pt"})
    _write_json(directory / _MARKER, {"version": _VERSION})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG["vocab_size"],
        special_tokens=[_BOS, _EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A {_BOS} $B", special_tokens=[(_BOS, 0)]
    )
    return tokenizer


def _random_weights() -> dict[str, torch.Tensor]:
    c = CONFIG
    hidden, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_size, kv_size = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    generator = torch.Generator().manual_seed(_SEED)

    def normal(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    weights = {
        "model.embed_tokens.weight": normal(c["vocab_size"], hidden, std=1.0),
        "lm_head.weight": normal(c["vocab_size"], hidden, std=0.25),
        "model.norm.weight": torch.ones(hidden),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": normal(q_size, hidden),
            p + "self_attn.k_proj.weight": normal(kv_size, hidden),
            p + "self_attn.v_proj.weight": normal(kv_size, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, q_size),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
        }
    return weights
