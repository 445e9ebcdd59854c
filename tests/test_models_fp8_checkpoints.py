"""Float8 checkpoints as published, loaded straight into the float8 matmul path.

Each test writes a tiny checkpoint itself from a random transformers model: the linear weights
quantized the way the format does (``weight`` in float8_e4m3fn, scale = max|w| / 448 per tensor, per
output channel or per block), the tensor names and ``quantization_config`` keys of transformers'
fine-grained FP8 integration (``quant_method: fp8``, ``weight_scale_inv``, ``weight_block_size``) and
of compressed-tensors (``float-quantized``, ``weight_scale``, ``input_scale``). The reference is the
same model with the dequantized weights (``q * scale``) in float32.

Per-channel scales are exactly what ``quantization=fp8`` computes from the dequantized weights (each
row's largest value is 448 times its scale), so that checkpoint must give the very tokens of the
online-quantized dequantized model. Per-tensor and block scales differ from per-row ones, so those are
held to the teacher-forced agreement of test_models_quantization against the float32 reference.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pagedserve.engine.llm import LLM
from pagedserve.engine.model_setup import build_model
from pagedserve.engine.registries import EngineRegistries
from pagedserve.models.layers.linear import ParallelLinear
from pagedserve.models.layers.quantization import FP8, FP8_MAX, fp8_block_linear, quantize_rows
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from .engine_helpers import (
    D32_DIMS,
    DEVICES,
    ENGINE_MODES,
    assert_pool_free,
    build_hf_checkpoint,
    engine_config,
    greedy,
    random_prompts,
    teacher_forced_agreement,
)

MAX_NEW = 16
FORCED_AGREEMENT = 0.65  # as test_models_quantization (measured 0.74-0.82 there)
LINEARS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
)
BLOCK = (32, 32)
CT_WEIGHTS = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
FORMATS = {
    "ct-channel": (
        "channel",
        ".weight_scale",
        {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {**CT_WEIGHTS, "strategy": "channel"},
                    "input_activations": {
                        "num_bits": 8,
                        "type": "float",
                        "strategy": "token",
                        "dynamic": True,
                    },
                }
            },
            "ignore": ["lm_head"],
            "quantization_status": "compressed",
        },
    ),
    "ct-tensor-static": (
        "tensor",
        ".weight_scale",
        {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {**CT_WEIGHTS, "strategy": "tensor"},
                    "input_activations": {
                        "num_bits": 8,
                        "type": "float",
                        "strategy": "tensor",
                        "dynamic": False,
                    },
                }
            },
            "ignore": ["lm_head"],
        },
    ),
    "fp8-tensor-static": (
        "tensor",
        ".weight_scale_inv",
        {"quant_method": "fp8", "activation_scheme": "static", "fmt": "e4m3", "weight_block_size": None},
    ),
    "fp8-block": (
        "block",
        ".weight_scale_inv",
        {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "weight_block_size": list(BLOCK),
        },
    ),
}


def _quantize(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight, scale as the format stores it, dequantized float32 weight)."""
    w = w.float()
    if scheme == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX  # [N, 1]
        full = scale
    elif scheme == "tensor":
        scale = w.abs().amax() / FP8_MAX  # a 0-d tensor
        full = scale
    else:
        n, k = w.shape
        bn, bk = BLOCK
        scale = w.reshape(n // bn, bn, k // bk, bk).abs().amax(dim=(1, 3)) / FP8_MAX  # [N/bn, K/bk]
        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale, q.float() * full


def _write(source, target, fmt: str, float_layers: tuple[str, ...] = ()):
    """The fp8 checkpoint of ``source`` in ``target`` and the dequantized float32 one beside it."""
    scheme, scale_suffix, config = FORMATS[fmt]
    tensors, dequantized = {}, {}
    for name, w in load_file(source / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS and module not in float_layers:
            q, scale, deq = _quantize(w, scheme)
            tensors |= {name: q, module + scale_suffix: scale.contiguous()}
            if "static" in fmt:  # a static activation scale, read and left unused
                key = ".input_scale" if fmt.startswith("ct") else ".activation_scale"
                tensors[module + key] = torch.tensor([0.05] if fmt.startswith("ct") else 0.05)
            dequantized[name] = deq
        else:
            tensors[name], dequantized[name] = w, w
    hf = json.loads((source / "config.json").read_text())
    reference = target.parent / (target.name + "-dequantized")
    for directory, weights, extra in (
        (target, tensors, {"quantization_config": config}),
        (reference, dequantized, {}),
    ):
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(hf | extra))
        shutil.copy(source / "generation_config.json", directory)
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return target, reference


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return {
        "llama": build_hf_checkpoint(tmp_path_factory.mktemp("llama"), "llama", seed=3, **D32_DIMS),
        "phi3": build_hf_checkpoint(
            tmp_path_factory.mktemp("phi3"), "phi3", seed=5, eos_token_id=2, pad_token_id=0, **D32_DIMS
        ),
    }


def _linears(llm: LLM) -> list[ParallelLinear]:
    return [m for m in llm.engine.runner.model.modules() if isinstance(m, ParallelLinear)]


def _prompts() -> list[list[int]]:
    return random_prompts([1 + (13 * i) % 60 for i in range(12)], 320, seed=1)


class _FullPrecisionAllocations(TorchDispatchMode):
    """Shapes of the floating-point tensors of more than one byte per element created inside."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype.is_floating_point and out.dtype.itemsize > 1:
            self.shapes.add(tuple(out.shape))
        return out


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_per_channel_checkpoint_gives_the_online_quantized_tokens(sources, tmp_path, arch):
    fp8, reference = _write(sources[arch], tmp_path / "fp8", "ct-channel")
    llm = LLM(engine_config(fp8))
    online = LLM(engine_config(reference, quantization="fp8"))
    for ours, theirs in zip(_linears(llm), _linears(online), strict=True):
        assert ours.weight.dtype == FP8 and torch.equal(
            ours.weight.view(torch.uint8), theirs.weight.view(torch.uint8)
        )
        assert torch.equal(ours.weight_scale, theirs.weight_scale)
    prompts = _prompts()
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(MAX_NEW))]
    assert got == [o.outputs[0].token_ids for o in online.generate(prompts, greedy(MAX_NEW))]
    assert_pool_free(llm.engine.block_manager)


@pytest.mark.parametrize("mode", ENGINE_MODES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fp8_checkpoint_loads_without_a_full_precision_copy(sources, tmp_path, fmt, mode):
    fp8, reference = _write(sources["llama"], tmp_path / "fp8", fmt)
    allocations = _FullPrecisionAllocations()
    with allocations:
        setup = build_model(engine_config(fp8, **mode), EngineRegistries.builtin().architectures)
    linears = [m for m in setup.model.modules() if isinstance(m, ParallelLinear)]
    assert len(linears) == 4 * 2 and all(m.weight.dtype == FP8 for m in linears)
    weight_shapes = {tuple(m.weight.shape) for m in linears}
    assert not weight_shapes & allocations.shapes, "a full-precision tensor of a linear weight's shape"
    if fmt == "fp8-block":
        assert all(
            m.weight_scale.shape == (-(-m.weight.shape[0] // 32), -(-m.weight.shape[1] // 32))
            for m in linears
        )

    prompts = _prompts()
    reference_llm = LLM(engine_config(reference, **mode))
    expected = [o.outputs[0].token_ids for o in reference_llm.generate(prompts, greedy(MAX_NEW))]
    llm = LLM(engine_config(fp8, **mode))
    agreement = teacher_forced_agreement(llm, prompts, expected)
    assert agreement >= FORCED_AGREEMENT, f"teacher-forced agreement {agreement:.3f}"


def test_a_layer_left_in_full_precision_is_quantized_per_row(sources, tmp_path):
    fp8, reference = _write(
        sources["llama"], tmp_path / "fp8", "ct-channel", ("model.layers.1.mlp.down_proj",)
    )
    llm = LLM(engine_config(fp8))
    online = LLM(engine_config(reference, quantization="fp8"))
    for ours, theirs in zip(_linears(llm), _linears(online), strict=True):
        assert torch.equal(ours.weight.view(torch.uint8), theirs.weight.view(torch.uint8))
        torch.testing.assert_close(ours.weight_scale, theirs.weight_scale, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 64), (9, 96, 128), (0, 64, 32), (5, 80, 64)])
def test_block_linear_is_the_product_of_its_quantized_operands(m, k, n, device):
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g) * 3
    weight = (torch.randn(n, k, generator=g) * 0.02).to(FP8)
    block_scales = torch.rand(-(-n // 32), -(-k // 32), generator=g) + 0.5  # [N/32, K/32]
    column_scales = block_scales.repeat_interleave(32, 0)[:n].t().contiguous()  # [K/32, N]
    bias = torch.randn(n, generator=g)
    on = [t.to(device) for t in (x, weight, column_scales, bias)]
    y = fp8_block_linear(on[0], on[1], on[2], 32, on[3]).cpu()
    xq, xs = (t.cpu() for t in quantize_rows(on[0]))
    w = weight.double() * block_scales.double().repeat_interleave(32, 0)[:n].repeat_interleave(32, 1)[:, :k]
    want = (xq.double() * xs.double()) @ w.T + bias.double()
    assert y.shape == (m, n) and y.dtype == torch.float32
    tol = 1e-2 if device == "cuda" else 1e-5  # on CUDA each block's product is rounded to bfloat16
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * (want.abs().max().item() if m else 0))


def _with_config(source, tmp_path, fmt: str, changes: dict):
    fp8, _ = _write(source, tmp_path / "fp8", fmt)
    hf = json.loads((fp8 / "config.json").read_text())
    for key, value in changes.items():
        node = hf["quantization_config"]
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    (fp8 / "config.json").write_text(json.dumps(hf))
    return fp8


@pytest.mark.parametrize(
    ("fmt", "changes", "message"),
    [
        ("fp8-block", {"quant_method": "awq"}, r"quant_method='awq' is not supported; supported: 'fp8'"),
        ("fp8-block", {"scale_fmt": "ue8m0"}, r"quantization_config.scale_fmt='ue8m0' is not supported"),
        ("fp8-block", {"fmt": "e5m2"}, r"quantization_config.fmt='e5m2' is not supported"),
        ("fp8-block", {"weight_block_size": [32, 20]}, r"weight_block_size=\[32, 20\]: the input block"),
        ("fp8-block", {"weight_block_size": [128, 0]}, r"weight_block_size=\[128, 0\] must be two positive"),
        ("fp8-block", {"weight_block_size": "128"}, r"weight_block_size='128' must be two positive"),
        ("fp8-block", {"weight_block_size": [64, 32]}, r"model.layers.0.mlp.down_proj.weight_scale_inv"),
        (
            "ct-channel",
            {"config_groups.group_0.weights.strategy": "group"},
            r"config_groups.group_0.weights.strategy='group' is not supported; supported: \['tensor'",
        ),
        (
            "ct-channel",
            {"config_groups.group_0.weights.type": "int"},
            r"config_groups.group_0.weights.type='int' is not supported",
        ),
        (
            "ct-channel",
            {"config_groups.group_0.input_activations.num_bits": 4},
            r"config_groups.group_0.input_activations.num_bits=4 is not supported",
        ),
        ("ct-channel", {"format": "pack-quantized"}, r"quantization_config.format='pack-quantized'"),
        ("ct-channel", {"kv_cache_scheme": {"num_bits": 8}}, r"kv_cache_scheme .* is not supported"),
        ("ct-channel", {"config_groups": {}}, r"config_groups is empty"),
    ],
)
def test_formats_we_cannot_run_fail_at_load_naming_the_key(sources, tmp_path, fmt, changes, message):
    with pytest.raises(ValueError, match=message):
        LLM(engine_config(_with_config(sources["llama"], tmp_path, fmt, changes)))


def _tamper(source, tmp_path, fmt: str, name: str, tensor: torch.Tensor | None):
    fp8, _ = _write(source, tmp_path / "fp8", fmt)
    tensors = load_file(fp8 / "model.safetensors")
    if tensor is None:
        del tensors[name]
    else:
        tensors[name] = tensor
    save_file(tensors, str(fp8 / "model.safetensors"))
    return fp8


@pytest.mark.parametrize(
    ("fmt", "name", "tensor", "error", "message"),
    [
        (
            "ct-channel",
            "model.layers.0.self_attn.k_proj.weight_scale",
            torch.ones(7, 1),
            ValueError,
            r"k_proj.weight_scale' \[7, 1\]: 7 scales for 64",
        ),
        (
            "ct-channel",
            "model.layers.0.self_attn.k_proj.weight_scale",
            None,
            ValueError,
            r"missing weights.*qkv_proj.weight_scale",
        ),
        (
            "ct-channel",
            "model.layers.0.self_attn.k_proj.weight",
            torch.zeros(64, 128, dtype=torch.float8_e5m2),
            ValueError,
            r"k_proj.weight' is torch.float8_e5m2",
        ),
        (
            "ct-channel",
            "model.layers.0.self_attn.k_proj.weight_zero_point",
            torch.zeros(64, 1),
            KeyError,
            r"k_proj.weight_zero_point' has no matching parameter",
        ),
        (
            "fp8-block",
            "model.layers.0.mlp.up_proj.weight",
            torch.zeros(96, 128),
            ValueError,
            r"full-precision weight in a block-scaled",
        ),
    ],
)
def test_bad_checkpoint_tensors_are_named(sources, tmp_path, fmt, name, tensor, error, message):
    with pytest.raises(error, match=message):
        LLM(engine_config(_tamper(sources["llama"], tmp_path, fmt, name, tensor)))


def test_float8_weights_without_a_quantization_config_are_refused(sources, tmp_path):
    fp8, _ = _write(sources["llama"], tmp_path / "fp8", "ct-channel")
    hf = json.loads((fp8 / "config.json").read_text())
    del hf["quantization_config"]
    (fp8 / "config.json").write_text(json.dumps(hf))
    with pytest.raises(
        ValueError, match=r"is torch.float8_e4m3fn but the model expects torch.float32.*quantization_config"
    ):
        LLM(engine_config(fp8))
