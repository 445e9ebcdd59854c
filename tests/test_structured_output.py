"""Structured outputs (vLLM's ``structured_outputs`` / ``guided_decoding``): every output of the tiny
model at temperature 1 parses against its schema, regex, choices or grammar; the token bitmask is
applied on the logits tensor in one call; bad constraints are the client's INVALID_ARGUMENT."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from pagedserve.engine.engine_core import EngineCore
from pagedserve.engine.grammar_compiles import GrammarCompiles
from pagedserve.engine.llm import LLM
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.request import EngineRequest
from pagedserve.engine.sampler import Sampler
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence
from pagedserve.engine.structured_output import StructuredOutputsParams, XGrammarBackend, apply_bitmask
from pagedserve.models.tiny import ensure_tiny_llama

from .conftest import ServerProcess, start_server
from .engine_helpers import ENGINE_MODES, assert_pool_free, engine_config

SCHEMA = {
    "type": "object",
    "properties": {
        # Not maxLength: xgrammar 0.2.9 lets a length-bounded string hold raw control characters,
        # which strict JSON parsers refuse (docs/sampling.md).
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "role"],
}
REGEX = r"[A-Z][a-z]{2,6}-[0-9]{2,4}"
CHOICES = ["positive", "negative", "not sure"]
GRAMMAR = 'root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?'
SEEDS = range(4)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return ensure_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module", params=[False, True], ids=["cpu", "cpu-overlap"])
def llm(request, tiny_path) -> LLM:
    llm = LLM(engine_config(tiny_path, block_size=8, num_blocks=512, device="cpu"))
    llm.engine.overlap = request.param
    return llm


@pytest.fixture(autouse=True)
def _pool_is_free_after_each_test(request):
    yield
    if "llm" in request.fixturenames:
        assert_pool_free(request.getfixturevalue("llm").engine.block_manager)


def constrained(llm: LLM, structured: dict, n: int = 1, max_tokens: int = 200):
    params = [
        SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=max_tokens, structured_outputs=structured)
        for seed in SEEDS
    ]
    outputs = llm.generate(["Describe a user:"] * len(params), params)
    return [c for o in outputs for c in o.outputs]


def test_json_schema_outputs_validate(llm):
    jsonschema = pytest.importorskip("jsonschema")
    for completion in constrained(llm, {"json": SCHEMA}, n=2):
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_json_schema_as_text_and_guided_decoding_alias(llm):
    params = SamplingParams.from_json(
        json.dumps({"guided_decoding": json.dumps({"json": json.dumps(SCHEMA)})})
    )
    assert params.structured_outputs is not None and params.structured_outputs.kind == "json"
    out = llm.generate(
        ["x"],
        SamplingParams(temperature=1.0, seed=9, max_tokens=200, structured_outputs=params.structured_outputs),
    )
    assert set(json.loads(out[0].outputs[0].text)) >= {"name", "age", "role"}


def test_any_json_object(llm):
    for completion in constrained(llm, {"json_object": True}, max_tokens=400):
        if completion.finish_reason == "stop":
            json.loads(completion.text)


def test_regex_outputs_match(llm):
    for completion in constrained(llm, {"regex": REGEX}):
        assert completion.finish_reason == "stop"
        assert re.fullmatch(REGEX, completion.text), completion.text


def test_choice_outputs_are_one_choice(llm):
    texts = [c.text for c in constrained(llm, {"choice": CHOICES}, n=3)]
    assert set(texts) <= set(CHOICES)


def test_ebnf_grammar_outputs_parse(llm):
    for completion in constrained(llm, {"grammar": GRAMMAR}):
        if completion.finish_reason == "stop":
            assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", completion.text), completion.text


def test_the_grammar_ends_the_request_even_with_ignore_eos(llm):
    params = SamplingParams(
        temperature=1.0, seed=1, max_tokens=100, ignore_eos=True, structured_outputs={"choice": CHOICES}
    )
    out = llm.generate(["x"], params)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text in CHOICES


def test_the_bitmask_is_applied_on_the_logits_tensor(tiny_path, monkeypatch):
    """One call per step for the whole batch, on the logits tensor itself, only for the constrained
    rows; the rows' disallowed logits are -inf afterwards."""
    import xgrammar

    backend = XGrammarBackend(tiny_path / "tokenizer.json", 512, frozenset({1}))
    calls = []
    real = xgrammar.apply_token_bitmask_inplace

    def spy(logits, bitmask, **kwargs):
        calls.append((logits, bitmask.clone(), kwargs))
        real(logits, bitmask, **kwargs)

    monkeypatch.setattr(xgrammar, "apply_token_bitmask_inplace", spy)
    structured = StructuredOutputsParams(choice=CHOICES)
    seqs = [Sequence(f"r{i}", [2, 3], SamplingParams(temperature=0.0)) for i in range(3)]
    seqs[1].grammar = backend.grammar_for(structured)
    logits = torch.randn(3, 512)
    before = logits.clone()
    token = Sampler(512, frozenset({1}), seed=0)(logits, seqs)[1].token_id
    assert len(calls) == 1
    masked, bitmask, kwargs = calls[0]
    assert masked.data_ptr() == logits.data_ptr() and kwargs["indices"] == [1]
    assert bitmask.shape == (3, 16) and bitmask.dtype == torch.int32
    allowed = torch.isfinite(logits[1])
    assert 0 < allowed.sum() < 512 and allowed[token]
    torch.testing.assert_close(logits[[0, 2]], before[[0, 2]])  # unconstrained rows untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_bitmask_is_applied_on_the_device(tiny_path):
    backend = XGrammarBackend(tiny_path / "tokenizer.json", 512, frozenset({1}))
    grammar = backend.grammar_for(StructuredOutputsParams(regex="[0-9]+"))
    from pagedserve.engine.structured_output import grammar_bitmask

    bitmask, rows = grammar_bitmask([None, grammar], 512)
    logits = torch.randn(2, 512, device="cuda")
    reference = logits.cpu().clone()
    apply_bitmask(logits, bitmask, rows)
    apply_bitmask(reference, bitmask, rows)
    assert torch.equal(logits.cpu(), reference) and logits.device.type == "cuda"


def _deep(depth: int) -> dict:
    node: dict = {"type": "string"}
    for _ in range(depth):
        node = {"type": "object", "properties": {"a": node}}
    return {"properties": {"deep": node}}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({}, r"must set exactly one of \['json', 'regex', 'choice', 'grammar', 'json_object'\], got none"),
        ({"regex": "a", "choice": ["a"]}, r"exactly one of .* got \['regex', 'choice'\]"),
        ({"regex": "(ab"}, r"structured_outputs.regex is invalid: .*parenthesis is not closed"),
        ({"json": {"type": "nonsense"}}, r"structured_outputs.json is invalid: Unsupported type"),
        ({"json": "{not json"}, "structured_outputs.json is not valid JSON"),
        ({"json": "[1, 2]"}, "must be a JSON schema object"),
        ({"json": 5}, "must be a JSON schema object or its JSON text"),
        (
            {"grammar": "root ::= foo"},
            r"structured_outputs.grammar is invalid: .*Rule \"foo\" is not defined",
        ),
        ({"grammar": ""}, "structured_outputs.grammar must be a non-empty string"),
        ({"choice": []}, "structured_outputs.choice must be a list of 1 to 1024 strings"),
        ({"choice": [1, 2]}, "must be a list of strings"),
        ({"choice": ["a"] * 1025}, "a list of 1 to 1024 strings"),
        ({"regex": "a" * 70_000}, "has 70000 characters; at most 65536"),
        ({"regex": "a{1000000}"}, "repeats 1000000 times; at most 10000"),
        ({"json": {"type": "array", "minItems": 10**9}}, "minItems=1000000000; at most 10000"),
        (
            {"json": json.dumps({"type": "object"} | _deep(40))},
            "nests deeper than 32",
        ),
        ({"json_object": False}, "must set exactly one of"),
        ({"structural_tag": "{}"}, "structured_outputs.structural_tag is not supported"),
        ({"backend": "outlines"}, "unknown structured_outputs field 'backend'"),
        ("[1]", "structured_outputs must be a JSON object"),
        ("{oops", "structured_outputs is not valid JSON"),
    ],
)
def test_bad_constraints_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_json_dict({"structured_outputs": value})


def test_huge_nesting_in_the_json_text_is_a_short_error():
    text = '{"json": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(ValueError) as error:
        SamplingParams.from_json(json.dumps({"structured_outputs": text}))
    assert len(str(error.value)) < 500


def test_structured_outputs_need_a_tokenizer():
    with pytest.raises(ValueError, match="structured_outputs need a tokenizer"):
        from pagedserve.engine.request import build_request

        build_request(None, "r", [1, 2], SamplingParams(structured_outputs={"regex": "a"}))


# ---- grammars compile off the step loop ---------------------------------------------------------


class HeldCompiles:
    """The engine's grammar compiles, each held until :meth:`release` (or 2 s: a compile on the
    engine's own thread then stalls the test without hanging it)."""

    def __init__(
        self, engine: LLMEngine, monkeypatch: pytest.MonkeyPatch, fail: Exception | None = None
    ) -> None:
        backend = engine.grammars
        real = backend.grammar_for
        self.released = threading.Event()
        self.started: list[str] = []  # the constraints' kinds, in the order their compiles began
        self.num_started = threading.Semaphore(0)
        self.finished: list[str] = []

        def held(params: StructuredOutputsParams):
            self.started.append(params.kind)
            self.num_started.release()
            self.released.wait(2.0)
            try:
                if fail is not None:
                    raise fail
                return real(params)
            finally:
                self.finished.append(params.kind)

        monkeypatch.setattr(backend, "grammar_for", held)

    def wait_started(self, count: int) -> None:
        for _ in range(count):
            assert self.num_started.acquire(timeout=5), "a compile never started"

    def release(self) -> None:
        self.released.set()


# The CPU engine also with async scheduling's overlap (a step's outputs come with the next step), as
# on CUDA.
ENGINES = [
    *(m for m in ENGINE_MODES if m.id != "cuda-triton"),  # no Triton kernel for tiny-llama's head size
    pytest.param({"device": "cpu", "overlap": True}, id="cpu-overlap"),
]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, tiny_path) -> LLMEngine:
    mode = dict(request.param)
    overlap = mode.pop("overlap", None)
    engine = LLMEngine(engine_config(tiny_path, block_size=8, num_blocks=256, **mode))
    if overlap is not None:
        engine.overlap = overlap
    return engine


@pytest.fixture
def core(engine) -> Iterator[EngineCore]:
    core = EngineCore(engine)
    yield core
    core.abort_all()  # what a failed test left behind must not fail the next ones
    assert_pool_free(engine.block_manager)


def _request(request_id: str, structured: dict | None = None, max_tokens: int = 200) -> EngineRequest:
    if structured is None:  # a plain request of exactly max_tokens tokens
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    else:
        params = SamplingParams(temperature=1.0, seed=3, max_tokens=max_tokens, structured_outputs=structured)
    return EngineRequest(request_id, [2, 40, 41, 42], params)


def _step_until_finished(core: EngineCore, request_ids: set[str]) -> dict[str, list]:
    """Each request's outputs, stepping until all of ``request_ids`` have finished."""
    outputs: dict[str, list] = {}
    for _ in range(2000):
        for output in core.step():
            outputs.setdefault(output.request_id, []).append(output)
        if all(rid in outputs and outputs[rid][-1].finished for rid in request_ids):
            return outputs
    raise AssertionError(f"{request_ids} did not finish")


def test_a_compiling_grammar_holds_up_no_other_request(engine, monkeypatch, core):
    """A plain request added with a schema whose compile is held generates all its tokens, one per
    step, while the compile is still held; the schema's request then runs and its output parses."""
    jsonschema = pytest.importorskip("jsonschema")
    held = HeldCompiles(engine, monkeypatch)
    try:
        assert core.add(_request("json", {"json": SCHEMA})) is None
        assert core.add(_request("plain", max_tokens=8)) is None
        steps = 0
        while "plain" not in (o.request_id for o in core.step() if o.finished):
            steps += 1
        assert not held.finished, "the plain request waited for the compile"
        assert steps + 1 <= 8 + int(engine.overlap)  # one token a step: no step waited either
        assert core.stats.num_waiting == 1  # the compiling request counts as waiting
        assert engine.scheduler.waiting == [] and engine.scheduler.running == []
    finally:
        held.release()
    final = _step_until_finished(core, {"json"})["json"][-1]
    assert final.error is None and final.outputs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(final.outputs[0].text), SCHEMA)


def test_abort_while_compiling_drops_the_request(engine, monkeypatch, core):
    """One aborted while its compile runs, one aborted while queued behind it (never compiled): both
    end at once with "abort"; the finished compile is dropped and the engine goes on."""
    monkeypatch.setattr(engine, "compiles", GrammarCompiles(engine.grammars, num_threads=1), raising=False)
    held = HeldCompiles(engine, monkeypatch)
    try:
        assert core.add(_request("running", {"json": SCHEMA})) is None
        assert core.add(_request("queued", {"regex": REGEX})) is None
        held.wait_started(1)
        for rid in ("queued", "running"):
            final = core.abort(rid)
            assert final is not None and final.finished and final.error is None
            assert [c.finish_reason for c in final.outputs] == ["abort"]
        assert not engine.has_unfinished_requests() and core.stats.num_waiting == 0
    finally:
        held.release()
    for _ in range(500):  # until the held compile has ended and its result been dropped
        if held.finished:
            break
        threading.Event().wait(0.01)
    assert core.step() == [] and not engine.has_unfinished_requests()
    assert held.started == ["json"], "the queued compile ran after its request was aborted"
    assert core.abort("running") is None
    assert core.add(_request("plain", max_tokens=4)) is None
    plain = _step_until_finished(core, {"plain"})["plain"][-1]
    assert len(plain.outputs[0].token_ids) == 4


def test_an_engine_waiting_only_for_a_compile_sleeps(engine, monkeypatch, core):
    """Its steps wait for the compile a few ms at a time instead of spinning (a spinning loop would
    take thousands of steps in 0.3 s, and a CPU with them)."""
    held = HeldCompiles(engine, monkeypatch)
    try:
        assert core.add(_request("json", {"regex": REGEX})) is None
        steps, deadline = 0, time.monotonic() + 0.3
        while time.monotonic() < deadline:
            assert core.step() == []
            steps += 1
        assert 0 < steps < 150 and core.has_work()
    finally:
        held.release()
    final = _step_until_finished(core, {"json"})["json"][-1].outputs[0]
    assert re.fullmatch(REGEX, final.text), final.text


def test_xgrammar_compiles_without_holding_the_gil():
    """Why a thread pool is enough: while a pool thread compiles a schema against a large vocabulary
    (~100+ ms), a Python loop on this thread keeps running, its longest pause far shorter than the
    compile. (An xgrammar that held the GIL would pause it for the whole compile.)"""
    import random
    import string

    import xgrammar as xgr

    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + ' {}":,[]'
    vocab = ["<s>", "</s>"] + ["".join(rng.choices(alphabet, k=rng.randint(1, 8))) for _ in range(128_000)]
    compiler = xgr.GrammarCompiler(
        xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, stop_token_ids=[1]), max_threads=1, cache_enabled=False
    )
    field = {"type": ["string", "integer", "array"], "items": {"type": "string"}}
    grammars = [
        xgr.Grammar.from_json_schema(
            json.dumps({"title": f"t{k}", "properties": {f"f{i}": field for i in range(80)}})
        )
        for k in range(3)
    ]
    durations: list[float] = []

    def compile_all() -> None:
        for grammar in grammars:
            start = time.perf_counter()
            compiler.compile_grammar(grammar)
            durations.append(time.perf_counter() - start)

    worker = threading.Thread(target=compile_all)
    longest, last = 0.0, time.perf_counter()
    worker.start()
    while worker.is_alive():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    if min(durations) < 0.05:
        pytest.skip(f"compiles took {min(durations):.3f} s: too quick to tell a pause from one")
    assert longest < min(durations) / 2, (longest, durations)


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (
            ValueError("structured_outputs.json does not compile: boom"),
            "INVALID_ARGUMENT",
            "does not compile: boom",
        ),
        (RuntimeError("out of memory"), "INTERNAL", "the grammar compiler failed: RuntimeError"),
    ],
    ids=["bad-constraint", "compiler-crash"],
)
def test_a_failing_compile_fails_its_request_alone(engine, monkeypatch, core, error, code, message):
    held = HeldCompiles(engine, monkeypatch, fail=error)
    held.release()
    results = {}
    for request in (_request("bad", {"json": SCHEMA}), _request("plain", max_tokens=6)):
        if (refused := core.add(request)) is not None:
            results[request.request_id] = [refused]
    results |= _step_until_finished(core, {"bad", "plain"} - set(results))
    bad = results["bad"][-1]
    assert bad.finished and bad.error_code == code and message in bad.error and bad.outputs == []
    assert len(results["bad"]) == 1
    plain = results["plain"][-1]
    assert plain.error is None and len(plain.outputs[0].token_ids) == 6
    assert not engine.has_unfinished_requests()


def test_the_compile_queue_is_bounded(engine, monkeypatch, core):
    """Beyond max_queued compiles in flight a structured request is UNAVAILABLE; aborting a request
    whose compile runs does not free its place until the compile ends (it still holds a thread);
    plain requests are served throughout."""
    compiles = GrammarCompiles(engine.grammars, max_queued=2, num_threads=2)
    monkeypatch.setattr(engine, "compiles", compiles, raising=False)
    held = HeldCompiles(engine, monkeypatch)
    try:
        assert core.add(_request("a", {"json": SCHEMA})) is None
        assert core.add(_request("b", {"choice": CHOICES})) is None
        held.wait_started(2)
        refused = core.add(_request("c", {"regex": REGEX}))
        assert refused is not None and refused.finished and refused.error_code == "UNAVAILABLE"
        assert refused.error == (
            "Exceeds maximum queue size: 2 structured-output grammars are compiling for this model "
            "(at most 2); retry later"
        )
        core.abort("a")
        assert core.add(_request("d", {"regex": REGEX})).error_code == "UNAVAILABLE"
        assert core.add(_request("plain", max_tokens=5)) is None
        plain = _step_until_finished(core, {"plain"})["plain"][-1]
        assert len(plain.outputs[0].token_ids) == 5 and not held.finished
    finally:
        held.release()
    outputs = _step_until_finished(core, {"b"})
    assert outputs["b"][-1].outputs[0].text in CHOICES
    assert core.add(_request("e", {"regex": REGEX})) is None  # room again
    e = _step_until_finished(core, {"e"})["e"][-1].outputs[0]
    assert re.fullmatch(REGEX, e.text), e.text


def test_requests_with_one_constraint_share_its_compile(engine, monkeypatch, core):
    """Five times max_queued requests with the same schema while it compiles: all are admitted, the
    schema compiles once, aborting some leaves the others' compile running, and each of the rest
    walks its own matcher to a valid document."""
    jsonschema = pytest.importorskip("jsonschema")
    monkeypatch.setattr(engine, "compiles", GrammarCompiles(engine.grammars, max_queued=2), raising=False)
    held = HeldCompiles(engine, monkeypatch)
    ids = [f"r{i}" for i in range(10)]
    try:
        for rid in ids:
            assert core.add(_request(rid, {"json": SCHEMA}, max_tokens=120)) is None
        held.wait_started(1)
        for rid in ids[:3]:
            assert core.abort(rid).outputs[0].finish_reason == "abort"
        assert core.add(_request("other", {"regex": REGEX})) is None  # one distinct compile in flight
    finally:
        held.release()
    outputs = _step_until_finished(core, {*ids[3:], "other"})
    assert held.started.count("json") == 1, held.started
    texts = [outputs[rid][-1].outputs[0].text for rid in ids[3:]]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert re.fullmatch(REGEX, outputs["other"][-1].outputs[0].text)
    assert not engine.has_unfinished_requests() and core.stats.num_waiting == 0


def test_preempted_constrained_requests_still_parse(tiny_path):
    """A pool too small for all of them preempts constrained sequences (recomputed later, their
    grammar state kept); every output still parses."""
    jsonschema = pytest.importorskip("jsonschema")
    llm = LLM(engine_config(tiny_path, block_size=8, num_blocks=40, device="cpu", max_num_seqs=8))
    params = [
        SamplingParams(
            temperature=1.0,
            seed=seed,
            max_tokens=120,
            structured_outputs={"json": SCHEMA, "disable_any_whitespace": True},
        )
        for seed in range(8)
    ]
    outputs = llm.generate([[2, 40, 41, 42]] * len(params), params)
    assert llm.engine.scheduler.num_preemptions > 0
    for output in outputs:
        assert output.outputs[0].finish_reason == "stop", output.outputs[0].text
        jsonschema.validate(json.loads(output.outputs[0].text), SCHEMA)
    assert_pool_free(llm.engine.block_manager)


# ---- through the server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    server = start_server("model=tiny-llama", "cache.num_blocks=256", "scheduler.max_num_seqs=8")
    yield server
    server.stop()


def _infer(client, sampling: dict):
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in (
        ("text_input", b"Describe a user:"),
        ("sampling_parameters", json.dumps(sampling).encode()),
    ):
        tensor = grpcclient.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value], dtype=np.object_))
        inputs.append(tensor)
    flag = grpcclient.InferInput("exclude_input_in_output", [1], "BOOL")
    flag.set_data_from_numpy(np.array([True]))
    inputs.append(flag)
    return client.infer("tiny-llama", inputs)


def test_through_tritonclient(server):
    jsonschema = pytest.importorskip("jsonschema")
    from tritonclient.utils import InferenceServerException

    with server.client() as client:
        for seed in SEEDS:
            # Triton's vLLM backend sends structured_outputs as a JSON string inside the JSON.
            sampling = {
                "temperature": 1,
                "seed": seed,
                "max_tokens": 200,
                "structured_outputs": json.dumps({"json": SCHEMA}),
            }
            text = b"".join(_infer(client, sampling).as_numpy("text_output")).decode()
            jsonschema.validate(json.loads(text), SCHEMA)
        for bad in ({"regex": "(ab"}, {"json": {"type": "nonsense"}}, {"regex": "x", "json_object": True}):
            with pytest.raises(InferenceServerException) as error:
                _infer(client, {"structured_outputs": bad})
            assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert "structured_outputs" in error.value.message()
        result = _infer(
            client, {"temperature": 0, "max_tokens": 3, "prompt_logprobs": 1, "logit_bias": {"42": 100}}
        )
        assert b"".join(result.as_numpy("text_output")).decode() == client_text(42) * 3
        entries = json.loads(result.as_numpy("prompt_logprobs")[0])
        assert entries[0] is None and len(entries) > 2 and all(len(e) in (1, 2) for e in entries[1:])


def client_text(token_id: int) -> str:
    from pagedserve.models.tokenizer import Tokenizer

    return Tokenizer.from_dir(ensure_tiny_llama()).decode([token_id])
