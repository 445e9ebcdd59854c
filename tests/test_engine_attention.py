"""The torch attention backend against a plain float64 reference, and backend selection."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from pagedserve.engine.attention import AttentionBackend, NoAttentionBackendError, select_attention_backend
from pagedserve_plugins.torch_attention import TorchAttentionBackend

BLOCK_SIZES = [1, 8, 16, 32, 64, 128]


def paged_cache(lengths: list[int], block_size: int, num_kv_heads: int, head_dim: int, seed: int):
    """Random K/V per sequence, scattered over shuffled blocks of a NaN-poisoned cache."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + 3
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, keys, values = [], [], []
    for n, count in zip(lengths, needed, strict=True):
        blocks, perm = perm[:count], perm[count:]
        k = torch.randn(n, num_kv_heads, head_dim, generator=g)
        v = torch.randn(n, num_kv_heads, head_dim, generator=g)
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


class _PickyBackend(AttentionBackend):
    name = "picky"
    preference = 10

    @classmethod
    def unsupported_reason(cls, head_dim, dtype, block_size, device):
        return "needs head_dim 128" if head_dim != 128 else None

    def store_kv(self, *args):  # pragma: no cover - never run
        raise NotImplementedError

    prefill = decode = store_kv


class _ZetaBackend(_PickyBackend):
    name = "zeta"
    preference = 0

    @classmethod
    def unsupported_reason(cls, head_dim, dtype, block_size, device):
        return None


def test_auto_picks_the_most_preferred_backend_that_supports_the_model(caplog):
    # Registration order must not matter: torch (the reference) comes first here.
    backends = {"torch": TorchAttentionBackend, "picky": _PickyBackend}
    kwargs = dict(dtype=torch.float16, block_size=16, device=torch.device("cpu"))
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


def test_torch_backend_is_the_last_resort():
    assert TorchAttentionBackend.preference < AttentionBackend.preference
    assert not TorchAttentionBackend.supports_cuda_graphs
