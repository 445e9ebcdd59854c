"""Smoke test of the serving benchmark (pagedserve.benchmarks.serving): a few streamed requests
through a real ``serve`` on tiny-llama, then the offline engine on the same prompts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc.aio")

from pagedserve.benchmarks import serving  # noqa: E402
from pagedserve.benchmarks.workload import standard_workload  # noqa: E402


def test_arrivals_are_poisson_shaped_and_rescaled() -> None:
    offsets = serving.arrival_offsets(50, 10.0, seed=0)
    assert offsets == sorted(offsets) and offsets[0] > 0
    assert offsets[-1] == pytest.approx(5.0)  # N / rate
    assert offsets == serving.arrival_offsets(50, 10.0, seed=0)  # seeded
    assert serving.arrival_offsets(4, math.inf, seed=0) == [0.0] * 4


def test_prompts_tokenize_to_the_drawn_lengths() -> None:
    target = serving.resolve_target("tiny-llama", [])
    drawn = standard_workload(32, target.tokenizer.vocab_size)
    for variant in (0, 1):
        prompts = serving.build_prompts(target.tokenizer, 32, (64, 1024), (16, 512), 0, variant)
        assert [len(p.token_ids) for p in prompts] == [len(r.prompt_token_ids) for r in drawn]
        assert [p.output_len for p in prompts] == [r.output_len for r in drawn]
        assert all(target.tokenizer.encode(p.text) == p.token_ids for p in prompts)
    a = serving.build_prompts(target.tokenizer, 4, (64, 128), (4, 8), 0, 1)
    b = serving.build_prompts(target.tokenizer, 4, (64, 128), (4, 8), 0, 2)
    assert all(
        x.token_ids[:16] != y.token_ids[:16] for x, y in zip(a, b, strict=True)
    )  # no shared first block


def test_chat_prompts_are_shorter_by_the_templates_tokens() -> None:
    """frontend_streams' chat passes: once the chat template wraps them, the model reads the drawn
    prompt lengths, as the other front-ends' passes do."""
    from pagedserve.benchmarks.frontend_streams import chat_overhead
    from pagedserve.chat_template import ChatTemplate

    tokenizer = serving.resolve_target("tiny-llama", []).tokenizer
    overhead = chat_overhead(tokenizer)
    assert overhead > 0
    template = ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens)
    plain = serving.build_prompts(tokenizer, 16, (40, 200), (4, 8), 0, 2)
    chat = serving.build_prompts(tokenizer, 16, (40, 200), (4, 8), 0, 2, overhead)
    rendered = [template.render([{"role": "user", "content": p.text}]) for p in chat]
    lengths = [len(tokenizer.encode(text, add_special_tokens=False)) for text in rendered]
    assert lengths == [len(p.token_ids) for p in plain]


def test_model_without_tokenizer_borrows_tiny_llamas() -> None:
    target = serving.resolve_target("llama3", ["engine.load_format=dummy"])
    try:
        assert target.borrowed_dir is not None and target.tokenizer is not None
        assert target.overrides[-1] == f"engine.weights={target.borrowed_dir}"
        assert target.engine_config.model == str(target.borrowed_dir)
        config = json.loads((target.borrowed_dir / "config.json").read_text())
        assert config["vocab_size"] == 128256 and config["num_hidden_layers"] == 32
        assert target.tokenizer.chat_template  # chat requests need one (frontend_streams)
    finally:
        if target.borrowed_dir is not None:
            shutil.rmtree(target.borrowed_dir, ignore_errors=True)


@pytest.mark.parametrize("stream_mode", ["per-request", "shared"])
def test_serving_report_is_sane(tmp_path: Path, stream_mode: str) -> None:
    cfg = serving.ServingBenchConfig(
        stream_mode=stream_mode,
        num_requests=6,
        prompt_len=(16, 96),
        output_len=(4, 24),
        rates=[50.0, math.inf],
        serve_args=["cache.num_blocks=256"],
        warmup=False,
        json_path=str(tmp_path / "out.json"),
    )
    results = serving.run(cfg)
    assert json.loads((tmp_path / "out.json").read_text())["runs"] == json.loads(json.dumps(results["runs"]))
    drawn = standard_workload(6, 512, (16, 96), (4, 24))
    expected_out = sum(r.output_len for r in drawn)
    expected_in = sum(len(r.prompt_token_ids) for r in drawn)
    assert results["prompt_tokens"] == expected_in and results["prompt_len_mismatches"] == 0
    assert [r["request_rate"] for r in results["runs"]] == [50.0, "inf"]
    for run in results["runs"]:
        assert run["completed"] == 6 and run["failed"] == 0, run["errors"]
        assert run["output_tokens"] == run["expected_output_tokens"] == expected_out  # ignore_eos
        assert run["input_tokens"] == expected_in
        assert run["duration_s"] > 0
        assert run["request_throughput"] == pytest.approx(6 / run["duration_s"])
        assert run["output_throughput"] == pytest.approx(expected_out / run["duration_s"])
        ttft, tpot, itl, e2e = (run[f"{m}_ms"] for m in ("ttft", "tpot", "itl", "e2el"))
        for stats in (ttft, tpot, itl, e2e):
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
        # TTFT <= E2E per request, so at every percentile; E2E no longer than the run
        assert ttft["mean"] <= e2e["mean"] and ttft["p99"] <= e2e["p99"]
        assert e2e["p99"] <= run["duration_s"] * 1000 + 1
        assert run["client_cpu_s"] >= 0 and run["server_cpu_s"] is not None
    offline = results["offline"]
    assert offline["output_tokens"] == expected_out and offline["input_tokens"] == expected_in
    assert results["saturation_ratio"] == pytest.approx(
        results["runs"][-1]["output_throughput"] / offline["output_throughput"]
    )
