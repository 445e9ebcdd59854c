"""The MoE experts: the torch reference against a float64 per-token loop, the block alignment's
invariants, and the Triton grouped GEMM against the float64 reference.

With CUDA the kernel runs compiled (marked ``gpu``). Without it, the kernel tests run on Triton's
interpreter in a child pytest with ``TRITON_INTERPRET=1`` (``test_cpu_interpreter_suite``, as in
``test_triton_attention.py``): the variable must be set before ``triton`` is first imported. The
interpreter truncates float32 → bfloat16 instead of rounding, so bfloat16 tolerances are loose.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pagedserve.models.layers.moe import fused_experts_reference, route

ON_GPU = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
RUN_KERNELS_HERE = ON_GPU or INTERPRETING
DEVICE = "cuda" if ON_GPU else "cpu"
# ||out - ref64|| / ||ref64|| over the whole output, against float64 on the same rounded inputs
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# (tokens, experts, top_k, hidden, intermediate): ragged sizes, experts left without tokens, k = 1..3
SHAPES = [(1, 8, 2, 32, 32), (5, 4, 2, 48, 40), (37, 8, 3, 64, 96), (200, 4, 1, 32, 48)]


def _problem(
    tokens: int, experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE, dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5).to(DEVICE, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * inter**-0.5).to(DEVICE, dtype)
    weights, ids = route(torch.randn(tokens, experts, generator=g).to(DEVICE), top_k, renormalize=True)
    return x, w13, w2, weights, ids


def per_token_loop(x, w13, w2, weights, ids) -> torch.Tensor:  # noqa: ANN001 - tensors
    """The definition, one token and one expert at a time, in float64."""
    x, w13, w2, weights = x.double(), w13.double(), w2.double(), weights.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            gate, up = F.linear(x[t], w13[e]).chunk(2)
            out[t] += weights[t, slot] * F.linear(F.silu(gate) * up, w2[e])
    return out


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


# --- torch reference and routing (any device) ------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_the_per_token_definition(shape):
    problem = _problem(*shape, torch.float64)
    got = fused_experts_reference(*problem)
    torch.testing.assert_close(got, per_token_loop(*problem), rtol=1e-12, atol=1e-12)


def test_reference_with_no_tokens_is_empty():
    x, w13, w2, weights, ids = _problem(3, 4, 2, 32, 32, torch.float32)
    out = fused_experts_reference(x[:0], w13, w2, weights[:0], ids[:0])
    assert out.shape == (0, 32)


def test_route_renormalizes_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, dim=-1)
    weights, ids = route(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, probs[:, :2])
    weights, _ = route(logits, 2, renormalize=True)
    torch.testing.assert_close(weights, probs[:, :2] / probs[:, :2].sum())
    assert weights.dtype == torch.float32


# --- block alignment ---------------------------------------------------------------------------------


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_pairs_are_grouped_by_expert_in_whole_blocks(shape, block_m):
    if not RUN_KERNELS_HERE:
        pytest.skip("imports triton; runs in the interpreter child (test_cpu_interpreter_suite)")
    from pagedserve.models.layers.fused_moe_triton import align_pairs_to_blocks

    tokens, experts, top_k = shape[:3]
    _, _, _, _, ids = _problem(*shape, torch.float32)
    blocks = align_pairs_to_blocks(ids, experts, block_m)
    num_pairs = tokens * top_k
    pairs, block_experts = blocks.sorted_pairs.cpu(), blocks.block_experts.cpu()
    num_padded = int(blocks.num_padded)
    flat = ids.flatten().cpu()
    # every pair exactly once, padding marked with num_pairs, nothing past num_padded but padding
    real = pairs[pairs < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))
    assert (pairs[num_padded:] == num_pairs).all()
    counts = torch.bincount(flat, minlength=experts)
    assert num_padded == int(((counts + block_m - 1) // block_m * block_m).sum())
    for b in range(num_padded // block_m):
        rows = pairs[b * block_m : (b + 1) * block_m]
        rows = rows[rows < num_pairs]
        assert len(rows) > 0, "a block in use holds no pair"
        assert (flat[rows.long()] == block_experts[b]).all(), "a block mixes experts"
        assert rows.tolist() == sorted(rows.tolist()), "pairs of one expert keep their order"


# --- the Triton grouped GEMM -------------------------------------------------------------------------


@pytest.mark.slow  # the Triton interpreter in a child pytest: 10-20 s on two shared cores
@pytest.mark.skipif(RUN_KERNELS_HERE, reason="kernel tests run in this process")
def test_cpu_interpreter_suite():
    """Run this module's CPU tests in a child pytest under ``TRITON_INTERPRET=1``."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    args = ["-q", "-m", "not gpu", "-p", "no:cacheprovider", "-o", "addopts=", "--no-header", "-n", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, *args],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def _check_kernel(shape: tuple[int, ...], dtype: torch.dtype, round_weights: bool = False) -> None:
    from pagedserve.models.layers.fused_moe_triton import fused_experts

    x, w13, w2, weights, ids = _problem(*shape, dtype)
    if round_weights:
        weights = weights.to(dtype)
    got = fused_experts(x, w13, w2, weights, ids)
    assert got.dtype == dtype and got.shape == x.shape
    ref64 = fused_experts_reference(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert _rel(got, ref64) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_experts_match_the_reference(shape, dtype):
    if not RUN_KERNELS_HERE:
        pytest.skip("no CUDA: the kernel tests run in the interpreter child (test_cpu_interpreter_suite)")
    _check_kernel(shape, dtype, round_weights=dtype != torch.float32)


def test_triton_experts_with_no_tokens():
    if not RUN_KERNELS_HERE:
        pytest.skip("no CUDA: the kernel tests run in the interpreter child (test_cpu_interpreter_suite)")
    from pagedserve.models.layers.fused_moe_triton import fused_experts

    x, w13, w2, weights, ids = _problem(3, 4, 2, 32, 32, torch.float32)
    assert fused_experts(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 8, 2, 4096, 1024), (256, 8, 2, 1024, 3584), (33, 128, 8, 2048, 768)])
def test_triton_experts_at_model_sizes(shape, dtype):
    """Mixtral-like (8 experts, top 2) and Qwen3-30B-A3B-like (128 experts, top 8) layers."""
    _check_kernel(shape, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_triton_experts_replay_in_a_cuda_graph():
    """No host sync inside: a captured call replays with other routing and gives the reference's output."""
    from pagedserve.models.layers.fused_moe_triton import fused_experts

    x, w13, w2, weights, ids = _problem(48, 8, 2, 256, 512, torch.bfloat16)
    fused_experts(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w13, w2, weights, ids)
    x2, _, _, weights2, ids2 = _problem(48, 8, 2, 256, 512, torch.bfloat16, seed=7)
    x.copy_(x2)
    weights.copy_(weights2)
    ids.copy_(ids2)
    graph.replay()
    ref64 = fused_experts_reference(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert _rel(out, ref64) < TOL[torch.bfloat16]
