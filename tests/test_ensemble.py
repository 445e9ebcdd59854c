"""Ensembles (``platform: ensemble``) through tritonclient: the shipped LLM pipeline, graphs of stock
models, statistics, and ensembles that must not load or must fail cleanly."""

from __future__ import annotations

import queue
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from .conftest import REPO, ServerProcess, start_server, statistics_after_execution

SHIPPED = ["simple", "simple_string", "repeat_int32", "tiny-llama", "llm_preprocess", "llm_postprocess"]
ROW = [16]


def _tensor(name: str, dtype: str, dims: list[int], **extra: object) -> dict:
    return {"name": name, "data_type": dtype, "dims": dims, **extra}


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str], version: int = -1) -> dict:
    return {"model_name": model, "model_version": version, "input_map": inputs, "output_map": outputs}


def _ensemble(inputs: list[dict], outputs: list[dict], steps: list[dict], batch: int = 8) -> dict:
    return {
        "platform": "ensemble",
        "max_batch_size": batch,
        "input": inputs,
        "output": outputs,
        "ensemble_scheduling": {"step": steps},
    }


AB = [_tensor("A", "TYPE_INT32", ROW), _tensor("B", "TYPE_INT32", ROW)]
ADD_SUB = {"INPUT0": "A", "INPUT1": "B"}

ENSEMBLES = {
    # (a, b) -> simple -> (a+b, a-b) -> simple -> (2a, 2b): a chain whose second step needs both
    # outputs of the first.
    "double": _ensemble(
        AB,
        [_tensor("TWO_A", "TYPE_INT32", ROW), _tensor("TWO_B", "TYPE_INT32", ROW)],
        [
            _step("simple", ADD_SUB, {"OUTPUT0": "sum", "OUTPUT1": "diff"}),
            _step("simple", {"INPUT0": "sum", "INPUT1": "diff"}, {"OUTPUT0": "TWO_A", "OUTPUT1": "TWO_B"}, 1),
        ],
    ),
    # A decoupled step: every response of repeat_int32 is a response of the ensemble.
    "repeat_through": _ensemble(
        [
            _tensor("IN", "TYPE_INT32", [-1]),
            _tensor("DELAY", "TYPE_UINT32", [-1]),
            _tensor("WAIT", "TYPE_UINT32", [1]),
        ],
        [_tensor("OUT", "TYPE_INT32", [1])],
        [_step("repeat_int32", {"IN": "IN", "DELAY": "DELAY", "WAIT": "WAIT"}, {"OUT": "OUT"})],
        batch=0,
    ),
    # A step whose model refuses the tensors it gets at run time.
    "strings": _ensemble(
        [_tensor("A", "TYPE_STRING", ROW), _tensor("B", "TYPE_STRING", ROW)],
        [_tensor("SUM", "TYPE_STRING", ROW)],
        [_step("simple_string", ADD_SUB, {"OUTPUT0": "SUM"})],
    ),
    # 64 steps on the same two inputs, all running at once.
    "fan_out": _ensemble(
        AB,
        [_tensor("SUM", "TYPE_INT32", ROW)],
        [_step("simple", ADD_SUB, {"OUTPUT0": "SUM" if i == 0 else f"s{i}"}) for i in range(64)],
    ),
}

# nest_0 -> nest_1 -> ... -> nest_15 -> simple: one model more than a caller chain may hold.
NESTED = {
    f"nest_{i}": _ensemble(
        AB, [_tensor("S", "TYPE_INT32", ROW)], [_step(f"nest_{i + 1}", {"A": "A", "B": "B"}, {"S": "S"})]
    )
    for i in range(15)
}
NESTED["nest_15"] = _ensemble(
    AB, [_tensor("S", "TYPE_INT32", ROW)], [_step("simple", ADD_SUB, {"OUTPUT0": "S"})]
)

BROKEN = {
    "self_step": (
        _ensemble(AB, [_tensor("S", "TYPE_INT32", ROW)], [_step("self_step", ADD_SUB, {"OUTPUT0": "S"})]),
        "step 0 ('self_step'): a step cannot run the ensemble itself",
    ),
    "tensor_cycle": (
        _ensemble(
            AB,
            [_tensor("S", "TYPE_INT32", ROW)],
            [
                _step("simple", {"INPUT0": "A", "INPUT1": "y"}, {"OUTPUT0": "x", "OUTPUT1": "S"}),
                _step("simple", {"INPUT0": "x", "INPUT1": "B"}, {"OUTPUT0": "y"}),
            ],
        ),
        "the steps form a cycle: step 0 ('simple') -> step 1 ('simple') -> step 0 ('simple')",
    ),
    "unknown_model": (
        _ensemble(AB, [_tensor("S", "TYPE_INT32", ROW)], [_step("no_such_model", ADD_SUB, {"OUTPUT0": "S"})]),
        "step 0 ('no_such_model'): model 'no_such_model' is not in the model repository",
    ),
    "unused_input": (
        _ensemble(
            [*AB, _tensor("C", "TYPE_INT32", ROW)],
            [_tensor("S", "TYPE_INT32", ROW)],
            [_step("simple", ADD_SUB, {"OUTPUT0": "S"})],
        ),
        "input 'C' is not consumed by any step",
    ),
    "unproduced_output": (
        _ensemble(
            AB,
            [_tensor("S", "TYPE_INT32", ROW), _tensor("T", "TYPE_INT32", ROW)],
            [_step("simple", ADD_SUB, {"OUTPUT0": "S"})],
        ),
        "output 'T' is not produced by any step's output_map",
    ),
    "dtype_mismatch": (
        _ensemble(
            [_tensor("A", "TYPE_FP32", ROW), _tensor("B", "TYPE_INT32", ROW)],
            [_tensor("S", "TYPE_INT32", ROW)],
            [_step("simple", ADD_SUB, {"OUTPUT0": "S"})],
        ),
        "step 0 ('simple'): tensor 'A' is FP32 [-1,16] as ensemble input, but input 'INPUT0' of step 0 "
        "('simple') expects INT32 [-1,16]",
    ),
    "shape_mismatch": (
        _ensemble(AB, [_tensor("S", "TYPE_INT32", [8])], [_step("simple", ADD_SUB, {"OUTPUT0": "S"})]),
        "tensor 'S' is INT32 [-1,16] as output 'OUTPUT0' of step 0 ('simple'), but ensemble output expects",
    ),
    "unknown_model_input": (
        _ensemble(
            AB,
            [_tensor("S", "TYPE_INT32", ROW)],
            [_step("simple", {**ADD_SUB, "NOPE": "A"}, {"OUTPUT0": "S"})],
        ),
        "step 0 ('simple'): input_map names 'NOPE', which is not an input of the model",
    ),
    "missing_version": (
        _ensemble(AB, [_tensor("S", "TYPE_INT32", ROW)], [_step("simple", ADD_SUB, {"OUTPUT0": "S"}, 7)]),
        "step 0 ('simple'): Request for unknown model: 'simple' version 7 is not found",
    ),
    "loop_a": (
        _ensemble(AB, [_tensor("S", "TYPE_INT32", ROW)], [_step("loop_b", ADD_SUB, {"S": "S"})]),
        "ensembles form a cycle: loop_a -> loop_b -> loop_a",
    ),
    "loop_b": (
        _ensemble(AB, [_tensor("S", "TYPE_INT32", ROW)], [_step("loop_a", ADD_SUB, {"S": "S"})]),
        "ensembles form a cycle: loop_b -> loop_a -> loop_b",
    ),
}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ensembles")
    for name in [*SHIPPED, "llm_pipeline"]:
        shutil.copy(REPO / "conf" / "models" / f"{name}.yaml", path)
    for name, document in {**ENSEMBLES, **NESTED, **{n: d for n, (d, _) in BROKEN.items()}}.items():
        (path / f"{name}.yaml").write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerProcess]:
    models = ",".join([*ENSEMBLES, "llm_pipeline"])
    process = start_server(
        f"repository={repository}", "model_control_mode=explicit", f"model=[{models}]", "cache.num_blocks=128"
    )
    yield process
    process.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with server.client() as c:
        yield c


def _input(name: str, value: np.ndarray) -> grpcclient.InferInput:
    datatype = {np.dtype(np.int32): "INT32", np.dtype(np.uint32): "UINT32", np.dtype(np.bool_): "BOOL"}.get(
        value.dtype, "BYTES"
    )
    tensor = grpcclient.InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return tensor


def _pipeline_inputs(prompt: str, max_tokens: int, stream: bool | None = None) -> list[grpcclient.InferInput]:
    inputs = [
        _input("PROMPT", np.array([prompt.encode()], dtype=np.object_)),
        _input("MAX_TOKENS", np.array([max_tokens], dtype=np.int32)),
    ]
    if stream is not None:
        inputs.append(_input("STREAM", np.array([stream])))
    return inputs


def _stream(client: grpcclient.InferenceServerClient, model: str, inputs: list, **kwargs: object) -> list:
    """Every response of one streamed request until the final flag; errors are raised."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, request_id="1", enable_empty_final_response=True, **kwargs)
        responses = []
        while True:
            result, error = results.get(timeout=60)
            if error is not None:
                raise error
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return responses
    finally:
        client.stop_stream()


# -- the shipped pipeline --------------------------------------------------------------------------


PROMPT = "The scheduler hands out tokens"


def _direct_llm(client: grpcclient.InferenceServerClient, max_tokens: int) -> bytes:
    sampling = f'{{"max_tokens": {max_tokens}, "temperature": 0}}'
    result = client.infer(
        "tiny-llama",
        [
            _input("text_input", np.array([PROMPT.encode()], dtype=np.object_)),
            _input("sampling_parameters", np.array([sampling.encode()], dtype=np.object_)),
            _input("exclude_input_in_output", np.array([True])),
        ],
    )
    return b"".join(result.as_numpy("text_output"))


def test_pipeline_unary_matches_the_llm_alone(client: grpcclient.InferenceServerClient) -> None:
    from pagedserve_plugins.examples.pipeline import tiny_llama_tokenizer

    result = client.infer("llm_pipeline", _pipeline_inputs(PROMPT, 8))
    text = result.as_numpy("TEXT")[0]
    assert text == _direct_llm(client, 8)
    expected_ids = tiny_llama_tokenizer().encode(text.decode(), add_special_tokens=False).ids
    assert result.as_numpy("OUTPUT_IDS").tolist() == expected_ids
    prompt_ids = tiny_llama_tokenizer().encode(PROMPT, add_special_tokens=False).ids
    assert result.as_numpy("NUM_INPUT_TOKENS").tolist() == [len(prompt_ids)]


def test_pipeline_streams_each_piece_of_the_llm(client: grpcclient.InferenceServerClient) -> None:
    responses = _stream(client, "llm_pipeline", _pipeline_inputs(PROMPT, 8, stream=True))
    pieces = [r.as_numpy("TEXT")[0] for r in responses if r.as_numpy("TEXT") is not None]
    assert len(pieces) > 1  # one response per streamed piece, not one folded answer
    assert b"".join(pieces) == _direct_llm(client, 8)
    assert responses[-1].get_response().parameters["triton_final_response"].bool_param


def test_pipeline_counts_in_every_models_statistics(client: grpcclient.InferenceServerClient) -> None:
    def successes(model: str) -> int:
        return client.get_inference_statistics(model).model_stats[0].inference_stats.success.count

    before = {m: successes(m) for m in ("llm_pipeline", "llm_preprocess", "tiny-llama", "llm_postprocess")}
    client.infer("llm_pipeline", _pipeline_inputs(PROMPT, 4))
    after = {m: successes(m) for m in before}
    assert {m: after[m] - before[m] for m in before} == {m: 1 for m in before}


def test_pipeline_step_error_fails_the_request_with_its_message(
    client: grpcclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException, match=r"MAX_TOKENS must be in \[1, 4096\], got 0"):
        client.infer("llm_pipeline", _pipeline_inputs(PROMPT, 0))
    assert client.infer("llm_pipeline", _pipeline_inputs(PROMPT, 2)).as_numpy("TEXT") is not None


# -- graphs of stock models ------------------------------------------------------------------------


def test_chain_passes_tensors_between_steps_and_batches(client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 3, dtype=np.int32)
    before = client.get_inference_statistics("simple").model_stats[0].inference_count
    result = client.infer("double", [_input("A", a), _input("B", b)])
    np.testing.assert_array_equal(result.as_numpy("TWO_A"), 2 * a)
    np.testing.assert_array_equal(result.as_numpy("TWO_B"), 2 * b)
    stats = statistics_after_execution(client, "simple", 0)
    assert stats.inference_count - before == 4  # two steps, batch of two each
    ensemble = client.get_inference_statistics("double").model_stats[0]
    assert ensemble.inference_stats.success.count >= 1


def test_only_requested_outputs_come_back(client: grpcclient.InferenceServerClient) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    result = client.infer(
        "double", [_input("A", a), _input("B", a)], outputs=[grpcclient.InferRequestedOutput("TWO_B")]
    )
    assert result.as_numpy("TWO_A") is None
    np.testing.assert_array_equal(result.as_numpy("TWO_B"), 2 * a)


def test_decoupled_step_streams_through(client: grpcclient.InferenceServerClient) -> None:
    values = np.array([4, 5, 6], dtype=np.int32)
    inputs = [
        _input("IN", values),
        _input("DELAY", np.array([1, 1, 1], dtype=np.uint32)),
        _input("WAIT", np.array([0], dtype=np.uint32)),
    ]
    responses = _stream(client, "repeat_through", inputs)
    outs = [r.as_numpy("OUT").tolist() for r in responses if r.as_numpy("OUT") is not None]
    assert outs == [[4], [5], [6]]


def test_bad_inputs_are_refused_against_the_ensemble_config(client: grpcclient.InferenceServerClient) -> None:
    bad = np.zeros((9, 16), dtype=np.int32)  # over max_batch_size 8
    with pytest.raises(InferenceServerException, match="batch-size must be <= 8"):
        client.infer("double", [_input("A", bad), _input("B", bad)])
    with pytest.raises(InferenceServerException, match="unexpected inference input 'C'"):
        client.infer("double", [_input("A", bad[:1]), _input("C", bad[:1])])


def test_a_failing_step_fails_the_request_and_the_server_goes_on(
    client: grpcclient.InferenceServerClient,
) -> None:
    words = np.array([[b"x"] * 16], dtype=np.object_)
    with pytest.raises(InferenceServerException, match="must hold decimal integer strings") as caught:
        client.infer("strings", [_input("A", words), _input("B", words)])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"  # the step's own status
    numbers = np.array([[b"2"] * 16], dtype=np.object_)
    result = client.infer("strings", [_input("A", numbers), _input("B", numbers)])
    assert result.as_numpy("SUM")[0, 0] == b"4"
    fails = client.get_inference_statistics("strings").model_stats[0].inference_stats.fail.count
    assert fails >= 1


def test_huge_fan_out_runs_every_step(client: grpcclient.InferenceServerClient) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    before = client.get_inference_statistics("simple").model_stats[0].inference_count
    result = client.infer("fan_out", [_input("A", a), _input("B", a)])
    np.testing.assert_array_equal(result.as_numpy("SUM"), 2 * a)
    assert statistics_after_execution(client, "simple", 0).inference_count - before == 64


def test_unloading_a_step_fails_requests_until_it_is_back(client: grpcclient.InferenceServerClient) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    client.unload_model("simple_string")
    try:
        words = np.array([[b"1"] * 16], dtype=np.object_)
        with pytest.raises(InferenceServerException, match="Request for unknown model: 'simple_string'"):
            client.infer("strings", [_input("A", words), _input("B", words)])
        assert client.infer("double", [_input("A", a), _input("B", a)]) is not None
    finally:
        client.load_model("simple_string")


# -- ensembles that must not load -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_ensemble_is_a_load_error_naming_the_step(
    client: grpcclient.InferenceServerClient, name: str
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.load_model(name)
    assert BROKEN[name][1] in caught.value.message()
    assert not client.is_model_ready(name)
    a = np.ones((1, 16), dtype=np.int32)
    assert client.infer("double", [_input("A", a), _input("B", a)]) is not None  # still serving


def test_nesting_deeper_than_the_limit_fails_the_request(client: grpcclient.InferenceServerClient) -> None:
    from pagedserve.in_process import MAX_DEPTH

    assert len(NESTED) + 1 == MAX_DEPTH + 1
    client.load_model("nest_0")  # loads nest_1 ... nest_15 as its dependencies
    assert client.is_model_ready("nest_15")
    a = np.ones((1, 16), dtype=np.int32)
    with pytest.raises(
        InferenceServerException, match=f"in-process calls nest at most {MAX_DEPTH} models deep"
    ):
        client.infer("nest_0", [_input("A", a), _input("B", a)])
    # One level less is within the limit.
    np.testing.assert_array_equal(
        client.infer("nest_1", [_input("A", a), _input("B", a)]).as_numpy("S"), 2 * a
    )
