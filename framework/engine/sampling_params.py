"""Per-request sampling parameters, with the JSON coercion Triton's vLLM backend applies.

Triton clients send ``sampling_parameters`` as a JSON string whose values are often strings
(``{"temperature": "0.1", "max_tokens": "100"}``); :meth:`SamplingParams.from_json_dict` turns those
into typed values and names any key it cannot use.

Every value is range-checked here, before the request costs anything: a value the engine cannot use
(a seed torch cannot take, a negative token id...) would otherwise fail inside a step, next to other
clients' requests. Limits that depend on the engine (``n`` against ``scheduler.max_num_seqs``, the
prompt against the context) are checked when the engine builds the request.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from dataclasses import dataclass, field
from typing import Any

_BOOL_STRINGS = {"true": True, "1": True, "false": False, "0": False}
# torch.Generator.manual_seed takes any int64 or uint64 (a negative seed aliases its unsigned twin).
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_TOKEN_ID = 2**63 - 1
MAX_LOGPROBS = 20  # vLLM's default max_logprobs: each one costs a dict entry per token and step
_LOGPROBS_RULE = f"must be null or in [0, {MAX_LOGPROBS}]"
_STOP_IDS_RULE = f"must be token ids in [0, {MAX_TOKEN_ID}]"


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy."""

    n: int = 1
    best_of: int | None = None
    """Accepted for the vLLM backend's clients only when it asks for no more than ``n`` candidates."""
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
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self._check_ranges()

    def _check_ranges(self) -> None:
        low, high = SEED_RANGE
        checks = [
            ("n", self.n >= 1, "must be >= 1"),
            ("best_of", self.best_of in (None, self.n), "must be null or equal to n"),
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
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, _LOGPROBS_RULE),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids), _STOP_IDS_RULE),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise ValueError(f"sampling parameter {key} {rule}, got {_short(getattr(self, key))}")

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
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in fields:
                raise ValueError(f"unknown sampling parameter {_short(key)}; known: {sorted(fields)}")
            kwargs[key] = _coerce(key, value, _FIELD_KINDS[key])
        return cls(**kwargs)


_FIELD_KINDS = {
    "n": int,
    "best_of": "opt_int",
    "top_k": int,
    "max_tokens": int,
    "min_tokens": int,
    "seed": "opt_int",
    "logprobs": "opt_int",
    "temperature": float,
    "top_p": float,
    "min_p": float,
    "repetition_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "ignore_eos": bool,
    "skip_special_tokens": bool,
    "include_stop_str_in_output": bool,
    "stop": "str_list",
    "stop_token_ids": "int_list",
}


def _coerce(key: str, value: Any, kind: Any) -> Any:
    try:
        if kind == "opt_int":
            return None if value is None else _to_int(value)
        if kind == "str_list":
            return _to_str_list(value)
        if kind == "int_list":
            return [_to_int(v) for v in _to_list(value)]
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
