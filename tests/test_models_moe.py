"""Sparse mixture-of-experts architectures (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers.

Greedy decoding matches transformers ``generate`` token for token (float32, tiny random checkpoints
written by transformers' own ``save_pretrained``), on the paths the Llama parity tests cover: every
block size, prefix-cache hits, chunked prefill, preemption, and sliding windows shorter than the
prompts. Routing is checked against transformers'
routers on exact ties. Broken checkpoints fail at load with a message saying what is wrong, and through
the server the model answers the stock tritonclient while a broken one beside it stays UNAVAILABLE.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from pagedserve.engine.llm import LLM
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.models.hf_config import ModelArchConfig
from pagedserve.models.layers.moe import route
from pagedserve.models.tiny import ensure_tiny_llama
from safetensors.torch import load_file, save_file

from .conftest import start_server
from .engine_helpers import (
    D32_DIMS,
    MODEL_MODES,
    assert_pool_free,
    build_hf_checkpoint,
    engine_config,
    hf_greedy,
    random_prompts,
)

MAX_NEW = 12
QWEN_MOE = {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}
CHECKPOINTS = {
    # 4 experts, top 2, renormalised
    "mixtral": ("mixtral", {"num_local_experts": 4}),
    # layer 0 dense (decoder_sparse_step 2), layer 1 experts + sigmoid-gated shared expert, top 2 of 6
    # without renormalisation
    "qwen2-moe": (
        "qwen2_moe",
        {"num_experts": 6, "num_experts_per_tok": 2, "decoder_sparse_step": 2, **QWEN_MOE},
    ),
    # top 3 of 8, renormalised, q/k norm; layer 1 dense (mlp_only_layers)
    "qwen3-moe": (
        "qwen3_moe",
        {
            "num_experts": 8,
            "num_experts_per_tok": 3,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
            "moe_intermediate_size": 40,
        },
    ),
    # Sliding windows shorter than the prompts: Mixtral every layer, Qwen2-MoE the layers of its
    # layer_types (here layer 0), Qwen3-MoE every layer
    "mixtral-w6": ("mixtral", {"num_local_experts": 4, "sliding_window": 6}),
    "qwen2-moe-w5": (
        "qwen2_moe",
        {
            "num_experts": 4,
            "use_sliding_window": True,
            "sliding_window": 5,
            "max_window_layers": 2,
            **QWEN_MOE,
        },
    ),
    "qwen3-moe-w7": (
        "qwen3_moe",
        {"num_experts": 4, "num_experts_per_tok": 2, "use_sliding_window": True, "sliding_window": 7},
    ),
    # Head sizes the Triton attention serves, so GPU runs take both Triton paths.
    "mixtral-d32": ("mixtral", {"num_local_experts": 8, **D32_DIMS}),
    "qwen3-moe-d64": (
        "qwen3_moe",
        {
            "num_experts": 16,
            "num_experts_per_tok": 4,
            "norm_topk_prob": True,
            "hidden_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 64,
            "moe_intermediate_size": 64,
        },
    ),
}
MODES = MODEL_MODES


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {
        name: build_hf_checkpoint(tmp_path_factory.mktemp(name), arch, seed=len(name), **overrides)
        for name, (arch, overrides) in CHECKPOINTS.items()
    }


def _prompts(shared_prefix: bool) -> list[list[int]]:
    if shared_prefix:
        prefix = random_prompts([37], 320, seed=99)[0]
        return random_prompts([1, 5, 16, 23], 320, seed=5, prefix=prefix)
    return random_prompts([1, 7, 16, 33, 50], 320, seed=4)


_expected: dict = {}


def _check(checkpoint, prompts, mode: dict | None = None, **config) -> LLM:  # noqa: ANN001
    key = (str(checkpoint), tuple(map(tuple, prompts)))
    if key not in _expected:
        _expected[key] = hf_greedy(checkpoint, prompts, MAX_NEW)
    mode = dict(mode or {})
    overlap = mode.pop("overlap", None)
    llm = LLM(engine_config(checkpoint, **mode, **config))
    if overlap is not None:
        llm.engine.overlap = overlap
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    assert [o.outputs[0].token_ids for o in outputs] == _expected[key]
    assert_pool_free(llm.engine.block_manager)
    return llm


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("block_size", [1, 16])
def test_greedy_matches_transformers(checkpoints, name, block_size, mode):
    _check(checkpoints[name], _prompts(shared_prefix=False), mode, block_size=block_size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "mixtral-d32", "mixtral-w6"])
def test_prefix_cache_hits_give_the_same_tokens(checkpoints, name, mode):
    prompts = _prompts(shared_prefix=True)
    llm = _check(checkpoints[name], prompts, mode, block_size=8)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    assert llm.engine.block_usage().hit_rate > 0.3
    _check(checkpoints[name], prompts, mode, block_size=8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["qwen2-moe", "qwen3-moe", "qwen3-moe-d64", "qwen2-moe-w5"])
def test_chunked_prefill_gives_the_same_tokens(checkpoints, name, mode):
    llm = _check(
        checkpoints[name], _prompts(shared_prefix=False), mode, block_size=16, max_num_batched_tokens=7
    )
    assert llm.engine.block_manager.usage().num_queried_tokens > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "qwen2-moe-w5"])
def test_preemption_gives_the_same_tokens(checkpoints, name, mode):
    llm = _check(checkpoints[name], _prompts(shared_prefix=False), mode, block_size=8, num_blocks=9)
    assert llm.engine.scheduler.num_preemptions > 0


# --- routing ---------------------------------------------------------------------------------------


def _tied_logits() -> torch.Tensor:
    """Rows whose top-k boundary falls inside a tie: all equal, a tie for second place, a three-way
    tie for first, and exact duplicates among non-selected experts."""
    return torch.tensor(
        [
            [0.0] * 6,
            [3.0, 1.0, 1.0, 1.0, -2.0, 0.5],
            [2.0, -1.0, 2.0, 0.0, 2.0, 0.0],
            [-1.0, -1.0, 4.0, -1.0, -1.0, 3.0],
            [1.5, 0.25, 0.25, 1.5, 0.25, 0.25],
        ]
    )


def _hf_router(kind: str, top_k: int, norm_topk_prob: bool, logits: torch.Tensor):  # noqa: ANN202
    """A transformers router whose logits for the one-hot rows of an identity input are ``logits``."""
    import transformers
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.qwen2_moe import modeling_qwen2_moe

    num_rows, num_experts = logits.shape
    if kind == "mixtral":
        config = transformers.MixtralConfig(
            hidden_size=num_rows, num_local_experts=num_experts, num_experts_per_tok=top_k
        )
        router = modeling_mixtral.MixtralTopKRouter(config)
    else:
        config = transformers.Qwen2MoeConfig(
            hidden_size=num_rows,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=norm_topk_prob,
        )
        router = modeling_qwen2_moe.Qwen2MoeTopKRouter(config)
    with torch.no_grad():
        router.weight.copy_(logits.T)  # input row e_i gives logits[i] exactly
    return router


@pytest.mark.parametrize(
    ("kind", "top_k", "norm"),
    [("mixtral", 2, True), ("qwen", 2, False), ("qwen", 3, True), ("qwen", 1, False)],
)
def test_routing_matches_transformers_on_ties(kind, top_k, norm):
    logits = _tied_logits()
    router = _hf_router(kind, top_k, norm, logits)
    with torch.no_grad():
        hf_logits, hf_weights, hf_ids = router(torch.eye(logits.shape[0]))
    assert torch.equal(hf_logits, logits)
    weights, ids = route(logits, top_k, renormalize=norm)
    assert torch.equal(ids, hf_ids), "a tied expert was chosen differently"
    assert torch.equal(weights, hf_weights.float()), "weights differ from transformers' bit for bit"
    if norm:
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(logits)))


def test_routing_ties_everywhere_still_match_transformers(tmp_path):
    """A checkpoint whose routers are all zero: every token ties across all experts in every layer."""
    directory = build_hf_checkpoint(tmp_path / "m", "qwen3_moe", seed=3, **CHECKPOINTS["qwen3-moe"][1])
    tensors = load_file(directory / "model.safetensors")
    for name in [n for n in tensors if n.endswith("mlp.gate.weight")]:
        tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    _check(directory, _prompts(shared_prefix=False))


# --- loading -------------------------------------------------------------------------------------


def test_expert_weights_land_in_the_stacked_tensors(checkpoints):
    llm = LLM(engine_config(checkpoints["mixtral"]))
    moe = llm.engine.runner.model.model.layers[1].block_sparse_moe
    tensors = load_file(checkpoints["mixtral"] / "model.safetensors")
    p = "model.layers.1.block_sparse_moe."
    for e in range(4):
        gate, up = moe.w13.weight[e].chunk(2)
        assert torch.equal(gate, tensors[f"{p}experts.{e}.w1.weight"])
        assert torch.equal(up, tensors[f"{p}experts.{e}.w3.weight"])
        assert torch.equal(moe.w2.weight[e], tensors[f"{p}experts.{e}.w2.weight"])


def test_a_missing_expert_matrix_is_reported(checkpoints, tmp_path):
    directory = tmp_path / "m"
    shutil.copytree(checkpoints["qwen2-moe"], directory)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing weights.*layers\.1\.mlp\.w13"):
        LLM(engine_config(directory))


def test_an_expert_beyond_num_experts_is_reported(checkpoints, tmp_path):
    directory = tmp_path / "m"
    shutil.copytree(checkpoints["mixtral"], directory)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = torch.zeros(96, 64)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(KeyError, match=r"experts\.4\.w1"):
        LLM(engine_config(directory))


def _with_config(source, tmp_path, **changes):  # noqa: ANN001, ANN202
    directory = tmp_path / "m"
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"num_experts_per_tok": 5},
            r"num_experts_per_tok \(5\) must be between 1 and the number of experts \(4\)",
        ),
        ({"num_experts_per_tok": 0}, r"num_experts_per_tok \(0\) must be between 1"),
        ({"num_experts_per_tok": 10**12}, r"num_experts_per_tok \(1000000000000\) must be between"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ],
)
def test_an_impossible_moe_config_fails_at_load(checkpoints, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        LLM(engine_config(_with_config(checkpoints["mixtral"], tmp_path, **changes)))


def test_qwen_moe_config_keys_are_read():
    hf = json.loads(json.dumps({
        "architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 4, "num_attention_heads": 2, "num_experts": 60, "num_experts_per_tok": 4,
        "moe_intermediate_size": 12, "shared_expert_intermediate_size": 20, "decoder_sparse_step": 2,
        "mlp_only_layers": [3], "norm_topk_prob": False,
    }))  # fmt: skip
    moe = ModelArchConfig.from_hf(hf).moe
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.shared_expert_intermediate_size) == (
        60,
        4,
        12,
        20,
    )
    assert moe.norm_topk_prob is False
    assert [moe.is_sparse_layer(i) for i in range(4)] == [False, True, False, False]
    assert ModelArchConfig.from_hf({**hf, "num_experts": 0}).moe is None  # dense


def test_fp8_quantization_is_refused_clearly(checkpoints):
    with pytest.raises(ValueError, match="MixtralForCausalLM: quantization=fp8 is not supported yet"):
        LLM(engine_config(checkpoints["mixtral"], quantization="fp8"))


def test_a_float8_moe_checkpoint_is_refused_before_loading(checkpoints, tmp_path):
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    directory = _with_config(checkpoints["qwen2-moe"], tmp_path, quantization_config=fp8)
    (directory / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ValueError, match="float8 checkpoints of mixture-of-experts models are not supported"):
        LLM(engine_config(directory))


def test_dummy_weights_serve_a_moe_shape(checkpoints, tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    shutil.copy(checkpoints["qwen2-moe"] / "config.json", directory / "config.json")
    llm = LLM(engine_config(directory, load_format="dummy"))
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_unsupported_architectures_list_the_moe_ones(checkpoints, tmp_path):
    directory = _with_config(checkpoints["mixtral"], tmp_path, architectures=["DeepseekV3ForCausalLM"])
    with pytest.raises(
        ValueError, match="not supported.*MixtralForCausalLM.*Qwen2MoeForCausalLM.*Qwen3MoeForCausalLM"
    ):
        LLM(engine_config(directory))


# --- through the server ----------------------------------------------------------------------------


def _servable(tmp_path, name: str, seed: int, **overrides):  # noqa: ANN001, ANN202
    """A tiny Mixtral with tiny-llama's tokenizer (vocab 512), so text goes in and out."""
    directory = build_hf_checkpoint(
        tmp_path / name, "mixtral", seed=seed, vocab_size=512, num_local_experts=4
    )
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_tiny_llama() / file, directory / file)
    config = json.loads((directory / "config.json").read_text())
    config.update(bos_token_id=0, eos_token_id=1, **overrides)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_served_through_tritonclient_beside_a_broken_moe_checkpoint(tmp_path):
    import tritonclient.grpc as grpcclient
    from tokenizers import Tokenizer

    good = _servable(tmp_path, "good", seed=1)
    broken = _servable(tmp_path, "broken", seed=2, num_experts_per_tok=9)
    repository = tmp_path / "repo"
    repository.mkdir()
    for name, directory in (("tiny-mixtral", good), ("broken-mixtral", broken)):
        (repository / f"{name}.yaml").write_text(
            f"backend: llm\nmax_batch_size: 0\nparameters:\n  weights: {directory}\n"
        )
    prompt = "The scheduler hands out tokens"
    tokenizer = Tokenizer.from_file(str(good / "tokenizer.json"))
    prompt_ids = tokenizer.encode(prompt).ids
    expected = hf_greedy(good, [prompt_ids], 8)[0]

    server = start_server(
        f"repository={repository}", "server.exit_on_error=false", "cache.num_blocks=64", wait_ready=False
    )
    try:
        with server.client() as client:
            _wait_loaded(client, "tiny-mixtral")
            sampling = json.dumps({"temperature": 0, "max_tokens": 8})
            result = client.infer("tiny-mixtral", _llm_inputs(grpcclient, prompt, sampling))
            text = result.as_numpy("text_output")[0].decode()
            assert text == tokenizer.decode(expected, skip_special_tokens=True)
            assert not client.is_model_ready("broken-mixtral")
            index = {m.name: m for m in client.get_model_repository_index().models}
            assert (
                "num_experts_per_tok (9) must be between 1 and the number of experts (4)"
                in index["broken-mixtral"].reason
            )
            assert client.is_model_ready("tiny-mixtral")  # still serving
    finally:
        assert server.stop() == 0


def _wait_loaded(client, name: str, timeout: float = 120.0) -> None:  # noqa: ANN001
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.is_model_ready(name):
                return
        except Exception:  # noqa: BLE001 - UNAVAILABLE while the start-up loads run
            pass
        assert time.monotonic() < deadline, f"{name} did not become ready"
        time.sleep(0.2)


def _llm_inputs(grpcclient, prompt: str, sampling: str) -> list:  # noqa: ANN001
    def tensor(name: str, value: object, datatype: str):  # noqa: ANN202
        t = grpcclient.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else bool))
        return t

    return [
        tensor("text_input", prompt.encode(), "BYTES"),
        tensor("sampling_parameters", sampling.encode(), "BYTES"),
        tensor("stream", False, "BOOL"),
        tensor("exclude_input_in_output", True, "BOOL"),
    ]


def test_the_moe_benchmark_runs_on_a_tiny_shape():
    from pagedserve.benchmarks import moe

    rows = moe.main(["--tiny", "--num-requests", "2", "--device", "cpu", "--hf-batch-size", "2"])
    assert [r.system for r in rows] == ["pagedserve", "hf_generate"]
    assert rows[0].output_tokens == rows[1].output_tokens > 0
