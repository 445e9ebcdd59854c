"""Fused Triton kernels (RMSNorm + residual, SiLU·mul, rotary, float8 row quantization) against the
layers' PyTorch code.

On CUDA they run compiled (``gpu`` marker, bf16 and float32, Llama-3-8B widths). Without CUDA, a test
re-runs this module in a child pytest with ``TRITON_INTERPRET=1`` (which must be set before triton is
first imported), where the kernels run on Triton's CPU interpreter at small sizes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.models.hf_config import RopeConfig  # noqa: E402
from pagedserve.models.layers import fused  # noqa: E402
from pagedserve.models.layers.rotary import RotaryEmbedding  # noqa: E402

ON_GPU = torch.cuda.is_available()
INTERPRETED = not ON_GPU and fused._interpreting()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_kernels = pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="runs in the interpreter child")
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


@pytest.mark.slow  # the Triton interpreter: 36-90 s on two cores
@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="kernel tests run in this process")
def test_cpu_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-m", "not gpu", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "14 passed" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]  # every small kernel test ran


def _reference_norm(x, weight, eps, residual=None):
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, x


def _assert_mostly_equal(got, want, dtype):
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def _check_rms_norm(rows, cols, dtype):
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=g).to(dtype).to(DEVICE)
    residual = torch.randn(rows, cols, generator=g).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(cols, generator=g)).to(dtype).to(DEVICE)
    want, want_sum = _reference_norm(x, weight, 1e-5)
    _assert_mostly_equal(fused.rms_norm(x, weight, 1e-5), want, dtype)
    want, want_sum = _reference_norm(x, weight, 1e-5, residual)
    got_residual = residual.clone()
    got = fused.rms_norm(x, weight, 1e-5, got_residual)
    assert torch.equal(got_residual, want_sum)  # one rounding of the sum, like PyTorch
    _assert_mostly_equal(got, want, dtype)


def _check_silu_and_mul(rows, cols, dtype):
    x = torch.randn(rows, 2 * cols, generator=torch.Generator().manual_seed(cols)).to(dtype).to(DEVICE)
    gate, up = x.chunk(2, dim=-1)
    _assert_mostly_equal(fused.silu_and_mul(x), torch.nn.functional.silu(gate) * up, dtype)


def _check_rotary(tokens, num_q, num_k, head_dim, dtype):
    rope = RopeConfig(type="default", theta=10000.0)
    with torch.device(DEVICE):
        rotary = RotaryEmbedding(head_dim, 4096, rope)
    g = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(tokens, (num_q + 2 * num_k) * head_dim, generator=g).to(dtype).to(DEVICE)
    q = qkv[:, : num_q * head_dim].view(tokens, num_q, head_dim)  # strided views, as in the model
    k = qkv[:, num_q * head_dim : (num_q + num_k) * head_dim].view(tokens, num_k, head_dim)
    positions = torch.randint(0, 4096, (tokens,), generator=g).to(torch.int32).to(DEVICE)
    cos = rotary.cos_cache[positions.long()][:, None, :]
    sin = rotary.sin_cache[positions.long()][:, None, :]

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    want_q, want_k, v_before = rotate(q), rotate(k), qkv[:, (num_q + num_k) * head_dim :].clone()
    fused.rotary_(positions, q, k, rotary.cos_cache, rotary.sin_cache)
    _assert_mostly_equal(q, want_q, dtype)
    _assert_mostly_equal(k, want_k, dtype)
    assert torch.equal(qkv[:, (num_q + num_k) * head_dim :], v_before)  # v untouched


def _assert_quantized(q, scale, y):
    """``(q, scale)`` is ``y`` quantized per row as quantization.quantize_rows specifies."""
    from pagedserve.models.layers.quantization import FP8, FP8_MAX, MIN_SCALE

    y = y.float()
    want_scale = (y.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    want = (y / want_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    assert q.dtype == FP8 and scale.shape == (y.shape[0], 1)
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    # the kernel's float32 division may differ from PyTorch's in the last bit, which can move a
    # value sitting on a rounding boundary by one e4m3 step; nothing moves further
    got, ref = q.float(), want.float()
    assert ((got - ref).abs() <= ref.abs() / 8 + 2**-9).all()
    assert (got == ref).float().mean() > 0.99


def _check_quantize_rows(rows, cols, dtype):
    from pagedserve.models.layers.quantization import FP8_ROWS

    g = torch.Generator().manual_seed(rows + cols)
    x = (torch.randn(rows, cols, generator=g) * torch.logspace(-2, 2, rows)[:, None]).to(dtype)
    x[rows // 2] = 0.0
    x = x.to(DEVICE)
    _assert_quantized(*fused.quantize_rows(x, FP8_ROWS), x)
    # the norm and SiLU·mul quantizing their own result: the same rows as the plain kernel's, quantized
    weight = (1 + 0.1 * torch.randn(cols, generator=g)).to(dtype).to(DEVICE)
    residual = torch.randn(rows, cols, generator=g).to(dtype).to(DEVICE)
    plain_residual, quantized_residual = residual.clone(), residual.clone()
    plain = fused.rms_norm(x, weight, 1e-5, plain_residual)
    _assert_quantized(*fused.rms_norm(x, weight, 1e-5, quantized_residual, FP8_ROWS), plain)
    assert torch.equal(quantized_residual, plain_residual)
    _assert_quantized(*fused.rms_norm(x, weight, 1e-5, None, FP8_ROWS), fused.rms_norm(x, weight, 1e-5))
    gate_up = torch.cat([x, residual], dim=1)
    _assert_quantized(*fused.silu_and_mul(gate_up, FP8_ROWS), fused.silu_and_mul(gate_up))


@needs_kernels
@pytest.mark.parametrize(("rows", "cols"), [(1, 64), (6, 96), (3, 300)])
def test_quantize_rows_small(rows, cols):
    _check_quantize_rows(rows, cols, torch.float32)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "cols"), [(1, 4096), (37, 14336), (8192, 4096)])
def test_gpu_quantize_rows(rows, cols, dtype):
    _check_quantize_rows(rows, cols, dtype)


@needs_kernels
@pytest.mark.parametrize(("rows", "cols"), [(1, 64), (5, 96), (3, 100)])
def test_rms_norm_small(rows, cols):
    _check_rms_norm(rows, cols, torch.float32)


@needs_kernels
@pytest.mark.parametrize(("rows", "cols"), [(1, 32), (7, 48), (2, 300)])
def test_silu_and_mul_small(rows, cols):
    _check_silu_and_mul(rows, cols, torch.float32)


@needs_kernels
@pytest.mark.parametrize(("num_q", "num_k", "head_dim"), [(4, 2, 16), (6, 1, 8), (3, 3, 32)])
def test_rotary_small(num_q, num_k, head_dim):
    _check_rotary(5, num_q, num_k, head_dim, torch.float32)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 37, 8192])
def test_gpu_rms_norm(rows, dtype):
    _check_rms_norm(rows, 4096, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 37, 4096])
def test_gpu_silu_and_mul(rows, dtype):
    _check_silu_and_mul(rows, 14336, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 37, 4096])
def test_gpu_rotary(tokens, dtype):
    _check_rotary(tokens, 32, 8, 128, dtype)


@needs_kernels
@pytest.mark.parametrize("overlap", [False, True])
def test_engine_with_triton_kernels_matches_transformers(tmp_path, overlap):
    """The whole engine on the Triton attention backend and the fused layers (interpreted on CPU):
    int32 inputs, chunked prefill, and (``overlap``) inputs read from the previous step's samples."""
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.sampling_params import SamplingParams

    from .engine_helpers import build_hf_checkpoint, engine_config, hf_greedy, random_prompts

    dims = dict(hidden_size=128, num_attention_heads=4, head_dim=32)
    checkpoint = build_hf_checkpoint(tmp_path, "llama", seed=3, **dims)
    prompts = random_prompts([1, 7, 16, 33, 50], 320, seed=4)
    llm = LLM(engine_config(checkpoint, device=DEVICE, kernel="triton", max_num_batched_tokens=40))
    llm.engine.overlap = overlap
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(checkpoint, prompts, 8)
