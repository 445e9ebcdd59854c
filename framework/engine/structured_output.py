"""Structured outputs: vLLM's ``StructuredOutputsParams`` and the grammar that constrains a sequence.

A request's constraint (a JSON schema, a regex, a list of choices, an EBNF grammar, or any JSON
object) is checked and converted to a grammar when its parameters are parsed, so a bad one is the
client's INVALID_ARGUMENT before it reaches the engine. The engine compiles it against the model's
vocabulary (:class:`GrammarBackend`, compiled grammars kept in a bounded cache) on the threads of
:mod:`pagedserve.engine.grammar_compiles`, never its step loop, and gives each sequence a
:class:`SequenceGrammar`. Each step the sampler has every constrained sequence fill its row
of a token bitmask (``[B, ceil(V / 32)]`` int32, a set bit = allowed), copies it to the logits'
device and applies it there in one call; the grammar then accepts the sampled token. A sequence ends
("stop") once its grammar has terminated.

The library is xgrammar (docs/sampling.md has the measurements that chose it over llguidance). This
module does not know about scheduling, sequences or text.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

MAX_GRAMMAR_CHARS = 64 * 1024  # a schema, regex or grammar; choices all together
MAX_SCHEMA_DEPTH = 32  # nesting of a JSON schema (objects and lists)
MAX_CHOICES = 1024
MAX_REPEAT = 10_000  # a counted repetition (regex {n,m}, minItems/maxLength...) beyond this is refused
GRAMMAR_CACHE_BYTES = 256 * 2**20
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")
_UNSUPPORTED = ("structural_tag", "whitespace_pattern")
_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "disable_fallback")
_SCHEMA_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint, with vLLM's field names and shapes (``json``: a schema as an object or
    its JSON text; ``choice``: the output is exactly one of these strings)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    disable_fallback: bool = False  # accepted for vLLM's clients: there is one backend, no fallback

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs must set exactly one of {list(_CONSTRAINTS)}, got {given or 'none'}"
            )
        self.kind = given[0]
        self.source = self._source()
        to_grammar(self)  # a bad constraint is refused here, with the grammar library's reason

    @classmethod
    def from_json_value(cls, value: Any) -> StructuredOutputsParams:
        """From what a client sent: an object, or its JSON text (Triton's vLLM backend sends text)."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured_outputs is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError("structured_outputs must be a JSON object")
        known = (*_CONSTRAINTS, *_OPTIONS)
        for key in value:
            if key in _UNSUPPORTED:
                raise ValueError(
                    f"structured_outputs.{key} is not supported; use one of {list(_CONSTRAINTS)}"
                )
            if key not in known:
                raise ValueError(f"unknown structured_outputs field {str(key)[:80]!r}; known: {list(known)}")
        return cls(**value)

    def _source(self) -> str:
        """The constraint as bounded text: what is compiled, and the compiled grammar's cache key."""
        if self.kind == "json":
            schema = self.json if isinstance(self.json, dict) else _parse_schema(self.json)
            _check_schema(schema)
            if self.disable_additional_properties:
                schema = _closed_objects(schema)
            text = json.dumps(schema, sort_keys=True)
        elif self.kind == "choice":
            choices = self.choice
            if not isinstance(choices, list) or not choices or len(choices) > MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice must be a list of 1 to {MAX_CHOICES} strings")
            if not all(isinstance(c, str) for c in choices):
                raise ValueError("structured_outputs.choice must be a list of strings")
            # An EBNF alternation of string literals: JSON's escapes are the grammar's escapes.
            text = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        elif self.kind == "json_object":
            if self.json_object is not True:
                raise ValueError("structured_outputs.json_object must be true")
            text = ""
        else:
            text = getattr(self, self.kind)
            if not isinstance(text, str) or not text:
                raise ValueError(f"structured_outputs.{self.kind} must be a non-empty string")
        if len(text) > MAX_GRAMMAR_CHARS:
            raise ValueError(
                f"structured_outputs.{self.kind} has {len(text)} characters; at most {MAX_GRAMMAR_CHARS}"
            )
        _check_repeats(self.kind, text)
        return text

    @property
    def cache_key(self) -> tuple[str, str, bool]:
        return (self.kind, self.source, self.disable_any_whitespace)


def _parse_schema(text: Any) -> dict[str, Any]:
    if not isinstance(text, str):
        raise ValueError("structured_outputs.json must be a JSON schema object or its JSON text")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise ValueError(f"structured_outputs.json has {len(text)} characters; at most {MAX_GRAMMAR_CHARS}")
    try:
        schema = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"structured_outputs.json is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(schema, dict):
        raise ValueError("structured_outputs.json must be a JSON schema object")
    return schema


def _check_schema(schema: Any) -> None:
    """Bound the nesting and the counted repetitions of a schema (iteratively: it may be hostile)."""
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"structured_outputs.json nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, dict):
            for key in _SCHEMA_COUNTS:
                count = node.get(key)
                if isinstance(count, int | float) and count > MAX_REPEAT:
                    raise ValueError(f"structured_outputs.json has {key}={count}; at most {MAX_REPEAT}")
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)


def _check_repeats(kind: str, text: str) -> None:
    """A counted repetition such as ``a{1000000}`` compiles to a state per count: refuse huge ones."""
    if kind not in ("regex", "grammar"):
        return
    import re

    for match in re.finditer(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}", text):
        counts = [int(c) for c in match.groups() if c]
        if any(c > MAX_REPEAT for c in counts):
            raise ValueError(f"structured_outputs.{kind} repeats {max(counts)} times; at most {MAX_REPEAT}")


def _closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` wherever an object lists its properties."""
    if isinstance(schema, list):
        return [_closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed_objects(value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def to_grammar(params: StructuredOutputsParams) -> Any:
    """The constraint as a vocabulary-independent ``xgrammar.Grammar`` (cheap: microseconds)."""
    import xgrammar as xgr

    try:
        if params.kind == "json":
            return xgr.Grammar.from_json_schema(
                params.source, any_whitespace=not params.disable_any_whitespace
            )
        if params.kind == "json_object":
            return xgr.Grammar.builtin_json_grammar()
        if params.kind == "regex":
            return xgr.Grammar.from_regex(params.source)
        return xgr.Grammar.from_ebnf(params.source)  # choice and grammar
    except (RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"structured_outputs.{params.kind} is invalid: {_strip_location(reason)}") from None


def _strip_location(reason: str) -> str:
    # xgrammar prefixes "[time] /path/file.cc:123: "; the client needs only what follows.
    head, sep, tail = reason.partition(".cc:")
    if sep and ": " in tail:
        return tail.split(": ", 1)[1]
    return reason


# ---- per-sequence grammar state ------------------------------------------------------------------


class SequenceGrammar(Protocol):
    """One sequence's position in its grammar."""

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]``."""

    def is_terminated(self) -> bool: ...

    def fresh(self) -> SequenceGrammar:
        """The same grammar from its start (for a sibling forked before its first token)."""


class GrammarBackend(Protocol):
    """Compiles constraints against one vocabulary and starts sequences in them."""

    def grammar_for(self, params: StructuredOutputsParams) -> SequenceGrammar:
        """Raises ``ValueError`` for a constraint that does not compile."""


class XGrammarSequence:
    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self._compiled = compiled
        self._matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def fresh(self) -> XGrammarSequence:
        return XGrammarSequence(self._compiled)


class XGrammarBackend:
    """xgrammar's compiler over the model's ``tokenizer.json``; its cache keeps compiled grammars up
    to :data:`GRAMMAR_CACHE_BYTES` (least recently used go first). :meth:`grammar_for` is called from
    several threads at once, which xgrammar's compiler and its cache allow (vLLM does the same)."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, stop_token_ids: frozenset[int]) -> None:
        self.tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def grammar_for(self, params: StructuredOutputsParams) -> XGrammarSequence:
        compiler = self._get_compiler()
        try:
            compiled = compiler.compile_grammar(to_grammar(params))
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"structured_outputs.{params.kind} does not compile: {str(exc)[:300]}") from None
        return XGrammarSequence(compiled)

    def _get_compiler(self) -> Any:
        # Built on the first constrained request: reading a large vocabulary takes a while.
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = _tokenizer_info(self.tokenizer_json, self.vocab_size, self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=1, cache_enabled=True, cache_limit_bytes=GRAMMAR_CACHE_BYTES
                )
            return self._compiler


def _tokenizer_info(path: Path, vocab_size: int, stop_token_ids: list[int]) -> Any:
    """xgrammar's view of a ``tokenizer.json``: every token's text by id, and how texts are encoded
    (byte-level, byte-fallback or raw), which xgrammar reads from the same JSON."""
    import xgrammar as xgr
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    encoded = [""] * max(vocab_size, max(vocab.values()) + 1)
    for token, token_id in vocab.items():
        encoded[token_id] = token
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_str())
    return xgr.TokenizerInfo(
        encoded,
        metadata["vocab_type"],
        vocab_size=len(encoded),
        stop_token_ids=stop_token_ids or None,
        add_prefix_space=metadata["add_prefix_space"],
    )


# ---- the bitmask -------------------------------------------------------------------------------------


def grammar_bitmask(
    grammars: list[SequenceGrammar | None], vocab_size: int
) -> tuple[torch.Tensor, list[int]]:
    """``[B, ceil(V / 32)]`` int32 on the host with the rows of constrained sequences filled (the
    others allow everything), and the indices of those rows."""
    bitmask = torch.full((len(grammars), -(-vocab_size // 32)), -1, dtype=torch.int32)
    rows = [i for i, grammar in enumerate(grammars) if grammar is not None]
    for i in rows:
        grammars[i].fill_bitmask(bitmask, i)  # type: ignore[union-attr]
    return bitmask, rows


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set disallowed logits of ``rows`` to -inf, in place, on the logits' device (one kernel)."""
    import xgrammar as xgr

    if logits.device.type != "cpu":
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
