"""Triton paged-attention kernels (``kernel=triton``) against a float64 torch reference.

With CUDA the kernels run compiled. Without it they run on Triton's CPU interpreter, which only works when
``TRITON_INTERPRET=1`` is set before ``triton`` is first imported; so that no setting leaks into other
test modules of the same pytest process, a plain CPU run re-runs this module in a child pytest with the
variable set (``test_cpu_interpreter_suite``) and skips the kernel tests in the parent. Running
``TRITON_INTERPRET=1 pytest tests/test_triton_attention.py`` runs them in-process instead.
Larger shapes are ``@pytest.mark.gpu``; on a GPU machine:
``python -m pytest -m gpu tests/test_triton_attention.py``.

Float8 caches are checked three ways: the stored bytes against torch's clamp-and-cast, attention against
the reference over what the cache holds, and attention against a bfloat16 cache of the same values. The
interpreter's own float8 casts round wrongly; the backend routes them through torch
(``_patch_interpreter_fp8_casts``), so these tests run on the CPU too.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from pagedserve_plugins import triton_attention  # noqa: E402
from pagedserve_plugins.triton_attention import backend as backend_mod  # noqa: E402
from pagedserve_plugins.triton_attention.backend import TritonAttentionBackend  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED_HERE = not ON_GPU and backend_mod._interpreting() and backend_mod._interpreter_live()
RUN_KERNELS_HERE = ON_GPU or INTERPRETED_HERE
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
# ||out - ref|| / ||ref|| per (token, head) row, against a float64 reference on the same rounded inputs
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# float8 caches (scale 1.0) and their largest finite values, where a store saturates
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
FP8 = list(FP8_MAX)
# ||fp8 - bf16|| / ||bf16|| over a whole output, float8 and bfloat16 caches of the same values: K and V
# rounded to 3 or 2 mantissa bits; measured over ten seeds at most 0.038 (e4m3) and 0.083 (e5m2)
FP8_VS_BF16_TOL = {torch.float8_e4m3fn: 0.06, torch.float8_e5m2: 0.12}


@pytest.fixture
def be() -> TritonAttentionBackend:
    if not RUN_KERNELS_HERE:
        pytest.skip("no CUDA: the kernel tests run in the interpreter child (test_cpu_interpreter_suite)")
    return TritonAttentionBackend()


@pytest.mark.slow  # the Triton interpreter: 36-90 s on two cores
@pytest.mark.skipif(ON_GPU or INTERPRETED_HERE, reason="kernel tests run in this process")
def test_cpu_interpreter_suite():
    """Run this module's CPU tests in a child pytest under ``TRITON_INTERPRET=1`` (small sizes, < 60 s)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            __file__,
            "-q",
            "-m",
            "not gpu",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "--no-header",
        ],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stored(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """What a cache of ``cache_dtype`` must hold for ``x``: float8 saturates at its largest finite value."""
    limit = FP8_MAX.get(cache_dtype)
    return (x if limit is None else x.float().clamp(-limit, limit)).to(cache_dtype)


class Paged:
    """Random K/V for a batch of sequences, scattered over shuffled pages of a NaN-poisoned cache.

    Pages no sequence owns, the unused tail of each sequence's last page, and the block-table entries past
    a sequence's last page (which point at a NaN page) all hold NaN: any read of them shows in the output.
    K/V are drawn in ``dtype`` and stored in ``cache_dtype`` (default ``dtype``); ``keys``/``values`` hold
    what the cache holds, read back as ``dtype``.
    """

    def __init__(
        self,
        ctx_lens,
        num_kv_heads,
        head_dim,
        block_size,
        dtype,
        device,
        seed,
        spare_cols=2,
        cache_dtype=None,
    ):
        cache_dtype = cache_dtype or dtype
        g = _gen(seed)
        self.ctx_lens = list(ctx_lens)
        self.bs = block_size
        pages = [math.ceil(c / block_size) for c in self.ctx_lens]
        num_blocks = sum(pages) + 3
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.full(shape, float("nan"), dtype=cache_dtype)
        self.v_cache = torch.full(shape, float("nan"), dtype=cache_dtype)
        order = torch.randperm(num_blocks, generator=g)
        poison_page = int(order[-1])
        cols = max(pages + [1]) + spare_cols
        self.block_tables = torch.full((len(self.ctx_lens), cols), poison_page, dtype=torch.int32)
        self.keys, self.values = [], []
        used = 0
        for b, (c, n) in enumerate(zip(self.ctx_lens, pages, strict=True)):
            self.block_tables[b, :n] = order[used : used + n].to(torch.int32)
            used += n
            k = stored(torch.randn(c, num_kv_heads, head_dim, generator=g).to(dtype), cache_dtype)
            v = stored(torch.randn(c, num_kv_heads, head_dim, generator=g).to(dtype), cache_dtype)
            t = torch.arange(c)
            pg = self.block_tables[b, (t // block_size).long()].long()
            self.k_cache[pg, t % block_size] = k
            self.v_cache[pg, t % block_size] = v
            self.keys.append(k.to(dtype))
            self.values.append(v.to(dtype))
        self.k_cache = self.k_cache.to(device)
        self.v_cache = self.v_cache.to(device)
        self.block_tables = self.block_tables.to(device)
        self.context_lens = torch.tensor(self.ctx_lens, dtype=torch.int32, device=device)


def ref_attention(q, keys, values, positions, scale):
    """float64 causal attention of ``q`` [n, Hq, D] at ``positions`` over keys/values [L, Hkv, D]."""
    q = q.detach().double()  # on the GPU when there is one: float64 there is fast enough for big shapes
    k = keys.to(q.device).double()
    v = values.to(q.device).double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("nhd,lhd->nhl", q, k) * scale
    positions = torch.as_tensor(positions, device=q.device)
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= positions[:, None]
    s = s.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("nhl,lhd->nhd", s.softmax(-1), v)


def assert_close_rows(out, ref, tol):
    out = out.detach().double().to(ref.device)
    assert not torch.isnan(out).any(), "output holds NaN (unwritten element or poisoned read)"
    err = (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
    assert err.max().item() < tol, f"max row error {err.max().item():.3g} >= {tol}"


def run_decode(be, ctx_lens, hq, hkv, d, bs, dtype, seed, num_splits=None, cache_dtype=None):
    """Decode over a paged cache against the float64 reference of what the cache holds; returns the output."""
    paged = Paged(ctx_lens, hkv, d, bs, dtype, DEVICE, seed, cache_dtype=cache_dtype)
    q = torch.randn(len(ctx_lens), hq, d, generator=_gen(seed + 1)).to(dtype).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    scale = d**-0.5
    res = be.decode(
        q,
        paged.k_cache,
        paged.v_cache,
        paged.block_tables,
        paged.context_lens,
        scale,
        out=out,
        num_splits=num_splits,
    )
    assert res is out
    for b, c in enumerate(ctx_lens):
        if c == 0:
            assert torch.all(out[b] == 0), "a sequence with no context must give zeros"
            continue
        ref = ref_attention(q[b : b + 1], paged.keys[b], paged.values[b], [c - 1], scale)
        assert_close_rows(out[b : b + 1], ref, TOL[dtype])
    return out


def run_prefill(be, seqs, hq, hkv, d, bs, dtype, seed, cache_dtype=None):
    """``seqs``: (q_len, context_len) per sequence; the last q_len tokens of each context are the queries.
    Checked like :func:`run_decode`; returns the output."""
    ctx_lens = [c for _, c in seqs]
    paged = Paged(ctx_lens, hkv, d, bs, dtype, DEVICE, seed, cache_dtype=cache_dtype)
    q_lens = [n for n, _ in seqs]
    total = sum(q_lens)
    q = torch.randn(total, hq, d, generator=_gen(seed + 1)).to(dtype).to(DEVICE)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    scale = d**-0.5
    res = be.prefill(
        q, paged.k_cache, paged.v_cache, cu, paged.context_lens, paged.block_tables, scale, out=out
    )
    assert res is out
    start = 0
    for b, (n, c) in enumerate(seqs):
        positions = torch.arange(c - n, c)
        ref = ref_attention(q[start : start + n], paged.keys[b], paged.values[b], positions, scale)
        assert_close_rows(out[start : start + n], ref, TOL[dtype])
        start += n
    return out


# ---------------------------------------------------------------------------------------------- store_kv
@pytest.mark.parametrize(
    ("block_size", "hkv", "d", "dtype", "cache_dtype"),
    [
        (16, 8, 128, torch.bfloat16, torch.bfloat16),
        (32, 3, 64, torch.float16, torch.float16),
        (64, 1, 128, torch.float32, torch.float32),
        (128, 2, 64, torch.bfloat16, torch.bfloat16),
        (1, 4, 64, torch.bfloat16, torch.bfloat16),
        (8, 2, 32, torch.float16, torch.float16),
        (16, 8, 128, torch.bfloat16, torch.float8_e4m3fn),
        (32, 3, 64, torch.float16, torch.float8_e5m2),
        (8, 2, 32, torch.float32, torch.float8_e4m3fn),
        (1, 4, 64, torch.bfloat16, torch.float8_e5m2),
    ],
)
def test_store_kv(be, block_size, hkv, d, dtype, cache_dtype):
    g = _gen(block_size * 7 + hkv)
    num_blocks = 9
    shape = (num_blocks, block_size, hkv, d)
    k_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=DEVICE)
    n = min(13, num_blocks * block_size)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n]
    padding = torch.rand(n, generator=g) < 0.3
    padding[:2] = False  # rows 0 and 1 hold the out-of-range values below
    slots[padding] = -1  # padding tokens are skipped
    # key/value as strided views into one fused projection output, as a model produces them; scaled so
    # that float8 rounds many of them, with values past the float8 ranges in the stored rows
    fused = torch.randn(n, 5 * hkv, d, generator=g) * 40
    fused[0, hkv, :4] = torch.tensor([500.0, -1000.0, 62000.0, -62000.0])
    fused[1, 3 * hkv, :2] = torch.tensor([449.0, -62000.0])
    fused = fused.to(dtype).to(DEVICE)
    key, value = fused[:, hkv : 2 * hkv], fused[:, 3 * hkv : 4 * hkv]
    slot_dtype = torch.int32 if block_size == 32 else torch.int64  # the engine may pass either
    be.store_kv(key, value, k_cache, v_cache, slots.to(slot_dtype).to(DEVICE))
    exp_k = torch.full(shape, float("nan"), dtype=cache_dtype)
    exp_v = torch.full(shape, float("nan"), dtype=cache_dtype)
    keep = slots >= 0
    s = slots[keep]
    exp_k[s // block_size, s % block_size] = stored(key.cpu()[keep], cache_dtype)
    exp_v[s // block_size, s % block_size] = stored(value.cpu()[keep], cache_dtype)
    # byte for byte: the untouched slots keep their NaN, the stored ones are rounded to nearest even
    assert torch.equal(k_cache.cpu().view(torch.uint8), exp_k.view(torch.uint8))
    assert torch.equal(v_cache.cpu().view(torch.uint8), exp_v.view(torch.uint8))


# ---------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_block_sizes_and_gqa(be, block_size, group):
    hkv = 2
    run_decode(
        be, [1, 37, 150, 9, 70], hkv * group, hkv, 64, block_size, torch.bfloat16, seed=block_size + group
    )


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_decode_splits(be, num_splits):
    # odd lengths; split counts that do not divide the tile counts; a zero-length (padding) row
    run_decode(
        be, [193, 0, 64, 65, 3, 260], 8, 2, 64, 16, torch.bfloat16, seed=num_splits, num_splits=num_splits
    )


@pytest.mark.parametrize(
    ("dtype", "d", "block_size"),
    [(torch.float16, 128, 32), (torch.float32, 64, 64), (torch.bfloat16, 128, 1), (torch.float16, 64, 8)],
)
def test_decode_dtypes_and_small_blocks(be, dtype, d, block_size):
    run_decode(be, [45, 130, 7], 8, 2, d, block_size, dtype, seed=d + block_size, num_splits=2)


# ---------------------------------------------------------------------------------------------- prefill
PREFILL_MIX = [(17, 17), (1, 40), (33, 100), (5, 5), (70, 70)]  # full prompts, a decode-like row, chunks


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_block_sizes_and_gqa(be, block_size, group):
    hkv = 2
    run_prefill(be, PREFILL_MIX, hkv * group, hkv, 64, block_size, torch.bfloat16, seed=block_size * group)


@pytest.mark.parametrize(
    ("dtype", "d", "block_size"),
    [(torch.float16, 128, 16), (torch.float32, 64, 32), (torch.bfloat16, 64, 1), (torch.bfloat16, 128, 8)],
)
def test_prefill_dtypes_and_small_blocks(be, dtype, d, block_size):
    run_prefill(be, [(9, 30), (40, 40), (2, 3)], 4, 1, d, block_size, dtype, seed=d * block_size)


def test_prefill_single_sequence_prefix_hit(be):
    # one sequence, a long cached prefix and a short odd chunk (prefix-cache hit / chunked prefill)
    run_prefill(be, [(11, 203)], 12, 3, 64, 16, torch.bfloat16, seed=5)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, *FP8])
def test_store_then_prefill_then_decode(be, cache_dtype):
    """The three kernels chained as the engine uses them: store a prompt, attend to it, decode one more.

    A few K/V values lie past the float8 ranges: the reference reads what the cache must hold (saturated)."""
    hq, hkv, d, bs, dtype = 8, 2, 64, 16, torch.bfloat16
    g = _gen(11)
    prompt = [23, 40]
    num_blocks = 8
    k_cache = torch.full((num_blocks, bs, hkv, d), float("nan"), dtype=cache_dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    block_tables = torch.tensor([[5, 2, 7, 0], [1, 3, 6, 4]], dtype=torch.int32, device=DEVICE)
    keys = [torch.randn(n + 1, hkv, d, generator=g).to(dtype) for n in prompt]
    values = [torch.randn(n + 1, hkv, d, generator=g).to(dtype) for n in prompt]
    keys[0][3, 0, 0], keys[1][5, 1, 2], keys[1][-1, 0, 1] = 1000.0, -62000.0, 500.0
    values[0][4, 1, 3], values[1][-1, 1, 0] = 62000.0, -600.0
    held_keys = [stored(k, cache_dtype).to(dtype) for k in keys]
    held_values = [stored(v, cache_dtype).to(dtype) for v in values]

    def slots(b, positions):
        p = torch.as_tensor(positions)
        return (block_tables.cpu()[b, p // bs].long() * bs + p % bs).to(DEVICE)

    slot_map = torch.cat([slots(b, range(n)) for b, n in enumerate(prompt)])
    be.store_kv(
        torch.cat([k[:n] for k, n in zip(keys, prompt, strict=True)]).to(DEVICE),
        torch.cat([v[:n] for v, n in zip(values, prompt, strict=True)]).to(DEVICE),
        k_cache,
        v_cache,
        slot_map,
    )
    q = torch.randn(sum(prompt), hq, d, generator=g).to(dtype).to(DEVICE)
    cu = torch.tensor([0, prompt[0], sum(prompt)], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(prompt, dtype=torch.int32, device=DEVICE)
    out = be.prefill(q, k_cache, v_cache, cu, ctx, block_tables, d**-0.5)
    for b, n in enumerate(prompt):
        ref = ref_attention(
            q[cu[b] : cu[b + 1]], held_keys[b][:n], held_values[b][:n], torch.arange(n), d**-0.5
        )
        assert_close_rows(out[cu[b] : cu[b + 1]], ref, TOL[dtype])
    # one decode step: store the new token, then attend over n + 1 tokens
    be.store_kv(
        torch.stack([k[n] for k, n in zip(keys, prompt, strict=True)]).to(DEVICE),
        torch.stack([v[n] for v, n in zip(values, prompt, strict=True)]).to(DEVICE),
        k_cache,
        v_cache,
        torch.cat([slots(b, [n]) for b, n in enumerate(prompt)]),
    )
    qd = torch.randn(2, hq, d, generator=g).to(dtype).to(DEVICE)
    out = be.decode(qd, k_cache, v_cache, block_tables, ctx + 1, d**-0.5)
    for b, n in enumerate(prompt):
        ref = ref_attention(qd[b : b + 1], held_keys[b], held_values[b], [n], d**-0.5)
        assert_close_rows(out[b : b + 1], ref, TOL[dtype])


# ---------------------------------------------------------------------------------------------- float8 caches
@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize(
    ("dtype", "block_size", "group", "num_splits"),
    [(torch.bfloat16, 16, 4, None), (torch.float16, 1, 1, 3), (torch.float32, 32, 8, 1)],
)
def test_decode_fp8_cache(be, cache_dtype, dtype, block_size, group, num_splits):
    run_decode(
        be, [1, 37, 150, 0, 70], 2 * group, 2, 64, block_size, dtype, 21, num_splits, cache_dtype=cache_dtype
    )


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize(
    ("dtype", "block_size", "group", "d"),
    [(torch.bfloat16, 16, 4, 64), (torch.float16, 8, 1, 128), (torch.float32, 32, 3, 32)],
)
def test_prefill_fp8_cache(be, cache_dtype, dtype, block_size, group, d):
    run_prefill(be, PREFILL_MIX, 2 * group, 2, d, block_size, dtype, seed=22, cache_dtype=cache_dtype)


@pytest.mark.parametrize("cache_dtype", FP8)
def test_fp8_cache_tracks_a_bf16_cache(be, cache_dtype):
    """The same K/V in a float8 and in a bfloat16 cache give nearly the same attention: float8 only rounds
    them to fewer mantissa bits. A wrong conversion (bytes read as integers, a scale) is far off."""
    shape = dict(hq=8, hkv=2, d=64, bs=16, dtype=torch.bfloat16)
    for run, args in ((run_decode, ([45, 130, 7, 64],)), (run_prefill, (PREFILL_MIX,))):
        full = run(be, *args, **shape, seed=23).double()
        narrow = run(be, *args, **shape, seed=23, cache_dtype=cache_dtype).double()
        err = ((narrow - full).norm() / full.norm()).item()
        assert err < FP8_VS_BF16_TOL[cache_dtype], f"{run.__name__}: relative error {err:.3g}"


# ---------------------------------------------------------------------------------------------- API
def test_unsupported_reason(monkeypatch):
    bf16 = torch.bfloat16
    if not RUN_KERNELS_HERE:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert "set it before" in TritonAttentionBackend.unsupported_reason(128, bf16, 16, "cpu", bf16)
        return
    reason = TritonAttentionBackend.unsupported_reason
    assert "block_size 7 not supported" in reason(128, bf16, 7, DEVICE, bf16)
    assert "head_dim 96" in reason(96, bf16, 16, DEVICE, bf16)
    assert "dtype" in reason(128, torch.int8, 16, DEVICE, torch.int8)
    assert "kv_cache_dtype torch.float16 not supported" in reason(128, bf16, 16, DEVICE, torch.float16)
    assert reason(128, bf16, 16, DEVICE, bf16) is None
    assert reason(128, bf16, 16, DEVICE, torch.float8_e4m3fn) is None
    assert reason(64, torch.float32, 16, DEVICE, torch.float8_e5m2) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "needs CUDA device" in reason(128, bf16, 16, "cpu", bf16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if INTERPRETED_HERE:
        assert reason(64, torch.float32, 32, torch.device("cpu"), torch.float32) is None
    else:  # triton was imported compiled: the interpreter cannot be switched on any more
        assert "set it before" in reason(64, torch.float32, 32, torch.device("cpu"), torch.float32)
    assert TritonAttentionBackend.name == "triton"


@pytest.mark.parametrize(
    ("capability", "fp8_ok"), [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)]
)
def test_fp8_cache_needs_compute_capability_8_9(monkeypatch, capability, fp8_ok):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reason = TritonAttentionBackend.unsupported_reason
    assert reason(128, torch.bfloat16, 16, "cuda", torch.bfloat16) is None
    for fp8 in FP8:
        got = reason(128, torch.bfloat16, 16, "cuda", fp8)
        assert got is None if fp8_ok else "float8 KV cache needs compute capability 8.9" in got


def test_hook_lists_backend_and_survives_missing_triton(monkeypatch):
    assert triton_attention.pagedserve_attention_backends() == [TritonAttentionBackend]
    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" now raises ImportError
    monkeypatch.delitem(sys.modules, backend_mod.__name__)
    monkeypatch.delattr(triton_attention, "backend", raising=False)
    assert triton_attention.pagedserve_attention_backends() == []


@pytest.mark.skipif(INTERPRETED_HERE, reason="kernels are built for the interpreter in this process")
def test_kernels_compile_for_hopper(capsys):
    """The compiled path, with no GPU: build each kernel for sm_90 with the ptxas shipped in the wheel."""
    from pagedserve.benchmarks.kernels import aot_check

    assert aot_check.main(["--quick"]) == 0, capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- GPU sizes
LLAMA = dict(hq=32, hkv=8, d=128)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_gpu_decode_llama_shapes(be, block_size, num_splits):
    ctx = torch.randint(1, 5000, (37,), generator=_gen(block_size)).tolist() + [0, 1, 16383]
    run_decode(
        be,
        ctx,
        LLAMA["hq"],
        LLAMA["hkv"],
        LLAMA["d"],
        block_size,
        torch.bfloat16,
        seed=3,
        num_splits=num_splits,
    )


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize(("group", "d"), [(1, 64), (4, 128), (8, 128), (4, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_decode_gqa_dtypes(be, group, d, dtype):
    ctx = torch.randint(1, 3000, (19,), generator=_gen(group * d)).tolist()
    run_decode(be, ctx, 4 * group, 4, d, 16, dtype, seed=group)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize(("block_size", "num_splits"), [(16, None), (64, 1), (128, 5)])
def test_gpu_decode_fp8_llama_shapes(be, cache_dtype, block_size, num_splits):
    ctx = torch.randint(1, 5000, (37,), generator=_gen(block_size)).tolist() + [0, 1, 16383]
    run_decode(
        be,
        ctx,
        **LLAMA,
        bs=block_size,
        dtype=torch.bfloat16,
        seed=3,
        num_splits=num_splits,
        cache_dtype=cache_dtype,
    )


def _llama_prefill_seqs(seed: int) -> list[tuple[int, int]]:
    g = _gen(seed)
    seqs = []
    for _ in range(13):
        c = int(torch.randint(1, 2500, (1,), generator=g))
        n = int(torch.randint(1, c + 1, (1,), generator=g))
        seqs.append((n, c))
    return seqs + [(1024, 1024), (1, 777), (513, 2049)]


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 1, 8])
def test_gpu_prefill_llama_shapes(be, block_size):
    seqs = _llama_prefill_seqs(block_size)
    run_prefill(be, seqs, LLAMA["hq"], LLAMA["hkv"], LLAMA["d"], block_size, torch.bfloat16, seed=block_size)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("block_size", [16, 1])
def test_gpu_prefill_fp8_llama_shapes(be, cache_dtype, block_size):
    seqs = _llama_prefill_seqs(block_size)
    run_prefill(
        be, seqs, **LLAMA, bs=block_size, dtype=torch.bfloat16, seed=block_size, cache_dtype=cache_dtype
    )


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize(("group", "d"), [(1, 64), (8, 128), (4, 256), (3, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_prefill_gqa_dtypes(be, group, d, dtype):
    seqs = [(300, 300), (77, 1000), (1, 1), (129, 129), (64, 640)]
    run_prefill(be, seqs, 2 * group, 2, d, 32, dtype, seed=group + d)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_decode_cuda_graph_replay(be, cache_dtype):
    """Captured once, replayed with new lengths and tables: nothing in the wrappers may sync or re-plan."""
    hq, hkv, d, bs = 32, 8, 128, 16
    paged = Paged([300, 1000, 5, 2000], hkv, d, bs, torch.bfloat16, DEVICE, seed=9, cache_dtype=cache_dtype)
    q = torch.randn(4, hq, d, generator=_gen(1)).to(torch.bfloat16).to(DEVICE)
    ctx = paged.context_lens.clone()
    out = torch.empty_like(q)
    be.decode(q, paged.k_cache, paged.v_cache, paged.block_tables, ctx, d**-0.5, out=out)  # compile first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        be.decode(q, paged.k_cache, paged.v_cache, paged.block_tables, ctx, d**-0.5, out=out)
    new_lens = [299, 17, 5, 1999]
    ctx.copy_(torch.tensor(new_lens, dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for b, c in enumerate(new_lens):
        ref = ref_attention(q[b : b + 1], paged.keys[b][:c], paged.values[b][:c], [c - 1], d**-0.5)
        assert_close_rows(out[b : b + 1], ref, TOL[torch.bfloat16])
