"""Text ⇄ token ids through a ``tokenizer.json`` (the ``tokenizers`` library; no transformers).

End-of-sequence ids are gathered from ``generation_config.json``, ``config.json`` and the
``eos_token`` of ``tokenizer_config.json``, the same places Hugging Face looks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pagedserve.chat_template import find_chat_template, special_tokens
from pagedserve.models.hf_config import as_id_list, read_json
from tokenizers import Tokenizer as HFTokenizer

_GIL_FREE_CHARS = 16 * 1024


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        eos_token_ids: frozenset[int],
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer | None:
        """The model's tokenizer, or ``None`` when the directory has no ``tokenizer.json``."""
        path = model_dir / "tokenizer.json"
        if not path.exists():
            return None
        tokenizer = HFTokenizer.from_file(str(path))
        settings = _read_optional(model_dir / "tokenizer_config.json")
        eos = set(read_eos_token_ids(model_dir))
        eos_token = _token_text(settings.get("eos_token"))
        if eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
            eos.add(tokenizer.token_to_id(eos_token))
        return cls(
            tokenizer, frozenset(eos), find_chat_template(model_dir, settings), special_tokens(settings)
        )

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > _GIL_FREE_CHARS:
            # encode() holds the GIL throughout, encode_batch() releases it: a long prompt (a second
            # or more) must not stall every other thread of the server while it is tokenized.
            return self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)


def read_eos_token_ids(model_dir: Path) -> list[int]:
    """EOS ids named by ``generation_config.json`` and ``config.json`` (either may be absent)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        for token_id in as_id_list(_read_optional(model_dir / name).get("eos_token_id")):
            if token_id not in ids:
                ids.append(token_id)
    return ids


def _read_optional(path: Path) -> dict[str, Any]:
    return read_json(path) if path.exists() else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
