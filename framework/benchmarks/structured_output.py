"""Structured outputs on CPU: grammar libraries side by side, and engine throughput with a schema.

``python -m pagedserve.benchmarks.structured_output libraries [tokenizer.json ...]`` compiles the
same constraints with xgrammar and llguidance against each tokenizer and walks a random valid output
through each, timing the compile and every per-step token mask. ``... throughput`` runs the tiny
model with and without a JSON schema (``--device cuda`` for the GPU number). The numbers are in
docs/sampling.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "email", "role", "address"],
}
CONSTRAINTS = {
    "json_schema": ("json", json.dumps(SCHEMA)),
    "regex": ("regex", r"[A-Z][a-z]{2,9} [0-9]{3}-[0-9]{4}"),
    "choice": ("choice", ["positive", "negative", "neutral"]),
}
MAX_STEPS = 256


def _vocab_and_eos(path: Path) -> tuple[int, int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    eos = next((vocab[t] for t in ("<|end_of_text|>", "</s>", "<|endoftext|>") if t in vocab), 1)
    return max(vocab.values()) + 1, eos


class _XGrammar:
    name = "xgrammar"

    def __init__(self, path: Path, vocab_size: int, eos: int) -> None:
        import xgrammar as xgr
        from pagedserve.engine.structured_output import _tokenizer_info

        self.xgr = xgr
        self.compiler = xgr.GrammarCompiler(
            _tokenizer_info(path, vocab_size, [eos]), max_threads=1, cache_enabled=False
        )

    def compile(self, kind: str, source: Any) -> Any:
        if kind == "json":
            return self.compiler.compile_json_schema(source, any_whitespace=False)
        if kind == "regex":
            return self.compiler.compile_regex(source)
        return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in source))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)

    def accept(self, matcher: Any, token: int) -> None:
        matcher.accept_token(token)

    def done(self, matcher: Any) -> bool:
        return matcher.is_terminated()


class _LLGuidance:
    name = "llguidance"

    def __init__(self, path: Path, vocab_size: int, eos: int) -> None:
        import llguidance
        import llguidance.torch

        self.ll = llguidance
        self.tokenizer = llguidance.LLTokenizer(path.read_text(), n_vocab=vocab_size, eos_token=eos)

    def compile(self, kind: str, source: Any) -> Any:
        matcher_cls = self.ll.LLMatcher
        if kind == "json":
            grammar = matcher_cls.grammar_from_json_schema(source, defaults={"whitespace_flexible": False})
        elif kind == "regex":
            grammar = matcher_cls.grammar_from_regex(source)
        else:
            grammar = matcher_cls.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in source))
        return self.matcher(grammar)  # llguidance compiles lazily: the first matcher pays

    def matcher(self, compiled: Any) -> Any:
        if isinstance(compiled, str):
            return self.ll.LLMatcher(self.tokenizer, compiled)
        return compiled

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)

    def accept(self, matcher: Any, token: int) -> None:
        matcher.consume_token(token)

    def done(self, matcher: Any) -> bool:
        return matcher.is_stopped()


def _allowed(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:vocab_size].nonzero()[:, 0]


def measure_library(library: Any, vocab_size: int, kind: str, source: Any, seed: int = 0) -> dict[str, float]:
    start = time.perf_counter()
    compiled = library.compile(kind, source)
    compile_ms = (time.perf_counter() - start) * 1e3
    matcher = library.matcher(compiled)
    bitmask = torch.zeros((1, -(-vocab_size // 32)), dtype=torch.int32)
    generator = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(MAX_STEPS):
        if library.done(matcher):
            break
        start = time.perf_counter()
        library.fill(matcher, bitmask)
        times.append((time.perf_counter() - start) * 1e3)
        allowed = _allowed(bitmask, vocab_size)
        library.accept(matcher, int(allowed[torch.randint(len(allowed), (1,), generator=generator)]))
    return {
        "compile_ms": compile_ms,
        "mask_ms_median": statistics.median(times),
        "mask_ms_p99": sorted(times)[int(0.99 * (len(times) - 1))],
        "steps": len(times),
    }


def libraries(paths: list[Path]) -> None:
    print(
        "| tokenizer | vocab | constraint | library | compile ms | mask ms (median) | mask ms (p99) | steps |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        vocab_size, eos = _vocab_and_eos(path)
        for cls in (_XGrammar, _LLGuidance):
            start = time.perf_counter()
            library = cls(path, vocab_size, eos)
            setup_ms = (time.perf_counter() - start) * 1e3
            print(
                f"| {path.parent.name} | {vocab_size} | (tokenizer set-up) | {cls.name} "
                f"| {setup_ms:.0f} | | | |"
            )
            for name, (kind, source) in CONSTRAINTS.items():
                row = measure_library(library, vocab_size, kind, source)
                print(
                    f"| {path.parent.name} | {vocab_size} | {name} | {cls.name} | {row['compile_ms']:.1f} | "
                    f"{row['mask_ms_median']:.3f} | {row['mask_ms_p99']:.3f} | {row['steps']} |"
                )


def throughput(device: str, num_requests: int, max_tokens: int) -> None:
    from pagedserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.sampling_params import SamplingParams
    from pagedserve.models.tiny import ensure_tiny_llama

    config = EngineConfig(
        model=str(ensure_tiny_llama()),
        device=device,
        cache=CacheConfig(block_size=16, num_blocks=2048),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096),
    )
    llm = LLM(config)
    prompts = [f"Request {i}: describe the user as JSON." for i in range(num_requests)]
    schema = {"json": SCHEMA, "disable_any_whitespace": True}
    for label, structured in (("free text", None), ("JSON schema", schema)):
        params = SamplingParams(
            temperature=1.0,
            seed=0,
            max_tokens=max_tokens,
            ignore_eos=structured is None,
            structured_outputs=structured,
        )
        llm.generate(prompts[:2], params)  # warm-up: compiles the grammar once
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(f"| {device} | {label} | {num_requests} | {tokens} | {seconds:.2f} | {tokens / seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lib = sub.add_parser("libraries")
    lib.add_argument("tokenizers", nargs="*", type=Path)
    tput = sub.add_parser("throughput")
    tput.add_argument("--device", default="cpu")
    tput.add_argument("--num-requests", type=int, default=32)
    tput.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.command == "libraries":
        from pagedserve.models.tiny import ensure_tiny_llama

        libraries([ensure_tiny_llama() / "tokenizer.json", *args.tokenizers])
    else:
        print("| device | constraint | requests | output tokens | seconds | output tok/s |")
        print("|---|---|---|---|---|---|")
        throughput(args.device, args.num_requests, args.max_tokens)


if __name__ == "__main__":
    main()
