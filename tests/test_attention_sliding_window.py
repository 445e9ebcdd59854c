"""Sliding-window attention and logit soft-capping in both attention backends, against float64.

The paged caches come from ``test_triton_attention.Paged`` (shuffled pages, NaN everywhere a kernel must
not read), and on top of that the blocks a window has left behind are freed as the block manager frees
them: their pages are NaN and their block-table entries -1, so a backend that reads below a window shows
NaN. The ``torch`` backend runs here; the Triton kernels run compiled on a GPU, and on the CPU in a child
pytest under ``TRITON_INTERPRET=1`` (``test_triton_interpreter_suite``), as in ``test_triton_attention``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pagedserve_plugins.torch_attention import TorchAttentionBackend

pytest.importorskip("triton")

from pagedserve_plugins.triton_attention import backend as backend_mod  # noqa: E402
from pagedserve_plugins.triton_attention.backend import TritonAttentionBackend  # noqa: E402

from .test_triton_attention import Paged, assert_close_rows  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED_HERE = not ON_GPU and backend_mod._interpreting() and backend_mod._interpreter_live()
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def be(request):
    if request.param == "triton":
        if not (ON_GPU or INTERPRETED_HERE):
            pytest.skip("no CUDA: the Triton kernels run in the interpreter child")
        return TritonAttentionBackend()
    if INTERPRETED_HERE:
        pytest.skip("the interpreter child runs the Triton kernels only")
    return TorchAttentionBackend()


@pytest.mark.slow  # the Triton interpreter: about a minute on two cores
@pytest.mark.skipif(ON_GPU or INTERPRETED_HERE, reason="the kernel tests run in this process")
def test_triton_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    args = ["-q", "-m", "not gpu", "-p", "no:cacheprovider", "-o", "addopts=", "--no-header", "-k", "triton"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, *args],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def reference(q, keys, values, positions, scale, window=None, softcap=None):
    """float64 attention of ``q`` [n, Hq, D] at ``positions`` over keys/values [L, Hkv, D]: causal, the last
    ``window`` keys only (transformers: ``kv_idx > q_idx - window``), scores soft-capped after scaling."""
    q = q.detach().double()
    k = keys.to(q.device).double()
    v = values.to(q.device).double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.einsum("nhd,lhd->nhl", q, k) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.as_tensor(positions, device=q.device)[:, None]
    key = torch.arange(k.shape[0], device=q.device)[None, :]
    visible = key <= pos
    if window is not None:
        visible &= key > pos - window
    s = s.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("nhl,lhd->nhd", s.softmax(-1), v)


def free_out_of_window(paged: Paged, first_keys: list[int]) -> None:
    """Free what the block manager frees: each sequence's blocks wholly before its first needed key."""
    for b, first in enumerate(first_keys):
        for i in range(first // paged.bs):
            page = int(paged.block_tables[b, i])
            paged.k_cache[page] = float("nan")
            paged.v_cache[page] = float("nan")
            paged.block_tables[b, i] = -1


def run_decode(be, ctx_lens, hq, hkv, d, bs, dtype, seed, window, softcap, num_splits=None):
    paged = Paged(ctx_lens, hkv, d, bs, dtype, DEVICE, seed)
    if window is not None:
        free_out_of_window(paged, [max(0, c - window) for c in ctx_lens])
    q = (torch.randn(len(ctx_lens), hq, d, generator=torch.Generator().manual_seed(seed + 1)) * 3).to(dtype)
    q = q.to(DEVICE)
    scale = d**-0.5
    kwargs = {"num_splits": num_splits} if isinstance(be, TritonAttentionBackend) else {}
    out = be.decode(
        q,
        paged.k_cache,
        paged.v_cache,
        paged.block_tables,
        paged.context_lens,
        scale,
        sliding_window=window,
        softcap=softcap,
        **kwargs,
    )
    for b, c in enumerate(ctx_lens):
        ref = reference(q[b : b + 1], paged.keys[b], paged.values[b], [c - 1], scale, window, softcap)
        assert_close_rows(out[b : b + 1], ref, TOL[dtype])
    return out


def run_prefill(be, seqs, hq, hkv, d, bs, dtype, seed, window, softcap):
    """``seqs``: (q_len, context_len) per sequence; the last q_len tokens of each context are the queries."""
    ctx_lens = [c for _, c in seqs]
    paged = Paged(ctx_lens, hkv, d, bs, dtype, DEVICE, seed)
    if window is not None:
        free_out_of_window(paged, [max(0, c - n - window + 1) for n, c in seqs])
    q_lens = [n for n, _ in seqs]
    q = torch.randn(sum(q_lens), hq, d, generator=torch.Generator().manual_seed(seed + 1)) * 3
    q = q.to(dtype).to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    scale = d**-0.5
    out = be.prefill(
        q,
        paged.k_cache,
        paged.v_cache,
        cu,
        paged.context_lens,
        paged.block_tables,
        scale,
        sliding_window=window,
        softcap=softcap,
    )
    start = 0
    for b, (n, c) in enumerate(seqs):
        ref = reference(
            q[start : start + n],
            paged.keys[b],
            paged.values[b],
            torch.arange(c - n, c),
            scale,
            window,
            softcap,
        )
        assert_close_rows(out[start : start + n], ref, TOL[dtype])
        start += n
    return out


# full prompts longer and shorter than the windows, a decode-like row, chunks over a long prefix
PREFILL_MIX = [(17, 17), (1, 40), (33, 100), (5, 5), (70, 70), (9, 130)]


@pytest.mark.parametrize("window", [1, 7, 16, 45])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_prefill_sliding_window(be, window, block_size):
    run_prefill(
        be,
        PREFILL_MIX,
        4,
        2,
        32,
        block_size,
        torch.float32,
        seed=window + block_size,
        window=window,
        softcap=None,
    )


@pytest.mark.parametrize("window", [1, 7, 16, 45])
@pytest.mark.parametrize(("block_size", "num_splits"), [(1, 3), (16, None), (32, 1), (8, 4)])
def test_decode_sliding_window(be, window, block_size, num_splits):
    run_decode(
        be, [1, 37, 150, 9, 70, 64], 4, 2, 32, block_size, torch.float32, window, window, None, num_splits
    )


@pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
def test_softcap(be, softcap):
    run_prefill(be, PREFILL_MIX, 8, 2, 32, 16, torch.float32, seed=3, window=None, softcap=softcap)
    run_decode(be, [1, 37, 150, 9], 8, 2, 32, 16, torch.float32, 4, None, softcap)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_window_and_softcap_together_in_half_precision(be, dtype):
    run_prefill(be, PREFILL_MIX, 8, 2, 64, 16, dtype, seed=5, window=20, softcap=30.0)
    run_decode(be, [1, 37, 150, 9], 8, 2, 64, 16, dtype, 6, 20, 30.0)


def test_softcap_changes_the_result(be):
    """A cap small enough to bind gives other weights than none: the test above cannot pass by ignoring it."""
    capped = run_decode(be, [90], 4, 2, 32, 16, torch.float32, 7, None, 0.5)
    plain = run_decode(be, [90], 4, 2, 32, 16, torch.float32, 7, None, None)
    assert (capped - plain).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("option", "value"), [("sliding_window", 0), ("sliding_window", -3), ("softcap", 0.0)]
)
def test_triton_refuses_bad_options(option, value):
    if not (ON_GPU or INTERPRETED_HERE):
        pytest.skip("the Triton backend checks its options in the kernel runs")
    be = TritonAttentionBackend()
    paged = Paged([5], 1, 32, 16, torch.float32, DEVICE, 0)
    q = torch.zeros(1, 1, 32, device=DEVICE)
    with pytest.raises(ValueError, match=option):
        be.decode(
            q, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, 1.0, **{option: value}
        )


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("window", [64, 500, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 64])
def test_triton_long_contexts_on_gpu(window, dtype, block_size):
    be = TritonAttentionBackend()
    seqs = [(600, 600), (1, 3000), (257, 2000), (1000, 1000)]
    run_prefill(be, seqs, 16, 4, 128, block_size, dtype, seed=window, window=window, softcap=50.0)
    run_decode(be, [3000, 1, 777, 4100], 16, 4, 128, block_size, dtype, window, window, 50.0)


def test_triton_engine_with_freed_blocks_matches_transformers(tmp_path):
    """The kernels inside the engine: a Mistral whose window (6) is shorter than the prompts, blocks freed
    behind it (their table entries -1), chunked prefill; greedy tokens equal transformers'."""
    if not (ON_GPU or INTERPRETED_HERE):
        pytest.skip("no CUDA: runs in the interpreter child")
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.sampling_params import SamplingParams

    from .engine_helpers import engine_config, hf_greedy, random_prompts
    from .windowed_checkpoints import build_windowed_checkpoint

    dims = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}
    checkpoint = build_windowed_checkpoint(tmp_path, "mistral", seed=2, sliding_window=6, **dims)
    prompts = random_prompts([9, 40], 320, seed=6)
    expected = hf_greedy(checkpoint, prompts, 8)
    llm = LLM(
        engine_config(checkpoint, device=DEVICE, kernel="triton", block_size=1, max_num_batched_tokens=16)
    )
    assert llm.engine.block_manager.sliding_window == 6
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    assert [o.outputs[0].token_ids for o in outputs] == expected
