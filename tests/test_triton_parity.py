"""Protocol details Triton's own tests check, black-box through tritonclient: the ``triton_grpc_error``
stream header, the sequence batcher's batch-size rule, load errors for parameters a backend does not
read, the vLLM backend's metrics and their ``REPORT_CUSTOM_METRICS`` switch, and ``repeat_int32``
served non-decoupled."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from pagedserve.model_config_check import check_model_config
from pagedserve.plugin_manager import PluginHost
from pagedserve.repository import ModelRepository
from tritonclient.utils import InferenceServerException

from .conftest import REPO, ServerProcess, start_server
from .test_examples import StreamResults, _repeat_inputs, _sequence_input
from .test_llm_api import llm_inputs
from .test_metrics import metrics_port, scrape, value

MODELS = REPO / "conf" / "models"
TINY_LLAMA = (MODELS / "tiny-llama.yaml").read_text()
QUIET_LLAMA = TINY_LLAMA.replace("  REPORT_CUSTOM_METRICS: true", "")


# -- triton_grpc_error: true ------------------------------------------------------------------------


def test_grpc_error_header_ends_the_stream_with_the_status(server: ServerProcess) -> None:
    with server.client() as client:
        results = StreamResults()
        client.start_stream(callback=results, headers={"triton_grpc_error": "true"})
        client.async_stream_infer("repeat_int32", _repeat_inputs(grpcclient, [5], [0], 0), request_id="ok")
        ((result, error),) = results.take(1)
        assert error is None and int(result.as_numpy("OUT")[0]) == 5
        client.async_stream_infer(
            "repeat_int32", _repeat_inputs(grpcclient, [1], [0, 0], 0), request_id="bad"
        )
        ((result, error),) = results.take(1)
        assert result is None
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert error.message() == "expected IN and DELAY shape to match, got [1] and [2]"
        with pytest.raises(InferenceServerException, match="no longer in valid state"):
            client.async_stream_infer("repeat_int32", _repeat_inputs(grpcclient, [1], [0], 0))
        client.stop_stream()
        assert client.is_server_ready()  # the server serves on


def test_grpc_error_header_covers_requests_that_never_reach_a_model(server: ServerProcess) -> None:
    with server.client() as client:
        results = StreamResults()
        client.start_stream(callback=results, headers={"triton_grpc_error": "true"})
        client.async_stream_infer("no_such_model", _sequence_input(grpcclient, 1))
        ((_, error),) = results.take(1)
        client.stop_stream()
    assert error.status() is not None and "no_such_model" in error.message()


@pytest.mark.parametrize("headers", [None, {"triton_grpc_error": "false"}, {"triton_grpc_errors": "true"}])
def test_without_the_header_errors_stay_in_band(server: ServerProcess, headers: dict | None) -> None:
    with server.client() as client:
        results = StreamResults()
        client.start_stream(callback=results, headers=headers)
        client.async_stream_infer("repeat_int32", _repeat_inputs(grpcclient, [1], [0, 0], 0))
        ((_, error),) = results.take(1)
        assert error.status() is None  # in-band: error_message, no gRPC status
        client.async_stream_infer("repeat_int32", _repeat_inputs(grpcclient, [7], [0], 0))
        ((result, error),) = results.take(1)
        client.stop_stream()
    assert error is None and int(result.as_numpy("OUT")[0]) == 7


# -- the sequence batcher takes one step of one sequence per request ------------------------------


@pytest.mark.parametrize("model", ["simple_sequence", "simple_dyna_sequence"])
def test_sequence_batcher_refuses_batch_size_above_one(client: Any, model: str) -> None:
    tensor = grpcclient.InferInput("INPUT", [2, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[1], [2]], np.int32))
    with pytest.raises(InferenceServerException) as refused:
        client.infer(model, [tensor], sequence_id=4000, sequence_start=True)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert refused.value.message() == (
        f"inference request to model '{model}' must specify batch-size 1 due to requirements of "
        "sequence batcher"
    )
    # Refused before it opened the sequence: the same ID starts normally.
    result = client.infer(model, _sequence_input(grpcclient, 3), sequence_id=4000, sequence_start=True)
    assert int(result.as_numpy("OUTPUT")[0, 0]) == 4
    client.infer(model, _sequence_input(grpcclient, 0), sequence_id=4000, sequence_end=True)


# -- parameters a backend does not read fail the load ---------------------------------------------


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("repository")
    for name in ("repeat_int32", "tiny-llama"):
        (folder / f"{name}.yaml").write_text((MODELS / f"{name}.yaml").read_text())
    invalid = {
        # vllm_backend's test_model_with_invalid_attributes: an engine argument that does not exist
        "llm_invalid_attribute": "  invalid_attribute: test\n",
        "llm_misspelled": "  REPORT_CUSTOM_METRIC: true\n",
        "llm_bad_switch": "  REPORT_CUSTOM_METRICS: enabled\n",
        "llm_hostile": f'  ? "{"x" * 100_000}\\x01"\n  : y\n',  # an explicit key may be that long
    }
    for name, line in invalid.items():
        (folder / f"{name}.yaml").write_text(QUIET_LLAMA + line)
    process = start_server(f"repository={folder}", "model_control_mode=explicit")
    yield process
    process.stop()


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("llm_invalid_attribute", "parameters.invalid_attribute: the llm backend has no such parameter"),
        ("llm_misspelled", "REPORT_CUSTOM_METRIC: the llm backend has no such parameter (did you mean "),
        ("llm_bad_switch", "parameters.REPORT_CUSTOM_METRICS must be true or false, got 'enabled'"),
        ("llm_hostile", "parameters." + "x" * 80 + "...: the llm backend has no such parameter;"),
    ],
)
def test_unknown_parameters_fail_the_load(explicit: ServerProcess, model: str, expected: str) -> None:
    with explicit.client() as client:
        with pytest.raises(InferenceServerException) as failed:
            client.load_model(model)
        assert expected in failed.value.message()
        assert "failed to load" in failed.value.message()
        assert len(failed.value.message()) < 2000
        assert not client.is_model_ready(model)
        assert client.is_server_live()


def test_unknown_parameters_in_a_config_override_fail_the_load(explicit: ServerProcess) -> None:
    override = {"parameters": {"enforce_eager": {"string_value": "true"}}}
    with explicit.client() as client:
        with pytest.raises(InferenceServerException, match="parameters.enforce_eager: the llm backend"):
            client.load_model("tiny-llama", config=json.dumps(override))
        assert not client.is_model_ready("tiny-llama")


def test_every_shipped_model_passes_its_backend_checks() -> None:
    backends = PluginHost().registries().model_backends
    repository = ModelRepository(MODELS)
    for name in repository.names():
        spec = repository.read(name)
        backend = spec.config.backend or {"pytorch_libtorch": "torchscript"}.get(
            spec.config.platform, spec.config.platform
        )
        backends.get(backend).auto_complete(spec.config)
        check_model_config(spec.config)


# -- repeat_int32 non-decoupled, as Triton's L0_decoupled NonDecoupledTest serves it ---------------


def test_repeat_int32_serves_unary_calls_when_configured_non_decoupled(explicit: ServerProcess) -> None:
    with explicit.client() as client:
        client.load_model(
            "repeat_int32", config=json.dumps({"model_transaction_policy": {"decoupled": False}})
        )
        try:
            for delay, wait in ((0, 0), (200, 100), (100, 200)):
                started = time.monotonic()
                result = client.infer("repeat_int32", _repeat_inputs(grpcclient, [1], [delay], wait))
                assert time.monotonic() - started >= max(delay, wait) / 1000 - 0.01
                assert result.as_numpy("OUT").tolist() == [1] and result.as_numpy("IDX").tolist() == [0]
            with pytest.raises(InferenceServerException, match="IN must hold one element, got \\[2\\]"):
                client.infer("repeat_int32", _repeat_inputs(grpcclient, [1, 2], [0, 0], 0))
            with pytest.raises(InferenceServerException, match="expected IN and DELAY shape to match"):
                client.infer("repeat_int32", _repeat_inputs(grpcclient, [1], [0, 0], 0))
            results = StreamResults()
            client.start_stream(callback=results)
            client.async_stream_infer("repeat_int32", _repeat_inputs(grpcclient, [9], [0], 0), request_id="s")
            ((result, error),) = results.take(1)
            client.stop_stream()
            assert error is None and result.as_numpy("OUT").tolist() == [9]
            assert result.get_response().parameters["triton_final_response"].bool_param
        finally:
            client.unload_model("repeat_int32")


# -- the vLLM backend's metrics -------------------------------------------------------------------


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("llm_repository")
    (folder / "llm_reported.yaml").write_text(TINY_LLAMA)
    (folder / "llm_quiet.yaml").write_text(QUIET_LLAMA)
    process = start_server(
        f"repository={folder}",
        "model=[llm_reported,llm_quiet]",
        "cache.num_blocks=128",
        "scheduler.max_num_seqs=4",
        "engine.separate_process=false",
    )
    yield process
    process.stop()


def _histogram(samples: dict, name: str, model: str) -> dict[str, float]:
    labels = {"model": model, "version": "1"}
    buckets = {
        dict(k[1])["le"]: v
        for k, v in samples.items()
        if k[0] == f"{name}_bucket" and labels.items() <= dict(k[1]).items()
    }
    return {
        "count": value(samples, f"{name}_count", **labels),
        "sum": value(samples, f"{name}_sum", **labels),
        **buckets,
    }


def test_vllm_request_histograms_and_per_token_latency(metered: ServerProcess) -> None:
    port = metrics_port(metered)
    names = [
        "vllm:time_per_output_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
        "vllm:request_params_n",
        "vllm:request_params_max_tokens",
    ]
    _, before_samples = scrape(port)
    before = {name: _histogram(before_samples, name, "llm_reported") for name in names}
    labels = {"model": "llm_reported", "version": "1"}
    prompt_before = value(before_samples, "vllm:prompt_tokens_total", **labels)
    with metered.client() as client:
        client.infer("llm_reported", llm_inputs(sampling={"max_tokens": 4, "ignore_eos": True}))
        client.infer("llm_reported", llm_inputs(sampling={"max_tokens": 3, "n": 2, "ignore_eos": True}))
    _, after_samples = scrape(port)
    after = {name: _histogram(after_samples, name, "llm_reported") for name in names}

    def moved(name: str, key: str = "count") -> float:
        return after[name][key] - before[name][key]

    # One observation per output token after a request's first (3 + 5), not one per request.
    assert moved("vllm:time_per_output_token_seconds") == moved("vllm:inter_token_latency_seconds") == 8
    assert moved("vllm:request_prompt_tokens") == 2
    prompt_moved = value(after_samples, "vllm:prompt_tokens_total", **labels) - prompt_before
    assert moved("vllm:request_prompt_tokens", "sum") == prompt_moved > 0
    assert (moved("vllm:request_generation_tokens"), moved("vllm:request_generation_tokens", "sum")) == (
        2,
        10,
    )
    assert (moved("vllm:request_params_n"), moved("vllm:request_params_n", "sum")) == (2, 3)
    assert (moved("vllm:request_params_n", "1.0"), moved("vllm:request_params_n", "2.0")) == (1, 2)
    assert (moved("vllm:request_params_max_tokens"), moved("vllm:request_params_max_tokens", "sum")) == (2, 7)
    assert set(after["vllm:request_params_n"]) == {
        "count",
        "sum",
        "1.0",
        "2.0",
        "5.0",
        "10.0",
        "20.0",
        "+Inf",
    }
    token_bounds = [key for key in after["vllm:request_prompt_tokens"] if key not in ("count", "sum")]
    assert token_bounds[:6] == ["1.0", "2.0", "5.0", "10.0", "20.0", "50.0"]


def test_report_custom_metrics_switches_the_vllm_families(metered: ServerProcess) -> None:
    with metered.client() as client:
        client.infer("llm_quiet", llm_inputs(sampling={"max_tokens": 2}))
    text, samples = scrape(metrics_port(metered))
    quiet = [name for name, labels in samples if ("model", "llm_quiet") in labels]
    assert quiet and all(not name.startswith("vllm:") for name in quiet)
    assert (
        "pagedserve:engine_restarts_total",
        frozenset({("model", "llm_quiet"), ("version", "1")}),
    ) in samples
    assert value(samples, "vllm:num_requests_running", model="llm_reported", version="1") == 0
    assert 'nv_inference_request_success{model="llm_quiet",version="1"}' in text
