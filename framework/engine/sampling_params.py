"""Per-request sampling parameters, with the JSON coercion Triton's vLLM backend applies.

Triton clients send ``sampling_parameters`` as a JSON string whose values are often strings
(``{"temperature": "0.1", "max_tokens": "100"}``); :meth:`SamplingParams.from_json_dict` turns those
into typed values and names any key it cannot use.

Every value is range-checked here, before the request costs anything: a value the engine cannot use
(a seed torch cannot take, a negative token id...) would otherwise fail inside a step, next to other
clients' requests. Limits that depend on the engine (``n`` and ``best_of`` against
``scheduler.max_num_seqs``, token ids against the vocabulary, the prompt against the context) are
checked when the engine builds the request (:meth:`SamplingParams.check_token_ids`).

Field names and meanings are vLLM's ``SamplingParams``; docs/sampling.md lists them and the order in
which the sampler applies them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from dataclasses import dataclass, field
from typing import Any

from pagedserve.engine.structured_output import StructuredOutputsParams

_BOOL_STRINGS = {"true": True, "1": True, "false": False, "0": False}
# torch.Generator.manual_seed takes any int64 or uint64 (a negative seed aliases its unsigned twin).
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_TOKEN_ID = 2**63 - 1
MAX_LOGPROBS = 20  # vLLM's default max_logprobs: each one costs a dict entry per token and step
MAX_TOKEN_LIST = 2**18  # entries of logit_bias / allowed_token_ids: more than any vocabulary has
MAX_BAD_WORDS = 1024
MAX_LOGIT_BIAS = 100.0  # OpenAI's range; a bias beyond it is as good as a ban or a force
_LOGPROBS_RULE = f"must be null or in [0, {MAX_LOGPROBS}]"
_WHOLE_VOCAB_RULE = f"must be null or in [0, {MAX_LOGPROBS}] (-1, the whole vocabulary, is not served)"
_STOP_IDS_RULE = f"must be token ids in [0, {MAX_TOKEN_ID}]"


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy."""

    n: int = 1
    best_of: int | None = None
    """Generate this many sequences and return the ``n`` with the highest cumulative log-probability
    (vLLM V0's meaning); the ``n`` come back only when all have finished."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int = 16
    min_tokens: int = 0
    bad_words: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    """Keep only the last this many prompt tokens; -1 keeps as many as the context leaves room for."""
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    """Accepted for vLLM's clients; like vLLM with a fast (``tokenizer.json``) tokenizer, it changes
    nothing: the tokenizer's own decoder places the spaces."""
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)
    """Filled from ``bad_words`` when the request is tokenized (:meth:`with_tokenizer`)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_json_value(self.structured_outputs)
        self._check_ranges()

    def _check_ranges(self) -> None:
        low, high = SEED_RANGE
        checks = [
            ("n", self.n >= 1, "must be >= 1"),
            ("best_of", self.best_of is None or self.best_of >= self.n, "must be null or >= n"),
            ("temperature", 0.0 <= self.temperature < math.inf, "must be finite and >= 0"),
            ("top_k", self.top_k >= 0 or self.top_k == -1, "must be 0 or -1 (off) or positive"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty < math.inf, "must be finite and > 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("seed", self.seed is None or low <= self.seed <= high, f"must be null or in [{low}, {high}]"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
            ("logprobs", _is_logprobs(self.logprobs), _WHOLE_VOCAB_RULE),
            ("prompt_logprobs", _is_logprobs(self.prompt_logprobs), _WHOLE_VOCAB_RULE),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids), _STOP_IDS_RULE),
            (
                "bad_words",
                len(self.bad_words) <= MAX_BAD_WORDS
                and all(isinstance(w, str) and w for w in self.bad_words),
                f"must be at most {MAX_BAD_WORDS} non-empty strings",
            ),
            ("logit_bias", _is_logit_bias(self.logit_bias), _LOGIT_BIAS_RULE),
            ("allowed_token_ids", _is_allowed_ids(self.allowed_token_ids), _ALLOWED_RULE),
            (
                "truncate_prompt_tokens",
                self.truncate_prompt_tokens is None
                or self.truncate_prompt_tokens >= 1
                or self.truncate_prompt_tokens == -1,
                "must be null, -1 (as many as the context allows) or >= 1",
            ),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise ValueError(f"sampling parameter {key} {rule}, got {_short(getattr(self, key))}")

    @property
    def num_seqs(self) -> int:
        """Sequences the request runs: ``best_of`` of them when set, else ``n``."""
        return self.best_of or self.n

    @property
    def needs_full_history(self) -> bool:
        """Whether sampling reads earlier tokens on the host (so a step must land before the next)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or any(len(ids) > 1 for ids in self.bad_words_token_ids)
            or self.structured_outputs is not None
        )

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise ``ValueError`` naming the parameter whose token id the model's vocabulary lacks."""
        # A stop token id outside the vocabulary is harmless (it is never sampled), as in vLLM.
        for key, ids in (
            ("logit_bias", list(self.logit_bias or ())),
            ("allowed_token_ids", self.allowed_token_ids or []),
        ):
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise ValueError(
                    f"sampling parameter {key} has token id {bad}, outside the vocabulary [0, {vocab_size})"
                )

    def with_tokenizer(self, tokenizer: Any) -> SamplingParams:
        """A copy with ``bad_words`` tokenized as vLLM does: each word alone and after a space, every
        one of its token sequences banned as a whole (its last token, once the others came out)."""
        if not self.bad_words:
            return self
        sequences: list[list[int]] = []
        for word in self.bad_words:
            for text in (word, " " + word.lstrip()):
                ids = tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in sequences:
                    sequences.append(ids)
        return dataclasses.replace(self, bad_words_token_ids=sequences)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_json(cls, text: str) -> SamplingParams:
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"sampling parameters are not valid JSON: {exc}") from exc
        except RecursionError:
            # The parser gives up on deep nesting; no parameter takes more than a list of values.
            raise ValueError("sampling parameters nest too deeply: values are scalars or lists") from None
        if not isinstance(data, dict):
            raise ValueError("sampling parameters must be a JSON object")
        return cls.from_json_dict(data)

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from a decoded JSON object, coercing string values to each field's type."""
        kwargs = {}
        for key, value in data.items():
            name = _ALIASES.get(key, key)
            if name not in _FIELD_KINDS:
                raise ValueError(f"unknown sampling parameter {_short(key)}; known: {sorted(_FIELD_KINDS)}")
            if name in kwargs:
                raise ValueError(f"sampling parameters {sorted(_ALIASES)} name the same thing: give one")
            kwargs[name] = _coerce(key, value, _FIELD_KINDS[name])
        return cls(**kwargs)


_FIELD_KINDS = {
    "n": int,
    "best_of": "opt_int",
    "top_k": int,
    "max_tokens": int,
    "min_tokens": int,
    "seed": "opt_int",
    "logprobs": "opt_int",
    "prompt_logprobs": "opt_int",
    "truncate_prompt_tokens": "opt_int",
    "temperature": float,
    "top_p": float,
    "min_p": float,
    "repetition_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "ignore_eos": bool,
    "skip_special_tokens": bool,
    "spaces_between_special_tokens": bool,
    "include_stop_str_in_output": bool,
    "stop": "str_list",
    "bad_words": "str_list",
    "stop_token_ids": "int_list",
    "allowed_token_ids": "opt_int_list",
    "logit_bias": "logit_bias",
    "structured_outputs": "structured",
}
# vLLM's SamplingParams called it guided_decoding until v0.12; its clients still send that name.
_ALIASES = {"guided_decoding": "structured_outputs"}
_LOGIT_BIAS_RULE = (
    f"must be null or an object of at most {MAX_TOKEN_LIST} token ids to biases "
    f"in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
)
_ALLOWED_RULE = f"must be null or a non-empty list of at most {MAX_TOKEN_LIST} token ids"


def _is_logprobs(value: int | None) -> bool:
    return value is None or 0 <= value <= MAX_LOGPROBS


def _is_logit_bias(bias: dict[int, float] | None) -> bool:
    if bias is None:
        return True
    return len(bias) <= MAX_TOKEN_LIST and all(
        isinstance(t, int) and 0 <= t <= MAX_TOKEN_ID and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS
        for t, b in bias.items()
    )


def _is_allowed_ids(ids: list[int] | None) -> bool:
    return ids is None or (0 < len(ids) <= MAX_TOKEN_LIST and all(0 <= t <= MAX_TOKEN_ID for t in ids))


def _coerce(key: str, value: Any, kind: Any) -> Any:
    try:
        if kind == "opt_int":
            return None if value is None else _to_int(value)
        if kind == "str_list":
            return _to_str_list(value)
        if kind == "int_list":
            return [_to_int(v) for v in _to_list(value)]
        if kind == "opt_int_list":
            return None if value is None else [_to_int(v) for v in _to_list(value)]
        if kind == "logit_bias":
            return None if value is None else _to_logit_bias(value)
        if kind == "structured":
            return None if value is None else StructuredOutputsParams.from_json_value(value)
        if kind is bool:
            return _to_bool(value)
        if kind is int:
            return _to_int(value)
        return float(value)
    except (TypeError, ValueError, RecursionError) as exc:
        reason = str(exc)[:200]  # int("...") repeats the whole text
        raise ValueError(f"sampling parameter {key} has a bad value {_short(value)}: {reason}") from exc


# Error messages quote what a client sent: bounded in length and depth, however large or nested.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 80, 80


def _short(value: Any) -> str:
    return _REPR.repr(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("expected an integer, got a boolean")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("expected an integer")
        return int(value)
    return int(value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in _BOOL_STRINGS:
        raise ValueError("expected true or false")
    return _BOOL_STRINGS[text]


def _to_list(value: Any) -> list:
    # Triton clients sometimes send a list as its JSON text, e.g. "[1, 2]".
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [value]
    if isinstance(value, int | float):
        value = [value]
    if not isinstance(value, list):
        raise TypeError("expected a list")
    return value


def _to_logit_bias(value: Any) -> dict[int, float]:
    if isinstance(value, str):  # sent as its JSON text, as Triton clients do with lists
        value = json.loads(value)
    if not isinstance(value, dict):
        raise TypeError("expected an object of token ids to biases")
    bias = {_to_int(k): float(v) for k, v in value.items()}
    if not all(math.isfinite(b) for b in bias.values()):
        raise ValueError("biases must be finite")
    return bias


def _to_str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return _parse_str_list(value)
    items = _to_list(value)
    if not all(isinstance(v, str) for v in items):
        raise TypeError("expected strings")
    return items


def _parse_str_list(text: str) -> list[str]:
    # A stop string may itself start with "[" (e.g. "[END]"); only a JSON list of strings is a list.
    if text.strip().startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return [text]
        if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
            return parsed
    return [text]
