"""Tensor parallelism (``engine.tensor_parallel_size``): gloo between CPU processes here, NCCL between
GPUs on a machine with two or more (marker ``multigpu``).

Greedy output of two ranks must be token for token the output of one (float32, tiny random
checkpoints of Llama, Qwen2 and Qwen3, the last with one key/value head that both ranks replicate),
through prefix-cache hits, chunked prefills, preemption and copy-on-write; a server with two ranks
answers through tritonclient; a rank that dies fails the requests in flight and never hangs them;
sizes the model or machine cannot split fail at start naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import tritonclient.grpc as grpcclient
from pagedserve.config import EngineSettings
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm import LLM
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.tensor_parallel import check_tensor_parallel
from pagedserve.models.hf_config import ModelArchConfig
from pagedserve.models.tiny import CONFIG as TINY_CONFIG
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, start_server
from .engine_helpers import assert_pool_free, build_hf_checkpoint, engine_config, random_prompts

MAX_NEW = 10
KEY = "engine.tensor_parallel_size"
CHECKPOINTS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases, split with their rows
    # one key/value head for two ranks (replicated), tied embeddings, a vocabulary two ranks pad
    "qwen3": ("qwen3", {"num_key_value_heads": 1, "tie_word_embeddings": True, "vocab_size": 321}),
}
multigpu = [
    pytest.mark.multigpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        name: build_hf_checkpoint(tmp_path_factory.mktemp(name), arch, seed=7, **overrides)
        for name, (arch, overrides) in CHECKPOINTS.items()
    }


def worker_processes(parent: int | None = None) -> list[psutil.Process]:
    children = psutil.Process(parent or os.getpid()).children(recursive=True)
    return [c for c in children if "pagedserve.engine.tp_worker" in " ".join(c.cmdline())]


def _run(checkpoint: Path, tp: int, device: str = "cpu") -> tuple[list[list[int]], LLM]:
    """Shared-prefix prompts twice (the second pass hits the prefix cache), prefills chunked to 16
    tokens, too few blocks for all at once (preemption), and one greedy ``n=2`` request whose two
    sequences share a partly filled block (copy-on-write)."""
    llm = LLM(
        engine_config(
            checkpoint,
            block_size=8,
            num_blocks=14,
            max_num_batched_tokens=16,
            device=device,
            tensor_parallel_size=tp,
        )
    )
    prefix = random_prompts([29], 320, seed=3)[0]
    prompts = random_prompts([1, 6, 13, 22], 320, seed=4, prefix=prefix)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    tokens = []
    for _ in range(2):
        tokens += [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    forked = llm.generate([prompts[1]], dataclasses.replace(greedy, n=2))[0]
    tokens += [c.token_ids for c in forked.outputs]
    assert_pool_free(llm.engine.block_manager)
    return tokens, llm


def _close(llm: LLM) -> None:
    if llm.engine.workers is not None:
        llm.engine.workers.close()


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_two_ranks_match_one_token_for_token(checkpoints: dict[str, Path], name: str) -> None:
    expected, single = _run(checkpoints[name], tp=1)
    got, llm = _run(checkpoints[name], tp=2)
    try:
        assert got == expected
        engine = llm.engine
        assert engine.scheduler.num_preemptions > 0
        assert engine.block_usage().num_hit_tokens > 0
        assert engine.runner.model.workers is engine.workers  # the steps really went through two ranks
        # each rank holds its share of the heads: half the query heads, the key/value heads halved
        # or (one head) replicated
        layer = engine.runner.model.shard.attention_layers()[0]
        full = single.engine.runner.model.attention_layers()[0]
        assert layer.num_heads * 2 == full.num_heads
        assert layer.num_kv_heads == max(1, full.num_kv_heads // 2)
    finally:
        _close(llm)
    assert not worker_processes()


@pytest.mark.slow
def test_four_ranks_replicate_key_value_heads_and_match_one(checkpoints: dict[str, Path]) -> None:
    expected, _ = _run(checkpoints["llama"], tp=1)  # 4 query heads, 2 key/value heads
    got, llm = _run(checkpoints["llama"], tp=4)
    try:
        assert got == expected
    finally:
        _close(llm)


def test_each_rank_reads_only_its_slices(checkpoints: dict[str, Path], monkeypatch) -> None:  # noqa: ANN001
    """Rank 0 of two reads about half of the checkpoint (the worker is another process)."""
    from pagedserve.models import checkpoint_slice
    from safetensors import safe_open

    read: list[int] = []
    original = checkpoint_slice.CheckpointSlice.materialize

    def counting(self: checkpoint_slice.CheckpointSlice) -> torch.Tensor:
        tensor = original(self)
        read.append(tensor.numel())
        return tensor

    monkeypatch.setattr(checkpoint_slice.CheckpointSlice, "materialize", counting)
    llm = LLM(engine_config(checkpoints["llama"], tensor_parallel_size=2))
    _close(llm)
    with safe_open(str(checkpoints["llama"] / "model.safetensors"), "pt") as f:
        checkpoint = sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())  # noqa: SIM118
    params = sum(p.numel() for p in llm.engine.runner.model.shard.parameters())
    assert sum(read) == params  # nothing read twice, or read and thrown away
    assert params < 0.52 * checkpoint  # half of every tensor but the norms


# ---- bad configurations ------------------------------------------------------------------------------


def test_a_size_below_one_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="engine.tensor_parallel_size must be a positive integer"):
        EngineSettings(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="engine.tensor_parallel_size must be a positive integer"):
        EngineConfig(model="tiny-llama", tensor_parallel_size=-2)


@pytest.mark.parametrize(
    ("size", "code", "message"),
    [
        ("0", 2, "engine.tensor_parallel_size must be a positive integer, got 0"),
        ("3", 1, "engine.tensor_parallel_size=3 does not divide the model's 4 attention heads"),
    ],
)
def test_serve_refuses_a_bad_size_naming_the_key(size: str, code: int, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve", "check=true", "model=tiny-llama", f"{KEY}={size}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stdout + result.stderr


def test_a_size_that_does_not_divide_the_heads_fails_before_any_worker_starts() -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide the model.s 4 attention"):
        LLM(engine_config("tiny-llama", tensor_parallel_size=3))
    assert not worker_processes()


def test_key_value_heads_must_divide_or_be_replicated_evenly() -> None:
    arch = dataclasses.replace(ModelArchConfig.from_hf(TINY_CONFIG), num_heads=12, num_kv_heads=4)
    check_tensor_parallel(arch, 2, torch.device("cpu"))  # two heads each
    check_tensor_parallel(arch, 12, torch.device("cpu"))  # each head on three ranks
    with pytest.raises(ValueError, match=r"tensor_parallel_size=6 must divide the model's 4 key/value"):
        check_tensor_parallel(arch, 6, torch.device("cpu"))


def test_more_ranks_than_visible_gpus_is_refused(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    arch = ModelArchConfig.from_hf(TINY_CONFIG)
    check_tensor_parallel(arch, 2, torch.device("cuda"))
    with pytest.raises(ValueError, match=r"=2 needs 2 GPUs from cuda:1 \(one per rank\); 2 are"):
        check_tensor_parallel(arch, 2, torch.device("cuda:1"))
    with pytest.raises(ValueError, match="tensor_parallel_size=4 needs 4 GPUs"):
        check_tensor_parallel(arch, 4, torch.device("cuda:0"))


def test_a_layer_that_cannot_be_split_fails_the_load_and_stops_the_workers(tmp_path: Path) -> None:
    checkpoint = build_hf_checkpoint(tmp_path, "llama", intermediate_size=95)
    with pytest.raises(ValueError, match=r"engine.tensor_parallel_size=2: .*\(95\) is not divisible"):
        LLM(engine_config(checkpoint, tensor_parallel_size=2))
    deadline = time.monotonic() + 30
    while worker_processes():
        assert time.monotonic() < deadline, worker_processes()
        time.sleep(0.1)


# ---- through the server ------------------------------------------------------------------------------

WAIT = 120.0


@pytest.fixture(scope="module")
def tp_server() -> Iterator[ServerProcess]:
    server = start_server(
        "model=tiny-llama",
        "engine.tensor_parallel_size=2",
        "engine.cpu_threads=1",
        "cache.num_blocks=256",
    )
    yield server
    server.stop()


def _inputs(prompt: str, max_tokens: int, stream: bool = True) -> list[grpcclient.InferInput]:
    sampling = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    tensors = []
    for name, data, datatype in (
        ("text_input", prompt.encode(), "BYTES"),
        ("stream", stream, "BOOL"),
        ("sampling_parameters", json.dumps(sampling).encode(), "BYTES"),
    ):
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_ if datatype == "BYTES" else bool))
        tensors.append(tensor)
    return tensors


def test_a_two_rank_server_answers_as_one_rank_does(tp_server: ServerProcess) -> None:
    prompt = "The scheduler hands out tokens"
    with tp_server.client() as client:
        result = client.infer("tiny-llama", _inputs(prompt, 12, stream=False))
    text = result.as_numpy("text_output")[0].decode()
    single = LLM(engine_config("tiny-llama"))
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert text == prompt + single.generate([prompt], greedy)[0].outputs[0].text
    assert len(worker_processes(tp_server.process.pid)) == 1


def test_a_dead_rank_fails_the_requests_in_flight_and_the_engine_restarts(tp_server: ServerProcess) -> None:
    results: queue.Queue = queue.Queue()
    client = tp_server.client()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("tiny-llama", _inputs("kill a rank", 1500), request_id="k")
        results.get(timeout=WAIT)  # generating
        (worker,) = worker_processes(tp_server.process.pid)
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT
        while True:  # the stream ends with an error, never hangs
            result, error = results.get(timeout=max(0.0, deadline - time.monotonic()))
            if error is not None:
                break
            assert not result.get_response().parameters["triton_final_response"].bool_param
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    assert f"tensor-parallel rank 1 (pid {worker.pid}) exited with code -9" in error.message()
    with tp_server.client() as client:  # a new engine process with a new worker takes over
        result = _infer_retrying_unavailable(client, "after the crash")
        assert result.as_numpy("text_output")[0].decode().startswith("after the crash")
        assert client.is_model_ready("tiny-llama")
    assert [w.pid for w in worker_processes(tp_server.process.pid)] != [worker.pid]


def _infer_retrying_unavailable(
    client: grpcclient.InferenceServerClient, prompt: str
) -> grpcclient.InferResult:
    """A request sent while the broken engine process was still exiting is refused UNAVAILABLE
    ("retry"), as a client would, retry it."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            return client.infer("tiny-llama", _inputs(prompt, 4, stream=False))
        except InferenceServerException as error:
            if error.status() != "StatusCode.UNAVAILABLE" or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
def test_a_dead_rank_of_an_engine_thread_makes_the_model_unavailable() -> None:
    """Without an engine process nothing restarts the ranks: the model reports UNAVAILABLE, with the
    reason, and the server goes on serving its other models."""
    server = start_server(
        "model=[tiny-llama,repeat_int32]",
        "engine.tensor_parallel_size=2",
        "engine.separate_process=false",
        "engine.cpu_threads=1",
        "cache.num_blocks=256",
    )
    try:
        (worker,) = worker_processes(server.process.pid)
        os.kill(worker.pid, signal.SIGKILL)
        with server.client() as client:
            with pytest.raises(Exception, match="tensor-parallel rank 1") as failed:
                client.infer("tiny-llama", _inputs("after the crash", 4, stream=False))
            assert "UNAVAILABLE" in str(failed.value)
            assert not client.is_model_ready("tiny-llama")
            reason = client.get_model_repository_index(as_json=True)["models"]
            assert any("tensor-parallel rank" in m.get("reason", "") for m in reason), reason
            assert client.is_server_live()
            assert client.is_model_ready("repeat_int32")
    finally:
        server.stop()


# ---- NCCL (two GPUs or more) ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=multigpu)])
def test_two_gpus_match_one_token_for_token(checkpoints: dict[str, Path], name: str, device: str) -> None:
    expected, _ = _run(checkpoints[name], tp=1, device=device)
    got, llm = _run(checkpoints[name], tp=2, device=device)
    try:
        assert got == expected
        assert torch.distributed.get_backend() == "nccl"
    finally:
        _close(llm)
