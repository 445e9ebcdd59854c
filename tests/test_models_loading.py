"""Loading: sharded safetensors, tied embeddings, dummy weights, the tiny model, rope config formats."""

from __future__ import annotations

import json

import pytest
import torch
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm import LLM
from pagedserve.engine.registries import EngineRegistries
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.models.hf_config import ModelArchConfig, RopeConfig
from pagedserve.models.tiny import ensure_tiny_llama

from .engine_helpers import build_hf_checkpoint, engine_config, hf_greedy, random_prompts


def test_sharded_checkpoint_loads_and_matches(tmp_path):
    import transformers

    directory = build_hf_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    prompts = random_prompts([6, 11], 320, seed=1)
    out = LLM(engine_config(tmp_path / "sharded")).generate(
        prompts, SamplingParams(temperature=0, max_tokens=8)
    )
    assert [o.outputs[0].token_ids for o in out] == hf_greedy(directory, prompts, 8)


def test_missing_weights_are_reported(tmp_path):
    directory = build_hf_checkpoint(tmp_path / "m", "llama")
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ValueError, match="missing weights.*gate_up_proj"):
        LLM(engine_config(directory))


def test_missing_model_directory_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="set model to a Hugging Face model directory"):
        LLM(engine_config(tmp_path / "nothing"))


def test_dummy_weights_need_only_a_config(tmp_path):
    directory = build_hf_checkpoint(tmp_path / "m", "qwen3")
    (directory / "model.safetensors").unlink()
    llm = LLM(engine_config(directory, load_format="dummy"))
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4


def test_tiny_llama_is_deterministic_and_fast(tmp_path):
    a = ensure_tiny_llama(tmp_path / "a")
    b = ensure_tiny_llama(tmp_path / "b")
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert ensure_tiny_llama(a) == a  # reused, not rebuilt
    llm = LLM(EngineConfig(model=str(a), device="cpu"))
    out = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].text
    assert llm.engine.eos_token_ids == frozenset({1})


def test_rope_settings_in_both_config_formats():
    new = {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
        }
    }
    old = {
        "rope_theta": 5e5,
        "rope_scaling": {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
    }
    assert RopeConfig.from_hf(new) == RopeConfig.from_hf(old)
    assert RopeConfig.from_hf(new).type == "llama3" and RopeConfig.from_hf({}).theta == 10000.0


def test_unknown_architecture_is_named(tmp_path):
    directory = build_hf_checkpoint(tmp_path / "m", "llama")
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    with pytest.raises(ValueError, match="'MambaForCausalLM' is not supported.*LlamaForCausalLM"):
        from pagedserve.models.registry import resolve_architecture

        resolve_architecture(EngineRegistries.builtin().architectures, ModelArchConfig.from_hf(config))


def test_builtin_registries():
    registries = EngineRegistries.builtin()
    assert set(registries.scheduling_policies) == {"fcfs", "priority", "shortest_prompt"}
    assert "torch" in registries.attention_backends
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= set(registries.architectures)


def test_llama3_8b_shape_builds_without_files():
    from pagedserve.models.presets import resolve_model_source

    source = resolve_model_source("llama3-8b", "dummy")
    arch = ModelArchConfig.from_hf(source.hf_config)
    assert source.directory is None and (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (32, 8, 128)
    with torch.device("meta"):
        from pagedserve.models.llama import LlamaForCausalLM

        model = LlamaForCausalLM(arch)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
