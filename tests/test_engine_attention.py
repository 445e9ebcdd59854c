"""The torch attention backend against a plain float64 reference, and backend selection."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from pagedserve.engine.attention import AttentionBackend, NoAttentionBackendError, select_attention_backend
from pagedserve_plugins.torch_attention import TorchAttentionBackend

BLOCK_SIZES = [1, 8, 16, 32, 64, 128]
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}  # float8 caches saturate here
FP8 = list(FP8_MAX)


def stored(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """What a cache of ``cache_dtype`` must hold for ``x``: float8 saturates at its largest finite value."""
    limit = FP8_MAX.get(cache_dtype)
    return (x if limit is None else x.float().clamp(-limit, limit)).to(cache_dtype)


def paged_cache(
    lengths: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    seed: int,
    cache_dtype: torch.dtype = torch.float32,
):
    """Random K/V per sequence, scattered over shuffled blocks of a NaN-poisoned cache of ``cache_dtype``;
    the returned keys/values are what the cache holds, as float32."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + 3
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=cache_dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, keys, values = [], [], []
    for n, count in zip(lengths, needed, strict=True):
        blocks, perm = perm[:count], perm[count:]
        k = stored(torch.randn(n, num_kv_heads, head_dim, generator=g), cache_dtype).float()
        v = stored(torch.randn(n, num_kv_heads, head_dim, generator=g), cache_dtype).float()
        for t in range(n):
            k_cache[blocks[t // block_size], t % block_size] = k[t]
            v_cache[blocks[t // block_size], t % block_size] = v[t]
        tables.append(blocks)
        keys.append(k)
        values.append(v)
    width = max(needed)
    table = torch.tensor([b + [0] * (width - len(b)) for b in tables], dtype=torch.int32)
    return k_cache, v_cache, table, keys, values


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int, scale: float
) -> torch.Tensor:
    """q [S, Hq, D] for the last S positions of a context; k/v [L, Hkv, D]; float64 loops-free math."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("shd,lhd->hsl", q, k) * scale
    query_pos = torch.arange(context_len - q.shape[0], context_len)[:, None]
    scores = scores.masked_fill(torch.arange(context_len)[None, :] > query_pos, -math.inf)
    return torch.einsum("hsl,lhd->shd", scores.softmax(-1), v)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2), (6, 1)])
def test_prefill_matches_reference(block_size, num_heads, num_kv_heads):
    head_dim, lengths, q_lens = 16, [1, 37, 130, 9], [1, 20, 130, 4]
    k_cache, v_cache, table, keys, values = paged_cache(
        lengths, block_size, num_kv_heads, head_dim, seed=block_size
    )
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=g)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    scale = head_dim**-0.5
    out = TorchAttentionBackend().prefill(
        q, k_cache, v_cache, cu, torch.tensor(lengths, dtype=torch.int32), table, scale
    )
    for b, n in enumerate(lengths):
        expected = reference(q[cu[b] : cu[b + 1]], keys[b], values[b], n, scale)
        torch.testing.assert_close(out[cu[b] : cu[b + 1]].double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2), (3, 1)])
def test_decode_matches_reference(block_size, num_heads, num_kv_heads):
    head_dim, lengths = 32, [1, 17, 200, 64]
    k_cache, v_cache, table, keys, values = paged_cache(lengths, block_size, num_kv_heads, head_dim, seed=7)
    q = torch.randn(len(lengths), num_heads, head_dim, generator=torch.Generator().manual_seed(2))
    out = TorchAttentionBackend().decode(
        q, k_cache, v_cache, table, torch.tensor(lengths, dtype=torch.int32), 0.2
    )
    for b, n in enumerate(lengths):
        expected = reference(q[b : b + 1], keys[b], values[b], n, 0.2)
        torch.testing.assert_close(out[b : b + 1].double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("block_size", [1, 16])
def test_store_kv_writes_slots_and_skips_padding(block_size):
    k_cache = torch.zeros(4, block_size, 2, 8)
    v_cache = torch.zeros_like(k_cache)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([2 * block_size + 0, -1, 3 * block_size + block_size - 1])
    TorchAttentionBackend().store_kv(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache[2, 0], key[0])
    torch.testing.assert_close(v_cache[3, block_size - 1], value[2])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 2


def test_bfloat16_output_keeps_input_dtype():
    k_cache, v_cache, table, _, _ = paged_cache([5], 8, 2, 16, seed=0)
    q = torch.randn(1, 4, 16, dtype=torch.bfloat16)
    out = TorchAttentionBackend().decode(
        q, k_cache.bfloat16(), v_cache.bfloat16(), table, torch.tensor([5], dtype=torch.int32), 0.25
    )
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---- float8 caches: stored saturated and rounded, read back as q's dtype


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_fp8_writes_saturated_bytes_and_skips_padding(cache_dtype, dtype):
    g = torch.Generator().manual_seed(3)
    k_cache = torch.full((4, 16, 2, 8), float("nan"), dtype=cache_dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    key = (torch.randn(5, 2, 8, generator=g) * 40).to(dtype)  # many values between float8 neighbours
    value = (torch.randn(5, 2, 8, generator=g) * 40).to(dtype)
    key[0, 0, :3] = torch.tensor([500.0, -1000.0, 62000.0], dtype=dtype)  # past e4m3's and e5m2's range
    value[4, 1, :2] = torch.tensor([-62000.0, 449.0], dtype=dtype)
    slots = torch.tensor([2 * 16, -1, 17, -1, 3 * 16 + 15])
    TorchAttentionBackend().store_kv(key, value, k_cache, v_cache, slots)
    expected_k = torch.full_like(k_cache, float("nan"))
    expected_v = torch.full_like(v_cache, float("nan"))
    for row, slot in ((0, 32), (2, 17), (4, 63)):
        expected_k[slot // 16, slot % 16] = stored(key[row], cache_dtype)
        expected_v[slot // 16, slot % 16] = stored(value[row], cache_dtype)
    assert torch.equal(k_cache.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), expected_v.view(torch.uint8))


def _fp8_case(cache_dtype: torch.dtype, block_size: int = 16):
    lengths = [1, 37, 130, 9]
    cache = paged_cache(lengths, block_size, 2, 16, seed=block_size, cache_dtype=cache_dtype)
    return lengths, torch.tensor(lengths, dtype=torch.int32), cache


# float64 reference over the dequantized cache: float32 queries are exact up to float32 rounding
REF_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16])
def test_fp8_cache_decode_and_prefill_match_the_reference(cache_dtype, dtype, block_size):
    lengths, lens, (k_cache, v_cache, table, keys, values) = _fp8_case(cache_dtype, block_size)
    backend = TorchAttentionBackend()
    q = torch.randn(len(lengths), 4, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = backend.decode(q, k_cache, v_cache, table, lens, 0.25)
    assert out.dtype == dtype
    for b, n in enumerate(lengths):
        expected = reference(q[b : b + 1], keys[b], values[b], n, 0.25)
        torch.testing.assert_close(out[b : b + 1].double(), expected, **REF_TOL[dtype])
    q_lens = [1, 20, 130, 4]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), 4, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    out = backend.prefill(q, k_cache, v_cache, cu, lens, table, 0.25)
    for b, n in enumerate(lengths):
        expected = reference(q[cu[b] : cu[b + 1]], keys[b], values[b], n, 0.25)
        torch.testing.assert_close(out[cu[b] : cu[b + 1]].double(), expected, **REF_TOL[dtype])


@pytest.mark.parametrize(("cache_dtype", "bound"), [(torch.float8_e4m3fn, 0.06), (torch.float8_e5m2, 0.12)])
def test_fp8_cache_tracks_a_float32_cache(cache_dtype, bound):
    """Same random K/V in both caches: float8 only rounds them. ``||fp8 - fp32|| / ||fp32||`` measured over
    32 cases: at most 0.038 (e4m3) and 0.072 (e5m2); a misread cache (bytes as integers) is far off."""
    lengths, lens, (k8, v8, table, _, _) = _fp8_case(cache_dtype)
    _, _, (k32, v32, _, _, _) = _fp8_case(torch.float32)
    q = torch.randn(len(lengths), 4, 16, generator=torch.Generator().manual_seed(4))
    narrow = TorchAttentionBackend().decode(q, k8, v8, table, lens, 0.25)
    full = TorchAttentionBackend().decode(q, k32, v32, table, lens, 0.25)
    err = ((narrow - full).norm() / full.norm()).item()
    assert err < bound, f"relative error {err:.3g}"


class _PickyBackend(AttentionBackend):
    name = "picky"
    preference = 10

    @classmethod
    def unsupported_reason(cls, head_dim, dtype, block_size, device, kv_cache_dtype):
        if kv_cache_dtype != dtype:
            return f"no {kv_cache_dtype} cache"
        return "needs head_dim 128" if head_dim != 128 else None

    def store_kv(self, *args):  # pragma: no cover - never run
        raise NotImplementedError

    prefill = decode = store_kv


class _ZetaBackend(_PickyBackend):
    name = "zeta"
    preference = 0

    @classmethod
    def unsupported_reason(cls, head_dim, dtype, block_size, device, kv_cache_dtype):
        return None


def test_auto_picks_the_most_preferred_backend_that_supports_the_model(caplog):
    # Registration order must not matter: torch (the reference) comes first here.
    backends = {"torch": TorchAttentionBackend, "picky": _PickyBackend}
    kwargs = dict(
        dtype=torch.float16, block_size=16, device=torch.device("cpu"), kv_cache_dtype=torch.float16
    )
    assert select_attention_backend(backends, "auto", head_dim=128, **kwargs) is _PickyBackend
    with caplog.at_level(logging.INFO, logger="pagedserve.engine.attention"):
        assert select_attention_backend(backends, "auto", head_dim=64, **kwargs) is TorchAttentionBackend
    assert "picky: needs head_dim 128" in caplog.text
    with pytest.raises(NoAttentionBackendError, match="picky: needs head_dim 128"):
        select_attention_backend(backends, "picky", head_dim=64, **kwargs)
    with pytest.raises(NoAttentionBackendError, match="registered: \\['picky', 'torch'\\]"):
        select_attention_backend(backends, "flash", head_dim=64, **kwargs)
    with pytest.raises(NoAttentionBackendError, match="picky: needs head_dim 128"):
        select_attention_backend({"picky": _PickyBackend}, "auto", head_dim=64, **kwargs)
    # Equal preference: ties are broken by name, never by registration order.
    both = {"zeta": _ZetaBackend, "alpha": type("Alpha", (_ZetaBackend,), {"name": "alpha"})}
    assert select_attention_backend(both, "auto", head_dim=64, **kwargs).name == "alpha"


def test_selection_passes_the_kv_cache_dtype_and_names_it(caplog):
    backends = {"torch": TorchAttentionBackend, "picky": _PickyBackend}
    kwargs = dict(head_dim=128, dtype=torch.bfloat16, block_size=16, device=torch.device("cpu"))
    fp8 = torch.float8_e4m3fn
    with caplog.at_level(logging.INFO, logger="pagedserve.engine.attention"):
        assert (
            select_attention_backend(backends, "auto", kv_cache_dtype=fp8, **kwargs) is TorchAttentionBackend
        )
    assert "picky: no torch.float8_e4m3fn cache" in caplog.text
    assert "kv_cache_dtype=torch.float8_e4m3fn" in caplog.text
    with pytest.raises(NoAttentionBackendError, match="kv_cache_dtype=torch.float8_e4m3fn.*no torch.float8"):
        select_attention_backend(backends, "picky", kv_cache_dtype=fp8, **kwargs)
    assert TorchAttentionBackend.unsupported_reason(16, torch.bfloat16, 16, "cpu", fp8) is None
    assert "kv_cache_dtype torch.int8" in TorchAttentionBackend.unsupported_reason(
        16, torch.bfloat16, 16, "cpu", torch.int8
    )


def test_torch_backend_is_the_last_resort():
    assert TorchAttentionBackend.preference < AttentionBackend.preference
    assert not TorchAttentionBackend.supports_cuda_graphs
